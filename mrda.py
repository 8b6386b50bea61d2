"""MRDA: Meta-Learning based Degradation Representation for Blind Super-Resolution.

Xia et al., IEEE TIP 2023, arXiv 2207.13963. Official code: Zj-BinXia/MRDA (classic degradations, x4).
Four stages: `pretrain` (MLN, bicubic) -> `meta` (first-order MAML) ->
`teacher` (MRDA_T, sees LR and HR) -> `student` (MRDA_S, sees LR only). Real-world track (Sec. IV-D, MRDA_S-GAN,
`--degradation realesrgan` from the first stage on): the same four stages on Real-ESRGAN degradations, L_vis.

Paper map (paper element -> symbol here)
    Eq. 1, Sec. IV-A ranges (one degradation per task/batch) -> sample_degradation, degrade_batch
    Alg. 1 L4 I^tr / I^te (meta-train / meta-test crops)      -> support / query items of meta_step (our names)
    Sec. III-B, Fig. 2(a) Meta-Learning Network, upscaler    -> MLN (head + body adapted, tail = upscaler)
    Alg. 1 L8-L11 / Alg. 2 L4-L9 inner SGD adaptation         -> adapt_mln (torch.func.functional_call)
    Alg. 1 L13-L14 meta update (first order)                  -> meta_step
    Sec. III-C, Fig. 2(b) DEN_T on D'_T;  Sec. III-D DEN_S    -> DEN (in_channels = MLN width or 3)
    Eqs. 8-10 RDA conv (dynamic depthwise conv x map M)      -> RDAConv (dynamic_depthwise, as KDSR's)
    Sec. III-E, Fig. 2 RDA block, RDAN                        -> RDABlock, RDAN
    MRDA_T / MRDA_S = DEN + RDAN                              -> MRDA
    Eq. 2 L_rec; Eq. 4 L_kl; Eq. 5 L_abs; Eq. 6 L_classic     -> reconstruction_loss, kl_loss, abs_loss, student_step
    Alg. 1, Alg. 2, Sec. III-D stages                         -> train_pretrain, train_meta, train_teacher, train_student
    Tab. II (Gaussian8), Tab. III (Set14 aniso+noise)         -> evaluate (common.run_benchmark protocols)
    Sec. IV-A, IV-D real-world degradation, one per task      -> training_pair (common.apply_realesrgan)
    Eq. 3 L_vis (Alg. 2 L11); Eq. 7 L_real = L_vis + KD losses -> sr_loss, student_step, disc_step (U-Net D, VGG19)
    Tab. IV real-world evaluation (LPIPS, PSNR, SSIM)         -> evaluate (common.run_paired)

Deviations (each [DEV] is listed in the README):
    - [DEV] training angle theta ~ U[0, pi) in radians as the paper says (release: U[0, 1) degree-radian slip).
    - [DEV] true per-batch MLN reset to theta_M (release: the saved copy shares storage, the MLN drifts).
    - [DEV] the whole MLN tail (upsampler + last conv) is frozen from stage 2 on (release: stage 4; --adapt-upscaler).
    - [DEV] adaptation step size 1e-2 for all n steps (release: 1e-2, 5e-3, from step 6 1e-3; --released-step-sizes).
    - [DEV] released schedules, batches and Adam settings (paper text: 500 epochs, lr 2e-4 halved every 200).
    - [DEV] L_kl in the released form: softmax(D / 0.15), sum over entries, batch mean (Eq. 4: 1/(4C), no tau).
    - [DEV] the student's estimator is freshly initialised, RDAN_S <- RDAN_T by an explicit named load.
    - [DEV] real-world track (no code released): RDAN widened to 128 channels (19,468,945 parameters, Tab. IV 19.59 M),
      one Real-ESRGAN draw per task, no pair pool, KDSR-GAN's D / VGG / GAN loss and EMA, schedules of Sec. IV-A.

Usage:
    python mrda.py train --stage pretrain --data-dir DIV2K/HR Flickr2K/HR
    python mrda.py train --stage meta --pretrain-ckpt runs/mrda/pretrain/last.pt --data-dir DIV2K/HR Flickr2K/HR
    python mrda.py train --stage teacher --meta-ckpt runs/mrda/meta/last.pt --data-dir DIV2K/HR Flickr2K/HR
    python mrda.py train --stage student --teacher-ckpt runs/mrda/teacher/last.pt --data-dir DIV2K/HR Flickr2K/HR
    python mrda.py eval --ckpt runs/mrda/student/last.pt --data Set5 Set14 B100 Urban100 Manga109
    python mrda.py eval --ckpt runs/mrda/teacher/last.pt --data Set14   # oracle: adapts the MLN on each HR
    python mrda.py eval --official-weights T.pt --official-mln MLN.pt --data Set5 --released-step-sizes --adapt-upscaler
    python mrda.py eval --ckpt runs/mrda/student/last.pt --data Urban100 --tile 128   # student: LR tiles
    python mrda.py eval --official-weights iso_ST.pt --data Set14 --protocol gaussian8
    python mrda.py train --stage pretrain --degradation realesrgan --data-dir DF2K OST   # then as above (teacher,
    student: + --vgg-weights vgg19-dcbb9e9d.pth); eval --ckpt ... --lr-dir track1-valid-input --hr-dir track1-valid-gt
"""
from __future__ import annotations

import argparse
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
from torch.func import functional_call

import common

SCRIPT = "mrda"
STAGES = ("pretrain", "meta", "teacher", "student")
DEGRADATIONS = ("iso", "aniso_noise", "realesrgan")
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # [official code] MeanShift of RDAN, rgb_range 1, std 1
ADAPTED = ("head.", "body.")           # [Sec. III-B] "not in Upscaler"; `tail.` = upscaler + last conv [DEV]


# ---- 1. Config ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0                        # [ours]
    save_every: int = 5000               # [ours] checkpoint period in steps
    # data
    scale: int = 4                       # [Sec. IV-A] x4
    lr_patch: int = 64                   # [Sec. IV-A] LR patch 64 -> HR crop 256
    degradation: str = "iso"             # [Sec. IV-A] "iso" (IV-B) | "aniso_noise" (IV-C) | "realesrgan" (IV-D)
    kernel_size: int = 21                # [Sec. IV-A]
    sigma_min: float = 0.2               # [Sec. IV-A] iso sigma, aniso lambda1/lambda2 ~ U[0.2, 4]
    sigma_max: float = 4.0               # [Sec. IV-A]
    noise_max: float = 25.0              # [Sec. IV-A, official code] sigma_n ~ U[0, 25] (0-255), aniso_noise
    # model
    mln_feats: int = 128                 # [official code] F, MLN width (D'_T has F channels)
    n_feats: int = 64                    # [official code] RDAN width
    n_blocks: int = 27                   # [Sec. III-E] RDA blocks
    den_feats: int = 64                  # [official code] DEN widths 64/128/256, D = 256-d
    # meta-learning and adaptation [Alg. 1, Alg. 2]
    meta_tasks: int = 5                  # [Sec. IV-A] m
    inner_steps: int = 5                 # [Sec. IV-A] n
    inner_lr: float = 1e-2               # [Sec. IV-A] alpha
    released_step_sizes: bool = False    # [official code, DEV] adaptation alpha = 1e-2, then 5e-3
    # losses
    kd_temperature: float = 0.15         # [official code, DEV] tau of L_kl
    kl_weight: float = 1.0               # [Eq. 6] lambda_kl
    abs_weight: float = 0.01             # [Sec. IV-A] lambda_abs (release: 0.1)
    # optimisation: Adam, lr set at the start of every epoch (epochs from 1) [official code, DEV]
    beta1: float = 0.9                   # [Sec. IV-A]
    beta2: float = 0.999                 # [Sec. IV-A]
    learning_rate: float = 1e-4          # [official code] every stage (paper: 2e-4)
    pretrain_batch: int = 64             # [official code] global: N processes take 64 / N (as every *_batch)
    pretrain_epochs: int = 600           # [official code]
    pretrain_iters: int = 971            # [official code] iterations per epoch
    pretrain_halve_every: int = 125      # [official code]
    meta_batch: int = 32                 # [official code] 16 inner (support) + 16 outer (query) crops
    meta_epochs: int = 600               # [official code]
    meta_iters: int = 216                # [official code]
    meta_halve_every: int = 150          # [official code]
    teacher_batch: int = 16              # [official code]
    teacher_epochs: int = 500            # [official code]
    teacher_iters: int = 1294            # [official code]
    teacher_halve_every: int = 125       # [official code]
    student_batch: int = 16              # [official code]
    warmup_epochs: int = 100             # [official code] estimator-only phase, lr x0.1 every 60 epochs
    warmup_decay_every: int = 60         # [official code]
    joint_epochs: int = 400              # [official code] full loss, halved every 125 epochs
    student_iters: int = 647             # [official code]
    student_halve_every: int = 125       # [official code]
    steps: int = 0                       # [ours] 0: the stage's full schedule; else stop at this step
    preset: str = "paper"                # [ours] the preset the run started from (a label --resume checks)
    # real-world track (--degradation realesrgan, Sec. IV-D); REALWORLD below sets its schedules
    hr_crop: int = 400                   # [ours, as KDSR-GAN] GT crop the Real-ESRGAN pipeline degrades (LR 100)
    ema_decay: float = 0.999             # [ours, as KDSR-GAN] EMA of MRDA_T / MRDA_S, real-world only


