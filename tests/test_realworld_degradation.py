"""common.py: the Real-ESRGAN second-order training degradation, its kernels, JPEG, USM, noise, pool."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import synthetic_image

PI = math.pi


def gt_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) natural-ish GT images on the 1/255 grid."""
    return torch.stack([torch.from_numpy(synthetic_image(seed + i, size, size)).permute(2, 0, 1)
                        for i in range(n)]).float() / 255


def on_grid(img: torch.Tensor) -> bool:
    return bool((img * 255 - (img * 255).round()).abs().max() < 1e-3)


# ---- Kernels (BasicSR's random kernels) ------------------------------------------------------------------------
KERNEL_TABLE = [  # (builder, {(row, col): value}) measured on BasicSR's kernel functions
    (lambda: common.family_kernels(0, 21, 2, 2, 0, 1), {(10, 10): 0.03978874, (10, 11): 0.03511344}),
    (lambda: common.family_kernels(0, 7, 1, 1, 0, 1, pad_to=7), {(3, 3): 0.15924113, (0, 0): 1.96519e-05}),
    (lambda: common.family_kernels(0, 21, 3, 1, PI / 4, 1), {(10, 10): 0.05305187, (11, 11): 0.04747290,
                                                         (9, 11): 0.01951669}),
    (lambda: common.family_kernels(1, 21, 2, 2, 0, 0.5), {(10, 10): 0.01260916, (10, 11): 0.00982002}),
    (lambda: common.family_kernels(1, 21, 2, 2, 0, 2), {(10, 10): 0.06349222}),
    (lambda: common.family_kernels(2, 21, 2, 2, 0, 1), {(10, 10): 0.02230985, (10, 11): 0.01784788}),
    (lambda: common.family_kernels(2, 21, 2, 2, 0, 2), {(10, 10): 0.05163162}),
    (lambda: common.sinc_kernels(PI / 3, 21), {(10, 10): 0.08775810, (10, 11): 0.07626569}),
    (lambda: common.sinc_kernels(PI / 2, 7), {(10, 10): 0.23575877, (7, 7): -0.00749881, (6, 6): 0.0}),
    (lambda: common.sinc_kernels(PI, 11, pad_to=11), {(5, 5): 0.77557858, (5, 6): 0.14052844}),
]


@pytest.mark.parametrize("build, values", KERNEL_TABLE)
def test_kernel_check_values(build, values):
    k = build()
    assert k.dtype == torch.float32 and k.shape[0] == 1
    assert abs(float(k.sum()) - 1) < 1e-6
    for (row, col), value in values.items():
        assert abs(float(k[0, row, col]) - value) < 1e-6, (row, col)


def test_padded_kernels_vanish_outside_their_core():
    for k in (common.family_kernels(0, 7, 3, 3, 0, 1), common.sinc_kernels(PI / 2, 7)):  # padded to 21, core rows 7…13
        core = torch.zeros(21, 21, dtype=torch.bool)
        core[7:14, 7:14] = True
        assert (k[0][~core] == 0).all() and (k[0][core] != 0).all()
        assert abs(float(k.sum()) - 1) < 1e-6


def test_equal_sigmas_give_iso_and_theta_has_period_pi():
    iso = common.family_kernels(0, 21, 1.7, 1.7, 0, 1)
    for kind, beta in ((0, 1.0), (1, 0.7), (2, 1.6)):
        rotated = common.family_kernels(kind, 21, 1.7, 1.7, 0.9, beta)
        assert torch.allclose(rotated, common.family_kernels(kind, 21, 1.7, 1.7, 0, beta), atol=1e-7)
        a, b = (common.family_kernels(kind, 15, 2.5, 0.8, t, beta) for t in (0.6, 0.6 + PI))
        assert torch.allclose(a, b, atol=1e-7)
    assert torch.allclose(common.family_kernels(0, 21, 1.7, 1.7, 1.1, 1), iso, atol=1e-7)


