"""KDSR: parameter counts, networks, losses, degradation sampler, schedules, converter, CLI chain, exact resume."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kdsr
from conftest import REPO, synthetic_image

SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]


def count(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def smoke_model(teacher: bool) -> kdsr.KDSR:
    return kdsr.build_model(kdsr.Config(**kdsr.PRESETS["smoke"]), teacher)


# ---- networks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, teacher, total, g, e", [
    ("M", False, 5_795_099, 4_463_963, 1_331_136), ("M", True, 5_822_747, 4_463_963, 1_358_784),
    ("L", False, 14_191_003, 10_055_195, 4_135_808), ("L", True, 14_246_299, 10_055_195, 4_191_104)])
def test_parameter_counts_match_spec(size, teacher, total, g, e):
    model = kdsr.build_model(kdsr.Config(**kdsr.SIZES[size]), teacher)
    assert (count(model), count(model.G), count(model.E)) == (total, g, e)
    assert count(model, trainable_only=True) == total - 24  # the fixed mean shift
    assert len(model.state_dict()) == {"M": 276, "L": 160}[size]  # = official key counts
    assert count(model.G.blocks[0]) == {"M": 77_888, "L": 311_424}[size]


def test_default_config_is_kdsr_s_m():
    cfg = kdsr.Config()
    assert (cfg.n_feats, cfg.n_blocks, cfg.n_resblocks, cfg.kd_temperature, cfg.kd_weight) == (64, 53, 9, 0.15, 1.0)


def test_shapes_teacher_and_student():
    torch.manual_seed(0)
    cfg = kdsr.Config(n_feats=16, n_blocks=2, n_resblocks=2)
    teacher, student = kdsr.build_model(cfg, True), kdsr.build_model(cfg, False)
    assert teacher.E.head.in_channels == 51 and student.E.head.in_channels == 3
    img_lr, img_hr = torch.rand(2, 3, 12, 10), torch.rand(2, 3, 48, 40)
    d, d_prime = teacher.estimate(img_lr, img_hr)
    assert d.shape == (2, 16) and d_prime.shape == (2, 64)  # D: C, D': 4C
    img_sr, d_prime_s = student(img_lr)
    assert img_sr.shape == (2, 3, 48, 40) and d_prime_s.shape == (2, 64)
    assert teacher(img_lr, img_hr)[0].shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="HR"):
        teacher.estimate(img_lr)


def test_teacher_estimate_depends_on_hr():
    torch.manual_seed(0)
    teacher = smoke_model(True)
    img_lr = torch.rand(1, 3, 8, 8)
    a = teacher.estimate(img_lr, torch.rand(1, 3, 32, 32))[1]
    b = teacher.estimate(img_lr, torch.rand(1, 3, 32, 32))[1]
    assert not torch.allclose(a, b)


def test_idr_ddc_is_a_per_sample_depthwise_conv():
    torch.manual_seed(0)
    ddc = kdsr.IDRDDC(6)
    x, d = torch.randn(3, 6, 9, 11), torch.randn(3, 6)
    out = ddc(x, d)
    for b in range(3):  # the reference: sample b, channel i convolved with taps 9i..9i+8 of phi(D_b), row-major
        weight = ddc.kernel(d[b]).reshape(6, 1, 3, 3)
        torch.testing.assert_close(out[b:b + 1], F.conv2d(x[b:b + 1], weight, padding=1, groups=6))
    assert not torch.allclose(out[0], ddc(x[:1], d[1:2])[0])  # kernels really are per sample


def test_mean_shift_is_fixed():
    g = kdsr.SRNetwork(channels=8, n_blocks=1)
    img = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(g.sub_mean(img), img - torch.tensor(kdsr.DIV2K_MEAN)[:, None, None])
    assert not g.add_mean.weight.requires_grad and not g.sub_mean.bias.requires_grad


# ---- losses ------------------------------------------------------------------------------------------------
def test_kd_loss_properties():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    loss = kdsr.kd_loss(student, teacher, 0.15)
    p_t, p_s = F.softmax(teacher / 0.15, 1), F.softmax(student / 0.15, 1)
    manual = (p_t * (p_t.log() - p_s.log())).sum(1).mean()  # Eq. 6, batch mean, no tau^2
    torch.testing.assert_close(loss, manual)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and teacher.grad is None  # gradient into the student only
    assert kdsr.kd_loss(teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(20):
        assert kdsr.kd_loss(torch.randn(3, 16), torch.randn(3, 16)).item() >= 0


def test_student_step_estimator_only_leaves_g_without_gradient():
    torch.manual_seed(0)
    cfg = kdsr.Config(**kdsr.PRESETS["smoke"])
    teacher, student = smoke_model(True).eval(), smoke_model(False)
    img_hr = torch.rand(2, 3, 32, 32)
    img_lr = F.avg_pool2d(img_hr, 4)
    loss, scalars, img_sr = kdsr.student_step(student, teacher, img_lr, img_hr, cfg, False, "cpu", estimator_only=True)
    loss.backward()
    assert set(scalars) == {"l_kl"} and img_sr is None and all(p.grad is None for p in student.G.parameters())
    assert student.E.head.weight.grad is not None and teacher.E.head.weight.grad is None
    loss, scalars, img_sr = kdsr.student_step(student, teacher, img_lr, img_hr, cfg, False, "cpu", estimator_only=False)
    assert img_sr.shape == img_hr.shape
    assert loss.item() == pytest.approx(scalars["l_rec"] + scalars["l_kl"], rel=1e-6)  # weights 1 and 1


# ---- degradation and schedules -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", kdsr.DEGRADATIONS)
def test_degradations_are_per_sample(kind):
    rnd = kdsr.common.StepRandom(0, 1, 6, kdsr.common.Dist(), "cpu")
    kernels, noise = kdsr.sample_degradations(rnd, kind, 0.2, 4.0, 25.0, 21)
    assert kernels.shape == (6, 21, 21)
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(6))
    assert len({round(k[10, 10].item(), 6) for k in kernels}) == 6  # one kernel per sample
    if kind == "iso":
        assert noise is None
        torch.testing.assert_close(kernels, kernels.transpose(1, 2))
    else:
        assert noise.shape == (6,) and 0 <= noise.min() and noise.max() <= 25 and len(set(noise.tolist())) == 6
    img_lr = kdsr.degrade_batch(torch.rand(6, 3, 64, 64), kdsr.Config(degradation=kind), rnd)
    assert img_lr.shape == (6, 3, 16, 16)
    torch.testing.assert_close(img_lr * 255, (img_lr * 255).round())  # 8-bit quantised


def test_paper_schedules():
    cfg, ipe = kdsr.Config(), 971
    assert kdsr.total_steps(cfg, "teacher") == 485_500
    assert kdsr.total_steps(cfg, "student") == 582_600
    assert kdsr.total_steps(kdsr.Config(degradation="aniso_noise"), "student") == 485_500
    assert kdsr.schedule(cfg, "teacher", 124 * ipe) == (1e-4, False)          # epoch 124
    assert kdsr.schedule(cfg, "teacher", 124 * ipe + 1) == (5e-5, False)      # epoch 125: 0.5^floor(125/125)
    assert kdsr.schedule(cfg, "student", 149 * ipe + 1) == (5e-5, False)
    aniso = kdsr.Config(degradation="aniso_noise")
    assert kdsr.schedule(aniso, "student", 1) == (2e-4, True)
    assert kdsr.schedule(aniso, "student", 59 * ipe + 1)[0] == pytest.approx(2e-5)
    assert kdsr.schedule(aniso, "student", 100 * ipe) == (pytest.approx(2e-5), True)
    assert kdsr.schedule(aniso, "student", 100 * ipe + 1) == (1e-4, False)
    assert kdsr.schedule(aniso, "student", 224 * ipe + 1) == (5e-5, False)


def test_student_g_is_initialised_from_teacher_exactly():
    torch.manual_seed(0)
    teacher, student = smoke_model(True), smoke_model(False)
    e_before = {k: v.clone() for k, v in student.E.state_dict().items()}
    copied = kdsr.init_student_from_teacher(student, teacher.state_dict())
    assert copied == sorted(k for k in teacher.state_dict() if k.startswith("G."))
    for key, value in student.G.state_dict().items():
        assert torch.equal(value, teacher.G.state_dict()[key])
    for key, value in student.E.state_dict().items():
        assert torch.equal(value, e_before[key])


# ---- official weights --------------------------------------------------------------------------------------
def manifest_state(shared, name: str, file: str | None = None) -> dict:
    """Random tensors under every key of a released KDSR file's listing, the mean shift with its fixed values."""
    state = {}
    for line in (shared / "manifests" / (file or f"KDSR_{name}_classic_keys.tsv")).read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.randn([int(s) for s in shape.split("x")]) * 0.02
    for prefix, sign in (("G.sub_mean", -1.0), ("G.add_mean", 1.0)):
        state[f"{prefix}.weight"] = torch.eye(3)[:, :, None, None]
        state[f"{prefix}.bias"] = sign * torch.tensor(kdsr.DIV2K_MEAN)
    return state


