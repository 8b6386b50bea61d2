"""What a benchmark convention fixes and no paper defines, shared by the blind-SR scripts: image IO, datasets,
classic degradation, benchmark protocols with per-image seeds, Y-channel PSNR/SSIM (MATLAB/BasicSR) and run
utilities. [P §n] cites the shared evaluation protocol (see README.md). Bicubic reference rows of every table:
`python common.py baseline --data Set5 Set14 --protocol gaussian8 --scale 4 --data-root datasets`."""
from __future__ import annotations

import argparse, contextlib, csv, dataclasses, functools, hashlib, itertools, json, math, os, random, signal, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
PROTOCOLS = ("gaussian8", "aniso_noise", "bicubic")
METRICS = {"psnr": "PSNR (Y)", "ssim": "SSIM (Y)", "psnr_rgb": "PSNR RGB", "ssim_rgb": "SSIM RGB"}  # row key: title

class UserError(Exception):
    """Bad input: the scripts print it as one line, `error: <message>`, and exit 2."""

# ---- Image IO ---------------------------------------------------------------------------------------------
def load_uint8(path) -> np.ndarray:
    """Any Pillow-readable image as (H, W, 3) uint8 RGB: gray is replicated, alpha dropped, 16-bit scaled."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit gray: 0..65535 -> 0..255
                return np.repeat(np.round(np.asarray(im, np.float64) / 257).astype(np.uint8)[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None

def load_image(path) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1] = uint8 / 255 [P §2]."""
    return torch.from_numpy(load_uint8(path)).permute(2, 0, 1).float().div(255)
def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> (H, W, 3) uint8: clamp, x255, round half to even [P §1.4]."""
    img = img.detach().float().cpu().reshape(-1, *img.shape[-2:])
    return np.ascontiguousarray(img.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())

def save_image(img, path) -> None:
    """Write a PNG from a float CHW tensor in [0, 1] or an HWC uint8 array."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img) if torch.is_tensor(img) else img).save(path)

def list_images(dirs) -> list[Path]:
    """All image files below one or more folders (recursive, sorted per folder)."""
    files = []
    for folder in [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]:
        if not folder.is_dir():
            raise UserError(f"image folder not found: {folder} (expected a folder of {'/'.join(IMAGE_SUFFIXES)} files)")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise UserError(f"no images in {folder} (looked recursively for {'/'.join(IMAGE_SUFFIXES)} files)")
        files += found
    return files

# ---- Training data ----------------------------------------------------------------------------------------
class HRPatches(torch.utils.data.Dataset):
    """Random HR patches, h/v-flip and transpose at p = 0.5 [P §5]; crops_per_item = k > 1 gives (k, 3, P, P) crops of
    one image. Decoded once (threads) into uint8 memory; item i depends on (seed, i) only, not on the workers."""
    def __init__(self, dirs, patch_size: int, crops_per_item: int = 1):
        self.files = list_images(dirs)
        with ThreadPoolExecutor(8) as pool:                                         # Pillow releases the GIL
            self.images = list(pool.map(load_uint8, self.files))
        for path, img in zip(self.files, self.images):
            if min(img.shape[:2]) < patch_size:
                raise UserError(f"{path} is {img.shape[0]}x{img.shape[1]}, smaller than the {patch_size}x"
                                f"{patch_size} HR training patch: remove it or lower the patch size")
        self.patch_size, self.crops_per_item, self.seed = patch_size, crops_per_item, 0
    def __len__(self) -> int:
        return len(self.images)
    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, index))
        img = self.images[rng.integers(len(self.images))]
        crops = []
        for _ in range(self.crops_per_item):
            top = rng.integers(img.shape[0] - self.patch_size + 1)
            left = rng.integers(img.shape[1] - self.patch_size + 1)
            patch = img[top:top + self.patch_size, left:left + self.patch_size]
            hflip, vflip, transpose = rng.random(3) < 0.5
            patch = patch[::-1 if vflip else 1, ::-1 if hflip else 1]
            patch = patch.transpose(1, 0, 2) if transpose else patch
            crops.append(torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1))
        out = torch.stack(crops) if self.crops_per_item > 1 else crops[0]
        return out.float().div(255)