def test_mixed_family_batch_equals_single_calls():
    kind, size = torch.tensor([0, 1, 2, 1, 2, 0]), torch.tensor([21, 7, 13, 9, 21, 11])
    sx, sy = torch.tensor([2.0, 1.1, 0.5, 3.0, 1.5, 0.7]), torch.tensor([2.0, 0.4, 1.5, 1.0, 1.5, 2.2])
    theta, beta = torch.tensor([0.0, 0.3, -1.2, 2.5, 0.0, 1.0]), torch.tensor([1.0, 0.6, 1.8, 3.5, 1.0, 1.0])
    batch = common.family_kernels(kind, size, sx, sy, theta, beta)
    for i in range(6):
        single = common.family_kernels(int(kind[i]), int(size[i]), float(sx[i]), float(sy[i]), float(theta[i]),
                                   float(beta[i]))
        assert torch.allclose(batch[i], single[0], atol=1e-7), i
    cutoff = torch.tensor([PI / 3, PI / 2, PI])
    sinc = common.sinc_kernels(cutoff, torch.tensor([21, 7, 11]))
    assert torch.allclose(sinc[1], common.sinc_kernels(PI / 2, 7)[0], atol=1e-7)


def test_random_kernels_shapes_and_sums():
    torch.manual_seed(0)
    opts = common.RealESRGANOptions()
    for stage in (1, 2):
        k = common.random_kernels(256, stage, opts, "cpu")
        assert k.shape == (256, 21, 21) and k.dtype == torch.float32 and torch.isfinite(k).all()
        assert torch.allclose(k.sum((1, 2)), torch.ones(256), atol=1e-5)
        assert (k < 0).any(dim=(1, 2)).sum() > 0                       # some sinc kernels (negative lobes) at p 0.1
    only_sinc = common.random_kernels(64, 1, common.RealESRGANOptions(sinc_prob=(1.0, 1.0)), "cpu")
    assert torch.allclose(only_sinc.sum((1, 2)), torch.ones(64), atol=1e-5) and (only_sinc < 0).any(dim=(1, 2)).all()
    final = common.random_sinc(64, opts, "cpu")
    assert final.shape == (64, 21, 21) and torch.allclose(final.sum((1, 2)), torch.ones(64), atol=1e-5)
    delta = torch.zeros(21, 21)
    delta[10, 10] = 1
    assert torch.equal(common.random_sinc(4, common.RealESRGANOptions(final_sinc_prob=0.0), "cpu"), delta.expand(4, 21, 21))


def test_random_kernel_parameter_distributions(monkeypatch):
    seen = {}
    family = common.family_kernels
    monkeypatch.setattr(common, "family_kernels", lambda *args: seen.setdefault("args", args) and family(*args))
    torch.manual_seed(12)
    common.random_kernels(10000, 1, common.RealESRGANOptions(), "cpu")
    kind, size, sigma_x, sigma_y, theta, beta = seen["args"]
    frac = lambda mask: float(mask.double().mean())
    iso = sigma_x == sigma_y
    assert abs(frac(iso) - 0.69) < 0.02 and theta[iso].abs().max() == 0     # iso 0.45 + gen. iso 0.12 + plat. iso 0.12
    assert abs(frac(kind == 1) - 0.15) < 0.02 and abs(frac(kind == 2) - 0.15) < 0.02
    assert set(size.tolist()) == set(range(7, 22, 2)) and abs(frac(size == 7) - 1 / 8) < 0.02
    assert 0.2 <= float(sigma_x.min()) and float(sigma_x.max()) <= 3 and float(theta.abs().max()) <= PI
    gen, plateau = beta[kind == 1], beta[kind == 2]
    assert abs(frac(gen < 1) - 0.5) < 0.05 and 0.5 <= float(gen.min()) and float(gen.max()) <= 4
    assert abs(frac(plateau == 1) - 0.5) < 0.05 and 1 <= float(plateau.min()) and float(plateau.max()) <= 2


# ---- DiffJPEG (BasicSR's DiffJPEG) -----------------------------------------------------------------------------
def test_jpeg_quality_factors():
    factors = common.jpeg_factor(torch.tensor([30.0, 50.0, 75.0, 95.0]))
    assert torch.allclose(factors, torch.tensor([5 / 3, 1.0, 0.5, 0.1]), atol=1e-6)


