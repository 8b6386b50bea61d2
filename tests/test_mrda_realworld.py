"""MRDA real-world track (MRDA_S-GAN, Sec. III-C, IV-A, IV-D): sizes and Mult-Adds, schedules, one Real-ESRGAN draw
per task, L_vis / L_real, the copied KDSR-GAN blocks, the CLI chain pretrain -> meta -> teacher -> student with
benchmark and paired evaluation, exact resume, DDP, bad inputs."""
import dataclasses
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
import mrda
from conftest import REPO, synthetic_image
from test_kdsr_realworld import real_pairs, weight_files  # noqa: F401  (the same random weight files and pairs)

SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]
QUIET = common.RealESRGANOptions(noise_range=((0.0, 0.0),) * 2, poisson_scale_range=((0.0, 0.0),) * 2)  # no noise


def count(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def realworld_cfg(**overrides) -> mrda.Config:
    return dataclasses.replace(mrda.Config(**mrda.REALWORLD, degradation="realesrgan"), **overrides)


def smoke_cfg(**overrides) -> mrda.Config:
    return dataclasses.replace(mrda.Config(**mrda.PRESETS["smoke"], degradation="realesrgan"), **overrides)


def step_random(step: int = 1, batch: int = 2, rank: int = 0, world: int = 1) -> common.StepRandom:
    return common.StepRandom(0, step, batch, common.Dist(rank, world), "cpu")


def gt_batch(n: int = 2, size: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.stack([torch.from_numpy(synthetic_image(seed + i, size, size)).permute(2, 0, 1).float() / 255
                        for i in range(n)])


# ---- networks ----------------------------------------------------------------------------------------------
def test_realworld_parameter_counts_and_mult_adds(monkeypatch):
    """RDAN widened to 128 channels, 27 blocks, DEN and MLN as released [ours]: 19,468,945 (Tab. IV: 19.59 M)."""
    cfg = realworld_cfg()
    student, teacher, mln = mrda.build_model(cfg, False), mrda.build_model(cfg, True), mrda.build_mln(cfg)
    assert (count(student), count(student.G), count(student.E)) == (19_468_945, 18_191_953, 1_276_992)
    assert count(student, trainable_only=True) == 19_468_921 and count(student.G.blocks[0]) == 623_106
    assert (count(teacher), count(teacher.E), count(mln)) == (19_540_945, 1_348_992, 2_073_219)
    assert count(mrda.UNetDiscriminatorSN()) == 4_376_897 and count(mrda.VGG19Features()) == 20_024_384
    macs, conv2d, linear = [0], F.conv2d, F.linear          # multiply-adds of every conv and linear, shapes only

    def counted(op, fan_in):
        def call(x, weight, *args, **kwargs):
            out = op(x, weight, *args, **kwargs)
            macs[0] += out.numel() * fan_in(weight)
            return out
        return call

    monkeypatch.setattr(F, "conv2d", counted(conv2d, lambda w: w[0].numel()))
    monkeypatch.setattr(F, "linear", counted(linear, lambda w: w.shape[1]))
    with torch.no_grad():
        student.to("meta")(torch.empty(1, 3, 180, 320, device="meta"))
    assert round(macs[0] / 1e9, 1) == 653.0                 # Tab. IV: 572.96 G


def test_copied_kdsr_blocks_are_marked():
    """The KDSR-GAN discriminator, VGG19, perceptual and GAN losses, D step and VGG loader are kdsr.py's own code;
    tests/test_hygiene.py keeps every marked block identical to kdsr.py's."""
    marked = set(re.findall(r"^# Copied from kdsr\.py:(\w+)$", (REPO / "mrda.py").read_text(), flags=re.M))
    assert {"upsample2", "UNetDiscriminatorSN", "VGG19Features", "perceptual_loss", "gan_loss", "disc_step",
            "load_vgg19"} <= marked


# ---- configuration and schedules ---------------------------------------------------------------------------
def test_realworld_schedules_follow_sec_iv_a():
    cfg = realworld_cfg()
    assert [mrda.total_steps(cfg, s) for s in mrda.STAGES] == [100_000, 100_000, 600_000, 600_000]
    for stage in mrda.STAGES:
        assert mrda.schedule(cfg, stage, 1) == (2e-4, False)                      # never estimator-only
        assert mrda.schedule(cfg, stage, 399_999) == (2e-4, False)
    assert mrda.schedule(cfg, "student", 400_000) == (1e-4, False)               # halved every 400K
    assert mrda.step_sizes(cfg) == [2e-2] * 5                                     # task-level alpha
    assert [mrda.batch_size(cfg, s) for s in mrda.STAGES] == [64, 64, 64, 64]
    assert (cfg.n_feats, cfg.n_blocks, cfg.mln_feats, cfg.den_feats, cfg.lr_patch, cfg.hr_crop) == (
        128, 27, 128, 64, 64, 400)
    assert (cfg.kl_weight, cfg.abs_weight, cfg.beta2, cfg.ema_decay) == (1.0, 0.01, 0.999, 0.999)


def test_the_track_is_chosen_once_and_inherited(tmp_path):
    parser = mrda.build_parser()
    args = parser.parse_args(["train", "--stage", "pretrain", "--degradation", "realesrgan", "--data-dir", "d"])
    assert mrda.config_from_args(args, None) == realworld_cfg()
    ckpt = {"script": "mrda", "stage": "pretrain", "step": 1, "config": dataclasses.asdict(realworld_cfg())}
    common.save_checkpoint(path := tmp_path / "p.pt", ckpt)
    args = parser.parse_args(["train", "--stage", "meta", "--pretrain-ckpt", str(path), "--data-dir", "d"])
    assert mrda.config_from_args(args, None) == realworld_cfg()                   # from the hand-off
    args = parser.parse_args(["train", "--stage", "meta", "--pretrain-ckpt", str(path), "--data-dir", "d",
                              "--preset", "smoke"])                             # the smoke sizes on the track
    cfg = mrda.config_from_args(args, None)
    assert (cfg.degradation, cfg.n_feats, cfg.meta_batch, cfg.inner_lr, cfg.meta_halve_every) == (
        "realesrgan", 8, 4, 2e-2, 400_000)


# ---- one degradation per task ------------------------------------------------------------------------------
@pytest.fixture
def draws(monkeypatch):
    """Every pipeline draw made through common.sample_realesrgan (its batch size and parameters), noise-free."""
    made, sample = [], common.sample_realesrgan
    monkeypatch.setattr(common, "RealESRGANOptions", lambda: QUIET)
    monkeypatch.setattr(common, "sample_realesrgan",
                        lambda batch, opts, device: made.append((batch, sample(batch, opts, device))) or made[-1][1])
    return made


def same_draw(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_one_pipeline_draw_for_every_image_of_a_task(draws):
    """The MLN adapts to one degradation at a time: a task is ONE draw of the whole second-order pipeline, broadcast
    to all its images (two copies of one image come out identical), with one crop offset."""
    cfg, img = smoke_cfg(), gt_batch(1)
    img_gt = torch.cat([img, gt_batch(1, seed=9), img, img])                   # items 0, 2, 3 are the same image
    rnd = step_random(batch=4)
    img_lr, img_hr = mrda.training_pair(img_gt, cfg, rnd)
    assert img_lr.shape == (4, 3, 16, 16) and img_hr.shape == (4, 3, 64, 64) and len(draws) == 1
    assert draws[0][0] == 1 and draws[0][1]["kernel1"].shape == (1, 21, 21)    # a batch-1 draw for the task
    assert torch.equal(img_lr[0], img_lr[2]) and torch.equal(img_lr[0], img_lr[3]) and not torch.equal(img_lr[0],
                                                                                                      img_lr[1])
    assert torch.equal(img_hr[0], img_hr[2]) and torch.equal(img_lr, common.quantize(img_lr))   # 8-bit LR
    top_left = [(i, j) for i in range(33) for j in range(33) if torch.equal(img_gt[0, :, i:i + 64, j:j + 64],
                                                                              img_hr[0])]
    assert top_left and all(torch.equal(img_gt[k, :, top_left[0][0]:top_left[0][0] + 64,
                                                top_left[0][1]:top_left[0][1] + 64], img_hr[k]) for k in range(4))
    mrda.training_pair(img_gt, cfg, rnd)                                       # the step's second task
    mrda.training_pair(img_gt, cfg, step_random(2, batch=4))                   # the next step's first
    assert not same_draw(draws[0][1], draws[1][1]) and not same_draw(draws[0][1], draws[2][1])
    mrda.training_pair(img_gt, cfg, step_random(batch=4))                      # the same step again: the same draw
    assert same_draw(draws[0][1], draws[3][1])


def test_a_task_draw_is_the_same_with_any_number_of_processes(draws):
    """The draw and the crop come from the step's StepRandom: rank r of 2 degrades its half exactly as one process
    degrades the whole batch (noise fields aside: each rank draws its own)."""
    cfg, img_gt = smoke_cfg(), gt_batch(4)
    one_lr, one_hr = mrda.training_pair(img_gt, cfg, step_random(5, 4))
    for rank in (0, 1):
        lr, hr = mrda.training_pair(img_gt[2 * rank:2 * rank + 2], cfg, step_random(5, 4, rank, 2))
        assert same_draw(draws[0][1], draws[-1][1]) and torch.equal(hr, one_hr[2 * rank:2 * rank + 2])
        assert (lr - one_lr[2 * rank:2 * rank + 2]).abs().max() <= 1 / 255 + 1e-6      # batch-size rounding only


def test_meta_tasks_are_distinct_draws(draws):
    cfg = smoke_cfg()
    mln = mrda.build_mln(cfg)
    mln.tail.requires_grad_(False)
    loss, scalars = mrda.meta_step(mln, gt_batch(4), cfg, step_random(batch=4), common.Dist())
    assert torch.isfinite(loss) and len(draws) == cfg.meta_tasks == 2 and not same_draw(draws[0][1], draws[1][1])
    assert all(p.grad is not None for name, p in mln.named_parameters() if name.startswith(mrda.ADAPTED))


# ---- losses ------------------------------------------------------------------------------------------------
def test_l_vis_is_the_unweighted_sum_and_leaves_d_alone():
    torch.manual_seed(0)
    vgg, disc = mrda.VGG19Features().eval().requires_grad_(False), mrda.UNetDiscriminatorSN(feats=8).eval()
    img_hr, img_sr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32, requires_grad=True)
    loss, scalars = mrda.sr_loss(img_sr, img_hr, vgg, disc)
    assert set(scalars) == {"l_rec", "l_per", "l_adv"} and loss.item() == pytest.approx(sum(scalars.values()))
    torch.testing.assert_close(scalars["l_adv"], F.softplus(-disc(img_sr)).mean().item())    # vanilla, G side
    loss.backward()
    assert img_sr.grad.abs().sum() > 0 and all(p.grad is None for p in disc.parameters())
    loss, scalars = mrda.sr_loss(img_sr, img_hr)                                  # classic: L_rec alone
    assert set(scalars) == {"l_rec"} and loss.item() == pytest.approx((img_sr - img_hr).abs().mean().item())


def test_student_l_real_adds_kd_to_l_vis():
    torch.manual_seed(0)
    cfg = smoke_cfg()
    mln, teacher = mrda.build_mln(cfg).requires_grad_(False), mrda.build_model(cfg, True).requires_grad_(False)
    student, disc = mrda.build_model(cfg, False), mrda.UNetDiscriminatorSN(feats=8)
    vgg = mrda.VGG19Features().eval().requires_grad_(False)
    img_lr, img_hr = mrda.training_pair(gt_batch(2), cfg, step_random())
    loss, scalars, hr, img_sr = mrda.student_step(student, mln, teacher, img_lr, img_hr, cfg, False, "cpu", False,
                                                  None, vgg, disc)
    assert set(scalars) == {"l_rec", "l_per", "l_adv", "l_kl", "l_abs"} and hr is img_hr and img_sr.shape == hr.shape
    expected = scalars["l_rec"] + scalars["l_per"] + scalars["l_adv"] + scalars["l_kl"] + 0.01 * scalars["l_abs"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)                 # Eq. 7, lambda_kl 1, lambda_abs 0.01
    loss.backward()
    assert student.G.head.weight.grad is not None and all(p.grad is None for p in disc.parameters())


# ---- CLI chain ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tiny_hr_dir, weight_files, tmp_path_factory):
    """pretrain (--degradation realesrgan) -> meta -> teacher -> student, smoke sizes; the track is inherited."""
    root = tmp_path_factory.mktemp("mrda_rw")
    data, vgg = ["--data-dir", str(tiny_hr_dir), *SMOKE], ["--vgg-weights", str(weight_files / "vgg19.pth")]
    pretrain = mrda.main(["train", "--stage", "pretrain", "--degradation", "realesrgan", "--steps", "2",
                          "--out-dir", str(root / "p"), *data])
    meta = mrda.main(["train", "--stage", "meta", "--pretrain-ckpt", str(pretrain), "--steps", "2",
                      "--out-dir", str(root / "m"), *data])
    teacher = mrda.main(["train", "--stage", "teacher", "--meta-ckpt", str(meta), "--steps", "2",
                         "--out-dir", str(root / "t"), *data, *vgg])
    student = mrda.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--steps", "7",
                         "--out-dir", str(root / "s"), *data, *vgg])    # smoke: 5 estimator-only steps, then L_real
    return {"root": root, "pretrain": pretrain, "meta": meta, "teacher": teacher, "student": student}


