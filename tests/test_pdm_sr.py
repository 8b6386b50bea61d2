"""PDM-SR: parameter counts, degradation operator, kernel/noise properties, gradient isolation of the joint step,
official-weights converter, kernel recovery on a hidden degradation, CLI end-to-end, exact resume."""
import copy
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import pdm_sr
from conftest import REPO

SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]


def count(module, trainable=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def dead_leaves(seed: int, size: int = 128, n: int = 400) -> torch.Tensor:
    """Occluding disks with power-law radii: edges at every scale, so blur width is identifiable. (3, S, S)"""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 128.0)
    y, x = np.mgrid[0:size, 0:size]
    for _ in range(n):
        r = min(3 * (1 - rng.random()) ** -0.8, 40)
        cy, cx = rng.uniform(-10, size + 10, 2)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return torch.from_numpy(np.round(img)).permute(2, 0, 1).float() / 255


# ---- networks ----------------------------------------------------------------------------------------------
def test_parameter_counts_match_spec():
    pdm = pdm_sr.build_pdm(pdm_sr.Config())
    assert count(pdm.deg_kernel) == 168_121  # z_k 64, 21x21, 16 blocks
    assert sum(b.numel() for b in pdm.deg_kernel.buffers()) == 17 * (64 + 64 + 1)
    assert count(pdm.deg_noise) == 595_715
    assert count(pdm_sr.build_pdm(pdm_sr.Config(use_noise=False))) == 168_121  # 2017Track2: no netN
    assert count(pdm_sr.Discriminator(stride=1)) == count(pdm_sr.Discriminator(stride=2)) == 1_845_952
    edsr = pdm_sr.EDSR()
    assert count(edsr) == 1_517_595 and count(edsr, trainable=True) == 1_517_571
    assert not any(p.requires_grad for m in (edsr.sub_mean, edsr.add_mean) for p in m.parameters())
    assert count(pdm_sr.RRDBNet()) == 16_697_987
    assert count(pdm_sr.build_sr(pdm_sr.Config(sr_net="rrdb"))) == 16_697_987                  # 23 blocks
    assert count(pdm_sr.build_sr(pdm_sr.Config()), trainable=True) == 1_517_571                # EDSR, 16 blocks


def test_shapes_and_initial_kernel():
    torch.manual_seed(0)
    pdm = pdm_sr.build_pdm(pdm_sr.Config())
    img_lr, kernels, noise = pdm(torch.rand(2, 3, 128, 128))
    assert img_lr.shape == noise.shape == (2, 3, 32, 32) and kernels.shape == (2, 21, 21)
    centre = math.e / (math.e + 440)  # zero_init: near-uniform box, not a delta
    assert torch.allclose(kernels[:, 10, 10], torch.tensor(centre), atol=1e-6)
    assert torch.allclose(kernels[:, 0, 0], torch.tensor(1 / (math.e + 440)), atol=1e-6)
    assert torch.equal(noise, torch.zeros_like(noise))  # netN starts noise-free
    x = torch.rand(2, 3, 32, 32)
    assert pdm_sr.Discriminator(stride=1)(x).shape == (2, 64, 32, 32)
    assert pdm_sr.Discriminator(stride=2)(x).shape == (2, 64, 8, 8)
    assert pdm_sr.EDSR(16, 2)(torch.rand(1, 3, 8, 10)).shape == (1, 3, 32, 40)
    assert pdm_sr.RRDBNet(16, 1, 8)(torch.rand(1, 3, 8, 10)).shape == (1, 3, 32, 40)


def test_edsr_residual_scale_is_the_released_one_and_a_config_field(shared, tmp_path):
    """Every released config sets res_scale 1 (spec 1.5); the weights cannot tell 1 from 0.1, so eval assumes 1."""
    assert pdm_sr.Config().edsr_res_scale == 1.0
    torch.manual_seed(0)
    released, tenth = (pdm_sr.build_sr(pdm_sr.Config(sr_blocks=2, sr_feats=16, edsr_res_scale=r)) for r in (1.0, 0.1))
    tenth.load_state_dict(released.state_dict())
    x = torch.rand(1, 3, 8, 8)
    assert [b.res_scale for b in tenth.body[:-1]] == [0.1, 0.1] and not torch.allclose(released(x), tenth(x))
    torch.save(manifest_state(shared, "netSR@EDSR"), tmp_path / "edsr.pth")
    for flags, res_scale in (([], 1.0), (["--edsr-res-scale", "0.1"], 0.1)):
        args = pdm_sr.build_parser().parse_args(["eval", "--official-weights", str(tmp_path / "edsr.pth"), *flags])
        model, cfg, _ = pdm_sr.load_for_inference(args, "cpu")
        assert cfg.edsr_res_scale == model.body[0].res_scale == res_scale


def test_rrdb_dense_convs_start_as_released():
    """BasicSR's default_init_weights(scale 0.1): Kaiming normal (fan_in) x 0.1 and bias 0 in every dense block;
    PyTorch's default (std 1 / sqrt(3 fan_in), about 4x larger here) elsewhere."""
    torch.manual_seed(0)
    net = pdm_sr.RRDBNet(64, 2, 32)
    for i, fan_in in enumerate((64, 96, 128, 160, 192), start=1):
        conv = getattr(net.body[1].rdb3, f"conv{i}")
        assert conv.weight.std().item() == pytest.approx(0.1 * math.sqrt(2 / (9 * fan_in)), rel=0.05)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert net.conv_body.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 9 * 64), rel=0.05)


# ---- degradation -------------------------------------------------------------------------------------------
def test_delta_kernel_is_exact_subsample():
    x = torch.rand(3, 3, 40, 48)
    delta = torch.zeros(3, 21, 21)
    delta[:, 10, 10] = 1
    assert torch.equal(pdm_sr.blur_downsample(x, delta, 4), x[:, :, ::4, ::4])


def test_grouped_conv_equals_unfold_equals_loop():
    torch.manual_seed(0)
    x, kernels = torch.rand(3, 3, 32, 36), torch.rand(3, 21, 21)
    kernels /= kernels.sum(dim=(1, 2), keepdim=True)
    grouped = pdm_sr.blur_downsample(x, kernels, 4)
    loop = torch.cat([pdm_sr.blur_downsample(x[i:i + 1], kernels[i:i + 1], 4) for i in range(3)])
    by_hand = torch.zeros(3, 3, 8, 9)  # y[b, c, i, j] = sum k[u, v] x_pad[b, c, 4i + u, 4j + v]
    x_pad = torch.nn.functional.pad(x, (10,) * 4, mode="reflect")
    for i in range(8):
        for j in range(9):
            by_hand[:, :, i, j] = (x_pad[:, :, 4 * i:4 * i + 21, 4 * j:4 * j + 21] * kernels[:, None]).sum((2, 3))
    variant = pdm_sr.blur_downsample_variant(x, kernels[..., None, None].expand(-1, -1, -1, 8, 9), 4)
    for other in (loop, by_hand, variant):
        torch.testing.assert_close(grouped, other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [False, True])
def test_learned_kernels_nonnegative_and_sum_to_one(spatial):
    torch.manual_seed(0)
    pdm = pdm_sr.PDM(netk_feats=16, netk_blocks=2, spatial_kernel=spatial, use_noise=False)
    with torch.no_grad():
        for p in pdm.parameters():
            p.add_(torch.randn_like(p))  # far from the init
    _, kernels, _ = pdm(torch.rand(3, 3, 32, 32))
    assert kernels.shape == ((3, 21, 21, 8, 8) if spatial else (3, 21, 21))
    assert (kernels >= 0).all()
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(kernels.shape[:1] + kernels.shape[3:]))
    assert kernels.std(dim=0).max() > 1e-4  # z_k really varies the kernel


