"""PDM-SR: Learning the Degradation Distribution for Blind Image Super-Resolution.

Luo et al., CVPR 2022, arXiv 2203.04962. Official code: greatlog/UnpairedSR.
A probabilistic degradation model (PDM: random blur kernel + conditional random noise) is learned adversarially
from unpaired LR images and trained jointly with an SR network on the LR images it synthesises.

Paper map (paper element -> symbol here)
    Eq. 2  y_clean = (x (*) k) down_s, y = y_clean + n  -> blur_downsample, PDM.forward
    Eqs. 4, 6  k = netK(z_k), spatially invariant       -> KernelModule (softmax over k*k taps)
    Eq. 5  spatially variant kernels (option)           -> KernelModule(spatial=True), blur_downsample_variant
    Eq. 10 n = netN(z_n, y_clean)                       -> NoiseModule (y_clean detached)
    Eq. 11 PDM sampling                                 -> PDM
    Eq. 12 l_reg = ||n||^2, as a mean (released)        -> noise_regularizer
    Eq. 13 l_adv + lambda l_reg (LSGAN, as released)    -> lsgan_generator_loss, lsgan_discriminator_loss, pdm_step
    Sec. 3.4 joint PDM-SR training                      -> train_step (PDM, then D, then SR on detached Q8(y))
    Sec. 3.4, Tabs. 2-3 PDM-SRGAN (EDSR, RRDB)          -> --gan: sr_generator_losses, sr_step, perceptual_loss
    Sec. 4.1 PatchGAN, EDSR-baseline / RRDB backbones   -> Discriminator (on LR; D2 on HR), EDSR, RRDBNet
    Tab. 4 fixed z_k and/or z_n ablation                -> Config.fixed_zk, fixed_zn (--fixed-zk, --fixed-zn)
    Figs. 6-7 learned kernels and noise                 -> sample (PNG sheet)
    [ours] offline stand-in "real" LR domain           -> make_stand_in_lr (`make-lr`)

Deviations (each [DEV] is listed in the README):
    - [DEV] learning rate halved at steps 50k/100k/150k as in the released configs; the paper text says "every
      5000 steps" (that was the checkpoint/validation interval).
    - [DEV] netN as the paper describes (3x3 convs, z_n of shape 3 x h x w, per-pixel 3-channel noise); most
      released configs use 1x1 convs and the 2020 configs broadcast one noise value per image (issue #15).
    - [DEV] EDSR mean shift frozen (the release trains it by mistake); official weights load its values as stored.
    - [DEV] noise head always zero-initialised; seed honoured; one Config instead of the release's YAMLs.
    - [DEV] metrics: paired data get the paper's RGB PSNR/SSIM (shave = scale), the protocol's Y and LPIPS of the whole
      RGB image (paper: cropped; release: BGR); no shift-searched scorer. netSR random-init unless --sr-init.
    - [DEV] PDM-SRGAN's perceptual loss trains netSR (released: detached, a no-op; kept as --release-perceptual).

Scale-out [ours]: --batch-size is the global batch, N torchrun processes take batch / N each and compute what one
process would (draw_z, sync_batchnorm), except netN's BatchNorm on CPU (gloo has no SyncBatchNorm).

Usage:
    python pdm_sr.py make-lr --hr-dir photos_B --out real_lr --lambda1 1.6 --lambda2 1.6 --noise 10
    python pdm_sr.py train --hr-dir DIV2K/HR_1-400 --lr-dir DIV2K/LR_unknown_401-800
    python pdm_sr.py train --stage deg --hr-dir HR --lr-dir LR --out-dir runs/pdm_sr/deg
    python pdm_sr.py train --stage sr --hr-dir HR --deg-ckpt runs/pdm_sr/deg/last.pt
    python pdm_sr.py sample --ckpt runs/pdm_sr/joint/last.pt --hr-dir HR --out runs/pdm_sr/sample
    python pdm_sr.py train --gan --vgg-weights vgg19-dcbb9e9d.pth --loss-weights 2020track1 --hr-dir HR --lr-dir LR
    python pdm_sr.py eval --ckpt last.pt --data valid/HR --lr-data valid/LR --lpips-weights alexnet.pth alex.pth
    python pdm_sr.py eval --official-weights EDSR_x4.pth --sr-net edsr --data Set5 --protocol gaussian8
    torchrun --nproc_per_node=4 pdm_sr.py train --hr-dir HR --lr-dir LR
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "pdm_sr"
STAGES = ("joint", "deg", "sr")
SR_NETS = ("edsr", "rrdb")
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)          # [official code] EDSR-PyTorch MeanShift, rgb_range 255
DISC_STRIDE = {"joint": 1, "deg": 2}            # [official code] PatchGAN stride t per training mode
PDM_FIELDS = ("kernel_size", "zk_dim", "netk_feats", "netk_blocks", "spatial_kernel", "use_noise", "zn_dim",
              "netn_feats", "netn_blocks", "noise_conv", "fixed_zk", "fixed_zn")
LOSS_WEIGHTS = {"others": (1.0, 0.05, 0.05),       # [official code] percep/*.yml: (L1, LSGAN on HR, perceptual)
                "2020track1": (0.01, 0.005, 0.05)}  # [official code] percep/2020Track1.yml
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
# [official code] conv5_4 (features.34), pre-ReLU, weight 1: read by the kdsr.py copies (their docstrings: KDSR's)
PERCEPTUAL_LAYERS = {34: 1.0}


# ---- 1. Config ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # run
    seed: int = 0                    # [ours] honoured (the release ignores it)
    save_every: int = 5000           # [official code] checkpoint interval
    # data
    scale: int = 4                   # [Sec. 4.1] x4
    hr_patch: int = 128              # [Sec. 4.1] HR crop
    lr_patch: int = 32               # [Sec. 4.1] real-LR crop, drawn independently (unpaired)
    batch_size: int = 32             # [Sec. 4.1] global: N processes take 32 / N each
    # PDM: kernel module
    kernel_size: int = 21            # [Sec. 4.1] k
    zk_dim: int = 64                 # [Sec. 4.1] f_k
    netk_feats: int = 64             # [official code]
    netk_blocks: int = 16            # [official code]
    spatial_kernel: bool = False     # [Eq. 5, ours] one kernel per LR output pixel (3x3 convs); default [Eq. 6]
    # PDM: noise module
    use_noise: bool = True           # [Sec. 4.1] off for the clean 2017Track2
    zn_dim: int = 3                  # [Sec. 4.1] f_n
    netn_feats: int = 64             # [official code]
    netn_blocks: int = 8             # [official code]
    noise_conv: int = 3              # [Sec. 4.1] 3x3 convs (1: pixel-independent noise)
    fixed_zk: bool = False           # [Tab. 4] z_k = 0 ("only z_n random"; with fixed_zn: deterministic)
    fixed_zn: bool = False           # [Tab. 4] z_n = 0 ("only z_k random")
    fixed_z: dataclasses.InitVar[bool] = False  # [ours] both of the above (--fixed-z; older checkpoints' key)
    lambda_reg: float = 100.0        # [Eq. 13] lambda
    # discriminator, SR network
    disc_feats: int = 64             # [official code] PatchGAN width
    sr_net: str = "edsr"             # [Sec. 4.1] edsr (EDSR baseline) | rrdb
    sr_feats: int = 64               # [Sec. 4.1] EDSR baseline / RRDB width
    sr_blocks: int | None = None     # [Sec. 4.1] None: the backbone's own, EDSR baseline 16 / RRDB 23
    edsr_res_scale: float = 1.0      # [official code] every released config sets 1 (the EDSR class default is 0.1)
    rrdb_growth: int = 32            # [official code] RRDB growth channels
    # PDM-SRGAN [Sec. 3.4]: netSR also gets LSGAN from D2 (PatchGAN on HR) and a VGG19 conv5_4 perceptual loss
    gan: bool = False                # [Sec. 3.4] off: PDM-SR (L1 only)
    loss_weights: tuple = LOSS_WEIGHTS["others"]  # [official code] (L1, LSGAN, perceptual); the paper gives none
    release_perceptual: bool = False  # [official code] the released no-op perceptual term (logged, no gradient)
    # optimisation
    learning_rate: float = 2e-4      # [Sec. 4.1]
    beta1: float = 0.9               # [official code]
    beta2: float = 0.999             # [official code]
    grad_clip: float = 50.0          # [official code] max gradient norm per network
    lr_milestones: tuple = (50_000, 100_000, 150_000)  # [official code] halve at these steps [DEV] vs text
    steps: int = 200_000             # [Sec. 4.1]
    preset: str = "paper"            # [ours] the preset the run started from (a label --resume checks)

    def __post_init__(self, fixed_z: bool):
        self.fixed_zk, self.fixed_zn = self.fixed_zk or fixed_z, self.fixed_zn or fixed_z


PRESETS = {
    "paper": {},
    "smoke": {"hr_patch": 48, "lr_patch": 12, "batch_size": 4, "netk_feats": 16, "netk_blocks": 2,
              "netn_feats": 16, "netn_blocks": 1, "disc_feats": 16, "sr_feats": 16, "sr_blocks": 2,
              "rrdb_growth": 8, "steps": 20, "save_every": 1000, "learning_rate": 1e-3},
}


def check_config(cfg: Config) -> None:
    """Refuse settings that cannot run."""
    if cfg.scale != 4:
        raise common.UserError(f"PDM-SR is x4 here (EDSR/RRDB x4 tails), got scale {cfg.scale}")
    if cfg.hr_patch != cfg.lr_patch * cfg.scale:
        raise common.UserError(f"HR patch {cfg.hr_patch} must be {cfg.scale} x LR patch {cfg.lr_patch}")
    if cfg.hr_patch <= cfg.kernel_size // 2 or cfg.kernel_size % 2 == 0:
        raise common.UserError(f"kernel size {cfg.kernel_size} must be odd and smaller than the HR patch")
    if cfg.sr_net not in SR_NETS:
        raise common.UserError(f"--sr-net must be one of {SR_NETS}, got {cfg.sr_net!r}")
    if cfg.noise_conv not in (1, 3):
        raise common.UserError(f"noise_conv must be 1 or 3, got {cfg.noise_conv}")
    if not cfg.gan and (cfg.loss_weights != LOSS_WEIGHTS["others"] or cfg.release_perceptual):
        raise common.UserError("--loss-weights and --release-perceptual are PDM-SRGAN settings: add --gan")
    if cfg.batch_size < 2 and not cfg.spatial_kernel:    # global batch (netK sees all z_k); spatial: BN pools h x w
        raise common.UserError("netK's BatchNorm normalises over the batch of 1x1 z_k: use a batch size >= 2")


# ---- 2. Degradation ----------------------------------------------------------------------------------------
def blur_downsample(img_hr: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """y_clean = (x (*) k) down_s as ONE grouped stride-s correlation, reflect padding [Eq. 2, official code].

    img_hr (B, C, H, W), kernels (B, k, k) -> (B, C, H/s, W/s); pixel (i, j) is centred on HR (s i, s j).
    """
    b, c, h, w = img_hr.shape
    pad = kernels.shape[-1] // 2
    x = F.pad(img_hr.reshape(1, b * c, h, w), (pad,) * 4, mode="reflect")      # (1, B*C, H+2p, W+2p)
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1).to(x)            # (B*C, 1, k, k), no flip
    # y[b, c, i, j] = sum_{u,v} k_b[u, v] x_pad[b, c, s i + u, s j + v]
    y = F.conv2d(x, weight, stride=scale, groups=b * c)
    return y.view(b, c, *y.shape[-2:])


def blur_downsample_variant(img_hr: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """Spatially variant version [Eq. 5] with unfold: kernels (B, k, k, h, w), one kernel per LR output pixel [ours]."""
    b, c, h, w = img_hr.shape
    k = kernels.shape[1]
    x = F.pad(img_hr, (k // 2,) * 4, mode="reflect")
    patches = F.unfold(x, k, stride=scale).view(b, c, k * k, h // scale, w // scale)  # (B, C, k*k, h, w)
    return (patches * kernels.reshape(b, 1, k * k, h // scale, w // scale).to(x)).sum(dim=2)


def soft_round(y: torch.Tensor) -> torch.Tensor:
    """Differentiable 8-bit rounding used without netN [official code]:
    Q(y) = y + (1/255) sum_{i=1..5} (-1)^i / (pi i) sin(2 pi i 255 y)."""
    terms = [(-1) ** i / (math.pi * i) * torch.sin(2 * math.pi * i * 255 * y) for i in range(1, 6)]
    return y + sum(terms) / 255


def kernel_widths(kernel: torch.Tensor) -> torch.Tensor:
    """Centred second-moment widths of a (k, k) kernel: sqrt of the eigenvalues of its covariance about its
    centroid, largest first (shift-invariant). For a Gaussian these are (lambda1, lambda2)."""
    k = kernel.double() / kernel.sum()
    r = torch.arange(k.shape[-1], dtype=torch.float64) - k.shape[-1] // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    mx, my = (k * x).sum(), (k * y).sum()
    cxx, cyy, cxy = (k * (x - mx) ** 2).sum(), (k * (y - my) ** 2).sum(), (k * (x - mx) * (y - my)).sum()
    eig = torch.linalg.eigvalsh(torch.stack([torch.stack([cxx, cxy]), torch.stack([cxy, cyy])]))
    return eig.clamp_min(0).sqrt().flip(0)


def make_stand_in_lr(hr_dir, out_dir, lambda1: float, lambda2: float, theta_deg: float, noise: float,
                     scale: int, seed: int) -> list[Path]:
    """Offline stand-in for a real LR domain [ours]: hidden kernel k*, strided correlation, AWGN, 8 bits."""
    if not (lambda1 > 0 and lambda2 > 0 and noise >= 0 and math.isfinite(theta_deg)):     # `not >`: nan too
        raise common.UserError(f"make-lr needs --lambda1, --lambda2 > 0 and --noise >= 0, "
                               f"got {lambda1}, {lambda2}, {noise} (theta {theta_deg})")
    files = common.list_images(hr_dir)
    if Path(out_dir).resolve() in {f.parent.resolve() for f in files} or len({f.stem for f in files}) < len(files):
        raise common.UserError(f"make-lr writes <stem>.png into {out_dir}: it must not be an HR folder, and the "
                               f"HR stems must be unique")
    kernel = common.anisotropic_kernels(lambda1, lambda2, math.radians(theta_deg))      # (1, 21, 21)
    generator = torch.Generator().manual_seed(seed)
    written = []
    for path in files:
        img_hr = torch.from_numpy(common.modcrop(common.load_uint8(path), scale)).permute(2, 0, 1)[None] / 255
        if min(img_hr.shape[-2:]) <= kernel.shape[-1] // 2:
            raise common.UserError(f"{path} is {img_hr.shape[-1]}x{img_hr.shape[-2]}: the {kernel.shape[-1]}-tap kernel "
                                   f"needs >= {kernel.shape[-1] // 2 + 1} px (reflect padding)")
        y = blur_downsample(img_hr.float(), kernel, scale)
        y = common.quantize(common.add_noise(y, noise, generator) if noise > 0 else y)
        common.save_image(y[0], target := Path(out_dir) / f"{path.stem}.png")
        written.append(target)
    return written


# ---- 3. Networks -------------------------------------------------------------------------------------------
class ResBlockBN(nn.Module):
    """conv, BN, ReLU, conv, + input; keys body.0 / body.1 / body.3 [official code]."""

    def __init__(self, feats: int, ksize: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, ksize, padding=ksize // 2), nn.BatchNorm2d(feats),
                                  nn.ReLU(inplace=True), nn.Conv2d(feats, feats, ksize, padding=ksize // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)                      # x + body(x), in place on the conv's fresh output: exact


class KernelModule(nn.Module):
    """netK [Eqs. 4-6]: z_k (B, f_k, H, W) -> softmax over k*k channels -> kernels (B, k*k, H, W).

    Invariant (default): H = W = 1 and all convs 1x1. Variant [Eq. 5]: 3x3 head/body convs on z_k at the HR
    pixels, of whose kernels the PDM keeps one kernel per LR output pixel [ours].
    """

    def __init__(self, zk_dim: int = 64, feats: int = 64, n_blocks: int = 16, kernel_size: int = 21,
                 spatial: bool = False):
        super().__init__()
        ks = 3 if spatial else 1
        self.deg_kernel = nn.Sequential(
            nn.Conv2d(zk_dim, feats, ks, padding=ks // 2), nn.BatchNorm2d(feats), nn.ReLU(inplace=True),
            *[ResBlockBN(feats, ks) for _ in range(n_blocks)],
            nn.Conv2d(feats, kernel_size ** 2, 1), nn.Softmax(dim=1))
        last = self.deg_kernel[-2]
        with torch.no_grad():  # [official code] zero_init: a near-uniform box, centre tap e/(e + k^2 - 1)
            last.weight.zero_()
            last.bias.zero_()
            last.bias[kernel_size ** 2 // 2] = 1.0

    def forward(self, z_k: torch.Tensor) -> torch.Tensor:
        return self.deg_kernel(z_k)  # (B, k*k, H, W), >= 0, sums to 1 over dim 1


class NoiseModule(nn.Module):
    """netN [Eq. 10]: n = netN(concat(y_clean.detach(), z_n)), (B, 3, h, w); last conv 1x1 zero-initialised."""

    def __init__(self, zn_dim: int = 3, feats: int = 64, n_blocks: int = 8, ksize: int = 3, channels: int = 3):
        super().__init__()
        self.deg_noise = nn.Sequential(
            nn.Conv2d(channels + zn_dim, feats, ksize, padding=ksize // 2), nn.BatchNorm2d(feats),
            nn.ReLU(inplace=True), *[ResBlockBN(feats, ksize) for _ in range(n_blocks)],
            nn.Conv2d(feats, channels, 1))
        nn.init.zeros_(self.deg_noise[-1].weight)  # the model starts noise-free [DEV]
        nn.init.zeros_(self.deg_noise[-1].bias)

    def forward(self, y_clean: torch.Tensor, z_n: torch.Tensor) -> torch.Tensor:
        # gradient stopped at the image input: the noise cannot reshape y_clean [official code]
        return self.deg_noise(torch.cat([y_clean.detach(), z_n], dim=1))


class PDM(nn.Module):
    """Probabilistic degradation model [Eq. 11, Fig. 2]: x -> (y, kernels, noise); z drawn at every forward."""

    def __init__(self, scale: int = 4, kernel_size: int = 21, zk_dim: int = 64, netk_feats: int = 64,
                 netk_blocks: int = 16, spatial_kernel: bool = False, use_noise: bool = True, zn_dim: int = 3,
                 netn_feats: int = 64, netn_blocks: int = 8, noise_conv: int = 3, fixed_zk: bool = False,
                 fixed_zn: bool = False):
        super().__init__()
        self.scale, self.kernel_size, self.zk_dim, self.zn_dim = scale, kernel_size, zk_dim, zn_dim
        self.spatial_kernel, self.fixed_zk, self.fixed_zn = spatial_kernel, fixed_zk, fixed_zn
        self.deg_kernel = KernelModule(zk_dim, netk_feats, netk_blocks, kernel_size, spatial_kernel)
        self.deg_noise = NoiseModule(zn_dim, netn_feats, netn_blocks, noise_conv) if use_noise else None

    @staticmethod
    def _z(z: torch.Tensor | None, fixed: bool, *shape, like: torch.Tensor) -> torch.Tensor:
        """The caller's z, else z ~ N(0, I) of `shape`; zeros when fixed (the "fixed" rows of Tab. 4)."""
        z = torch.randn(shape, device=like.device, dtype=like.dtype) if z is None else z.to(like)
        return torch.zeros_like(z) if fixed else z

    def forward(self, img_hr: torch.Tensor, z_k=None, z_n=None, share: slice = slice(None)):
        """z_k, z_n drawn here unless given. A given z_k may hold a larger batch (a whole global batch) of which img_hr
        is rows `share`: netK's BatchNorm then normalises over all of them and those rows' kernels are kept."""
        b, _, h, w = img_hr.shape
        k, s = self.kernel_size, self.scale
        # [Eq. 5] z_k (B, f_k, H, W) at the HR pixels, one kernel per LR output pixel [ours]; [Eq. 6] z_k (B, f_k, 1, 1)
        z_k = self._z(z_k, self.fixed_zk, b, self.zk_dim, *((h, w) if self.spatial_kernel else (1, 1)), like=img_hr)
        if self.spatial_kernel:
            kernels = self.deg_kernel(z_k)[share, :, ::s, ::s].reshape(b, k, k, h // s, w // s)   # (B, k, k, h, w)
            y_clean = blur_downsample_variant(img_hr, kernels, s)
        else:
            kernels = self.deg_kernel(z_k)[share].view(b, k, k)                  # (B, k, k)
            y_clean = blur_downsample(img_hr, kernels, s)                         # (B, 3, h, w)
        if self.deg_noise is None:  # clean setting: soft 8-bit rounding, no noise [official code]
            return soft_round(y_clean), kernels, None
        z_n = self._z(z_n, self.fixed_zn, b, self.zn_dim, *y_clean.shape[-2:], like=img_hr)    # (B, f_n, h, w)
        noise = self.deg_noise(y_clean, z_n)
        # y = y_clean + n, no clamp [Eq. 2]
        return y_clean + noise, kernels, noise


class Discriminator(nn.Module):
    """PatchGAN as released (keys model.0 ... model.11): 64 output channels, stride t in model.2 and model.5."""

    def __init__(self, feats: int = 64, stride: int = 1, in_ch: int = 3, out_ch: int = 64):
        super().__init__()
        f = feats
        def block(cin, cout, st):
            return [nn.Conv2d(cin, cout, 3, st, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
        self.model = nn.Sequential(nn.Conv2d(in_ch, f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                                   *block(f, 2 * f, stride), *block(2 * f, 4 * f, stride), *block(4 * f, 8 * f, 1),
                                   nn.Conv2d(8 * f, out_ch, 3, 1, 1))

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        return self.model(img_lr)  # (B, 64, h/t^2, w/t^2)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding sign * 255 * DIV2K mean (EDSR-PyTorch, rgb_range 255); not trainable [DEV]."""

    def __init__(self, sign: float):
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * 255 * torch.tensor(DIV2K_MEAN))
        self.requires_grad_(False)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(ReLU(conv(x))), no BN; keys body.0 / body.2."""

    def __init__(self, feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(feats, feats, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(feats, feats, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul_(self.res_scale).add_(x)  # x + res_scale body(x), in place: exact


class EDSR(nn.Module):
    """EDSR baseline x4 with EDSR-PyTorch key names; input/output in [0, 1] (internally x255)."""

    def __init__(self, feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0):
        super().__init__()
        self.sub_mean, self.add_mean = MeanShift(-1.0), MeanShift(1.0)
        self.head = nn.Sequential(nn.Conv2d(3, feats, 3, padding=1))
        self.body = nn.Sequential(*[ResBlock(feats, res_scale) for _ in range(n_blocks)],
                                  nn.Conv2d(feats, feats, 3, padding=1))
        upsampler = nn.Sequential(nn.Conv2d(feats, 4 * feats, 3, padding=1), nn.PixelShuffle(2),
                                  nn.Conv2d(feats, 4 * feats, 3, padding=1), nn.PixelShuffle(2))
        self.tail = nn.Sequential(upsampler, nn.Conv2d(feats, 3, 3, padding=1))

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(img_lr * 255))  # (B, F, h, w)
        x = self.body(x).add_(x)                    # global residual
        return self.add_mean(self.tail(x)) / 255  # (B, 3, 4h, 4w)


class ResidualDenseBlock(nn.Module):
    """BasicSR dense block: 5 convs with growth g, LeakyReLU(0.2) after the first four; x + 0.2 conv5. Init as
    released [official code] (BasicSR default_init_weights, scale 0.1): Kaiming normal (fan_in) x 0.1, bias 0."""

    def __init__(self, feats: int = 64, growth: int = 32):
        super().__init__()
        for i in range(1, 6):
            conv = nn.Conv2d(feats + (i - 1) * growth, feats if i == 5 else growth, 3, 1, 1)
            nn.init.normal_(conv.weight, std=0.1 * math.sqrt(2 / conv.weight[0].numel()))  # 0.1 x Kaiming (fan_in)
            nn.init.zeros_(conv.bias)
            setattr(self, f"conv{i}", conv)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(self.lrelu(getattr(self, f"conv{i}")(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)).mul_(0.2).add_(x)   # x + 0.2 conv5, in place: exact


class RRDB(nn.Module):
    """Residual-in-residual dense block: x + 0.2 rdb3(rdb2(rdb1(x)))."""

    def __init__(self, feats: int = 64, growth: int = 32):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(feats, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))).mul_(0.2).add_(x)   # x + 0.2 rdb3(...), in place: exact


class RRDBNet(nn.Module):
    """RRDBNet x4 (BasicSR key names): nearest x2 + conv + LeakyReLU, twice; input/output in [0, 1]."""

    def __init__(self, feats: int = 64, n_blocks: int = 23, growth: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, feats, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(feats, growth) for _ in range(n_blocks)])
        self.conv_body = nn.Conv2d(feats, feats, 3, 1, 1)
        self.conv_up1, self.conv_up2, self.conv_hr = (nn.Conv2d(feats, feats, 3, 1, 1) for _ in range(3))
        self.conv_last = nn.Conv2d(feats, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, img_lr: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(img_lr)
        feat = self.conv_body(self.body(feat)).add_(feat)
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))  # (B, 3, 4h, 4w)


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


def build_pdm(cfg: Config) -> PDM:
    return PDM(cfg.scale, **{f: getattr(cfg, f) for f in PDM_FIELDS})


def build_sr(cfg: Config) -> nn.Module:
    blocks = cfg.sr_blocks or {"edsr": 16, "rrdb": 23}[cfg.sr_net]
    if cfg.sr_net == "rrdb":
        return RRDBNet(cfg.sr_feats, blocks, cfg.rrdb_growth)
    return EDSR(cfg.sr_feats, blocks, cfg.edsr_res_scale)


# ---- 4. Losses ---------------------------------------------------------------------------------------------
def lsgan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """1/2 [mean((D(y_real) - 1)^2) + mean(D(y_fake)^2)], mean over all PatchGAN outputs [official code]."""
    return 0.5 * ((d_real.float() - 1).pow(2).mean() + d_fake.float().pow(2).mean())


def lsgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """l_adv = mean((D(y_fake) - 1)^2) [Eq. 13, official code]."""
    return (d_fake.float() - 1).pow(2).mean()


def noise_regularizer(noise: torch.Tensor) -> torch.Tensor:
    """l_reg = ||n||_2^2 [Eq. 12], as released a mean over all noise elements, not the sum [official code]."""
    return noise.float().pow(2).mean()


# Copied from kdsr.py:perceptual_loss
def perceptual_loss(vgg: VGG19Features, img_sr: torch.Tensor, img_hr: torch.Tensor) -> torch.Tensor:
    """L_per = sum_l w_l mean|phi_l(SR) - phi_l(HR)|, w = 0.1, 0.1, 1, 1, 1 on conv1_2 ... conv5_4 before activation
    [App. A.1]; L1 criterion [official code, DEV] (Eq. 12: an L2 norm). The HR branch carries no gradient."""
    feats_sr = vgg(img_sr.float())
    with torch.no_grad():
        feats_hr = vgg(img_hr.float())
    return sum(w * F.l1_loss(feats_sr[i], feats_hr[i]) for i, w in PERCEPTUAL_LAYERS.items())


# ---- 5. Training -------------------------------------------------------------------------------------------
def _update(loss: torch.Tensor, module: nn.Module, optimizer, max_norm: float) -> None:
    """zero_grad, backward, clip the gradient norm at 50, Adam step [official code]."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
    optimizer.step()


def draw_z(rnd: common.StepRandom | None, cfg: Config, img_hr: torch.Tensor) -> dict:
    """The step's z_k, z_n [ours]: sample i of step t gets the same z with 1 or N processes (no rnd: the PDM draws).
    1x1 z_k for the whole global batch: netK runs on all B of them in every process (B x f_k numbers), so its
    BatchNorm sees what one process would. z_n and a spatial z_k: this process's share."""
    if rnd is None:
        return {}
    h, w = img_hr.shape[-2:]
    z_n = rnd.randn(cfg.zn_dim, h // cfg.scale, w // cfg.scale) if cfg.use_noise else None     # (b, f_n, h, w)
    if cfg.spatial_kernel:
        return {"z_k": rnd.randn(cfg.zk_dim, h, w), "z_n": z_n}                                  # (b, f_k, H, W)
    z_k = torch.randn(rnd.batch, cfg.zk_dim, 1, 1, generator=rnd.generator, device=rnd.device)    # (B, f_k, 1, 1)
    return {"z_k": z_k, "z_n": z_n, "share": rnd.part}


def pdm_step(pdm, disc, optimizer, img_hr, cfg: Config, check, rnd=None) -> tuple[torch.Tensor, dict]:
    """Step 2: l_total = l_adv + lambda l_reg on the PDM; D frozen (requires_grad off) [Eq. 13]; float32 also under
    --amp, the kernel and noise heads are small [ours]. Means over equal shares: DDP averages them to the global's."""
    img_fake, _, noise = pdm(img_hr, **draw_z(rnd, cfg, img_hr))  # (b, 3, h, w), graph kept for l_adv
    disc_module = common.unwrap(disc)  # no DDP sync: D is not updated by this loss
    disc_module.requires_grad_(False)
    l_adv = lsgan_generator_loss(disc_module(img_fake))
    l_reg = noise_regularizer(noise) if noise is not None else img_fake.new_zeros(())
    loss = l_adv + cfg.lambda_reg * l_reg
    check(loss)
    _update(loss, pdm, optimizer, cfg.grad_clip)
    disc_module.requires_grad_(True)
    return img_fake.detach(), {"l_adv": l_adv.item(), "l_reg": l_reg.item()}


def disc_step(disc, optimizer, img_real, img_fake, cfg: Config, amp: bool, check, weight=1.0, name="l_d") -> dict:
    """Step 3: LSGAN D loss on real LR and the detached fake (one forward; IN is per sample) [official code]. Also
    PDM-SRGAN's D2 on HR, its loss x the GAN weight [official code] (released: fake, then real; the same sum)."""
    with common.autocast(img_real.device, amp):
        d_out = disc(torch.cat([img_real, img_fake.detach()]))
    d_real, d_fake = d_out.split([img_real.shape[0], img_fake.shape[0]])
    loss = weight * lsgan_discriminator_loss(d_real, d_fake)
    check(loss)
    _update(loss, disc, optimizer, cfg.grad_clip)
    return {name: loss.item()}


def sr_generator_losses(sr_net, disc_hr, vgg, img_lr, img_hr, cfg: Config, amp: bool) -> tuple[torch.Tensor, dict]:
    """(SR(y), terms): l_sr = mean|SR - x| [Sec. 3.4]; PDM-SRGAN adds l_gan = mean((D2(SR) - 1)^2), D2 frozen, and
    l_per = mean|phi(SR) - phi(x)|, phi = VGG19 conv5_4 before its ReLU [Sec. 3.4, official code]."""
    with common.autocast(img_hr.device, amp):
        img_sr = sr_net(img_lr)                                          # (B, 3, H, W)
    terms = {"l_sr": F.l1_loss(img_sr.float(), img_hr)}
    if cfg.gan:
        d2 = common.unwrap(disc_hr).requires_grad_(False)               # no DDP sync: this loss does not update D2
        with common.autocast(img_hr.device, amp):
            terms["l_gan"] = lsgan_generator_loss(d2(img_sr))
            # [DEV] gradient into netSR; the release's PerceptualLoss(x=HR, gt=SR) detaches gt: a no-op [official code]
            terms["l_per"] = (perceptual_loss(vgg, img_hr, img_sr.detach()) if cfg.release_perceptual
                              else perceptual_loss(vgg, img_sr, img_hr))
        d2.requires_grad_(True)                                          # the graph is recorded: D2 stays out of it
    return img_sr, terms


def sr_step(nets: dict, opts: dict, img_fake, img_hr, cfg: Config, amp: bool, check, vgg=None) -> dict:
    """Step 4: netSR on Q8(y_fake) with Q8 = clamp + round to 1/255, input detached: no SR gradient ever reaches the
    PDM (trained simultaneously [Sec. 3.4]; the detach is [official code]). PDM-SRGAN in the released order: G loss,
    clip, step, then D2 on (x, SR.detach()), clip, step [official code]."""
    img_lr = common.quantize(img_fake.detach())  # (B, 3, h, w)
    img_sr, terms = sr_generator_losses(nets["sr"], nets.get("disc_hr"), vgg, img_lr, img_hr, cfg, amp)
    # w_1 l_sr (+ w_gan l_gan + w_per l_per: PDM-SRGAN), w = Config.loss_weights [official code]; PDM-SR: w_1 = 1
    loss = sum(w * term for w, term in zip(cfg.loss_weights, terms.values()))
    check(loss)
    _update(loss, nets["sr"], opts["sr"], cfg.grad_clip)
    scalars = {name: term.item() for name, term in terms.items()}
    if cfg.gan:
        scalars.update(disc_step(nets["disc_hr"], opts["disc_hr"], img_hr, img_sr, cfg, amp, check,
                                 cfg.loss_weights[1], "l_d2"))
    return scalars


def train_step(stage: str, nets: dict, opts: dict, img_hr, img_real, cfg: Config, amp: bool, check, rnd=None,
               vgg=None) -> dict:
    """One step in the released order: PDM, then D, then SR (+ D2) on the pre-update synthetic LR [official code]."""
    scalars = {}
    if stage == "sr":  # frozen PDM, BN still in train mode as released
        with torch.no_grad():
            img_fake = nets["pdm"](img_hr, **draw_z(rnd, cfg, img_hr))[0]
    else:
        img_fake, scalars = pdm_step(nets["pdm"], nets["disc"], opts["pdm"], img_hr, cfg, check, rnd)
        scalars.update(disc_step(nets["disc"], opts["disc"], img_real, img_fake, cfg, amp, check))
    if stage != "deg":
        scalars.update(sr_step(nets, opts, img_fake, img_hr, cfg, amp, check, vgg))
    return scalars


def build_training(cfg: Config, stage: str, deg_ckpt, sr_init, device) -> tuple[dict, dict, dict]:
    """Networks, one Adam [Sec. 4.1] + one MultiStepLR [official code, DEV] per network; stage sr: a frozen PDM;
    --sr-init fills netSR from official-layout weights (released configs start from a bicubic EDSR)."""
    nets = {"pdm": build_pdm(cfg).to(device).train()}
    if stage == "sr":
        if deg_ckpt is not None:
            nets["pdm"].load_state_dict(common.load_checkpoint(deg_ckpt, SCRIPT, ("deg", "joint"), "cpu")["pdm"])
        nets["pdm"].requires_grad_(False)
    else:
        nets["disc"] = Discriminator(cfg.disc_feats, DISC_STRIDE[stage]).to(device)
    if stage != "deg":
        nets["sr"] = build_sr(cfg)
        if sr_init:
            nets["sr"].load_state_dict(convert_official(read_official(sr_init), nets["sr"], cfg.sr_net))
        nets["sr"].to(device)
    if cfg.gan:  # PDM-SRGAN: D2 = the PatchGAN (stride 1) on HR [Sec. 3.4, official code]
        nets["disc_hr"] = Discriminator(cfg.disc_feats, stride=1).to(device)
    opts, scheds = {}, {}
    for name, net in nets.items():
        params = [p for p in net.parameters() if p.requires_grad]  # mean shift and a frozen PDM excluded
        if params:
            opts[name] = torch.optim.Adam(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
            scheds[name] = torch.optim.lr_scheduler.MultiStepLR(opts[name], list(cfg.lr_milestones), 0.5)
    return nets, opts, scheds


def patch_stream(dirs, patch: int, cfg: Config, seed: int, start: int, args, dist, device, what: str):
    """Endless (b, 3, P, P) crops with flips/transpose (= flips + rot90) [official code]: this process's share of
    global items t B ... t B + B - 1 at step t, so the same crops with any number of processes and on --resume."""
    try:
        dataset = common.HRPatches(dirs, patch)
    except common.UserError as err:
        raise common.UserError(f"{what} folder: {str(err).replace('HR training patch', f'{what} patch')}") from None
    loader = common.infinite_batches(dataset, cfg.batch_size, device, seed=seed, start_step=start,
                                     workers=args.workers, dist=dist)
    return itertools.chain([next(loader)], loader), loader  # loads the first batch now: errors before step 1


def _payload(cfg, stage, step, nets, opts, scheds, rng, deg_ckpt) -> dict:
    """Self-describing checkpoint: SR net under "model" (what eval needs), PDM, D, all optimisers/schedulers."""
    state = {name: common.unwrap(net).state_dict() for name, net in nets.items()}
    return {"script": SCRIPT, "stage": stage, "step": step, "config": dataclasses.asdict(cfg),
            "model": state.get("sr"), "pdm": state["pdm"], "disc": state.get("disc"), "disc_hr": state.get("disc_hr"),
            "optimizer": {k: o.state_dict() for k, o in opts.items()},
            "scheduler": {k: s.state_dict() for k, s in scheds.items()},
            "rng": rng, "deg_ckpt": str(deg_ckpt) if deg_ckpt else None}


def _restore(path, stage, nets, opts, scheds, dist, device) -> int:
    ckpt = common.load_checkpoint(path, SCRIPT, (stage,), device=device)
    for name, net in nets.items():
        net.load_state_dict(ckpt["model" if name == "sr" else name])
    for name in opts:
        opts[name].load_state_dict(ckpt["optimizer"][name])
        scheds[name].load_state_dict(ckpt["scheduler"][name])
    common.set_rng_state(ckpt["rng"], dist)  # training draws come from StepRandom(seed, step): any world size
    return int(ckpt["step"])


def sync_batchnorm(pdm: PDM, dist, device) -> None:
    """Under DDP the BatchNorm layers that see this process's data (netN; netK with spatial z_k) normalise over the
    global batch on CUDA (SyncBatchNorm); gloo has none, so on CPU they use this process's share [ours]."""
    names = ["deg_noise"] * (pdm.deg_noise is not None) + ["deg_kernel"] * pdm.spatial_kernel
    if dist.enabled and names and device.type == "cuda":
        for name in names:
            setattr(pdm, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(pdm, name)))
    elif dist.enabled and names and dist.is_main:
        print(f"note: on CPU the BatchNorm of {' and '.join(names)} normalises over each process's share (no "
              f"SyncBatchNorm): {dist.world_size} processes train close to, not exactly, what one would", flush=True)


def train(cfg: Config, args, stage: str, resume: Path | None) -> Path:
    """Stages joint (Sec. 3.4, default), deg (PDM + D only) and sr (frozen PDM from --deg-ckpt)."""
    device = common.pick_device(args.device)
    dist = common.ddp_setup(device)
    common.seed_everything(cfg.seed + dist.rank)  # rank 0 = a single process; training draws use StepRandom
    nets, opts, scheds = build_training(cfg, stage, args.deg_ckpt if stage == "sr" and not resume else None,
                                         None if resume else args.sr_init, device)    # resumed: all from last.pt
    vgg = load_vgg19(args.vgg_weights).to(device) if cfg.gan else None   # frozen, not saved: --vgg-weights each run
    start = _restore(resume, stage, nets, opts, scheds, dist, device) if resume else 0
    common.writable_dir(args.out_dir)                               # before the data is read
    sync_batchnorm(nets["pdm"], dist, device)
    nets = {k: common.to_device(n, device, args.channels_last) for k, n in nets.items()}  # CUDA: NHWC throughout
    wrapped = {k: common.wrap_ddp(n, dist) if k in opts else n for k, n in nets.items()}
    wrapped.update({k: common.compiled(wrapped[k], args.compile) for k in ("pdm", "sr") if k in wrapped})  # not D, D2
    hr_batches, hr_loader = patch_stream(args.hr_dir, cfg.hr_patch, cfg, cfg.seed, start, args, dist, device, "HR")
    lr_batches, lr_loader = ((itertools.repeat(None), None) if stage == "sr" else patch_stream(
        args.lr_dir, cfg.lr_patch, cfg, cfg.seed + 1, start, args, dist, device, "LR"))
    out_dir = Path(args.out_dir)
    log = common.RunLog(out_dir, cfg.steps, enabled=dist.is_main, start_step=start, batch=cfg.batch_size, dist=dist)
    last = out_dir / "last.pt"
    last_good = [resume or "(none written yet)"]
    step = start

    def check(loss):
        common.check_finite(common.all_reduce_mean(loss.detach(), dist), step, last_good[0])

    try:
        with common.stop_on_signals() as flag:
            for step in range(start + 1, cfg.steps + 1):
                rnd = common.StepRandom(cfg.seed, step, cfg.batch_size, dist, device)  # same z with 1 or N processes
                scalars = train_step(stage, wrapped, opts, next(hr_batches), next(lr_batches), cfg, args.amp, check,
                                     rnd, vgg)
                for sched in scheds.values():
                    sched.step()
                if step % args.log_every == 0 or step == cfg.steps:  # the global batch's losses (equal shares)
                    means = common.all_reduce_mean(torch.tensor(list(scalars.values()), device=device), dist)
                    scalars = dict(zip(scalars, means.tolist()))
                    lr_now = next(iter(opts.values())).param_groups[0]["lr"]
                    log.log(step, stage, loss=scalars.get("l_sr", scalars.get("l_adv", 0.0)), **scalars, lr=lr_now)
                stop = step < cfg.steps and common.stop_requested(flag, dist, device)
                if step % cfg.save_every == 0 or step == cfg.steps or stop:
                    rng = common.rng_state(dist)  # collective under DDP: every rank takes part
                    if dist.is_main:
                        common.save_checkpoint(last, _payload(cfg, stage, step, nets, opts, scheds, rng, args.deg_ckpt))
                    last_good[0] = last
                if stop:
                    common.leave_on_signal(flag, step, last, dist)  # exit status 128 + signal
    finally:                                     # also on an error: a failing rank must not leave its peers waiting
        for loader in (hr_loader, lr_loader):
            if loader is not None:
                loader.close()
        common.ddp_teardown(dist)
    return last


# ---- 6. Evaluation -----------------------------------------------------------------------------------------
def load_for_inference(args, device) -> tuple[nn.Module, Config, str]:
    """The SR network from our checkpoint (config inside) or from released weights."""
    if bool(args.ckpt) == bool(args.official_weights):
        raise common.UserError("give exactly one of --ckpt FILE (from `train`) or --official-weights FILE")
    if args.official_weights:
        cfg = Config(sr_net=args.sr_net, edsr_res_scale=args.edsr_res_scale)
        model = build_sr(cfg)
        model.load_state_dict(convert_official(read_official(args.official_weights), model, args.sr_net))
        args.source = f"{args.official_weights} (released)"
    else:
        ckpt = common.load_checkpoint(args.ckpt, SCRIPT, ("joint", "sr"), device="cpu")
        cfg, args.source = Config(**ckpt["config"]), f"{args.ckpt} (step {ckpt['step']})"
        model = build_sr(cfg)
        model.load_state_dict(ckpt["model"])
    if args.scale != cfg.scale:
        raise common.UserError(f"the model is x{cfg.scale} but --scale {args.scale} was given")
    return model.to(device).eval(), cfg, f"PDM-SR{'GAN' * cfg.gan} ({cfg.sr_net})"


def evaluate(args) -> list[dict]:
    """Paired validation (--data HR --lr-data LR, + LPIPS) or the benchmark protocols; method + bicubic rows."""
    device = common.pick_device(args.device)
    if (args.lr_data and len(args.data) != 1) or (args.lpips_weights and not args.lr_data):
        raise common.UserError("--lr-data pairs with exactly one HR folder in --data; --lpips-weights needs both")
    lpips = common.load_lpips(*args.lpips_weights, not args.lpips_unverified, device) if args.lpips_weights else None
    model, cfg, name = load_for_inference(args, device)
    model = common.to_device(model, device, args.channels_last)
    net = common.compiled(model, args.compile)
    name += f" tile{args.tile}" if args.tile else ""
    out_dir = common.writable_dir(args.out_dir)                      # all checked before the first image
    save_dir = out_dir / "images" if args.save_images else None
    for data in [] if args.lr_data else args.data:
        common.find_benchmark(data, args.data_root)

    def whole_image_sr(img_lr):
        with common.autocast(device, args.amp):
            return net(img_lr).float()

    sr_fn = common.tiled(whole_image_sr, args.scale, args.tile, args.tile_overlap)  # tile 0: the function itself
    summary = []
    for data in args.data:
        if args.lr_data:
            rows = common.run_paired(sr_fn, args.lr_data, data, args.scale, device, lpips, save_dir, args.limit, name)
            ref = common.run_paired(common.bicubic_sr(args.scale), args.lr_data, data, args.scale, device, lpips, None,
                                    args.limit, "bicubic")
        else:
            rows = common.run_benchmark(sr_fn, data, args.protocol, args.scale, args.data_root, device, save_dir,
                                        args.limit, name)
            ref = common.run_benchmark(common.bicubic_sr(args.scale), data, args.protocol, args.scale,
                                       args.data_root, device, limit=args.limit, name="bicubic")
        protocol = "paired" if args.lr_data else args.protocol
        for method, result, source in ((name, rows, args.source), ("bicubic", ref, "")):
            table = common.summarize(result)
            common.report(table, f"{method} x{args.scale} {protocol} {table[0]['set']}", out_dir, source, args.limit)
        summary += common.summarize(rows)
    print(f"\nresults: {out_dir / 'results.md'}")
    return summary


def _tile(img: torch.Tensor, size: int):
    """(3, h, w) float image -> a size x size RGB PIL tile (nearest when enlarging, bicubic when shrinking)."""
    from PIL import Image
    pic = Image.fromarray(common.to_uint8(img))
    return pic.resize((size, size), Image.NEAREST if max(img.shape[-2:]) < size else Image.BICUBIC)


def draw_sheet(rows: list[list[tuple]], path: Path, size: int = 96) -> None:
    """One row per HR image: for every sample, LR | kernel (max -> white) | noise (0.5 + n / (2 max|n|))."""
    from PIL import Image
    cols = max(len(r) for r in rows) * 3
    sheet = Image.new("RGB", (cols * (size + 4), len(rows) * (size + 4)), "white")
    for i, row in enumerate(rows):
        for j, (img_lr, kernel, noise) in enumerate(row):
            kimg = (kernel / kernel.max()).expand(3, -1, -1)
            nimg = 0.5 + noise / (2 * noise.abs().max().clamp_min(1e-8)) if noise is not None else kimg * 0 + 0.5
            for m, img in enumerate((img_lr, kimg, nimg)):
                sheet.paste(_tile(img, size), ((3 * j + m) * (size + 4), i * (size + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


@torch.no_grad()
def sample(args) -> Path:
    """Draw --n-samples LR images per HR with the learned PDM (eval-mode BN) and a kernel/noise sheet [Figs. 6-7]."""
    device = common.pick_device(args.device)
    ckpt = common.load_checkpoint(args.ckpt, SCRIPT, STAGES, device="cpu")
    cfg = Config(**ckpt["config"])
    pdm = build_pdm(cfg)
    pdm.load_state_dict(ckpt["pdm"])
    pdm.to(device).eval()
    common.seed_everything(args.seed if args.seed is not None else cfg.seed)
    out, rows, drawn = Path(args.out), [], []
    for path in common.list_images(args.hr_dir)[: args.limit]:
        img_hr = torch.from_numpy(common.modcrop(common.load_uint8(path), cfg.scale)).permute(2, 0, 1) / 255
        img_lr, kernels, noise = pdm(img_hr.float()[None].to(device).expand(args.n_samples, -1, -1, -1))
        if cfg.spatial_kernel:  # the kernel of the centre LR output pixel
            kernels = kernels[..., kernels.shape[-2] // 2, kernels.shape[-1] // 2]
        row = []
        for i in range(args.n_samples):
            common.save_image(common.quantize(img_lr[i]), out / f"{path.stem}_s{i}.png")
            row.append((img_lr[i].cpu(), kernels[i].cpu()[None], None if noise is None else noise[i].cpu()))
        rows.append(row)
        drawn.append(kernels.cpu())
    draw_sheet(rows, out / "kernels_noise.png")
    widths = kernel_widths(torch.cat(drawn).mean(0)).tolist()  # of the mean kernel E_z[k]
    print(f"wrote {sum(map(len, rows))} LR samples and {out / 'kernels_noise.png'}; widths of the mean kernel "
          f"{widths[0]:.2f} / {widths[1]:.2f} HR px")
    return out / "kernels_noise.png"


# ---- 7. Official weights -----------------------------------------------------------------------------------
# Only SR networks were released (EDSR-baseline x4 in EDSR-PyTorch names, RRDBNet in BasicSR names); our modules
# use the same key names, so the map is the identity after unwrapping containers and stripping prefixes [official code].
CONTAINERS = ("params_ema", "params", "state_dict", "model", "netSR")
LAYOUT_HINT = {"edsr": "head.0.weight", "rrdb": "conv_first.weight"}


def read_official(path) -> dict:
    """The released state dict: containers unwrapped, 'module.' and manifest 'netSR@<cfg>/' prefixes stripped."""
    if not Path(path).is_file():
        raise common.UserError(f"official weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad user file
        raise common.UserError(f"cannot read {path}: {err}") from None
    while isinstance(state, dict) and len(state) and any(isinstance(state.get(c), dict) for c in CONTAINERS):
        state = next(state[c] for c in CONTAINERS if isinstance(state.get(c), dict))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UserError(f"{path} does not hold a state dict of tensors")
    return {k.rsplit("/", 1)[-1].removeprefix("module."): v for k, v in state.items()}


def convert_official(state: dict, model: nn.Module, sr_net: str) -> dict:
    """Strict coverage both ways: every official key used, every parameter/buffer of ours filled, shapes equal."""
    other = next(n for n in SR_NETS if n != sr_net)
    if LAYOUT_HINT[other] in state and LAYOUT_HINT[sr_net] not in state:
        raise common.UserError(f"these weights are a {other.upper()} network: use --sr-net {other}")
    ours = model.state_dict()
    unknown = [k for k in state if k not in ours]
    mismatched = [f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in state.items()
                  if k in ours and v.shape != ours[k].shape]
    missing = [k for k in ours if k not in state]
    for what, bad in (("unexpected official keys", unknown), ("shape mismatches", mismatched),
                      ("parameters not filled", missing)):
        if bad:
            raise common.UserError(f"{sr_net} weights: {what} ({len(bad)}): {', '.join(bad[:5])}"
                                   f"{' ...' if len(bad) > 5 else ''}")
    return {k: v.to(ours[k].dtype) for k, v in state.items()}


# Copied from kdsr.py:load_vgg19
def load_vgg19(path) -> VGG19Features:
    """VGG19Features from a torchvision `vgg19` state dict (features.* strict on names and shapes, classifier.*
    ignored). Never downloaded: the user passes the file."""
    vgg, expected = VGG19Features(), "a torchvision VGG19 state dict (vgg19-dcbb9e9d.pth)"
    state = {k: v for k, v in common.read_weights(path, expected).items() if not k.startswith("classifier.")}
    vgg.load_state_dict(common.strict_state(state, vgg.state_dict(), path, expected))
    return vgg.eval().requires_grad_(False)


# ---- 8. CLI ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdm_sr.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="PDM + SR on unpaired HR/LR (joint), or the two-step deg / sr stages")
    tr.add_argument("--stage", choices=STAGES, default="joint")
    tr.add_argument("--preset", choices=tuple(PRESETS), help="paper (default) or smoke (a tiny model for trials)")
    tr.add_argument("--hr-dir", "--data-dir", dest="hr_dir", nargs="+", required=True, help="clean HR folder(s)")
    tr.add_argument("--lr-dir", nargs="+", help="real LR folder(s), unpaired (stages joint and deg)")
    tr.add_argument("--deg-ckpt", help="stage sr: a deg/joint checkpoint whose PDM generates the pairs")
    tr.add_argument("--steps", type=common.at_least(1))
    tr.add_argument("--batch-size", type=common.at_least(1), help="override the global batch size (N processes "
                                                                   "take batch / N each)")
    tr.add_argument("--save-every", type=common.at_least(1))
    tr.add_argument("--resume", nargs="?", const="", help="checkpoint to resume (no value: <out-dir>/last.pt)")
    tr.add_argument("--sr-net", choices=SR_NETS)
    tr.add_argument("--noise", dest="use_noise", action=argparse.BooleanOptionalAction, default=None,
                    help="--no-noise removes netN (clean LR domain)")
    tr.add_argument("--fixed-zk", action=argparse.BooleanOptionalAction, default=None, help="z_k = 0 [Tab. 4]")
    tr.add_argument("--fixed-zn", action=argparse.BooleanOptionalAction, default=None, help="z_n = 0 [Tab. 4]")
    tr.add_argument("--fixed-z", action="store_true", help="both: z_k = z_n = 0 [Tab. 4]")
    tr.add_argument("--spatial-kernel", action=argparse.BooleanOptionalAction, default=None, help="[Eq. 5]")
    tr.add_argument("--lambda-reg", type=common.at_least(0, float), help="noise regulariser weight (paper 100)")
    tr.add_argument("--sr-init", help="initialise netSR from official-layout weights (EDSR-PyTorch / BasicSR)")
    tr.add_argument("--edsr-res-scale", type=float, help="EDSR residual scale (default 1, as released)")
    tr.add_argument("--gan", action=argparse.BooleanOptionalAction, default=None, help="PDM-SRGAN; needs --vgg-weights")
    tr.add_argument("--loss-weights", choices=tuple(LOSS_WEIGHTS), help="--gan: (L1, LSGAN, perceptual) weights of the "
                    "released configs: others 1 / 0.05 / 0.05, 2020track1 0.01 / 0.005 / 0.05 (default: others)")
    tr.add_argument("--release-perceptual", action=argparse.BooleanOptionalAction, default=None,
                    help="--gan: the released perceptual term, computed and logged but detached (no gradient)")
    tr.add_argument("--vgg-weights", help="--gan: torchvision VGG19 state dict (vgg19-dcbb9e9d.pth), never downloaded")
    common.add_run_args(tr)
    ev = sub.add_parser("eval", help="paired validation data or benchmark protocols, + bicubic row")
    ev.add_argument("--ckpt", help="joint or sr checkpoint written by `train`")
    ev.add_argument("--official-weights", help="released SR checkpoint (.pth)")
    ev.add_argument("--sr-net", choices=SR_NETS, default="edsr", help="layout of --official-weights")
    ev.add_argument("--edsr-res-scale", type=float, default=Config.edsr_res_scale, help="EDSR residual scale of "
                    "--official-weights (default 1, as every released config; the weights cannot tell)")
    ev.add_argument("--lr-data", help="LR folder matched by name to the single HR folder in --data")
    ev.add_argument("--tile", type=common.at_least(0), default=0, help="LR tiles of N px (default 0: whole image)")
    ev.add_argument("--tile-overlap", type=common.at_least(0), default=16, help="LR px of context (default 16)")
    ev.add_argument("--lpips-weights", nargs=2, metavar=("TRUNK", "LIN"), help=f"{common.TRUNK_FILES} and the LPIPS "
                    "v0.1 lin file alex.pth or vgg.pth, never downloaded; with --lr-data (default: none, no LPIPS)")
    ev.add_argument("--lpips-unverified", action=argparse.BooleanOptionalAction, default=False,
                    help="accept a lin file that is not the released v0.1 one (default: False)")
    common.add_run_args(ev)
    common.add_eval_args(ev)
    sa = sub.add_parser("sample", help="draw LR images and a kernel/noise sheet from a learned PDM")
    sa.add_argument("--ckpt", required=True)
    sa.add_argument("--hr-dir", required=True)
    sa.add_argument("--out", required=True, help="output folder")
    sa.add_argument("--n-samples", type=common.at_least(1), default=4)
    sa.add_argument("--limit", type=common.at_least(1), default=4, help="first N HR images")
    sa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sa.add_argument("--seed", type=int, default=None)
    mk = sub.add_parser("make-lr", help="offline stand-in real LR: hidden kernel + noise")
    mk.add_argument("--hr-dir", required=True)
    mk.add_argument("--out", required=True)
    mk.add_argument("--lambda1", type=float, default=1.6)
    mk.add_argument("--lambda2", type=float, default=1.6)
    mk.add_argument("--theta", type=float, default=0.0, help="degrees")
    mk.add_argument("--noise", type=float, default=10.0, help="sigma on 0-255")
    mk.add_argument("--scale", type=common.at_least(1), default=4)
    mk.add_argument("--seed", type=int, default=0)
    return common.show_defaults(parser, Config)


def explicit_flags(args) -> dict:
    """{config field: value} of the training flags given on the command line (None: not given), --steps aside."""
    return {"batch_size": args.batch_size, "save_every": args.save_every, "sr_net": args.sr_net,
            "fixed_zk": True if args.fixed_z else args.fixed_zk, "fixed_zn": True if args.fixed_z else args.fixed_zn,
            "use_noise": args.use_noise, "spatial_kernel": args.spatial_kernel, "lambda_reg": args.lambda_reg,
            "seed": args.seed, "edsr_res_scale": args.edsr_res_scale, "preset": args.preset, "gan": args.gan,
            "release_perceptual": args.release_perceptual, "loss_weights": LOSS_WEIGHTS.get(args.loss_weights)}


def config_from_args(args) -> Config:
    """Preset, then explicit flags; with --resume the checkpoint's config (only --steps may change)."""
    overrides = {**explicit_flags(args), "steps": args.steps}
    cfg = dataclasses.replace(Config(), **PRESETS[args.preset or "paper"])
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def prepare_train(args) -> tuple[Config, Path | None]:
    args.out_dir = args.out_dir or f"runs/{SCRIPT}/{args.stage}"
    cfg, resume = config_from_args(args), None
    if args.resume is not None:
        resume = Path(args.resume or Path(args.out_dir) / "last.pt")
        saved = common.resumed(resume, SCRIPT, (args.stage,), args.steps, explicit_flags(args), {"use_noise": "noise"})
        cfg = Config(**saved["config"])
        args.deg_ckpt = saved.get("deg_ckpt") or args.deg_ckpt
    elif args.stage == "sr":
        if not args.deg_ckpt:
            raise common.UserError("stage sr needs --deg-ckpt FILE (a deg or joint checkpoint)")
        saved = Config(**common.load_checkpoint(args.deg_ckpt, SCRIPT, ("deg", "joint"))["config"])
        cfg = dataclasses.replace(cfg, **{f: getattr(saved, f) for f in PDM_FIELDS}, scale=saved.scale)
    if args.stage != "sr" and not args.lr_dir:
        raise common.UserError(f"stage {args.stage} needs --lr-dir: the unpaired real LR images")
    if cfg.gan and args.stage == "deg":
        raise common.UserError("--gan trains netSR: use stage joint or sr (stage deg trains the PDM alone)")
    if cfg.gan and not args.vgg_weights:
        raise common.UserError("PDM-SRGAN (--gan) needs --vgg-weights FILE: a torchvision VGG19 state dict "
                               "(vgg19-dcbb9e9d.pth) for the perceptual loss; it is never downloaded")
    check_config(cfg)
    return cfg, resume


def main(argv=None):
    args = build_parser().parse_args(argv)
    with common.cli_errors():
        if args.command == "train":
            cfg, resume = prepare_train(args)
            return train(cfg, args, args.stage, resume)
        if args.command == "make-lr":
            written = make_stand_in_lr(args.hr_dir, args.out, args.lambda1, args.lambda2, args.theta, args.noise,
                                       args.scale, args.seed)
            return print(f"wrote {len(written)} LR images to {args.out}")
        if args.command == "sample":
            return sample(args)
        args.out_dir = args.out_dir or f"runs/{SCRIPT}/eval"
        return evaluate(args)


if __name__ == "__main__":
    main()
