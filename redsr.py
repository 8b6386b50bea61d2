"""ReDSR: Preserving Full Degradation Details for Blind Image Super-Resolution (re-degradation + energy distance).

Liu et al., ECCV 2024, arXiv 2407.01299. Official code: Chernobyllight/ReDSR (x4 only), built on DASR.
One joint training stage; encoder + generator at inference.

Paper map (paper element -> symbol here)
    Eq. 1  degradation model, Sec. 4.1 ranges      -> sample_degradations, degrade_pairs
    Eq. 2  encoder f = E(I1_LR), f in R^C          -> Encoder
    Eq. 3  degrader I2_LR^ = D(I2_HR, f)           -> Degrader (DAConv / DABlock, reflection-padded variant)
    Eq. 4  re-degradation loss L_RD                -> re_degradation_loss
    Eq. 5  energy distance L_ED to a prior         -> energy_distance, sample_prior
    Eq. 6  generator I1_SR = G(I1_LR, f) (DASR)    -> Generator, DAGroup, DABlock, DAConv (dynamic_depthwise)
    Eqs. 7-8 modulated loss, W = 2 / (1 + C^-1)    -> modulation_weight, sr_loss
    Eq. 9  L = lambda1 L_ED + L_RD + L_SR          -> training_step
    Sec. 4.1 two crops per image, 16 pairs, Adam   -> degrade_pairs, train
    Tab. 2 ablations (Models 1-8)                  -> Config.use_rd/use_ed/ed_dist/kl_instead_of_ed/modulation
    Fig. 9 representations vs prior samples        -> embed (PCA scatter drawn with Pillow)
    Tabs. 1, 3, 4 evaluation                       -> evaluate (common.run_benchmark protocols)

Deviations (each [DEV] is listed in the README):
    - [DEV] architecture follows the release, not the prose: six-conv encoder (4x4 s2 / 5x5 s1, reflection pad,
      PReLU) and a 3-block degrader with a stride-4 conv tail; only this gives the paper's 6.28M.
    - [DEV] L_ED is the release's V-statistic divided by C (Eq. 5 has no 1/C); lambda1 = 0.01 was tuned with it.
    - [DEV] Eqs. 7-8 per sample and on by default (the release computes a different, disabled weight).
    - [DEV] uniform prior U[-sqrt3, sqrt3] and exponential prior Exp(1) (unit variance; the paper names them only).
    - [DEV] KL variant (Tab. 2 Model 7): KL between the batch's diagonal Gaussian fit and N(0, I), divided by C.
    - [DEV] one Adam over E + D + G (release: three identical Adams, exactly equivalent); schedule in steps.
    - [DEV] flips/transposes of the HR crops before degradation (release: none).
    - [DEV] an LR side < 24 px is replicate-padded for the encoder only (E needs 24 px; evaluation on tiny images).
    - [DEV] ReDSR-L (preset "large") is inferred as 5 groups x 10 blocks (10,433,828 parameters).

Usage:
    python redsr.py train --data-dir DIV2K/HR Flickr2K/HR --degradation iso
    python redsr.py train --data-dir DIV2K/HR --degradation aniso_noise --out-dir runs/redsr/aniso
    python redsr.py eval --ckpt runs/redsr/joint/last.pt --data Set5 Set14 --protocol gaussian8
    python redsr.py eval --official-weights setting1_ckp.tar --data Set5
    python redsr.py eval --ckpt runs/redsr/joint/last.pt --data Urban100 --tile 128  # bounded memory; E sees one tile
    python redsr.py embed --ckpt runs/redsr/joint/last.pt --data Set5 --out embed.png
    torchrun --nproc_per_node=4 redsr.py train --data-dir DF2K/HR
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "redsr"
STAGES = ("joint",)
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # [official code] DASR MeanShift, rgb_range 1


# ---- 1. Config ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0                    # [ours]
    save_every: int = 5000           # [ours] checkpoint period (steps)
    # data
    scale: int = 4                   # [Sec. 4.1] x4 only, as the release
    lr_patch: int = 64               # [Sec. 4.1] LR patch 64 -> HR crops of 256
    batch_size: int = 16             # [Sec. 4.1] 16 images -> 32 patch pairs; global (N processes: 16 / N each)
    augment: bool = True             # [ours, DEV] flips/transposes of the HR crops (release: none)
    degradation: str = "iso"         # [Sec. 4.1] "iso" (setting 1) | "aniso_noise" (setting 2)
    kernel_size: int = 21            # [Sec. 4.1]
    sigma_min: float = 0.2           # [Sec. 4.1] kernel width / lambda range U[0.2, 4.0]
    sigma_max: float = 4.0           # [Sec. 4.1]
    noise_max: float = 25.0          # [Sec. 4.1] sigma_n ~ U[0, 25] (release config: 30)
    # model
    rep_dim: int = 64                # [official code] C, size of f (Sec. 3.2.1 names C, not its value)
    enc_width: int = 64              # [official code] encoder widths w, w, 2w, 2w, 4w, C
    n_feats: int = 64                # [official code] generator / degrader width (= code size)
    n_groups: int = 5                # [official code] DA groups in G
    n_blocks: int = 5                # [official code] DA blocks per group (ReDSR-L: 10, inferred)
    deg_blocks: int = 3              # [official code] DA blocks in D
    # losses (Tab. 2 switches)
    use_rd: bool = True              # [Eq. 4] re-degradation loss (D is not built when off)
    use_ed: bool = True              # [Eq. 5] energy distance to the prior
    ed_dist: str = "gaussian"        # [Tab. 2] gaussian | uniform | exponential
    kl_instead_of_ed: bool = False   # [Tab. 2] Model 7 ([ours] definition)
    modulation: bool = True          # [Eqs. 7-8] Model 8
    lambda_ed: float = 0.01          # [Eq. 9] lambda1
    ed_samples: int = 64             # [Sec. 4.1] m
    sr_weight: float = 1.0           # [Eq. 9] L1 weight when unmodulated (release: 2.0)
    # optimisation
    learning_rate: float = 1e-4      # [Sec. 4.1]
    beta1: float = 0.9               # [Sec. 4.1]
    beta2: float = 0.999             # [Sec. 4.1]
    steps: int = 216_000             # [Sec. 4.1] 1000 epochs x 216 it (3450 DF2K images / 16)
    lr_halve_every: int = 43_200     # [Sec. 4.1] halve every 200 epochs
    preset: str = "paper"            # [ours] the preset the run started from (a label --resume checks)


PRESETS = {
    "paper": {},
    "large": {"n_blocks": 10},       # ReDSR-L, layout inferred from Tab. 1's 10.43M
    "smoke": {"lr_patch": 24, "batch_size": 2, "rep_dim": 16, "enc_width": 8, "n_feats": 16, "n_groups": 1,
              "n_blocks": 1, "deg_blocks": 1, "ed_samples": 16, "steps": 30, "lr_halve_every": 1000,
              "save_every": 1000, "learning_rate": 1e-3},
}
ED_DISTS = ("gaussian", "uniform", "exponential")
DEGRADATIONS = ("iso", "aniso_noise")


def check_config(cfg: Config) -> None:
    """Refuse settings that cannot run (one error line each)."""
    if cfg.scale != 4:
        raise common.UserError(f"ReDSR is x4 only (the degrader's stride-4 tail); got scale {cfg.scale}")
    if cfg.degradation not in DEGRADATIONS:
        raise common.UserError(f"--degradation must be one of {DEGRADATIONS}, got {cfg.degradation!r}")
    if cfg.ed_dist not in ED_DISTS:
        raise common.UserError(f"--ed-dist must be one of {ED_DISTS}, got {cfg.ed_dist!r}")
    if cfg.modulation and not cfg.use_rd:
        raise common.UserError("the modulated loss needs the degrader's output: use --no-modulation with --no-rd")
    if cfg.kl_instead_of_ed and not cfg.use_ed:
        raise common.UserError("--kl-instead-of-ed replaces the ED term: it cannot be combined with --no-ed")
    if cfg.lr_patch < 24:
        raise common.UserError(f"the encoder needs LR patches of at least 24 px, got {cfg.lr_patch}")


# ---- 2. Degradation ----------------------------------------------------------------------------------------
def sample_degradations(rnd: common.StepRandom, kind: str, sigma_min: float, sigma_max: float, noise_max: float,
                        kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One kernel k_b and one noise level sigma_b per item [Sec. 4.1], drawn by the step's StepRandom, so item i of
    step k is degraded alike with any number of processes [ours]."""
    def uniform(lo, hi):
        return lo + (hi - lo) * rnd.rand()
    if kind == "iso":
        # setting 1: sigma ~ U[0.2, 4.0], no noise [Sec. 4.1]
        return common.isotropic_kernels(uniform(sigma_min, sigma_max), kernel_size), None
    # setting 2: lambda1, lambda2 ~ U[0.2, 4.0], theta ~ U[0, pi), sigma_n ~ U[0, 25] [Sec. 4.1]
    lambda1, lambda2 = uniform(sigma_min, sigma_max), uniform(sigma_min, sigma_max)
    kernels = common.anisotropic_kernels(lambda1, lambda2, uniform(0.0, math.pi), kernel_size)
    return kernels, uniform(0.0, noise_max)


