"""KDSR real-world track (KDSR_T -> KDSR_S -> KDSR_S-GAN on Real-ESRGAN degradations): sizes, manifest, U-Net D,
VGG19 perceptual loss, GAN loss, EMA, the staged CLI chain with paired evaluation, exact resume, bad inputs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import kdsr
from conftest import REPO, synthetic_image
from test_kdsr import manifest_state as kdsr_manifest_state

SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]
ALEX_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}


def count(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def realworld_cfg(**overrides) -> kdsr.Config:
    return kdsr.Config(**{**kdsr.REALWORLD, "degradation": "realesrgan", **overrides})


# ---- networks ----------------------------------------------------------------------------------------------
def test_realworld_parameter_counts_match_the_release():
    student, teacher = kdsr.build_model(realworld_cfg(), False), kdsr.build_model(realworld_cfg(), True)
    assert (count(student), count(student.G), count(student.E)) == (18_846_107, 14_415_131, 4_430_976)
    assert count(student, trainable_only=True) == 18_846_083 and count(student.G.blocks[0]) == 311_424
    assert (count(teacher), count(teacher.E)) == (18_901_403, 4_486_272)
    disc = kdsr.UNetDiscriminatorSN()
    assert count(disc) == 4_376_897 and sum(v.numel() for v in disc.state_dict().values()) == 4_394_753
    assert count(kdsr.VGG19Features()) == 20_024_384


def manifest_state() -> dict:
    """Random tensors under every key of the released KDSR-GAN student (our copy of its listing)."""
    return kdsr_manifest_state(REPO / "tests", "GAN", "KDSRGAN_S_realworld_keys.tsv")


@pytest.mark.parametrize("param_key", ["params_ema", "params"])
def test_kdsr_gan_manifest_loads_strictly_from_a_basicsr_file(tmp_path, param_key):
    torch.manual_seed(0)
    ema, plain = manifest_state(), manifest_state()
    assert len(ema) == 220 and sum(v.numel() for v in ema.values()) == 18_846_107
    torch.save({"params": plain, "params_ema": ema}, path := tmp_path / "KDSRsGAN.pth")
    model, cfg = kdsr.load_official(path, param_key)
    assert (cfg.size, cfg.degradation, cfg.n_feats, cfg.n_blocks, cfg.n_resblocks) == ("GAN", "realesrgan", 128, 42, 6)
    source = ema if param_key == "params_ema" else plain
    table = kdsr.official_key_map(42, 6, "E_st.")
    loaded = model.state_dict()
    assert len(loaded) == len(source)
    for key, value in source.items():                  # every released tensor landed, unchanged, under its key
        assert torch.equal(loaded[kdsr.common.map_official_key(key, table)], value)
    with pytest.raises(kdsr.common.UserError, match="holds params, not 'params_ema'"):
        torch.save({"params": plain}, only := tmp_path / "only.pth")
        kdsr.load_official(only)


def test_unet_discriminator_shapes_and_release_key_names():
    disc = kdsr.UNetDiscriminatorSN()
    keys = set(disc.state_dict())
    assert {"conv0.weight", "conv1.weight_orig", "conv1.weight_u", "conv1.weight_v", "conv9.bias"} <= keys
    assert "conv1.bias" not in keys and "conv0.weight_orig" not in keys  # conv0, conv9 without SN; SN convs no bias
    assert disc(torch.rand(2, 3, 48, 64)).shape == (2, 1, 48, 64)


def test_vgg_features_are_pre_activation_and_load_torchvision_files(tmp_path):
    torch.manual_seed(0)
    vgg = kdsr.VGG19Features()
    feats = vgg(torch.rand(1, 3, 64, 64))
    assert {i: tuple(f.shape[1:]) for i, f in feats.items()} == {
        2: (64, 64, 64), 7: (128, 32, 32), 16: (256, 16, 16), 25: (512, 8, 8), 34: (512, 4, 4)}
    assert all(f.min() < 0 for f in feats.values())        # before the ReLU
    state = {**vgg.state_dict(), "classifier.0.weight": torch.zeros(4, 4)}  # torchvision file: classifier ignored
    torch.save(state, good := tmp_path / "vgg19.pth")
    loaded = kdsr.load_vgg19(good)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vgg.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.save({k: v for k, v in state.items() if k != "features.34.bias"}, bad := tmp_path / "bad.pth")
    with pytest.raises(kdsr.common.UserError, match=r"bad\.pth is not a torchvision VGG19 .*missing features\.34\.bias"):
        kdsr.load_vgg19(bad)
    torch.save({**state, "features.0.weight": torch.zeros(64, 3, 11, 11)}, alex := tmp_path / "alex.pth")
    with pytest.raises(kdsr.common.UserError, match=r"features\.0\.weight \(64, 3, 11, 11\) vs \(64, 3, 3, 3\)"):
        kdsr.load_vgg19(alex)


# ---- losses and updates ------------------------------------------------------------------------------------
def test_perceptual_loss_weights_layers_and_sends_gradient_to_sr():
    torch.manual_seed(0)
    vgg = kdsr.VGG19Features().eval().requires_grad_(False)
    img_hr, img_sr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = kdsr.perceptual_loss(vgg, img_sr, img_hr)
    f_sr, f_hr = vgg(img_sr), vgg(img_hr)
    manual = sum(w * (f_sr[i] - f_hr[i]).abs().mean() for i, w in {2: .1, 7: .1, 16: 1, 25: 1, 34: 1}.items())
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert img_sr.grad is not None and img_sr.grad.abs().sum() > 0
    assert kdsr.perceptual_loss(vgg, img_hr, img_hr).item() == 0


def test_gan_loss_is_vanilla_bce_over_every_logit():
    logits = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(kdsr.gan_loss(logits, True), -F.logsigmoid(logits).mean())
    torch.testing.assert_close(kdsr.gan_loss(logits, False), -F.logsigmoid(-logits).mean())


def test_disc_step_trains_only_d_and_ema_follows_the_release_rule():
    torch.manual_seed(0)
    disc = kdsr.UNetDiscriminatorSN(feats=8)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    img_hr, img_sr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    scalars = kdsr.disc_step(disc, optimizer, img_hr, img_sr, False, "cpu", check=lambda loss: loss)
    assert set(scalars) == {"l_d_real", "l_d_fake"} and img_sr.grad is None  # SR is detached
    assert not torch.equal(before["conv9.weight"], disc.conv9.weight)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.999 * ema.weight.detach() + 0.001 * model.weight.detach()
    common.ema_update(ema, model, 0.999)
    torch.testing.assert_close(ema.weight, expected)


def test_gan_step_adds_perceptual_and_adversarial_terms_with_frozen_d():
    torch.manual_seed(0)
    cfg = kdsr.Config(**{**kdsr.PRESETS["smoke"], "degradation": "realesrgan"})
    teacher, student = kdsr.build_model(cfg, True).eval(), kdsr.build_model(cfg, False)
    disc, vgg = kdsr.UNetDiscriminatorSN(feats=8), kdsr.VGG19Features().eval().requires_grad_(False)
    img_hr = torch.rand(2, 3, 32, 32)
    loss, scalars, img_sr = kdsr.gan_step(student, teacher, disc, vgg, F.avg_pool2d(img_hr, 4), img_hr, cfg,
                                          False, "cpu")
    assert set(scalars) == {"l_rec", "l_kl", "l_per", "l_adv"} and img_sr.shape == img_hr.shape
    assert loss.item() == pytest.approx(sum(scalars.values()), rel=1e-5)  # all weights 1 (release)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and student.G.head.weight.grad is not None


def test_realworld_schedules_follow_the_release():
    cfg = realworld_cfg()
    assert [kdsr.total_steps(cfg, s) for s in kdsr.STAGES] == [1_000_000, 1_000_000, 400_000]
    assert kdsr.schedule(cfg, "teacher", 999_999) == (1e-4, False)                  # constant
    assert kdsr.schedule(cfg, "student", 599_999) == (2e-4, False)
    assert kdsr.schedule(cfg, "student", 600_000) == (1e-4, False)                  # 2e-4 * 0.5^floor(it / 600K)
    assert kdsr.schedule(cfg, "student-gan", 399_999) == (1e-4, False)
    assert (cfg.batch_size, cfg.lr_patch, cfg.hr_crop, cfg.beta2, cfg.ema_decay, cfg.pool_size) == (
        48, 64, 400, 0.99, 0.999, 180)
    assert kdsr.Config(**kdsr.PRESETS["smoke"]).ema_decay == 0.9  # a few hundred steps: a short memory


# ---- CLI chain ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random VGG19, AlexNet and LPIPS lin files in the torchvision / LPIPS layouts (the CLI never downloads)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    torch.save({**kdsr.VGG19Features().state_dict(), "classifier.6.bias": torch.zeros(10)}, root / "vgg19.pth")
    alex = {f"features.{i}.{name}": torch.randn(shape if name == "weight" else shape[:1]) * 0.05
            for i, shape in ALEX_SHAPES.items() for name in ("weight", "bias")}
    torch.save(alex, root / "alexnet.pth")
    lin = {f"lin{n}.model.1.weight": torch.rand(1, shape[0], 1, 1) for n, shape in enumerate(ALEX_SHAPES.values())}
    torch.save(lin, root / "alex_lin.pth")
    return root


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    """An NTIRE-style paired folder: 2 HR images and their x4 LR (a bicubic stand-in for a real one)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "gt").mkdir(), (root / "input").mkdir()
    for i in range(2):
        hr = synthetic_image(20 + i, 96, 128)
        Image.fromarray(hr).save(root / "gt" / f"08{i:02d}.png")
        Image.fromarray(hr).resize((32, 24), Image.BICUBIC).save(root / "input" / f"08{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def chain(tiny_hr_dir, weight_files, tmp_path_factory):
    """teacher -> student -> student-gan, real-world smoke sizes, 3 steps each."""
    root = tmp_path_factory.mktemp("kdsr_rw")
    data = ["--data-dir", str(tiny_hr_dir)]
    teacher = kdsr.main(["train", "--stage", "teacher", "--degradation", "realesrgan", "--steps", "3",
                         "--out-dir", str(root / "t"), *data, *SMOKE])
    student = kdsr.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--steps", "3",
                         "--out-dir", str(root / "s"), *data, *SMOKE])  # the degradation comes from the teacher
    gan = kdsr.main(["train", "--stage", "student-gan", "--student-ckpt", str(student), "--steps", "3",
                     "--vgg-weights", str(weight_files / "vgg19.pth"), "--out-dir", str(root / "g"), *data, *SMOKE])
    return {"root": root, "teacher": teacher, "student": student, "gan": gan}


