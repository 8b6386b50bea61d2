"""KDSR: Knowledge Distillation based Degradation Estimation for Blind Super-Resolution.

Xia et al., ICLR 2023, arXiv 2211.16928. Official code: Zj-BinXia/KDSR (classic degradations, x4).
Spec: ../shared/specs/kdsr.md. Two stages: `teacher` (sees LR and HR) -> `student` (sees LR only).

Paper map (paper element -> symbol here)
    Eq. 1   classic degradation, Sec. 4.1 ranges         -> sample_degradations, degrade_batch
    Sec. 3.2, Fig. 2(c) KD-IDE_T / KD-IDE_S               -> Estimator (teacher: 51 input channels)
            D' (4C, distilled) and D (C, fed to the SR net) -> Estimator.forward -> (d, d_prime)
    Eqs. 4-5, Fig. 2(a) IDR-DDC                           -> IDRDDC (one grouped conv per call)
    Sec. 3.3, Fig. 2(b) IDR-DCRB                          -> IDRDCRB
    Fig. 2(d)(e) SR network, KDSR_T / KDSR_S              -> SRNetwork, KDSR
    Eq. 2   L_rec;  Eq. 6 L_kl;  Eq. 7/15 L_classic       -> reconstruction_loss, kd_loss, student_step
    Sec. 3.4 two-stage training, Sec. 4.1 schedules       -> train_teacher, train_student, schedule
    Tab. 1 (Gaussian8), Tab. 2 (Set14 aniso+noise)        -> evaluate (common.run_benchmark protocols)
    Fig. 6  IDR visualisation (t-SNE in the paper)        -> embed (PCA scatter drawn with Pillow)

Deviations (each [DEV] is listed in the README):
    - [DEV] one kernel and one noise level per *sample* (release: one per mini-batch; paper: per image).
    - [DEV] schedules of the released scripts (teacher 500 epochs, halve every 125; iso student 600 / 150;
      aniso student 100 estimator-only + 400 joint), Adam beta2 = 0.999 (paper text: 600 / 150, 0.99).
    - [DEV] "lambda_kd = 0.15" of Sec. 4.1 read as temperature 0.15 and weight 1 (authors, issue #2).
    - [DEV] the student's SR network is copied from the teacher by an explicit named load; its estimator is
      freshly initialised on purpose (release: strict=False load that silently skips it).
    - [DEV] the teacher's estimator runs under no_grad at distillation time (release: autograd on, same values).

Usage:
    python kdsr.py train --stage teacher --data-dir DIV2K/HR Flickr2K/HR --degradation iso --size M
    python kdsr.py train --stage student --teacher-ckpt runs/kdsr/teacher/last.pt --data-dir DIV2K/HR Flickr2K/HR
    python kdsr.py eval --ckpt runs/kdsr/student/last.pt --data Set5 Set14 B100 Urban100 Manga109
    python kdsr.py eval --official-weights KDSRsM_iso_x4.pt --data Set14 --protocol gaussian8
    python kdsr.py embed --ckpt runs/kdsr/student/last.pt --data Set14
    torchrun --nproc_per_node=4 kdsr.py train --stage teacher --data-dir DF2K/HR --amp --channels-last
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

SCRIPT = "kdsr"
STAGES = ("teacher", "student")
DEGRADATIONS = ("iso", "aniso_noise")
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
    batch_size: int = 64                 # [Sec. 4.1] per process under DDP
    degradation: str = "iso"             # [Sec. 4.1] "iso" (Sec. 4.2) | "aniso_noise" (Sec. 4.3)
    kernel_size: int = 21                # [Sec. 4.1]
    sigma_min: float = 0.2               # [Sec. 4.1] iso sigma, aniso lambda1/lambda2 ~ U[0.2, 4.0]
    sigma_max: float = 4.0               # [Sec. 4.1]
    noise_max: float = 25.0              # [Sec. 4.1] sigma_n ~ U[0, 25] (0-255 scale), aniso_noise only
    # model (size M; PRESETS["L"] for size L)
    size: str = "M"                      # [Tab. 1] label only
    n_feats: int = 64                    # [Tab. 1] C
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
    steps: int = 0                       # [ours] 0: the stage's full schedule; else stop at this step


SIZES = {"M": {"size": "M", "n_feats": 64, "n_blocks": 53, "n_resblocks": 9},     # KDSR_S-M [Tab. 1]
         "L": {"size": "L", "n_feats": 128, "n_blocks": 28, "n_resblocks": 5}}    # KDSR_S-L [Tab. 1]
PRESETS = {
    "paper": {},
    "smoke": {"size": "smoke", "n_feats": 8, "n_blocks": 2, "n_resblocks": 1, "lr_patch": 16, "batch_size": 2,
              "iters_per_epoch": 5, "teacher_epochs": 2, "student_epochs": 2, "warmup_epochs": 1, "joint_epochs": 1,
              "learning_rate": 1e-3, "warmup_learning_rate": 1e-3, "save_every": 1000},
}


def total_steps(cfg: Config, stage: str) -> int:
    """Length of a stage in iterations [official code], or cfg.steps when set."""
    if cfg.steps:
        return cfg.steps
    if stage == "teacher":
        epochs = cfg.teacher_epochs
    else:
        epochs = cfg.student_epochs if cfg.degradation == "iso" else cfg.warmup_epochs + cfg.joint_epochs
    return epochs * cfg.iters_per_epoch


def schedule(cfg: Config, stage: str, step: int) -> tuple[float, bool]:
    """(learning rate, estimator-only?) at 1-based `step`; a pure function of the step, so --resume is exact."""
    epoch = (step - 1) // cfg.iters_per_epoch + 1
    if stage == "teacher":
        # lr = 1e-4 * 0.5^floor(e / 125) [official code]
        return cfg.learning_rate * 0.5 ** (epoch // cfg.teacher_halve_every), False
    if cfg.degradation == "iso":
        # lr = 1e-4 * 0.5^floor(e / 150) [official code]
        return cfg.learning_rate * 0.5 ** (epoch // cfg.student_halve_every), False
    if epoch <= cfg.warmup_epochs:
        # e <= 100: lr = 2e-4 * 0.1^floor(e / 60), L_kl only [official code]
        return cfg.warmup_learning_rate * 0.1 ** (epoch // cfg.warmup_decay_every), True
    # e > 100: lr = 1e-4 * 0.5^floor((e - 100) / 125) [official code]
    return cfg.learning_rate * 0.5 ** ((epoch - cfg.warmup_epochs) // cfg.joint_halve_every), False


def check_config(cfg: Config) -> None:
    if cfg.degradation not in DEGRADATIONS:
        raise common.UserError(f"--degradation must be one of {', '.join(DEGRADATIONS)}, got {cfg.degradation!r}")
    if cfg.scale != 4:
        raise common.UserError(f"KDSR is defined for x4 (Sec. 4.1); got scale {cfg.scale}")
    if cfg.lr_patch * cfg.scale <= cfg.kernel_size // 2:
        raise common.UserError(f"HR patch {cfg.lr_patch * cfg.scale} px is too small for a {cfg.kernel_size}-tap blur")


# ---- 2. Degradation ----------------------------------------------------------------------------------------
def sample_degradations(batch: int, kind: str, sigma_min: float, sigma_max: float, noise_max: float,
                        kernel_size: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One blur kernel (B, k, k) and one noise level (B,) per sample [Sec. 4.1, DEV]; global RNG (saved on resume)."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, device=device)
    if kind == "iso":
        # sigma ~ U[0.2, 4.0], no noise [Sec. 4.2]
        return common.isotropic_kernels(uniform(sigma_min, sigma_max), kernel_size), None
    # lambda1, lambda2 ~ U[0.2, 4.0], theta ~ U[0, pi), sigma_n ~ U[0, 25] [Sec. 4.3]
    lambda1, lambda2 = uniform(sigma_min, sigma_max), uniform(sigma_min, sigma_max)
    kernels = common.anisotropic_kernels(lambda1, lambda2, uniform(0.0, math.pi), kernel_size)
    return kernels, uniform(0.0, noise_max)


@torch.no_grad()
def degrade_batch(img_hr: torch.Tensor, cfg: Config) -> torch.Tensor:
    """I_LR = Q((I_HR * k) down_s + n) per sample [Eq. 1]; (B, 3, sP, sP) -> (B, 3, P, P)."""
    kernels, noise = sample_degradations(img_hr.shape[0], cfg.degradation, cfg.sigma_min, cfg.sigma_max,
                                         cfg.noise_max, cfg.kernel_size, img_hr.device)
    return common.degrade(img_hr, kernels, cfg.scale, noise)


# ---- 3. Networks -------------------------------------------------------------------------------------------
def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResBlock(nn.Module):
    """Estimator residual block: x + conv(LReLU(conv(x))), no activation after the add [official code]."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), nn.LeakyReLU(0.1), conv3x3(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Estimator(nn.Module):
    """KD-IDE [Sec. 3.2, Fig. 2(c)]: image -> (D (B, C), D' (B, 4C)); all convs at full LR resolution.

    Student input: LR (B, 3, h, w). Teacher input: concat(LR, PixelUnshuffle_s(HR)) (B, 3 + 3s^2, h, w).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_resblocks: int = 9):
        super().__init__()
        c = channels
        self.head = conv3x3(in_channels, c)
        self.blocks = nn.Sequential(*(ResBlock(c) for _ in range(n_resblocks)))
        self.widen = nn.Sequential(conv3x3(c, 2 * c), nn.LeakyReLU(0.1), conv3x3(2 * c, 2 * c), nn.LeakyReLU(0.1),
                                   conv3x3(2 * c, 4 * c), nn.LeakyReLU(0.1))
        self.mlp = nn.Sequential(nn.Linear(4 * c, 4 * c), nn.LeakyReLU(0.1), nn.Linear(4 * c, 4 * c), nn.LeakyReLU(0.1))
        self.compress = nn.Sequential(nn.Linear(4 * c, c), nn.LeakyReLU(0.1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.blocks(F.leaky_relu(self.head(x), 0.1))      # (B, C, h, w)
        x = self.widen(x).mean(dim=(2, 3))                    # global average pool: (B, 4C)
        d_prime = self.mlp(x)                                 # D' (B, 4C): the distilled IDR
        return self.compress(d_prime), d_prime                # D (B, C): guides the SR network


class IDRDDC(nn.Module):
    """IDR-based depthwise dynamic convolution [Eqs. 4-5, Fig. 2(a)]: a per-sample 3x3 depthwise kernel from D."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        # phi: Linear(C -> C) -> LReLU -> Linear(C -> C k^2), no biases [Eq. 4, official code]
        self.kernel = nn.Sequential(nn.Linear(channels, channels, bias=False), nn.LeakyReLU(0.1),
                                    nn.Linear(channels, channels * kernel_size ** 2, bias=False))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        # W = Reshape(phi(D)): channel i of sample b uses taps [k^2 i, k^2 (i + 1)), row-major [Eq. 4]
        weight = self.kernel(d).reshape(b * c, 1, k, k)        # (B*C, 1, k, k)
        # F_out[i] = F_in[i] (x) W[i] for every sample: one grouped conv, B*C groups [Eq. 5]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=k // 2, groups=b * c)
        return out.reshape(b, c, h, w)