@pytest.mark.parametrize("rgb, size, quality, low, high", [
    ((100, 100, 100), 16, 50, (100.0,) * 3, (100.0,) * 3),
    ((100, 100, 100), 16, 30, (101.3333,) * 3, (101.3333,) * 3),
    ((100, 100, 100), 20, 50, (87.00,) * 3, (114.66,) * 3),                 # zero padding to 32 hits the border
    ((200, 50, 30), 16, 50, (199.2530, 49.8005, 27.9865), (199.2530, 49.8005, 27.9865)),
])
def test_jpeg_constant_image_check_values(rgb, size, quality, low, high):
    img = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size) / 255
    out = common.jpeg(img, quality) * 255
    assert out.shape == img.shape
    assert np.allclose(out.amin((0, 2, 3)).numpy(), low, atol=5e-3)
    assert np.allclose(out.amax((0, 2, 3)).numpy(), high, atol=5e-3)


def test_jpeg_range_shape_and_per_sample_quality():
    torch.manual_seed(1)
    img = (gt_batch(1, 40)[..., :37, :27] + 0.1 * torch.randn(1, 3, 37, 27)).clamp(0, 1).expand(3, -1, -1, -1)
    out = common.jpeg(img, torch.tensor([30.0, 90.0, 62.5]))
    assert out.shape == (3, 3, 37, 27) and out.min() >= 0 and out.max() <= 1
    for i, q in enumerate((30.0, 90.0, 62.5)):
        assert torch.allclose(out[i], common.jpeg(img[:1], q)[0], atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 0.05
    assert (out[1] - img[1]).abs().mean() < (out[0] - img[0]).abs().mean()  # q 90 is closer to the input than q 30


def test_jpeg_luma_table_is_the_transposed_annex_k_table_and_chroma_is_420():
    # a cosine of horizontal frequency 7 (DCT coefficient F[0, 7] ≈ 33.9) is erased by T_Y[0, 7] = 72 at q 50,
    # the same cosine along rows (F[7, 0]) survives T_Y[7, 0] = 61: the stored y_table is Annex K transposed
    col = torch.arange(16.0) % 8
    horizontal = ((128 + 6 * torch.cos((2 * col + 1) * 7 * PI / 16)) / 255).expand(1, 3, 16, 16)
    assert (common.jpeg(horizontal, 50) * 255).std() < 0.01
    assert (common.jpeg(horizontal.transpose(-1, -2), 50) * 255).std() > 2
    # a checkerboard of two colours of almost equal luma: 2×2-averaged chroma leaves one flat, mean colour
    checker = ((torch.arange(16)[:, None] + torch.arange(16)) % 2).float()
    first, second = torch.tensor([200.0, 50, 100]).view(3, 1, 1), torch.tensor([50.0, 130, 90]).view(3, 1, 1)
    colours = first * checker + second * (1 - checker)
    out = common.jpeg(colours[None] / 255, 95) * 255
    assert out.std((2, 3)).max() < 0.5 and torch.allclose(out.mean((2, 3)), colours.mean((1, 2))[None], atol=2)


def test_jpeg_chroma_is_replicated_over_2x2():
    torch.manual_seed(13)
    img = 0.3 + 0.4 * torch.rand(2, 3, 16, 16)                              # mid-range: no clamping
    out = common.jpeg(img, torch.tensor([95.0, 60.0])) * 255
    cb = torch.einsum("j,bjhw->bhw", torch.tensor(common.RGB_TO_YCBCR[1]), out)
    assert (cb[:, 0::2, 0::2] - cb[:, 1::2, 1::2]).abs().max() < 1e-3 and (cb[:, 0::2] - cb[:, 1::2]).abs().max() < 1e-3
    assert cb[:, 0::2, 0::2].std() > 0.5                                      # but not constant


# ---- USM (BasicSR's USMSharp) ----------------------------------------------------------------------------------
def test_usm_kernel_constant_image_and_edge():
    kernel = common.usm_kernel()
    assert kernel.shape == (51, 51) and abs(float(kernel.sum()) - 1) < 1e-6
    assert abs(math.sqrt(float(kernel[25, 25])) - 0.04993894) < 1e-7        # 1-D centre tap, σ = 8
    flat = torch.full((1, 3, 40, 40), 0.4)
    assert torch.allclose(common.usm_sharp(flat), flat, atol=1e-7)
    edge = torch.full((1, 3, 40, 64), 0.3)
    edge[..., 32:] = 0.7
    out = common.usm_sharp(edge)
    assert out.max() > 0.75 and out.min() < 0.25 and out.min() >= 0 and out.max() <= 1
    assert (out[..., 33] - out[..., 30] > edge[..., 33] - edge[..., 30]).all()


# ---- Noise (BasicSR's *_pt noise) ------------------------------------------------------------------------------
def test_gaussian_noise_gray_colour_and_zero():
    torch.manual_seed(2)
    img = gt_batch(3, 24)
    noise = common.add_gaussian_noise(img, torch.tensor([10.0, 10.0, 20.0]), torch.tensor([True, False, True])) - img
    assert torch.allclose(noise[0, 0], noise[0, 1], atol=1e-7) and torch.allclose(noise[0, 0], noise[0, 2], atol=1e-7)
    assert (noise[1, 0] - noise[1, 1]).abs().max() > 0.01
    assert torch.allclose(2 * noise[0], noise[2], atol=1e-6)               # one gray field for the batch [quirk]
    assert 0.03 < float(noise[1].std()) < 0.05                             # σ = 10/255
    assert torch.equal(common.add_gaussian_noise(img, torch.zeros(3), torch.tensor([True, False, True])), img)


def test_poisson_levels_and_noise():
    levels = torch.stack([torch.arange(768) % n for n in (256, 129, 128, 3, 1)]).float().view(5, 3, 16, 16) / 255
    assert common.poisson_levels(levels).tolist() == [256, 256, 128, 4, 1]
    torch.manual_seed(3)
    img = gt_batch(2, 24)
    noise = common.add_poisson_noise(img, torch.tensor([1.0, 1.0]), torch.tensor([True, False])) - img
    assert torch.allclose(noise[0, 0], noise[0, 1], atol=1e-6) and torch.allclose(noise[0, 0], noise[0, 2], atol=1e-6)
    assert (noise[1, 0] - noise[1, 1]).abs().max() > 0.01 and noise.abs().max() > 0.01
    assert torch.equal(common.add_poisson_noise(img, torch.zeros(2), torch.tensor([True, False])), img)
    offgrid = img + 0.3 / 255                                                # noise is added to the unrounded image
    assert torch.equal(common.add_poisson_noise(offgrid, 0.0, False), offgrid)


# ---- Pipeline (Real-ESRGAN's feed_data order) ------------------------------------------------------------------
def test_pipeline_400_gives_100_on_the_grid():
    torch.manual_seed(4)
    img_lr = common.realesrgan_degrade(gt_batch(2, 400), common.RealESRGANOptions())
    assert img_lr.shape == (2, 3, 100, 100) and img_lr.min() >= 0 and img_lr.max() <= 1 and on_grid(img_lr)


def test_pipeline_deterministic_and_every_branch():
    gt, opts = gt_batch(2, 96), common.RealESRGANOptions()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(common.realesrgan_degrade(gt, opts))
    assert torch.equal(*runs)
    params = common.sample_realesrgan(2, opts, "cpu")
    assert params["kernel1"].shape == params["kernel2"].shape == params["sinc"].shape == (2, 21, 21)
    assert params["jpeg1"].shape == params["noise2_level"].shape == params["noise1_gray"].shape == (2,)
    for sinc_first in (True, False):
        for gaussian in (True, False):
            for mode in ("area", "bilinear", "bicubic"):
                p = params | dict(sinc_first=sinc_first, noise1_gaussian=gaussian, noise2_gaussian=not gaussian,
                                  mode1=mode, mode2=mode, final_mode=mode, second_blur=gaussian, scale1=0.15)
                img_lr = common.apply_realesrgan(gt, p)
                assert img_lr.shape == (2, 3, 24, 24) and on_grid(img_lr) and img_lr.min() >= 0 and img_lr.max() <= 1


def test_apply_follows_the_spec_order():
    quiet = common.RealESRGANOptions(gaussian_noise_prob=(1.0, 1.0), noise_range=((0.0, 0.0), (0.0, 0.0)))
    torch.manual_seed(11)
    gt = gt_batch(2, 96, seed=30)
    for sinc_first in (True, False):
        p = common.sample_realesrgan(2, quiet, "cpu") | dict(sinc_first=sinc_first, second_blur=True)
        x = F.interpolate(common.blur(gt, p["kernel1"]), scale_factor=p["scale1"], mode=p["mode1"])   # 1-2
        x = common.blur(common.jpeg(x.clamp(0, 1), p["jpeg1"]), p["kernel2"])                               # 3-5
        x = F.interpolate(x, size=(int(24 * p["scale2"]),) * 2, mode=p["mode2"]).clamp(0, 1)           # 6-7
        final = lambda t: common.blur(F.interpolate(t, size=(24, 24), mode=p["final_mode"]), p["sinc"])
        x = common.jpeg(final(x).clamp(0, 1), p["jpeg2"]) if sinc_first else final(common.jpeg(x, p["jpeg2"]))  # 8
        assert torch.equal(common.apply_realesrgan(gt, p), common.quantize(x))                             # 9


def test_sample_realesrgan_choice_frequencies():
    torch.manual_seed(14)
    draws = [common.sample_realesrgan(1, common.RealESRGANOptions(), "cpu") for _ in range(600)]
    frac = lambda test: sum(map(test, draws)) / len(draws)
    for n, (up, down, keep), (lo, hi) in ((1, (0.2, 0.7, 0.1), (0.15, 1.5)), (2, (0.3, 0.4, 0.3), (0.3, 1.2))):
        scales = [d[f"scale{n}"] for d in draws]
        counts = sum(s > 1 for s in scales), sum(s < 1 for s in scales), scales.count(1)
        assert all(abs(count / len(draws) - share) < 0.06 for count, share in zip(counts, (up, down, keep)))
        assert lo <= min(scales) and max(scales) <= hi
        for mode in ("area", "bilinear", "bicubic"):
            assert abs(frac(lambda d: d[f"mode{n}"] == mode) - 1 / 3) < 0.07
        assert abs(frac(lambda d: d[f"noise{n}_gaussian"]) - 0.5) < 0.07
        assert abs(frac(lambda d: bool(d[f"noise{n}_gray"])) - 0.4) < 0.07
        assert all(30 <= float(d[f"jpeg{n}"]) <= 95 for d in draws)
    sigmas = torch.cat([d["noise2_level"] for d in draws if d["noise2_gaussian"]])
    scales = torch.cat([d["noise2_level"] for d in draws if not d["noise2_gaussian"]])
    assert 1 <= float(sigmas.min()) and float(sigmas.max()) <= 25 and float(sigmas.max()) > 20
    assert 0.05 <= float(scales.min()) and float(scales.max()) <= 2.5 and float(scales.max()) > 2
    assert abs(frac(lambda d: d["second_blur"]) - 0.8) < 0.06 and abs(frac(lambda d: d["sinc_first"]) - 0.5) < 0.07
    assert abs(frac(lambda d: float(d["sinc"][0, 10, 10]) < 1) - 0.8) < 0.06       # a sinc, not the delta


def test_batch1_draw_applies_the_same_degradation_to_every_image():
    quiet = common.RealESRGANOptions(gaussian_noise_prob=(1.0, 1.0), noise_range=((0.0, 0.0), (0.0, 0.0)))
    torch.manual_seed(6)
    gt = gt_batch(3, 96, seed=20)
    for _ in range(3):
        params = common.sample_realesrgan(1, quiet, "cpu")
        together = common.apply_realesrgan(gt, params)
        for i in range(3):
            alone = common.apply_realesrgan(gt[i:i + 1], params)[0]
            assert (together[i] - alone).abs().max() <= 1 / 255 + 1e-6
            assert (together[i] != alone).float().mean() < 1e-3
        assert (together[0] - together[1]).abs().max() > 0.05


def test_paired_crop_is_aligned_at_4x_with_one_offset_per_batch():
    torch.manual_seed(7)
    img_hr = torch.rand(1, 3, 100, 100) + torch.arange(2.0).view(2, 1, 1, 1)   # sample 1 = sample 0 + 1
    img_lr = img_hr[..., ::4, ::4]
    offsets = set()
    for _ in range(6):
        lr, hr = common.paired_random_crop(img_lr, img_hr, 16, 4)
        assert lr.shape == (2, 3, 16, 16) and hr.shape == (2, 3, 64, 64)
        assert torch.equal(lr, hr[..., ::4, ::4]) and torch.allclose(lr[1] - lr[0], torch.ones(3, 16, 16))
        offsets.add(float(lr[0, 0, 0, 0]))
    assert len(offsets) > 1


# ---- Training-pair pool (Real-ESRGAN's queue) ------------------------------------------------------------------
def pairs(ids) -> tuple:
    """A batch whose pair i carries its id in pixel (0, 0, 0) of both LR and HR; other pixels random uint8/255."""
    ids = torch.as_tensor(ids)
    lr, hr = torch.randint(0, 256, (len(ids), 3, 4, 4)), torch.randint(0, 256, (len(ids), 3, 16, 16))
    lr[:, 0, 0, 0] = hr[:, 0, 0, 0] = ids
    return lr.float() / 255, hr.float() / 255


def ids_of(img: torch.Tensor) -> list:
    return (img[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("batch", [12, 50])                                  # 50 does not divide 180 [ours]
def test_pool_fills_then_exchanges_exact_pairs(batch):
    torch.manual_seed(8)
    pool, sent, ids = common.TrainingPairPool(180), {}, 0
    while pool.filled < 180:
        lr, hr = pairs(range(ids, ids + batch))
        sent.update({i: (lr[k], hr[k]) for k, i in enumerate(range(ids, ids + batch))})
        out = pool(lr, hr)
        assert out[0] is lr and out[1] is hr                                  # filling: train on the input
        ids += batch
    stored = set(range(180))
    lr, hr = pairs(range(ids, ids + batch))
    out_lr, out_hr = pool(lr, hr)
    got = ids_of(out_lr)
    assert out_lr.shape == (batch, 3, 4, 4) and out_hr.shape == (batch, 3, 16, 16) and got == ids_of(out_hr)
    assert len(set(got)) == batch and set(got) <= stored and sorted(got) != list(range(batch))  # permuted
    for k, i in enumerate(got):                                               # uint8 storage is exact
        assert torch.equal(out_lr[k], sent[i][0]) and torch.equal(out_hr[k], sent[i][1])
    held = set(ids_of(pool.state_dict()["lr"].float() / 255))
    assert held == (stored - set(got)) | set(range(ids, ids + batch))


def test_pool_state_round_trip():
    torch.manual_seed(9)
    pool = common.TrainingPairPool(36)
    for start in range(0, 48, 12):
        pool(*pairs(range(start, start + 12)))
    state = pool.state_dict()
    assert state["lr"].device.type == "cpu" and state["lr"].dtype == torch.uint8 and state["filled"] == 36
    resumed = common.TrainingPairPool(36)
    resumed.load_state_dict(state)
    batch = pairs(range(100, 112))
    torch.manual_seed(10)
    first = pool(*batch)
    torch.manual_seed(10)
    second = resumed(*batch)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(pool.state_dict()["lr"], resumed.state_dict()["lr"]))


def test_degrade_folder_is_seeded_per_image_and_refuses_bad_input(tmp_path, capsys):
    from PIL import Image
    (hr := tmp_path / "hr").mkdir()
    for i, (h, w) in enumerate(((96, 128), (80, 84))):
        Image.fromarray(synthetic_image(i, h, w)).save(hr / f"im{i}.png")
    first = common.main(["realesrgan", "--hr-dir", str(hr), "--out", str(tmp_path / "a")])
    torch.manual_seed(123)                                   # the caller's RNG state does not matter
    again = common.degrade_folder(hr, tmp_path / "b")
    assert [p.name for p in first] == ["im0.png", "im1.png"] and "2/2 im1.png" in capsys.readouterr().out
    assert [common.load_uint8(p).shape for p in first] == [(24, 32, 3), (20, 21, 3)]   # modcropped HR / 4
    assert all((common.load_uint8(a) == common.load_uint8(b)).all() for a, b in zip(first, again))
    other_seed = common.degrade_folder(hr, tmp_path / "c", seed=1)
    assert not (common.load_uint8(first[0]) == common.load_uint8(other_seed[0])).all()
    assert len(common.paired_files(tmp_path / "a", hr, 4)) == 2   # pairs with its HR folder for run_paired
    with pytest.raises(common.UserError, match="would be overwritten"):
        common.degrade_folder(hr, hr)
    Image.fromarray(synthetic_image(5, 64, 96)).save(hr / "small.png")
    with pytest.raises(common.UserError, match=r"small\.png is 96x64: the pipeline needs >= 74 px"):
        common.degrade_folder(hr, tmp_path / "d")