def test_realworld_chain_trains_every_stage(chain):
    root = chain["root"]
    assert set(log_records(root / "g")[-1]) >= {"l_rec", "l_kl", "l_per", "l_adv", "l_d_real", "l_d_fake"}
    assert all(math.isfinite(r["loss"]) for stage in "tsg" for r in log_records(root / stage))
    ckpt = torch.load(chain["gan"], weights_only=True)
    assert ckpt["stage"] == "student-gan" and ckpt["config"]["degradation"] == "realesrgan"
    assert {"model", "ema", "disc", "opt_d", "pool"} <= set(ckpt) and len(ckpt["pool"]) == 1
    assert ckpt["teacher_ckpt"] == str(chain["teacher"]) and ckpt["student_ckpt"] == str(chain["student"])
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])  # EMA lags G
    student = torch.load(chain["student"], weights_only=True)
    assert student["config"]["degradation"] == "realesrgan" and student["teacher_ckpt"] == str(chain["teacher"])


def test_paired_eval_with_lpips_and_sr_only_folder(chain, weight_files, real_pairs, tmp_path):
    lpips = ["--lpips-weights", str(weight_files / "alexnet.pth"), str(weight_files / "alex_lin.pth")]
    pairs = ["--lr-dir", str(real_pairs / "input"), "--hr-dir", str(real_pairs / "gt"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="^error: .*--lpips-unverified"):          # random lin weights refused
        kdsr.main(["eval", "--ckpt", str(chain["gan"]), *pairs, *lpips, "--out-dir", str(tmp_path)])
    summary = kdsr.main(["eval", "--ckpt", str(chain["gan"]), *pairs, *lpips, "--lpips-unverified",
                         "--out-dir", str(tmp_path / "e")])
    assert summary[-1]["n"] == 2 and all(math.isfinite(summary[-1][m]) for m in ("psnr", "ssim", "psnr_rgb", "lpips"))
    results = (tmp_path / "e" / "results.md").read_text()
    assert "KDSR_S-GAN x4 paired" in results and "bicubic x4 paired" in results and "LPIPS" in results
    written = kdsr.main(["eval", "--ckpt", str(chain["student"]), "--lr-dir", str(real_pairs / "input"),
                         "--device", "cpu", "--out-dir", str(tmp_path / "photos")])
    assert written == [] and sorted(p.name for p in (tmp_path / "photos" / "images").iterdir()) == ["0800.png",
                                                                                                    "0801.png"]
    assert Image.open(tmp_path / "photos" / "images" / "0800.png").size == (128, 96)


def test_student_gan_resume_continues_exactly(chain, tiny_hr_dir, weight_files, tmp_path):
    run = ["train", "--stage", "student-gan", "--student-ckpt", str(chain["student"]), "--data-dir",
           str(tiny_hr_dir), "--vgg-weights", str(weight_files / "vgg19.pth"), *SMOKE]
    full = kdsr.main([*run, "--steps", "6", "--out-dir", str(tmp_path / "full")])   # the pool fills at step 2
    kdsr.main([*run, "--steps", "3", "--out-dir", str(tmp_path / "half")])
    resumed = kdsr.main(["train", "--stage", "student-gan", "--data-dir", str(tiny_hr_dir), "--vgg-weights",
                         str(weight_files / "vgg19.pth"), *SMOKE, "--steps", "6", "--out-dir", str(tmp_path / "half"),
                         "--resume"])
    assert log_records(tmp_path / "half")[-1] == {**log_records(tmp_path / "full")[-1],
                                                  "ms_per_it": log_records(tmp_path / "half")[-1]["ms_per_it"]}
    a, b = (torch.load(p, weights_only=True) for p in (full, resumed))
    for key in ("model", "ema", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_tiled_eval_estimates_d_once_and_matches_whole_image(chain, real_pairs, tmp_path):
    run = ["eval", "--ckpt", str(chain["student"]), "--lr-dir", str(real_pairs / "input"), "--hr-dir",
           str(real_pairs / "gt"), "--device", "cpu"]
    whole = kdsr.main([*run, "--out-dir", str(tmp_path / "w")])
    tiled = kdsr.main([*run, "--tile", "12", "--tile-overlap", "12", "--out-dir", str(tmp_path / "t")])
    for a, b in zip(whole, tiled):  # the overlap covers the smoke G's receptive field: same images
        assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-4) and a["ssim"] == pytest.approx(b["ssim"], abs=1e-6)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_missing_weights_and_hand_offs_are_refused_before_any_work(chain, tiny_hr_dir, weight_files, tmp_path):
    train = ["train", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path / "x"), *SMOKE]
    with pytest.raises(SystemExit, match=r"^error: the student-gan stage needs --vgg-weights FILE: a torchvision "
                                         r"VGG19 state dict \(vgg19-dcbb9e9d\.pth\)"):
        kdsr.main([*train, "--stage", "student-gan", "--student-ckpt", str(chain["student"])])
    with pytest.raises(SystemExit, match=r"^error: the student-gan stage needs --student-ckpt"):
        kdsr.main([*train, "--stage", "student-gan", "--vgg-weights", str(weight_files / "vgg19.pth")])
    with pytest.raises(SystemExit, match=r"^error: weights file not found: .*nope\.pth \(expected a torchvision VGG19"):
        kdsr.main([*train, "--stage", "student-gan", "--student-ckpt", str(chain["student"]),
                   "--vgg-weights", str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit, match=r"^error: .* is a 'teacher' checkpoint; expected stage student$"):
        kdsr.main([*train, "--stage", "student-gan", "--student-ckpt", str(chain["teacher"]),
                   "--vgg-weights", str(weight_files / "vgg19.pth")])
    with pytest.raises(SystemExit, match=r"^error: the teacher .* was trained on 'realesrgan': its student must be"):
        kdsr.main([*train, "--stage", "student", "--teacher-ckpt", str(chain["teacher"]), "--degradation", "iso"])
    with pytest.raises(SystemExit, match=r"^error: --batch-size 5 exceeds the 4-pair training pool$"):
        kdsr.main([*train, "--stage", "teacher", "--degradation", "realesrgan", "--batch-size", "5"])
    assert not (tmp_path / "x").exists()                                             # nothing ran


def test_unmatched_or_wrongly_sized_pairs_are_refused(chain, real_pairs, tmp_path):
    (lr := tmp_path / "lr").mkdir()
    Image.fromarray(synthetic_image(1, 24, 32)).save(lr / "0800.png")
    Image.fromarray(synthetic_image(2, 24, 32)).save(lr / "9999.png")
    run = ["eval", "--ckpt", str(chain["student"]), "--hr-dir", str(real_pairs / "gt"), "--device", "cpu",
           "--out-dir", str(tmp_path / "e")]
    with pytest.raises(SystemExit, match=r"^error: .*9999"):
        kdsr.main([*run, "--lr-dir", str(lr)])
    (big := tmp_path / "big").mkdir()
    for i in range(2):
        Image.fromarray(synthetic_image(i, 96, 128)).save(big / f"08{i:02d}.png")   # LR as large as its HR
    with pytest.raises(SystemExit, match=r"^error: .*0800"):
        kdsr.main([*run, "--lr-dir", str(big)])
    assert not (tmp_path / "e" / "results.csv").exists()


def test_student_gan_under_torchrun_keeps_ranks_identical(chain, tiny_hr_dir, weight_files, tmp_path):
    """G and D are both DDP-wrapped (D's first backward under no_sync); every rank keeps its own pair pool."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "kdsr", "train", "--stage", "student-gan", "--student-ckpt",
           str(chain["student"]), "--vgg-weights", str(weight_files / "vgg19.pth"), "--data-dir", str(tiny_hr_dir),
           "--steps", "4", "--out-dir", str(tmp_path / "g"), *SMOKE]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    probes = [json.loads(obj) for obj in re.findall(r'\{"rank"[^{}]*\}', result.stdout)]
    assert sorted(p["rank"] for p in probes) == [0, 1] and all(p["models"] == 2 and p["ranks_agree"] for p in probes)
    ckpt = torch.load(tmp_path / "g" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["pool"]) == 2 and not torch.equal(ckpt["pool"][0]["hr"], ckpt["pool"][1]["hr"])