def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C is for the main process (it stops after the step); workers must not die mid-batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def infinite_batches(dataset, batch_size: int, device, seed: int = 0, start_step: int = 0, workers: int = 2, dist=None):
    """Endless batches on `device`; `start_step=k` gives exactly the batches an uninterrupted run sees at k."""
    dataset.seed = seed
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    # step k on rank r draws items (k·world + r)·B … (k·world + r)·B + B − 1: disjoint across ranks and steps
    items = itertools.chain.from_iterable(range((k * world + rank) * batch_size, (k * world + rank + 1) * batch_size)
                                          for k in itertools.count(start_step))
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=items, num_workers=workers,  # own generator:
                                         generator=torch.Generator().manual_seed(seed),  # global RNG untouched
                                         worker_init_fn=_ignore_sigint,
                                         pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)
    for batch in loader:
        yield batch.to(device, non_blocking=True)

# ---- Classic degradation [P §1] ---------------------------------------------------------------------------
def anisotropic_kernels(lambda1, lambda2, theta, size: int = 21) -> torch.Tensor:
    """(B, size, size) kernels k(p) ∝ exp(-½ pᵀ Σ⁻¹ p), Σ = R(θ) diag(λ1², λ2²) R(θ)ᵀ, p = (column, row) [P §1.1]."""
    l1, l2, th = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64).reshape(-1)
                                           for v in (lambda1, lambda2, theta)))
    r = torch.arange(size, dtype=torch.float64, device=l1.device) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")                                  # y = row, x = column offset
    cos, sin = th.cos()[:, None, None], th.sin()[:, None, None]
    u, v = cos * x + sin * y, -sin * x + cos * y                                # Rᵀ p: coordinates on the axes
    k = torch.exp(-0.5 * (u**2 / l1[:, None, None] ** 2 + v**2 / l2[:, None, None] ** 2))
    return (k / k.sum(dim=(-2, -1), keepdim=True)).float()

def isotropic_kernels(sigma, size: int = 21) -> torch.Tensor:
    """(B, size, size) kernels k ∝ exp(-(x² + y²) / 2σ²) [P §1.1]."""
    return anisotropic_kernels(sigma, sigma, 0.0 * torch.as_tensor(sigma), size)
def blur(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample correlation: (B, C, H, W) with (B, k, k) or (k, k), reflect padding, one grouped conv [P §1.2]."""
    b, c, h, w = img.shape
    kernels = kernels.to(img).expand(b, *kernels.shape[-2:])                      # (k, k) or (1, k, k) -> (B, k, k)
    pad = kernels.shape[-1] // 2
    x = F.pad(img.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")   # (1, B·C, H+2p, W+2p)
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)                       # (B·C, 1, k, k)
    return F.conv2d(x, weight, groups=b * c).reshape(b, c, h, w)

def _cubic(t: np.ndarray) -> np.ndarray:
    """MATLAB's cubic kernel, a = -0.5 [P §1.3]."""
    a = np.abs(t)
    return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))

@functools.lru_cache(maxsize=128)
def _resize_matrix(n_in: int, scale: float, device: str) -> torch.Tensor:
    """Dense (n_out, n_in) matrix of MATLAB imresize along one axis, symmetric mirroring folded in."""
    n_out = math.ceil(n_in * scale - 1e-9)
    u = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)                # 1-based input coordinate
    support = 4 / scale if scale < 1 else 4.0                                  # antialiased when shrinking
    idx = np.floor(u - support / 2)[:, None] + np.arange(math.ceil(support) + 2)[None]
    weights = scale * _cubic(scale * (u[:, None] - idx)) if scale < 1 else _cubic(u[:, None] - idx)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])          # MATLAB 'symmetric'
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.repeat(np.arange(n_out), idx.shape[1]), cols.ravel()), weights.ravel())
    return torch.from_numpy(matrix).float().to(device)

def imresize(img: torch.Tensor, scale: float) -> torch.Tensor:
    """MATLAB-semantics bicubic resize of (..., H, W) by `scale` (e.g. 1/4 or 4): two matrix products."""
    rows = _resize_matrix(img.shape[-2], float(scale), str(img.device)).to(img.dtype)
    cols = _resize_matrix(img.shape[-1], float(scale), str(img.device)).to(img.dtype)
    return rows @ img @ cols.T

def add_noise(img: torch.Tensor, sigma255, generator=None) -> torch.Tensor:
    """img + σn/255 · ε, ε ~ N(0, 1) per pixel and channel; σn per sample on the 0–255 scale [P §1.4]."""
    sigma = torch.as_tensor(sigma255, dtype=img.dtype, device=img.device).reshape(-1, 1, 1, 1)
    # seeded evaluation noise is drawn on the CPU, then moved [P §1.5]
    eps = torch.randn_like(img) if generator is None else torch.randn(img.shape, generator=generator).to(img)
    return img + sigma / 255 * eps