@pytest.mark.parametrize("name, teacher, size", [("S-M", False, "M"), ("S-L", False, "L"), ("T-M", True, "M")])
def test_official_manifest_loads_strictly(shared, tmp_path, name, teacher, size):
    state = manifest_state(shared, name)
    torch.save(state, path := tmp_path / "official.pt")
    model, cfg = kdsr.load_official(path)
    assert model.teacher == teacher and cfg.size == size
    loaded = model.state_dict()
    assert len(loaded) == len(state)
    table = kdsr.official_key_map(cfg.n_blocks, cfg.n_resblocks, "E." if teacher else "E_st.")
    for key, value in state.items():  # every official tensor landed, unchanged, under its mapped key
        assert torch.equal(loaded[kdsr.common.map_official_key(key, table)], value)
    torch.manual_seed(0)
    img_lr, img_hr = torch.rand(1, 3, 6, 6), torch.rand(1, 3, 24, 24)
    fresh = kdsr.build_model(cfg, teacher)
    with torch.no_grad():
        out = model(img_lr, img_hr)[0]
        assert out.shape == (1, 3, 24, 24) and torch.isfinite(out).all()
        assert not torch.allclose(out, fresh(img_lr, img_hr)[0])


def test_official_manifest_errors_name_the_keys(shared, tmp_path):
    state = manifest_state(shared, "S-M")
    missing = {k: v for k, v in state.items() if k != "G.body.0.body.7.conv1.bias"}
    torch.save(missing, path := tmp_path / "missing.pt")
    with pytest.raises(kdsr.common.UserError, match=r"missing \(1\): G\.body\.0\.body\.7\.conv1\.bias"):
        kdsr.load_official(path)
    torch.save({**state, "G.extra.weight": torch.zeros(3)}, path := tmp_path / "extra.pt")
    with pytest.raises(kdsr.common.UserError, match=r"unexpected official keys \(1\): G\.extra\.weight"):
        kdsr.load_official(path)
    torch.save({**state, "E_st.mlp.0.bias": torch.zeros(7)}, path := tmp_path / "shape.pt")
    with pytest.raises(kdsr.common.UserError, match=r"E_st\.mlp\.0\.bias \(7,\) vs ours \(256,\)"):
        kdsr.load_official(path)
    with pytest.raises(SystemExit, match="^error: official keys missing"):
        kdsr.main(["eval", "--official-weights", str(tmp_path / "missing.pt"), "--device", "cpu"])