def test_realworld_chain_trains_every_stage(chain):
    root = chain["root"]
    assert all(load(chain[s])["config"]["degradation"] == "realesrgan" for s in mrda.STAGES)
    assert all(math.isfinite(r["loss"]) for stage in "pmts" for r in log_records(root / stage))
    assert set(log_records(root / "t")[-1]) >= {"l_rec", "l_per", "l_adv", "l_d_real", "l_d_fake"}
    assert set(log_records(root / "s")[-1]) >= {"l_rec", "l_per", "l_adv", "l_kl", "l_abs", "l_d_real", "l_d_fake"}
    assert "l_adv" not in log_records(root / "s")[4]                            # estimator-only: no SR, no D step
    teacher, student = load(chain["teacher"]), load(chain["student"])
    assert {"model", "optimizer", "ema", "disc", "opt_d", "mln"} <= set(teacher) and "vgg" not in str(list(teacher))
    assert not all(torch.equal(teacher["model"][k], teacher["ema"][k]) for k in teacher["model"])  # EMA lags G
    assert {"ema", "disc", "opt_d"} <= set(load(chain["student"])) and student["teacher_ckpt"] == str(chain["teacher"])
    assert "disc" not in load(chain["meta"]) and "ema" not in load(chain["pretrain"])


def test_student_starts_from_the_teachers_ema_and_d(chain, tiny_hr_dir, weight_files, tmp_path):
    """RDAN_S and its EMA <- the teacher's EMA RDAN, D <- the teacher's D [ours]; one estimator-only step moves
    neither (G has no gradient, D is not trained without an SR)."""
    mrda.main(["train", "--stage", "student", "--teacher-ckpt", str(chain["teacher"]), "--steps", "1", "--data-dir",
               str(tiny_hr_dir), "--vgg-weights", str(weight_files / "vgg19.pth"), "--out-dir", str(tmp_path), *SMOKE])
    teacher, student = load(chain["teacher"]), load(tmp_path / "last.pt")
    g_keys = [k for k in student["model"] if k.startswith("G.")]
    assert all(torch.equal(student["model"][k], teacher["ema"][k]) for k in g_keys)
    assert all(torch.allclose(student["ema"][k], teacher["ema"][k]) for k in g_keys)   # 0.9 x + 0.1 x, rounded
    assert all(torch.equal(student["disc"][k], v) for k, v in teacher["disc"].items())