def quantize(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits (half to even)."""
    return img.mul(255).round().clamp(0, 255).div(255)
def degrade(img_hr: torch.Tensor, kernels, scale: int, noise=None, generator=None) -> torch.Tensor:
    """y = Q(imresize(x ⊗ k, 1/s) + n): blur -> bicubic ↓s -> noise on 0–255 -> 8-bit [P §1]."""
    x = blur(img_hr, kernels) if kernels is not None else img_hr
    x = imresize(x, 1 / scale)
    return quantize(x if noise is None else add_noise(x, noise, generator))

# ---- Benchmark protocols [P §2–3] -------------------------------------------------------------------------
GAUSSIAN8 = {2: (0.8, 1.6), 3: (1.35, 2.4), 4: (1.8, 3.2)}
ANISO_KERNELS = ((2.0, 0.2, 0), (2.0, 1.0, 10), (3.5, 1.5, 30), (3.5, 2.0, 45), (3.5, 2.0, 90),
                 (4.0, 1.5, 120), (4.0, 2.0, 135), (4.0, 3.0, 165), (4.0, 4.0, 180))  # (λ1, λ2, θ°) [P §3.3]

def test_degradations(protocol: str, scale: int) -> list[tuple[str, dict]]:
    """(label, params) per test degradation; params = {"id", "kernel" (21x21 tensor or None), "noise"}."""
    if protocol == "gaussian8":
        if scale not in GAUSSIAN8:
            raise UserError(f"gaussian8 is defined for scales 2, 3, 4, not {scale}")
        return [(f"sigma={s:.2f}", {"id": f"g{s:.4f}", "kernel": isotropic_kernels(float(s))[0], "noise": 0})
                for s in np.linspace(*GAUSSIAN8[scale], 8)]
    if protocol == "aniso_noise":
        return [(f"k{i}/n{n}", {"id": i, "noise": n, "kernel": anisotropic_kernels(l1, l2, math.radians(t))[0]})
                for n in (0, 10, 20) for i, (l1, l2, t) in enumerate(ANISO_KERNELS, start=1)]
    if protocol == "bicubic":
        return [("bicubic", {"id": "bicubic", "kernel": None, "noise": 0})]
    raise UserError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")

def find_benchmark(data, root="datasets") -> tuple[str, list[Path]]:
    """(set name, HR files) for a benchmark name under `root` (<root>/<Set>/HR/*.png) or a folder path."""
    path = Path(data)
    if path.is_dir():
        return path.name, list_images(path / "HR" if (path / "HR").is_dir() else path)
    folder = Path(root) / str(data) / "HR"
    if folder.is_dir():
        return str(data), list_images(folder)
    known = [n for n in BENCHMARKS if (Path(root) / n / "HR").is_dir()]
    raise UserError(f"benchmark '{data}' not found: expected {folder}/*.png (layout <data-root>/<Set>/HR/*.png, "
                    f"names {', '.join(BENCHMARKS)}; under {root}: {', '.join(known) or 'none'}) or a folder path")

def eval_seed(key: str) -> int:
    """Seed = first 8 bytes of SHA-256(key), little-endian, mod 2⁶³ [P §1.5]."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % (1 << 63)
def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop bottom/right so that H and W are multiples of the scale [P §2]."""
    return img[: img.shape[0] - img.shape[0] % scale, : img.shape[1] - img.shape[1] % scale]
def benchmark_lr(img_hr: np.ndarray, params: dict, scale: int, key: str, device="cpu") -> torch.Tensor:
    """Deterministic (1, 3, h, w) test LR of a modcropped uint8 HR, key "{set}/{stem}"; made on CPU: any device."""
    hr = torch.from_numpy(np.ascontiguousarray(img_hr)).permute(2, 0, 1)[None].float().div(255)
    seed = eval_seed(f"{key}/{params['id']}/{params['noise']}")
    generator = torch.Generator().manual_seed(seed) if params["noise"] else None
    return degrade(hr, params["kernel"], scale, params["noise"] or None, generator).to(device)

def run_benchmark(sr_fn, data, protocol: str, scale: int, root="datasets", device="cpu", save_dir=None,
                  limit=None) -> list[dict]:
    """Score `sr_fn(img_lr) -> img_sr` on every (image, degradation) pair; one row each [P §3.1]."""
    set_name, files = find_benchmark(data, root)
    degradations = test_degradations(protocol, scale)
    rows, start = [], time.perf_counter()
    for n, path in enumerate(files[:limit], start=1):
        img_hr = modcrop(load_uint8(path), scale)
        for label, params in degradations:
            img_lr = benchmark_lr(img_hr, params, scale, f"{set_name}/{path.stem}", device)
            with torch.no_grad():
                img_sr = to_uint8(sr_fn(img_lr))
            if img_sr.shape != img_hr.shape:
                raise UserError(f"model output {img_sr.shape[:2]} != HR {img_hr.shape[:2]} for {path.name}: "
                                f"does --scale {scale} match the model?")
            rows.append({"set": set_name, "image": path.stem, "degradation": label,
                         "psnr": psnr_y(img_sr, img_hr, scale), "ssim": ssim_y(img_sr, img_hr, scale)})
            if save_dir is not None:
                save_image(img_sr, Path(save_dir) / set_name / label.replace("/", "_") / f"{path.stem}.png")
        print(f"  {set_name} {n}/{len(files[:limit])} {path.name} ({time.perf_counter() - start:.1f}s)", flush=True)
    return rows

def summarize(rows: list[dict]) -> list[dict]:
    """Per (set, degradation) means, then one 'mean' row per set over all pairs (per-image averages)."""
    groups: dict = {}
    for row in rows:
        for key in ((row["set"], row["degradation"]), (row["set"], "mean")):
            groups.setdefault(key, []).append(row)
    order = sorted(groups, key=lambda key: key[1] == "mean")                    # stable: mean rows last
    metrics = [k for k in METRICS if k in rows[0]]                            # psnr, ssim (+ RGB, if measured)
    return [{"set": s, "degradation": d, **{m: float(np.mean([r[m] for r in groups[s, d]])) for m in metrics},
             "n": len(groups[s, d])} for s, d in order]

def bicubic_sr(scale: int):
    """The reference 'method': MATLAB bicubic upsampling of the LR input."""
    return lambda img_lr: imresize(img_lr, scale)

def tiled(sr_fn, scale: int, tile: int, overlap: int = 16):
    """Run `sr_fn` on LR tiles of `tile` px (+ `overlap` context each side, cropped away) to bound memory. Equal
    to the whole-image output when the overlap covers the network's receptive field and nothing pools globally."""
    if tile <= 0:
        return sr_fn

    def run(img_lr: torch.Tensor) -> torch.Tensor:
        h, w = img_lr.shape[-2:]
        out = img_lr.new_zeros(*img_lr.shape[:-2], h * scale, w * scale)
        for top, left in itertools.product(range(0, h, tile), range(0, w, tile)):
            t0, l0 = max(top - overlap, 0), max(left - overlap, 0)                   # tile plus its context
            img_sr = sr_fn(img_lr[..., t0:min(top + tile + overlap, h), l0:min(left + tile + overlap, w)])
            rows, cols = min(tile, h - top) * scale, min(tile, w - left) * scale
            out[..., top * scale:top * scale + rows, left * scale:left * scale + cols] = \
                img_sr[..., (top - t0) * scale:, (left - l0) * scale:][..., :rows, :cols]
        return out
    return run

def report(rows: list[dict], title: str, out_dir=None) -> None:
    """Print summary rows as a table; with `out_dir` append them (method column = title) to results.csv/.md."""
    metrics = [k for k in METRICS if k in rows[0]]
    print(f"\n{title}\n{'set':<10} {'degradation':<14}" + "".join(f" {METRICS[m]:>8}" for m in metrics) + "    n")
    for r in rows:
        print(f"{r['set']:<10} {r['degradation']:<14}" + "".join(f" {r[m]:8.4f}" for m in metrics) + f" {r['n']:>4}")
    if out_dir is None:
        return
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    new = not (out / "results.csv").exists()
    with open(out / "results.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, ["method", "set", "degradation", *METRICS, "n"], extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows({"method": title, **r} for r in rows)
    with open(out / "results.md", "a") as f:
        f.write(f"\n### {title}\n\n| set | degradation | {' | '.join(METRICS[m] for m in metrics)} | n |\n"
                f"|---|---|{'---|' * len(metrics)}---|\n")
        f.writelines(f"| {r['set']} | {r['degradation']} | {' | '.join(f'{r[m]:.4f}' for m in metrics)} | {r['n']} |\n"
                     for r in rows)

# ---- Metrics [P §4] ---------------------------------------------------------------------------------------
def _y_pair(sr: np.ndarray, hr: np.ndarray, shave: int, rgb: bool = False):
    """Y = 16 + 65.481 R + 128.553 G + 24.966 B of both images (RGB in [0, 1], float64, unrounded), shaved;
    rgb=True: the (H, W, 3) RGB planes on 0-255 instead (the NTIRE convention some papers report)."""
    if sr.shape != hr.shape:
        raise UserError(f"images differ in shape: SR {sr.shape} vs HR {hr.shape}")
    to_y = lambda img: 16.0 + img / 255.0 @ np.array([65.481, 128.553, 24.966])        # noqa: E731
    ys = [img.astype(np.float64) if rgb else to_y(img.astype(np.float64)) for img in (sr, hr)]
    return tuple(y[shave:-shave, shave:-shave] if shave > 0 else y for y in ys)

def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int = 0, rgb: bool = False) -> float:
    """PSNR = 10 log10(255² / MSE) on Y (rgb: over R, G, B) after shaving `shave` border pixels; inf if identical."""
    y_sr, y_hr = _y_pair(sr, hr, shave, rgb)
    mse = np.mean((y_sr - y_hr) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)

def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int = 0, rgb: bool = False) -> float:
    """SSIM (Wang et al. 2004) on Y (rgb: over R, G, B, as BasicSR): 11x11 Gaussian σ = 1.5, valid, map mean."""
    a, b = _y_pair(sr, hr, shave, rgb)
    taps = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = (np.outer(taps, taps) / taps.sum() ** 2).reshape(11, 11, *[1] * (a.ndim - 2))  # per channel if RGB
    local_mean = functools.partial(scipy.signal.fftconvolve, in2=window, mode="valid")  # no padding: map 10 px smaller
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a**2, local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())

# ---- Run utilities ----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def pick_device(name: str = "auto") -> torch.device:
    """auto|cpu|cuda; auto -> CUDA when present; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    torch.cuda.set_device(device := torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    return device

def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context otherwise."""
    on = enabled and torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled = property(lambda self: self.world_size > 1)
    is_main = property(lambda self: self.rank == 0)

def ddp_setup(device=None) -> Dist:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); a no-op for a single process."""
    if (world := int(os.environ.get("WORLD_SIZE", "1"))) <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

def ddp_teardown(dist: Dist) -> None:
    """Call from `finally`. After a normal finish the ranks leave together (one tearing down while another is still
    talking aborts it); with an exception in flight this rank leaves at once, so torchrun sees it fail (no hang)."""
    if dist.enabled and torch.distributed.is_initialized():
        if sys.exc_info()[0] is None:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def wrap_ddp(model: torch.nn.Module, dist: Dist, find_unused: bool = False) -> torch.nn.Module:
    """DistributedDataParallel when running under torchrun; the model itself otherwise."""
    if not dist.enabled:
        return model
    ids = [dist.local_rank] if next(model.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
def all_reduce_mean(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean of `tensor` over ranks (the tensor itself for a single process)."""
    if dist.enabled:
        torch.distributed.all_reduce(tensor := tensor.detach().clone())             # sum over ranks
        tensor = tensor / dist.world_size
    return tensor

def rng_state(dist: Dist | None = None) -> dict:
    """torch (and CUDA) RNG states, all the scripts draw from; under DDP every rank's (collective: call on all)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if dist is None or not dist.enabled:
        return state
    torch.distributed.all_gather_object(ranks := [None] * dist.world_size, state)
    return {**ranks[0], "ranks": ranks}

def set_rng_state(state: dict, dist: Dist | None = None) -> None:
    """Restore this rank's state; resumed with another number of ranks, they are re-seeded apart instead."""
    ranks, dist = state.get("ranks", [state]), dist or Dist()
    mine = ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0]
    torch.set_rng_state(mine["torch"].cpu())
    if mine["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in mine["cuda"]])
    if len(ranks) != dist.world_size:                       # exact continuation is impossible; stay distinct
        torch.manual_seed(int(torch.randint(2**62, ())) + dist.rank)

def save_checkpoint(path, payload: dict) -> None:
    """Atomic write: a crash mid-write leaves the previous file intact (temp file + fsync + rename)."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp := path.with_name(f".{path.name}.tmp{os.getpid()}"), "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def load_checkpoint(path, script: str, stages=None, device="cpu") -> dict:
    """Load one of our checkpoints; a clear UserError for a missing file, foreign file, script or stage."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - anything torch cannot unpickle safely is not one of our checkpoints
        ckpt = None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of these scripts (official weights: --official-weights)") from None
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    if stages is not None and ckpt.get("stage") not in stages:
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint; expected stage {' or '.join(stages)}")
    return ckpt

def resumed(path, script: str, stages, steps: int | None) -> dict:
    """The checkpoint --resume continues, its config's steps replaced by --steps; a UserError if none are left."""
    ckpt = load_checkpoint(path, script, stages)
    ckpt["config"]["steps"] = total = steps or ckpt["config"]["steps"]
    if ckpt["step"] >= total:
        raise UserError(f"{path} is already at step {ckpt['step']} of {total}: give --steps N > {ckpt['step']}")
    return ckpt

@contextlib.contextmanager
def stop_on_signals():
    """`with stop_on_signals() as flag:` SIGINT/SIGTERM only set flag["signal"], so the loop can finish its step,
    write last.pt and leave; a second SIGINT raises KeyboardInterrupt. The previous handlers return on exit."""
    flag, previous = {"signal": 0}, {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    def handle(signum, frame):
        if flag["signal"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def stop_requested(flag: dict, dist: Dist, device) -> bool:
    """True on every rank once any rank was signalled (under DDP all ranks must stop at the same step)."""
    if not dist.enabled:
        return flag["signal"] != 0
    return all_reduce_mean(torch.tensor(float(flag["signal"]), device=device), dist).item() > 0

def check_finite(loss: torch.Tensor, step: int, last_good) -> None:
    """Stop on a NaN/inf loss before it reaches a checkpoint; pass the loss averaged over ranks under DDP."""
    if not torch.isfinite(loss).all():
        raise UserError(f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint is {last_good} "
                        f"(lower the learning rate or disable --amp, then --resume)")

class RunLog:
    """One fixed-format progress line per call, and the same record appended to <out_dir>/log.jsonl."""
    def __init__(self, out_dir, total_steps: int, enabled: bool = True, start_step: int = 0):
        self.path, self.total, self.enabled = Path(out_dir) / "log.jsonl", total_steps, enabled
        self.last_step, self.last_time = start_step, time.perf_counter()
    def log(self, step: int, stage: str, **scalars) -> None:
        now = time.perf_counter()
        ms_per_it = 1000 * (now - self.last_time) / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, now
        if not self.enabled:
            return
        eta = int(ms_per_it * (self.total - step) / 1000)
        values = " | ".join(f"{k} {v:.2e}" if "lr" in k else f"{k} {v:.4f}" for k, v in scalars.items())
        print(f"[{stage}] step {step}/{self.total} | {values} | {ms_per_it:.1f} ms/it | "
              f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **scalars, "ms_per_it": ms_per_it}) + "\n")

def at_least(low, kind=int):
    """argparse type of a numeric flag >= low: `--steps 0` is one usage line, never a traceback later on."""
    def parse(text: str):
        if not (value := kind(text)) >= low:                                   # `not >=` also rejects nan
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__                                             # argparse: "invalid int value: 'x'"
    return parse

def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags every `train`/`eval` shares."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=None, help="default: the Config seed")
    parser.add_argument("--out-dir", default=None, help="default: runs/<script>/<stage>")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False, help="(CUDA)")
    parser.add_argument("--log-every", type=at_least(1), default=100)
    parser.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1), help="data-loader workers")

def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags of every evaluation command."""
    parser.add_argument("--data", nargs="+", default=["Set5"], help="benchmark names or HR folders")
    parser.add_argument("--data-root", default="datasets", help="holds <Set>/HR/*.png")
    parser.add_argument("--protocol", default="gaussian8", choices=PROTOCOLS)
    parser.add_argument("--scale", type=at_least(2), default=4)
    parser.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--limit", type=at_least(1), default=None, help="only the first N images of each set")

def main(argv=None) -> None:
    """`baseline`: the bicubic-upsampling reference row of every method table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    baseline = sub.add_parser("baseline", help="evaluate bicubic upsampling under a protocol")
    add_eval_args(baseline)
    baseline.add_argument("--out-dir", default=None, help="also write results.csv/results.md here")
    args = parser.parse_args(argv)
    try:
        for data in args.data:
            rows = summarize(run_benchmark(bicubic_sr(args.scale), data, args.protocol, args.scale,
                                           args.data_root, limit=args.limit))
            report(rows, f"Bicubic x{args.scale} {args.protocol}", args.out_dir)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