# ---- CLI end to end ----------------------------------------------------------------------------------------
def test_teacher_student_eval_embed_chain(tiny_hr_dir, tiny_bench_root, tmp_path):
    teacher = kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "3",
                         "--degradation", "aniso_noise", "--out-dir", str(tmp_path / "t"), *SMOKE])
    student = kdsr.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--data-dir",
                         str(tiny_hr_dir), "--steps", "8", "--out-dir", str(tmp_path / "s"), *SMOKE])  # aniso too
    records = log_records(tmp_path / "s")
    assert [("l_rec" in r) for r in records] == [False] * 5 + [True] * 3  # 1 warm-up epoch of 5 steps: L_kl only
    assert all(math.isfinite(r["loss"]) for r in records)
    eval_args = ["--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu"]
    summary = kdsr.main(["eval", "--ckpt", str(student), "--out-dir", str(tmp_path / "e"), "--save-images",
                         *eval_args])
    assert [r["degradation"] for r in summary][-1] == "mean" and len(summary) == 9
    results = (tmp_path / "e" / "results.md").read_text()
    assert "KDSR_S-smoke x4 gaussian8 Tiny" in results and "bicubic x4 gaussian8 Tiny" in results
    assert (tmp_path / "e" / "results.csv").is_file()
    assert len(list((tmp_path / "e" / "images").rglob("*.png"))) == 16  # 2 images x 8 sigmas
    png = kdsr.main(["embed", "--ckpt", str(student), "--sigmas", "1", "3", "--out", str(tmp_path / "x.png"),
                     *eval_args])
    assert Image.open(png).size == (640, 640)
    with pytest.raises(SystemExit, match="teacher"):
        kdsr.main(["eval", "--ckpt", str(teacher), *eval_args])


