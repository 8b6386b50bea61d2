"""KDSR: Knowledge Distillation based Degradation Estimation for Blind Super-Resolution.

Xia et al., ICLR 2023, arXiv 2211.16928. Official code: Zj-BinXia/KDSR (classic degradations, x4).
Classic track: `teacher` (sees LR and HR) -> `student` (sees LR only). Real-world track (Sec. 4.4, KDSR_S-GAN,
`--degradation realesrgan`): KDSR_T -> KDSR_S (L1 + KD) -> `student-gan` (Eq. 8) on Real-ESRGAN degradations.

Paper map (paper element -> symbol here)
    Eq. 1   classic degradation, Sec. 4.1 ranges         -> sample_degradations, degrade_batch
    Sec. 3.2, Fig. 2(c) KD-IDE_T / KD-IDE_S               -> Estimator (teacher: 51 input channels)
            D' (4C, distilled) and D (C, fed to the SR net) -> Estimator.forward -> (d, d_prime)
    Eqs. 4-5, Fig. 2(a) IDR-DDC                           -> IDRDDC, dynamic_depthwise (two exact forms)
    Sec. 3.3, Fig. 2(b) IDR-DCRB                          -> IDRDCRB
    Fig. 2(d)(e) SR network, KDSR_T / KDSR_S              -> SRNetwork, KDSR
    Eq. 2   L_rec;  Eq. 6 L_kl;  Eq. 7/15 L_classic       -> reconstruction_loss, kd_loss, student_step
    Sec. 3.4 two-stage training, Sec. 4.1 schedules       -> train_teacher, train_student, schedule
    Tab. 1 (Gaussian8), Tab. 2 (Set14 aniso+noise)        -> evaluate (common.run_benchmark protocols)
    Fig. 6  IDR visualisation (t-SNE in the paper)        -> embed (PCA scatter drawn with Pillow)
    Sec. 4.4 real-world degradation (Real-ESRGAN)          -> realworld_pairs (common.realesrgan_degrade)
    App. A.1 L_per (VGG19, before activation); L_adv, L_D  -> VGG19Features, perceptual_loss; UNetDiscriminatorSN,
                                                              gan_loss
    Eq. 8/16 L_real = L_rec + L_kl + L_per + L_adv        -> gan_step, disc_step, train_student_gan
    Tab. 3 real-world evaluation (LPIPS, PSNR, SSIM)       -> evaluate (common.run_paired)

Deviations (each [DEV] is listed in the README):
    - [DEV] one kernel and one noise level per *sample* (release: one per mini-batch; paper: per image).
    - [DEV] schedules of the released scripts (teacher 500 epochs, halve every 125; iso student 600 / 150;
      aniso student 100 estimator-only + 400 joint), Adam beta2 = 0.999 (paper text: 600 / 150, 0.99).
    - [DEV] "lambda_kd = 0.15" of Sec. 4.1 read as temperature 0.15 and weight 1 (authors, issue #2).
    - [DEV] the student's SR network is copied from the teacher by an explicit named load; its estimator is
      freshly initialised on purpose (release: strict=False load that silently skips it).
    - [DEV] the teacher's estimator runs under no_grad at distillation time (release: autograd on, same values).
    - [DEV] real-world track: the KDSR-GAN release's lr (teacher 1e-4, student 2e-4 -> 1e-4 at 600K), vanilla GAN
      of weight 1 and L1 perceptual criterion (paper: 2e-4; 1e-4; lambda_adv 0.1, Eqs. 13-14; L2 norm).

Usage:
    python kdsr.py train --stage teacher --data-dir DIV2K/HR Flickr2K/HR --degradation iso --size M
    python kdsr.py train --stage student --teacher-ckpt runs/kdsr/teacher/last.pt --data-dir DIV2K/HR Flickr2K/HR
    python kdsr.py eval --ckpt runs/kdsr/student/last.pt --data Set5 Set14 B100 Urban100 Manga109
    python kdsr.py eval --official-weights KDSRsM_iso_x4.pt --data Set14 --protocol gaussian8
    python kdsr.py embed --ckpt runs/kdsr/student/last.pt --data Set14
    python kdsr.py train --stage student-gan --student-ckpt runs/kdsr/student/last.pt --vgg-weights vgg19.pth \
        --data-dir DF2K_OST      (after teacher and student stages with --degradation realesrgan)
    python kdsr.py eval --ckpt runs/kdsr/student-gan/last.pt --lr-dir track1-valid-input --hr-dir track1-valid-gt
    torchrun --nproc_per_node=4 kdsr.py train --stage teacher --data-dir DF2K/HR --amp --channels-last
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "kdsr"
STAGES = ("teacher", "student", "student-gan")
DEGRADATIONS = ("iso", "aniso_noise", "realesrgan")
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # [official code] MeanShift, rgb_range 1, std 1


# ---- 1. Config ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0                        # [ours]
    save_every: int = 5000               # [ours] checkpoint period in steps
    # data
    scale: int = 4                       # [Sec. 4.1] x4
    lr_patch: int = 64                   # [Sec. 4.1] LR patch 64 -> HR crop 256
    batch_size: int = 64                 # [Sec. 4.1] global: each of N processes takes 64 / N
    degradation: str = "iso"             # [Sec. 4.1] "iso" (Sec. 4.2) | "aniso_noise" (Sec. 4.3)
    kernel_size: int = 21                # [Sec. 4.1]
    sigma_min: float = 0.2               # [Sec. 4.1] iso sigma, aniso lambda1/lambda2 ~ U[0.2, 4.0]
    sigma_max: float = 4.0               # [Sec. 4.1]
    noise_max: float = 25.0              # [Sec. 4.1] sigma_n ~ U[0, 25] (0-255 scale), aniso_noise only
    # model (size M; SIZES["L"] for size L)
    size: str = "M"                      # [Tab. 1] label only
    n_feats: int = 64                    # [official code] C (Tab. 1 names the sizes, the release scripts set C/N/R)
    n_blocks: int = 53                   # [official code] N IDR-DCRBs
    n_resblocks: int = 9                 # [official code] R estimator residual blocks
    # losses
    kd_temperature: float = 0.15         # [Sec. 4.1, DEV] tau of Eq. 6 ("lambda_kd = 0.15")
    kd_weight: float = 1.0               # [Eq. 15] lambda_kl
    rec_weight: float = 1.0              # [Eq. 15] lambda_rec
    # optimisation: Adam, lr set at the start of every epoch (epochs counted from 1)
    beta1: float = 0.9                   # [Sec. 4.1]
    beta2: float = 0.999                 # [official code, DEV] paper: 0.99
    adam_eps: float = 1e-8               # [official code]
    iters_per_epoch: int = 971           # [official code] 3450 images x 18 repeats / 64
    learning_rate: float = 1e-4          # [Sec. 4.1] teacher, student, aniso joint phase
    teacher_epochs: int = 500            # [official code, DEV] paper: 600
    teacher_halve_every: int = 125       # [official code, DEV] paper: 150
    student_epochs: int = 600            # [official code] iso student
    student_halve_every: int = 150       # [official code]
    warmup_epochs: int = 100             # [official code] aniso student: estimator-only phase (L_kl only)
    warmup_learning_rate: float = 2e-4   # [official code]
    warmup_decay_every: int = 60         # [official code] x0.1
    joint_epochs: int = 400              # [official code] aniso student after the warm-up
    joint_halve_every: int = 125         # [official code]
    student_learning_rate: float = 1e-4  # [Sec. 4.1] student (iso, aniso joint phase)
    steps: int = 0                       # [ours] 0: the stage's full schedule; else stop at this step
    preset: str = "paper"                # [ours] the preset the run started from (a label --resume checks)
    # real-world track (--degradation realesrgan, Sec. 4.4); REALWORLD below sets the KDSR-GAN values
    hr_crop: int = 400                   # [official code] GT crop the Real-ESRGAN pipeline degrades (LR 100)
    pool_size: int = 180                 # [official code] training-pair pool per process
    ema_decay: float = 0.999             # [official code] EMA of the weights, real-world stages only
    teacher_usm: bool = False            # [official code] STV2: the teacher estimator sees USM(HR)
    gan_epochs: int = 400_000            # [Sec. 4.1] student-gan: 400K iterations
    gan_halve_every: int = 400_000       # [official code] G and D lr x0.5 at 400K
    gan_learning_rate: float = 1e-4      # [Sec. 4.1] G and D
    perceptual_weight: float = 1.0       # [App. A.1] lambda_per
    adv_weight: float = 1.0              # [official code, DEV] paper: lambda_adv 0.1 (author: 1, issue #1)


SIZES = {"M": {"size": "M", "n_feats": 64, "n_blocks": 53, "n_resblocks": 9},     # KDSR_S-M [official code]
         "L": {"size": "L", "n_feats": 128, "n_blocks": 28, "n_resblocks": 5}}    # KDSR_S-L [official code]
# KDSR-GAN's release [official code] (C 128, N 42, R 6: 18,846,107 parameters); schedules count iterations,
# so one "epoch" is one iteration here. Paper values differ where tagged DEV in Config and the README.
REALWORLD = {"size": "GAN", "n_feats": 128, "n_blocks": 42, "n_resblocks": 6, "batch_size": 48, "beta2": 0.99,
             "iters_per_epoch": 1, "teacher_epochs": 1_000_000, "teacher_halve_every": 4_000_000,  # 1e-4 constant
             "student_epochs": 1_000_000, "student_halve_every": 600_000, "student_learning_rate": 2e-4}
PRESETS = {
    "paper": {},
    "smoke": {"size": "smoke", "n_feats": 8, "n_blocks": 2, "n_resblocks": 1, "lr_patch": 16, "batch_size": 2,
              "iters_per_epoch": 5, "teacher_epochs": 2, "student_epochs": 2, "warmup_epochs": 1, "joint_epochs": 1,
              "gan_epochs": 2, "learning_rate": 1e-3, "student_learning_rate": 1e-3, "warmup_learning_rate": 1e-3,
              "gan_learning_rate": 1e-3, "save_every": 1000, "hr_crop": 96, "pool_size": 4, "ema_decay": 0.9},
}


def total_steps(cfg: Config, stage: str) -> int:
    """Length of a stage in iterations [official code], or cfg.steps when set."""
    if cfg.steps:
        return cfg.steps
    if stage != "student":
        epochs = cfg.teacher_epochs if stage == "teacher" else cfg.gan_epochs
    else:
        epochs = cfg.warmup_epochs + cfg.joint_epochs if cfg.degradation == "aniso_noise" else cfg.student_epochs
    return epochs * cfg.iters_per_epoch


def schedule(cfg: Config, stage: str, step: int) -> tuple[float, bool]:
    """(learning rate, estimator-only?) at 1-based `step`; a pure function of the step, so --resume is exact."""
    epoch = (step - 1) // cfg.iters_per_epoch + 1
    if stage == "teacher":
        # lr = 1e-4 * 0.5^floor(e / 125) [official code]; real-world: 1e-4 constant [official code, DEV] paper 2e-4
        return cfg.learning_rate * 0.5 ** (epoch // cfg.teacher_halve_every), False
    if stage == "student-gan":
        # lr = 1e-4 * 0.5^floor(it / 400K), G and D [Sec. 4.1, official code]
        return cfg.gan_learning_rate * 0.5 ** (epoch // cfg.gan_halve_every), False
    if cfg.degradation != "aniso_noise":
        # lr = 1e-4 * 0.5^floor(e / 150) [official code]; real-world 2e-4 * 0.5^floor(it / 600K) [official code, DEV]
        return cfg.student_learning_rate * 0.5 ** (epoch // cfg.student_halve_every), False
    if epoch <= cfg.warmup_epochs:
        # e <= 100: lr = 2e-4 * 0.1^floor(e / 60), L_kl only [official code]
        return cfg.warmup_learning_rate * 0.1 ** (epoch // cfg.warmup_decay_every), True
    # e > 100: lr = 1e-4 * 0.5^floor((e - 100) / 125) [official code]
    return cfg.student_learning_rate * 0.5 ** ((epoch - cfg.warmup_epochs) // cfg.joint_halve_every), False


def check_config(cfg: Config) -> None:
    if cfg.degradation not in DEGRADATIONS:
        raise common.UserError(f"--degradation must be one of {', '.join(DEGRADATIONS)}, got {cfg.degradation!r}")
    if cfg.scale != 4:
        raise common.UserError(f"KDSR is defined for x4 (Sec. 4.1); got scale {cfg.scale}")
    if cfg.lr_patch * cfg.scale <= cfg.kernel_size // 2:
        raise common.UserError(f"HR patch {cfg.lr_patch * cfg.scale} px is too small for a {cfg.kernel_size}-tap blur")
    if cfg.degradation == "realesrgan" and not cfg.lr_patch * cfg.scale <= cfg.hr_crop >= common.MIN_REALESRGAN_GT:
        raise common.UserError(f"the Real-ESRGAN pipeline needs a GT crop >= {common.MIN_REALESRGAN_GT} px and >= the "
                               f"HR patch {cfg.lr_patch * cfg.scale}; got hr_crop {cfg.hr_crop}")
    if cfg.degradation == "realesrgan" and cfg.batch_size > cfg.pool_size:
        raise common.UserError(f"--batch-size {cfg.batch_size} exceeds the {cfg.pool_size}-pair training pool")


# ---- 2. Degradation ----------------------------------------------------------------------------------------
def sample_degradations(rnd: common.StepRandom, kind: str, sigma_min: float, sigma_max: float, noise_max: float,
                        kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One blur kernel (b, k, k) and one noise level (b,) per sample [Sec. 4.1, DEV], drawn by the step's StepRandom:
    sample i of step k gets the same degradation with any number of processes [ours]."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * rnd.rand()
    if kind == "iso":
        # sigma ~ U[0.2, 4.0], no noise [Sec. 4.2]
        return common.isotropic_kernels(uniform(sigma_min, sigma_max), kernel_size), None
    # lambda1, lambda2 ~ U[0.2, 4.0], theta ~ U[0, pi), sigma_n ~ U[0, 25] [Sec. 4.3]
    lambda1, lambda2 = uniform(sigma_min, sigma_max), uniform(sigma_min, sigma_max)
    kernels = common.anisotropic_kernels(lambda1, lambda2, uniform(0.0, math.pi), kernel_size)
    return kernels, uniform(0.0, noise_max)


@torch.no_grad()
def degrade_batch(img_hr: torch.Tensor, cfg: Config, rnd: common.StepRandom) -> torch.Tensor:
    """I_LR = Q((I_HR * k) down_s + n) per sample [Eq. 1]; (b, 3, sP, sP) -> (b, 3, P, P)."""
    kernels, noise = sample_degradations(rnd, cfg.degradation, cfg.sigma_min, cfg.sigma_max, cfg.noise_max,
                                         cfg.kernel_size)
    return common.degrade(img_hr, kernels, cfg.scale, noise, generator=rnd)


@torch.no_grad()
def realworld_pairs(img_gt: torch.Tensor, cfg: Config, pool) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-ESRGAN's second-order degradation of (B, 3, 400, 400) GT crops -> LR (B, 3, 100, 100), one LR 64 / GT 256
    crop for the batch, then the training-pair pool [Sec. 4.4 'the same degradation as Real-ESRGAN'; official code]."""
    img_lr = common.realesrgan_degrade(img_gt, common.RealESRGANOptions(), cfg.scale)
    img_lr, img_hr = common.paired_random_crop(img_lr, img_gt, cfg.lr_patch, cfg.scale)
    return pool(img_lr, img_hr)                                 # (B, 3, P, P), (B, 3, sP, sP)