PRESETS = {
    "paper": {},
    "smoke": {"mln_feats": 8, "n_feats": 8, "n_blocks": 2, "den_feats": 8, "lr_patch": 16, "meta_tasks": 2,
              "inner_steps": 2, "pretrain_batch": 2, "meta_batch": 4, "teacher_batch": 2, "student_batch": 2,
              "pretrain_epochs": 2, "meta_epochs": 2, "teacher_epochs": 2, "warmup_epochs": 1, "joint_epochs": 1,
              "pretrain_iters": 5, "meta_iters": 5, "teacher_iters": 5, "student_iters": 5,
              "learning_rate": 1e-3, "save_every": 1000, "hr_crop": 96, "ema_decay": 0.9},
}
# Real world [Sec. IV-A], one "epoch" = one iteration: MLN 100K (meta; its bicubic pretraining 100K too [ours]), MRDA_T
# and MRDA_S 600K; lr 2e-4 halved every 400K; alpha 2e-2; batch 64; no estimator-only phase [ours]; RDAN 128 ch [DEV].
REALWORLD = {"n_feats": 128, "learning_rate": 2e-4, "inner_lr": 2e-2, "meta_batch": 64, "teacher_batch": 64,
             "student_batch": 64, "pretrain_epochs": 100_000, "meta_epochs": 100_000, "teacher_epochs": 600_000,
             "warmup_epochs": 0, "joint_epochs": 600_000, **{f"{stage}_iters": 1 for stage in STAGES},
             **{f"{stage}_halve_every": 400_000 for stage in STAGES}}
HANDOFF = {"meta": "pretrain_ckpt", "teacher": "meta_ckpt", "student": "teacher_ckpt"}  # stage -> flag
ARCH = {"pretrain": ("mln_feats", "scale"), "meta": ("mln_feats", "scale"),  # must equal in the next stage
        "teacher": ("mln_feats", "n_feats", "n_blocks", "den_feats", "scale", "inner_lr", "inner_steps",
                    "released_step_sizes")}  # the student's D_T targets need the teacher's adaptation
INHERITED = ("degradation", "inner_lr", "inner_steps", "released_step_sizes")  # from the hand-off unless given


def batch_size(cfg: Config, stage: str) -> int:
    return getattr(cfg, f"{stage}_batch")


def total_steps(cfg: Config, stage: str) -> int:
    """Length of a stage in iterations [official code], or cfg.steps when set."""
    if cfg.steps:
        return cfg.steps
    if stage == "student":
        return (cfg.warmup_epochs + cfg.joint_epochs) * cfg.student_iters
    return getattr(cfg, f"{stage}_epochs") * getattr(cfg, f"{stage}_iters")