def test_cli_errors_are_one_line(tiny_hr_dir, tmp_path):
    with pytest.raises(SystemExit, match="^error: the student stage needs --teacher-ckpt"):
        kdsr.main(["train", "--stage", "student", "--data-dir", str(tiny_hr_dir), *SMOKE])
    with pytest.raises(SystemExit, match="^error: checkpoint not found"):
        kdsr.main(["train", "--stage", "student", "--teacher-ckpt", str(tmp_path / "no.pt"),
                   "--data-dir", str(tiny_hr_dir), *SMOKE])
    with pytest.raises(SystemExit, match="^error: give exactly one"):
        kdsr.main(["eval", "--device", "cpu"])


def test_teacher_loss_goes_down_on_one_image(tmp_path):
    (folder := tmp_path / "hr").mkdir()
    Image.fromarray(synthetic_image(3, 64, 64)).save(folder / "one.png")
    kdsr.main(["train", "--stage", "teacher", "--data-dir", str(folder), "--steps", "300",
               "--out-dir", str(tmp_path / "t"), *SMOKE])
    losses = [r["l_rec"] for r in log_records(tmp_path / "t")]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)  # measured: 0.146 -> 0.043


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_resume_continues_with_the_identical_loss(tiny_hr_dir, tmp_path, stage):
    extra = []
    if stage == "student":
        extra = ["--teacher-ckpt", str(kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir),
                                                  "--steps", "1", "--out-dir", str(tmp_path / "t"), *SMOKE]))]
    common_args = ["train", "--stage", stage, "--data-dir", str(tiny_hr_dir), *SMOKE]
    full = kdsr.main([*common_args, *extra, "--steps", "6", "--out-dir", str(tmp_path / "full")])
    kdsr.main([*common_args, *extra, "--steps", "3", "--out-dir", str(tmp_path / "half")])
    # no --teacher-ckpt on resume: the student checkpoint remembers its teacher
    resumed = kdsr.main([*common_args, "--steps", "6", "--out-dir", str(tmp_path / "half"), "--resume"])
    assert [r["step"] for r in log_records(tmp_path / "half")] == [1, 2, 3, 4, 5, 6]
    assert log_records(tmp_path / "half")[-1]["loss"] == log_records(tmp_path / "full")[-1]["loss"]
    full_state, resumed_state = (torch.load(p, weights_only=True)["model"] for p in (full, resumed))
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