class IDRDCRB(nn.Module):
    """IDR-based dynamic convolution residual block [Sec. 3.3, Fig. 2(b)]: x + conv(LReLU(IDR-DDC(x, D)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.da_conv1 = IDRDDC(channels)
        self.conv1 = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.leaky_relu(self.da_conv1(x, d), 0.1))


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
        y = self.body_conv(y) + x                              # global residual
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


# ---- 5. Training -------------------------------------------------------------------------------------------
def teacher_step(net: nn.Module, img_lr: torch.Tensor, img_hr: torch.Tensor, amp: bool, device):
    """Teacher: L = L_rec [Eq. 2, Sec. 3.4]."""
    with common.autocast(device, amp):
        img_sr, _ = net(img_lr, img_hr)
    loss = reconstruction_loss(img_sr, img_hr)
    return loss, {"l_rec": loss.item()}


def student_step(net: nn.Module, teacher: KDSR, img_lr: torch.Tensor, img_hr: torch.Tensor, cfg: Config,
                 amp: bool, device, estimator_only: bool):
    """Student: L = lambda_rec L_rec + lambda_kl L_kl [Eq. 15]; estimator-only warm-up: L = L_kl."""
    with torch.no_grad(), common.autocast(device, amp):
        _, d_prime_teacher = teacher.estimate(img_lr, img_hr)           # D'_T (B, 4C), frozen teacher
    with common.autocast(device, amp):
        img_sr, d_prime_student = net(img_lr, with_sr=not estimator_only)
    l_kl = kd_loss(d_prime_student, d_prime_teacher, cfg.kd_temperature)
    if estimator_only:
        return l_kl, {"l_kl": l_kl.item()}
    l_rec = reconstruction_loss(img_sr, img_hr)
    return cfg.rec_weight * l_rec + cfg.kd_weight * l_kl, {"l_rec": l_rec.item(), "l_kl": l_kl.item()}


def init_student_from_teacher(student: KDSR, teacher_state: dict) -> list[str]:
    """Copy exactly the teacher's G.* tensors into the student [Sec. 3.4]; the estimator keeps its fresh init."""
    g_state = {key[len("G."):]: value for key, value in teacher_state.items() if key.startswith("G.")}
    student.G.load_state_dict(g_state, strict=True)
    return sorted(f"G.{key}" for key in g_state)