@torch.no_grad()
def degrade_pairs(pairs_hr: torch.Tensor, kernels: torch.Tensor, noise: torch.Tensor | None, scale: int,
                  rnd: common.StepRandom):
    """Two crops of one HR image, same k_b and sigma_b, own noise draw each [Sec. 4.1, Eq. 1].

    pairs_hr (B, 2, 3, P, P) -> img1_lr, img1_hr (crop 1: E and G), img2_lr, img2_hr (crop 2: D).
    """
    # I_LR = Q((I_HR * k_b) down4 + sigma_b eps) [Eq. 1]; crop 1's noise field is drawn first, then crop 2's
    img1_lr, img2_lr = (common.degrade(pairs_hr[:, i], kernels, scale, noise, generator=rnd) for i in (0, 1))
    return img1_lr, pairs_hr[:, 0], img2_lr, pairs_hr[:, 1]


# ---- 3. Networks -------------------------------------------------------------------------------------------
def _conv3x3(cin: int, cout: int, reflect: bool) -> nn.Module:
    """3x3 conv with bias; zero padding (G) or reflection padding (D) [official code]."""
    if reflect:
        return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3))
    return nn.Conv2d(cin, cout, 3, padding=1)


class Encoder(nn.Module):
    """Degradation encoder E [Eq. 2]: six convs (4x4 s2 / 5x5 s1), reflection pad, PReLU, global pooling.

    The release's layout, not the prose's "five 5x5 convs" [official code]. (B, 3, h, w) -> f (B, C).
    """
    min_side = 24  # the last reflection pad of 2 needs 3 px at 1/8 scale

    def __init__(self, width: int = 64, rep_dim: int = 64):
        super().__init__()
        chans = (3, width, width, 2 * width, 2 * width, 4 * width, rep_dim)
        layers = []
        for i in range(6):
            kernel, stride, pad = (4, 2, 1) if i % 2 == 0 else (5, 1, 2)
            layers += [nn.ReflectionPad2d(pad), nn.Conv2d(chans[i], chans[i + 1], kernel, stride), nn.PReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        if min(img_lr.shape[-2:]) < self.min_side:
            raise ValueError(f"Encoder needs an LR side >= {self.min_side} px, got {img_lr.shape[-1]}x{img_lr.shape[-2]}")
        return self.body(img_lr).mean(dim=(2, 3))  # (B, C)


# the per-sample depthwise conv of DAConv (the docstring's [Eq. 5] is KDSR's, whose IDR-DDC is the same operation)
# Copied from kdsr.py:dynamic_depthwise
def dynamic_depthwise(x: torch.Tensor, weight: torch.Tensor, reflect: bool = False, taps: bool | None = None):
    """F_out[b, i] = F_in[b, i] (x) W[b, i] per sample b and channel i [Eq. 5]; x (B, C, h, w), W (B, C, k, k), zero
    (or reflect) padding k // 2, out in x's layout. Two exact forms [ours]: one grouped conv over B*C groups (the
    definition, faster in eager), or tap by tap, sum_pq W[b,i,p,q] x_pad[b,i,p:p+h,q:q+w] (when compiling on CUDA)."""
    b, c, h, w = x.shape
    k, pad = weight.shape[-1], (weight.shape[-1] // 2,) * 4
    if (x.is_cuda and torch.compiler.is_compiling()) if taps is None else taps:
        x = F.pad(x, pad, mode="reflect" if reflect else "constant")
        return sum(x[..., p:p + h, q:q + w] * weight[..., p, q, None, None] for p in range(k) for q in range(k))
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    x, padding = (F.pad(x, pad, mode="reflect"), 0) if reflect else (x, k // 2)
    x = x if b == 1 else x.reshape(1, b * c, *x.shape[-2:])   # batch 1 as is: a view could lose channels_last strides
    out = F.conv2d(x, weight.reshape(b * c, 1, k, k), padding=padding, groups=b * c)
    return out if b == 1 else out.reshape(b, c, h, w).contiguous(memory_format=layout)


class DAConv(nn.Module):
    """Degradation-aware conv [official code, DASR]: per-sample depthwise kernel from z + channel attention.

    G variant: zero padding, 1x1 mixing conv, reduction 8. D variant (reflect=True): reflection padding,
    3x3 reflection-padded mixing conv, reduction 4, attention convs initialised N(0, 0.02^2).
    """

    def __init__(self, channels: int, reduction: int = 8, reflect: bool = False, kernel_size: int = 3):
        super().__init__()
        self.channels, self.kernel_size, self.reflect = channels, kernel_size, reflect
        self.kernel = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.PReLU(),
                                    nn.Linear(channels, channels * kernel_size ** 2, bias=False))
        self.conv = _conv3x3(channels, channels, True) if reflect else nn.Conv2d(channels, channels, 1)
        self.attention = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.PReLU(),
                                       nn.Conv2d(channels // reduction, channels, 1, bias=False), nn.Sigmoid())
        self.prelu = nn.PReLU()
        if reflect:
            for i in (0, 2):
                nn.init.normal_(self.attention[i].weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        k = self.kernel_size
        kernels = self.kernel(z).view(b, c, k, k)  # (B, C, k, k): channel c uses outputs 9c..9c+8, row-major
        # per-sample depthwise cross-correlation (zero or reflection padding)
        out = self.conv(self.prelu(dynamic_depthwise(x, kernels, reflect=self.reflect)))  # (B, C, h, w)
        # + channel attention x * sigmoid(W2 PReLU(W1 z)), added in place to the conv's fresh output (exact)
        return out.add_(x * self.attention(z[:, :, None, None]))


class DABlock(nn.Module):
    """DA block: y = conv(PReLU(DAconv(PReLU(conv(PReLU(DAconv(x, z)))), z))) + x [official code, DASR]."""

    def __init__(self, channels: int, reduction: int = 8, reflect: bool = False):
        super().__init__()
        self.da_conv1 = DAConv(channels, reduction, reflect)
        self.conv1 = _conv3x3(channels, channels, reflect)
        self.da_conv2 = DAConv(channels, reduction, reflect)
        self.conv2 = _conv3x3(channels, channels, reflect)
        self.prelu1, self.prelu2, self.prelu3 = nn.PReLU(), nn.PReLU(), nn.PReLU()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.prelu1(self.da_conv1(x, z))
        y = self.prelu2(self.conv1(y))
        y = self.prelu3(self.da_conv2(y, z))
        return self.conv2(y).add_(x)                   # y + x in place on the conv's fresh output: exact


class DAGroup(nn.Module):
    """DA group: n_blocks DA blocks sharing the group's code z_g, closing conv, residual [official code]."""

    def __init__(self, channels: int, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(DABlock(channels) for _ in range(n_blocks))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, z)
        return self.conv(y).add_(x)


class Generator(nn.Module):
    """Generator G [Eq. 6]: DASR's SR network, PReLUs, one code z_g per group from f. (B,3,h,w) -> (B,3,4h,4w)."""

    def __init__(self, rep_dim: int = 64, n_feats: int = 64, n_groups: int = 5, n_blocks: int = 5):
        super().__init__()
        self.n_groups = n_groups
        self.sub_mean, self.add_mean = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            for conv, sign in ((self.sub_mean, -1.0), (self.add_mean, 1.0)):
                conv.weight.copy_(torch.eye(3)[:, :, None, None])
                conv.bias.copy_(sign * torch.tensor(DIV2K_MEAN))
                conv.requires_grad_(False)  # fixed mean shift (kept as parameters: 24 of the 6,280,003)
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        # z = Linear(C -> 5*64)(PReLU(Linear(C -> C, no bias)(f))), split into z_1..z_5 [Eq. 6, official code]
        self.mlp = nn.Sequential(nn.Linear(rep_dim, rep_dim, bias=False), nn.PReLU(),
                                 nn.Linear(rep_dim, n_groups * n_feats))
        self.groups = nn.ModuleList(DAGroup(n_feats, n_blocks) for _ in range(n_groups))
        self.body_conv = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2),
                                  nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2),
                                  nn.Conv2d(n_feats, 3, 3, padding=1))

    def forward(self, img_lr: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        codes = self.mlp(f).chunk(self.n_groups, dim=1)  # n_groups x (B, n_feats)
        x = self.head(self.sub_mean(img_lr))  # (B, n_feats, h, w)
        y = x
        for group, z in zip(self.groups, codes):
            y = group(y, z)
        y = self.body_conv(y).add_(x)  # global residual
        return self.add_mean(self.tail(y))  # (B, 3, 4h, 4w)


class Degrader(nn.Module):
    """Degrader D [Eq. 3], training only: HR + f -> LR. Release layout [official code]: codes u_1..u_3 from f,
    head and 3 reflection-padded DA blocks at HR resolution, stride-4 conv tail. (B,3,4h,4w) -> (B,3,h,w)."""

    def __init__(self, rep_dim: int = 64, n_feats: int = 64, n_blocks: int = 3, scale: int = 4):
        super().__init__()
        self.n_blocks = n_blocks
        # u = PReLU(Linear(C -> 3*64)(PReLU(Linear(C -> C)(f)))) [official code]
        self.codes = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.PReLU(),
                                   nn.Linear(rep_dim, n_blocks * n_feats), nn.PReLU())
        self.head = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, n_feats, 3), nn.PReLU())
        self.blocks = nn.ModuleList(DABlock(n_feats, reduction=4, reflect=True) for _ in range(n_blocks))
        w = n_feats
        self.tail = nn.Sequential(  # stride-4 unpadded conv: 4h -> h (reads rows 4i..4i+2 only)
            nn.Conv2d(w, 4 * w, 3, stride=scale), nn.PReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(4 * w, 2 * w, 3), nn.PReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(2 * w, w, 3), nn.PReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(w, 3, 3))

    def forward(self, img_hr: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        codes = self.codes(f).chunk(self.n_blocks, dim=1)  # n_blocks x (B, n_feats)
        y = self.head(img_hr)  # (B, n_feats, 4h, 4w)
        for block, u in zip(self.blocks, codes):
            y = block(y, u)
        return self.tail(y)  # (B, 3, h, w), no clamp


class ReDSR(nn.Module):
    """E + G (+ D when the re-degradation loss is on). forward() is the training pass [Fig. 2]."""

    def __init__(self, rep_dim=64, enc_width=64, n_feats=64, n_groups=5, n_blocks=5, deg_blocks=3, with_degrader=True):
        super().__init__()
        self.encoder = Encoder(enc_width, rep_dim)
        self.generator = Generator(rep_dim, n_feats, n_groups, n_blocks)
        self.degrader = Degrader(rep_dim, n_feats, deg_blocks) if with_degrader else None

    def forward(self, img1_lr: torch.Tensor, img2_hr: torch.Tensor | None = None):
        f = self.encoder(img1_lr)  # (B, C) [Eq. 2]
        img1_sr = self.generator(img1_lr, f)  # (B, 3, 4h, 4w) [Eq. 6]
        img2_lr_hat = None if img2_hr is None else self.degrader(img2_hr, f)  # (B, 3, h, w) [Eq. 3]
        return f, img1_sr, img2_lr_hat

    @staticmethod
    def encoder_input(img_lr: torch.Tensor) -> torch.Tensor:
        """The LR image E sees: sides < 24 px are replicate-padded, for E only [DEV]."""
        h, w = img_lr.shape[-2:]
        need = Encoder.min_side
        if min(h, w) < need:
            img_lr = F.pad(img_lr, (0, max(0, need - w), 0, max(0, need - h)), mode="replicate")
        return img_lr

    def represent(self, img_lr: torch.Tensor) -> torch.Tensor:
        """f for a whole LR image (of any size: see encoder_input)."""
        return self.encoder(self.encoder_input(img_lr))

    def super_resolve(self, img_lr: torch.Tensor) -> torch.Tensor:
        """Inference: I_SR = G(I_LR, E(I_LR)) [Sec. 3.2]."""
        return self.generator(img_lr, self.represent(img_lr))


def build_model(cfg: Config, with_degrader: bool | None = None) -> ReDSR:
    return ReDSR(cfg.rep_dim, cfg.enc_width, cfg.n_feats, cfg.n_groups, cfg.n_blocks, cfg.deg_blocks,
                 cfg.use_rd if with_degrader is None else with_degrader)


# ---- 4. Losses ---------------------------------------------------------------------------------------------
def sample_prior(kind: str, m: int, dim: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """m samples t_j in R^C of the predefined distribution [Eq. 5]; unit variance per coordinate [DEV]."""
    if kind == "gaussian":
        return torch.randn(m, dim, device=device, generator=generator)  # N(0, I)
    if kind == "uniform":
        return (torch.rand(m, dim, device=device, generator=generator) * 2 - 1) * math.sqrt(3.0)  # U[-sqrt3, sqrt3]
    if kind == "exponential":
        return torch.empty(m, dim, device=device).exponential_(1.0, generator=generator)  # Exp(rate 1)
    raise ValueError(f"unknown prior {kind!r}")


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1/(n m)) sum_i sum_j ||a_i - b_j||_2, diagonal included; vector_norm has a zero subgradient at 0."""
    return torch.linalg.vector_norm(a[:, None, :] - b[None, :, :], dim=-1).mean()


def energy_distance(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Energy distance between representations f (n, C) and prior samples t (m, C) [Eq. 5, official code]."""
    # L_ED = (1/C) [ 2/(nm) sum ||f_i - t_j|| - 1/n^2 sum ||f_i - f_i'|| - 1/m^2 sum ||t_j - t_j'|| ]
    # V-statistic (diagonals included) and the 1/C factor of the release [DEV]
    dxy = _mean_pairwise_distance(f, t)
    dxx = _mean_pairwise_distance(f, f)
    dyy = _mean_pairwise_distance(t, t)
    return (2 * dxy - dxx - dyy) / f.shape[1]


def kl_to_standard_normal(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Tab. 2 Model 7 [DEV]: KL( N(mu_batch, diag var_batch) || N(0, I) ) / C (the paper gives no formula)."""
    mu, var = f.mean(0), f.var(0, unbiased=False) + eps
    # KL = 1/2 sum_c (var_c + mu_c^2 - 1 - log var_c)
    return 0.5 * (var + mu ** 2 - 1 - var.log()).mean()


def re_degradation_loss(img2_lr_hat: torch.Tensor, img2_lr: torch.Tensor) -> torch.Tensor:
    """L_RD = mean |I2_LR^ - I2_LR| over all elements [Eq. 4]."""
    return F.l1_loss(img2_lr_hat, img2_lr)


@torch.no_grad()
def modulation_weight(img2_lr_hat: torch.Tensor, img2_lr: torch.Tensor) -> torch.Tensor:
    """Per-sample W_b = 2 / (1 + C^-1), C = 1/d_b, d_b = RMSE(I2_LR^_b, I2_LR_b) on the [0, 1] scale [Eqs. 7-8, DEV];
    detached. (B,)"""
    d = (img2_lr_hat.float() - img2_lr.float()).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return 2.0 / (1.0 + d)


def sr_loss(img1_sr: torch.Tensor, img1_hr: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """L_SR = (1/B) sum_b W_b mean|I1_SR_b - I1_HR_b| [Eq. 7]; weight (B,) or a constant."""
    per_sample = (img1_sr.float() - img1_hr).abs().mean(dim=(1, 2, 3))  # (B,)
    return (weight * per_sample).mean()


# ---- 5. Training -------------------------------------------------------------------------------------------
def training_step(model: nn.Module, batch, cfg: Config, device, amp: bool, rnd: common.StepRandom | None = None,
                  dist: common.Dist | None = None):
    """One forward of E, D, G and the total loss L = lambda1 L_ED + L_RD + L_SR [Eq. 9]. Under DDP the batch statistics
    (L_ED, the KL variant) see the whole global batch of f, gathered with its gradient [ours]."""
    img1_lr, img1_hr, img2_lr, img2_hr = batch
    with common.autocast(device, amp):
        f, img1_sr, img2_lr_hat = model(img1_lr, img2_hr if cfg.use_rd else None)
    f = common.gather_batch(f.float(), dist or common.Dist())                    # (B, C), all ranks' samples
    terms = {}
    if cfg.use_rd:
        terms["l_rd"] = re_degradation_loss(img2_lr_hat.float(), img2_lr)
    weight = modulation_weight(img2_lr_hat, img2_lr) if cfg.modulation else cfg.sr_weight
    terms["l_sr"] = sr_loss(img1_sr, img1_hr, weight)
    if cfg.use_ed and cfg.kl_instead_of_ed:
        terms["l_kl"] = kl_to_standard_normal(f)
    elif cfg.use_ed:
        t = sample_prior(cfg.ed_dist, cfg.ed_samples, f.shape[1], device, rnd and rnd.generator)  # (m, C) per step
        terms["l_ed"] = energy_distance(f, t)
    # L = lambda1 L_ED + L_RD + L_SR [Eq. 9]
    loss = sum(cfg.lambda_ed * v if k in ("l_ed", "l_kl") else v for k, v in terms.items())
    scalars = {k: v.item() for k, v in terms.items()}
    if cfg.modulation:
        scalars["w_mean"] = weight.mean().item()
    return loss, scalars


def _restore(path, model, optimizer, scheduler, dist, device) -> int:
    ckpt = common.load_checkpoint(path, SCRIPT, STAGES, device=device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])  # training draws come from StepRandom(seed, step): any world size
    common.set_rng_state(ckpt["rng"], dist)
    return int(ckpt["step"])


def _payload(cfg: Config, step: int, model: ReDSR, optimizer, scheduler, rng: dict) -> dict:
    """Everything --resume needs to continue exactly (self-describing)."""
    return {"script": SCRIPT, "stage": "joint", "step": step, "config": dataclasses.asdict(cfg),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng}


def train_joint(cfg: Config, args, resume_path: Path | None) -> Path:
    """The single joint stage [Sec. 4.1]; the process group is left on every exit path."""
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)
    try:
        return _fit_joint(cfg, args, resume_path, dist, device)
    finally:
        common.ddp_teardown(dist)


def _fit_joint(cfg: Config, args, resume_path: Path | None, dist, device) -> Path:
    """E, D, G trained together with one Adam; lr halved periodically. SIGINT/SIGTERM: finish the step, write
    last.pt, return. A non-finite loss (mean over ranks) stops before backward(), last.pt untouched."""
    common.seed_everything(cfg.seed + dist.rank)  # rank 0 = a single process; training draws use StepRandom
    model = common.to_device(build_model(cfg), device, args.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]  # the fixed mean shift is not optimised
    # one Adam over E + D + G == the release's three identical Adams [Sec. 4.1, DEV]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_halve_every, gamma=0.5)
    start = _restore(resume_path, model, optimizer, scheduler, dist, device) if resume_path else 0
    common.writable_dir(args.out_dir)                               # before the data is read
    net = common.compiled(common.wrap_ddp(model, dist), args.compile)  # E, D, G: the step's forward
    dataset = common.HRPatches(args.data_dir, cfg.lr_patch * cfg.scale, crops_per_item=2,
                               augment="hvt" if cfg.augment else "")
    # step k always draws the same items, so --resume continues exactly [common]
    batches = common.infinite_batches(dataset, cfg.batch_size, device, seed=cfg.seed, start_step=start,
                                      workers=args.workers, dist=dist)
    out_dir = Path(args.out_dir)
    log = common.RunLog(out_dir, cfg.steps, enabled=dist.is_main, start_step=start, batch=cfg.batch_size, dist=dist)
    last, last_good = out_dir / "last.pt", resume_path or "(none written yet)"
    with common.stop_on_signals() as flag, contextlib.closing(batches):
        for step in range(start + 1, cfg.steps + 1):
            pairs_hr = next(batches)  # (B, 2, 3, P, P)
            rnd = common.StepRandom(cfg.seed, step, cfg.batch_size, dist, device)  # same draws with 1 or N processes
            kernels, noise = sample_degradations(rnd, cfg.degradation, cfg.sigma_min, cfg.sigma_max, cfg.noise_max,
                                                 cfg.kernel_size)
            batch = degrade_pairs(pairs_hr, kernels, noise, cfg.scale, rnd)
            loss, scalars = training_step(net, batch, cfg, device, args.amp, rnd, dist)
            loss_mean = common.all_reduce_mean(loss.detach(), dist)  # same value on every rank: all stop together
            common.check_finite(loss_mean, step, last_good)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % args.log_every == 0 or step == cfg.steps:  # loss: mean over ranks; terms: rank 0's
                log.log(step, "joint", loss=loss_mean.item(), **scalars, lr=optimizer.param_groups[0]["lr"])
            stop = step < cfg.steps and common.stop_requested(flag, dist, device)  # collective under DDP
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                rng = common.rng_state(dist)  # every rank's state; collective under DDP
                if dist.is_main:
                    common.save_checkpoint(last, _payload(cfg, step, model, optimizer, scheduler, rng))
                last_good = last
            if stop:
                common.leave_on_signal(flag, step, last, dist)      # exit status 128 + signal
    return last


# ---- 6. Evaluation -----------------------------------------------------------------------------------------
def load_for_inference(args, device) -> tuple[ReDSR, Config]:
    """E + G from our checkpoint (config inside) or from the released weights (--official-weights)."""
    if args.official_weights and args.ckpt:
        raise common.UserError("give either --ckpt or --official-weights, not both")
    if args.official_weights:
        model, cfg = load_official(args.official_weights)
        args.source = f"{args.official_weights} (released)"
    elif args.ckpt:
        ckpt = common.load_checkpoint(args.ckpt, SCRIPT, STAGES, device="cpu")
        cfg, args.source = Config(**ckpt["config"]), f"{args.ckpt} (step {ckpt['step']})"
        model = build_model(cfg)
        model.load_state_dict(ckpt["model"])
    else:
        raise common.UserError("give --ckpt FILE (from `train`) or --official-weights FILE")
    if args.scale != cfg.scale:
        raise common.UserError(f"{args.ckpt or args.official_weights} is a x{cfg.scale} model (ReDSR is x4 only) but "
                               f"--scale {args.scale} was given: use --scale {cfg.scale}")
    return common.to_device(model, device, args.channels_last).eval(), cfg


def evaluate(args) -> list[dict]:
    """Benchmark loop of the README's evaluation protocol (Gaussian8, aniso+noise, bicubic) plus the bicubic
    reference row."""
    device = common.pick_device(args.device)
    model, cfg = load_for_inference(args, device)
    name = "ReDSR" + (f" tile{args.tile}" if args.tile else "")
    out_dir = common.writable_dir(args.out_dir)                      # all checked before the first image
    for data in args.data:
        common.find_benchmark(data, args.data_root)

    encoder, generator = (common.compiled(net, args.compile) for net in (model.encoder, model.generator))

    @torch.no_grad()
    def whole_image_sr(img_lr):
        with common.autocast(device, args.amp):                     # I_SR = G(I_LR, E(I_LR)) [Sec. 3.2]
            return generator(img_lr, encoder(model.encoder_input(img_lr))).float()

    # tile 0: the function itself; otherwise E sees one tile at a time (f pools globally), so outputs differ
    sr_fn = common.tiled(whole_image_sr, args.scale, args.tile, args.tile_overlap)
    summary = []
    save_dir = out_dir / "images" if args.save_images else None
    for data in args.data:
        rows = common.run_benchmark(sr_fn, data, args.protocol, args.scale, root=args.data_root, device=device,
                                    save_dir=save_dir, limit=args.limit, name=name)
        method = common.summarize(rows)
        set_name = method[0]["set"]
        common.report(method, f"{name} x{args.scale} {args.protocol} {set_name}", out_dir, args.source, args.limit)
        ref = common.summarize(common.run_benchmark(common.bicubic_sr(args.scale), data, args.protocol,
                                                    args.scale, root=args.data_root, device=device,
                                                    limit=args.limit, name="bicubic"))
        common.report(ref, f"bicubic x{args.scale} {args.protocol} {set_name}", out_dir, "", args.limit)
        summary += method
    print(f"\nresults: {out_dir / 'results.md'}")
    return summary


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Project rows of x (N, C) on their two leading principal axes. (N, 2)"""
    centred = x - x.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:2].T


def draw_scatter(points: torch.Tensor, labels: list[str], path: Path, size: int = 720) -> None:
    """Scatter plot with Pillow; label "prior" in grey, one colour per other label [Fig. 9 idea]."""
    from PIL import Image, ImageDraw
    palette = [(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (166, 86, 40),
               (247, 129, 191), (0, 160, 160), (120, 120, 0), (0, 0, 0)]
    names = list(dict.fromkeys(labels))
    colours = {n: (190, 190, 190) if n == "prior" else palette[i % len(palette)] for i, n in enumerate(names)}
    lo, hi = points.min(0).values, points.max(0).values
    xy = (points - lo) / (hi - lo).clamp_min(1e-8) * (size - 80) + 40
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for order in (True, False):  # prior underneath
        for (x, y), name in zip(xy.tolist(), labels):
            if (name == "prior") == order:
                r = 2 if order else 4
                draw.ellipse((x - r, size - y - r, x + r, size - y + r), fill=colours[name])
    for i, name in enumerate(names):
        draw.rectangle((8, 8 + 14 * i, 18, 18 + 14 * i), fill=colours[name])
        draw.text((24, 7 + 14 * i), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def embed(args) -> Path:
    """Representations of benchmark LR images under several degradations + prior samples, PCA to 2-D [Fig. 9]."""
    device = common.pick_device(args.device)
    model, cfg = load_for_inference(args, device)
    encoder, reps, labels = common.compiled(model.encoder, args.compile), [], []
    for data in args.data:
        set_name, paths = common.find_benchmark(data, args.data_root)
        for path in paths[: args.limit]:
            img_hr = common.modcrop(common.load_uint8(path), cfg.scale)
            for label, params in common.test_degradations(args.protocol, cfg.scale):
                img_lr = common.benchmark_lr(img_hr, params, cfg.scale, f"{set_name}/{path.stem}", device)
                reps.append(encoder(model.encoder_input(img_lr)).float().cpu())
                labels.append(label)
    prior = sample_prior(cfg.ed_dist, args.n_prior, cfg.rep_dim, "cpu")
    points = pca_2d(torch.cat(reps + [prior]))
    out = Path(args.out)
    draw_scatter(points, labels + ["prior"] * args.n_prior, out)
    print(f"wrote {out} ({len(reps)} representations, {args.n_prior} prior samples)")
    return out


# ---- 7. Official weights -----------------------------------------------------------------------------------
# released container: {"epoch", "model_DP_state_dict" (E), "model_SRN_state_dict" (G), "model_RB_state_dict" (D)};
# the manifests prefix the keys with DP_MODEL. / SRN_MODEL. / RB_MODEL. (also accepted here) [official code]
OFFICIAL_PARTS = {"model_DP_state_dict": ("DP_MODEL.", "encoder"), "model_SRN_state_dict": ("SRN_MODEL.", "generator"),
                  "model_RB_state_dict": ("RB_MODEL.", "degrader")}
KEY_RULES = {  # (regex on the official key, replacement) applied in order, per network
    "encoder": [(r"^ConvNet\.", "body.")],
    "generator": [(r"^compress\.", "mlp."), (r"^head\.0\.", "head."), (r"^tail\.0\.0\.", "tail.0."),
                  (r"^tail\.0\.2\.", "tail.2."), (r"^tail\.1\.", "tail.4."),
                  (r"^body\.(\d+)\.body\.(\d+)\.(weight|bias)$", r"groups.\1.conv.\3"),
                  (r"^body\.(\d+)\.body\.(\d+)\.", r"groups.\1.blocks.\2."),
                  (r"^body\.(\d+)\.(weight|bias)$", r"body_conv.\2"), (r"\.ca\.conv_du\.", ".attention.")],
    "degrader": [(r"^mlpA\.", "codes."), (r"^A_head\.", "head."), (r"^A_tail\.", "tail."),
                 (r"^blk(\d+)_A\.", lambda m: f"blocks.{int(m.group(1)) - 1}."),
                 (r"\.conv([12])\.0\.1\.", r".conv\1.1."), (r"\.ca\.conv_du\.", ".attention.")],
}


def official_key(key: str, network: str) -> str:
    """Our state-dict key for an official key of `network` (encoder, generator or degrader)."""
    for pattern, repl in KEY_RULES[network]:
        key = re.sub(pattern, repl, key)
    return f"{network}.{key}"


def split_official(state: dict) -> dict[str, dict]:
    """{network: official state dict} from the released container or a manifest-prefixed flat dict."""
    parts = {}
    for container_key, (prefix, network) in OFFICIAL_PARTS.items():
        if isinstance(state.get(container_key), dict):
            parts[network] = state[container_key]
        found = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
        if found:
            parts[network] = {**parts.get(network, {}), **found}
    if "encoder" not in parts or "generator" not in parts:
        raise common.UserError("not a ReDSR checkpoint: expected model_DP_state_dict and model_SRN_state_dict")
    return parts


def convert_official(parts: dict[str, dict], model: ReDSR) -> dict:
    """Map official tensors onto `model`'s keys with strict coverage both ways; UserError naming the keys."""
    ours = model.state_dict()
    converted, unknown, mismatched = {}, [], []
    for network, state in parts.items():
        for key, tensor in state.items():
            target = official_key(key, network)
            if target not in ours or target in converted:
                unknown.append(f"{network}:{key}")
            elif tuple(tensor.shape) != tuple(ours[target].shape):
                mismatched.append(f"{network}:{key} {tuple(tensor.shape)} vs ours {tuple(ours[target].shape)}")
            else:
                converted[target] = tensor
    missing = [k for k in ours if k not in converted]
    for name, bad in (("unexpected official keys", unknown), ("shape mismatches", mismatched),
                      ("parameters not filled", missing)):
        if bad:
            raise common.UserError(f"{name} ({len(bad)}): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):  # fixed values, not learned
        weight, bias = converted[f"generator.{name}.weight"], converted[f"generator.{name}.bias"]
        if not (torch.allclose(weight.float().flatten(1), torch.eye(3), atol=1e-6)
                and torch.allclose(bias.float(), sign * torch.tensor(DIV2K_MEAN), atol=1e-4)):
            raise common.UserError(f"generator {name} is not the DIV2K mean shift (bias {bias.tolist()})")
    return converted


def load_official(path) -> tuple[ReDSR, Config]:
    """Build E + G (+ D when present) from a released ReDSR checkpoint (setting1_ckp.tar / setting2_ckp.tar)."""
    if not Path(path).is_file():
        raise common.UserError(f"official weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad user file
        raise common.UserError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise common.UserError(f"{path} does not hold a dict")
    if "script" in state:  # one of our own checkpoints
        raise common.UserError(f"{path} was written by {state['script']}.py, not released with ReDSR: "
                               f"pass a redsr.py checkpoint with --ckpt")
    parts = split_official(state)
    # the layout comes from the keys: groups "body.{g}.body.{j}", the group's closing conv is j = n_blocks
    groups = {int(m.group(1)) for k in parts["generator"] if (m := re.match(r"body\.(\d+)\.body\.", k))}
    blocks = {int(m.group(1)) for k in parts["generator"] if (m := re.match(r"body\.0\.body\.(\d+)\.", k))}
    cfg = Config(n_groups=max(groups, default=4) + 1, n_blocks=max(blocks, default=4),
                 use_rd="degrader" in parts)
    model = build_model(cfg)
    model.load_state_dict(convert_official(parts, model), strict=True)
    return model, cfg


# ---- 8. CLI ------------------------------------------------------------------------------------------------
def _inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint written by `train`")
    parser.add_argument("--official-weights", help="released ReDSR checkpoint (setting1_ckp.tar / setting2_ckp.tar)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redsr.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="joint training of E, D and G [Sec. 4.1]")
    tr.add_argument("--stage", choices=STAGES, default="joint")
    tr.add_argument("--preset", choices=tuple(PRESETS), help="paper (default), large (ReDSR-L) or smoke")
    tr.add_argument("--data-dir", nargs="+", required=True, help="HR training folder(s), e.g. DIV2K + Flickr2K")
    tr.add_argument("--steps", type=common.at_least(1), help="override the number of steps")
    tr.add_argument("--batch-size", type=common.at_least(1), help="override the global batch size (items = patch "
                                                                   "pairs; N processes take batch / N each)")
    tr.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="flips/transposes of the HR crops (default on [ours]; the release has none: --no-augment)")
    tr.add_argument("--save-every", type=common.at_least(1), help="override the checkpoint period")
    tr.add_argument("--resume", nargs="?", const="", help="checkpoint to resume (no value: <out-dir>/last.pt)")
    tr.add_argument("--degradation", choices=DEGRADATIONS, help="iso (setting 1) or aniso_noise (setting 2)")
    tr.add_argument("--rd", action=argparse.BooleanOptionalAction, default=None, help="re-degradation loss")
    tr.add_argument("--ed", action=argparse.BooleanOptionalAction, default=None, help="energy-distance loss")
    tr.add_argument("--ed-dist", choices=ED_DISTS, help="predefined distribution of L_ED")
    tr.add_argument("--kl-instead-of-ed", action=argparse.BooleanOptionalAction, default=None)
    tr.add_argument("--modulation", action=argparse.BooleanOptionalAction, default=None,
                    help="modulated reconstruction loss [Eqs. 7-8]")
    common.add_run_args(tr)
    ev = sub.add_parser("eval", help="benchmark evaluation (README: Evaluation protocol)")
    _inference_args(ev)
    common.add_run_args(ev)
    common.add_eval_args(ev)
    ev.add_argument("--tile", type=common.at_least(0), default=0,
                    help="super-resolve LR tiles of N px to bound memory (default 0: whole image). The encoder E "
                         "pools globally, so it then estimates the degradation from one tile at a time: the output "
                         "differs from the whole-image output unless the tile covers the LR image")
    ev.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    em = sub.add_parser("embed", help="PCA scatter of representations and prior samples [Fig. 9]")
    _inference_args(em)
    common.add_run_args(em)
    common.add_eval_args(em)
    em.add_argument("--n-prior", type=common.at_least(1), default=1000, help="samples of the predefined distribution")
    em.add_argument("--out", help="PNG path (default <out-dir>/embed.png)")
    return common.show_defaults(parser, Config)


def explicit_flags(args) -> dict:
    """{config field: value} of the flags given on the command line (None: not given), --steps aside."""
    return {"batch_size": args.batch_size, "save_every": args.save_every, "degradation": args.degradation,
            "use_rd": args.rd, "use_ed": args.ed, "ed_dist": args.ed_dist, "kl_instead_of_ed": args.kl_instead_of_ed,
            "modulation": args.modulation, "seed": args.seed, "augment": args.augment, "preset": args.preset}


def config_from_args(args) -> Config:
    """Preset, then explicit flags; with --resume the checkpoint's config (only --steps may change)."""
    overrides = {**explicit_flags(args), "steps": args.steps}
    cfg = dataclasses.replace(Config(), **PRESETS[args.preset or "paper"])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.rd is False and args.modulation is None:
        cfg.modulation = False  # Tab. 2 Models 1 and 3: no degrader, hence no modulation
    return cfg


def main(argv=None):
    args = build_parser().parse_args(argv)
    with common.cli_errors():
        if args.command == "train":
            args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.stage}"
            cfg = config_from_args(args)
            resume = None
            if args.resume is not None:
                resume = Path(args.resume or Path(args.out_dir) / "last.pt")
                cfg = Config(**common.resumed(resume, SCRIPT, STAGES, args.steps, explicit_flags(args),
                                              {"use_rd": "rd", "use_ed": "ed"})["config"])
            check_config(cfg)
            return train_joint(cfg, args, resume)
        args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.command}"
        if args.command == "eval":
            return evaluate(args)
        args.out = args.out or str(Path(args.out_dir) / "embed.png")
        return embed(args)


if __name__ == "__main__":
    main()