# ---- robustness: signals, non-finite loss, tiles, wrong inputs, torchrun -----------------------------------
@pytest.fixture
def saved_signal_handlers():
    """The loop installs its own SIGINT/SIGTERM handlers: whatever happens, put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_writes_last_pt_and_resume_is_exact(tiny_hr_dir, tmp_path, monkeypatch, capsys,
                                                    saved_signal_handlers):
    train = ["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "6", *SMOKE]
    full = kdsr.main([*train, "--out-dir", str(tmp_path / "full")])
    original_log = kdsr.common.RunLog.log

    def log_then_signal(self, step, stage, **scalars):  # the signal lands in the middle of step 3's bookkeeping
        original_log(self, step, stage, **scalars)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(kdsr.common.RunLog, "log", log_then_signal)
    with pytest.raises(SystemExit) as exit_info:             # 128 + SIGTERM: `train && eval` does not go on
        kdsr.main([*train, "--out-dir", str(tmp_path / "half")])
    assert exit_info.value.code == 143
    stopped = tmp_path / "half" / "last.pt"
    assert torch.load(stopped, weights_only=True)["step"] == 3
    assert f"stopped by signal at step 3; checkpoint {stopped}; continue with --resume" in capsys.readouterr().out
    assert {sig: signal.getsignal(sig) for sig in saved_signal_handlers} == saved_signal_handlers  # restored
    monkeypatch.setattr(kdsr.common.RunLog, "log", original_log)
    resumed = kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), *SMOKE,
                         "--out-dir", str(tmp_path / "half"), "--resume"])  # --steps 6 comes from the checkpoint
    assert [r["step"] for r in log_records(tmp_path / "half")] == [1, 2, 3, 4, 5, 6]
    assert log_records(tmp_path / "half")[-1]["loss"] == log_records(tmp_path / "full")[-1]["loss"]
    full_state, resumed_state = (torch.load(p, weights_only=True)["model"] for p in (full, resumed))
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_nan_loss_stops_before_backward_and_keeps_last_good(tiny_hr_dir, tmp_path, monkeypatch):
    calls, original = [], kdsr.reconstruction_loss

    def nan_on_third_call(img_sr, img_hr):
        calls.append(1)
        loss = original(img_sr, img_hr)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(kdsr, "reconstruction_loss", nan_on_third_call)
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as exit_info:
        kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "6", "--save-every", "2",
                   "--out-dir", str(out), *SMOKE])
    message = str(exit_info.value)
    assert "\n" not in message and re.match(rf"^error: loss became nan at step 3; .*last good checkpoint is "
                                            rf"{re.escape(str(out / 'last.pt'))}", message), message
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in log_records(out)] == [1, 2]  # the bad step was neither applied nor logged


def test_nan_before_the_first_checkpoint_says_so(tiny_hr_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kdsr, "reconstruction_loss", lambda img_sr, img_hr: img_sr.sum() * float("inf"))
    with pytest.raises(SystemExit, match=r"^error: loss became (nan|inf) at step 1; .*\(none written yet\)"):
        kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "2",
                   "--out-dir", str(tmp_path / "t"), *SMOKE])
    assert not (tmp_path / "t" / "last.pt").exists()


@pytest.fixture(scope="module")
def student_ckpt(tiny_hr_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kdsr_ckpts")
    teacher = kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "2",
                         "--out-dir", str(root / "t"), *SMOKE])
    return kdsr.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--data-dir",
                      str(tiny_hr_dir), "--steps", "2", "--out-dir", str(root / "s"), *SMOKE])


def test_tiled_eval(student_ckpt, tiny_bench_root, tmp_path):
    run = ["eval", "--ckpt", str(student_ckpt), "--data", "Tiny", "--data-root", str(tiny_bench_root),
           "--device", "cpu"]
    whole = kdsr.main([*run, "--out-dir", str(tmp_path / "whole")])
    covering = kdsr.main([*run, "--tile", "16", "--out-dir", str(tmp_path / "t16")])  # LR is 12x16: one tile
    assert covering == whole  # exactly, every row
    tiled = kdsr.main([*run, "--tile", "8", "--tile-overlap", "2", "--out-dir", str(tmp_path / "t8")])
    assert [r["degradation"] for r in tiled] == [r["degradation"] for r in whole]
    assert all(math.isfinite(r["psnr"]) for r in tiled)
    assert tiled != whole  # 2 px of context do not cover G's receptive field
    assert "KDSR_S-smoke tile8 x4 gaussian8 Tiny" in (tmp_path / "t8" / "results.md").read_text()
    # D comes from the whole LR image (KD-IDE_S pools globally); with enough context the tiles give the same SR
    wide = kdsr.main([*run, "--tile", "8", "--tile-overlap", "12", "--out-dir", str(tmp_path / "w8")])
    assert [r["psnr"] for r in wide] == pytest.approx([r["psnr"] for r in whole], abs=1e-4)
    with pytest.raises(SystemExit, match="^2$"):  # argparse usage error: expected int >= 0
        kdsr.main([*run, "--tile", "8", "--tile-overlap", "-1"])


def test_wrong_scale_and_foreign_checkpoints_are_one_line_errors(student_ckpt, tiny_hr_dir, tiny_bench_root,
                                                                 tmp_path):
    run = ["--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"^error: .* is a x4 model but --scale 2 was given: use --scale 4$"):
        kdsr.main(["eval", "--ckpt", str(student_ckpt), "--scale", "2", *run])
    with pytest.raises(SystemExit, match=r"^error: .* is a x4 model but --scale 3"):
        kdsr.main(["embed", "--ckpt", str(student_ckpt), "--scale", "3", *run])
    assert not (tmp_path / "results.csv").exists()  # nothing ran
    kdsr.common.save_checkpoint(other := tmp_path / "other.pt", {"script": "redsr", "stage": "train", "step": 1})
    with pytest.raises(SystemExit, match=r"^error: .*other\.pt was written by redsr\.py, not kdsr\.py$"):
        kdsr.main(["eval", "--ckpt", str(other), *run])
    with pytest.raises(SystemExit, match=r"^error: .*other\.pt was written by redsr\.py"):
        kdsr.main(["eval", "--official-weights", str(other), *run])
    train = ["train", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path / "s"), *SMOKE]
    with pytest.raises(SystemExit, match=r"^error: .*other\.pt was written by redsr\.py, not kdsr\.py$"):
        kdsr.main([*train, "--stage", "student", "--teacher-ckpt", str(other)])
    with pytest.raises(SystemExit, match=r"^error: .* is a 'student' checkpoint; expected stage teacher$"):
        kdsr.main([*train, "--stage", "student", "--teacher-ckpt", str(student_ckpt)])
    with pytest.raises(SystemExit, match=r"^error: .*other\.pt was written by redsr\.py, not kdsr\.py$"):
        kdsr.main([*train, "--stage", "teacher", "--resume", str(other)])
    with pytest.raises(SystemExit, match=r"^error: .* is a 'student' checkpoint; expected stage teacher$"):
        kdsr.main([*train, "--stage", "teacher", "--resume", str(student_ckpt)])
    with pytest.raises(SystemExit, match=r"^error: .* kdsr\.py train, not released .*: pass it as --ckpt$"):
        kdsr.main(["eval", "--official-weights", str(student_ckpt), *run])


def torchrun_probe(cwd, *args) -> list[dict]:
    """`kdsr.py train ...` under torchrun with two CPU ranks (tests/ddp_train_probe.py); the probes' JSON lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "kdsr", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student G initialised") <= 1  # rank 0 prints
    # both ranks print to one pipe: their lines can interleave, so pick out every {...} object
    return [json.loads(obj) for obj in re.findall(r'\{"rank"[^{}]*\}', result.stdout)]