def schedule(cfg: Config, stage: str, step: int) -> tuple[float, bool]:
    """(learning rate, estimator-only?) at 1-based `step`; a pure function of the step, so --resume is exact."""
    iters = getattr(cfg, f"{stage}_iters")
    epoch = (step - 1) // iters + 1
    if stage != "student":
        # lr = 1e-4 * 0.5^floor(e / E_half), E_half = 125 (pretrain, teacher) or 150 (meta outer beta) [official code]
        return cfg.learning_rate * 0.5 ** (epoch // getattr(cfg, f"{stage}_halve_every")), False
    if epoch <= cfg.warmup_epochs:
        # e <= 100: lr = 1e-4 * 0.1^floor(e / 60), L = L_kl + L_abs only [official code]
        return cfg.learning_rate * 0.1 ** (epoch // cfg.warmup_decay_every), True
    # e > 100: lr = 1e-4 * 0.5^floor((e - 100) / 125) [official code]
    return cfg.learning_rate * 0.5 ** ((epoch - cfg.warmup_epochs) // cfg.student_halve_every), False


def step_sizes(cfg: Config) -> list[float]:
    """alpha of each of the n adaptation steps of stages 3-4 and teacher eval [Alg. 2 L8]; released: alpha for step 1,
    alpha / 2 for steps 2-5, alpha / 10 after [official code: 1e-2, 5e-3, 1e-3]."""
    if not cfg.released_step_sizes:
        return [cfg.inner_lr] * cfg.inner_steps
    return [cfg.inner_lr / (1 if i == 0 else 2 if i < 5 else 10) for i in range(cfg.inner_steps)]


def check_config(cfg: Config) -> None:
    if cfg.degradation not in DEGRADATIONS:
        raise common.UserError(f"--degradation must be one of {', '.join(DEGRADATIONS)}, got {cfg.degradation!r}")
    if cfg.scale != 4:
        raise common.UserError(f"MRDA is defined for x4 (Sec. IV-A); got scale {cfg.scale}")
    if cfg.inner_steps < 1:
        raise common.UserError(f"the MLN adapts in n >= 1 SGD steps [Alg. 2], got inner_steps={cfg.inner_steps}")
    if cfg.meta_batch < 2 or cfg.meta_batch % 2:
        raise common.UserError(f"the meta batch is split into support and query halves: use an even size >= 2, "
                               f"got {cfg.meta_batch}")


# ---- 2. Degradation ----------------------------------------------------------------------------------------
def sample_degradation(cfg: Config, rnd: common.StepRandom) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ONE kernel (1, k, k) and noise level (1,) for a whole task / mini-batch [Alg. 1 L7, Alg. 2 L3]: a draw of the
    step, the same on every rank (rnd.shared), so the global batch shares it with any number of processes [ours]."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * rnd.shared(1)
    if cfg.degradation == "iso":
        # sigma ~ U[0.2, 4], no noise [Sec. IV-A]
        return common.isotropic_kernels(uniform(cfg.sigma_min, cfg.sigma_max), cfg.kernel_size), None
    # lambda1, lambda2 ~ U[0.2, 4], theta ~ U[0, pi) in radians [Sec. IV-A, DEV], sigma_n ~ U[0, 25]
    lambda1, lambda2 = uniform(cfg.sigma_min, cfg.sigma_max), uniform(cfg.sigma_min, cfg.sigma_max)
    kernel = common.anisotropic_kernels(lambda1, lambda2, uniform(0.0, math.pi), cfg.kernel_size)
    return kernel, uniform(0.0, cfg.noise_max)


@torch.no_grad()
def degrade_batch(img_hr: torch.Tensor, cfg: Config, rnd: common.StepRandom) -> torch.Tensor:
    """I_LR = Q((I_HR * k) down_s + n), one (k, n) for the batch [Eq. 1]; (b, 3, sP, sP) -> (b, 3, P, P). The noise
    field of item i is the step's draw for global item i (common.StepRandom)."""
    kernel, noise = sample_degradation(cfg, rnd)
    return common.degrade(img_hr, kernel, cfg.scale, noise, generator=rnd)


@torch.no_grad()
def training_pair(img_hr: torch.Tensor, cfg: Config, rnd: common.StepRandom) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) of a task / mini-batch: degrade_batch, or real world [Sec. IV-A, IV-D] ONE draw of all Real-ESRGAN
    parameters (kernels, resizes, noise kinds, levels, JPEG, order) and one crop for all its GT crops: the MLN adapts to
    one degradation at a time [ours, DEV]. Drawn from StepRandom (every rank alike); noise fields: this rank's own."""
    if cfg.degradation != "realesrgan":
        return degrade_batch(img_hr, cfg, rnd), img_hr
    task, crop = torch.randint(2**62, (2,), generator=rnd.generator, device=rnd.device).tolist()
    with torch.random.fork_rng(devices=[img_hr.device] if img_hr.is_cuda else []):
        torch.manual_seed(task)
        params = common.sample_realesrgan(1, common.RealESRGANOptions(), img_hr.device)  # batch 1: one draw
        torch.manual_seed(task + 1 + rnd.part.start)
        img_lr = common.apply_realesrgan(img_hr, params, cfg.scale)   # (b, 3, H/s, W/s), the draw on every item
        torch.manual_seed(crop)
        return common.paired_random_crop(img_lr, img_hr, cfg.lr_patch, cfg.scale)   # (b, 3, P, P), (b, 3, sP, sP)


@torch.no_grad()
def bicubic_up(img_lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The MLN's global residual [Sec. III-B]: MATLAB bicubic x s of the 8-bit LR [ours] (release: of the unrounded LR,
    inside its degrader; a test LR exists only in 8 bits), rounded to 8 bits [official code]."""
    return common.quantize(common.imresize(img_lr, scale))


# ---- 3. Networks -------------------------------------------------------------------------------------------
# Copied from kdsr.py:conv3x3
def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.1, inplace=True)                    # on fresh conv / linear outputs only: exact


class MLN(nn.Module):
    """Meta-Learning Network [Sec. III-B, Fig. 2(a)]: conv + 6 convs (LReLU) -> D'_T; upscaler `tail`; + bicubic.

    Only `head` and `body` adapt (meta-learning, per-degradation SGD); `tail` (x4 upsampler + last conv) is fixed
    after the bicubic pretraining so that D'_T stays in one domain [Sec. III-B, Tab. VI; the last conv too: DEV].
    """

    def __init__(self, channels: int = 128, n_body: int = 6, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise ValueError("the released upscaler is x4 (two PixelShuffle(2))")
        f = channels
        self.head = nn.Sequential(conv3x3(3, f), lrelu())
        self.body = nn.Sequential(*(m for _ in range(n_body) for m in (conv3x3(f, f), lrelu())))
        self.tail = nn.Sequential(nn.Sequential(conv3x3(f, 4 * f), nn.PixelShuffle(2), conv3x3(f, 4 * f),
                                                nn.PixelShuffle(2)), conv3x3(f, 3))

    def forward(self, img_lr: torch.Tensor, img_bicubic: torch.Tensor | None = None, with_sr: bool = True):
        """(I_SR^M (B, 3, sh, sw) or None, D'_T (B, F, h, w)); img_bicubic = rounded bicubic x s of img_lr."""
        d_prime = self.body(self.head(img_lr))                        # D'_T (B, F, h, w), after the last LReLU
        if not with_sr:
            return None, d_prime
        return self.tail(d_prime) + img_bicubic, d_prime              # global bicubic residual, no mean shift


class DEN(nn.Module):
    """Degradation Extraction Network [Sec. III-C/D]: 6 convs (two stride 2), global pool, MLP -> D (B, 4c).
    DEN_T reads D'_T (in_channels = F), DEN_S reads the LR image (in_channels = 3)."""

    def __init__(self, in_channels: int = 3, channels: int = 64):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            conv3x3(in_channels, c), lrelu(), conv3x3(c, c), lrelu(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), lrelu(), conv3x3(2 * c, 2 * c), lrelu(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), lrelu(), conv3x3(4 * c, 4 * c), lrelu())
        self.mlp = nn.Sequential(nn.Linear(4 * c, 4 * c), lrelu(), nn.Linear(4 * c, 4 * c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))                 # (B, 4c, h/4, w/4) -> global average pool (B, 4c)
        return self.mlp(x)                                    # D (B, 4c), no final activation


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


class RDAConv(nn.Module):
    """RDA convolution [Eqs. 8-10]: F2 = M * LReLU(DynamicConv(F; w(d))) + F, M = Sigmoid(Conv1x1(F)), 1 channel."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        # w = Linear(C -> C) -> LReLU -> Linear(C -> C k^2), no biases [official code]
        self.kernel = nn.Sequential(nn.Linear(channels, channels, bias=False), lrelu(),
                                    nn.Linear(channels, channels * kernel_size ** 2, bias=False))
        self.conv = nn.Conv2d(channels, 1, 1)                 # "Conv" of Eq. 9

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        weight = self.kernel(d).reshape(*x.shape[:2], k, k)  # channel i of sample b: taps [k^2 i, k^2 (i+1)), row-major
        # F1 = DynamicConv(F; w): depthwise correlation with w_b per sample [Eq. 8], then LReLU [official code]
        f1 = F.leaky_relu(dynamic_depthwise(x, weight), 0.1, inplace=True)
        # M = Sigmoid(Conv(F)) (B, 1, H, W), broadcast over channels [Eq. 9]
        modulation = torch.sigmoid(self.conv(x))
        # F2 = M * F1 + F [Eq. 10]
        return (modulation * f1).add_(x)


class RDABlock(nn.Module):
    """RDA block [Sec. III-E, Fig. 2]: RDAconv, conv, RDAconv (each + LReLU), conv, + x."""

    def __init__(self, channels: int):
        super().__init__()
        self.da_conv1, self.conv1 = RDAConv(channels), conv3x3(channels, channels)
        self.da_conv2, self.conv2 = RDAConv(channels), conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        a = F.leaky_relu(self.da_conv1(x, d), 0.1, inplace=True)   # in place on fresh outputs: exact
        a = F.leaky_relu(self.conv1(a), 0.1, inplace=True)
        a = F.leaky_relu(self.da_conv2(a, d), 0.1, inplace=True)
        return self.conv2(a).add_(x)


class RDAN(nn.Module):
    """Region Degradation Aware SR network [Sec. III-E]: d = LReLU(W D); head, N RDA blocks, conv, + head, x4, tail."""

    def __init__(self, channels: int = 64, n_blocks: int = 27, d_dim: int = 256, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise ValueError("the released upsampler is x4 (two PixelShuffle(2))")
        self.sub_mean, self.add_mean = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        with torch.no_grad():  # fixed DIV2K mean shift, stored in checkpoints (24 values) [official code]
            for conv, sign in ((self.sub_mean, -1.0), (self.add_mean, 1.0)):
                conv.weight.copy_(torch.eye(3)[:, :, None, None])
                conv.bias.copy_(sign * torch.tensor(DIV2K_MEAN))
                conv.requires_grad_(False)
        self.compress = nn.Linear(d_dim, channels, bias=False)
        self.head = conv3x3(3, channels)
        self.blocks = nn.ModuleList(RDABlock(channels) for _ in range(n_blocks))
        self.body_conv = conv3x3(channels, channels)
        self.upsample = nn.Sequential(conv3x3(channels, 4 * channels), nn.PixelShuffle(2),
                                      conv3x3(channels, 4 * channels), nn.PixelShuffle(2))
        self.tail = conv3x3(channels, 3)

    def forward(self, img_lr: torch.Tensor, degradation: torch.Tensor) -> torch.Tensor:
        d = F.leaky_relu(self.compress(degradation), 0.1)     # d (B, C) from D (B, 4c)
        x = y = self.head(self.sub_mean(img_lr))              # (B, C, h, w)
        for block in self.blocks:
            y = block(y, d)
        y = self.body_conv(y).add_(x)
        return self.add_mean(self.tail(self.upsample(y)))     # (B, 3, 4h, 4w)


class MRDA(nn.Module):
    """MRDA_T (teacher: DEN_T reads D'_T of the adapted MLN) or MRDA_S (DEN_S reads LR) = DEN `E` + RDAN `G`."""

    def __init__(self, teacher: bool = False, mln_channels: int = 128, channels: int = 64, n_blocks: int = 27,
                 den_channels: int = 64, scale: int = 4):
        super().__init__()
        self.teacher = teacher
        self.E = DEN(mln_channels if teacher else 3, den_channels)
        self.G = RDAN(channels, n_blocks, 4 * den_channels, scale)

    def forward(self, img_lr: torch.Tensor, d_prime: torch.Tensor | None = None, with_sr: bool = True):
        """(I_SR (B, 3, sh, sw) or None, D (B, 4c)); the teacher needs D'_T (B, F, h, w)."""
        if self.teacher and d_prime is None:
            raise ValueError("the teacher's DEN_T reads D'_T of the adapted MLN")
        degradation = self.E(d_prime if self.teacher else img_lr)
        return (self.G(img_lr, degradation) if with_sr else None), degradation


def build_mln(cfg: Config) -> MLN:
    return MLN(cfg.mln_feats, 6, cfg.scale)


def build_model(cfg: Config, teacher: bool) -> MRDA:
    return MRDA(teacher, cfg.mln_feats, cfg.n_feats, cfg.n_blocks, cfg.den_feats, cfg.scale)


# Copied from kdsr.py:upsample2
def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# Copied from kdsr.py:UNetDiscriminatorSN
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
        return self.conv9(x)


VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
PERCEPTUAL_LAYERS = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}  # conv1_2 ... conv5_4: weight [ours, as KDSR-GAN]


# Copied from kdsr.py:VGG19Features
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
# Copied from kdsr.py:reconstruction_loss
def reconstruction_loss(img_sr: torch.Tensor, img_hr: torch.Tensor) -> torch.Tensor:
    """L_rec = mean |I_SR - I_HR| over all elements, images in [0, 1] [Eq. 2]."""
    return F.l1_loss(img_sr.float(), img_hr.float())


def kl_loss(d_student: torch.Tensor, d_teacher: torch.Tensor, temperature: float = 0.15) -> torch.Tensor:
    """L_kl = (1/B) sum_b sum_j p_T log(p_T / p_S), p = softmax(D / tau) over the 4c entries [Eq. 4, DEV].
    The teacher side is detached: the gradient flows into the student only."""
    log_p_student = F.log_softmax(d_student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(d_teacher.detach().float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def abs_loss(d_student: torch.Tensor, d_teacher: torch.Tensor) -> torch.Tensor:
    """L_abs = mean |D_T - D_S| over B x 4c entries [Eq. 5]."""
    return F.l1_loss(d_student.float(), d_teacher.detach().float())


# Copied from kdsr.py:perceptual_loss
def perceptual_loss(vgg: VGG19Features, img_sr: torch.Tensor, img_hr: torch.Tensor) -> torch.Tensor:
    """L_per = sum_l w_l mean|phi_l(SR) - phi_l(HR)|, w = 0.1, 0.1, 1, 1, 1 on conv1_2 ... conv5_4 before activation
    [App. A.1]; L1 criterion [official code, DEV] (Eq. 12: an L2 norm). The HR branch carries no gradient."""
    feats_sr = vgg(img_sr.float())
    with torch.no_grad():
        feats_hr = vgg(img_hr.float())
    return sum(w * F.l1_loss(feats_sr[i], feats_hr[i]) for i, w in PERCEPTUAL_LAYERS.items())


# Copied from kdsr.py:gan_loss
def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Vanilla GAN: BCE-with-logits against all-real (1) or all-fake (0) targets, mean over every logit
    [official code, DEV] (Eqs. 13-14: L_adv = -D(SR), L_D = D(SR) - D(HR)). G uses gan_loss(D(SR), True)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def sr_loss(img_sr: torch.Tensor, img_hr: torch.Tensor, vgg: VGG19Features | None = None,
            disc: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """The L of Alg. 2 L11: L_rec [Eq. 2] (classic), or with VGG19 and D (real world) L_vis = L_rec + L_per + L_adv,
    unweighted [Eq. 3], D frozen; L_per and the vanilla L_adv are KDSR-GAN's [ours, DEV]. (loss, logged scalars)."""
    l_rec = reconstruction_loss(img_sr, img_hr)
    if disc is None:
        return l_rec, {"l_rec": l_rec.item()}
    disc.requires_grad_(False)                                # G's step: no gradient into D
    l_per, l_adv = perceptual_loss(vgg, img_sr, img_hr), gan_loss(disc(img_sr), True)   # G wants D(SR) called real
    return l_rec + l_per + l_adv, {"l_rec": l_rec.item(), "l_per": l_per.item(), "l_adv": l_adv.item()}


# ---- 5. Training -------------------------------------------------------------------------------------------
def adapt_mln(mln: MLN, img_lr: torch.Tensor, img_bicubic: torch.Tensor, img_hr: torch.Tensor, alphas: list[float],
              dist=None, adapted: tuple[str, ...] = ADAPTED) -> tuple[dict, list[torch.Tensor]]:
    """theta <- theta_M; n x [theta <- theta - alpha grad_theta L1(MLN(LR; theta), HR)] on head + body only
    [Alg. 1 L8-L11, Alg. 2 L4-L9] (adapted + ("tail.",): the upscaler too, as the release's teacher test). theta_M
    (the module's parameters) is never written: the adapted tensors live in a dict used through functional_call, so
    every call starts from theta_M exactly (true reset). Under DDP the L1 is the global batch's (rank_mean), so
    every rank adapts to the theta one process would [ours].
    Returns (theta, support losses before each step); the steps are not differentiated through (first order)."""
    theta = {name: p.detach() for name, p in mln.named_parameters() if name.startswith(adapted)}
    losses = []
    with torch.enable_grad():
        for alpha in alphas:
            theta = {name: t.requires_grad_() for name, t in theta.items()}
            img_sr, _ = functional_call(mln, theta, (img_lr, img_bicubic))
            loss = reconstruction_loss(img_sr, img_hr)
            loss, *grads = common.rank_mean([loss, *torch.autograd.grad(loss, list(theta.values()))], dist)
            theta = {name: (t - alpha * g).detach() for (name, t), g in zip(theta.items(), grads)}
            losses.append(loss.detach())
    return theta, losses


def meta_step(mln: MLN, img_hr: torch.Tensor, cfg: Config, rnd: common.StepRandom, dist) -> tuple[torch.Tensor, dict]:
    """First-order MAML [Alg. 1 L4-L14]: m tasks of one degradation each; adapt on the support items, meta-gradient
    (1/m) sum_i grad_{theta_i} L1(MLN(LR_query; theta_i), HR_query) written into theta_M.grad (no Adam step).
    Support / query: our (MAML) names for the paper's I^tr / I^te [Alg. 1 L4] (the release calls its inner half
    "query"). Under DDP both L1s are the global batch's (rank_mean)."""
    meta = {name: p for name, p in mln.named_parameters() if name.startswith(ADAPTED)}
    meta_grads = [torch.zeros_like(p) for p in meta.values()]
    # support = even, query = odd items of the global batch [ours] (release: first / second half), so every rank's
    # share holds both in equal parts
    support, query = slice(0, None, 2), slice(1, None, 2)
    query_losses, support_losses = [], []
    for _ in range(cfg.meta_tasks):
        img_lr, img_gt = training_pair(img_hr, cfg, rnd)      # one degradation for support and query of task i
        img_bicubic = bicubic_up(img_lr, cfg.scale)
        theta, losses = adapt_mln(mln, img_lr[support], img_bicubic[support], img_gt[support],
                                  [cfg.inner_lr] * cfg.inner_steps, dist)
        theta = {name: t.requires_grad_() for name, t in theta.items()}
        img_sr, _ = functional_call(mln, theta, (img_lr[query], img_bicubic[query]))
        loss = reconstruction_loss(img_sr, img_gt[query])
        # g_i = grad_{theta_i} L_query (first order: d theta_i / d theta_M taken as identity)
        for acc, g in zip(meta_grads, torch.autograd.grad(loss, list(theta.values()))):
            acc += g / cfg.meta_tasks
        query_losses.append(loss.detach())
        support_losses.append(losses[0] if losses else loss.detach())          # at theta_M, before adapting
    for p, g in zip(meta.values(), common.rank_mean(meta_grads, dist)):
        p.grad = g                                            # DDP: the meta-gradient averaged over ranks by hand
    return torch.stack(query_losses).mean(), {"l_support": torch.stack(support_losses).mean().item()}


@torch.no_grad()
def teacher_representation(mln: MLN, img_lr: torch.Tensor, img_hr: torch.Tensor, cfg: Config, dist=None,
                           adapted: tuple[str, ...] = ADAPTED) -> torch.Tensor:
    """D'_T (B, F, h, w) of the MLN adapted on (LR, HR) from theta_M [Alg. 2 L4-L10]; under DDP on the global batch."""
    img_bicubic = bicubic_up(img_lr, cfg.scale)
    theta, _ = adapt_mln(mln, img_lr, img_bicubic, img_hr, step_sizes(cfg), dist, adapted)
    return functional_call(mln, theta, (img_lr, img_bicubic), {"with_sr": False})[1]


def student_step(net: nn.Module, mln: MLN, teacher: MRDA, img_lr, img_hr, cfg: Config, amp: bool, device,
                 estimator_only: bool, dist=None, vgg: VGG19Features | None = None, disc: nn.Module | None = None):
    """L = L_rec + lambda_kl L_kl + lambda_abs L_abs [Eq. 6]; real world L_real = L_vis + lambda_kl L_kl + lambda_abs
    L_abs [Eq. 7]; estimator-only phase: without L_rec [official code]. (loss, scalars[, HR, SR for the D step])."""
    d_prime = teacher_representation(mln, img_lr, img_hr, cfg, dist)             # float32 adaptation, no grad
    with common.autocast(device, amp):
        with torch.no_grad():
            d_teacher = teacher.E(d_prime)                                        # D_T (B, 4c), frozen
        img_sr, d_student = net(img_lr, with_sr=not estimator_only)               # D_S = DEN_S(LR)
    l_kl, l_abs = kl_loss(d_student, d_teacher, cfg.kd_temperature), abs_loss(d_student, d_teacher)
    loss = cfg.kl_weight * l_kl + cfg.abs_weight * l_abs
    scalars = {"l_kl": l_kl.item(), "l_abs": l_abs.item()}
    if estimator_only:
        return loss, scalars
    with common.autocast(device, amp):
        l_sr, sr_scalars = sr_loss(img_sr, img_hr, vgg, disc)                    # L_rec, or L_vis [Eq. 7]
    return loss + l_sr, {**sr_scalars, **scalars}, img_hr, img_sr


# Copied from kdsr.py:disc_step
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


def fit(cfg: Config, args, stage: str, model: nn.Module, step_fn, resume: Path | None, dist, device,
        extra: dict | None = None, find_unused: bool = False, disc: nn.Module | None = None) -> Path:
    """The step all stages share: lr rule, data, step_fn, update; with a D (real-world teacher, student) its step
    after G's and an EMA of G [ours, as KDSR-GAN]. step_fn(net, img_hr, rnd, estimator_only) -> (loss, scalars[, HR,
    SR]); a loss without graph means step_fn set the grads. img_hr: this rank's share of the global batch; rnd: the
    step's draws for all of it. Around it (log, signals, checkpoints, finite-loss guard): common.train_steps."""
    def adam(params):
        return torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    state = {"model": model, "optimizer": adam([p for p in model.parameters() if p.requires_grad])}  # not frozen ones
    if disc is not None:                                            # D: the same Adam and lr rule [ours]
        state.update(ema=copy.deepcopy(model).requires_grad_(False), disc=disc, opt_d=adam(disc.parameters()))
    start = common.restore_state(resume, SCRIPT, stage, state, dist, device) if resume else 0  # RNG too
    common.writable_dir(args.out_dir)                               # before the data is read
    net = common.compiled(common.wrap_ddp(model, dist, find_unused=find_unused), args.compile)
    disc_net = common.wrap_ddp(disc, dist) if disc is not None else None
    real = cfg.degradation == "realesrgan"                          # small images padded; GT crops for the pipeline
    crop = cfg.hr_crop if real and stage != "pretrain" else cfg.lr_patch * cfg.scale   # as KDSR-GAN [ours]
    dataset = common.HRPatches(args.data_dir, crop, pad_small=real)
    batches = common.infinite_batches(dataset, batch_size(cfg, stage), device, seed=cfg.seed, start_step=start,
                                      workers=args.workers, dist=dist)  # step k always sees the same crops

    def one_step(step: int, check) -> dict:
        learning_rate, estimator_only = schedule(cfg, stage, step)
        for group in [g for opt in (state["optimizer"], state.get("opt_d")) if opt for g in opt.param_groups]:
            group["lr"] = learning_rate
        img_hr = next(batches)                                      # (b, 3, sP, sP), b = B / N; real world: GT crops
        if args.channels_last and device.type == "cuda":
            img_hr = img_hr.contiguous(memory_format=torch.channels_last)
        rnd = common.StepRandom(cfg.seed, step, batch_size(cfg, stage), dist, device)  # same with 1 or N ranks
        loss, scalars, *fake = step_fn(net, img_hr, rnd, estimator_only)   # fake: (HR, SR) when SR was made
        loss_mean = check(loss)                                     # mean over ranks, finite, before any update
        if loss.requires_grad:
            state["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
        state["optimizer"].step()
        if disc is not None:                                        # D after G, then the EMA [ours, as KDSR-GAN]
            scalars.update(disc_step(disc_net, state["opt_d"], *fake, args.amp, device, check) if fake else {})
            common.ema_update(state["ema"], model, cfg.ema_decay)
        return {"loss": loss_mean.item(), **scalars, "lr": learning_rate}

    def payload(step: int, rng: dict) -> dict:
        return {"script": SCRIPT, "stage": stage, "step": step, "config": dataclasses.asdict(cfg),
                **{key: part.state_dict() for key, part in state.items()},  # model, optimizer (+ EMA, D, its Adam)
                "scheduler": None,  # the learning rate is a pure function of the step: schedule()
                "rng": rng, **(extra or {})}

    with contextlib.closing(batches):
        return common.train_steps(one_step, start, total_steps(cfg, stage), payload, args.out_dir, stage,
                                  args.log_every, cfg.save_every, dist, device, batch_size(cfg, stage), resume)


def load_stage(path, stage: str, cfg: Config) -> dict:
    """The checkpoint an earlier stage handed over; its architecture must equal this stage's."""
    ckpt = common.load_checkpoint(path, SCRIPT, (stage,), device="cpu")
    saved = Config(**ckpt["config"])
    if bad := [a for a in ARCH[stage] if getattr(saved, a) != getattr(cfg, a)]:
        raise common.UserError(f"{path} has {', '.join(f'{a}={getattr(saved, a)}' for a in bad)} but this stage "
                               f"has {', '.join(f'{a}={getattr(cfg, a)}' for a in bad)}: use the same --preset "
                               f"and flags as for the {stage} stage")
    return ckpt


def frozen_mln(state: dict, cfg: Config, device) -> MLN:
    """theta_M, never updated: adaptation only ever builds copies of it (adapt_mln)."""
    mln = build_mln(cfg)
    mln.load_state_dict(state)
    return mln.to(device).eval().requires_grad_(False)


def gan_parts(cfg: Config, args, device, disc_state: dict | None = None):
    """(VGG19, D) of L_vis [Eq. 3, 7], D fresh or the teacher's [ours]; classic: (None, None). VGG19: never saved."""
    if cfg.degradation != "realesrgan":
        return None, None
    disc = UNetDiscriminatorSN()
    if disc_state is not None:
        disc.load_state_dict(disc_state)
    return tuple(common.to_device(m, device, args.channels_last) for m in (load_vgg19(args.vgg_weights), disc))


def train_pretrain(cfg: Config, args, resume: Path | None, device, dist) -> Path:
    """Stage 1 [Alg. 1 L2]: the whole MLN on bicubic-only LR with L1 (real world too, on its data [ours])."""
    mln = common.to_device(build_mln(cfg), device, args.channels_last)

    def step_fn(net, img_hr, rnd, estimator_only):
        img_lr = common.degrade(img_hr, None, cfg.scale)     # (b, 3, P, P), bicubic down only [Alg. 1 L2]
        img_bicubic = bicubic_up(img_lr, cfg.scale)          # fp32 outside autocast, as in the later stages
        with common.autocast(device, args.amp):
            img_sr, _ = net(img_lr, img_bicubic)
        return sr_loss(img_sr, img_hr)

    return fit(cfg, args, "pretrain", mln, step_fn, resume, dist, device)


def train_meta(cfg: Config, args, resume: Path | None, device, dist) -> Path:
    """Stage 2 [Alg. 1]: first-order MAML of head + body; the upscaler `tail` is fixed [Sec. III-B]."""
    if resume is None and not args.pretrain_ckpt:
        raise common.UserError("the meta stage needs --pretrain-ckpt FILE (the pretrain stage's last.pt)")
    if cfg.meta_batch % (2 * dist.world_size):
        raise common.UserError(f"the meta batch {cfg.meta_batch} is global: each of the {dist.world_size} processes "
                               f"needs an even share (its support and query items alternate)")
    mln = build_mln(cfg)
    if resume is None:
        mln.load_state_dict(load_stage(args.pretrain_ckpt, "pretrain", cfg)["model"])
    mln.tail.requires_grad_(False)                                         # not in Adam, not adapted
    mln = common.to_device(mln, device, args.channels_last)

    def step_fn(net, img_hr, rnd, estimator_only):  # the meta-gradient is all-reduced by hand: no DDP forward
        return meta_step(common.unwrap(net), img_hr, cfg, rnd, dist)

    return fit(cfg, args, "meta", mln, step_fn, resume, dist, device, extra={"pretrain_ckpt": str(args.pretrain_ckpt)})


def train_teacher(cfg: Config, args, resume: Path | None, device, dist) -> Path:
    """Stage 3 [Alg. 2]: per batch adapt the MLN from theta_M, D'_T -> DEN_T -> RDAN_T; L_rec (real world: L_vis and
    a D step [Alg. 2 L11]) on DEN_T + RDAN_T."""
    if resume is None and not args.meta_ckpt:
        raise common.UserError("the teacher stage needs --meta-ckpt FILE (the meta stage's last.pt)")
    state = (common.load_checkpoint(resume, SCRIPT, ("teacher",))["mln"] if resume
             else load_stage(args.meta_ckpt, "meta", cfg)["model"])
    mln = frozen_mln(state, cfg, device)
    model = common.to_device(build_model(cfg, teacher=True), device, args.channels_last)
    vgg, disc = gan_parts(cfg, args, device)

    def step_fn(net, img_hr, rnd, estimator_only):
        img_lr, img_hr = training_pair(img_hr, cfg, rnd)                  # one degradation per global batch
        d_prime = teacher_representation(mln, img_lr, img_hr, cfg, dist)  # (b, F, P, P), adapted on it, no grad
        with common.autocast(device, args.amp):
            img_sr, _ = net(img_lr, d_prime)
            return (*sr_loss(img_sr, img_hr, vgg, disc), img_hr, img_sr)

    return fit(cfg, args, "teacher", model, step_fn, resume, dist, device, disc=disc,
               extra={"mln": mln.state_dict(), "meta_ckpt": str(args.meta_ckpt)})


def init_student_from_teacher(student: MRDA, teacher_state: dict) -> list[str]:
    """RDAN_S <- RDAN_T: exactly the teacher's G.* tensors [Sec. III-D]; DEN_S keeps its fresh init."""
    g_state = {key[len("G."):]: value for key, value in teacher_state.items() if key.startswith("G.")}
    student.G.load_state_dict(g_state, strict=True)
    return sorted(f"G.{key}" for key in g_state)


def train_student(cfg: Config, args, resume: Path | None, device, dist) -> Path:
    """Stage 4 [Sec. III-D, Fig. 2(c)]: frozen adapted MLN + DEN_T give D_T; DEN_S distilled, RDAN_S fine-tuned (real
    world: from the teacher's EMA weights, with its D [ours]). Estimator-only phase: no G gradient (DDP is told)."""
    if not args.teacher_ckpt:
        raise common.UserError("the student stage needs --teacher-ckpt FILE (the teacher stage's last.pt)")
    teacher_ckpt = load_stage(args.teacher_ckpt, "teacher", cfg)
    mln = frozen_mln(teacher_ckpt["mln"], cfg, device)
    teacher, teacher_state = build_model(cfg, teacher=True), teacher_ckpt.get("ema") or teacher_ckpt["model"]  # EMA
    teacher.load_state_dict(teacher_state)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = build_model(cfg, teacher=False)
    if resume is None:
        copied = init_student_from_teacher(student, teacher_state)
        if dist.is_main:
            print(f"student G initialised from {args.teacher_ckpt} ({len(copied)} tensors); E (DEN_S) fresh")
    model = common.to_device(student, device, args.channels_last)
    vgg, disc = gan_parts(cfg, args, device, None if resume else teacher_ckpt.get("disc"))

    def step_fn(net, img_hr, rnd, estimator_only):
        img_lr, img_hr = training_pair(img_hr, cfg, rnd)
        return student_step(net, mln, teacher, img_lr, img_hr, cfg, args.amp, device, estimator_only, dist, vgg, disc)

    return fit(cfg, args, "student", model, step_fn, resume, dist, device, disc=disc,
               extra={"teacher_ckpt": str(args.teacher_ckpt)}, find_unused=cfg.warmup_epochs > 0)


# ---- 6. Evaluation -----------------------------------------------------------------------------------------
def load_for_inference(args, device) -> tuple[MRDA, MLN | None, Config, str]:
    """(model, MLN theta_M for a teacher or None, cfg, name) from our checkpoint or from released weights."""
    if bool(args.ckpt) == bool(args.official_weights):
        raise common.UserError("give exactly one of --ckpt FILE (from `train`) or --official-weights FILE")
    if args.official_weights:
        model, cfg = load_official(args.official_weights)
        if model.teacher and not args.official_mln:
            raise common.UserError("an MRDA_T file needs the released MLN too: add --official-mln FILE")
        mln = load_official_mln(args.official_mln, cfg) if model.teacher else None
        args.source = f"{args.official_weights} (released)"
    else:
        ckpt = common.load_checkpoint(args.ckpt, SCRIPT, ("teacher", "student"), device="cpu")
        cfg, args.source = Config(**ckpt["config"]), f"{args.ckpt} (step {ckpt['step']})"
        model = build_model(cfg, teacher=ckpt["stage"] == "teacher")
        model.load_state_dict(ckpt.get("ema") or ckpt["model"])     # the EMA weights when the run kept them
        mln = frozen_mln(ckpt["mln"], cfg, "cpu") if model.teacher else None
    if args.scale != cfg.scale:
        raise common.UserError(f"{args.ckpt or args.official_weights} is a x{cfg.scale} model but --scale "
                               f"{args.scale} was given: use --scale {cfg.scale}")
    if args.released_step_sizes is not None:   # default: as trained (a released file: the paper's alpha)
        cfg = dataclasses.replace(cfg, released_step_sizes=args.released_step_sizes)
    name = f"MRDA_{'T' if model.teacher else 'S'}{'-GAN' * (cfg.degradation == 'realesrgan')}"
    name += "-oracle" * model.teacher + ("" if cfg.preset == "paper" else f"-{cfg.preset}")   # MRDA_S-smoke
    name += " released-steps" * (model.teacher and cfg.released_step_sizes) + " adapt-upscaler" * args.adapt_upscaler
    return common.to_device(model, device, args.channels_last).eval(), mln and mln.to(device), cfg, name


def oracle_sr_fn(model: MRDA, mln: MLN, cfg: Config, data, args, device):
    """Teacher eval [official code]: per test image reset to theta_M, adapt n steps on its own HR (batch 1), infer. It
    needs the HR, so it is an upper bound, not blind SR. --adapt-upscaler adapts the MLN tail too, as the release's
    teacher test [official code]. run_benchmark visits the images in sorted order and every degradation of one
    image in turn; this stream yields the matching HR for each call."""
    _, files = common.find_benchmark(data, args.data_root)
    repeats = len(common.test_degradations(args.protocol, args.scale))
    def modcropped_hr(path) -> torch.Tensor:                                          # (3, H, W) in [0, 1]
        return torch.from_numpy(common.modcrop(common.load_uint8(path), args.scale).copy()).permute(2, 0, 1) / 255
    stream = (hr for path in files[: args.limit] for hr in [modcropped_hr(path)] * repeats)

    def sr_fn(img_lr: torch.Tensor) -> torch.Tensor:
        img_hr = next(stream)[None].to(device)                                        # (1, 3, H, W)
        if img_hr.shape[-2:] != tuple(args.scale * s for s in img_lr.shape[-2:]):
            raise common.UserError(f"internal: HR {tuple(img_hr.shape)} does not match LR {tuple(img_lr.shape)}")
        adapted = ADAPTED + ("tail.",) if args.adapt_upscaler else ADAPTED
        d_prime = teacher_representation(mln, img_lr, img_hr, cfg, adapted=adapted)    # adapted from theta_M
        with common.autocast(device, args.amp):
            return model(img_lr, d_prime)[0].float()
    return sr_fn


def evaluate(args) -> list[dict]:
    """Benchmark tables (the README's evaluation protocol: Gaussian8 [Tab. II], aniso+noise [Tab. III]) or paired
    real-world folders [Tab. IV] (--lr-dir + --hr-dir; --lr-dir alone writes SR PNGs), beside the bicubic row."""
    device = common.pick_device(args.device)
    model, mln, cfg, name = load_for_inference(args, device)
    if model.teacher and (args.tile or args.lr_dir):    # the teacher adapts its MLN on a benchmark image's whole HR
        raise common.UserError(f"--{'tile' if args.tile else 'lr-dir'} is for the student, not the teacher (oracle)")
    if not model.teacher and (args.adapt_upscaler or args.released_step_sizes):
        raise common.UserError("--adapt-upscaler and --released-step-sizes are for a teacher: a student does not adapt")
    name, net = name + (f" tile{args.tile}" if args.tile else ""), common.compiled(model, args.compile)

    @torch.no_grad()
    def blind_sr(img_lr: torch.Tensor) -> torch.Tensor:
        with common.autocast(device, args.amp):
            return net(img_lr)[0].float()

    blind_sr = common.tiled(blind_sr, args.scale, args.tile, args.tile_overlap)   # tile 0: blind_sr itself
    return common.evaluate_sets(lambda data: oracle_sr_fn(net, mln, cfg, data, args, device) if model.teacher
                                else blind_sr, name, args.source, args, device)   # all checked before the first image


# ---- 7. Official weights -----------------------------------------------------------------------------------
# Released files are raw state dicts [official code]: MRDA_S / MRDA_T with "G." (RDAN) and "E_st." / "E." (DEN, convs in
# one Sequential "E.E.{i}"), the MLN with exactly our key names. The tables map official module prefixes to ours.
def official_key_map(n_blocks: int, estimator_prefix: str) -> dict[str, str]:
    """{official module prefix: our module prefix}; parameter names below the prefixes are identical."""
    e = estimator_prefix
    table = {"G.sub_mean": "G.sub_mean", "G.add_mean": "G.add_mean", "G.head.0": "G.head",
             "G.compress.0": "G.compress", "G.body.1": "G.body_conv", "G.tail.0": "G.upsample", "G.tail.1": "G.tail",
             f"{e}E": "E.features", f"{e}mlp": "E.mlp"}
    table.update({f"G.body.0.body.{i}": f"G.blocks.{i}" for i in range(n_blocks)})
    return table


def load_official(path) -> tuple[MRDA, Config]:
    """MRDA_S (prefix E_st., e.g. iso_ST.pt) or MRDA_T (prefix E.) from a released file; widths read from shapes."""
    state = common.read_released(path, "MRDA", SCRIPT)
    teacher = any(k.startswith("E.") for k in state)
    prefix = "E." if teacher else "E_st."
    try:
        n_feats, den_in = state["G.head.0.weight"].shape[0], state[f"{prefix}E.0.weight"].shape[1]
        den_feats = state[f"{prefix}E.0.weight"].shape[0]
    except KeyError as err:
        raise common.UserError(f"not an MRDA_S/MRDA_T file: no {err} (keys start with "
                               f"{', '.join(sorted({k.split('.')[0] for k in state})[:5])})") from None
    n_blocks = len({m.group(1) for k in state if (m := re.match(r"G\.body\.0\.body\.(\d+)\.", k))})
    cfg = Config(n_feats=n_feats, n_blocks=n_blocks, den_feats=den_feats, mln_feats=den_in if teacher else 128)
    model = build_model(cfg, teacher)
    table = official_key_map(n_blocks, prefix)
    model.load_state_dict(common.convert_official(state, model.state_dict(), table), strict=True)
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):  # fixed constants: check, do not learn
        conv = getattr(model.G, name)
        if not (torch.allclose(conv.weight.flatten(1), torch.eye(3), atol=1e-6)
                and torch.allclose(conv.bias, sign * torch.tensor(DIV2K_MEAN), atol=1e-4)):
            raise common.UserError(f"G.{name} of {path} is not the DIV2K mean shift (bias {conv.bias.tolist()})")
    return model, cfg


# Copied from kdsr.py:load_vgg19
def load_vgg19(path) -> VGG19Features:
    """VGG19Features from a torchvision `vgg19` state dict (features.* strict on names and shapes, classifier.*
    ignored). Never downloaded: the user passes the file."""
    vgg, expected = VGG19Features(), "a torchvision VGG19 state dict (vgg19-dcbb9e9d.pth)"
    state = {k: v for k, v in common.read_weights(path, expected).items() if not k.startswith("classifier.")}
    vgg.load_state_dict(common.strict_state(state, vgg.state_dict(), path, expected))
    return vgg.eval().requires_grad_(False)


def load_official_mln(path, cfg: Config) -> MLN:
    """The released MLN (theta_M after meta-learning), strict; its width must match MRDA_T's DEN_T input."""
    state = common.read_released(path, "MRDA", SCRIPT)
    width = state["head.0.weight"].shape[0] if "head.0.weight" in state else None
    if width != cfg.mln_feats:
        raise common.UserError(f"{path} is not an MLN of width {cfg.mln_feats} (head.0.weight: {width} channels)")
    mln = build_mln(cfg)
    mln.load_state_dict(common.convert_official(state, mln.state_dict(), {p: p for p in ("head", "body", "tail")}))
    return mln.eval().requires_grad_(False)


# ---- 8. CLI ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrda.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="pretrain -> meta -> teacher -> student [Alg. 1, Alg. 2, Sec. III-D]")
    tr.add_argument("--stage", choices=STAGES, required=True)
    tr.add_argument("--pretrain-ckpt", help="meta stage: the pretrain stage's checkpoint (the MLN to meta-learn)")
    tr.add_argument("--meta-ckpt", help="teacher stage: the meta stage's checkpoint (theta_M)")
    tr.add_argument("--teacher-ckpt", help="student stage: the teacher's checkpoint (RDAN_T, DEN_T, theta_M)")
    tr.add_argument("--data-dir", nargs="+", required=True, help="HR training folder(s), e.g. DIV2K + Flickr2K")
    tr.add_argument("--degradation", choices=DEGRADATIONS, help="iso (Tab. II), aniso_noise (Tab. III) or realesrgan "
                                                              "(Tab. IV, from the pretrain stage on); default iso")
    tr.add_argument("--vgg-weights", help="real-world teacher, student: torchvision VGG19 state dict for L_per")
    tr.add_argument("--preset", choices=tuple(PRESETS), help="paper (default) or smoke (a tiny model for trials)")
    tr.add_argument("--steps", type=common.at_least(1), help="stop at this step (default: the stage's full schedule)")
    tr.add_argument("--batch-size", type=common.at_least(1), help="override this stage's global batch size (N "
                                                                   "processes take batch / N each)")
    tr.add_argument("--save-every", type=common.at_least(1), help="override the checkpoint period (steps)")
    tr.add_argument("--released-step-sizes", action=argparse.BooleanOptionalAction, default=None,
                    help="adaptation alpha 1e-2, 5e-3, from step 6 1e-3, as the release (default: 1e-2 every step)")
    tr.add_argument("--abs-weight", type=common.at_least(0, float), help="student lambda_abs (paper 0.01, code 0.1)")
    tr.add_argument("--resume", nargs="?", const="", help="checkpoint to resume (no value: <out-dir>/last.pt)")
    common.add_run_args(tr)
    ev = sub.add_parser("eval", help="benchmark a student (blind) or a teacher (oracle: adapts on the HR)")
    ev.add_argument("--ckpt", help="student or teacher checkpoint written by `train`")
    ev.add_argument("--official-weights", help="released MRDA_S file (iso_ST.pt, aniso_noise_ST.pt) or MRDA_T file")
    ev.add_argument("--official-mln", help="released MLN file, needed with an MRDA_T file")
    ev.add_argument("--released-step-sizes", action=argparse.BooleanOptionalAction, default=None,
                    help="teacher: alpha 1e-2, 5e-3, from step 6 1e-3, as the release (default: as trained; paper)")
    ev.add_argument("--adapt-upscaler", action=argparse.BooleanOptionalAction, default=False,
                    help="teacher: adapt the MLN upscaler too, as the release's teacher test (default: head + body)")
    common.add_run_args(ev)
    common.add_eval_args(ev)
    common.add_paired_args(ev)
    ev.add_argument("--tile", type=common.at_least(0), default=0,
                    help="student: super-resolve LR tiles of N px to bound memory (default 0: whole image). DEN_S "
                         "pools globally, so each tile gets its own D: the output differs from the whole-image one "
                         "unless the tile covers the LR image. Not for the teacher (it adapts on the whole HR)")
    ev.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    return common.show_defaults(parser, Config)


def config_from_args(args, resume: Path | None) -> Config:
    """paper defaults <- REALWORLD (real-world track) <- --preset <- the hand-off checkpoint's INHERITED fields <-
    explicit flags; with --resume the checkpoint's config (+ --steps)."""
    flags = {f"{args.stage}_batch": args.batch_size, "save_every": args.save_every, "degradation": args.degradation,
             "seed": args.seed, "abs_weight": args.abs_weight, "released_step_sizes": args.released_step_sizes,
             "preset": args.preset}
    if resume is not None:
        return Config(**common.resumed(resume, SCRIPT, (args.stage,), args.steps, flags,
                                       {f"{args.stage}_batch": "batch-size"})["config"])
    overrides, saved = {**flags, "steps": args.steps}, {}
    if (handoff := HANDOFF.get(args.stage)) and getattr(args, handoff):     # stage checked later by load_stage
        config = common.load_checkpoint(getattr(args, handoff), SCRIPT)["config"]
        saved = {k: config[k] for k in INHERITED}
    track = REALWORLD if (args.degradation or saved.get("degradation")) == "realesrgan" else {}
    cfg = dataclasses.replace(Config(), **{**track, **PRESETS[args.preset or "paper"], **saved})
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None):
    args = build_parser().parse_args(argv)
    with common.cli_errors():
        if args.command == "eval":
            args.out_dir = args.out_dir or f"runs/{SCRIPT}/eval"
            return evaluate(args)
        args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.stage}"
        resume = Path(args.resume or Path(args.out_dir) / "last.pt") if args.resume is not None else None
        cfg = config_from_args(args, resume)
        check_config(cfg)
        if cfg.degradation == "realesrgan" and args.stage in ("teacher", "student") and not args.vgg_weights:
            raise common.UserError(f"the real-world {args.stage} trains with L_vis (Eq. 3): give --vgg-weights FILE, a "
                                   f"torchvision VGG19 state dict (vgg19-dcbb9e9d.pth); it is never downloaded")
        handoff = HANDOFF.get(args.stage)  # a resumed checkpoint remembers the one it was started from
        if handoff and resume is not None and not getattr(args, handoff):
            setattr(args, handoff, common.load_checkpoint(resume, SCRIPT, (args.stage,))[handoff])
        stage_fn = {"pretrain": train_pretrain, "meta": train_meta, "teacher": train_teacher,
                    "student": train_student}[args.stage]
        device = common.pick_device(args.device)
        dist = common.ddp_setup(device)
        common.seed_everything(cfg.seed + dist.rank)  # rank 0 = a single process; training draws use StepRandom
        try:
            return stage_fn(cfg, args, resume, device, dist)
        finally:
            common.ddp_teardown(dist)


if __name__ == "__main__":
    main()
