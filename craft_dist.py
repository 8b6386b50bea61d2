"""Crafting Training Degradation Distribution for the Accuracy-Generalization Trade-off in Real-World SR.

Zhang, Gu, Chen, Dong, Zhang, Yang, ICML 2023, arXiv:2305.18107. The authors released no code: every choice
the paper leaves open is ours and tagged [ours]; README.md (craft_dist.py) lists them.

Idea: given ~100 degraded reference images of the target application, weight the 75 bins of a parametric
degradation space (blur sigma x noise level x JPEG quality) by the Frechet distance between deep features
of each bin's synthetic LR images and the references, then train an ordinary SR network with degradations
sampled from the weighted bins.

Paper map
    Eq. 2  x = JPEG_q((y * k_sigma)↓s + n_l)      -> degrade, gaussian_kernels_1d, blur_downsample, jpeg
    Sec. 3.3 binning, P(d) = sum_b p(d|b) p(b)    -> bin_shape, sample_bins, sample_in_bins
    Eq. 3  Frechet distance of deep features      -> frechet_distance (exact, sample space),
                                                     frechet_distance_gaussians (scipy sqrtm reference)
    Eq. 4  bin weights from normalised distances  -> bin_weights
    Sec. 3.5 feature extractor phi                -> AlexNetPhi (fc7), VGG19Phi (VGG_{2,2} / VGG_{5,4}),
                                                     EncoderPhi (a kdsr.py / redsr.py encoder: the DASR row)
    Tab. 1 test settings 1-4                      -> SETTINGS, evaluate_settings
    Tab. 2 SRResNet / RRDB backbones              -> MSRResNet, RRDBNet
    "weights" stage (Sec. 3.4)                    -> compute_weights (CLI `weights`)
    SR training with crafted weights              -> train_sr (CLI `train`)

Deviations / choices (all [ours] or [DEV]; README lists the [DEV] ones)
    [DEV] SR network = BasicSR's MSRResNet (no BatchNorm) with BasicSR's init (Kaiming normal x 0.1: the untrained
          network is close to the bilinear upsampler its output adds); L1 + BasicSR train_MSRResNet_x4 recipe, its
          EMA of the weights included (decay 0.999, what eval uses); the paper gives no recipe. 288 HR crops (72 LR,
          the paper's reference size).
    [DEV] phi defaults to a randomly initialised AlexNet (seed 0): ImageNet weights cannot be downloaded
          offline; pass them with --phi-weights (torchvision keys). The paper's default is ImageNet AlexNet.
    [DEV] training degradations are applied in the main process (blur/resize/noise batched on the training
          device, JPEG per sample through Pillow), not in data workers, drawn for the global batch from (seed, step)
          (common.StepRandom): N processes train what one does, and --resume is exact with any N.
    [ours] kernel 31x31, separable; MATLAB bicubic ↓4; colour noise (--gray-noise flag); Pillow JPEG 4:2:0, q rounded
          to an integer; phi = AlexNet fc7 after ReLU, ImageNet-normalised input (the paper names only the network);
          flat bin index b = (i_sigma * n_l + i_l) * n_q + i_q (= 15 i_sigma + 3 i_l + i_q), stored in weights.json.
    [ours] preset smoke (trials, not results): LR 16 / HR crops 64, so any photo >= 64 px, and phi = VGG_{2,2}, since
          AlexNet needs >= 63 px; every phi states its smallest side (min_side) and `weights` refuses a smaller LR size.
    Not implemented: phi = DASR itself (`--phi encoder:CKPT` takes a kdsr.py student or redsr.py model); LPIPS.

Usage
    python craft_dist.py refs --clean-dir photos/ --setting 3 --out-dir refs3      # synthetic references
    python craft_dist.py weights --ref-dir refs3 --clean-dir PIPAL/ --alpha 25 --out weights.json
    python craft_dist.py train --weights weights.json --data-dir DIV2K/train_HR     # omit --weights = baseline
    python craft_dist.py eval --ckpt runs/craft_dist/sr/last.pt --data Set5 Set14 --settings 1 2 3 4
    # --preset smoke on refs, weights and train: the same chain in seconds on a CPU, photos >= 64 px
    torchrun --nproc_per_node=2 craft_dist.py train ...   # DDP, --batch-size global (also `weights`); Ctrl-C/SIGTERM
                                                          # -> last.pt, --resume (with any number of processes)
"""
from __future__ import annotations

import argparse, copy, dataclasses, functools, importlib, io, json, math, os, time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

SCRIPT = "craft_dist"


# ---- 1. Config ------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0                                   # [ours]
    scale: int = 4                                  # [Sec. 4.1] x4
    # degradation space [Sec. 3.3]
    sigma_edges: tuple = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)          # [Sec. 3.3] sigma ~ U[0, 5], 5 bins
    noise_edges: tuple = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)     # [Sec. 3.3] l ~ U[0, 50], 5 bins
    quality_edges: tuple = (30.0, 50.0, 70.0, 90.0)              # [Sec. 3.3] q ~ U[30, 90], 3 bins
    kernel_size: int = 31                           # [ours] +-15 taps = 3 sigma at sigma = 5
    gray_noise: bool = False                        # [ours] colour noise by default
    # weights stage [Sec. 3.4-3.5]
    phi: str = "alexnet"                            # [Sec. 3.5] AlexNet; fc7 after ReLU [ours]
    alpha: float = 25.0                             # [Sec. 4.1]
    n_clean: int = 100                              # [Sec. 3.5] ~100 images
    lr_size: int = 72                               # [Sec. 3.5] 72x72 LR (HR crops 288)
    # model [Tab. 2]
    arch: str = "msrresnet"                         # [Tab. 2] SRResNet (BasicSR MSRResNet, [DEV]); or "rrdb"
    num_feat: int = 64                              # [ours] BasicSR MSRResNet / RRDBNet (no release to follow)
    num_block: int = 16                             # [ours] BasicSR MSRResNet
    rrdb_blocks: int = 23                           # [ours] BasicSR RRDBNet (= ESRGAN's)
    rrdb_growth: int = 32                           # [ours] BasicSR RRDBNet (= ESRGAN's)
    # SR training [ours] BasicSR train_MSRResNet_x4
    hr_patch: int = 288                             # [ours] LR 72 = the paper's image size
    batch_size: int = 16                            # [ours] BasicSR; global: N processes take batch / N
    steps: int = 1_000_000                          # [ours] BasicSR
    preset: str = "paper"                           # [ours] the preset the run started from (--resume checks it)
    learning_rate: float = 2e-4                     # [ours] BasicSR
    betas: tuple = (0.9, 0.99)                      # [ours] BasicSR
    restart_period: int = 250_000                   # [ours] BasicSR cosine restarts 4 x 250k
    eta_min: float = 1e-7                           # [ours] BasicSR
    ema_decay: float = 0.999                        # [ours] BasicSR EMA of the weights, eval uses it; 0 = none
    save_every: int = 5000                          # [ours]