def _restore(path: Path, model, optimizer, stage: str, dist, device) -> int:
    ckpt = common.load_checkpoint(path, SCRIPT, (stage,), device=device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    common.set_rng_state(ckpt["rng"], dist)  # every rank continues its own random degradations
    written_by = len(ckpt["rng"].get("ranks", [None]))
    if written_by != dist.world_size and dist.is_main:
        print(f"note: {path} was written by {written_by} process(es), this run has {dist.world_size}: the "
              f"random degradations do not continue exactly")
    return int(ckpt["step"])


def _payload(cfg: Config, stage: str, step: int, model: KDSR, optimizer, rng: dict, extra: dict | None) -> dict:
    """Everything --resume needs to continue exactly (self-describing, DESIGN.md convention 5)."""
    return {"script": SCRIPT, "stage": stage, "step": step, "config": dataclasses.asdict(cfg),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None,  # the learning rate is a pure function of the step: schedule()
            "rng": rng, **(extra or {})}


def fit(cfg: Config, args, stage: str, model: KDSR, step_fn, resume: Path | None, dist, device,
        extra: dict | None = None, find_unused: bool = False) -> Path:
    """The loop both stages share: data, per-sample degradation, step, lr rule, log, atomic checkpoints.
    SIGINT/SIGTERM: finish the step, write last.pt, return. A non-finite loss stops before backward()."""
    params = [p for p in model.parameters() if p.requires_grad]  # the fixed mean shift is not optimised
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    start = _restore(resume, model, optimizer, stage, dist, device) if resume else 0
    net = common.wrap_ddp(model, dist, find_unused=find_unused)
    dataset = common.HRPatches(args.data_dir, cfg.lr_patch * cfg.scale)
    batches = common.infinite_batches(dataset, cfg.batch_size, device, seed=cfg.seed, start_step=start,
                                      workers=args.workers, dist=dist)  # step k always sees the same crops
    steps, out_dir = total_steps(cfg, stage), Path(args.out_dir)
    log, last = common.RunLog(out_dir, steps, enabled=dist.is_main, start_step=start), out_dir / "last.pt"
    last_good = resume or "(none written yet)"  # what the non-finite-loss error points to
    with common.stop_on_signals() as flag, contextlib.closing(batches):
        for step in range(start + 1, steps + 1):
            learning_rate, estimator_only = schedule(cfg, stage, step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            img_hr = next(batches)                                  # (B, 3, sP, sP)
            img_lr = degrade_batch(img_hr, cfg)                     # (B, 3, P, P)
            if args.channels_last and device.type == "cuda":
                img_lr, img_hr = (x.contiguous(memory_format=torch.channels_last) for x in (img_lr, img_hr))
            loss, scalars = step_fn(net, img_lr, img_hr, estimator_only)
            loss_mean = common.all_reduce_mean(loss.detach(), dist)  # same value on every rank: all stop together
            common.check_finite(loss_mean, step, last_good)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % args.log_every == 0 or step == steps:
                log.log(step, stage, loss=loss_mean.item(), **scalars, lr=learning_rate)
            stop = step < steps and common.stop_requested(flag, dist, device)
            if step % cfg.save_every == 0 or step == steps or stop:
                rng = common.rng_state(dist)  # every rank takes part (collective)
                if dist.is_main:
                    common.save_checkpoint(last, _payload(cfg, stage, step, model, optimizer, rng, extra))
                last_good = last
            if stop:
                if dist.is_main:
                    print(f"stopped by signal at step {step}; checkpoint {last}; continue with --resume", flush=True)
                break
    return last


def _setup(cfg: Config, args):
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)
    common.seed_everything(cfg.seed + dist.rank)  # each rank draws its own degradations
    return device, dist


def _to_device(model: KDSR, args, device) -> KDSR:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last and device.type == "cuda" else model


def train_teacher(cfg: Config, args, resume: Path | None) -> Path:
    """Stage 1 [Sec. 3.4, Fig. 2(d)]: KD-IDE_T and G trained jointly with L_rec."""
    device, dist = _setup(cfg, args)
    model = _to_device(build_model(cfg, teacher=True), args, device)

    def step_fn(net, img_lr, img_hr, estimator_only):
        return teacher_step(net, img_lr, img_hr, args.amp, device)

    try:
        return fit(cfg, args, "teacher", model, step_fn, resume, dist, device)
    finally:
        common.ddp_teardown(dist)


def load_teacher(path, cfg: Config, device) -> tuple[KDSR, dict]:
    """The frozen teacher of the student stage and its checkpoint; its architecture must equal the student's."""
    ckpt = common.load_checkpoint(path, SCRIPT, ("teacher",), device="cpu")
    saved = Config(**ckpt["config"])
    arch = ("n_feats", "n_blocks", "n_resblocks", "scale")
    if any(getattr(saved, a) != getattr(cfg, a) for a in arch):
        raise common.UserError(f"teacher {path} has {', '.join(f'{a}={getattr(saved, a)}' for a in arch)} but the "
                               f"student has {', '.join(f'{a}={getattr(cfg, a)}' for a in arch)}: use the same "
                               f"--size/--preset as for the teacher")
    teacher = build_model(saved, teacher=True)
    teacher.load_state_dict(ckpt["model"])
    return teacher.to(device).eval().requires_grad_(False), ckpt


def train_student(cfg: Config, args, resume: Path | None) -> Path:
    """Stage 2 [Sec. 3.4, Fig. 2(e)]: G <- teacher G, fresh KD-IDE_S, L_rec + L_kl (aniso: L_kl warm-up first)."""
    if not args.teacher_ckpt:
        raise common.UserError("the student stage needs --teacher-ckpt FILE (the teacher's last.pt)")
    device, dist = _setup(cfg, args)
    teacher, teacher_ckpt = load_teacher(args.teacher_ckpt, cfg, device)
    if dist.is_main and teacher_ckpt["config"]["degradation"] != cfg.degradation:
        print(f"note: the teacher was trained on '{teacher_ckpt['config']['degradation']}', the student on "
              f"'{cfg.degradation}'")
    student = build_model(cfg, teacher=False)
    if resume is None:
        copied = init_student_from_teacher(student, teacher_ckpt["model"])
        if dist.is_main:
            print(f"student G initialised from {args.teacher_ckpt} ({len(copied)} tensors); E_st fresh")
    model = _to_device(student, args, device)

    def step_fn(net, img_lr, img_hr, estimator_only):
        return student_step(net, teacher, img_lr, img_hr, cfg, args.amp, device, estimator_only)

    try:  # the aniso warm-up leaves G without gradients: DDP must be told [official code schedule]
        return fit(cfg, args, "student", model, step_fn, resume, dist, device,
                   extra={"teacher_ckpt": str(args.teacher_ckpt)}, find_unused=cfg.degradation == "aniso_noise")
    finally:
        common.ddp_teardown(dist)


# ---- 6. Evaluation -----------------------------------------------------------------------------------------
def load_for_inference(args, device) -> tuple[KDSR, Config, str]:
    """A student from our checkpoint (config inside) or from released weights; (model, cfg, name)."""
    if bool(args.ckpt) == bool(args.official_weights):
        raise common.UserError("give exactly one of --ckpt FILE (from `train`) or --official-weights FILE")
    if args.official_weights:
        model, cfg = load_official(args.official_weights)
    else:
        ckpt = common.load_checkpoint(args.ckpt, SCRIPT, STAGES, device="cpu")
        cfg = Config(**ckpt["config"])
        model = build_model(cfg, teacher=ckpt["stage"] == "teacher")
        model.load_state_dict(ckpt["model"])
    if args.scale != cfg.scale:  # before anything runs
        raise common.UserError(f"{args.ckpt or args.official_weights} is a x{cfg.scale} model but --scale "
                               f"{args.scale} was given: use --scale {cfg.scale}")
    if model.teacher:
        raise common.UserError("this is a teacher (KDSR_T): it needs the HR image to estimate the degradation, "
                               "so it cannot super-resolve an LR image alone; evaluate a student checkpoint")
    return model.to(device).eval(), cfg, f"KDSR_S-{cfg.size}"


def evaluate(args) -> list[dict]:
    """Benchmark tables (protocol.md: Gaussian8 [Tab. 1], aniso+noise [Tab. 2]) plus the bicubic reference row."""
    device = common.pick_device(args.device)
    model, cfg, name = load_for_inference(args, device)
    name += f" tile{args.tile}" if args.tile else ""
    out_dir = Path(args.out_dir)

    @torch.no_grad()
    def whole_image_sr(img_lr: torch.Tensor) -> torch.Tensor:
        with common.autocast(device, args.amp):
            return model(img_lr)[0].float()

    sr_fn = common.tiled(whole_image_sr, args.scale, args.tile, args.tile_overlap)  # tile 0: the function itself

    summary = []
    for data in args.data:
        rows = common.run_benchmark(sr_fn, data, args.protocol, args.scale, root=args.data_root, device=device,
                                    save_dir=out_dir / "images" if args.save_images else None, limit=args.limit)
        bicubic = common.run_benchmark(common.bicubic_sr(args.scale), data, args.protocol, args.scale,
                                       root=args.data_root, device=device, limit=args.limit)
        for method, result in ((name, rows), ("bicubic", bicubic)):
            table = common.summarize(result)
            title = f"{method} x{args.scale} {args.protocol} {table[0]['set']}"
            common.report(table, title, out_dir)
        summary += common.summarize(rows)
    print(f"\nresults: {out_dir / 'results.md'}")
    return summary


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows of x (N, C) projected on their two leading principal axes (SVD of the centred data). (N, 2)"""
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:2].T


def sigma_colour(t: float) -> tuple[int, int, int]:
    """Blue (t = 0) -> green -> yellow -> red (t = 1)."""
    anchors = ((49, 54, 149), (69, 170, 100), (240, 200, 40), (215, 48, 39))
    pos = min(max(t, 0.0), 1.0) * (len(anchors) - 1)
    i = min(int(pos), len(anchors) - 2)
    return tuple(round(a + (pos - i) * (b - a)) for a, b in zip(anchors[i], anchors[i + 1]))


def draw_scatter(points: torch.Tensor, sigmas: list[float], path: Path, size: int = 640) -> None:
    """2-D scatter with Pillow, one colour per blur width and a legend [Fig. 6 idea]."""
    from PIL import Image, ImageDraw
    levels = sorted(set(sigmas))
    colours = {s: sigma_colour(i / max(len(levels) - 1, 1)) for i, s in enumerate(levels)}
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
    model, cfg, _ = load_for_inference(args, device)
    reps, labels = [], []
    for data in args.data:
        set_name, paths = common.find_benchmark(data, args.data_root)
        for path in paths[: args.limit]:
            img_hr = common.modcrop(common.load_uint8(path), cfg.scale)
            for sigma in args.sigmas:
                params = {"id": f"embed{sigma:g}", "kernel": common.isotropic_kernels(sigma)[0], "noise": 0}
                img_lr = common.benchmark_lr(img_hr, params, cfg.scale, f"{set_name}/{path.stem}", device)
                reps.append(model.estimate(img_lr)[0].float().cpu())   # D (1, C)
                labels.append(sigma)
    out = Path(args.out)
    draw_scatter(pca_2d(torch.cat(reps)), labels, out)
    print(f"wrote {out} ({len(reps)} representations, sigmas {', '.join(f'{s:g}' for s in args.sigmas)})")
    return out


# ---- 7. Official weights -----------------------------------------------------------------------------------
# Released KDSR files are raw state dicts: "G." = SR network, "E_st." = student estimator ("E." in teachers),
# estimator convs in one Sequential "E.E.{i}" [spec Sec. 7]. The table maps official module prefixes to ours.
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
            raise common.UserError(f"{what} ({len(bad)}): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return converted


def _infer_config(state: dict, prefix: str) -> Config:
    """C, N and R from the official keys and shapes (the files carry no config)."""
    try:
        channels = state["G.head.0.weight"].shape[0]
    except KeyError:
        raise common.UserError("not a KDSR checkpoint: no 'G.head.0.weight' (keys start with "
                               f"{', '.join(sorted({k.split('.')[0] for k in state})[:5])})") from None
    n_blocks = len({m.group(1) for k in state if (m := re.match(r"G\.body\.0\.body\.(\d+)\.", k))})
    n_resblocks = len({m.group(1) for k in state if (m := re.match(rf"{re.escape(prefix)}E\.(\d+)\.body\.", k))})
    size = next((name for name, s in SIZES.items()
                 if (s["n_feats"], s["n_blocks"], s["n_resblocks"]) == (channels, n_blocks, n_resblocks)), "custom")
    return Config(size=size, n_feats=channels, n_blocks=n_blocks, n_resblocks=n_resblocks)


def load_official(path) -> tuple[KDSR, Config]:
    """KDSR_S (prefix E_st.) or KDSR_T (prefix E.) from a released file such as KDSRsM_iso_x4.pt."""
    if not Path(path).is_file():
        raise common.UserError(f"official weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad user file
        raise common.UserError(f"cannot read {path}: {err}") from None
    if isinstance(state, dict) and "script" in state:
        raise common.UserError(f"{path} was written by {state['script']}.py train, not released by the KDSR "
                               f"authors{': pass it as --ckpt' if state['script'] == SCRIPT else ''}")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"{path} is not a raw state dict of tensors (the released KDSR layout)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # a DataParallel save, if any
    teacher = any(k.startswith("E.") for k in state)
    prefix = "E." if teacher else "E_st."
    cfg = _infer_config(state, prefix)
    model = build_model(cfg, teacher=teacher)
    table = official_key_map(len(model.G.blocks), len(model.E.blocks), prefix)
    model.load_state_dict(convert_official(state, model.state_dict(), table), strict=True)
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):  # fixed constants: check, do not learn
        conv = getattr(model.G, name)
        if not (torch.allclose(conv.weight.flatten(1), torch.eye(3), atol=1e-6)
                and torch.allclose(conv.bias, sign * torch.tensor(DIV2K_MEAN), atol=1e-4)):
            raise common.UserError(f"G.{name} of {path} is not the DIV2K mean shift (bias {conv.bias.tolist()})")
    return model, cfg


# ---- 8. CLI ------------------------------------------------------------------------------------------------
def _inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="student checkpoint written by `train --stage student`")
    parser.add_argument("--official-weights", help="released KDSR student file, e.g. KDSRsM_iso_x4.pt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsr.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the teacher, then the student [Sec. 3.4]")
    tr.add_argument("--stage", choices=STAGES, required=True)
    tr.add_argument("--teacher-ckpt", help="student stage: the teacher's checkpoint (its G initialises the student)")
    tr.add_argument("--data-dir", nargs="+", required=True, help="HR training folder(s), e.g. DIV2K + Flickr2K")
    tr.add_argument("--degradation", choices=DEGRADATIONS, help="iso (Tab. 1) or aniso_noise (Tab. 2); default iso")
    tr.add_argument("--size", choices=tuple(SIZES), help="KDSR-M (default) or KDSR-L [Tab. 1]")
    tr.add_argument("--preset", choices=tuple(PRESETS), default="paper")
    tr.add_argument("--steps", type=common.at_least(1), help="stop at this step (default: the stage's full schedule)")
    tr.add_argument("--batch-size", type=common.at_least(1), help="override the batch size (per process)")
    tr.add_argument("--save-every", type=common.at_least(1), help="override the checkpoint period (steps)")
    tr.add_argument("--resume", nargs="?", const="", help="checkpoint to resume (no value: <out-dir>/last.pt)")
    common.add_run_args(tr)
    ev = sub.add_parser("eval", help="benchmark a student (protocol.md) with the bicubic reference row")
    _inference_args(ev)
    common.add_run_args(ev)
    common.add_eval_args(ev)
    ev.add_argument("--tile", type=common.at_least(0), default=0,
                    help="super-resolve LR tiles of N px to bound memory (default 0: whole image). KD-IDE_S pools "
                         "globally, so it then estimates D from one tile at a time: the output differs from the "
                         "whole-image output unless the tile covers the LR image")
    ev.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    em = sub.add_parser("embed", help="PCA scatter of the student IDR under several blur widths [Fig. 6]")
    _inference_args(em)
    common.add_run_args(em)
    common.add_eval_args(em)
    em.add_argument("--sigmas", type=common.at_least(0.1, float), nargs="+", default=[0.6, 1.2, 1.8, 2.4, 3.0, 3.6],
                    help="isotropic blur widths of the LR images")
    em.add_argument("--out", help="PNG path (default <out-dir>/embed.png)")
    return parser


def config_from_args(args, resume: Path | None) -> Config:
    """paper defaults <- --size <- --preset <- explicit flags; with --resume the checkpoint's config (+ --steps)."""
    if resume is not None:
        return Config(**common.resumed(resume, SCRIPT, (args.stage,), args.steps)["config"])
    cfg = dataclasses.replace(Config(), **{**SIZES[args.size or "M"], **PRESETS[args.preset]})
    overrides = {**(SIZES[args.size] if args.size else {}), "steps": args.steps, "batch_size": args.batch_size,
                 "save_every": args.save_every, "degradation": args.degradation, "seed": args.seed}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.stage}"
            resume = Path(args.resume or Path(args.out_dir) / "last.pt") if args.resume is not None else None
            cfg = config_from_args(args, resume)
            check_config(cfg)
            if args.stage == "teacher":
                return train_teacher(cfg, args, resume)
            if resume is not None and not args.teacher_ckpt:  # the student checkpoint remembers its teacher
                args.teacher_ckpt = common.load_checkpoint(resume, SCRIPT, ("student",))["teacher_ckpt"]
            return train_student(cfg, args, resume)
        args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.command}"
        if args.command == "eval":
            return evaluate(args)
        args.out = args.out or str(Path(args.out_dir) / "embed.png")
        return embed(args)
    except common.UserError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
