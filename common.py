"""What a benchmark convention fixes and no paper defines, shared by the blind-SR scripts: image IO, datasets,
classic degradation, benchmark protocols with per-image seeds, Y-channel PSNR/SSIM (MATLAB/BasicSR) and run
utilities. [P §n] cites the shared evaluation protocol (see README.md). Bicubic reference rows of every table:
`python common.py baseline --data Set5 Set14 --protocol gaussian8 --scale 4 --data-root datasets`."""
from __future__ import annotations

import argparse, contextlib, csv, dataclasses, functools, hashlib, itertools, json, math, os, random, signal, sys, time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
PROTOCOLS = ("gaussian8", "aniso_noise", "bicubic")
HR_FOLDERS = ("HR", "GTmod12", "GT")  # the HR images of a benchmark set: ours, then BasicSR's names
METRICS = {"psnr": "PSNR (Y)", "ssim": "SSIM (Y)", "psnr_rgb": "PSNR RGB", "ssim_rgb": "SSIM RGB",  # row key: title
           "lpips": "LPIPS"}

class UserError(Exception):
    """Bad input: every CLI prints it as one line `error: <message>` on stderr and exits with status 1 (cli_errors);
    argparse's usage errors (e.g. `--steps 0`) exit with status 2."""

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

def list_images(dirs, recursive: bool = True) -> list[Path]:
    """All image files below one or more folders (sorted per folder); hidden files and folders (.ipynb_checkpoints,
    ._name) are never images."""
    files = []
    for folder in [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]:
        if not folder.is_dir():
            raise UserError(f"image folder not found: {folder} (expected a folder of {'/'.join(IMAGE_SUFFIXES)} files)")
        found = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not found:
            raise UserError(f"no images in {folder} (looked recursively for {'/'.join(IMAGE_SUFFIXES)} files)")
        files += found
    return files

# ---- Training data ----------------------------------------------------------------------------------------
class HRPatches(torch.utils.data.Dataset):
    """Random HR patches, h/v-flip and transpose at p = 0.5 [P §5] (`augment` names the ones used: "h" alone as
    Real-ESRGAN loaders do, "" none); `pad_small`: an image smaller than the patch is reflect-padded bottom/right (cv2
    REFLECT_101) instead of refused. crops_per_item = k > 1 gives (k, 3, P, P) crops of one image. Decoded once
    (threads) into uint8 memory; item i depends on (seed, i) only, not on the workers or the number of processes."""
    def __init__(self, dirs, patch_size: int, crops_per_item: int = 1, augment: str = "hvt", pad_small=False):
        self.files = list_images(dirs)
        with ThreadPoolExecutor(8) as pool:                                         # Pillow releases the GIL
            self.images = list(pool.map(load_uint8, self.files))
        for path, img in zip(self.files, self.images):
            if min(img.shape[:2]) < (need := patch_size // 2 + 1 if pad_small else patch_size):  # reflect: > half
                raise UserError(f"{path} is {img.shape[1]}x{img.shape[0]}, smaller than the {patch_size}x{patch_size} "
                                f"HR training patch{f' can be padded from ({need} px a side)' if pad_small else ''}: "
                                f"remove it or lower the patch size")
        self.patch_size, self.crops_per_item, self.seed = patch_size, crops_per_item, 0
        self.augment, self.pad_small = augment, pad_small
    def __len__(self) -> int:
        return len(self.images)
    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, index))
        img, size = self.images[rng.integers(len(self.images))], self.patch_size
        if self.pad_small and min(img.shape[:2]) < size:
            pad = ((0, max(size - img.shape[0], 0)), (0, max(size - img.shape[1], 0)), (0, 0))
            img = np.pad(img, pad, mode="reflect")                                  # numpy reflect = REFLECT_101
        crops = []
        for _ in range(self.crops_per_item):
            top, left = rng.integers(img.shape[0] - size + 1), rng.integers(img.shape[1] - size + 1)
            patch = img[top:top + size, left:left + size]
            hflip, vflip, transpose = (rng.random(3) < 0.5) & [c in self.augment for c in "hvt"]
            patch = patch[::-1 if vflip else 1, ::-1 if hflip else 1]
            patch = patch.transpose(1, 0, 2) if transpose else patch
            crops.append(torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1))
        out = torch.stack(crops) if self.crops_per_item > 1 else crops[0]
        return out.float().div(255)

def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C is for the main process (it stops after the step); workers must not die mid-batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def infinite_batches(dataset, batch_size: int, device, seed: int = 0, start_step: int = 0, workers: int = 2, dist=None):
    """Endless batches on `device`: this rank's share of the global batch `batch_size`; `start_step=k` gives exactly
    the batches an uninterrupted run sees at k, with any number of processes."""
    dataset.seed, part = seed, share(batch_size, dist or Dist())
    # step k is items k·B … k·B + B − 1 of the global batch B; rank r loads its share of them
    items = itertools.chain.from_iterable(range(k * batch_size + part.start, k * batch_size + part.stop)
                                          for k in itertools.count(start_step))
    loader = torch.utils.data.DataLoader(dataset, part.stop - part.start, sampler=items, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed),  # global RNG untouched
                                         worker_init_fn=_ignore_sigint,
                                         pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0)
    for batch in loader:
        yield batch.to(device, non_blocking=True)

# ---- Classic degradation [P §1] ---------------------------------------------------------------------------
def _grid(pad_to: int, size, *values):
    """x (column), y (row) offsets of a pad_to² grid, the mask of each centred size² core, values as (B, 1, 1)."""
    device = next((v.device for v in (size, *values) if torch.is_tensor(v)), None)
    size, *values = (torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1, 1, 1) for v in (size, *values))
    x = torch.arange(pad_to, dtype=torch.float64, device=device) - pad_to // 2    # (pad_to,); y = x[:, None]
    return x, x[:, None], (x.abs() <= (size - 1) / 2) & (x[:, None].abs() <= (size - 1) / 2), *values
def family_kernels(kind, size, sigma_x, sigma_y, theta, beta, pad_to: int = 21) -> torch.Tensor:
    """[BasicSR] Gaussian family (B, pad_to, pad_to) float32: kind 0 Gaussian, 1 generalized, 2 plateau; size² core."""
    x, y, mask, kind, sx, sy, th, beta = _grid(pad_to, size, kind, sigma_x, sigma_y, theta, beta)
    # Q = pᵀΣ⁻¹p = u²/σx² + v²/σy²; Gaussian exp(−Q/2), generalized exp(−½ Q^β), plateau 1 / (1 + Q^β)
    u, v = th.cos() * x + th.sin() * y, -th.sin() * x + th.cos() * y            # R(θ)ᵀp, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ
    q_beta = ((u / sx) ** 2 + (v / sy) ** 2) ** torch.where(kind == 0, torch.ones_like(beta), beta)  # Gaussian: β = 1
    k = torch.where(kind == 2, 1 / (1 + q_beta), torch.exp(-0.5 * q_beta)) * mask  # β on Q, not √Q [official code]
    return (k / k.sum((-2, -1), keepdim=True)).float()                            # Σ = 1 over the core
def anisotropic_kernels(lambda1, lambda2, theta, size: int = 21) -> torch.Tensor:
    """(B, size, size) kernels k(p) ∝ exp(-½ pᵀ Σ⁻¹ p), Σ = R(θ) diag(λ1², λ2²) R(θ)ᵀ, p = (column, row) [P §1.1]."""
    return family_kernels(0, size, lambda1, lambda2, theta, 1.0, pad_to=size)

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
    """img + σn/255 · ε, ε ~ N(0, 1) per pixel and channel; σn per sample on the 0–255 scale [P §1.4]. ε from a
    StepRandom in training (this rank's share of the step's draw), a CPU generator in evaluation, else global."""
    sigma = torch.as_tensor(sigma255, dtype=img.dtype, device=img.device).reshape(-1, 1, 1, 1)
    if isinstance(generator, StepRandom):
        eps = generator.randn(*img.shape[1:]).to(img.dtype)
    else:  # seeded evaluation noise is drawn on the CPU, then moved [P §1.5]
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