PRESETS = {
    "paper": {},
    "smoke": {"n_clean": 6, "num_feat": 16, "num_block": 2, "rrdb_blocks": 1, "rrdb_growth": 8,
              "hr_patch": 64, "batch_size": 2, "steps": 4, "restart_period": 4, "save_every": 2,
              "ema_decay": 0.9,                                     # short runs: an EMA that has moved
              "lr_size": 16, "phi": "vgg19-2_2"},    # photos >= 64 px (HR crops 64); AlexNet needs >= 63 px LR
}


def make_config(preset: str | None, **overrides) -> Config:
    """Paper defaults, then the preset's overrides (None: paper), then explicit (non-None) overrides."""
    cfg = dataclasses.replace(Config(), **PRESETS[preset or "paper"], preset=preset or "paper")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# ---- 2. Degradation -------------------------------------------------------------------------------------
# Tab. 1: test distributions ((sigma lo, hi), (l lo, hi), (q lo, hi)), each uniform.
SETTINGS = {1: ((0.0, 1.0), (0.0, 10.0), (80.0, 90.0)), 2: ((0.5, 1.5), (15.0, 25.0), (75.0, 85.0)),
            3: ((1.5, 2.5), (5.0, 15.0), (75.0, 85.0)), 4: ((2.5, 3.5), (25.0, 35.0), (65.0, 75.0))}


def bin_shape(edges) -> tuple:
    """(n_sigma, n_l, n_q) bins from the three edge lists; 5 x 5 x 3 = 75 by default [Sec. 3.3]."""
    return tuple(len(e) - 1 for e in edges)


def sample_bins(weights: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """b ~ Categorical(w), n draws [Sec. 3.3]."""
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True,
                             generator=generator)


def _uniform_params(lo: torch.Tensor, hi: torch.Tensor, generator=None) -> dict:
    """lo, hi (3, B) -> sigma, l, q uniform [Sec. 3.3]; q then rounded to an integer [ours]."""
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    v = lo + u * (hi - lo)                                                        # (3, B)
    return {"sigma": v[0].float(), "noise": v[1].float(), "quality": v[2].round().long()}


def sample_in_bins(bins: torch.Tensor, edges, generator=None) -> dict:
    """Uniform inside each bin: b = (i_sigma * n_l + i_l) * n_q + i_q [ours] -> per-sample parameters."""
    shape = bin_shape(edges)
    idx = np.unravel_index(bins.numpy(), shape)                                  # row-major = our flat order
    lo = torch.tensor(np.stack([np.asarray(e, dtype=np.float64)[i] for e, i in zip(edges, idx)]))
    hi = torch.tensor(np.stack([np.asarray(e, dtype=np.float64)[i + 1] for e, i in zip(edges, idx)]))
    return _uniform_params(lo, hi, generator)


def sample_box(box, n: int, generator=None) -> dict:
    """n draws from one box of uniform distributions (a Tab. 1 setting)."""
    lo = torch.tensor([[b[0]] * n for b in box], dtype=torch.float64)
    hi = torch.tensor([[b[1]] * n for b in box], dtype=torch.float64)
    return _uniform_params(lo, hi, generator)


def gaussian_kernels_1d(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) normalised 1-D factors of k(x, y) ∝ exp(-(x² + y²) / 2σ²); σ < 1e-3 -> identity [ours]."""
    sigma = sigma.double().reshape(-1, 1)
    x = torch.arange(size, dtype=torch.float64, device=sigma.device) - size // 2
    k = torch.exp(-x**2 / (2 * sigma.clamp_min(1e-3) ** 2))
    k = torch.where(sigma < 1e-3, (x == 0).double().expand_as(k), k)
    return (k / k.sum(dim=1, keepdim=True)).float()


def blur_matrices(kernels_1d: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n) 1-D blur matrices, PyTorch 'reflect' padding folded in: K[b, i, r(i + t − p)] += k_b[t]."""
    b, k = kernels_1d.shape
    if n <= k // 2:
        raise common.UserError(f"image side {n} is too small for the {k}x{k} blur kernel (reflect padding)")
    taps = torch.arange(k, device=kernels_1d.device) - k // 2
    pos = (torch.arange(n, device=kernels_1d.device)[:, None] + taps).abs()
    pos = torch.where(pos > n - 1, 2 * (n - 1) - pos, pos)                       # (n, k) mirror, edge not repeated
    mats = torch.zeros(b, n, n, device=kernels_1d.device, dtype=kernels_1d.dtype)
    return mats.scatter_add_(2, pos.expand(b, n, k), kernels_1d[:, None, :].expand(b, n, k).contiguous())


@functools.lru_cache(maxsize=32)
def resize_matrix(n: int, scale: float, device: str) -> torch.Tensor:
    """(ceil(n·scale), n) matrix R of common.imresize along one axis, read off the identity basis."""
    # imresize(x) = R_H x R_Wᵀ; with x_i = e_i 1ᵀ (width 4) and rows of R_W summing to 1 it returns R_H e_i 1ᵀ
    basis = torch.eye(n, device=device)[:, :, None].expand(n, n, 4).contiguous()  # (n, n, 4)
    return common.imresize(basis, scale)[..., 0].T.contiguous()                  # (ceil(n·scale), n)


def blur_downsample(img: torch.Tensor, kernels_1d: torch.Tensor, scale: int) -> torch.Tensor:
    """(y ⊗ k_σ)↓s with per-sample separable kernels as two batched matrix products [ours]; equals
    common.blur (31x31 kernel, reflect padding) followed by common.imresize(1/s), ~5x faster on CPU."""
    b, c, h, w = img.shape
    kernels_1d = kernels_1d.to(img)
    rows = resize_matrix(h, 1 / scale, str(img.device)) @ blur_matrices(kernels_1d, h)   # (B, h/s, H)
    cols = resize_matrix(w, 1 / scale, str(img.device)) @ blur_matrices(kernels_1d, w)   # (B, w/s, W)
    return rows[:, None] @ img @ cols[:, None].transpose(-1, -2)                  # (B, C, H/s, W/s)