def test_student_trains_and_resumes_under_torchrun_with_two_cpu_ranks(tiny_hr_dir, tmp_path):
    teacher = kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "1",
                         "--degradation", "aniso_noise", "--out-dir", str(tmp_path / "t"), *SMOKE])
    # aniso: 5 warm-up steps (G idle: find_unused_parameters) then joint steps, so 7 crosses the switch
    train = ["--stage", "student", "--teacher-ckpt", str(teacher), "--data-dir", str(tiny_hr_dir), *SMOKE]
    full = tmp_path / "full"
    probes = torchrun_probe(tmp_path, *train, "--out-dir", str(full), "--steps", "7")
    assert sorted(p["rank"] for p in probes) == [0, 1] and all(p["world"] == 2 for p in probes)
    assert all(p["models"] >= 1 and p["ranks_agree"] for p in probes)
    assert probes[0]["checksum"] == probes[1]["checksum"]
    assert sorted(f.name for f in full.iterdir()) == ["last.pt", "log.jsonl"]  # one writer: no stray temp files
    assert [r["step"] for r in log_records(full)] == list(range(1, 8))  # rank 0 logs, once per step
    ckpt = torch.load(full / "last.pt", weights_only=True)
    assert ckpt["step"] == 7 and ckpt["stage"] == "student" and len(ckpt["rng"]["ranks"]) == 2
    # resume under torchrun: every rank gets its own RNG state back, so 4 + 3 steps equal 7 exactly
    torchrun_probe(tmp_path, *train, "--out-dir", str(tmp_path / "half"), "--steps", "4")
    resumed = torchrun_probe(tmp_path, *train, "--out-dir", str(tmp_path / "half"), "--steps", "7", "--resume")
    assert [p["checksum"] for p in resumed] == [p["checksum"] for p in probes]
    assert log_records(tmp_path / "half")[-1]["loss"] == log_records(full)[-1]["loss"]
    resumed_state = torch.load(tmp_path / "half" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ckpt["model"][k], resumed_state[k]) for k in resumed_state)