# ---- Real-world training degradation: Real-ESRGAN's second order [Real-ESRGAN x4plus, BasicSR] ----------------
MIN_REALESRGAN_GT = 74  # smallest GT side: after a x0.15 resize the 21-tap blur's reflect padding needs > 10 px
JPEG_LUMA = ((16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
             (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
             (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99))  # JPEG Annex K, row-major
JPEG_CHROMA_CORNER = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))  # rest of T_C: 99
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))  # JFIF, then + 128
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))   # of (Y, Cb − 128, Cr − 128)

@dataclasses.dataclass
class RealESRGANOptions:
    """Real-ESRGAN x4plus degradation settings [Real-ESRGAN]; pairs are (stage 1, stage 2)."""
    kernel_sizes: tuple = (7, 9, 11, 13, 15, 17, 19, 21)  # uniform; both stages and the final sinc [official code]
    sinc_prob: tuple = (0.1, 0.1)
    family_probs: tuple = ((0.45, 0.25, 0.12, 0.03, 0.12, 0.03),) * 2  # iso, aniso, gen. iso/aniso, plateau iso/aniso
    sigma_range: tuple = ((0.2, 3.0), (0.2, 1.5))
    beta_range: tuple = (((0.5, 4.0), (1.0, 2.0)),) * 2  # (generalized β_g, plateau β_p) per stage
    final_sinc_prob: float = 0.8
    resize_prob: tuple = ((0.2, 0.7, 0.1), (0.3, 0.4, 0.3))  # up, down, keep
    resize_range: tuple = ((0.15, 1.5), (0.3, 1.2))
    gaussian_noise_prob: tuple = (0.5, 0.5)  # else Poisson
    noise_range: tuple = ((1.0, 30.0), (1.0, 25.0))  # Gaussian σ on the 0–255 scale
    poisson_scale_range: tuple = ((0.05, 3.0), (0.05, 2.5))
    gray_noise_prob: tuple = (0.4, 0.4)
    jpeg_range: tuple = ((30.0, 95.0), (30.0, 95.0))
    second_blur_prob: float = 0.8

def sinc_kernels(cutoff, size, pad_to: int = 21) -> torch.Tensor:
    """[BasicSR] circular low-pass (B, pad_to, pad_to) float32 on each sample's size² core, sum 1."""
    x, y, mask, wc = _grid(pad_to, size, cutoff)
    r = torch.hypot(x, y)                                   # K = ω_c J1(ω_c r) / (2π r), K(0) = ω_c²/(4π)
    k = torch.where(r == 0, wc**2 / (4 * math.pi), wc * torch.special.bessel_j1(wc * r) / (2 * math.pi * r)) * mask
    return (k / k.sum((-2, -1), keepdim=True)).float()
def _uniform(lo, hi, shape, device) -> torch.Tensor:
    """float64 U[lo, hi) draws; all randomness here is torch's global RNG on `device` [ours: one stream]."""
    return lo + (hi - lo) * torch.rand(shape, dtype=torch.float64, device=device)
def random_kernels(batch: int, stage: int, opts: RealESRGANOptions, device) -> torch.Tensor:
    """[BasicSR] stage-1/2 blur kernels (B, 21, 21): sinc with p sinc_prob, else a random Gaussian-family kernel."""
    s, sizes = stage - 1, torch.tensor(opts.kernel_sizes, device=device)
    size = sizes[torch.randint(len(sizes), (batch,), device=device)]
    low = math.pi / 5 + (size < 13).double() * (math.pi / 3 - math.pi / 5)      # ω_c ~ U[π/3 (k < 13) or π/5, π]
    cutoff = low + (math.pi - low) * torch.rand(batch, dtype=torch.float64, device=device)
    cdf = torch.tensor(opts.family_probs[s], dtype=torch.float64, device=device).cumsum(0)
    family = torch.searchsorted(cdf, _uniform(0, cdf[-1], batch, device), right=True).clamp(max=5)
    aniso, plateau = family % 2 == 1, (family >= 4).double()  # f: iso, aniso, gen. ×2, plateau ×2
    sigma_x, sigma_y = _uniform(*opts.sigma_range[s], (2, batch), device)
    theta = _uniform(-math.pi, math.pi, batch, device) * aniso                    # isotropic: θ = 0, σy = σx
    # β: p 0.5 U[β_lo, 1] else U[1, β_hi]; generalized β_g ∈ [0.5, 4], plateau β_p ∈ [1, 2] (p 0.5: β = 1)
    lo, hi = (g + plateau * (p - g) for g, p in zip(*opts.beta_range[s]))
    coin, u = torch.rand(2, batch, dtype=torch.float64, device=device)
    beta = torch.where(coin < 0.5, lo + (1 - lo) * u, 1 + (hi - 1) * u)
    kernels = family_kernels(family // 2, size, sigma_x, torch.where(aniso, sigma_y, sigma_x), theta, beta)
    return torch.where((torch.rand(batch, device=device) < opts.sinc_prob[s])[:, None, None],
                       sinc_kernels(cutoff, size), kernels)
def random_sinc(batch: int, opts: RealESRGANOptions, device) -> torch.Tensor:
    """[BasicSR] final sinc (B, 21, 21): p final_sinc_prob k ∈ {7…21}, ω_c ~ U[π/3, π]; else a 21×21 delta."""
    sizes, use = torch.tensor(opts.kernel_sizes, device=device), torch.rand(batch, device=device) < opts.final_sinc_prob
    size = torch.where(use, sizes[torch.randint(len(sizes), (batch,), device=device)], 1)  # 1×1 core = delta [ours]
    return sinc_kernels(_uniform(math.pi / 3, math.pi, batch, device), size)

def _column(value, img: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) value as a (B, 1, 1, 1) tensor of the image's dtype and device."""
    return torch.as_tensor(value, device=img.device).to(img.dtype).reshape(-1, 1, 1, 1)
def add_gaussian_noise(img: torch.Tensor, sigma255, gray) -> torch.Tensor:
    """[BasicSR] img + σ/255·n per sample, n colour (per channel) or gray (one field for the 3 channels); unclipped."""
    gray_field = torch.randn(img.shape[-2:], dtype=img.dtype, device=img.device)  # one for the batch [official code]
    return img + _column(sigma255, img) * torch.where(_column(gray, img) > 0, gray_field, torch.randn_like(img)) / 255
def poisson_levels(x8: torch.Tensor) -> torch.Tensor:
    """(B,) v = 2^ceil(log2(number of distinct 8-bit levels)) of each sample of an image on the 1/255 grid."""
    levels = (x8 * 255).round().long().flatten(1)                       # (B, C·H·W) in 0…255, counted by a histogram
    count = (levels.new_zeros(len(levels), 256).scatter_add_(1, levels, torch.ones_like(levels)) > 0).sum(1)
    return 2 ** torch.ceil(torch.log2(count.double()))
def add_poisson_noise(img: torch.Tensor, scale, gray) -> torch.Tensor:
    """[BasicSR] img + scale·(Poisson(x₈·v)/v − x₈), colour or gray (luma, expanded to 3 channels); unclipped."""
    # luma = 0.2989 R + 0.587 G + 0.114 B (torchvision rgb_to_grayscale) [official code]
    luma, noise = 0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3], []
    for x in (luma, img):                                                         # each with its own v
        x8 = quantize(x)                                                          # clamp(round(255x), 0, 255)/255
        v = poisson_levels(x8).to(img.dtype).reshape(-1, 1, 1, 1)
        noise.append(torch.poisson(x8 * v) / v - x8)
    return img + _column(scale, img) * torch.where(_column(gray, img) > 0, noise[0], noise[1])  # to unrounded img
