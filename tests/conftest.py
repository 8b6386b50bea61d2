"""Shared fixtures: tiny synthetic image folders and the optional ../shared benchmarks."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)  # small smoke models: threads cost more than they give


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    """A deterministic RGB uint8 picture with edges, gradients and texture (not noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(0.03, 0.25), rng.uniform(0.03, 0.25), rng.uniform(0, 6.28)
        img[..., c] = 128 + 70 * np.sin(fx * x + phase) * np.cos(fy * y)
    for _ in range(4):  # a few flat rectangles give sharp edges
        r0, c0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        img[r0:r0 + height // 3, c0:c0 + width // 3] = rng.uniform(20, 235, size=3)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def shared():
    """Path to ../shared, or skip the test when it is absent."""
    if not (SHARED / "benchmarks" / "Set5" / "HR").is_dir():
        pytest.skip("../shared/benchmarks not present")
    return SHARED


@pytest.fixture(scope="session")
def bench_root(shared):
    """A --data-root holding the real Set5 and Set14 (<root>/<Set>/HR/*.png)."""
    return shared / "benchmarks"


@pytest.fixture(scope="session")
def tiny_hr_dir(tmp_path_factory):
    """Four 96x96 training images in a nested folder (exercises recursive listing)."""
    root = tmp_path_factory.mktemp("hr")
    (root / "sub").mkdir()
    for i in range(4):
        folder = root / "sub" if i % 2 else root
        Image.fromarray(synthetic_image(i, 96, 96)).save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_bench_root(tmp_path_factory):
    """A --data-root with one tiny benchmark set 'Tiny' of two 48x64 images."""
    root = tmp_path_factory.mktemp("bench")
    (root / "Tiny" / "HR").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(synthetic_image(10 + i, 48, 64)).save(root / "Tiny" / "HR" / f"t{i}.png")
    return root