def test_step_random_gives_each_sample_the_same_draws_with_any_number_of_processes():
    one = kdsr.common.StepRandom(3, 7, 4, kdsr.common.Dist(), "cpu")
    halves = [kdsr.common.StepRandom(3, 7, 4, kdsr.common.Dist(rank, 2), "cpu") for rank in (0, 1)]
    kernels, noise = kdsr.sample_degradations(one, "aniso_noise", 0.2, 4.0, 25.0, 21)
    parts = [kdsr.sample_degradations(rnd, "aniso_noise", 0.2, 4.0, 25.0, 21) for rnd in halves]
    assert torch.equal(kernels, torch.cat([k for k, _ in parts])) and torch.equal(noise, torch.cat([n for _, n in parts]))
    other_step = kdsr.sample_degradations(kdsr.common.StepRandom(3, 8, 4, kdsr.common.Dist(), "cpu"), "aniso_noise",
                                          0.2, 4.0, 25.0, 21)[0]
    assert not torch.equal(kernels, other_step)
    with pytest.raises(kdsr.common.UserError, match="--batch-size 5 is the global batch: .* multiple of the 2"):
        kdsr.common.StepRandom(3, 7, 5, kdsr.common.Dist(0, 2), "cpu")


def test_two_processes_compute_the_run_of_one(tiny_hr_dir, tmp_path):
    """Global batch 4: one process, or two taking 2 each, train the same network; a resume may change the count."""
    train = ["--stage", "teacher", "--degradation", "aniso_noise", "--data-dir", str(tiny_hr_dir), *SMOKE,
             "--batch-size", "4"]
    one = torch.load(kdsr.main(["train", *train, "--steps", "3", "--out-dir", str(tmp_path / "one")]),
                     weights_only=True)["model"]
    torchrun_probe(tmp_path, *train, "--steps", "3", "--out-dir", str(tmp_path / "two"))
    kdsr.main(["train", *train, "--steps", "2", "--out-dir", str(tmp_path / "mixed")])          # 1 process ...
    torchrun_probe(tmp_path, *train, "--steps", "3", "--out-dir", str(tmp_path / "mixed"), "--resume")  # ... then 2
    for run in ("two", "mixed"):
        state = torch.load(tmp_path / run / "last.pt", weights_only=True)["model"]
        for key, value in one.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=f"{run}: {key}")
    assert log_records(tmp_path / "two")[-1]["loss"] == pytest.approx(log_records(tmp_path / "one")[-1]["loss"],
                                                                       rel=1e-5)


def test_log_says_how_the_global_batch_is_shared(tiny_hr_dir, tmp_path, capsys):
    kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "1", "--batch-size", "4",
               "--out-dir", str(tmp_path), *SMOKE])
    assert "global batch 4 = 1 process x 4" in capsys.readouterr().out


