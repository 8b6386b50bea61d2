"""Shared fixtures: tiny synthetic image folders, the checkpoint listings this checkout carries (tests/manifests) and
the real benchmark images, found through BLINDSR_DATA or the README's datasets/ layout (skipped when absent)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "tests" / "manifests"   # key<TAB>shape of the authors' released checkpoints (our own listing)
sys.path.insert(0, str(REPO))
torch.set_num_threads(1)  # small smoke models: threads cost more than they give


def benchmark_dir() -> Path | None:
    """<dir>/<Set>/HR/*.png for Set5 and Set14: $BLINDSR_DATA if set, else datasets/ in the checkout."""
    folder = Path(os.environ.get("BLINDSR_DATA") or REPO / "datasets")
    return folder if (folder / "Set5" / "HR").is_dir() and (folder / "Set14" / "HR").is_dir() else None


REAL_IMAGE_TESTS = {"ran": 0, "skipped": 0}


def pytest_terminal_summary(terminalreporter):
    """One line: how many tests on the real benchmark images ran, or why they were skipped."""
    ran, skipped = REAL_IMAGE_TESTS["ran"], REAL_IMAGE_TESTS["skipped"]
    where = benchmark_dir()
    terminalreporter.write_line(f"real-image tests: {ran} ran on {where}" if where else
                                f"real-image tests: {skipped} skipped: no Set5/HR and Set14/HR under $BLINDSR_DATA "
                                f"or {REPO / 'datasets'} (see README, Data)")


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
def shared(tmp_path_factory):
    """The data a test may read besides the code: <this>/manifests (the listings the checkout carries) and
    <this>/benchmarks (the real images, when present: use bench_root to skip without them)."""
    root = tmp_path_factory.mktemp("data")
    (root / "manifests").symlink_to(MANIFESTS, target_is_directory=True)
    if benchmark_dir() is not None:
        (root / "benchmarks").symlink_to(benchmark_dir(), target_is_directory=True)
    return root


@pytest.fixture
def bench_root():
    """A --data-root holding the real Set5 and Set14 (<root>/<Set>/HR/*.png), or skip this test."""
    if benchmark_dir() is None:
        REAL_IMAGE_TESTS["skipped"] += 1
        pytest.skip("real benchmark images not found: set BLINDSR_DATA or fill datasets/<Set>/HR")
    REAL_IMAGE_TESTS["ran"] += 1
    return benchmark_dir()


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


class ConvLayouts(TorchDispatchMode):
    """While active: how many convolutions ran and how many of them gave an output that is not channels_last."""

    def __init__(self):
        super().__init__()
        self.total = self.off = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.total += 1
            self.off += not out.is_contiguous(memory_format=torch.channels_last)
        return out