def jpeg(img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG_q [Eq. 2] per sample through Pillow (libjpeg, default 4:2:0) on 8-bit RGB [ours]."""
    arrays = img.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for arr, q in zip(arrays, quality.tolist()):                     # Pillow works on one image at a time
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(q))
        out.append(np.array(Image.open(buf).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(img.device).float().div(255)


def degrade(img_hr: torch.Tensor, params: dict, scale: int, kernel_size: int, gray_noise: bool = False,
            generator=None) -> torch.Tensor:
    """x = JPEG_q((y ⊗ k_σ)↓s + n_l) [Eq. 2]; img_hr (B, 3, H, W) -> (B, 3, H/s, W/s) 8-bit values. `generator`: a
    CPU torch.Generator, or in training the step's common.StepRandom (this rank's share of the global batch's ε)."""
    x = blur_downsample(img_hr, gaussian_kernels_1d(params["sigma"], kernel_size), scale)  # (B, 3, h, w)
    b, c, h, w = x.shape
    # n_l = l/255 · ε, ε ~ N(0, 1) per pixel (and channel unless gray); drawn on the CPU, then moved
    shape = (1 if gray_noise else c, h, w)
    eps = generator.randn(*shape) if isinstance(generator, common.StepRandom) else \
        torch.randn((b, *shape), generator=generator)
    eps = eps.to(x).expand(b, c, h, w)
    x = common.quantize(x + params["noise"].to(x).reshape(-1, 1, 1, 1) / 255 * eps)
    return jpeg(x, params["quality"])


# ---- 3. Networks ----------------------------------------------------------------------------------------
class AlexNetPhi(nn.Module):
    """AlexNet φ [Sec. 3.5] in torchvision's layout; φ(x) = fc7 after ReLU (4096-d) and ImageNet normalisation
    inside [ours]: the paper names the network, not the layer or the input scaling."""

    min_side = 63                                       # 63 -> 15 -> 7 -> 3 -> 1 px: the last 3x3 max-pool fits

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(9216, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features((x - self.mean) / self.std)                  # (B, 256, 1, 1) at 72x72 input
        x = torch.flatten(self.avgpool(x), 1)                          # (B, 9216)
        return self.classifier[:6](x)                                  # (B, 4096) fc7 after ReLU


class VGG19Phi(nn.Module):
    """torchvision VGG19 `features` up to a ReLU (index 8 = VGG_{2,2}, 35 = VGG_{5,4}: after activation [Sec. 3.5]),
    global-avg-pooled, ImageNet normalisation inside [ours]."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

    def __init__(self, last_index: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        layers, c_in = [], 3
        for v in self.CFG:
            if len(layers) > last_index:
                break
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(True)]
            c_in = c_in if v == "M" else v
        self.features = nn.Sequential(*layers[:last_index + 1])
        self.min_side = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.features)   # >= 1 px after each 2x2 pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std).mean(dim=(2, 3))    # (B, C)


class EncoderPhi(nn.Module):
    """φ = a trained degradation encoder, the analogue of the paper's DASR row [Tab. 2]: `encode(x)` maps LR images
    in [0, 1] (no ImageNet normalisation) to their degradation representation (B, C)."""

    min_side = 1               # kdsr.py's estimator: 3x3 convs + global pooling; redsr.py's represent() pads itself

    def __init__(self, net: nn.Module, encode):
        super().__init__()
        self.net, self.encode = net, encode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


@torch.no_grad()
def default_init_weights(module: nn.Module, scale: float) -> None:
    """BasicSR's init [ours]: every Conv2d below `module` W ~ N(0, 2 / fan_in) (Kaiming normal) times `scale`, bias 0;
    scale 0.1 keeps residual branches small at the start."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight).mul_(scale)
            nn.init.zeros_(m.bias)


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv + identity (BasicSR)."""

    def __init__(self, num_feat: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x), inplace=True)).add_(x)   # in place on fresh conv outputs: exact


class MSRResNet(nn.Module):
    """SRResNet without BN (BasicSR MSRResNet) x4: 1,517,571 parameters at 64 features, 16 blocks [DEV]. Every conv
    starts at Kaiming x 0.1 (BasicSR), so the untrained output is close to the bilinear upsampling it adds."""

    def __init__(self, num_feat: int = 64, num_block: int = 16, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise ValueError("MSRResNet is defined here for x4")
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat) for _ in range(num_block)])
        self.upconv1 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
        self.upconv2 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        default_init_weights(self, 0.1)                                           # all convs, as BasicSR

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.1, inplace=True)    # noqa: E731  (on fresh conv / shuffle outputs: exact)
        feat = self.body(act(self.conv_first(img_lr)))                            # (B, C, h, w)
        feat = act(F.pixel_shuffle(self.upconv1(feat), 2))                        # (B, C, 2h, 2w)
        feat = act(F.pixel_shuffle(self.upconv2(feat), 2))                        # (B, C, 4h, 4w)
        out = self.conv_last(act(self.conv_hr(feat)))                             # (B, 3, 4h, 4w)
        return out + F.interpolate(img_lr, scale_factor=4, mode="bilinear", align_corners=False)  # fp32 under --amp


class ResidualDenseBlock(nn.Module):
    """Five densely connected convs; out = x + 0.2 * conv5 (ESRGAN); Kaiming x 0.1 init (BasicSR: only these convs)."""

    def __init__(self, num_feat: int, growth: int):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4, self.conv5 = (
            nn.Conv2d(num_feat + i * growth, growth if i < 4 else num_feat, 3, 1, 1) for i in range(5))
        default_init_weights(self, 0.1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2, inplace=True))
        return self.conv5(torch.cat(feats, 1)).mul_(0.2).add_(x)       # x + 0.2 conv5, in place: exact


class RRDB(nn.Module):
    def __init__(self, num_feat: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(num_feat, growth) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))).mul_(0.2).add_(x)    # x + 0.2 rdb3(...), in place: exact


class RRDBNet(nn.Module):
    """ESRGAN generator (BasicSR names) x4: 16,697,987 parameters at 64 features, 23 RRDBs, growth 32; convs outside
    the dense blocks keep PyTorch's default init (BasicSR)."""

    def __init__(self, num_feat: int = 64, num_block: int = 23, growth: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, growth) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2, inplace=True)    # noqa: E731  (on fresh conv outputs: exact)
        feat = self.conv_first(img_lr)                                            # (B, C, h, w)
        feat = self.conv_body(self.body(feat)).add_(feat)
        feat = act(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = act(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(act(self.conv_hr(feat)))                            # (B, 3, 4h, 4w)


def build_sr(cfg: Config) -> nn.Module:
    """The SR network named by the config (MSRResNet or RRDBNet)."""
    if cfg.scale != 4:
        raise common.UserError(f"only x4 is implemented (the paper's setting), not x{cfg.scale}")
    if cfg.arch == "msrresnet":
        return MSRResNet(cfg.num_feat, cfg.num_block)
    if cfg.arch == "rrdb":
        return RRDBNet(cfg.num_feat, cfg.rrdb_blocks, cfg.rrdb_growth)
    raise common.UserError(f"unknown arch '{cfg.arch}'; expected msrresnet or rrdb")


# ---- 4. Losses ------------------------------------------------------------------------------------------
def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Squared Fréchet distance of Gaussian fits to two feature sets (n_a, c), (n_b, c) [Eq. 3].

    Exact for singular covariances (n < c), computed in sample space in float64 [ours]:
    tr((Σ_a Σ_b)^½) = ‖A Bᵀ‖_* / √((n_a − 1)(n_b − 1)) with A, B the centred feature matrices.
    """
    a, b = feat_a.double(), feat_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)                                             # (c,)
    A, B = a - mu_a, b - mu_b                                                     # (n_a, c), (n_b, c)
    # tr Σ = ‖A‖_F² / (n − 1)   (unbiased covariance, ddof 1)
    tr_a, tr_b = A.pow(2).sum() / (len(a) - 1), B.pow(2).sum() / (len(b) - 1)
    tr_sqrt = torch.linalg.svdvals(A @ B.T).sum() / math.sqrt((len(a) - 1) * (len(b) - 1))
    # D = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr((Σ_a^½ Σ_b Σ_a^½)^½)
    dist = (mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_sqrt
    return max(float(dist), 0.0)


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Reference path (pytorch-fid recipe): scipy sqrtm of Σ1 Σ2, ε·I added if not finite, real part [Eq. 3]."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, mu2, sigma1, sigma2))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(len(sigma1))
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def bin_weights(distances, alpha: float) -> torch.Tensor:
    """w_i = (exp((1 − D_norm,i)^α) − 1) / Σ_j (exp((1 − D_norm,j)^α) − 1), D min-max normalised [Eq. 4]"""
    d = torch.as_tensor(distances, dtype=torch.float64)
    span = d.max() - d.min()
    if span <= 0:                                                   # all bins equally far -> uniform [ours]
        return torch.full_like(d, 1 / len(d))
    d_norm = (d - d.min()) / span
    numer = torch.exp((1 - d_norm) ** alpha) - 1                   # α = 0: 0⁰ = 1 -> every bin e − 1
    return numer / numer.sum()


# ---- 5. Training ----------------------------------------------------------------------------------------
def clean_crops(dirs, n: int, crop: int, seed: int) -> torch.Tensor:
    """Y_w: n HR crops (n, 3, crop, crop), cycling over the images, positions from a fixed seed [Sec. 3.4]."""
    files = common.list_images(dirs)
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = common.load_uint8(files[i % len(files)])
        if min(img.shape[:2]) < crop:
            raise common.UserError(f"{files[i % len(files)]} is {img.shape[1]}x{img.shape[0]}, smaller than "
                                   f"the {crop}x{crop} clean crop (= {crop // 4} LR x 4)")
        top, left = rng.integers(img.shape[0] - crop + 1), rng.integers(img.shape[1] - crop + 1)
        crops.append(torch.from_numpy(np.ascontiguousarray(img[top:top + crop, left:left + crop])))
    return torch.stack(crops).permute(0, 3, 1, 2).float().div(255)


def load_references(ref_dir, size: int) -> torch.Tensor:
    """X_ref: every image centre-cropped to size x size -> (n, 3, size, size) [Sec. 3.5]."""
    imgs = []
    for path in common.list_images(ref_dir):
        img = common.load_uint8(path)
        if min(img.shape[:2]) < size:
            raise common.UserError(f"reference {path} is {img.shape[1]}x{img.shape[0]}; need at least {size}x{size}")
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        imgs.append(torch.from_numpy(np.ascontiguousarray(img[top:top + size, left:left + size])))
    if len(imgs) < 2:
        raise common.UserError(f"need at least 2 reference images in {ref_dir} (the paper uses ~100)")
    return torch.stack(imgs).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def features(phi: nn.Module, imgs: torch.Tensor, device, chunk: int = 64) -> torch.Tensor:
    """φ(x) for a stack of images, in eval mode (dropout off), float64 on the CPU: (n, c)."""
    phi.eval()
    return torch.cat([phi(imgs[i:i + chunk].to(device)).double().cpu() for i in range(0, len(imgs), chunk)])


def bin_seed(seed: int, b: int) -> int:
    """Fixed generator seed per bin so the 75 synthetic sets are reproducible [ours]."""
    return common.eval_seed(f"craft_dist/seed{seed}/bin{b}")


def bin_distances(phi, img_clean: torch.Tensor, feat_ref: torch.Tensor, cfg: Config, device,
                  dist=common.Dist()) -> torch.Tensor:
    """D_b = FD(φ(X_w^b), φ(X_ref)) for every bin b; X_w^b = D(Y_w, p(d|b)) [Eq. 3, Sec. 3.4].
    Under torchrun rank r computes bins r, r + world, ... (seeded per bin: the same D as one process)."""
    edges = (cfg.sigma_edges, cfg.noise_edges, cfg.quality_edges)
    n_bins, start = math.prod(bin_shape(edges)), time.perf_counter()
    d = torch.zeros(n_bins, dtype=torch.float64)
    for i, b in enumerate(range(dist.rank, n_bins, dist.world_size), 1):
        gen = torch.Generator().manual_seed(bin_seed(cfg.seed, b))
        params = sample_in_bins(torch.full((len(img_clean),), b), edges, gen)
        img_lr = degrade(img_clean.to(device), params, cfg.scale, cfg.kernel_size, cfg.gray_noise, gen)
        d[b] = frechet_distance(features(phi, img_lr, device), feat_ref)
        if dist.is_main and i % 15 == 0:
            print(f"  bins {b + 1}/{n_bins} ({time.perf_counter() - start:.1f}s)", flush=True)
    if dist.enabled:
        torch.distributed.all_reduce(d := d.to(device))              # sum: each bin comes from exactly one rank
    return d.cpu()


def compute_weights(ref_dir, clean_dirs, cfg: Config, phi_weights=None, device="cpu", dist=common.Dist()) -> dict:
    """The `weights` stage: references + clean set -> distances -> weights [Sec. 3.4, Eq. 3-4]."""
    phi = build_phi(cfg.phi, phi_weights).to(device)
    if cfg.lr_size < phi.min_side:                                  # before any image is read
        raise common.UserError(f"--phi {cfg.phi} needs LR images of at least {phi.min_side}x{phi.min_side}; --preset "
                               f"{cfg.preset} uses {cfg.lr_size}x{cfg.lr_size}: choose --phi vgg19-2_2 or "
                               f"--preset paper ({Config.lr_size}x{Config.lr_size} LR, photos >= "
                               f"{Config.lr_size * Config.scale} px)")
    img_ref = load_references(ref_dir, cfg.lr_size)                             # (n_ref, 3, 72, 72) paper
    img_clean = clean_crops(clean_dirs, cfg.n_clean, cfg.lr_size * cfg.scale, cfg.seed)   # (n, 3, 288, 288) paper
    feat_ref = features(phi, img_ref, device)
    distances = bin_distances(phi, img_clean, feat_ref, cfg, device, dist)
    weights = bin_weights(distances, cfg.alpha)
    return {"weights": weights.tolist(), "distances": distances.tolist(), "alpha": cfg.alpha,
            "sigma_edges": list(cfg.sigma_edges), "noise_edges": list(cfg.noise_edges),
            "quality_edges": list(cfg.quality_edges), "shape": list(bin_shape(
                (cfg.sigma_edges, cfg.noise_edges, cfg.quality_edges))),
            "index_order": "b = (i_sigma * n_noise + i_noise) * n_quality + i_quality",
            "phi": cfg.phi, "phi_weights": str(phi_weights) if phi_weights else None, "seed": cfg.seed,
            "n_clean": cfg.n_clean, "n_ref": len(feat_ref)}


def save_heatmap(weights, shape, path, cell: int = 24, gap: int = 8) -> None:
    """One 5x5 heat map per q bin (rows σ, columns l; dark = 0, yellow = max weight) [Fig. 4 style]."""
    w = np.asarray(weights, dtype=np.float64).reshape(shape)                     # (n_σ, n_l, n_q)
    t = w / max(w.max(), 1e-12)
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    pos = t * (len(anchors) - 1)
    lo = np.floor(pos).clip(0, len(anchors) - 2).astype(int)
    rgb = anchors[lo] + (pos - lo)[..., None] * (anchors[lo + 1] - anchors[lo])  # (n_σ, n_l, n_q, 3)
    panels = [np.kron(rgb[:, :, q], np.ones((cell, cell, 1))) for q in range(shape[2])]
    spacer = np.full((shape[0] * cell, gap, 3), 255.0)
    canvas = np.concatenate([x for p in panels for x in (p, spacer)][:-1], axis=1)
    Image.fromarray(canvas.round().astype(np.uint8)).save(path)


def load_weights_file(path) -> dict:
    """weights.json -> dict with a checked 'weights' list and the edges it was made with."""
    try:
        data = json.loads(Path(path).read_text())
        edges = (data["sigma_edges"], data["noise_edges"], data["quality_edges"])
        w = torch.tensor(data["weights"], dtype=torch.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise common.UserError(f"cannot read weights file {path}: {err}") from None
    if len(w) != math.prod(bin_shape(edges)) or (w < 0).any() or not math.isclose(float(w.sum()), 1, abs_tol=1e-6):
        raise common.UserError(f"{path}: need {math.prod(bin_shape(edges))} non-negative weights summing to 1")
    return {"weights": w, "edges": edges}


def make_sampler(cfg: Config, weights_path=None, oracle_setting=None, saved: dict | None = None):
    """(n, generator) -> params: crafted bins (weights file), uniform bins (baseline), or a Tab. 1 box; `saved` =
    the provenance a checkpoint stored, so that --resume draws from the run's own distribution, whatever the flags."""
    oracle_setting = saved.get("oracle_setting") if saved is not None else oracle_setting
    if oracle_setting is not None:                                  # "upper bound": train on the test setting
        return lambda n, g: sample_box(SETTINGS[oracle_setting], n, g), {"oracle_setting": oracle_setting}
    if saved is not None:
        spec = {"weights": torch.tensor(saved["weights"], dtype=torch.float64),
                "edges": tuple(map(tuple, saved["edges"]))}
    elif weights_path is not None:
        spec = load_weights_file(weights_path)
    else:                                                            # uniform bins = uniform space (baseline)
        edges = (cfg.sigma_edges, cfg.noise_edges, cfg.quality_edges)
        n_bins = math.prod(bin_shape(edges))
        spec = {"weights": torch.full((n_bins,), 1 / n_bins, dtype=torch.float64), "edges": edges}
    sampler = lambda n, g: sample_in_bins(sample_bins(spec["weights"], n, g), spec["edges"], g)  # noqa: E731
    return sampler, {"weights": spec["weights"].tolist(), "edges": [list(e) for e in spec["edges"]]}


def cosine_restart_factor(step: int, period: int, eta_ratio: float) -> float:
    """lr(t)/lr0 = η + ½(1 − η)(1 + cos(π (t mod P) / P)), BasicSR CosineAnnealingRestartLR [ours]."""
    return eta_ratio + 0.5 * (1 - eta_ratio) * (1 + math.cos(math.pi * (step % period) / period))


def train_step_lr(img_hr, sampler, rnd: common.StepRandom, cfg: Config) -> torch.Tensor:
    """This rank's b = B / N samples of one step, degraded: bins, (σ, l, q) and the noise fields ε are drawn for the
    whole global batch B by the step's StepRandom (seeded by (seed, step), on the CPU) and sliced, so sample i of step
    k is degraded alike with 1 or N processes and after --resume; JPEG (Pillow) is a function of image and q [ours]."""
    params = {k: v[rnd.part] for k, v in sampler(rnd.batch, rnd.generator).items()}   # (b,) each, of B drawn
    return degrade(img_hr, params, cfg.scale, cfg.kernel_size, cfg.gray_noise, rnd)   # (b, 3, P/4, P/4)


def build_training(cfg: Config, args, device, ckpt: dict | None):
    """Network, its EMA (None at decay 0), Adam and the cosine-restart schedule, restored from a --resume checkpoint
    (exact: training draws no global random numbers after the init) -> + start step."""
    if not 0 <= cfg.ema_decay < 1:
        raise common.UserError(f"--ema-decay {cfg.ema_decay}: expected 0 (no EMA) <= decay < 1")
    net = common.to_device(build_sr(cfg), device, args.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema_decay > 0 else None  # θ_ema = θ at step 0 (BasicSR)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas))
    eta_ratio = cfg.eta_min / cfg.learning_rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_restart_factor(s, cfg.restart_period, eta_ratio))
    if ckpt is None:
        return net, ema, optimizer, scheduler, 0
    net.load_state_dict(ckpt["model"])
    if ema is not None:                             # a checkpoint written without one: the EMA starts at θ
        ema.load_state_dict(ckpt.get("ema", ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return net, ema, optimizer, scheduler, ckpt["step"]


def train_sr(cfg: Config, args, saved: dict | None = None) -> Path:
    """Train MSRResNet/RRDBNet with L1 on degradations drawn from the crafted bins (stage `sr`). SIGINT/SIGTERM:
    finish the step, write last.pt, return; a non-finite loss (mean over ranks) stops before backward()."""
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)
    common.seed_everything(cfg.seed)                # the network's init, alike on every rank
    out_dir = Path(args.out_dir or f"runs/{SCRIPT}/sr")
    last = out_dir / "last.pt"
    sampler, provenance = make_sampler(cfg, args.weights, args.oracle_setting, saved)
    net, ema, optimizer, scheduler, start = build_training(cfg, args, device, saved)
    model = common.compiled(common.wrap_ddp(net, dist), args.compile)
    data = common.HRPatches(args.data_dir, cfg.hr_patch)
    # step k: items k·B … k·B + B − 1 of the global batch B, this rank's B / N of them (an error unless N | B)
    batches = common.infinite_batches(data, cfg.batch_size, device, seed=cfg.seed, start_step=start,
                                      workers=args.workers, dist=dist)
    log = common.RunLog(out_dir, cfg.steps, enabled=dist.is_main, start_step=start, batch=cfg.batch_size, dist=dist)
    last_good = args.resume or "(none written yet)"
    try:
        with common.stop_on_signals() as flag:
            for step in range(start + 1, cfg.steps + 1):
                img_hr = next(batches)                                                # (b, 3, P, P)
                rnd = common.StepRandom(cfg.seed, step, cfg.batch_size, dist, "cpu")  # same draws with 1 or N
                img_lr = train_step_lr(img_hr, sampler, rnd, cfg)                    # (b, 3, P/4, P/4)
                with common.autocast(device, args.amp):
                    img_sr = model(img_lr)
                # L1 [ours] BasicSR; mean over this rank's share: DDP's mean over ranks is the global batch's
                loss = F.l1_loss(img_sr.float(), img_hr)
                loss_mean = common.all_reduce_mean(loss.detach(), dist)               # same on every rank: all stop
                common.check_finite(loss_mean, step, last_good)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    common.ema_update(ema, net, cfg.ema_decay)     # once per iteration (BasicSR model_ema)
                if step % args.log_every == 0 or step == cfg.steps:
                    log.log(step, "sr", loss=float(loss_mean), lr=scheduler.get_last_lr()[0])
                stop = step < cfg.steps and common.stop_requested(flag, dist, device)   # collective under DDP
                # no RNG state to keep: data and degradations are functions of (seed, step), for any world size
                if dist.is_main and (step % cfg.save_every == 0 or step == cfg.steps or stop):
                    common.save_checkpoint(last, {
                        "script": SCRIPT, "stage": "sr", "step": step, "config": dataclasses.asdict(cfg),
                        "model": net.state_dict(), **({"ema": ema.state_dict()} if ema is not None else {}),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **provenance})
                last_good = last if step % cfg.save_every == 0 or stop else last_good
                if stop:
                    common.leave_on_signal(flag, step, last, dist)  # exit status 128 + signal
    finally:
        common.ddp_teardown(dist)
    return last


# ---- 6. Evaluation --------------------------------------------------------------------------------------
def setting_lr(img_hr: np.ndarray, setting: int, key: str, cfg: Config) -> torch.Tensor:
    """One deterministic degradation from a Tab. 1 setting, seeded by "{set}/{stem}/setting{k}" [P §1.5]."""
    gen = torch.Generator().manual_seed(common.eval_seed(f"{key}/setting{setting}/0"))
    hr = torch.from_numpy(np.ascontiguousarray(img_hr)).permute(2, 0, 1)[None].float().div(255)
    return degrade(hr, sample_box(SETTINGS[setting], 1, gen), cfg.scale, cfg.kernel_size, cfg.gray_noise, gen)


@torch.no_grad()
def evaluate_settings(sr_fns: dict, data, settings, cfg: Config, root, device, save_dir=None, limit=None):
    """{method: rows} over images x Tab. 1 settings; every method sees the same LR images [Tab. 2]."""
    set_name, files = common.find_benchmark(data, root)
    rows = {name: [] for name in sr_fns}
    for path in files[:limit]:
        img_hr = common.modcrop(common.load_uint8(path), cfg.scale)
        for k in settings:
            img_lr = setting_lr(img_hr, k, f"{set_name}/{path.stem}", cfg).to(device)
            for name, sr_fn in sr_fns.items():
                img_sr = common.to_uint8(sr_fn(img_lr))
                if img_sr.shape != img_hr.shape:
                    raise common.UserError(f"output {img_sr.shape[1]}x{img_sr.shape[0]} != HR "
                                           f"{img_hr.shape[1]}x{img_hr.shape[0]} for {path.name}")
                rows[name].append({"set": set_name, "image": path.stem, "degradation": f"setting{k}",
                                   "psnr": common.psnr_y(img_sr, img_hr, cfg.scale),
                                   "ssim": common.ssim_y(img_sr, img_hr, cfg.scale),
                                   "psnr_rgb": common.psnr_y(img_sr, img_hr, cfg.scale, rgb=True),  # the paper
                                   "ssim_rgb": common.ssim_y(img_sr, img_hr, cfg.scale, rgb=True)})  # says neither
                if save_dir is not None and name == "method":
                    common.save_image(img_sr, Path(save_dir) / set_name / f"setting{k}" / f"{path.stem}.png")
    return rows


def check_scale(asked: int, scale: int, source) -> None:
    if asked != scale:
        raise common.UserError(f"{source} is a x{scale} model but --scale {asked} was given: use --scale {scale}")


def load_sr_for_eval(args, device) -> tuple[nn.Module, str]:
    """Our checkpoint (network rebuilt from its config; its EMA weights when kept) or a BasicSR x4 .pth
    (--official-weights; params_ema before params); --scale checked."""
    if args.official_weights:
        check_scale(args.scale, 4, args.official_weights)
        net = common.to_device(load_basicsr_sr(args.official_weights), device, args.channels_last)
        return net.eval(), Path(args.official_weights).stem
    if not args.ckpt:
        raise common.UserError("eval needs --ckpt (a train checkpoint) or --official-weights (a BasicSR .pth)")
    ckpt = common.load_checkpoint(args.ckpt, SCRIPT, ("sr",), device)
    cfg = Config(**{k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__})
    check_scale(args.scale, cfg.scale, args.ckpt)
    net = common.to_device(build_sr(cfg), device, args.channels_last)
    net.load_state_dict(ckpt.get("ema") or ckpt["model"])              # the EMA when the run kept one (BasicSR)
    return net.eval(), f"{SCRIPT} {cfg.arch} step {ckpt['step']}{' EMA' if 'ema' in ckpt else ''}"


def run_eval(args) -> None:
    """Tab. 1 settings (default) or a common protocol (--settings with no value); bicubic reference row."""
    device = common.pick_device(args.device)
    net, title = load_sr_for_eval(args, device)
    net = common.compiled(net, args.compile)
    step = title.split(" ", 2)[-1]                                    # "step N" (+ " EMA") of our checkpoint
    source = f"{args.official_weights} (released)" if args.official_weights else f"{args.ckpt} ({step})"
    title += f" tile {args.tile}" if args.tile else ""
    cfg = make_config("paper", scale=args.scale)
    out_dir = common.writable_dir(args.out_dir or f"runs/{SCRIPT}/eval")   # all checked before the first image
    for data in args.data:
        common.find_benchmark(data, args.data_root)
    # .contiguous(): one memory layout, whole or tiled (common's Y metrics differ by 1 ulp between layouts)
    whole_image = lambda img_lr: net(img_lr).clamp(0, 1).contiguous()           # noqa: E731
    method = common.tiled(whole_image, args.scale, args.tile, args.tile_overlap)
    sr_fns = {"method": method, "bicubic": common.bicubic_sr(args.scale)}       # bicubic: whole image always
    for data in args.data:
        save_dir = out_dir / "images" if args.save_images else None
        if args.settings:
            rows = evaluate_settings(sr_fns, data, args.settings, cfg, args.data_root, device, save_dir, args.limit)
        else:
            rows = {name: common.run_benchmark(fn, data, args.protocol, args.scale, args.data_root, device,
                                               save_dir if name == "method" else None, args.limit,
                                               title if name == "method" else "bicubic")
                    for name, fn in sr_fns.items()}
        set_name = common.find_benchmark(data, args.data_root)[0]
        protocol = "settings" if args.settings else args.protocol
        for name, label, model in (("method", title, source), ("bicubic", "bicubic", "")):   # Tab. 1 rows: + RGB
            common.report(common.summarize(rows[name]), f"{label} x{args.scale} {protocol} {set_name}", out_dir, model,
                          args.limit)
    print(f"\nresults: {out_dir / 'results.md'}")


# ---- 7. Official weights --------------------------------------------------------------------------------
def strict_load(module: nn.Module, state: dict, source, ignore_prefixes=()) -> nn.Module:
    """load_state_dict with one clear error naming missing, unexpected and mis-shaped keys (first few)."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    ours = module.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} vs ours {tuple(ours[k].shape)}"
              for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:4])}"
                for name, keys in (("missing", missing), ("unexpected", extra), ("shape mismatch", shapes)) if keys]
    if problems:
        raise common.UserError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _read_state_dict(path, wrappers=("state_dict", "params_ema", "params", "model")) -> dict:
    """A plain tensor dict from a .pth, unwrapping one level of the usual container keys."""
    if not Path(path).is_file():
        raise common.UserError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise common.UserError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from None
    if isinstance(obj, dict) and "script" in obj:                   # one of our checkpoints, not a weights file
        raise common.UserError(f"{path} is a {obj['script']}.py checkpoint, not a torchvision/BasicSR weights file"
                               + (" (pass it to eval as --ckpt)" if obj["script"] == SCRIPT else ""))
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise common.UserError(f"{path} does not hold a state dict of tensors")
    return obj


def load_encoder_phi(path) -> EncoderPhi:
    """`encoder:PATH`: a kdsr.py student's D′ (4C) or a redsr.py model's f (C), built by that script's own loader
    (imported only for this option) [ours]."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a missing or unreadable file is reported below
        ckpt = None
    if not isinstance(ckpt, dict) or ckpt.get("script") not in ("kdsr", "redsr"):
        raise common.UserError(f"--phi encoder:{path}: expected a kdsr.py student or redsr.py checkpoint file")
    loader = importlib.import_module(ckpt["script"]).load_for_inference
    args = argparse.Namespace(ckpt=path, official_weights=None, scale=ckpt["config"]["scale"], channels_last=False)
    net = loader(args, "cpu")[0]
    return EncoderPhi(net, (lambda x: net.estimate(x)[1]) if ckpt["script"] == "kdsr" else net.represent)


def build_phi(name: str, weights_path=None) -> nn.Module:
    """φ by name; torchvision-keyed weights from --phi-weights (strict), else random init with seed 0."""
    if name.startswith("encoder:"):
        if weights_path is not None:
            raise common.UserError("--phi-weights is for alexnet and vgg19; --phi encoder:PATH brings its own weights")
        return load_encoder_phi(name.removeprefix("encoder:")).eval()
    state = _read_state_dict(weights_path) if weights_path is not None else None   # fail fast on a bad file
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)                                        # alexnet-random: seed 0 [ours]
        if name == "alexnet":
            phi, ignore = AlexNetPhi(), ()
        elif name in ("vgg19-2_2", "vgg19-5_4"):
            last = 8 if name == "vgg19-2_2" else 35
            phi = VGG19Phi(last)
            ignore = ("classifier.",) + tuple(f"features.{i}." for i in range(last + 1, 37))
        else:
            raise common.UserError(f"unknown phi '{name}'; expected alexnet, vgg19-2_2, vgg19-5_4 or encoder:PATH")
    if state is not None:
        strict_load(phi, state, weights_path, ignore)
    elif name != "alexnet":
        print(f"warning: {name} without --phi-weights is randomly initialised", flush=True)
    return phi.eval()


def load_basicsr_sr(path) -> nn.Module:
    """A BasicSR MSRResNet_x4 / RRDBNet_x4 .pth ({'params': ...}): architecture read off the keys, strict."""
    state = _read_state_dict(path)
    if "conv_first.weight" not in state:
        raise common.UserError(f"{path} is not a BasicSR MSRResNet/RRDBNet state dict (no conv_first.weight)")
    num_feat = state["conv_first.weight"].shape[0]
    blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("body.")), default=-1)
    if "body.0.rdb1.conv1.weight" in state:
        growth = state["body.0.rdb1.conv1.weight"].shape[0]
        return strict_load(RRDBNet(num_feat, blocks, growth), state, path)
    return strict_load(MSRResNet(num_feat, blocks), state, path)


# ---- 8. CLI ---------------------------------------------------------------------------------------------
def run_weights(args) -> None:
    """`weights`: write weights.json (weights, distances, edges, order) and a heat-map PNG."""
    cfg = make_config(args.preset, seed=args.seed, alpha=args.alpha, phi=args.phi, n_clean=args.n_clean,
                      sigma_edges=_edges(args.sigma_edges), noise_edges=_edges(args.noise_edges),
                      quality_edges=_edges(args.quality_edges))
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)                                  # torchrun: the bins are split over the ranks
    result = compute_weights(args.ref_dir, args.clean_dir, cfg, args.phi_weights, device, dist)
    common.ddp_teardown(dist)
    if not dist.is_main:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    save_heatmap(result["weights"], result["shape"], out.with_suffix(".png"))
    top = np.argsort(result["weights"])[::-1][:5]
    coords = [tuple(int(i) for i in np.unravel_index(b, result["shape"])) for b in top]
    print("top bins (i_sigma, i_l, i_q): "
          + ", ".join(f"{c} {result['weights'][b]:.3f}" for c, b in zip(coords, top)))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _edges(values):
    if values is not None and (len(values) < 2 or any(b <= a for a, b in zip(values, values[1:]))):
        raise common.UserError(f"bin edges must be at least two increasing numbers, got {values}")
    return tuple(values) if values is not None else None