# ---- 3. Networks -------------------------------------------------------------------------------------------
def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    """Estimator residual block: x + conv(LReLU(conv(x))), no activation after the add [official code]."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), nn.LeakyReLU(0.1, inplace=True),
                                  conv3x3(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)                           # in place on the conv's fresh output: exact


class Estimator(nn.Module):
    """KD-IDE [Sec. 3.2, Fig. 2(c)]: image -> (D (B, C), D' (B, 4C)); all convs at full LR resolution.

    Student input: LR (B, 3, h, w). Teacher input: concat(LR, PixelUnshuffle_s(HR)) (B, 3 + 3s^2, h, w).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_resblocks: int = 9):
        super().__init__()
        c = channels
        self.head = conv3x3(in_channels, c)
        self.blocks = nn.Sequential(*(ResBlock(c) for _ in range(n_resblocks)))
        act = lambda: nn.LeakyReLU(0.1, inplace=True)  # noqa: E731  (in place on a fresh output: exact)
        self.widen = nn.Sequential(conv3x3(c, 2 * c), act(), conv3x3(2 * c, 2 * c), act(), conv3x3(2 * c, 4 * c), act())
        self.mlp = nn.Sequential(nn.Linear(4 * c, 4 * c), act(), nn.Linear(4 * c, 4 * c), act())
        self.compress = nn.Sequential(nn.Linear(4 * c, c), act())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(F.leaky_relu(self.head(x), 0.1, inplace=True))  # (B, C, h, w)
        x = self.widen(x).mean(dim=(2, 3))                    # global average pool: (B, 4C)
        d_prime = self.mlp(x)                                 # D' (B, 4C): the distilled IDR
        return self.compress(d_prime), d_prime                # D (B, C): guides the SR network


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