def test_each_sample_gets_the_same_z_and_kernel_with_any_number_of_processes():
    """StepRandom: z_n of sample i is the same with 1 or 2 processes; netK runs on all 4 z_k in each process, so its
    BatchNorm (train mode) gives every sample the kernel one process gives it. netN's BatchNorm normalises over the
    process's share: on CPU the noise differs (CUDA: SyncBatchNorm)."""
    cfg = pdm_sr.Config(**pdm_sr.PRESETS["smoke"])
    torch.manual_seed(0)
    pdm = pdm_sr.build_pdm(cfg).train()
    with torch.no_grad():
        for p in pdm.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the zero-init heads: kernels and noise vary
    x = torch.rand(4, 3, 48, 48)
    draws = [pdm_sr.draw_z(common.StepRandom(0, 5, 4, common.Dist(r, n), "cpu"), cfg, x[:4 // n])
             for r, n in ((0, 1), (0, 2), (1, 2))]
    assert all(torch.equal(d["z_k"], draws[0]["z_k"]) for d in draws) and draws[0]["z_k"].shape == (4, 64, 1, 1)
    assert torch.equal(torch.cat([d["z_n"] for d in draws[1:]]), draws[0]["z_n"])  # (4, 3, 12, 12)
    _, kernels, noise = pdm(x, **draws[0])
    halves = [pdm(x[2 * r:2 * r + 2], **d) for r, d in enumerate(draws[1:])]
    assert torch.equal(torch.cat([h[1] for h in halves]), kernels)
    assert not torch.allclose(torch.cat([h[2] for h in halves]), noise)


def test_spatial_kernels_need_z_k_at_every_hr_pixel():
    """[Eq. 5] z_k lives on the HR grid and 3x3 convs mix neighbours, so the kernel of an LR output pixel also depends
    on z_k between the LR pixels: drawing z_k at the LR resolution only would be another model (not done)."""
    torch.manual_seed(0)
    pdm = pdm_sr.PDM(zk_dim=4, netk_feats=8, netk_blocks=1, spatial_kernel=True, use_noise=False).eval()
    with torch.no_grad():
        pdm.deg_kernel.deg_kernel[-2].weight.normal_()
    x, z_k = torch.rand(1, 3, 32, 32), torch.randn(1, 4, 32, 32)
    moved = z_k.clone()
    moved[:, :, 9, 9] += 1                 # HR pixel (9, 9): LR output pixels sit at multiples of 4
    with torch.no_grad():
        before, after = pdm(x, z_k=z_k)[1], pdm(x, z_k=moved)[1]                # (1, 21, 21, 8, 8)
    changed = (after - before).abs().amax(dim=(0, 1, 2)) > 0                    # (8, 8); receptive field +-3 HR px
    assert before.shape == (1, 21, 21, 8, 8) and changed.nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]


def test_pdm_with_hidden_kernel_reproduces_stand_in():
    """Spec 5 unit check: netK's last layer outputs log k* -> the PDM's clean LR equals the hidden degradation."""
    hidden = common.isotropic_kernels(1.6)
    pdm = pdm_sr.PDM(netk_feats=16, netk_blocks=1, netn_feats=8, netn_blocks=1)
    with torch.no_grad():
        pdm.deg_kernel.deg_kernel[-2].bias.copy_(hidden.flatten().log())
    x = torch.rand(2, 3, 64, 64)
    img_lr, kernels, _ = pdm(x)
    torch.testing.assert_close(kernels, hidden.expand(2, -1, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(img_lr, pdm_sr.blur_downsample(x, hidden.expand(2, -1, -1), 4), rtol=1e-5,
                               atol=1e-6)


def test_losses_and_soft_round():
    assert pdm_sr.noise_regularizer(torch.zeros(2, 3, 8, 8)).item() == 0.0
    assert pdm_sr.noise_regularizer(torch.full((2, 3, 8, 8), 0.1)).item() == pytest.approx(0.01)
    d = torch.randn(2, 64, 4, 4)
    assert pdm_sr.lsgan_discriminator_loss(torch.ones_like(d), torch.zeros_like(d)).item() == 0.0
    assert pdm_sr.lsgan_generator_loss(torch.ones_like(d)).item() == 0.0
    assert pdm_sr.lsgan_discriminator_loss(d, d).item() > 0
    y = (torch.arange(0, 255).float() + torch.rand(255) * 0.6 - 0.3) / 255  # away from the ties
    err = (pdm_sr.soft_round(y) - torch.round(y * 255) / 255).abs().max() * 255
    assert err < 0.2 and (y - torch.round(y * 255) / 255).abs().max() * 255 > 0.25


def test_fixed_z_is_deterministic_and_random_z_is_not():
    x = torch.rand(4, 3, 32, 32)
    fixed = pdm_sr.PDM(netk_feats=8, netk_blocks=1, netn_feats=8, netn_blocks=1, fixed_zk=True, fixed_zn=True)
    with torch.no_grad():
        fixed.deg_noise.deg_noise[-1].weight.normal_()
        assert torch.equal(fixed(x)[0], fixed(x)[0])
        free = pdm_sr.PDM(netk_feats=8, netk_blocks=1, netn_feats=8, netn_blocks=1)
        free.deg_noise.deg_noise[-1].weight.normal_()
        assert not torch.equal(free(x)[0], free(x)[0])


# ---- joint step --------------------------------------------------------------------------------------------
def test_gradient_isolation_of_the_joint_step():
    torch.manual_seed(0)
    cfg = pdm_sr.Config(**pdm_sr.PRESETS["smoke"])
    nets, opts, _ = pdm_sr.build_training(cfg, "joint", None, None, "cpu")
    img_hr, img_real = torch.rand(4, 3, 48, 48), torch.rand(4, 3, 12, 12)
    ok = lambda loss: None  # noqa: E731
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in nets.items()}
    img_fake, _ = pdm_sr.pdm_step(nets["pdm"], nets["disc"], opts["pdm"], img_hr, cfg, ok)
    assert all(p.grad is None for n in ("disc", "sr") for p in nets[n].parameters())  # D frozen, SR untouched
    assert not img_fake.requires_grad
    assert all(p.requires_grad for p in nets["disc"].parameters())  # D unfrozen again
    pdm_grads = [p.grad.clone() for p in nets["pdm"].parameters() if p.grad is not None]
    pdm_sr.disc_step(nets["disc"], opts["disc"], img_real, img_fake, cfg, False, ok)
    pdm_sr.sr_step(nets, opts, img_fake, img_hr, cfg, False, ok)
    after = [p.grad for p in nets["pdm"].parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(pdm_grads, after))  # no SR / D gradient reached the PDM
    for name in ("pdm", "disc", "sr"):  # every network was updated once
        assert any(not torch.equal(a, b) for a, b in zip(before[name], nets[name].parameters())), name
    opts["pdm"].zero_grad(set_to_none=True)
    pdm_sr.sr_step(nets, opts, nets["pdm"](img_hr)[0], img_hr, cfg, False, ok)  # graph attached
    assert all(p.grad is None for p in nets["pdm"].parameters())


def test_kernel_recovery_on_hidden_degradation():
    """Spec 5: 'real' LR = hidden iso kernel (sigma* = 1.6) + AWGN 10, unpaired; the PDM alone (deg stage step
    functions) moves the mean kernel's widths and the noise level towards the hidden ones."""
    torch.manual_seed(0)
    images = torch.stack([dead_leaves(i) for i in range(8)])
    hidden, sigma_n = common.isotropic_kernels(1.6), 10 / 255
    generator = torch.Generator().manual_seed(1)
    real = common.quantize(common.add_noise(pdm_sr.blur_downsample(images[4:], hidden.expand(4, -1, -1), 4),
                                            10, generator))  # (4, 3, 32, 32), from the other half of the pool
    cfg = pdm_sr.Config(netk_feats=32, netk_blocks=2, netn_feats=16, netn_blocks=1, learning_rate=5e-4)
    pdm, disc = pdm_sr.build_pdm(cfg), pdm_sr.Discriminator(16, stride=1)
    opt_p, opt_d = (torch.optim.Adam(n.parameters(), lr=cfg.learning_rate) for n in (pdm, disc))

    def crops(pool, size, n=8):
        idx, top, left = (torch.randint(hi, (n,)) for hi in (len(pool), pool.shape[-1] - size + 1,
                                                             pool.shape[-1] - size + 1))
        return torch.stack([pool[i, :, t:t + size, l:l + size] for i, t, l in zip(idx, top, left)])

    def errors():
        with torch.no_grad():
            kernel = pdm.deg_kernel(torch.randn(64, 64, 1, 1)).view(64, 21, 21).mean(0)
            noise = pdm(crops(images[:4], 64))[2]
        return (pdm_sr.kernel_widths(kernel) - 1.6).norm().item(), abs(noise.std().item() - sigma_n)

    kernel_err0, noise_err0 = errors()
    for _ in range(120):
        img_fake, _ = pdm_sr.pdm_step(pdm, disc, opt_p, crops(images[:4], 64), cfg, lambda loss: None)
        pdm_sr.disc_step(disc, opt_d, crops(real, 16), img_fake, cfg, False, lambda loss: None)
    kernel_err, noise_err = errors()
    # box init (widths 6.04) -> 1.6; even a GAN overshoot to a delta (widths ~0) stays below 2.3
    assert kernel_err0 > 6 and kernel_err < 0.5 * kernel_err0
    assert noise_err < 0.9 * noise_err0  # zero noise -> towards 10/255


# ---- official weights --------------------------------------------------------------------------------------
def manifest_state(shared, prefix: str, file: str = "pdm_keys.tsv") -> dict:
    state = {}
    for line in (shared / "manifests" / file).read_text().splitlines():
        key, shape = line.split("\t")
        if key.startswith(prefix):
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            state[key.rsplit("/", 1)[-1]] = torch.randn(dims) if dims else torch.tensor(3)
    return state


@pytest.mark.parametrize("net, prefix, file", [("edsr", "netSR@EDSR", "pdm_keys.tsv"),
                                               ("rrdb", "netSR@RRDB", "pdm_keys_extra.tsv")])
def test_converter_loads_manifest_strictly(shared, tmp_path, net, prefix, file, capsys):
    state = {k: v * 0.01 for k, v in manifest_state(shared, prefix, file).items()}
    torch.save({"params": state} if net == "rrdb" else state, tmp_path / "w.pth")
    model = pdm_sr.build_sr(pdm_sr.Config(sr_net=net))             # 16 (EDSR) / 23 (RRDB) blocks by default
    loaded = pdm_sr.convert_official(pdm_sr.read_official(tmp_path / "w.pth"), model, net)
    assert set(loaded) == set(model.state_dict()) == set(state)
    x = torch.rand(1, 3, 6, 6)
    before = model(x)
    model.load_state_dict(loaded, strict=True)
    assert not torch.allclose(before, model(x))
    broken = dict(state)
    broken.pop(next(iter(broken)))
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "bad.pth")
    with pytest.raises(common.UserError, match="unexpected official keys .*extra.weight"):
        pdm_sr.convert_official(pdm_sr.read_official(tmp_path / "bad.pth"), model, net)
    other = "rrdb" if net == "edsr" else "edsr"
    with pytest.raises(common.UserError, match=f"--sr-net {net}"):
        pdm_sr.convert_official(state, pdm_sr.build_sr(pdm_sr.Config(sr_net=other)), other)


def test_netk_key_layout_matches_release(shared):
    """The released DegModel layout (no netN, 2017 config) loads strictly into our PDM: same key names."""
    state = manifest_state(shared, "netDeg@test/2017Track1/")
    pdm_sr.build_pdm(pdm_sr.Config(use_noise=False)).load_state_dict(state, strict=True)


def test_discriminator_key_layout_matches_release(shared):
    """The released PatchGAN (nf 64, 3 layers) loads strictly into Discriminator: names, shapes, 1,845,952 params."""
    state = manifest_state(shared, "netD@PatchGAN_nf64_nb3/", "pdm_keys_extra.tsv")
    disc = pdm_sr.Discriminator(stride=1)
    disc.load_state_dict(state, strict=True)
    assert sum(v.numel() for v in state.values()) == 1_845_952


def test_official_weights_eval_and_errors(shared, tmp_path, tiny_bench_root):
    torch.save(manifest_state(shared, "netSR@EDSR"), tmp_path / "edsr.pth")
    rows = pdm_sr.main(["eval", "--official-weights", str(tmp_path / "edsr.pth"), "--data", "Tiny", "--data-root",
                        str(tiny_bench_root), "--protocol", "bicubic", "--device", "cpu", "--out-dir",
                        str(tmp_path / "ev")])
    assert rows[-1]["n"] == 2 and math.isfinite(rows[-1]["psnr"])
    with pytest.raises(SystemExit, match="error: .*--sr-net edsr"):
        pdm_sr.main(["eval", "--official-weights", str(tmp_path / "edsr.pth"), "--sr-net", "rrdb", "--device", "cpu"])
    with pytest.raises(SystemExit, match="error: official weights not found"):
        pdm_sr.main(["eval", "--official-weights", str(tmp_path / "nope.pth"), "--device", "cpu"])


# ---- CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_dir(tiny_hr_dir, tmp_path_factory):
    """Unpaired 'real' LR: the tiny HR images through a hidden anisotropic kernel + noise 10."""
    out = tmp_path_factory.mktemp("real_lr")
    pdm_sr.main(["make-lr", "--hr-dir", str(tiny_hr_dir), "--out", str(out), "--lambda1", "2.5", "--lambda2",
                 "1.0", "--theta", "30"])
    return out


def test_make_lr_rejects_a_degenerate_domain_and_never_overwrites_hr(tiny_hr_dir, tmp_path):
    for flags in (["--noise", "-5"], ["--lambda1", "0"], ["--lambda2", "nan"], ["--noise", "nan"]):
        with pytest.raises(SystemExit, match="error: make-lr needs --lambda1, --lambda2 > 0 and --noise >= 0"):
            pdm_sr.main(["make-lr", "--hr-dir", str(tiny_hr_dir), "--out", str(tmp_path / "lr"), *flags])
    assert not (tmp_path / "lr").exists()
    before = {p: p.read_bytes() for p in tiny_hr_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="error: make-lr writes <stem>.png into .*: it must not be an HR folder"):
        pdm_sr.main(["make-lr", "--hr-dir", str(tiny_hr_dir), "--out", str(tiny_hr_dir)])
    assert {p: p.read_bytes() for p in tiny_hr_dir.rglob("*") if p.is_file()} == before
    (small := tmp_path / "small").mkdir()
    Image.fromarray(np.zeros((10, 40, 3), np.uint8)).save(small / "thin.png")
    with pytest.raises(SystemExit, match=r"error: .*thin.png is 40x8: the 21-tap kernel needs >= 11 px"):
        pdm_sr.main(["make-lr", "--hr-dir", str(small), "--out", str(tmp_path / "lr")])


def test_train_sample_eval_end_to_end(tiny_hr_dir, lr_dir, tiny_bench_root, tmp_path):
    run = tmp_path / "joint"
    pdm_sr.main(["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--out-dir", str(run),
                 "--steps", "4"])
    assert set(log_records(run)[-1]) >= {"l_adv", "l_reg", "l_d", "l_sr"}
    sheet = pdm_sr.main(["sample", "--ckpt", str(run / "last.pt"), "--hr-dir", str(tiny_hr_dir), "--out",
                         str(tmp_path / "sample"), "--n-samples", "3", "--limit", "2", "--device", "cpu"])
    assert sheet.is_file() and len(list((tmp_path / "sample").glob("*_s*.png"))) == 6
    assert common.load_uint8(tmp_path / "sample" / "img0_s0.png").shape == (24, 24, 3)
    rows = pdm_sr.main(["eval", "--ckpt", str(run / "last.pt"), "--data", "Tiny", "--data-root",
                        str(tiny_bench_root), "--device", "cpu", "--out-dir", str(tmp_path / "ev"), "--save-images"])
    assert rows[-1]["n"] == 16 and (tmp_path / "ev" / "results.csv").is_file()
    assert len(list((tmp_path / "ev" / "images").rglob("*.png"))) == 16
    val_lr = tmp_path / "val_lr"
    pdm_sr.main(["make-lr", "--hr-dir", str(tiny_bench_root / "Tiny" / "HR"), "--out", str(val_lr)])
    paired = pdm_sr.main(["eval", "--ckpt", str(run / "last.pt"), "--data", str(tiny_bench_root / "Tiny" / "HR"),
                          "--lr-data", str(val_lr), "--device", "cpu", "--out-dir", str(tmp_path / "ev2")])
    assert paired[-1]["n"] == 2 and "bicubic x4 paired" in (tmp_path / "ev2" / "results.md").read_text()
    assert paired[-1]["psnr_rgb"] != paired[-1]["psnr"] and 0 < paired[-1]["ssim_rgb"] < 1   # paper: RGB [Sec. 4.1]
    assert "| PSNR (Y) | SSIM (Y) | PSNR RGB | SSIM RGB | n |" in (tmp_path / "ev2" / "results.md").read_text()


def test_sample_reports_the_widths_of_the_mean_kernel(tiny_hr_dir, lr_dir, tmp_path, monkeypatch, capsys):
    pdm_sr.main(["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "1",
                 "--out-dir", str(tmp_path)])
    measured, sheets = [], []
    monkeypatch.setattr(pdm_sr, "kernel_widths", lambda k: measured.append(k) or torch.tensor([2.0, 1.0]))
    monkeypatch.setattr(pdm_sr, "draw_sheet", lambda rows, path: sheets.append(rows))
    pdm_sr.main(["sample", "--ckpt", str(tmp_path / "last.pt"), "--hr-dir", str(tiny_hr_dir), "--out",
                 str(tmp_path / "s"), "--n-samples", "3", "--limit", "2", "--device", "cpu"])
    drawn = torch.cat([kernel for row in sheets[0] for _, kernel, _ in row])     # (6, 21, 21)
    assert len(measured) == 1 and torch.allclose(measured[0], drawn.mean(0))   # E_z[k] (spec 5), not mean widths
    assert "wrote 6 LR samples" in (out := capsys.readouterr().out) and "widths of the mean kernel 2.00 / 1.00" in out


def test_two_step_stages_and_switches(tiny_hr_dir, lr_dir, tmp_path):
    pdm_sr.main(["train", *SMOKE, "--stage", "deg", "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir),
                 "--out-dir", str(tmp_path / "deg"), "--steps", "2", "--no-noise"])
    deg = common.load_checkpoint(tmp_path / "deg" / "last.pt", "pdm_sr")
    assert deg["model"] is None and not any(k.startswith("deg_noise") for k in deg["pdm"])
    assert deg["disc"]["model.2.weight"].shape[0] == 32  # smoke D width 16
    pdm_sr.main(["train", *SMOKE, "--stage", "sr", "--hr-dir", str(tiny_hr_dir), "--deg-ckpt",
                 str(tmp_path / "deg" / "last.pt"), "--out-dir", str(tmp_path / "sr"), "--steps", "2"])
    sr = common.load_checkpoint(tmp_path / "sr" / "last.pt", "pdm_sr")
    assert all(torch.equal(sr["pdm"][k], v) for k, v in deg["pdm"].items() if "running" not in k
               and "num_batches" not in k)  # the PDM stayed frozen
    assert set(sr["optimizer"]) == {"sr"} and sr["config"]["use_noise"] is False
    (tmp_path / "deg" / "last.pt").rename(tmp_path / "deg" / "moved.pt")   # resume needs only its own last.pt
    pdm_sr.main(["train", *SMOKE, "--stage", "sr", "--hr-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path / "sr"),
                 "--steps", "3", "--resume"])
    resumed = common.load_checkpoint(tmp_path / "sr" / "last.pt", "pdm_sr")
    assert resumed["step"] == 3 and all(torch.equal(resumed["pdm"][k], v) for k, v in deg["pdm"].items()
                                        if "running" not in k and "num_batches" not in k)
    with pytest.raises(SystemExit, match="error: stage sr needs --deg-ckpt"):
        pdm_sr.main(["train", *SMOKE, "--stage", "sr", "--hr-dir", str(tiny_hr_dir)])
    with pytest.raises(SystemExit, match="error: stage joint needs --lr-dir"):
        pdm_sr.main(["train", *SMOKE, "--hr-dir", str(tiny_hr_dir)])
    with pytest.raises(SystemExit, match="error: .*'deg' checkpoint"):
        pdm_sr.main(["eval", "--ckpt", str(tmp_path / "deg" / "moved.pt"), "--device", "cpu"])


def test_resume_continues_identically(tiny_hr_dir, lr_dir, tmp_path):
    base = ["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir)]
    pdm_sr.main([*base, "--out-dir", str(tmp_path / "a"), "--steps", "6"])
    pdm_sr.main([*base, "--out-dir", str(tmp_path / "b"), "--steps", "3"])
    pdm_sr.main([*base, "--out-dir", str(tmp_path / "b"), "--steps", "6", "--resume"])
    a, b = (common.load_checkpoint(tmp_path / d / "last.pt", "pdm_sr") for d in "ab")
    assert a["step"] == b["step"] == 6
    for part in ("model", "pdm", "disc"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for name in ("pdm", "disc", "sr"):
        assert a["scheduler"][name] == b["scheduler"][name]
        sa, sb = a["optimizer"][name]["state"], b["optimizer"][name]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    ra, rb = log_records(tmp_path / "a")[-1], log_records(tmp_path / "b")[-1]
    assert all(ra[k] == rb[k] for k in ("l_adv", "l_reg", "l_d", "l_sr"))


# ---- robustness: signals, non-finite loss, scale check, tiles, torchrun, anisotropic recovery ----------------

def test_sigterm_stops_after_the_step_and_resume_matches(tiny_hr_dir, lr_dir, tmp_path, monkeypatch, capsys):
    base = ["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "6"]
    pdm_sr.main([*base, "--out-dir", str(tmp_path / "a")])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    original = common.RunLog.log

    def log_then_signal(self, step, stage, **scalars):
        original(self, step, stage, **scalars)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common.RunLog, "log", log_then_signal)
    with pytest.raises(SystemExit) as exit_info:             # 128 + SIGTERM
        pdm_sr.main([*base, "--out-dir", str(tmp_path / "b")])
    assert exit_info.value.code == 143
    monkeypatch.setattr(common.RunLog, "log", original)
    assert "stopped by signal at step 3" in capsys.readouterr().out
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored
    assert common.load_checkpoint(tmp_path / "b" / "last.pt", "pdm_sr")["step"] == 3
    pdm_sr.main([*base, "--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / d / "last.pt", "pdm_sr") for d in "ab")
    for part in ("model", "pdm", "disc"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    ra, rb = log_records(tmp_path / "a")[-1], log_records(tmp_path / "b")[-1]
    assert ra["step"] == rb["step"] == 6 and all(ra[k] == rb[k] for k in ("l_adv", "l_reg", "l_d", "l_sr"))


def test_batch_of_one_only_with_spatial_kernels(tiny_hr_dir, lr_dir, tmp_path):
    """netK's BatchNorm needs two 1x1 z_k per batch; with --spatial-kernel it also pools over h x w, so 1 is fine."""
    run = ["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "1", "--batch-size", "1"]
    for extra in ([], ["--fixed-z"]):
        with pytest.raises(SystemExit, match="^error: netK's BatchNorm normalises over the batch of 1x1 z_k"):
            pdm_sr.main([*run, "--out-dir", str(tmp_path / "x"), *extra])
    pdm_sr.main([*run, "--out-dir", str(tmp_path / "s"), "--spatial-kernel"])
    assert log_records(tmp_path / "s")[-1]["step"] == 1


def test_nan_loss_stops_with_a_clear_error(tiny_hr_dir, lr_dir, tmp_path, monkeypatch):
    calls, original = [], pdm_sr.lsgan_generator_loss

    def nan_on_third_call(d_fake):
        calls.append(1)
        loss = original(d_fake)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pdm_sr, "lsgan_generator_loss", nan_on_third_call)
    with pytest.raises(SystemExit, match="error: loss became nan at step 3"):
        pdm_sr.main(["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "6",
                     "--save-every", "1", "--out-dir", str(tmp_path)])
    assert common.load_checkpoint(tmp_path / "last.pt", "pdm_sr")["step"] == 2  # last good one, loadable


def test_eval_wrong_scale_and_tiles(tiny_hr_dir, lr_dir, tiny_bench_root, tmp_path):
    pdm_sr.main(["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "1",
                 "--out-dir", str(tmp_path / "run")])
    ev = ["eval", "--ckpt", str(tmp_path / "run" / "last.pt"), "--data", "Tiny", "--data-root",
          str(tiny_bench_root), "--device", "cpu", "--protocol", "bicubic"]
    with pytest.raises(SystemExit, match=r"error: .*x4.*--scale 2"):
        pdm_sr.main([*ev, "--scale", "2"])
    whole = pdm_sr.main([*ev, "--out-dir", str(tmp_path / "w")])
    tiles = pdm_sr.main([*ev, "--tile", "5", "--tile-overlap", "16", "--out-dir", str(tmp_path / "t")])
    assert tiles[-1]["psnr"] == pytest.approx(whole[-1]["psnr"], abs=1e-3)  # overlap covers the receptive field


def torchrun(cwd, *args) -> tuple[list[dict], str]:
    """`pdm_sr.py train ...` under torchrun with two CPU ranks (tests/ddp_train_probe.py): the probes' JSON, stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "pdm_sr", "train", *SMOKE, *args]
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    # both ranks print to one pipe: their lines can interleave, so pick out every {...} object
    return [json.loads(obj) for obj in re.findall(r'\{"rank"[^{}]*\}', result.stdout)], result.stdout


def test_torchrun_two_ranks_agree_and_say_what_cpu_cannot_match(tiny_hr_dir, lr_dir, tmp_path):
    """With netN on CPU (gloo, no SyncBatchNorm) its BatchNorm normalises over each process's share: the ranks agree
    with each other, the run says it is not exactly the one-process run, and it is not."""
    data = ["--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "3"]
    records, stdout = torchrun(tmp_path, *data, "--out-dir", str(tmp_path / "two"))
    assert sorted(r["rank"] for r in records) == [0, 1] and all(r["world"] == 2 for r in records)
    assert all(r["ranks_agree"] and r["models"] == 3 for r in records)  # PDM, D and SR all under DDP
    assert records[0]["checksum"] == records[1]["checksum"]
    assert stdout.count("note: on CPU the BatchNorm of deg_noise normalises over each process's share") == 1
    two = common.load_checkpoint(tmp_path / "two" / "last.pt", "pdm_sr")
    one = common.load_checkpoint(pdm_sr.main(["train", *SMOKE, *data, "--out-dir", str(tmp_path / "one")]), "pdm_sr")
    netn = [k for k in one["pdm"] if k.startswith("deg_noise") and k.endswith("weight")]
    assert two["step"] == 3 and not all(torch.allclose(two["pdm"][k], one["pdm"][k]) for k in netn)


def test_two_processes_compute_the_run_of_one(tiny_hr_dir, lr_dir, tmp_path):
    """Global batch 4 without netN: two processes taking 2 each (steps 1-2), then one resumed (step 3), compute the
    3 steps one process computes. Stage sr (frozen PDM; BN over all 4 z_k on both): the same weights to 1e-5. Joint:
    the same computation, to within 5 % of one Adam step (lr 1e-3) after 3 steps; left out are the PatchGAN's conv
    biases before InstanceNorm, which cannot change its output: their gradient is 0 but for rounding, which Adam
    turns into +-lr steps. The logged losses are the global batch's on both."""
    train = ["--hr-dir", str(tiny_hr_dir), "--batch-size", "4"]
    joint = [*train, "--lr-dir", str(lr_dir), "--no-noise"]
    one = pdm_sr.main(["train", *SMOKE, *joint, "--steps", "3", "--out-dir", str(tmp_path / "one")])
    sr = [*train, "--stage", "sr", "--deg-ckpt", str(one)]
    sr_one = pdm_sr.main(["train", *SMOKE, *sr, "--steps", "3", "--out-dir", str(tmp_path / "sr_one")])
    for run, args, tol in (("mixed", joint, 5e-5), ("sr_mixed", sr, 1e-7)):
        _, stdout = torchrun(tmp_path, *args, "--steps", "2", "--out-dir", str(tmp_path / run))  # 2 processes ...
        assert "note:" not in stdout
        pdm_sr.main(["train", *SMOKE, *args, "--steps", "3", "--out-dir", str(tmp_path / run), "--resume"])  # ... 1
        ref = common.load_checkpoint(one if run == "mixed" else sr_one, "pdm_sr")
        ckpt = common.load_checkpoint(tmp_path / run / "last.pt", "pdm_sr")
        for part in ("model", "pdm", "disc") if run == "mixed" else ("model", "pdm"):
            for key, value in ref[part].items():
                if not (part == "disc" and key in ("model.2.bias", "model.5.bias", "model.8.bias")):
                    torch.testing.assert_close(ckpt[part][key], value, rtol=1e-5, atol=tol, msg=f"{run}: {part} {key}")
        two, single = (log_records(tmp_path / name)[1] for name in (run, "one" if run == "mixed" else "sr_one"))
        assert two["step"] == 2 and all(two[k] == pytest.approx(single[k], rel=1e-5) for k in single if k[:2] == "l_")


def test_anisotropic_kernel_recovery_reports_distances(capsys):
    """Hidden anisotropic kernel (lambda 2.5 / 1.0, 30 deg) + AWGN 10: the widths of the mean learned kernel move
    from the box init towards the hidden ones (shift-invariant, spec 5)."""
    torch.manual_seed(0)
    images = torch.stack([dead_leaves(i) for i in range(8)])
    hidden = common.anisotropic_kernels(2.5, 1.0, math.radians(30))
    target = pdm_sr.kernel_widths(hidden[0])
    real = common.quantize(common.add_noise(pdm_sr.blur_downsample(images[4:], hidden.expand(4, -1, -1), 4), 10,
                                            torch.Generator().manual_seed(1)))
    cfg = pdm_sr.Config(netk_feats=32, netk_blocks=2, netn_feats=16, netn_blocks=1, learning_rate=5e-4)
    pdm, disc = pdm_sr.build_pdm(cfg), pdm_sr.Discriminator(16, stride=1)
    opt_p, opt_d = (torch.optim.Adam(n.parameters(), lr=cfg.learning_rate) for n in (pdm, disc))

    def crops(pool, size, n=8):
        idx, top, left = (torch.randint(pool.shape[-1] - size + 1 if i else len(pool), (n,)) for i in range(3))
        return torch.stack([pool[i, :, t:t + size, l:l + size] for i, t, l in zip(idx, top, left)])

    def distance():
        with torch.no_grad():
            kernel = pdm.deg_kernel(torch.randn(64, 64, 1, 1)).view(64, 21, 21).mean(0)
        return (pdm_sr.kernel_widths(kernel) - target).norm().item()

    before = distance()
    for _ in range(120):
        img_fake, _ = pdm_sr.pdm_step(pdm, disc, opt_p, crops(images[:4], 64), cfg, lambda loss: None)
        pdm_sr.disc_step(disc, opt_d, crops(real, 16), img_fake, cfg, False, lambda loss: None)
    after = distance()
    with capsys.disabled():
        print(f"\nkernel width distance to hidden {target.tolist()}: init {before:.3f} -> trained {after:.3f}")
    assert after < 0.5 * before


# ---- Tab. 4 ablation flags, PDM-SRGAN [Sec. 3.4; spec realworld 5], LPIPS ---------------------------------------
SMOKE_CFG = pdm_sr.Config(**pdm_sr.PRESETS["smoke"])
ALEX_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}


def test_fixed_zk_and_fixed_zn_each_zero_one_input():
    """Tab. 4 "only z_n random" (--fixed-zk) and "only z_k random" (--fixed-zn): the fixed z reaches netK / netN as
    zeros, the other is drawn afresh at every forward."""
    x = torch.rand(4, 3, 32, 32)
    for fixed in ("z_k", "z_n"):
        torch.manual_seed(0)
        pdm = pdm_sr.PDM(netk_feats=8, netk_blocks=1, netn_feats=8, netn_blocks=1, fixed_zk=fixed == "z_k",
                         fixed_zn=fixed == "z_n")
        seen = []
        pdm.deg_kernel.register_forward_pre_hook(lambda module, inputs: seen.append(("z_k", inputs[0])))
        pdm.deg_noise.register_forward_pre_hook(lambda module, inputs: seen.append(("z_n", inputs[1])))
        with torch.no_grad():
            pdm.deg_kernel.deg_kernel[-2].weight.normal_()      # kernels and noise depend on their z
            pdm.deg_noise.deg_noise[-1].weight.normal_()
            (_, kernels1, noise1), (_, kernels2, noise2) = pdm(x), pdm(x)
        (_, zk1), (_, zn1), (_, zk2), (_, zn2) = seen
        z1, z2, other1, other2 = (zk1, zk2, zn1, zn2) if fixed == "z_k" else (zn1, zn2, zk1, zk2)
        assert torch.equal(z1, torch.zeros_like(z1)) and torch.equal(z2, torch.zeros_like(z2)), fixed
        assert other1.std() > 0.5 and not torch.equal(other1, other2), fixed
        assert torch.equal(kernels1, kernels2) == (fixed == "z_k")
        assert not torch.equal(noise1, noise2)                   # z_n, or y_clean through a random kernel


def test_fixed_z_flags_and_old_checkpoints(tiny_hr_dir, lr_dir, tmp_path):
    """--fixed-zk / --fixed-zn set one each, --fixed-z both; a checkpoint from before the split (config key fixed_z)
    still loads: Config(**old) fixes both, in eval, sample and as the frozen PDM of stage sr."""
    base = ["train", "--hr-dir", "h", "--lr-dir", "l"]
    for flags, expected in (([], (False, False)), (["--fixed-zk"], (True, False)), (["--fixed-zn"], (False, True)),
                            (["--fixed-z"], (True, True))):
        cfg = pdm_sr.config_from_args(pdm_sr.build_parser().parse_args([*base, *flags]))
        assert (cfg.fixed_zk, cfg.fixed_zn) == expected and pdm_sr.build_pdm(cfg).fixed_zn == expected[1]
    pdm_sr.main(["train", *SMOKE, "--stage", "deg", "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir),
                 "--steps", "1", "--out-dir", str(tmp_path / "deg")])
    ckpt = torch.load(tmp_path / "deg" / "last.pt", weights_only=True)
    old = {k: v for k, v in ckpt["config"].items() if k not in ("fixed_zk", "fixed_zn", "gan", "loss_weights",
                                                                "release_perceptual")}
    torch.save({**ckpt, "config": {**old, "fixed_z": True}}, tmp_path / "old.pt")
    cfg = pdm_sr.Config(**{**old, "fixed_z": True})
    assert cfg.fixed_zk and cfg.fixed_zn and "fixed_z" not in dataclasses.asdict(cfg)
    assert not pdm_sr.Config(**{**old, "fixed_z": False}).fixed_zk
    args = pdm_sr.build_parser().parse_args(["train", "--stage", "sr", "--hr-dir", "h", "--deg-ckpt",
                                             str(tmp_path / "old.pt")])
    cfg, _ = pdm_sr.prepare_train(args)
    assert cfg.fixed_zk and cfg.fixed_zn
    pdm_sr.main(["sample", "--ckpt", str(tmp_path / "old.pt"), "--hr-dir", str(tiny_hr_dir), "--out",
                 str(tmp_path / "s"), "--n-samples", "2", "--limit", "1", "--device", "cpu"])


def gan_parts(cfg, seed=0):
    torch.manual_seed(seed)
    nets = {"sr": pdm_sr.build_sr(cfg), "disc_hr": pdm_sr.Discriminator(cfg.disc_feats, stride=1)}
    opts = {k: torch.optim.Adam([p for p in n.parameters() if p.requires_grad], lr=1e-3) for k, n in nets.items()}
    vgg = pdm_sr.VGG19Features().eval().requires_grad_(False)
    return nets, opts, vgg, torch.rand(2, 3, 12, 12), torch.rand(2, 3, 48, 48)


def test_perceptual_term_is_vgg19_conv5_4_and_trains_the_sr_net_unless_released():
    """L1 mean of VGG19 conv5_4 (features.34, before its ReLU) on ImageNet-normalised RGB. Ours sends a gradient into
    netSR; --release-perceptual (x = HR, gt = SR detached, as released) has the same value and no gradient."""
    cfg = dataclasses.replace(SMOKE_CFG, gan=True)
    nets, _, vgg, img_lr, img_hr = gan_parts(cfg)
    img_sr, ours = pdm_sr.sr_generator_losses(nets["sr"], nets["disc_hr"], vgg, img_lr, img_hr, cfg, False)
    _, released = pdm_sr.sr_generator_losses(nets["sr"], nets["disc_hr"], vgg, img_lr, img_hr,
                                             dataclasses.replace(cfg, release_perceptual=True), False)
    conv5_4 = vgg.features[:35]                                  # ends with features.34, a Conv2d: no ReLU
    assert isinstance(conv5_4[-1], torch.nn.Conv2d) and vgg.layers == (34,)
    with torch.no_grad():
        expected = torch.nn.functional.l1_loss(conv5_4((img_sr - vgg.mean) / vgg.std),
                                               conv5_4((img_hr - vgg.mean) / vgg.std))
    torch.testing.assert_close(ours["l_per"].detach(), expected)
    torch.testing.assert_close(released["l_per"], expected)
    grads = torch.autograd.grad(ours["l_per"], [p for p in nets["sr"].parameters() if p.requires_grad],
                                retain_graph=True)
    assert sum(g.abs().sum() for g in grads) > 0 and not released["l_per"].requires_grad
    ours["l_gan"].backward()                                     # D2 frozen for G's loss, then unfrozen
    assert all(p.grad is None and p.requires_grad for p in nets["disc_hr"].parameters())
    assert all(p.grad is not None for p in nets["sr"].parameters() if p.requires_grad)


@pytest.mark.parametrize("release", [False, True])
def test_the_perceptual_term_alone_moves_the_sr_weights_unless_released(release):
    cfg = dataclasses.replace(SMOKE_CFG, gan=True, loss_weights=(0.0, 0.0, 1.0), release_perceptual=release)
    nets, opts, vgg, img_lr, img_hr = gan_parts(cfg)
    before = [p.detach().clone() for p in nets["sr"].parameters()]
    scalars = pdm_sr.sr_step(nets, opts, img_lr, img_hr, cfg, False, lambda loss: None, vgg)
    moved = any(not torch.equal(a, b) for a, b in zip(before, nets["sr"].parameters()))
    assert moved != release and scalars["l_per"] > 0


def test_srgan_step_follows_the_released_order():
    """G loss (l_sr, l_gan with the pre-update D2, l_per) -> G step -> D2 loss x w_gan on HR and the SR of that same
    forward -> D2 step; 2020Track1 weights."""
    cfg = dataclasses.replace(SMOKE_CFG, gan=True, loss_weights=pdm_sr.LOSS_WEIGHTS["2020track1"])
    nets, opts, vgg, img_lr, img_hr = gan_parts(cfg)
    sr0, d0 = (copy.deepcopy(nets[k]) for k in ("sr", "disc_hr"))
    scalars = pdm_sr.sr_step(nets, opts, img_lr, img_hr, cfg, False, lambda loss: None, vgg)
    with torch.no_grad():
        img_sr0 = sr0(common.quantize(img_lr))                  # netSR sees Q8(y)
        assert scalars["l_sr"] == pytest.approx(torch.nn.functional.l1_loss(img_sr0, img_hr).item(), rel=1e-5)
        assert scalars["l_gan"] == pytest.approx(pdm_sr.lsgan_generator_loss(d0(img_sr0)).item(), rel=1e-5)
        d_loss = pdm_sr.lsgan_discriminator_loss(d0(img_hr), d0(img_sr0)).item()
    assert scalars["l_d2"] == pytest.approx(0.005 * d_loss, rel=1e-5)
    assert set(scalars) == {"l_sr", "l_gan", "l_per", "l_d2"}
    for new, old in ((nets["sr"], sr0), (nets["disc_hr"], d0)):
        assert any(not torch.equal(a, b) for a, b in zip(new.parameters(), old.parameters()))


def test_d2_is_the_released_patchgan_on_hr_with_its_own_adam_and_schedule():
    """Spec realworld 5: netD2 = PatchGAN(in 3, nf 64, nb 3, stride 1), 64 output channels at full HR resolution;
    Adam lr 2e-4, betas (0.9, 0.999), halved at 50k/100k/150k, as netSR."""
    nets, opts, scheds = pdm_sr.build_training(pdm_sr.Config(gan=True), "sr", None, None, "cpu")
    assert set(nets) == {"pdm", "sr", "disc_hr"} and set(opts) == {"sr", "disc_hr"}
    assert count(nets["disc_hr"]) == 1_845_952 and nets["disc_hr"](torch.rand(1, 3, 32, 32)).shape == (1, 64, 32, 32)
    group = opts["disc_hr"].param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-4, (0.9, 0.999), 0)
    assert scheds["disc_hr"].milestones == {50_000: 1, 100_000: 1, 150_000: 1} and scheds["disc_hr"].gamma == 0.5


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random VGG19, AlexNet and LPIPS lin files in the torchvision / LPIPS layouts (the CLI never downloads)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    torch.save({**pdm_sr.VGG19Features().state_dict(), "classifier.6.bias": torch.zeros(10)}, root / "vgg19.pth")
    torch.save({f"features.{i}.{name}": torch.randn(shape if name == "weight" else shape[:1]) * 0.05
                for i, shape in ALEX_SHAPES.items() for name in ("weight", "bias")}, root / "alexnet.pth")
    torch.save({f"lin{n}.model.1.weight": torch.rand(1, shape[0], 1, 1)
                for n, shape in enumerate(ALEX_SHAPES.values())}, root / "alex_lin.pth")
    return root


@pytest.fixture(scope="module")
def gan_chain(tiny_hr_dir, lr_dir, weight_files, tmp_path_factory):
    """PDM-SRGAN, 2 smoke steps each: joint; stage sr from it with the 2020Track1 weights; stage sr, RRDB (Tab. 3),
    the released (detached) perceptual term."""
    root, vgg = tmp_path_factory.mktemp("pdm_srgan"), ["--vgg-weights", str(weight_files / "vgg19.pth")]
    train = ["train", *SMOKE, "--gan", *vgg, "--hr-dir", str(tiny_hr_dir), "--steps", "2"]
    joint = pdm_sr.main([*train, "--lr-dir", str(lr_dir), "--out-dir", str(root / "joint")])
    sr = ["--stage", "sr", "--deg-ckpt", str(joint)]
    pdm_sr.main([*train, *sr, "--loss-weights", "2020track1", "--out-dir", str(root / "sr")])
    pdm_sr.main([*train, *sr, "--sr-net", "rrdb", "--release-perceptual", "--out-dir", str(root / "rrdb")])
    return root


def test_pdm_srgan_trains_jointly_and_from_a_frozen_pdm(gan_chain):
    for run, weights, nets in (("joint", (1.0, 0.05, 0.05), {"pdm", "disc", "sr", "disc_hr"}),
                               ("sr", (0.01, 0.005, 0.05), {"sr", "disc_hr"}),
                               ("rrdb", (1.0, 0.05, 0.05), {"sr", "disc_hr"})):
        records = log_records(gan_chain / run)
        assert len(records) == 2 and all(math.isfinite(r[k]) for r in records for k in r if k.startswith("l_")), run
        assert set(records[-1]) >= {"l_sr", "l_gan", "l_per", "l_d2"} | ({"l_adv", "l_d"} if run == "joint" else set())
        ckpt = common.load_checkpoint(gan_chain / run / "last.pt", "pdm_sr")
        assert ckpt["config"]["gan"] and tuple(ckpt["config"]["loss_weights"]) == weights
        assert set(ckpt["optimizer"]) == nets
        assert ckpt["disc_hr"]["model.11.weight"].shape == (64, 128, 3, 3)          # smoke width 16, 64 outputs
    rrdb = common.load_checkpoint(gan_chain / "rrdb" / "last.pt", "pdm_sr")
    assert rrdb["config"]["release_perceptual"] and "conv_first.weight" in rrdb["model"]


def test_pdm_srgan_flags_are_checked_before_any_work(tiny_hr_dir, lr_dir, weight_files, tmp_path):
    base = ["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--out-dir", str(tmp_path / "x")]
    for flags, message in (
            (["--gan"], r"PDM-SRGAN \(--gan\) needs --vgg-weights FILE: a torchvision VGG19 state dict"),
            (["--loss-weights", "2020track1"], "--loss-weights and --release-perceptual are PDM-SRGAN settings"),
            (["--release-perceptual"], "--loss-weights and --release-perceptual are PDM-SRGAN settings: add --gan"),
            (["--gan", "--stage", "deg", "--vgg-weights", "v.pth"], "--gan trains netSR: use stage joint or sr"),
            (["--gan", "--vgg-weights", str(tmp_path / "nope.pth")], "weights file not found: .*nope.pth"),
            (["--gan", "--vgg-weights", str(weight_files / "alexnet.pth")], ".*alexnet.pth is not a torchvision VGG19")):
        with pytest.raises(SystemExit, match=f"^error: {message}"):
            pdm_sr.main([*base, *flags])
    assert not (tmp_path / "x").exists()


def test_pdm_srgan_resume_continues_identically(tiny_hr_dir, gan_chain, weight_files, tmp_path):
    base = ["train", *SMOKE, "--stage", "sr", "--deg-ckpt", str(gan_chain / "joint" / "last.pt"), "--gan",
            "--hr-dir", str(tiny_hr_dir), "--vgg-weights", str(weight_files / "vgg19.pth")]
    pdm_sr.main([*base, "--steps", "3", "--out-dir", str(tmp_path / "a")])
    pdm_sr.main([*base, "--steps", "2", "--out-dir", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="needs --vgg-weights FILE"):                      # VGG19 is never saved
        pdm_sr.main([*base[:-2], "--steps", "3", "--out-dir", str(tmp_path / "b"), "--resume"])
    with pytest.raises(SystemExit, match=r"drop --loss-weights \(0.01, 0.005, 0.05\)"):
        pdm_sr.main([*base, "--steps", "3", "--out-dir", str(tmp_path / "b"), "--resume", "--loss-weights",
                     "2020track1"])
    pdm_sr.main([*base, "--steps", "3", "--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / d / "last.pt", "pdm_sr") for d in "ab")
    for part in ("model", "disc_hr"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    ra, rb = log_records(tmp_path / "a")[-1], log_records(tmp_path / "b")[-1]
    assert ra["step"] == rb["step"] == 3 and all(ra[k] == rb[k] for k in ("l_sr", "l_gan", "l_per", "l_d2"))


def test_torchrun_pdm_srgan_puts_d2_under_ddp(tiny_hr_dir, lr_dir, weight_files, tmp_path):
    """Joint PDM-SRGAN without netN: 2 processes x 2 = 1 x 4 (netSR, D2 to within a fraction of one Adam step; the
    PatchGANs' conv biases before InstanceNorm left out, see test_two_processes_compute_the_run_of_one)."""
    data = ["--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--no-noise", "--gan", "--vgg-weights",
            str(weight_files / "vgg19.pth"), "--batch-size", "4", "--steps", "2"]
    records, _ = torchrun(tmp_path, *data, "--out-dir", str(tmp_path / "two"))
    assert all(r["ranks_agree"] and r["models"] == 4 for r in records) and len(records) == 2  # PDM, D, SR, D2
    one = common.load_checkpoint(pdm_sr.main(["train", *SMOKE, *data, "--out-dir", str(tmp_path / "one")]), "pdm_sr")
    two = common.load_checkpoint(tmp_path / "two" / "last.pt", "pdm_sr")
    for part in ("model", "disc_hr"):
        for key, value in one[part].items():
            if key not in ("model.2.bias", "model.5.bias", "model.8.bias"):
                torch.testing.assert_close(two[part][key], value, rtol=1e-5, atol=5e-5, msg=f"{part} {key}")


def test_paired_eval_with_lpips(gan_chain, weight_files, tiny_bench_root, tmp_path):
    """LPIPS (AlexNet, RGB, whole image) from common.run_paired beside RGB/Y PSNR/SSIM, for the model and bicubic."""
    val_lr, hr = tmp_path / "val_lr", tiny_bench_root / "Tiny" / "HR"
    pdm_sr.main(["make-lr", "--hr-dir", str(hr), "--out", str(val_lr)])
    lpips = ["--lpips-weights", str(weight_files / "alexnet.pth"), str(weight_files / "alex_lin.pth")]
    paired = ["eval", "--ckpt", str(gan_chain / "joint" / "last.pt"), "--data", str(hr), "--lr-data", str(val_lr),
              "--device", "cpu"]
    with pytest.raises(SystemExit, match="^error: .*--lpips-unverified"):              # random lin weights refused
        pdm_sr.main([*paired, *lpips, "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="^error: --lr-data pairs with exactly one HR folder in --data; --lpips"):
        pdm_sr.main(["eval", "--ckpt", str(gan_chain / "joint" / "last.pt"), "--data", "Tiny", *lpips])
    rows = pdm_sr.main([*paired, *lpips, "--lpips-unverified", "--out-dir", str(tmp_path / "e")])
    assert rows[-1]["n"] == 2 and all(math.isfinite(rows[-1][m]) for m in ("psnr", "ssim", "psnr_rgb", "lpips"))
    results = (tmp_path / "e" / "results.md").read_text()
    assert "PDM-SRGAN (edsr) x4 paired" in results and "bicubic x4 paired" in results
    assert results.count("| PSNR (Y) | SSIM (Y) | PSNR RGB | SSIM RGB | LPIPS | n |") == 2


# ---- fast paths: the same math -----------------------------------------------------------------------------
def test_compiled_training_equals_eager(tiny_hr_dir, lr_dir, tmp_path):
    """--compile compiles the PDM and netSR (the PatchGANs stay eager): the logged losses of both steps agree to 1e-5,
    the weights to 5e-5 but for at most 1 % of each network's. Those are Adam's: its first steps are +-lr wherever a
    gradient is ~0 (the conv biases before BatchNorm / InstanceNorm, ...), so a rounding-level difference (compiled
    kernels sum in another order; netSR's input is rounded to 1/255) moves such a weight by up to 2 lr."""
    run = ["train", *SMOKE, "--hr-dir", str(tiny_hr_dir), "--lr-dir", str(lr_dir), "--steps", "2"]
    eager, compiled = (pdm_sr.main([*run, "--out-dir", str(tmp_path / name), *flag])
                       for name, flag in (("eager", []), ("compiled", ["--compile"])))
    for term in ("l_adv", "l_reg", "l_d", "l_sr"):
        assert [r[term] for r in log_records(tmp_path / "compiled")] == pytest.approx(
            [r[term] for r in log_records(tmp_path / "eager")], rel=1e-5), term
    states = [torch.load(path, weights_only=True) for path in (eager, compiled)]
    for part in ("model", "pdm", "disc"):
        diff = torch.cat([(states[1][part][k] - v).double().abs().flatten() for k, v in states[0][part].items()])
        assert (diff > 5e-5).double().mean() < 0.01, part