def run_refs(args) -> None:
    """`refs`: synthesise reference LR images (lr_size: 72x72 paper, 16x16 smoke) from a Tab. 1 setting or one bin
    [Sec. 4.1]."""
    cfg = make_config(args.preset, seed=args.seed)
    gen = torch.Generator().manual_seed(common.eval_seed(f"craft_dist/refs/{cfg.seed}"))
    if args.bin is not None:
        shape = bin_shape(edges := (cfg.sigma_edges, cfg.noise_edges, cfg.quality_edges))
        if not all(0 <= i < n for i, n in zip(args.bin, shape)):
            raise common.UserError(f"--bin {args.bin} is outside the bin grid {shape} (0-based indices per axis)")
        params = sample_in_bins(torch.full((args.n,), int(np.ravel_multi_index(args.bin, shape))), edges, gen)
    else:
        params = sample_box(SETTINGS[args.setting], args.n, gen)
    # Y_w's crop positions (seed) or others (seed + 1); the degradation draws are fresh either way [ours]
    crop_seed = cfg.seed if args.same_crops else cfg.seed + 1
    img_clean = clean_crops(args.clean_dir, args.n, cfg.lr_size * cfg.scale, crop_seed)
    img_lr = degrade(img_clean, params, cfg.scale, cfg.kernel_size, cfg.gray_noise, gen)
    for i, img in enumerate(img_lr):
        common.save_image(img, Path(args.out_dir) / f"ref{i:04d}.png")
    print(f"wrote {len(img_lr)} references of {img_lr.shape[-1]}x{img_lr.shape[-2]} to {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lr, small = Config.lr_size, PRESETS["smoke"]["lr_size"]
    sizes = lambda side: f"{side * lr}x{side * lr} ({side * small}x{side * small} with --preset smoke)"  # noqa: E731
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("weights", help="bin weights from reference LR images [Sec. 3.4]")
    w.add_argument("--ref-dir", required=True, help=f"real (or synthetic) degraded LR images, >= {sizes(1)}")
    w.add_argument("--clean-dir", required=True, nargs="+", help=f"clean HR images Y_w, >= {sizes(4)}")
    w.add_argument("--out", default=f"runs/{SCRIPT}/weights/weights.json", help="also writes <out>.png")
    w.add_argument("--alpha", type=common.at_least(0, float), help="Eq. 4 exponent (0 = uniform)")
    w.add_argument("--phi", default=None, help="alexnet (default; vgg19-2_2 with --preset smoke: AlexNet needs >= 63 "
                   "px), vgg19-2_2, vgg19-5_4 (>= 16 px), or encoder:CKPT (a kdsr.py "
                   "student or redsr.py checkpoint: its degradation representation, the paper's DASR row)")
    w.add_argument("--phi-weights", default=None, help="torchvision state dict for φ (random init, seed 0, if absent)")
    w.add_argument("--n-clean", type=common.at_least(1), default=None, help=f"clean {sizes(4)} crops Y_w (paper ~100)")
    for name in ("sigma", "noise", "quality"):
        w.add_argument(f"--{name}-edges", type=float, nargs="+", default=None)
    r = sub.add_parser("refs", help="synthesise reference LR images from a Tab. 1 setting or a bin")
    r.add_argument("--clean-dir", required=True, nargs="+")
    r.add_argument("--out-dir", required=True)
    group = r.add_mutually_exclusive_group(required=True)
    group.add_argument("--setting", type=int, choices=sorted(SETTINGS))
    group.add_argument("--bin", type=common.at_least(0), nargs=3, metavar=("I_SIGMA", "I_L", "I_Q"))
    r.add_argument("--n", type=common.at_least(1), default=100)
    r.add_argument("--same-crops", action=argparse.BooleanOptionalAction, default=False,
                   help="crop the clean images where `weights` crops Y_w (same --clean-dir and --seed; the first --n "
                   "of them): same-content validation. Default: other crop positions")
    t = sub.add_parser("train", help="train the SR network with crafted (or uniform) degradations")
    t.add_argument("--stage", choices=["sr"], default="sr")
    t.add_argument("--data-dir", required=True, nargs="+", help="HR training folders (DIV2K train)")
    source = t.add_mutually_exclusive_group()
    source.add_argument("--weights", default=None, help="weights.json from `weights` (omit = uniform baseline)")
    source.add_argument("--oracle-setting", type=int, choices=sorted(SETTINGS), help="upper bound: train on Tab. 1")
    t.add_argument("--arch", choices=["msrresnet", "rrdb"], default=None)
    t.add_argument("--steps", type=common.at_least(1), default=None)
    t.add_argument("--batch-size", type=common.at_least(1), default=None,
                   help="global batch (default 16): N torchrun processes take batch / N each and train what one does")
    t.add_argument("--ema-decay", type=common.at_least(0, float), default=None,
                   help="EMA of the weights that eval uses (default 0.999, BasicSR; 0 = none, eval the weights)")
    t.add_argument("--save-every", type=common.at_least(1), default=None)
    t.add_argument("--gray-noise", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue a run with its own config and distribution (default <out-dir>/last.pt)")
    common.add_run_args(t)
    e = sub.add_parser("eval", help="evaluate on Tab. 1 settings or a common protocol, plus bicubic")
    e.add_argument("--ckpt", default=None)
    e.add_argument("--official-weights", default=None, help="BasicSR MSRResNet/RRDBNet x4 .pth")
    e.add_argument("--settings", type=int, nargs="*", choices=sorted(SETTINGS), default=[1, 2, 3, 4],
                   help="Tab. 1 settings; give the flag with no value to use --protocol instead")
    e.add_argument("--tile", type=common.at_least(0), default=0, help="super-resolve LR tiles of N px to bound "
                   "memory (default 0: whole image). Equal to the whole-image output only where --tile-overlap covers "
                   "the receptive field (paper MSRResNet 35 LR px, RRDBNet ~350). MSRResNet/RRDBNet estimate no "
                   "degradation; a degradation estimator that pools globally would see one tile at a time, so its "
                   "tiled output differs from the whole-image output unless the tile covers the image")
    e.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    common.add_eval_args(e)
    common.add_run_args(e)
    for p in (w, r, t):
        p.add_argument("--preset", choices=sorted(PRESETS), help=f"paper (default) or smoke: a tiny model for trials, "
                       f"LR {small}x{small} / HR {small * 4}x{small * 4} (any photo >= {small * 4} px), φ vgg19-2_2")
    for p in (w, r):
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--seed", type=int, default=None)
    return common.show_defaults(parser, Config)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command in ("refs", "eval") and int(os.environ.get("RANK", 0)):   # torchrun: these run on rank 0
        return
    with common.cli_errors():
        if args.command == "weights":
            run_weights(args)
        elif args.command == "refs":
            run_refs(args)
        elif args.command == "train":
            saved = None
            if args.resume:                # the run's own config and distribution; only --steps may change
                args.resume = Path(args.out_dir or f"runs/{SCRIPT}/sr", "last.pt") if args.resume == "last" \
                    else args.resume
                flags = {"seed": args.seed, "arch": args.arch, "batch_size": args.batch_size, "preset": args.preset,
                         "save_every": args.save_every, "gray_noise": args.gray_noise, "ema_decay": args.ema_decay}
                cfg = Config(**(saved := common.resumed(args.resume, SCRIPT, ("sr",), args.steps, flags))["config"])
            else:
                cfg = make_config(args.preset, seed=args.seed, arch=args.arch, steps=args.steps,
                                  batch_size=args.batch_size, save_every=args.save_every, gray_noise=args.gray_noise,
                                  ema_decay=args.ema_decay)
            train_sr(cfg, args, saved)
        else:
            run_eval(args)


if __name__ == "__main__":
    main()