def test_resume_refuses_flags_that_differ_from_the_checkpoint(tiny_hr_dir, tmp_path):
    run = ["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), *SMOKE]
    kdsr.main([*run, "--steps", "2"])
    with pytest.raises(SystemExit, match=r"^error: --resume continues .* only --steps may change; drop --batch-size 1 "
                                         r"\(checkpoint: 2\), --preset paper \(checkpoint: smoke\)$"):
        kdsr.main([*run[:-len(SMOKE)], "--device", "cpu", "--workers", "0", "--preset", "paper", "--batch-size", "1",
                   "--steps", "4", "--resume"])
    kdsr.main([*run, "--batch-size", "2", "--steps", "3", "--resume"])          # the same value is no conflict
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3


def test_exit_statuses_of_the_command_line(tiny_hr_dir, tmp_path):
    """Ctrl-C: last.pt, then exit 130 (so `train && eval` stops); bad input: one `error:` line, exit 1; usage: 2."""
    proc = subprocess.Popen([sys.executable, str(REPO / "kdsr.py"), "train", "--stage", "teacher", "--data-dir",
                             str(tiny_hr_dir), "--steps", "100000", "--out-dir", str(tmp_path / "t"), *SMOKE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                                            "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:                               # the loop is running once step 2 is logged
        if "step 2/" in line:
            proc.send_signal(signal.SIGINT)
            break
    assert proc.wait(timeout=120) == 130
    assert torch.load(tmp_path / "t" / "last.pt", weights_only=True)["step"] >= 2
    bad = subprocess.run([sys.executable, str(REPO / "kdsr.py"), "eval", "--ckpt", str(tmp_path / "none.pt")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'none.pt'}"
    usage = subprocess.run([sys.executable, str(REPO / "kdsr.py"), "train", "--stage", "teacher", "--data-dir", "d",
                            "--steps", "0"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--steps: expected int >= 1, got 0" in usage.stderr


def test_eval_refuses_a_missing_second_set_and_an_unwritable_out_dir_before_any_image(student_ckpt, tiny_bench_root,
                                                                                     tmp_path, capsys):
    run = ["eval", "--ckpt", str(student_ckpt), "--data-root", str(tiny_bench_root), "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^error: benchmark 'Nope' not found"):
        kdsr.main([*run, "--data", "Tiny", "Nope", "--out-dir", str(tmp_path / "a")])
    (blocked := tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to .*file"):
        kdsr.main([*run, "--data", "Tiny", "--out-dir", str(blocked / "out")])
    assert "Tiny 1/2" not in capsys.readouterr().out                 # no image was super-resolved


def test_train_refuses_an_unwritable_out_dir_before_reading_data(tmp_path, capsys):
    (blocked := tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to .*file"):
        kdsr.main(["train", "--stage", "teacher", "--data-dir", str(tmp_path / "no_such_data"),
                   "--out-dir", str(blocked / "run"), *SMOKE])        # the data folder would fail later


def test_tables_and_progress_lines_look_alike(student_ckpt, tiny_bench_root, tmp_path, capsys):
    """Model row before the bicubic row, the set's name (not its path) in titles, progress lines naming their pass,
    a closing `results:` line."""
    kdsr.main(["eval", "--ckpt", str(student_ckpt), "--data", str(tiny_bench_root / "Tiny" / "HR"), "--device", "cpu",
               "--protocol", "bicubic", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "  KDSR_S-smoke: Tiny 1/2" in out and "  bicubic: Tiny 2/2" in out
    assert out.index("KDSR_S-smoke x4 bicubic Tiny") < out.index("bicubic x4 bicubic Tiny")
    assert out.rstrip().endswith(f"results: {tmp_path / 'results.md'}")


# ---- fast paths: the same math -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch, height, width, reflect", [(1, 7, 9, False), (3, 12, 5, False), (2, 6, 7, True)])
def test_dynamic_depthwise_taps_equal_the_grouped_conv_in_value_and_gradient(batch, height, width, reflect):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, height, width, requires_grad=True)
    weight = torch.randn(batch, 4, 3, 3, requires_grad=True)
    outs = [kdsr.dynamic_depthwise(x, weight, reflect, taps) for taps in (False, True)]
    torch.testing.assert_close(outs[1], outs[0])
    grad_out = torch.randn_like(outs[0])
    reference, taps = (torch.autograd.grad(out, (x, weight), grad_out) for out in outs)
    for got, expected in zip(taps, reference):
        torch.testing.assert_close(got, expected)
    assert torch.equal(kdsr.dynamic_depthwise(x, weight, reflect), outs[0])   # eager on CPU: the grouped conv
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect" if reflect else "constant")  # the definition, sample by sample
    for b in range(batch):
        torch.testing.assert_close(outs[0][b:b + 1], F.conv2d(padded[b:b + 1], weight[b][:, None], groups=4))


def test_compiled_training_and_eval_equal_eager(tiny_hr_dir, student_ckpt, tiny_bench_root, tmp_path):
    run = ["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), "--steps", "2", *SMOKE]
    eager, compiled = (kdsr.main([*run, "--out-dir", str(tmp_path / name), *flag])
                       for name, flag in (("eager", []), ("compiled", ["--compile"])))
    assert [r["loss"] for r in log_records(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in log_records(tmp_path / "eager")], rel=1e-5)
    states = [torch.load(path, weights_only=True)["model"] for path in (eager, compiled)]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)
    run = ["eval", "--ckpt", str(student_ckpt), "--data", "Tiny", "--data-root", str(tiny_bench_root), "--device",
           "cpu", "--limit", "1", "--protocol", "bicubic"]
    eager, compiled = (kdsr.main([*run, "--out-dir", str(tmp_path / f"e{n}"), *flag])
                       for n, flag in enumerate(([], ["--compile"])))
    assert [r["psnr"] for r in compiled] == pytest.approx([r["psnr"] for r in eager], abs=1e-3)


def test_eval_with_channels_last_gives_the_same_scores(student_ckpt, tiny_bench_root, tmp_path):
    run = ["eval", "--ckpt", str(student_ckpt), "--data", "Tiny", "--data-root", str(tiny_bench_root), "--device",
           "cpu", "--limit", "1"]
    plain, nhwc = (kdsr.main([*run, "--out-dir", str(tmp_path / f"e{n}"), *flag])
                   for n, flag in enumerate(([], ["--channels-last"])))
    assert len(plain) > 2 and [r["psnr"] for r in nhwc] == pytest.approx([r["psnr"] for r in plain], abs=1e-4)