def jpeg_factor(quality) -> torch.Tensor:
    """[BasicSR DiffJPEG] table scale 50/q if q < 50 else 2 − q/50 (float q; tables neither rounded nor clipped)."""
    return torch.where((q := torch.as_tensor(quality)) < 50, 50 / q, 2 - q / 50)
def _jpeg_blocks(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[BasicSR DiffJPEG] steps 5–6 on every 8×8 block of (B, C, H, W) levels: DCT, round(F / T)·T, inverse DCT."""
    n = torch.arange(8, dtype=torch.float64, device=x.device)
    cos = torch.cos((2 * n + 1) * n[:, None] * math.pi / 16).to(x)                # C[u, x] = cos((2x + 1)uπ/16)
    # S = ¼ α(u)α(v), α(0) = 1/√2, else 1; S[0, 0] = ⅛ exactly, so .5 ties of the DC round as the reference's
    s = (0.25 / ((1 + (n[:, None] == 0).double()) * (1 + (n == 0).double())).sqrt()).to(x)
    blocks = x.unflatten(3, (-1, 8)).unflatten(2, (-1, 8)).transpose(3, 4) - 128  # (B, C, H/8, W/8, 8, 8)
    # F = ¼ α(u)α(v) Σ f cos cos = S ⊙ (C f Cᵀ); F' = round(F / T)·T (half to even); f' = Cᵀ(S ⊙ F')C + 128
    coef = torch.round(s * (cos @ blocks @ cos.T) / table) * table
    return (cos.T @ (s * coef) @ cos + 128).transpose(3, 4).reshape(x.shape)
def jpeg(img: torch.Tensor, quality) -> torch.Tensor:
    """[BasicSR] DiffJPEG, non-differentiable (true rounding): (B, 3, H, W) in [0, 1], float quality per sample."""
    h, w, as_img = *img.shape[-2:], lambda t: torch.tensor(t, dtype=img.dtype, device=img.device)
    factor = jpeg_factor(_column(quality, img))[..., None, None]                  # (B, 1, 1, 1, 1, 1)
    shift = as_img((0.0, 128.0, 128.0))[:, None, None]
    # zero-pad bottom/right to multiples of 16 (affects border blocks), ×255, RGB → YCbCr
    ycc = torch.einsum("ij,bjhw->bihw", as_img(RGB_TO_YCBCR), F.pad(img, (0, -w % 16, 0, -h % 16)) * 255) + shift
    # T_Y = transpose of the Annex-K table (BasicSR's stored y_table) [official code]; 4:2:0 by 2×2 mean
    y = _jpeg_blocks(ycc[:, :1], as_img(JPEG_LUMA).T * factor)
    c = _jpeg_blocks(F.avg_pool2d(ycc[:, 1:], 2), F.pad(as_img(JPEG_CHROMA_CORNER), (0, 4, 0, 4), value=99) * factor)
    ycc = torch.cat([y, c.repeat_interleave(2, -2).repeat_interleave(2, -1)], 1)  # chroma 2×2 replication
    rgb = torch.einsum("ij,bjhw->bihw", as_img(YCBCR_TO_RGB), ycc - shift)
    return (rgb.clamp(0, 255) / 255)[..., :h, :w]
def usm_kernel(device=None) -> torch.Tensor:
    """(51, 51) outer product of OpenCV getGaussianKernel(51, 0): σ = 0.3·((51 − 1)/2 − 1) + 0.8 = 8."""
    taps = torch.exp(-((torch.arange(51, dtype=torch.float64, device=device) - 25) ** 2) / (2 * 8.0**2))
    return torch.outer(taps, taps).div(taps.sum() ** 2).float()
def usm_sharp(img: torch.Tensor, weight: float = 0.5, threshold: float = 10) -> torch.Tensor:
    """[BasicSR] USM: r = I − G∗I, soft = G∗1[|r|·255 > t]; out = soft·clip(I + w·r, 0, 1) + (1 − soft)·I."""
    kernel = usm_kernel(img.device).to(img.dtype)
    residual = img - blur(img, kernel)
    soft = blur((residual.abs() * 255 > threshold).to(img.dtype), kernel)
    return soft * (img + weight * residual).clamp(0, 1) + (1 - soft) * img

def sample_realesrgan(batch: int, opts: RealESRGANOptions, device) -> dict:
    """Pipeline steps 1–8: every random choice; per batch as Python values, per sample as (B,) / (B, 21, 21) tensors."""
    u = iter(torch.rand(11, dtype=torch.float64, device=device).tolist())        # per-batch uniforms, one sync
    mode = lambda: ("area", "bilinear", "bicubic")[min(int(3 * next(u)), 2)]
    params = dict(sinc=random_sinc(batch, opts, device))
    for n, s in ((1, 0), (2, 1)):                                                 # stage n, option index s
        (lo, hi), (up, down, _), d, v = opts.resize_range[s], opts.resize_prob[s], next(u), next(u)
        scale = 1 + (hi - 1) * v if d < up else lo + (1 - lo) * v if d < up + down else 1.0  # U(1, hi), U(lo, 1), 1
        gaussian = next(u) < opts.gaussian_noise_prob[s]                          # else Poisson
        level = _uniform(*(opts.noise_range if gaussian else opts.poisson_scale_range)[s], batch, device)
        params |= {f"kernel{n}": random_kernels(batch, n, opts, device), f"scale{n}": scale, f"mode{n}": mode(),
                   f"noise{n}_gaussian": gaussian, f"noise{n}_level": level,
                   f"noise{n}_gray": torch.rand(batch, device=device) < opts.gray_noise_prob[s],
                   f"jpeg{n}": _uniform(*opts.jpeg_range[s], batch, device)}
    return params | dict(second_blur=next(u) < opts.second_blur_prob, sinc_first=next(u) < 0.5, final_mode=mode())
def _noise(x: torch.Tensor, params: dict, n: int) -> torch.Tensor:
    """Pipeline steps 3/7: Gaussian or Poisson noise (type per batch), then clip to [0, 1], no rounding."""
    add = add_gaussian_noise if params[f"noise{n}_gaussian"] else add_poisson_noise
    return add(x, params[f"noise{n}_level"], params[f"noise{n}_gray"]).clamp(0, 1)
def apply_realesrgan(img_gt: torch.Tensor, params: dict, scale: int = 4) -> torch.Tensor:
    """Pipeline steps 1–9 with a fixed draw (tensors of batch 1 or B): (B, 3, H0, W0) GT → (B, 3, H0/s, W0/s) LR."""
    p, (h0, w0) = params, img_gt.shape[-2:]
    x = F.interpolate(blur(img_gt, p["kernel1"]), scale_factor=p["scale1"], mode=p["mode1"])  # 1–2: blur, resize
    x = jpeg(_noise(x, p, 1).clamp(0, 1), p["jpeg1"])                             # 3–4: noise, clip; clamp → JPEG
    x = blur(x, p["kernel2"]) if p["second_blur"] else x                          # 5: blur 2 (coin per batch)
    x = F.interpolate(x, size=(int(h0 / scale * p["scale2"]), int(w0 / scale * p["scale2"])), mode=p["mode2"])  # 6
    x = _noise(x, p, 2)                                                           # 7: noise, clip
    # 8: A = [resize to (H0/s, W0/s) → sinc] then [clamp → JPEG]; B = [clamp → JPEG] then [resize → sinc]
    final = lambda t: blur(F.interpolate(t, size=(h0 // scale, w0 // scale), mode=p["final_mode"]), p["sinc"])
    x = jpeg(final(x).clamp(0, 1), p["jpeg2"]) if p["sinc_first"] else final(jpeg(x.clamp(0, 1), p["jpeg2"]))
    return quantize(x)                                                            # 9: clamp(round(255x), 0, 255)/255
def realesrgan_degrade(img_gt: torch.Tensor, opts: RealESRGANOptions, scale: int = 4) -> torch.Tensor:
    """Pipeline steps 1–9 with a fresh draw for this batch."""
    return apply_realesrgan(img_gt, sample_realesrgan(img_gt.shape[0], opts, img_gt.device), scale)
def paired_random_crop(img_lr: torch.Tensor, img_hr: torch.Tensor, lr_size: int, scale: int):
    """Pipeline step 10: one random (top, left) for the whole batch [official code]; HR at scale× the LR offsets."""
    top, left = (int(torch.randint(n - lr_size + 1, (), device=img_lr.device)) for n in img_lr.shape[-2:])
    return (img_lr[..., top:top + lr_size, left:left + lr_size],
            img_hr[..., scale * top:scale * (top + lr_size), scale * left:scale * (left + lr_size)])

class TrainingPairPool:
    """[Real-ESRGAN] pool of `size` (LR, GT) pairs mixing per-batch draws across batches; uint8 (exact on 1/255)."""
    def __init__(self, size: int = 180):
        self.size, self.filled, self.lr, self.hr = size, 0, *[torch.empty(0, dtype=torch.uint8)] * 2  # sized later
    def __call__(self, img_lr: torch.Tensor, img_hr: torch.Tensor):
        """Filling: store the batch (what fits [ours]) and return it; full: swap it for b random pooled pairs."""
        b, to8 = img_lr.shape[0], lambda x: x.mul(255).round().to(torch.uint8)
        if not self.lr.numel():
            self.lr, self.hr = (torch.empty(self.size, *x.shape[1:], dtype=torch.uint8) for x in (img_lr, img_hr))
        self.lr, self.hr = self.lr.to(img_lr.device), self.hr.to(img_lr.device)   # no-op once there
        if self.filled < self.size:
            n, i = min(b, self.size - self.filled), self.filled
            self.lr[i:i + n], self.hr[i:i + n], self.filled = to8(img_lr[:n]), to8(img_hr[:n]), i + n
            return img_lr, img_hr
        perm = torch.randperm(self.size, device=img_lr.device)                # full: permute, hand out the first b
        self.lr, self.hr = self.lr[perm], self.hr[perm]
        out = self.lr[:b].to(img_lr.dtype) / 255, self.hr[:b].to(img_hr.dtype) / 255
        self.lr[:b], self.hr[:b] = to8(img_lr), to8(img_hr)
        return out
    def state_dict(self) -> dict:
        """Pool contents (CPU uint8) and fill level, for an exact resume."""
        return {"size": self.size, "filled": self.filled, "lr": self.lr.cpu(), "hr": self.hr.cpu()}
    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() onto the pool's device (its batches' device; CPU until the first batch)."""
        self.size, self.filled = state["size"], state["filled"]
        self.lr, self.hr = state["lr"].to(self.lr.device), state["hr"].to(self.lr.device)

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
        if scale != 4:
            raise UserError(f"aniso_noise is defined for x4 only (its kernels and noise levels are the x4 setting), "
                            f"not x{scale}")
        return [(f"k{i}/n{n}", {"id": i, "noise": n, "kernel": anisotropic_kernels(l1, l2, math.radians(t))[0]})
                for n in (0, 10, 20) for i, (l1, l2, t) in enumerate(ANISO_KERNELS, start=1)]
    if protocol == "bicubic":
        return [("bicubic", {"id": "bicubic", "kernel": None, "noise": 0})]
    raise UserError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")

def find_benchmark(data, root="datasets") -> tuple[str, list[Path]]:
    """(set name, HR files) of a benchmark name under `root` or a folder: its HR/, else BasicSR's GTmod12/ or GT/, else
    its own images (not sub-folders'). The set is named alike whether given by name, folder or HR folder (the name
    seeds each image's test degradation)."""
    path = Path(data) if Path(data).is_dir() else Path(root) / str(data)
    if not path.is_dir():
        known = [n for n in BENCHMARKS if (Path(root) / n).is_dir()]
        raise UserError(f"benchmark '{data}' not found: expected {path}/HR/*.png (layout <data-root>/<Set>/HR/*.png, "
                        f"names {', '.join(BENCHMARKS)}; under {root}: {', '.join(known) or 'none'}) or a folder path")
    if path.name in HR_FOLDERS:                                   # Set5/HR given: the set is Set5
        return path.resolve().parent.name, list_images(path, recursive=False)
    found = [name for name in HR_FOLDERS if (path / name).is_dir()]
    if len(found) > 1 and found[0] != "HR":
        raise UserError(f"{path} holds both {' and '.join(found)}: pass the one to score as --data {path}/{found[0]}")
    if found:
        return path.resolve().name, list_images(path / found[0], recursive=False)
    if not [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]:
        folders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise UserError(f"no images in {path} (expected HR/, GTmod12/ or GT/, or images directly in it; found "
                        f"folders: {', '.join(folders) or 'none'})")
    return path.resolve().name, list_images(path, recursive=False)

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
                  limit=None, name: str = "") -> list[dict]:
    """Score `sr_fn(img_lr) -> img_sr` on every (image, degradation) pair; one row each [P §3.1]. `name` labels the
    progress lines (the model's pass or the bicubic one)."""
    set_name, files = find_benchmark(data, root)
    degradations = test_degradations(protocol, scale)
    for path in files[:limit]:                                  # a bad image is refused before the first one runs
        load_uint8(path)
    rows, start = [], time.perf_counter()
    for n, path in enumerate(files[:limit], start=1):
        img_hr = modcrop(load_uint8(path), scale)
        for label, params in degradations:
            img_lr = benchmark_lr(img_hr, params, scale, f"{set_name}/{path.stem}", device)
            with torch.no_grad():
                img_sr = to_uint8(sr_fn(img_lr))
            if img_sr.shape != img_hr.shape:
                raise UserError(f"model output {img_sr.shape[1]}x{img_sr.shape[0]} != HR {img_hr.shape[1]}x"
                                f"{img_hr.shape[0]} (width x height) for {path.name}: "
                                f"does --scale {scale} match the model?")
            rows.append({"set": set_name, "image": path.stem, "degradation": label,
                         "psnr": psnr_y(img_sr, img_hr, scale), "ssim": ssim_y(img_sr, img_hr, scale)})
            if save_dir is not None:
                save_image(img_sr, Path(save_dir) / set_name / label.replace("/", "_") / f"{path.stem}.png")
        print(f"  {name + ': ' if name else ''}{set_name} {n}/{len(files[:limit])} {path.name} "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
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

def report(rows: list[dict], title: str, out_dir=None, model: str = "", limit=None) -> None:
    """Print summary rows as a table; with `out_dir` append them (method column = title) to results.csv/.md, each row
    with what was scored (`model`: checkpoint and step, or weights file), --limit when given, and the date."""
    metrics = [k for k in METRICS if k in rows[0]]
    print(f"\n{title}\n{'set':<10} {'degradation':<14}" + "".join(f" {METRICS[m]:>8}" for m in metrics) + "    n")
    for r in rows:
        print(f"{r['set']:<10} {r['degradation']:<14}" + "".join(f" {r[m]:8.4f}" for m in metrics) + f" {r['n']:>4}")
    if out_dir is None:
        return
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    fields, kept = ["method", "set", "degradation", *METRICS, "n", "model", "limit", "date"], []
    stamp = {"model": model, "limit": limit or "", "date": time.strftime("%Y-%m-%d %H:%M")}
    if (out / "results.csv").exists():                          # a file from before a column was added is rewritten
        with open(out / "results.csv", newline="") as f:
            kept = None if (reader := csv.DictReader(f)).fieldnames == fields else list(reader)
    with open(out / "results.csv", "a" if kept is None else "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        if kept is not None:
            writer.writeheader()
            writer.writerows(kept)
        writer.writerows({"method": title, **r, **stamp} for r in rows)
    with open(out / "results.md", "a") as f:
        f.write(f"\n### {title}\n\n{model or 'bicubic'}{f', first {limit} images' if limit else ''}, {stamp['date']}\n\n"
                f"| set | degradation | {' | '.join(METRICS[m] for m in metrics)} | n |\n"
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

# ---- Real-world evaluation: LPIPS [LPIPS v0.1], paired LR/HR folders ---------------------------------------
TRUNK_FILES = "torchvision alexnet-owt-7be5be79.pth or vgg16-397923af.pth"
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TRUNKS = {  # torchvision `features` ((C_out, k, stride, pad): conv + ReLU; int k: max-pool k/2), slice ends after
    # relu1..5, their channels, the smallest input side, the weight sums of the released v0.1 lin files
    "alex": ([(64, 11, 4, 2), 3, (192, 5, 1, 2), 3, (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)], (2, 5, 8, 10, 12),
             (64, 192, 384, 256, 256), 31, (2.349532, 16.143028, 39.268440, 27.197178, 20.317177)),
    "vgg": ([2 if c == "M" else (c, 3, 1, 1) for c in VGG16], (4, 9, 16, 23, 30), (64, 128, 256, 512, 512), 16,
            (6.925992, 8.858335, 17.515005, 51.521324, 47.034851))}

class LPIPS(nn.Module):
    """LPIPS v0.1 distance of RGB images in [0, 1], (B, 3, H, W) twice -> (B,); trunk 'alex' or 'vgg'. Frozen."""
    def __init__(self, trunk: str = "alex"):
        super().__init__()
        spec, self.cuts, channels, self.min_side, self.lin_sums = LPIPS_TRUNKS[trunk]
        layers, c_in, self.trunk = [], 3, trunk
        for item in spec:                                                     # layer i = torchvision's features.{i}
            layers += [nn.MaxPool2d(item, 2)] if isinstance(item, int) else [nn.Conv2d(c_in, *item), nn.ReLU()]
            c_in = c_in if isinstance(item, int) else item[0]
        self.features = nn.Sequential(*layers)
        # lin_l: 1x1 conv C_l -> 1, no bias (the release's Dropout before it is inactive in eval) [LPIPS v0.1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        # ScalingLayer: (x - shift) / scale, the ImageNet mean/std mapped to [-1, 1] [LPIPS v0.1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()
    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        if img0.shape != img1.shape or img0.dim() != 4 or img0.shape[1] != 3 or min(img0.shape[-2:]) < self.min_side:
            raise UserError(f"LPIPS ({self.trunk}) compares two RGB images of one shape, sides >= {self.min_side} px; "
                            f"got {tuple(img0.shape)} and {tuple(img1.shape)}")
        # x in [0, 1] -> 2x - 1 -> (x - shift) / scale [LPIPS v0.1]; both images in one batch: (2B, 3, H, W)
        h, start, dist = ((torch.cat([img0, img1]).float() * 2 - 1) - self.shift) / self.scale, 0, 0
        for lin, end in zip(self.lins, self.cuts):
            h, start = self.features[start:end](h), end                         # relu_l maps (2B, C_l, H_l, W_l)
            # f^ = f / (sqrt(sum_c f^2) + 1e-10) per pixel; LPIPS = sum_l mean_hw lin_l((f^_0 - f^_1)^2) [LPIPS v0.1]
            f0, f1 = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
            dist = dist + lin((f0 - f1) ** 2).mean((1, 2, 3))
        return dist

def load_lpips(trunk_path, lin_path, verify: bool = True, device="cpu") -> LPIPS:
    """LPIPS from a torchvision AlexNet/VGG16 state dict (features.*; classifier.* ignored) + v0.1 lin file, strict."""
    state = read_weights(trunk_path, TRUNK_FILES)
    alex = getattr(state.get("features.0.weight"), "shape", None) == (64, 3, 11, 11)      # VGG16's is 64x3x3x3
    model, names = LPIPS("alex" if alex else "vgg"), [f"lin{i}.model.1.weight" for i in range(5)]
    features = strict_state({k: v for k, v in state.items() if k.startswith("features.")},
                            model.features.state_dict(prefix="features."), trunk_path,
                            f"{TRUNK_FILES} (read as {model.trunk} by features.0.weight)")
    expected = f"the LPIPS v0.1 lin file of the {model.trunk} trunk in {trunk_path} ({model.trunk}.pth)"
    ours = dict(zip(names, model.lins.state_dict().values()))
    lin = strict_state(read_weights(lin_path, expected), ours, lin_path, expected)
    if verify and any(abs(lin[k].double().sum() - ref) > 1e-4 for k, ref in zip(names, model.lin_sums)):
        raise UserError(f"{lin_path} is not the released LPIPS v0.1 {model.trunk} lin file (its weight sums differ); "
                        f"--lpips-unverified accepts it anyway")
    model.load_state_dict({**features, **{f"lins.{i}.weight": lin[k] for i, k in enumerate(names)}})
    return model.to(device)

def paired_files(lr_dir, hr_dir, scale: int) -> list[tuple[Path, Path]]:
    """(LR, HR) pairs matched by stem: the same (NTIRE2020 Track1, AIM2019), LR NAMEx4[m|d|w] for HR NAME (DIV2K),
    NAME_LR4 for NAME_HR (RealSR; lr_dir == hr_dir allowed: HR = the *_HR). Every LR needs an HR and vice versa."""
    same, hr_files = Path(lr_dir).resolve() == Path(hr_dir).resolve(), list_images(hr_dir)
    lr_files = [p for p in hr_files if not p.stem.endswith("_HR")] if same else list_images(lr_dir)
    hr_by_stem = {p.stem: p for p in hr_files if not same or p.stem.endswith("_HR")}
    ends = [("", "")] + [(f"x{scale}{c}", "") for c in ("", "m", "d", "w")] + [(f"_LR{scale}", "_HR")]
    match = {lr: next((s for end, hr_end in ends if lr.stem.endswith(end)
                       if (s := lr.stem.removesuffix(end) + hr_end) in hr_by_stem), None) for lr in lr_files}
    unmatched = [lr.name for lr, s in match.items() if s is None]
    unmatched += [p.name for s, p in hr_by_stem.items() if s not in set(match.values())]
    if unmatched:
        raise UserError(f"{len(unmatched)} unpaired image(s) in {lr_dir} / {hr_dir}: {', '.join(unmatched[:5])}; "
                        f"names: same stem (NTIRE2020 Track1, AIM2019), LR NAMEx{scale}[m|d|w] for HR NAME (DIV2K), "
                        f"NAME_LR{scale} for NAME_HR (RealSR, one folder allowed)")
    return [(lr, hr_by_stem[s]) for lr, s in match.items()]

def check_pair_sizes(pairs, scale: int) -> None:
    """Before any decoding: HR = scale x LR per side (+ < scale px, which modcrop removes), sizes from the headers."""
    for lr, hr in pairs:
        try:
            with Image.open(lr) as im_lr, Image.open(hr) as im_hr:
                (w, h), (hr_w, hr_h) = im_lr.size, im_hr.size
        except OSError as err:
            raise UserError(f"cannot read image: {err}") from None
        if not (0 <= hr_w - scale * w < scale and 0 <= hr_h - scale * h < scale):
            hint = (f"the LR is not smaller than its HR: downscale a pre-upsampled LR (as RealSR ships) x{scale} first"
                    if w >= hr_w or h >= hr_h else f"does --scale {scale} match the data?")
            raise UserError(f"HR {hr} is {hr_w}x{hr_h}, LR {lr} is {w}x{h}; expected HR {scale * w}x{scale * h} "
                            f"(+ up to {scale - 1} px per side): {hint}")

def run_paired(sr_fn, lr_dir, hr_dir, scale: int, device, lpips=None, save_dir=None, limit=None,
               name: str = "") -> list[dict]:
    """Per pair: Y PSNR/SSIM [P §4], RGB PSNR/SSIM (shave = scale) and LPIPS (whole SR vs modcropped HR, as the KDSR
    release scores it). The set is the LR folder's name (a bare scale folder: parent-scale, RealSR Test/4 -> Test-4)."""
    pairs = paired_files(lr_dir, hr_dir, scale)[:limit]
    check_pair_sizes(pairs, scale)
    folder, rows, start = Path(lr_dir).resolve(), [], time.perf_counter()
    set_name = "-".join(folder.parts[-2 if folder.name.lower().lstrip("x").isdigit() else -1:])
    for n, (lr, hr) in enumerate(pairs, start=1):
        img_hr = modcrop(load_uint8(hr), scale)
        with torch.no_grad():
            img_sr = to_uint8(sr_fn(load_image(lr)[None].to(device)))
        if img_sr.shape != img_hr.shape:
            raise UserError(f"model output {img_sr.shape[1]}x{img_sr.shape[0]} != HR {img_hr.shape[1]}x{img_hr.shape[0]} "
                            f"for {lr.name}: --scale {scale}?")
        rows.append({"set": set_name, "image": lr.stem, "degradation": "paired", "psnr": psnr_y(img_sr, img_hr, scale),
                     "ssim": ssim_y(img_sr, img_hr, scale), "psnr_rgb": psnr_y(img_sr, img_hr, scale, rgb=True),
                     "ssim_rgb": ssim_y(img_sr, img_hr, scale, rgb=True)})
        if lpips is not None:  # of the 8-bit SR and the HR, RGB in [0, 1]: (2, 3, H, W)
            pair = torch.stack([torch.from_numpy(img) for img in (img_sr, img_hr)]).permute(0, 3, 1, 2).to(device) / 255
            rows[-1]["lpips"] = lpips(pair[:1], pair[1:]).item()
        if save_dir is not None:
            save_image(img_sr, Path(save_dir) / set_name / f"{lr.stem}.png")
        print(f"  {name + ': ' if name else ''}{set_name} {n}/{len(pairs)} {lr.name} "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
    return rows

def super_resolve_folder(sr_fn, lr_dir, out_dir, device, limit=None) -> list[Path]:
    """`--lr-dir` alone: the SR of every LR image to <out_dir>/<stem>.png (sub-folders kept), never into lr_dir."""
    lr_dir, out_dir = Path(lr_dir).resolve(), Path(out_dir).resolve()
    files = list_images(lr_dir)[:limit]
    targets = [out_dir / p.relative_to(lr_dir).with_suffix(".png") for p in files]
    if out_dir == lr_dir or lr_dir in out_dir.parents:
        raise UserError(f"output folder {out_dir} is in the LR folder {lr_dir}: inputs would be overwritten or re-read")
    writable_dir(out_dir)                                       # before the first image
    for n, (path, target) in enumerate(zip(files, targets), start=1):
        with torch.no_grad():
            save_image(sr_fn(load_image(path)[None].to(device)), target)
        print(f"  {n}/{len(files)} {path.name} -> {target}", flush=True)
    return targets

def add_paired_args(parser: argparse.ArgumentParser) -> None:
    """Real-world evaluation flags: paired LR/HR folders (or LR alone: write SR PNGs) and LPIPS weight files."""
    parser.add_argument("--lr-dir", help="LR folder: scored against --hr-dir, or alone: SR PNGs made (default: none)")
    parser.add_argument("--hr-dir", help="HR folder paired by file name; may be --lr-dir itself (default: none)")
    parser.add_argument("--lpips-weights", nargs=2, metavar=("TRUNK", "LIN"), help=f"{TRUNK_FILES} and the LPIPS v0.1 "
                        "lin file alex.pth or vgg.pth, never downloaded (default: none, no LPIPS)")
    parser.add_argument("--lpips-unverified", action=argparse.BooleanOptionalAction, default=False,
                        help="accept a lin file that is not the released v0.1 one (default: False)")

def check_paired_args(args) -> None:
    """--hr-dir needs --lr-dir, and --lpips-weights needs both (it scores SR against HR): before any work."""
    if (args.hr_dir and not args.lr_dir) or (args.lpips_weights and not args.hr_dir):
        raise UserError("--hr-dir pairs with --lr-dir, and --lpips-weights needs both (paired real-world evaluation)")

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

def share(batch_size: int, dist: Dist) -> slice:
    """This rank's items [r·b, (r+1)·b) of a global batch, b = batch / world size; a UserError unless it divides."""
    if batch_size % dist.world_size:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must be a multiple of the "
                        f"{dist.world_size} processes")
    b = batch_size // dist.world_size
    return slice(dist.rank * b, (dist.rank + 1) * b)

class StepRandom:
    """The random draws of one training step, seeded by (seed, step) alone and made for the whole global batch, of
    which each rank keeps its share: sample i of step k sees the same numbers with 1 or N processes, and a resumed
    run the same as an uninterrupted one (on one device type: CPU and CUDA generators differ)."""
    def __init__(self, seed: int, step: int, batch_size: int, dist: Dist, device):
        self.generator = torch.Generator(device=device).manual_seed(eval_seed(f"train/{seed}/{step}"))
        self.batch, self.part, self.device = batch_size, share(batch_size, dist), device
    def rand(self, *shape) -> torch.Tensor:
        """U[0, 1) of shape (b, *shape) for this rank's samples."""
        return torch.rand(self.batch, *shape, generator=self.generator, device=self.device)[self.part]
    def randn(self, *shape) -> torch.Tensor:
        """N(0, 1) of shape (b, *shape) for this rank's samples."""
        return torch.randn(self.batch, *shape, generator=self.generator, device=self.device)[self.part]
    def shared(self, *shape) -> torch.Tensor:
        """U[0, 1) of `shape`, the same on every rank (a draw for the step, not for a sample)."""
        return torch.rand(shape, generator=self.generator, device=self.device)

def gather_batch(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every rank's x concatenated in rank order (the global batch), gradients flowing back into each rank's own x:
    a loss that is a statistic over the batch then sees the same samples with 1 or N processes."""
    if not dist.enabled:
        return x
    import torch.distributed.nn.functional as dist_nn                  # autograd-aware collectives
    return torch.cat(dist_nn.all_gather(x))

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)                     # under torch.compile (--compile): its module
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
def all_reduce_mean(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean of `tensor` over ranks (the tensor itself for a single process)."""
    if dist.enabled:
        torch.distributed.all_reduce(tensor := tensor.detach().clone())             # sum over ranks
        tensor = tensor / dist.world_size
    return tensor

def gather_objects(obj, dist: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (collective: call on all); [obj] for a single process."""
    if not dist.enabled:
        return [obj]
    torch.distributed.all_gather_object(objects := [None] * dist.world_size, obj)
    return objects

def rng_state(dist: Dist | None = None) -> dict:
    """torch (and CUDA) RNG states, all the scripts draw from; under DDP every rank's (collective: call on all)."""
    state = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if dist is None or not dist.enabled:
        return state
    ranks = gather_objects(state, dist)
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
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): an interrupted copy? Use an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything torch cannot unpickle safely is not one of our checkpoints
        if not zipfile.is_zipfile(path):                        # torch.save writes zip archives: cut short or not one
            raise UserError(f"{path} is corrupt, truncated or not a torch file: torch cannot read it") from None
        ckpt = None                                             # a torch file, holding objects ours never do
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of these scripts (official weights: --official-weights)") from None
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py")
    if stages is not None and ckpt.get("stage") not in stages:
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint; expected stage {' or '.join(stages)}")
    return ckpt

def writable_dir(path) -> Path:
    """`path`, created if needed and checked writable before any work starts (a UserError otherwise)."""
    try:
        (path := Path(path)).mkdir(parents=True, exist_ok=True)
        (probe := path / f".write-test-{os.getpid()}").touch()
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {path}: {err.strerror}") from None
    return path

def read_weights(path, expected: str) -> dict:
    """The dict in a user-supplied weights file (never downloaded), or one UserError line saying what was expected."""
    if not path or not Path(path).is_file():
        raise UserError(f"weights file not found: {path} (expected {expected})")
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): expected {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad user file
        raise UserError(f"cannot read {path} ({str(err).splitlines()[0][:120]}): expected {expected}") from None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict: expected {expected}")
    return state

def strict_state(state: dict, ours: dict, path, expected: str) -> dict:
    """`state` if its keys and shapes are exactly those of `ours`, else one UserError naming the first differences."""
    problems = [f"missing {k}" for k in ours if k not in state] + [f"unexpected {k}" for k in state if k not in ours]
    problems += [f"{k} {tuple(getattr(v, 'shape', ()))} vs {tuple(ours[k].shape)}" for k, v in state.items()
                 if k in ours and (not torch.is_tensor(v) or v.shape != ours[k].shape)]
    if problems:
        raise UserError(f"{path} is not {expected}: {', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}")
    return state

def map_official_key(key: str, table: dict[str, str]) -> str | None:
    """Our key for an official key (e.g. G.tail.0.2.weight -> G.upsample.2.weight), None when unknown."""
    for official, ours in table.items():
        if key.startswith(official + "."):
            return ours + key[len(official):]
    return None

def convert_official(state: dict, ours: dict, table: dict[str, str]) -> dict:
    """Official tensors under our keys; strict both ways (all consumed, all filled, shapes equal) or UserError."""
    converted, unknown, mismatched = {}, [], []
    for key, tensor in state.items():
        target = map_official_key(key, table)
        if target is None or target not in ours or target in converted:
            unknown.append(key)
        elif tuple(tensor.shape) != tuple(ours[target].shape):
            mismatched.append(f"{key} {tuple(tensor.shape)} vs ours {tuple(ours[target].shape)}")
        else:
            converted[target] = tensor
    inverse = {v: k for k, v in table.items()}
    missing = [next((o + k[len(v):] for v, o in inverse.items() if k.startswith(v + ".")), k)
               for k in ours if k not in converted]
    for what, bad in (("unexpected official keys", unknown), ("shape mismatches", mismatched),
                      ("official keys missing", missing)):
        if bad:
            raise UserError(f"{what} ({len(bad)}): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return converted

def resumed(path, script: str, stages, steps: int | None, flags: dict | None = None, names: dict | None = None) -> dict:
    """The checkpoint --resume continues, its config's steps replaced by --steps; a UserError if none are left, or if
    an explicit flag ({config field: value}, None = not given; `names`: {field: flag} where they differ) disagrees
    with the checkpoint's configuration."""
    ckpt = load_checkpoint(path, script, stages)
    def flag(field, value):
        name = (names or {}).get(field, field.replace("_", "-"))
        return f"--{'no-' * (value is False)}{name}" if isinstance(value, bool) else f"--{name} {value}"
    differ = [f"{flag(k, v)} (checkpoint: {ckpt['config'][k]})" for k, v in (flags or {}).items()
              if v is not None and k in ckpt["config"] and ckpt["config"][k] != v]
    if differ:
        raise UserError(f"--resume continues {path} with its own configuration, only --steps may change; drop "
                        f"{', '.join(differ)}")
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

def leave_on_signal(flag: dict, step: int, last, dist: Dist) -> None:
    """After a signal stopped training and last.pt is written: say so, exit with 128 + the signal (130 SIGINT, 143
    SIGTERM) as a shell does, so `train && eval` or a chain of stages does not go on with a half-trained model."""
    if dist.is_main:
        print(f"stopped by signal at step {step}; checkpoint {last}; continue with --resume", flush=True)
    raise SystemExit(128 + (flag["signal"] or signal.SIGTERM))   # a rank told by another: its signal is not known

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
    """One fixed-format progress line per call, and the same record appended to <out_dir>/log.jsonl; given the global
    batch and the processes, a first line says how the batch is shared."""
    def __init__(self, out_dir, total_steps: int, enabled: bool = True, start_step: int = 0, batch=None, dist=None):
        self.path, self.total, self.enabled = Path(out_dir) / "log.jsonl", total_steps, enabled
        self.last_step, self.last_time = start_step, time.perf_counter()
        if enabled and batch is not None:
            world = dist.world_size if dist is not None else 1
            print(f"global batch {batch} = {world} process{'es' if world > 1 else ''} x {batch // world}", flush=True)
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

def rank_mean(tensors: list[torch.Tensor], dist: Dist | None) -> list[torch.Tensor]:
    """Each tensor averaged over the ranks in one all-reduce (one process: as given). With equal shares of the global
    batch, the mean of the ranks' batch-mean losses and gradients is the global batch's."""
    if dist is None or not dist.enabled:
        return tensors
    flat = all_reduce_mean(torch.cat([t.detach().flatten() for t in tensors]), dist)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ for every parameter of `model` (DDP-wrapped or not)."""
    for p_ema, p in zip(ema.parameters(), unwrap(model).parameters()):
        p_ema.mul_(decay).add_(p, alpha=1 - decay)

def to_device(module: nn.Module, device, channels_last: bool = False) -> nn.Module:
    """`module` on `device`, in channels_last memory format when asked for (--channels-last)."""
    return module.to(device, memory_format=torch.channels_last) if channels_last else module.to(device)

def read_released(path, authors: str, script: str) -> dict:
    """A released raw state dict of tensors (DataParallel 'module.' prefixes dropped), or one UserError line."""
    if not Path(path).is_file():
        raise UserError(f"official weights not found: {path}")
    state = read_weights(path, f"the {authors} release's raw state dict")
    if "script" in state:
        raise UserError(f"{path} was written by {state['script']}.py train, not released by the {authors} authors"
                        f"{': pass it as --ckpt' if state['script'] == script else ''}")
    if not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a raw state dict of tensors (the released {authors} layout)")
    return {k.removeprefix("module."): v for k, v in state.items()}

def restore_state(path, script: str, stage: str, state: dict, dist: Dist, device) -> int:
    """--resume: each part of a training state {key: module or optimizer} and the RNG states; returns the step."""
    ckpt = load_checkpoint(path, script, (stage,), device=device)
    for key, part in state.items():
        part.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"], dist)
    return int(ckpt["step"])

def train_steps(one_step, start: int, steps: int, payload, out_dir, stage: str, log_every: int, save_every: int,
                dist: Dist, device, batch: int, last_good=None) -> Path:
    """Steps start + 1 … steps of one_step(step, check) -> logged scalars, and around them the log line, SIGINT/SIGTERM
    (finish the step, write last.pt, exit 128 + signal), last.pt (payload(step, rng)) by rank 0 every save_every steps;
    check(loss) -> its mean over the ranks, stopping every rank before the update when it is not finite."""
    log = RunLog(out_dir, steps, enabled=dist.is_main, start_step=start, batch=batch, dist=dist)
    last, last_good, step = Path(out_dir) / "last.pt", last_good or "(none written yet)", start
    def check(loss: torch.Tensor) -> torch.Tensor:
        loss_mean = all_reduce_mean(loss.detach(), dist)
        check_finite(loss_mean, step, last_good)
        return loss_mean
    with stop_on_signals() as flag:
        for step in range(start + 1, steps + 1):
            scalars = one_step(step, check)
            if step % log_every == 0 or step == steps:
                log.log(step, stage, **scalars)
            stop = step < steps and stop_requested(flag, dist, device)
            if step % save_every == 0 or step == steps or stop:
                rng = rng_state(dist)                                   # collective: every rank takes part
                if dist.is_main:
                    save_checkpoint(last, payload(step, rng))
                last_good = last
            if stop:
                leave_on_signal(flag, step, last, dist)
    return last

def evaluate_sets(sr_fn_for, name: str, source: str, args, device) -> list[dict]:
    """`eval` of a loaded model, every input checked before the first image; --lr-dir alone: SR PNGs. Else per benchmark
    set (args.data) or for the paired folders (--lr-dir, --hr-dir) the rows of sr_fn_for(set; None: the folders) and
    of bicubic, reported to <out_dir>/results.*; returns the method's summary rows."""
    check_paired_args(args)
    lpips = load_lpips(*args.lpips_weights, not args.lpips_unverified, device) if args.lpips_weights else None
    out_dir = writable_dir(args.out_dir)
    for data in [] if args.lr_dir else args.data:
        find_benchmark(data, args.data_root)
    if args.lr_dir and not args.hr_dir:                         # real photos without ground truth
        super_resolve_folder(sr_fn_for(None), args.lr_dir, out_dir / "images", device, args.limit)
        return []
    save_dir, summary = out_dir / "images" if args.save_images else None, []
    for data in [None] if args.lr_dir else args.data:
        sr_fn = sr_fn_for(data)
        for method, fn in ((name, sr_fn), ("bicubic", bicubic_sr(args.scale))):
            images = save_dir if fn is sr_fn else None
            if args.lr_dir:
                rows = run_paired(fn, args.lr_dir, args.hr_dir, args.scale, device, lpips, images, args.limit, method)
            else:
                rows = run_benchmark(fn, data, args.protocol, args.scale, args.data_root, device, images, args.limit,
                                     method)
            table = summarize(rows)
            report(table, f"{method} x{args.scale} {'paired' if args.lr_dir else args.protocol} {table[0]['set']}",
                   out_dir, source if fn is sr_fn else "", args.limit)
            summary += table if fn is sr_fn else []
    print(f"\nresults: {out_dir / 'results.md'}")
    return summary

@contextlib.contextmanager
def cli_errors():
    """`with cli_errors():` around a CLI's work: the one exit path for bad input (see UserError)."""
    try:
        yield
    except UserError as err:
        raise SystemExit(f"error: {err}") from None

def at_least(low, kind=int):
    """argparse type of a numeric flag >= low: `--steps 0` is one usage line, never a traceback later on."""
    def parse(text: str):
        if not (value := kind(text)) >= low:                                   # `not >=` also rejects nan
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} >= {low}, got {text}")
        return value
    parse.__name__ = kind.__name__                                             # argparse: "invalid int value: 'x'"
    return parse

def show_defaults(parser: argparse.ArgumentParser, config=None) -> argparse.ArgumentParser:
    """Append "(default: X)" to the help of every option (of every subcommand) that does not state it yet; an option
    left unset (None) that overrides a field of `config` (a Config dataclass) shows the paper preset's value."""
    paper = config() if config is not None else None
    for action in parser._actions:
        for sub in (action.choices.values() if isinstance(action, argparse._SubParsersAction) else ()):
            show_defaults(sub, config)
        default = action.default
        if default is None and paper is not None and hasattr(paper, action.dest):
            default = f"{getattr(paper, action.dest)} with --preset paper"
        if action.help not in (None, argparse.SUPPRESS) and default not in (None, argparse.SUPPRESS) \
                and "default" not in action.help and action.dest != "help":
            action.help += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    return parser

def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Flags every `train`/`eval` shares."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=None, help="default: the Config seed")
    parser.add_argument("--out-dir", default=None, help="default: runs/<script>/<stage>")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="NHWC layout (CUDA; on a CPU it speeds up eval and slows training)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the networks: the same math, compiled once per input shape")
    parser.add_argument("--log-every", type=at_least(1), default=100)
    parser.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1), help="data-loader workers")

def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(module) under --compile, else the module [ours]; unwrap() gives the module back (tested equal)."""
    return torch.compile(module) if enabled else module

def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags of every evaluation command."""
    parser.add_argument("--data", nargs="+", default=["Set5"], help="benchmark names or HR folders")
    parser.add_argument("--data-root", default="datasets", help="holds <Set>/HR/*.png")
    parser.add_argument("--protocol", default="gaussian8", choices=PROTOCOLS)
    parser.add_argument("--scale", type=at_least(2), default=4)
    parser.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--limit", type=at_least(1), default=None, help="only the first N images of each set")

def degrade_folder(hr_dir, out_dir, scale: int = 4, seed: int = 0) -> list[Path]:
    """x`scale` LR PNG of every HR image (modcropped) through the Real-ESRGAN pipeline, one draw per image seeded by
    (seed, file name): a held-out paired set degraded like the real-world training data, the same on any machine."""
    if Path(out_dir).resolve() == Path(hr_dir).resolve():
        raise UserError(f"--out {out_dir} is the HR folder: its images would be overwritten by their LR")
    written = []
    for n, path in enumerate(files := list_images(hr_dir), start=1):
        img_hr = torch.from_numpy(modcrop(load_uint8(path), scale)).permute(2, 0, 1)[None].float().div(255)
        if min(img_hr.shape[-2:]) < MIN_REALESRGAN_GT:
            raise UserError(f"{path} is {img_hr.shape[-1]}x{img_hr.shape[-2]}: the pipeline needs >= "
                            f"{MIN_REALESRGAN_GT} px")
        with torch.random.fork_rng(devices=[]):                  # on the CPU; the caller's RNG stream is untouched
            torch.manual_seed(eval_seed(f"realesrgan/{seed}/{path.stem}"))
            img_lr = realesrgan_degrade(img_hr, RealESRGANOptions(), scale)
        save_image(img_lr, written_path := Path(out_dir) / f"{path.stem}.png")
        written.append(written_path)
        print(f"  {n}/{len(files)} {path.name} -> {written_path}", flush=True)
    return written

def main(argv=None) -> None:
    """`baseline`: the bicubic-upsampling reference row of every method table; `realesrgan`: degrade a folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    baseline = sub.add_parser("baseline", help="evaluate bicubic upsampling under a protocol")
    add_eval_args(baseline)
    baseline.add_argument("--out-dir", default=None, help="also write results.csv/results.md here")
    degrade = sub.add_parser("realesrgan", help="write LR images of an HR folder made by the Real-ESRGAN pipeline")
    degrade.add_argument("--hr-dir", required=True, help="HR images (at least 74 px a side)")
    degrade.add_argument("--out", required=True, help="folder for the LR PNGs (same names)")
    degrade.add_argument("--scale", type=at_least(2), default=4, help="default 4")
    degrade.add_argument("--seed", type=int, default=0, help="with the file name, seeds each image's draw (default 0)")
    args = show_defaults(parser).parse_args(argv)
    with cli_errors():
        if args.command == "realesrgan":
            return degrade_folder(args.hr_dir, args.out, args.scale, args.seed)
        for data in args.data:
            rows = summarize(run_benchmark(bicubic_sr(args.scale), data, args.protocol, args.scale,
                                           args.data_root, limit=args.limit))
            report(rows, f"Bicubic x{args.scale} {args.protocol}", args.out_dir)


if __name__ == "__main__":
    main()