def test_eval_benchmark_paired_lpips_and_photos(chain, weight_files, real_pairs, tiny_bench_root, tmp_path):
    rows = mrda.main(["eval", "--ckpt", str(chain["student"]), "--data", "Tiny", "--data-root", str(tiny_bench_root),
                      "--protocol", "bicubic", "--device", "cpu", "--out-dir", str(tmp_path / "b")])
    assert len(rows) == 2 and "MRDA_S-GAN-smoke x4 bicubic Tiny" in (tmp_path / "b" / "results.md").read_text()
    lpips = ["--lpips-weights", str(weight_files / "alexnet.pth"), str(weight_files / "alex_lin.pth")]
    pairs = ["--lr-dir", str(real_pairs / "input"), "--hr-dir", str(real_pairs / "gt"), "--device", "cpu"]
    summary = mrda.main(["eval", "--ckpt", str(chain["student"]), *pairs, *lpips, "--lpips-unverified",
                         "--out-dir", str(tmp_path / "e")])
    assert summary[-1]["n"] == 2 and all(math.isfinite(summary[-1][m]) for m in ("psnr", "ssim", "psnr_rgb", "lpips"))
    results = (tmp_path / "e" / "results.md").read_text()
    assert "MRDA_S-GAN-smoke x4 paired input" in results and "bicubic x4 paired input" in results and "LPIPS" in results
    written = mrda.main(["eval", "--ckpt", str(chain["student"]), "--lr-dir", str(real_pairs / "input"),
                         "--device", "cpu", "--out-dir", str(tmp_path / "photos")])
    assert written == [] and Image.open(tmp_path / "photos" / "images" / "0800.png").size == (128, 96)
    with pytest.raises(SystemExit, match=r"^error: --lr-dir is for the student, not the teacher \(oracle\)$"):
        mrda.main(["eval", "--ckpt", str(chain["teacher"]), *pairs, "--out-dir", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="^error: --hr-dir pairs with --lr-dir"):
        mrda.main(["eval", "--ckpt", str(chain["student"]), "--hr-dir", str(real_pairs / "gt"), "--device", "cpu",
                   "--out-dir", str(tmp_path / "x")])


def test_teacher_resume_continues_exactly(chain, tiny_hr_dir, weight_files, tmp_path):
    """G, its EMA, D (incl. its spectral-norm vectors) and both Adams continue bit for bit; VGG19 comes again."""
    run = ["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--vgg-weights",
           str(weight_files / "vgg19.pth"), *SMOKE]
    full = mrda.main([*run, "--meta-ckpt", str(chain["meta"]), "--steps", "3", "--out-dir", str(tmp_path / "full")])
    mrda.main([*run, "--meta-ckpt", str(chain["meta"]), "--steps", "2", "--out-dir", str(tmp_path / "half")])
    resumed = mrda.main([*run, "--steps", "3", "--out-dir", str(tmp_path / "half"), "--resume"])
    a, b = log_records(tmp_path / "full")[-1], log_records(tmp_path / "half")[-1]
    assert {**a, "ms_per_it": 0} == {**b, "ms_per_it": 0}
    a, b = load(full), load(resumed)
    for key in ("model", "ema", "disc"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_teacher_under_torchrun_keeps_ranks_identical(chain, tiny_hr_dir, weight_files, tmp_path):
    """G and D are both DDP-wrapped (D's first backward under no_sync): the two ranks stay bit-equal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "mrda", "train", "--stage", "teacher", "--meta-ckpt",
           str(chain["meta"]), "--vgg-weights", str(weight_files / "vgg19.pth"), "--data-dir", str(tiny_hr_dir),
           "--batch-size", "4", "--steps", "2", "--out-dir", str(tmp_path / "t"), *SMOKE]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    probes = [json.loads(obj) for obj in re.findall(r'\{"rank"[^{}]*\}', result.stdout)]
    assert sorted(p["rank"] for p in probes) == [0, 1] and all(p["models"] == 2 and p["ranks_agree"] for p in probes)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_missing_vgg_weights_are_refused_before_any_work(chain, tiny_hr_dir, tmp_path):
    train = ["train", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path / "x"), *SMOKE]
    for stage, handoff in (("teacher", "--meta-ckpt"), ("student", "--teacher-ckpt")):
        with pytest.raises(SystemExit, match=rf"^error: the real-world {stage} trains with L_vis \(Eq\. 3\): give "
                                             r"--vgg-weights FILE, a torchvision VGG19 state dict"):
            mrda.main([*train, "--stage", stage, handoff, str(chain["meta" if stage == "teacher" else "teacher"])])
    with pytest.raises(SystemExit, match=r"^error: weights file not found: .*nope\.pth \(expected a torchvision VGG19"):
        mrda.main([*train, "--stage", "teacher", "--meta-ckpt", str(chain["meta"]), "--vgg-weights",
                   str(tmp_path / "nope.pth")])
    assert not (tmp_path / "x").exists()                                             # nothing ran