class IDRDDC(nn.Module):
    """IDR-based depthwise dynamic convolution [Eqs. 4-5, Fig. 2(a)]: a per-sample 3x3 depthwise kernel from D."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        # phi: Linear(C -> C) -> LReLU -> Linear(C -> C k^2), no biases [Eq. 4, official code]
        self.kernel = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.LeakyReLU(0.1, inplace=True),
                                    nn.Linear(channels, channels * kernel_size ** 2, bias=False))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        k = self.kernel_size
        # W = Reshape(phi(D)): channel i of sample b uses taps [k^2 i, k^2 (i + 1)), row-major [Eq. 4]
        weight = self.kernel(d).reshape(b, c, k, k)            # (B, C, k, k)
        return dynamic_depthwise(x, weight)                    # [Eq. 5]


class IDRDCRB(nn.Module):
    """IDR-based dynamic convolution residual block [Sec. 3.3, Fig. 2(b)]: x + conv(LReLU(IDR-DDC(x, D)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.da_conv1 = IDRDDC(channels)
        self.conv1 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.conv1(F.leaky_relu(self.da_conv1(x, d), 0.1, inplace=True)).add_(x)  # x + ...


class SRNetwork(nn.Module):
    """SR network G [Fig. 2(d)]: head, N IDR-DCRBs sharing D, conv, global residual, x4 upsampler, tail."""

    def __init__(self, channels: int = 64, n_blocks: int = 53, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise ValueError("the released upsampler is x4 (two PixelShuffle(2))")
        self.sub_mean, self.add_mean = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        with torch.no_grad():  # fixed DIV2K mean shift, stored in checkpoints (24 values) [official code]
            for conv, sign in ((self.sub_mean, -1.0), (self.add_mean, 1.0)):
                conv.weight.copy_(torch.eye(3)[:, :, None, None])
                conv.bias.copy_(sign * torch.tensor(DIV2K_MEAN))
                conv.requires_grad_(False)
        self.head = conv3x3(3, channels)
        self.blocks = nn.ModuleList(IDRDCRB(channels) for _ in range(n_blocks))
        self.body_conv = conv3x3(channels, channels)
        self.upsample = nn.Sequential(conv3x3(channels, 4 * channels), nn.PixelShuffle(2),
                                      conv3x3(channels, 4 * channels), nn.PixelShuffle(2))
        self.tail = conv3x3(channels, 3)

    def forward(self, img_lr: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(img_lr))                  # (B, C, h, w)
        y = x
        for block in self.blocks:
            y = block(y, d)
        y = self.body_conv(y).add_(x)                          # global residual
        return self.add_mean(self.tail(self.upsample(y)))      # (B, 3, 4h, 4w), no bicubic skip


class KDSR(nn.Module):
    """KDSR_T (teacher=True: E sees LR and HR) or KDSR_S (E sees LR only) = estimator E + SR network G."""

    def __init__(self, teacher: bool = False, channels: int = 64, n_blocks: int = 53, n_resblocks: int = 9,
                 scale: int = 4):
        super().__init__()
        self.teacher, self.scale = teacher, scale
        self.E = Estimator(3 + 3 * scale ** 2 if teacher else 3, channels, n_resblocks)
        self.G = SRNetwork(channels, n_blocks, scale)

    def estimate(self, img_lr: torch.Tensor, img_hr: torch.Tensor | None = None):
        """(D, D') of KD-IDE_T on concat(LR, PixelUnshuffle(HR)) (B, 51, h, w), or of KD-IDE_S on LR [Sec. 3.2]."""
        if self.teacher:
            if img_hr is None:
                raise ValueError("the teacher estimator needs the HR image")
            img_lr = torch.cat([img_lr, F.pixel_unshuffle(img_hr, self.scale)], dim=1)
        return self.E(img_lr)

    def forward(self, img_lr: torch.Tensor, img_hr: torch.Tensor | None = None, with_sr: bool = True):
        """(I_SR (B, 3, sh, sw) or None, D' (B, 4C))."""
        d, d_prime = self.estimate(img_lr, img_hr)
        return (self.G(img_lr, d) if with_sr else None), d_prime


def build_model(cfg: Config, teacher: bool) -> KDSR:
    return KDSR(teacher, cfg.n_feats, cfg.n_blocks, cfg.n_resblocks, cfg.scale)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral norm [App. A.1; official code]: per-pixel logits (B, 1, H, W),
    H and W multiples of 8. LReLU 0.2 after every conv but the last; skips are added after the activation."""

    def __init__(self, in_channels: int = 3, feats: int = 64):
        super().__init__()
        sn = nn.utils.spectral_norm  # the legacy form saves weight_orig/_u/_v, the keys of BasicSR files
        c = (feats, 2 * feats, 4 * feats, 8 * feats)
        self.conv0 = nn.Conv2d(in_channels, feats, 3, padding=1)
        self.conv1, self.conv2, self.conv3 = (sn(nn.Conv2d(c[i], c[i + 1], 4, 2, 1, bias=False)) for i in range(3))
        self.conv4, self.conv5, self.conv6 = (sn(nn.Conv2d(c[i], c[i - 1], 3, 1, 1, bias=False)) for i in (3, 2, 1))
        self.conv7, self.conv8 = (sn(nn.Conv2d(feats, feats, 3, 1, 1, bias=False)) for _ in range(2))
        self.conv9 = nn.Conv2d(feats, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = F.leaky_relu(self.conv0(x), 0.2)                     # (B, 64, H, W)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)                    # (B, 128, H/2, W/2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)                    # (B, 256, H/4, W/4)
        x3 = F.leaky_relu(self.conv3(x2), 0.2)                    # (B, 512, H/8, W/8)
        x4 = F.leaky_relu(self.conv4(upsample2(x3)), 0.2) + x2    # bilinear x2, conv, then the U-Net skip
        x5 = F.leaky_relu(self.conv5(upsample2(x4)), 0.2) + x1
        x6 = F.leaky_relu(self.conv6(upsample2(x5)), 0.2) + x0
        x = F.leaky_relu(self.conv8(F.leaky_relu(self.conv7(x6), 0.2)), 0.2)
        return self.conv9(x)                                      # (B, 1, H, W) logits


VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
PERCEPTUAL_LAYERS = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}  # conv1_2 ... conv5_4: weight [App. A.1]


class VGG19Features(nn.Module):
    """torchvision VGG19 `features[:35]` with its indices (its state dict loads as is); forward returns the maps of
    `layers` BEFORE their ReLU [App. A.1] for RGB in [0, 1], ImageNet-normalised first [official code]."""

    def __init__(self, layers=tuple(PERCEPTUAL_LAYERS)):
        super().__init__()
        modules, cin = [], 3
        for v in VGG19_CONFIG:
            modules += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = cin if v == "M" else v
        self.features, self.layers = nn.Sequential(*modules[:35]), tuple(layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, img: torch.Tensor) -> dict[int, torch.Tensor]:
        x, out = (img - self.mean) / self.std, {}
        for index, layer in enumerate(self.features[:max(self.layers) + 1]):
            x = layer(x)
            if index in self.layers:
                out[index] = x                                    # conv output; the ReLU is not in place
        return out


# ---- 4. Losses ---------------------------------------------------------------------------------------------
def reconstruction_loss(img_sr: torch.Tensor, img_hr: torch.Tensor) -> torch.Tensor:
    """L_rec = mean |I_SR - I_HR| over all elements, images in [0, 1] [Eq. 2]."""
    return F.l1_loss(img_sr.float(), img_hr.float())


def kd_loss(d_prime_student: torch.Tensor, d_prime_teacher: torch.Tensor, temperature: float = 0.15) -> torch.Tensor:
    """L_kl = (1/B) sum_b sum_j p_T log(p_T / p_S), p = softmax(D' / tau) over 4C; no tau^2 [Eq. 6, DEV].

    The teacher side is detached: the gradient flows into the student only.
    """
    log_p_student = F.log_softmax(d_prime_student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(d_prime_teacher.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def perceptual_loss(vgg: VGG19Features, img_sr: torch.Tensor, img_hr: torch.Tensor) -> torch.Tensor:
    """L_per = sum_l w_l mean|phi_l(SR) - phi_l(HR)|, w = 0.1, 0.1, 1, 1, 1 on conv1_2 ... conv5_4 before activation
    [App. A.1]; L1 criterion [official code, DEV] (Eq. 12: an L2 norm). The HR branch carries no gradient."""
    feats_sr = vgg(img_sr.float())
    with torch.no_grad():
        feats_hr = vgg(img_hr.float())
    return sum(w * F.l1_loss(feats_sr[i], feats_hr[i]) for i, w in PERCEPTUAL_LAYERS.items())


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Vanilla GAN: BCE-with-logits against all-real (1) or all-fake (0) targets, mean over every logit
    [official code, DEV] (Eqs. 13-14: L_adv = -D(SR), L_D = D(SR) - D(HR)). G uses gan_loss(D(SR), True)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


# ---- 5. Training -------------------------------------------------------------------------------------------
def teacher_step(net: nn.Module, img_lr: torch.Tensor, img_hr: torch.Tensor, amp: bool, device):
    """Teacher: L = L_rec [Eq. 2, Sec. 3.4]. Returns (loss, logged scalars, I_SR)."""
    with common.autocast(device, amp):
        img_sr, _ = net(img_lr, img_hr)
    loss = reconstruction_loss(img_sr, img_hr)
    return loss, {"l_rec": loss.item()}, img_sr


def student_step(net: nn.Module, teacher: KDSR, img_lr: torch.Tensor, img_hr: torch.Tensor, cfg: Config,
                 amp: bool, device, estimator_only: bool):
    """Student: L = lambda_rec L_rec + lambda_kl L_kl [Eq. 7/15]; estimator-only warm-up: L = L_kl."""
    with torch.no_grad(), common.autocast(device, amp):
        hr_seen = common.usm_sharp(img_hr) if cfg.teacher_usm else img_hr   # [official code] STV2 option
        _, d_prime_teacher = teacher.estimate(img_lr, hr_seen)           # D'_T (B, 4C), frozen teacher
    with common.autocast(device, amp):
        img_sr, d_prime_student = net(img_lr, with_sr=not estimator_only)
    l_kl = kd_loss(d_prime_student, d_prime_teacher, cfg.kd_temperature)
    if estimator_only:
        return l_kl, {"l_kl": l_kl.item()}, None
    l_rec = reconstruction_loss(img_sr, img_hr)
    return cfg.rec_weight * l_rec + cfg.kd_weight * l_kl, {"l_rec": l_rec.item(), "l_kl": l_kl.item()}, img_sr


def gan_step(net: nn.Module, teacher: KDSR, disc: nn.Module, vgg: VGG19Features, img_lr: torch.Tensor,
             img_hr: torch.Tensor, cfg: Config, amp: bool, device):
    """KDSR_S-GAN generator loss, D frozen [Eq. 8/16; official code order: teacher E, D frozen, G]:
    L_real = lambda_rec L_rec + lambda_kl L_kl + lambda_per L_per + lambda_adv L_adv."""
    loss, scalars, img_sr = student_step(net, teacher, img_lr, img_hr, cfg, amp, device, estimator_only=False)
    disc.requires_grad_(False)
    with common.autocast(device, amp):
        l_adv = gan_loss(disc(img_sr), True)                             # G wants D(SR) called real
        l_per = perceptual_loss(vgg, img_sr, img_hr)
    loss = loss + cfg.perceptual_weight * l_per + cfg.adv_weight * l_adv
    return loss, {**scalars, "l_per": l_per.item(), "l_adv": l_adv.item()}, img_sr


def disc_step(disc: nn.Module, optimizer, img_hr: torch.Tensor, img_sr: torch.Tensor, amp: bool, device, check):
    """L_D = BCE(D(HR), 1) + BCE(D(SR), 0) on the detached SR, one backward each, then one step [official code, DEV:
    Eq. 14]. Under DDP the first backward only accumulates (no_sync), the second all-reduces the sum."""
    disc.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    scalars, ddp = {}, isinstance(disc, nn.parallel.DistributedDataParallel)
    for name, img, real in (("l_d_real", img_hr, True), ("l_d_fake", img_sr.detach(), False)):
        with disc.no_sync() if real and ddp else contextlib.nullcontext():
            with common.autocast(device, amp):
                loss = gan_loss(disc(img), real)
            check(loss)
            loss.backward()
        scalars[name] = loss.item()
    optimizer.step()
    return scalars


def init_student_from_teacher(student: KDSR, teacher_state: dict) -> list[str]:
    """Copy exactly the teacher's G.* tensors into the student [Sec. 3.4]; the estimator keeps its fresh init."""
    g_state = {key[len("G."):]: value for key, value in teacher_state.items() if key.startswith("G.")}
    student.G.load_state_dict(g_state, strict=True)
    return sorted(f"G.{key}" for key in g_state)


def weights(ckpt: dict) -> dict:
    """The weights a stage hands on and eval uses: the EMA copy when the run kept one [official code], else G."""
    return ckpt.get("ema") or ckpt["model"]


def _training_state(cfg: Config, model: KDSR, disc: nn.Module | None) -> dict:
    """Everything a step changes, by checkpoint key: G (+ EMA), its Adam, D and its Adam, the pair pool."""
    def adam(params):
        return torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    state = {"model": model, "optimizer": adam([p for p in model.parameters() if p.requires_grad])}  # not the mean
    if disc is not None:
        state.update(disc=disc, opt_d=adam(disc.parameters()))           # same Adam and lr rule [official code]
    if cfg.degradation == "realesrgan":                                  # [official code] KDSR-GAN keeps both
        state.update(ema=copy.deepcopy(model).requires_grad_(False), pool=common.TrainingPairPool(cfg.pool_size))
    return state


def _restore(path: Path, state: dict, stage: str, dist, device) -> int:
    ckpt = common.load_checkpoint(path, SCRIPT, (stage,), device=device)
    same_world = len(ckpt["rng"].get("ranks", [None])) == dist.world_size
    for key, part in state.items():
        if key != "pool":
            part.load_state_dict(ckpt[key])
        elif same_world:
            part.load_state_dict(ckpt["pool"][dist.rank])                # each rank its own pool
    common.set_rng_state(ckpt["rng"], dist)  # the real-world pipeline draws from each rank's own global RNG
    if not same_world and "pool" in state and dist.is_main:
        print(f"note: {path} was written by {len(ckpt['rng'].get('ranks', [None]))} process(es), this run has "
              f"{dist.world_size}: the real-world degradations and pair pools do not continue exactly")
    return int(ckpt["step"])


def _payload(cfg: Config, stage: str, step: int, state: dict, pools: list | None, rng: dict, extra) -> dict:
    """Everything --resume needs to continue exactly (self-describing)."""
    return {"script": SCRIPT, "stage": stage, "step": step, "config": dataclasses.asdict(cfg),
            **{key: part.state_dict() for key, part in state.items() if key != "pool"}, "pool": pools,
            "scheduler": None,  # the learning rate is a pure function of the step: schedule()
            "rng": rng, **(extra or {})}


def fit(cfg: Config, args, stage: str, model: KDSR, step_fn, resume: Path | None, dist, device,
        extra: dict | None = None, find_unused: bool = False, disc: nn.Module | None = None) -> Path:
    """The loop every stage shares: data, training degradation, G step (+ D step, EMA), lr rule, log, atomic
    checkpoints. SIGINT/SIGTERM: finish the step, write last.pt, return. A non-finite loss stops before its update."""
    state = _training_state(cfg, model, disc)
    start = _restore(resume, state, stage, dist, device) if resume else 0
    common.writable_dir(args.out_dir)                               # before the data is read
    net = common.compiled(common.wrap_ddp(model, dist, find_unused=find_unused), args.compile)
    disc_net = common.wrap_ddp(disc, dist) if disc is not None else None
    real = cfg.degradation == "realesrgan"  # GT crops of 400 (padded if smaller), h-flip only [official code]
    dataset = common.HRPatches(args.data_dir, cfg.hr_crop if real else cfg.lr_patch * cfg.scale,
                               augment="h" if real else "hvt", pad_small=real)
    batches = common.infinite_batches(dataset, cfg.batch_size, device, seed=cfg.seed, start_step=start,
                                      workers=args.workers, dist=dist)  # step k always sees the same crops
    steps, out_dir = total_steps(cfg, stage), Path(args.out_dir)
    log = common.RunLog(out_dir, steps, enabled=dist.is_main, start_step=start, batch=cfg.batch_size, dist=dist)
    last = out_dir / "last.pt"
    last_good, step = resume or "(none written yet)", start  # what the non-finite-loss error points to

    def check(loss: torch.Tensor) -> torch.Tensor:  # the mean over ranks: all ranks stop together, before the update
        loss_mean = common.all_reduce_mean(loss.detach(), dist)
        common.check_finite(loss_mean, step, last_good)
        return loss_mean

    with common.stop_on_signals() as flag, contextlib.closing(batches):
        for step in range(start + 1, steps + 1):
            learning_rate, estimator_only = schedule(cfg, stage, step)
            for optimizer in (state["optimizer"], state.get("opt_d")):
                for group in optimizer.param_groups if optimizer else ():
                    group["lr"] = learning_rate
            img_hr = next(batches)                                  # (B, 3, sP, sP); real-world (B, 3, 400, 400)
            if real:                                                # LR 64 / GT 256 from the pool
                img_lr, img_hr = realworld_pairs(img_hr, cfg, state["pool"])
            else:
                img_lr = degrade_batch(img_hr, cfg, common.StepRandom(cfg.seed, step, cfg.batch_size, dist, device))
            if args.channels_last and device.type == "cuda":
                img_lr, img_hr = (x.contiguous(memory_format=torch.channels_last) for x in (img_lr, img_hr))
            loss, scalars, img_sr = step_fn(net, img_lr, img_hr, estimator_only)
            loss_mean = check(loss)
            state["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            state["optimizer"].step()
            if disc is not None:                                    # D after G [official code]
                scalars.update(disc_step(disc_net, state["opt_d"], img_hr, img_sr, args.amp, device, check))
            if "ema" in state:
                common.ema_update(state["ema"], model, cfg.ema_decay)   # once per iteration [official code]
            if step % args.log_every == 0 or step == steps:
                log.log(step, stage, loss=loss_mean.item(), **scalars, lr=learning_rate)
            stop = step < steps and common.stop_requested(flag, dist, device)
            if step % cfg.save_every == 0 or step == steps or stop:
                rng = common.rng_state(dist)  # every rank takes part (collective)
                pools = common.gather_objects(state["pool"].state_dict(), dist) if real else None
                if dist.is_main:
                    common.save_checkpoint(last, _payload(cfg, stage, step, state, pools, rng, extra))
                last_good = last
            if stop:
                common.leave_on_signal(flag, step, last, dist)      # exit status 128 + signal
    return last


def _setup(cfg: Config, args):
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)
    common.seed_everything(cfg.seed + dist.rank)  # rank 0 = a single process; training draws use StepRandom
    return device, dist


def train_teacher(cfg: Config, args, resume: Path | None) -> Path:
    """Stage 1 [Sec. 3.4, Fig. 2(d)]: KD-IDE_T and G trained jointly with L_rec."""
    device, dist = _setup(cfg, args)
    model = common.to_device(build_model(cfg, teacher=True), device, args.channels_last)

    def step_fn(net, img_lr, img_hr, estimator_only):
        return teacher_step(net, img_lr, img_hr, args.amp, device)

    try:
        return fit(cfg, args, "teacher", model, step_fn, resume, dist, device)
    finally:
        common.ddp_teardown(dist)


def load_teacher(path, cfg: Config, device) -> tuple[KDSR, dict]:
    """The frozen teacher of the student stages and its checkpoint; its architecture must equal the student's."""
    ckpt = common.load_checkpoint(path, SCRIPT, ("teacher",), device="cpu")
    saved = Config(**ckpt["config"])
    arch = ("n_feats", "n_blocks", "n_resblocks", "scale")
    if any(getattr(saved, a) != getattr(cfg, a) for a in arch):
        raise common.UserError(f"teacher {path} has {', '.join(f'{a}={getattr(saved, a)}' for a in arch)} but the "
                               f"student has {', '.join(f'{a}={getattr(cfg, a)}' for a in arch)}: use the same "
                               f"--size/--preset as for the teacher")
    teacher = build_model(saved, teacher=True)
    teacher.load_state_dict(weights(ckpt))
    return teacher.to(device).eval().requires_grad_(False), ckpt


def train_student(cfg: Config, args, resume: Path | None) -> Path:
    """Stage 2 [Sec. 3.4, Fig. 2(e)]: G <- teacher G, fresh KD-IDE_S, L_rec + L_kl (aniso: L_kl warm-up first)."""
    device, dist = _setup(cfg, args)
    teacher, teacher_ckpt = load_teacher(args.teacher_ckpt, cfg, device)
    student = build_model(cfg, teacher=False)
    if resume is None:
        copied = init_student_from_teacher(student, weights(teacher_ckpt))
        if dist.is_main:
            print(f"student G initialised from {args.teacher_ckpt} ({len(copied)} tensors); E_st fresh")
    model = common.to_device(student, device, args.channels_last)

    def step_fn(net, img_lr, img_hr, estimator_only):
        return student_step(net, teacher, img_lr, img_hr, cfg, args.amp, device, estimator_only)

    try:  # the aniso warm-up leaves G without gradients: DDP must be told [official code schedule]
        return fit(cfg, args, "student", model, step_fn, resume, dist, device,
                   extra={"teacher_ckpt": str(args.teacher_ckpt)}, find_unused=cfg.degradation == "aniso_noise")
    finally:
        common.ddp_teardown(dist)


def train_student_gan(cfg: Config, args, resume: Path | None) -> Path:
    """Stage 3, real-world [Sec. 4.4, Eq. 8]: KDSR_S (and its EMA) <- the L1+KD student's EMA weights, a fresh U-Net
    D, the frozen teacher's D'_T, L_real; D trained after every G step."""
    device, dist = _setup(cfg, args)
    vgg = common.to_device(load_vgg19(args.vgg_weights), device, args.channels_last)
    teacher, _ = load_teacher(args.teacher_ckpt, cfg, device)
    student = build_model(cfg, teacher=False)
    if resume is None:
        student.load_state_dict(weights(common.load_checkpoint(args.student_ckpt, SCRIPT, ("student",))))
    model, disc = (common.to_device(m, device, args.channels_last) for m in (student, UNetDiscriminatorSN()))

    def step_fn(net, img_lr, img_hr, estimator_only):
        return gan_step(net, teacher, disc, vgg, img_lr, img_hr, cfg, args.amp, device)

    try:
        return fit(cfg, args, "student-gan", model, step_fn, resume, dist, device, disc=disc,
                   extra={"teacher_ckpt": str(args.teacher_ckpt), "student_ckpt": str(args.student_ckpt)})
    finally:
        common.ddp_teardown(dist)


# ---- 6. Evaluation -----------------------------------------------------------------------------------------
def load_for_inference(args, device) -> tuple[KDSR, Config, str, str]:
    """A student from our checkpoint (config inside; its EMA weights when kept) or from released weights; (model,
    cfg, table name, source: the file and its step, for the results rows)."""
    if bool(args.ckpt) == bool(args.official_weights):
        raise common.UserError("give exactly one of --ckpt FILE (from `train`) or --official-weights FILE")
    if args.official_weights:
        model, cfg = load_official(args.official_weights, args.param_key)
        stage, source = "official", f"{args.official_weights} (released, {args.param_key})"
    else:
        ckpt = common.load_checkpoint(args.ckpt, SCRIPT, STAGES, device="cpu")
        cfg, stage, source = Config(**ckpt["config"]), ckpt["stage"], f"{args.ckpt} (step {ckpt['step']})"
        model = build_model(cfg, teacher=stage == "teacher")
        model.load_state_dict(weights(ckpt))
    if args.scale != cfg.scale:  # before anything runs
        raise common.UserError(f"{args.ckpt or args.official_weights} is a x{cfg.scale} model but --scale "
                               f"{args.scale} was given: use --scale {cfg.scale}")
    if model.teacher:
        raise common.UserError("this is a teacher (KDSR_T): it needs the HR image to estimate the degradation, "
                               "so it cannot super-resolve an LR image alone; evaluate a student checkpoint")
    real = cfg.degradation == "realesrgan"
    name = f"KDSR_S-{cfg.size}" if not real else ("KDSR_S-rec" if stage == "student" else "KDSR_S-GAN")
    return common.to_device(model, device, args.channels_last).eval(), cfg, name, source


def evaluate(args) -> list[dict]:
    """Benchmark tables (the README's evaluation protocol: Gaussian8 [Tab. 1], aniso+noise [Tab. 2]) or paired
    real-world data [Tab. 3]
    (--lr-dir + --hr-dir; --lr-dir alone writes SR PNGs), each beside the bicubic reference row."""
    device = common.pick_device(args.device)
    common.check_paired_args(args)
    lpips = common.load_lpips(*args.lpips_weights, not args.lpips_unverified, device) if args.lpips_weights else None
    model, cfg, name, source = load_for_inference(args, device)
    name += f" tile{args.tile}" if args.tile else ""
    out_dir = common.writable_dir(args.out_dir)                      # all checked before the first image
    for data in [] if args.lr_dir else args.data:
        common.find_benchmark(data, args.data_root)
    save_dir = out_dir / "images" if args.save_images else None

    estimator, generator = (common.compiled(net, args.compile) for net in (model.E, model.G))

    @torch.no_grad()
    def sr_fn(img_lr: torch.Tensor) -> torch.Tensor:
        with common.autocast(device, args.amp):
            d, _ = estimator(img_lr)                     # KD-IDE_S pools globally: D from the whole LR image, then
            g = common.tiled(lambda tile: generator(tile, d), args.scale, args.tile, args.tile_overlap)  # G by tiles
            return g(img_lr).float()

    if args.lr_dir and not args.hr_dir:                  # real photos without ground truth: SR PNGs only
        common.super_resolve_folder(sr_fn, args.lr_dir, out_dir / "images", device, args.limit)
        return []
    summary = []
    for data in [None] if args.lr_dir else args.data:
        for method, fn in ((name, sr_fn), ("bicubic", common.bicubic_sr(args.scale))):
            if args.lr_dir:
                rows = common.run_paired(fn, args.lr_dir, args.hr_dir, args.scale, device, lpips,
                                         save_dir if fn is sr_fn else None, args.limit, method)
            else:
                rows = common.run_benchmark(fn, data, args.protocol, args.scale, root=args.data_root, device=device,
                                            save_dir=save_dir if fn is sr_fn else None, limit=args.limit, name=method)
            table = common.summarize(rows)
            protocol = "paired" if args.lr_dir else args.protocol
            common.report(table, f"{method} x{args.scale} {protocol} {table[0]['set']}", out_dir,
                          source if fn is sr_fn else "", args.limit)
            summary += table if fn is sr_fn else []
    print(f"\nresults: {out_dir / 'results.md'}")
    return summary


def draw_scatter(reps: torch.Tensor, sigmas: list[float], path: Path, size: int = 640) -> None:
    """Rows of reps (N, C) on their two leading principal axes (SVD of the centred data), drawn with Pillow, blue
    (smallest sigma) to red (largest), with a legend [Fig. 6 idea]."""
    from PIL import Image, ImageDraw
    centred = reps - reps.mean(dim=0)
    points = centred @ torch.linalg.svd(centred, full_matrices=False)[2][:2].T   # (N, 2) PCA coordinates
    levels = sorted(set(sigmas))
    colours = {s: tuple(round(255 * c) for c in colorsys.hsv_to_rgb(2 / 3 * (1 - i / max(len(levels) - 1, 1)), .8, .85))
               for i, s in enumerate(levels)}
    lo, hi = points.min(dim=0).values, points.max(dim=0).values
    xy = (points - lo) / (hi - lo).clamp_min(1e-8) * (size - 120) + 60       # (N, 2) pixel positions
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for (x, y), s in zip(xy.tolist(), sigmas):
        draw.ellipse((x - 4, size - y - 4, x + 4, size - y + 4), fill=colours[s])
    for i, s in enumerate(levels):
        draw.rectangle((8, 8 + 14 * i, 18, 18 + 14 * i), fill=colours[s])
        draw.text((24, 7 + 14 * i), f"sigma {s:g}", fill="black")
    draw.text((8, size - 18), "KD-IDE_S representation D, PCA 2-D", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def embed(args) -> Path:
    """Student IDR D of LR images made with several isotropic sigmas, PCA to 2-D, coloured by sigma [Fig. 6]."""
    device = common.pick_device(args.device)
    model, cfg, _, _ = load_for_inference(args, device)
    estimator = common.compiled(model.E, args.compile)        # a student's E: D from the LR alone
    reps, labels = [], []
    for data in args.data:
        set_name, paths = common.find_benchmark(data, args.data_root)
        for path in paths[: args.limit]:
            img_hr = common.modcrop(common.load_uint8(path), cfg.scale)
            for sigma in args.sigmas:
                params = {"id": f"embed{sigma:g}", "kernel": common.isotropic_kernels(sigma)[0], "noise": 0}
                img_lr = common.benchmark_lr(img_hr, params, cfg.scale, f"{set_name}/{path.stem}", device)
                reps.append(estimator(img_lr)[0].float().cpu())        # D (1, C)
                labels.append(sigma)
    out = Path(args.out)
    draw_scatter(torch.cat(reps), labels, out)
    print(f"wrote {out} ({len(reps)} representations, sigmas {', '.join(f'{s:g}' for s in args.sigmas)})")
    return out


# ---- 7. Official weights -----------------------------------------------------------------------------------
# Released KDSR files are raw state dicts: "G." = SR network, "E_st." = student estimator ("E." in teachers),
# estimator convs in one Sequential "E.E.{i}" [official code]. The table maps official module prefixes to ours.
def official_key_map(n_blocks: int, n_resblocks: int, estimator_prefix: str) -> dict[str, str]:
    """{official module prefix: our module prefix}; parameter names below the prefixes are identical."""
    e, r = estimator_prefix, n_resblocks
    table = {"G.sub_mean": "G.sub_mean", "G.add_mean": "G.add_mean", "G.head.0": "G.head",
             "G.body.1": "G.body_conv", "G.tail.0": "G.upsample", "G.tail.1": "G.tail",
             f"{e}E.0": "E.head", f"{e}E.{r + 2}": "E.widen.0", f"{e}E.{r + 4}": "E.widen.2",
             f"{e}E.{r + 6}": "E.widen.4", f"{e}mlp": "E.mlp", f"{e}compress": "E.compress"}
    table.update({f"G.body.0.body.{i}": f"G.blocks.{i}" for i in range(n_blocks)})
    table.update({f"{e}E.{i + 2}": f"E.blocks.{i}" for i in range(r)})
    return table


def _infer_config(state: dict, prefix: str) -> Config:
    """C, N and R from the official keys and shapes (the files carry no config)."""
    try:
        channels = state["G.head.0.weight"].shape[0]
    except KeyError:
        raise common.UserError("not a KDSR checkpoint: no 'G.head.0.weight' (keys start with "
                               f"{', '.join(sorted({k.split('.')[0] for k in state})[:5])})") from None
    n_blocks = len({m.group(1) for k in state if (m := re.match(r"G\.body\.0\.body\.(\d+)\.", k))})
    n_resblocks = len({m.group(1) for k in state if (m := re.match(rf"{re.escape(prefix)}E\.(\d+)\.body\.", k))})
    size = next((name for name, s in {**SIZES, "GAN": REALWORLD}.items()
                 if (s["n_feats"], s["n_blocks"], s["n_resblocks"]) == (channels, n_blocks, n_resblocks)), "custom")
    return Config(size=size, n_feats=channels, n_blocks=n_blocks, n_resblocks=n_resblocks)


def load_official(path, param_key: str = "params_ema") -> tuple[KDSR, Config]:
    """KDSR_S (prefix E_st.) or KDSR_T (prefix E.) from a released raw state dict such as KDSRsM_iso_x4.pt, or from
    a BasicSR file {'params', 'params_ema'} such as KDSR-GAN's (`param_key` picks one; the release tests params_ema)."""
    state = common.read_weights(path, "the released KDSR weights")
    if "script" in state:
        raise common.UserError(f"{path} was written by {state['script']}.py train, not released by the KDSR "
                               f"authors{': pass it as --ckpt' if state['script'] == SCRIPT else ''}")
    if "params" in state or "params_ema" in state:                     # BasicSR save format [official code]
        if param_key not in state:
            raise common.UserError(f"{path} holds {', '.join(sorted(state))}, not '{param_key}' (--param-key)")
        state = state[param_key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"{path} is not a raw state dict of tensors (the released KDSR layout)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # a DataParallel save, if any
    teacher = any(k.startswith("E.") for k in state)
    prefix = "E." if teacher else "E_st."
    cfg = _infer_config(state, prefix)
    if cfg.size == "GAN":
        cfg = dataclasses.replace(cfg, **REALWORLD, degradation="realesrgan")  # KDSR-GAN's size: real-world
    model = build_model(cfg, teacher=teacher)
    table = official_key_map(len(model.G.blocks), len(model.E.blocks), prefix)
    model.load_state_dict(common.convert_official(state, model.state_dict(), table), strict=True)
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):  # fixed constants: check, do not learn
        conv = getattr(model.G, name)
        if not (torch.allclose(conv.weight.flatten(1), torch.eye(3), atol=1e-6)
                and torch.allclose(conv.bias, sign * torch.tensor(DIV2K_MEAN), atol=1e-4)):
            raise common.UserError(f"G.{name} of {path} is not the DIV2K mean shift (bias {conv.bias.tolist()})")
    return model, cfg


def load_vgg19(path) -> VGG19Features:
    """VGG19Features from a torchvision `vgg19` state dict (features.* strict on names and shapes, classifier.*
    ignored). Never downloaded: the user passes the file."""
    vgg, expected = VGG19Features(), "a torchvision VGG19 state dict (vgg19-dcbb9e9d.pth)"
    state = {k: v for k, v in common.read_weights(path, expected).items() if not k.startswith("classifier.")}
    vgg.load_state_dict(common.strict_state(state, vgg.state_dict(), path, expected))
    return vgg.eval().requires_grad_(False)


# ---- 8. CLI ------------------------------------------------------------------------------------------------
def _inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="student checkpoint written by `train --stage student` or `student-gan`")
    parser.add_argument("--official-weights", help="released KDSR student file, e.g. KDSRsM_iso_x4.pt or a "
                                                   "KDSR-GAN BasicSR file")
    parser.add_argument("--param-key", choices=("params_ema", "params"), default="params_ema",
                        help="which weights of a BasicSR file (default params_ema, what the release evaluates)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsr.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the teacher, the student, then (real-world) student-gan [Sec. 3.4, 4.4]")
    tr.add_argument("--stage", choices=STAGES, required=True)
    tr.add_argument("--teacher-ckpt", help="student stages: the teacher's checkpoint (its G initialises the student; "
                                           "student-gan: default the one the student learnt from)")
    tr.add_argument("--student-ckpt", help="student-gan: the L1+KD student's checkpoint (real-world track)")
    tr.add_argument("--vgg-weights", help="student-gan: torchvision VGG19 state dict (vgg19-dcbb9e9d.pth) for L_per")
    tr.add_argument("--data-dir", nargs="+", required=True, help="HR training folder(s), e.g. DIV2K + Flickr2K")
    tr.add_argument("--degradation", choices=DEGRADATIONS, help="iso (Tab. 1), aniso_noise (Tab. 2) or realesrgan "
                                                              "(Tab. 3); default iso, a student's: its teacher's")
    tr.add_argument("--size", choices=tuple(SIZES), help="KDSR-M or KDSR-L [Tab. 1]; default M (real-world: C 128, "
                                                        "N 42, R 6)")
    tr.add_argument("--preset", choices=tuple(PRESETS), help="paper (default) or smoke (a tiny model for trials)")
    tr.add_argument("--steps", type=common.at_least(1), help="stop at this step (default: the stage's full schedule)")
    tr.add_argument("--batch-size", type=common.at_least(1), help="override the global batch size (N processes "
                                                                   "take batch / N each)")
    tr.add_argument("--save-every", type=common.at_least(1), help="override the checkpoint period (steps)")
    tr.add_argument("--teacher-usm", action=argparse.BooleanOptionalAction, help="student stages: the teacher "
                    "estimator sees the USM-sharpened HR (the release's KDSR-GAN V2 option)")
    tr.add_argument("--resume", nargs="?", const="", help="checkpoint to resume (no value: <out-dir>/last.pt)")
    common.add_run_args(tr)
    ev = sub.add_parser("eval", help="benchmark a student (README: Evaluation protocol) or paired real-world "
                                     "data, + bicubic row")
    _inference_args(ev)
    common.add_run_args(ev)
    common.add_eval_args(ev)
    common.add_paired_args(ev)
    ev.add_argument("--tile", type=common.at_least(0), default=0,
                    help="run G on LR tiles of N px to bound memory (default 0: whole image). D is still estimated "
                         "from the whole LR image, so the output equals the whole-image one when the overlap covers "
                         "G's receptive field")
    ev.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    em = sub.add_parser("embed", help="PCA scatter of the student IDR under several blur widths [Fig. 6]")
    _inference_args(em)
    common.add_run_args(em)
    common.add_eval_args(em)
    em.add_argument("--sigmas", type=common.at_least(0.1, float), nargs="+", default=[0.6, 1.2, 1.8, 2.4, 3.0, 3.6],
                    help="isotropic blur widths of the LR images")
    em.add_argument("--out", help="PNG path (default <out-dir>/embed.png)")
    return common.show_defaults(parser, Config)


def resolve_handoffs(args, resume: Path | None) -> None:
    """Fill the checkpoints a stage builds on from the ones it remembers; refuse a missing one before any work."""
    remembered = common.load_checkpoint(resume, SCRIPT, (args.stage,)) if resume is not None else {}
    if args.stage == "student-gan":
        if not args.vgg_weights:
            raise common.UserError("the student-gan stage needs --vgg-weights FILE: a torchvision VGG19 state dict "
                                   "(vgg19-dcbb9e9d.pth) for the perceptual loss; it is never downloaded")
        args.student_ckpt = args.student_ckpt or remembered.get("student_ckpt")
        if not args.student_ckpt:
            raise common.UserError("the student-gan stage needs --student-ckpt FILE (the L1+KD student's last.pt)")
        if not args.teacher_ckpt:
            source = remembered or common.load_checkpoint(args.student_ckpt, SCRIPT, ("student",))
            args.teacher_ckpt = source["teacher_ckpt"]
    if args.stage != "teacher":
        args.teacher_ckpt = args.teacher_ckpt or remembered.get("teacher_ckpt")
        if not args.teacher_ckpt:
            raise common.UserError(f"the {args.stage} stage needs --teacher-ckpt FILE (the teacher's last.pt)")


def config_from_args(args, resume: Path | None) -> Config:
    """paper defaults <- --size <- real-world recipe <- --preset <- explicit flags. A student takes its teacher's
    degradation (a different --degradation is an error); student-gan continues the student's config; --resume
    continues the checkpoint's config (only --steps may change)."""
    flags = {"batch_size": args.batch_size, "save_every": args.save_every, "seed": args.seed, "preset": args.preset,
             "teacher_usm": args.teacher_usm, "degradation": args.degradation, "size": args.size}
    if resume is not None:
        return Config(**common.resumed(resume, SCRIPT, (args.stage,), args.steps, flags)["config"])
    explicit = {k: v for k, v in {**flags, "steps": args.steps, "degradation": None, "size": None}.items()
                if v is not None}
    if args.stage == "student-gan":
        cfg = Config(**common.load_checkpoint(args.student_ckpt, SCRIPT, ("student",))["config"])
        if cfg.degradation != "realesrgan" or args.size or args.degradation not in (None, cfg.degradation):
            raise common.UserError(f"student-gan continues a real-world student (--degradation realesrgan) with its "
                                   f"own size; {args.student_ckpt} is '{cfg.degradation}' (no --size/--degradation)")
        return dataclasses.replace(cfg, **{"steps": 0, **explicit})
    degradation = args.degradation
    if args.stage == "student":
        parent = common.load_checkpoint(args.teacher_ckpt, SCRIPT, ("teacher",))["config"]["degradation"]
        if degradation not in (None, parent):
            raise common.UserError(f"the teacher {args.teacher_ckpt} was trained on '{parent}': its student must be "
                                   f"too (omit --degradation or train a '{degradation}' teacher)")
        degradation = parent
    degradation = degradation or "iso"
    cfg = dataclasses.replace(Config(), **{**SIZES[args.size or "M"], **(REALWORLD if degradation == "realesrgan"
                                                                          else {}), **PRESETS[args.preset or "paper"]})
    return dataclasses.replace(cfg, **(SIZES[args.size] if args.size else {}), **explicit, degradation=degradation)


def main(argv=None):
    args = build_parser().parse_args(argv)
    with common.cli_errors():
        if args.command == "train":
            args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.stage}"
            resume = Path(args.resume or Path(args.out_dir) / "last.pt") if args.resume is not None else None
            resolve_handoffs(args, resume)
            cfg = config_from_args(args, resume)
            check_config(cfg)
            stages = {"teacher": train_teacher, "student": train_student, "student-gan": train_student_gan}
            return stages[args.stage](cfg, args, resume)
        args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.command}"
        if args.command == "eval":
            return evaluate(args)
        args.out = args.out or str(Path(args.out_dir) / "embed.png")
        return embed(args)


if __name__ == "__main__":
    main()
