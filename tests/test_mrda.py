"""MRDA: parameter counts, networks, losses, one-degradation sampler, MLN adaptation (first-order MAML, true reset,
frozen upscaler), schedules, converter, CLI chain pretrain -> meta -> teacher -> student -> eval, exact resume,
1 or 2 processes training the same weights, the release's adaptation in eval."""
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
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

import common
import mrda
from conftest import REPO, synthetic_image

SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]


def count(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def smoke_cfg(**overrides) -> mrda.Config:
    return dataclasses.replace(mrda.Config(**mrda.PRESETS["smoke"]), **overrides)


def step_random(step: int = 1, batch: int = 2, rank: int = 0, world: int = 1) -> common.StepRandom:
    return common.StepRandom(0, step, batch, common.Dist(rank, world), "cpu")


def image_batch(n: int = 2, size: int = 64) -> torch.Tensor:
    """(n, 3, size, size) crops of a structured synthetic picture."""
    img = torch.from_numpy(synthetic_image(3, size + 8 * n, size)).permute(2, 0, 1).float() / 255
    return torch.stack([img[:, 8 * i:8 * i + size] for i in range(n)])


# ---- networks ----------------------------------------------------------------------------------------------
def test_parameter_counts_match_spec():
    cfg = mrda.Config()
    student, teacher, mln = mrda.build_model(cfg, False), mrda.build_model(cfg, True), mrda.build_mln(cfg)
    assert (count(student), count(student.G), count(student.E)) == (5_838_737, 4_561_745, 1_276_992)
    assert count(student, trainable_only=True) == 5_838_713  # the fixed mean shift
    assert (count(teacher), count(teacher.E)) == (5_910_737, 1_348_992)
    adapted = sum(p.numel() for name, p in mln.named_parameters() if name.startswith(mrda.ADAPTED))
    assert (count(mln), adapted, count(mln.tail)) == (2_073_219, 889_088, 1_184_131)
    assert (count(student.G.compress), count(student.G.blocks[0]), count(student.G.blocks[0].da_conv1)) == \
        (16_384, 155_906, 41_025)
    assert len(student.state_dict()) == len(teacher.state_dict()) == 355 and len(mln.state_dict()) == 20


def test_shapes_and_single_channel_modulation_map():
    torch.manual_seed(0)
    cfg = smoke_cfg(mln_feats=16)
    mln, teacher, student = mrda.build_mln(cfg), mrda.build_model(cfg, True), mrda.build_model(cfg, False)
    img_lr = torch.rand(2, 3, 12, 10)
    img_sr, d_prime = mln(img_lr, mrda.bicubic_up(img_lr, 4))
    assert img_sr.shape == (2, 3, 48, 40) and d_prime.shape == (2, 16, 12, 10)  # D'_T at LR resolution
    maps = []
    student.G.blocks[0].da_conv1.conv.register_forward_hook(lambda m, i, out: maps.append(out.shape))
    img_sr, d = student(img_lr)
    assert img_sr.shape == (2, 3, 48, 40) and d.shape == (2, 32) and maps == [(2, 1, 12, 10)]
    img_sr, d = teacher(img_lr, d_prime)
    assert img_sr.shape == (2, 3, 48, 40) and d.shape == (2, 32)
    with pytest.raises(ValueError, match="D'_T"):
        teacher(img_lr)


def test_mln_output_is_bicubic_plus_residual():
    mln = mrda.build_mln(smoke_cfg())
    with torch.no_grad():
        mln.tail[1].weight.zero_()
        mln.tail[1].bias.zero_()
    img_lr = torch.rand(1, 3, 8, 8)
    img_bicubic = mrda.bicubic_up(img_lr, 4)
    assert torch.equal(mln(img_lr, img_bicubic)[0], img_bicubic)
    assert torch.equal(img_bicubic, common.quantize(common.imresize(img_lr, 4)))  # rounded to 8 bits


def test_rda_conv_is_a_per_sample_depthwise_conv_with_spatial_map():
    torch.manual_seed(0)
    conv = mrda.RDAConv(6)
    x, d = torch.randn(3, 6, 9, 11), torch.randn(3, 6)
    out = conv(x, d)
    for b in range(3):  # reference: sample b, channel i correlated with taps 9i..9i+8 of w(d_b), row-major
        weight = conv.kernel(d[b]).reshape(6, 1, 3, 3)
        f1 = F.leaky_relu(F.conv2d(x[b:b + 1], weight, padding=1, groups=6), 0.1)
        ref = torch.sigmoid(conv.conv(x[b:b + 1])) * f1 + x[b:b + 1]
        assert torch.allclose(out[b:b + 1], ref, atol=1e-5)


def test_rda_conv_through_the_taps_equals_the_grouped_conv_in_value_and_gradient(monkeypatch):
    """The tap-by-tap form of the dynamic conv (chosen when compiling on CUDA) inside RDAConv: the same output and
    gradients (input, kernel MLP, Conv of Eq. 9) as the grouped conv eager runs use."""
    torch.manual_seed(0)
    conv, d = mrda.RDAConv(6), torch.randn(3, 6)
    x = torch.randn(3, 6, 9, 11, requires_grad=True)
    grouped_form = mrda.dynamic_depthwise
    results = []
    for taps in (False, True):
        monkeypatch.setattr(mrda, "dynamic_depthwise", lambda *a, taps=taps: grouped_form(*a, taps=taps))
        out = conv(x, d)
        results.append((out, *torch.autograd.grad(out, (x, *conv.parameters()), torch.ones_like(out))))
    for got, expected in zip(*results[::-1]):
        torch.testing.assert_close(got, expected)


# ---- degradation, losses, schedules ------------------------------------------------------------------------
def test_one_degradation_per_batch_and_theta_in_radians(monkeypatch):
    thetas, original = [], common.anisotropic_kernels

    def spy(lambda1, lambda2, theta, size=21):
        thetas.append(torch.as_tensor(theta).reshape(-1))
        return original(lambda1, lambda2, theta, size)

    monkeypatch.setattr(common, "anisotropic_kernels", spy)
    cfg = mrda.Config(degradation="aniso_noise")
    for step in range(400):
        kernel, noise = mrda.sample_degradation(cfg, step_random(step))
        assert kernel.shape == (1, 21, 21) and noise.shape == (1,) and 0 <= noise.item() <= 25
    theta = torch.cat(thetas[-400:])
    assert theta.min() >= 0 and theta.max() < math.pi and theta.max() > 0.9 * math.pi  # not U[0, 1 degree)
    img_hr = image_batch(1).expand(4, -1, -1, -1)
    img_lr = mrda.degrade_batch(img_hr, mrda.Config(), step_random(batch=4))  # iso: no noise: identical HR -> LR
    assert img_lr.shape == (4, 3, 16, 16) and all(torch.equal(img_lr[0], img_lr[i]) for i in range(4))


def test_kd_losses():
    torch.manual_seed(0)
    d_t, d_s = torch.randn(4, 32), torch.randn(4, 32, requires_grad=True)
    assert mrda.kl_loss(d_t, d_t).abs() < 1e-6 and mrda.abs_loss(d_t, d_t) == 0
    kl = mrda.kl_loss(d_s, d_t)
    p_t, p_s = (torch.softmax(v / 0.15, dim=1) for v in (d_t, d_s.detach()))
    assert kl > 0 and torch.allclose(kl, (p_t * (p_t / p_s).log()).sum(1).mean(), rtol=1e-4)
    assert torch.allclose(mrda.abs_loss(d_s, d_t), (d_s - d_t).abs().mean())
    d_t.requires_grad_(True)
    (mrda.kl_loss(d_s, d_t) + mrda.abs_loss(d_s, d_t)).backward()
    assert d_s.grad is not None and d_t.grad is None  # the teacher side is detached


@pytest.mark.parametrize("estimator_only", [True, False])
def test_student_gradients_reach_only_the_right_parts(estimator_only):
    torch.manual_seed(0)
    cfg = smoke_cfg()
    mln = mrda.build_mln(cfg).requires_grad_(False)
    teacher = mrda.build_model(cfg, True).requires_grad_(False)
    student = mrda.build_model(cfg, False)
    img_hr = image_batch(2)
    img_lr = mrda.degrade_batch(img_hr, cfg, step_random())
    loss, scalars, *_ = mrda.student_step(student, mln, teacher, img_lr, img_hr, cfg, False, torch.device("cpu"),
                                          estimator_only)
    loss.backward()
    assert all(p.grad is not None for p in student.E.parameters())
    g_grads = [p.grad for p in student.G.parameters() if p.requires_grad]
    assert all(g is None for g in g_grads) if estimator_only else all(g is not None for g in g_grads)
    assert ("l_rec" in scalars) != estimator_only


def test_paper_schedules():
    cfg = mrda.Config()
    assert [mrda.total_steps(cfg, s) for s in mrda.STAGES] == [600 * 971, 600 * 216, 500 * 1294, 500 * 647]
    assert mrda.schedule(cfg, "pretrain", 124 * 971) == (1e-4, False)
    assert mrda.schedule(cfg, "pretrain", 124 * 971 + 1) == (5e-5, False)     # epoch 125: halved
    assert mrda.schedule(cfg, "meta", 149 * 216 + 1) == (5e-5, False)        # epoch 150
    assert mrda.schedule(cfg, "student", 59 * 647 + 1) == (pytest.approx(1e-5), True)   # epoch 60: x0.1
    assert mrda.schedule(cfg, "student", 100 * 647) == (pytest.approx(1e-5), True)
    assert mrda.schedule(cfg, "student", 100 * 647 + 1) == (1e-4, False)     # joint phase
    assert mrda.step_sizes(cfg) == [1e-2] * 5
    assert mrda.step_sizes(dataclasses.replace(cfg, released_step_sizes=True)) == [1e-2] + [5e-3] * 4
    assert mrda.step_sizes(dataclasses.replace(cfg, released_step_sizes=True, inner_steps=7)) == \
        [1e-2] + [5e-3] * 4 + [1e-3] * 2                                     # the release's 1e-3 from step 6


# ---- meta-learning: adaptation, meta step, reset, frozen upscaler -----------------------------------------
def test_inner_steps_lower_the_support_loss_and_leave_meta_weights_untouched():
    torch.manual_seed(0)
    cfg = smoke_cfg(inner_steps=5)
    mln = mrda.build_mln(cfg)
    img_hr = image_batch(2)
    img_lr = common.degrade(img_hr, common.isotropic_kernels(2.0), 4)        # one fixed degradation
    img_bicubic = mrda.bicubic_up(img_lr, 4)
    before = {k: v.clone() for k, v in mln.state_dict().items()}
    theta, losses = mrda.adapt_mln(mln, img_lr, img_bicubic, img_hr, [cfg.inner_lr] * cfg.inner_steps)
    adapted_loss = mrda.reconstruction_loss(functional_call(mln, theta, (img_lr, img_bicubic))[0], img_hr)
    assert len(losses) == 5 and all(a > b for a, b in zip(losses, losses[1:])) and adapted_loss < losses[-1]
    # the paper's alpha = 1e-2 moves an untrained MLN little (0.07693 -> 0.07691); alpha = 1 shows it is real descent
    _, big_steps = mrda.adapt_mln(mln, img_lr, img_bicubic, img_hr, [1.0] * 5)
    assert big_steps[-1] < 0.997 * big_steps[0], big_steps  # measured 0.07693 -> 0.07655
    assert sorted(theta) == sorted(k for k in before if not k.startswith("tail."))  # upscaler is not adapted
    assert all(torch.equal(before[k], v) for k, v in mln.state_dict().items())    # theta_M untouched


def test_meta_step_sets_head_body_gradients_without_moving_weights():
    torch.manual_seed(0)
    cfg = smoke_cfg()
    mln = mrda.build_mln(cfg)
    mln.tail.requires_grad_(False)
    before = {k: v.clone() for k, v in mln.state_dict().items()}
    query_loss, scalars = mrda.meta_step(mln, image_batch(4), cfg, step_random(batch=4), common.Dist())
    assert torch.isfinite(query_loss) and not query_loss.requires_grad and "l_support" in scalars
    assert all(torch.equal(before[k], v) for k, v in mln.state_dict().items())  # only the Adam step moves theta_M
    for name, p in mln.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if name.startswith(mrda.ADAPTED) else p.grad is None


@pytest.fixture(scope="module")
def chain(tiny_hr_dir, tmp_path_factory):
    """pretrain -> meta -> teacher -> student, smoke preset, as a user would chain them."""
    root = tmp_path_factory.mktemp("mrda_chain")
    data = ["--data-dir", str(tiny_hr_dir), *SMOKE]
    pretrain = mrda.main(["train", "--stage", "pretrain", "--steps", "3", "--out-dir", str(root / "p"), *data])
    meta = mrda.main(["train", "--stage", "meta", "--pretrain-ckpt", str(pretrain), "--steps", "3",
                      "--out-dir", str(root / "m"), *data])
    teacher = mrda.main(["train", "--stage", "teacher", "--meta-ckpt", str(meta), "--steps", "3",
                         "--out-dir", str(root / "t"), *data])
    student = mrda.main(["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--steps", "7",
                         "--out-dir", str(root / "s"), *data])  # 5 estimator-only steps, then joint
    return {"pretrain": pretrain, "meta": meta, "teacher": teacher, "student": student, "root": root}


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def test_upscaler_never_changes_after_pretraining(chain):
    pretrain, meta, teacher = (load(chain[s]) for s in ("pretrain", "meta", "teacher"))
    tail = [k for k in pretrain["model"] if k.startswith("tail.")]
    assert len(tail) == 6 and all(torch.equal(pretrain["model"][k], meta["model"][k]) for k in tail)
    assert not torch.equal(pretrain["model"]["body.0.weight"], meta["model"]["body.0.weight"])  # meta-learned
    assert all(torch.equal(meta["model"][k], teacher["mln"][k]) for k in meta["model"])  # theta_M handed over
    assert log_records(chain["root"] / "s")[4]["l_kl"] > 0 and "l_rec" not in log_records(chain["root"] / "s")[4]
    assert "l_rec" in log_records(chain["root"] / "s")[5]
    student, t = load(chain["student"]), teacher["model"]
    assert student["teacher_ckpt"] == str(chain["teacher"]) and teacher["meta_ckpt"] == str(chain["meta"])
    assert not torch.equal(student["model"]["G.head.weight"], t["G.head.weight"])  # G fine-tuned in joint steps


def test_teacher_resets_the_mln_to_theta_m_every_batch(chain, tiny_hr_dir, tmp_path, monkeypatch):
    theta_m = load(chain["meta"])["model"]
    starts, adapted, original = [], [], mrda.adapt_mln

    def spy(mln, *args, **kwargs):
        starts.append({k: v.clone() for k, v in mln.state_dict().items()})
        theta, losses = original(mln, *args, **kwargs)
        adapted.append(theta)
        return theta, losses

    monkeypatch.setattr(mrda, "adapt_mln", spy)
    mrda.main(["train", "--stage", "teacher", "--meta-ckpt", str(chain["meta"]), "--data-dir", str(tiny_hr_dir),
               "--steps", "3", "--out-dir", str(tmp_path / "t"), *SMOKE])
    assert len(starts) == 3
    for start in starts:  # batches 1, 2, 3 all start from theta_M bit for bit
        assert all(torch.equal(start[k], theta_m[k]) for k in theta_m)
    assert all(not torch.equal(theta["body.0.weight"], theta_m["body.0.weight"]) for theta in adapted)


def test_eval_student_teacher_and_aniso_table(chain, tiny_bench_root, tmp_path):
    run = ["--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu"]
    summary = mrda.main(["eval", "--ckpt", str(chain["student"]), "--out-dir", str(tmp_path / "e"),
                         "--save-images", *run])
    assert [r["degradation"] for r in summary][-1] == "mean" and len(summary) == 9
    results = (tmp_path / "e" / "results.md").read_text()
    assert "MRDA_S-smoke x4 gaussian8 Tiny" in results and "bicubic x4 gaussian8 Tiny" in results
    assert (tmp_path / "e" / "results.csv").is_file()
    assert len(list((tmp_path / "e" / "images").rglob("*.png"))) == 16  # 2 images x 8 sigmas
    oracle = mrda.main(["eval", "--ckpt", str(chain["teacher"]), "--out-dir", str(tmp_path / "t"), *run])
    assert len(oracle) == 9 and all(math.isfinite(r["psnr"]) for r in oracle)
    assert "MRDA_T-oracle-smoke x4 gaussian8 Tiny" in (tmp_path / "t" / "results.md").read_text()
    aniso = mrda.main(["eval", "--ckpt", str(chain["student"]), "--protocol", "aniso_noise", "--limit", "1",
                       "--out-dir", str(tmp_path / "a"), *run])
    assert len(aniso) == 28 and aniso[0]["degradation"] == "k1/n0"
    with pytest.raises(SystemExit, match=r"^error: .* is a 'meta' checkpoint; expected stage teacher or student$"):
        mrda.main(["eval", "--ckpt", str(chain["meta"]), *run])


def test_cli_errors_are_one_line(chain, tiny_hr_dir, tmp_path):
    train = ["train", "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), *SMOKE]
    with pytest.raises(SystemExit, match="^error: the meta stage needs --pretrain-ckpt"):
        mrda.main([*train, "--stage", "meta"])
    with pytest.raises(SystemExit, match="^error: the student stage needs --teacher-ckpt"):
        mrda.main([*train, "--stage", "student"])
    with pytest.raises(SystemExit, match=r"^error: .* is a 'pretrain' checkpoint; expected stage meta$"):
        mrda.main([*train, "--stage", "teacher", "--meta-ckpt", str(chain["pretrain"])])
    with pytest.raises(SystemExit, match=r"^error: .* has mln_feats=8 but this stage has mln_feats=128"):
        mrda.main([*train, "--stage", "teacher", "--meta-ckpt", str(chain["meta"]), "--preset", "paper"])
    with pytest.raises(SystemExit, match="^error: the meta batch is split"):
        mrda.main([*train, "--stage", "meta", "--pretrain-ckpt", str(chain["pretrain"]), "--batch-size", "3"])
    with pytest.raises(SystemExit, match="^error: give exactly one"):
        mrda.main(["eval", "--device", "cpu"])
    with pytest.raises(common.UserError, match=r"n >= 1 SGD steps \[Alg. 2\], got inner_steps=0"):
        mrda.check_config(dataclasses.replace(mrda.Config(), inner_steps=0))


@pytest.mark.parametrize("stage", ["pretrain", "teacher"])
def test_bicubic_residual_stays_fp32_under_amp(chain, tiny_hr_dir, tmp_path, monkeypatch, stage):
    """--amp: the MLN's bicubic residual is made outside autocast in every stage (bf16 keeps ~3 significant digits).
    CPU stands in for CUDA here: common.autocast is pointed at CPU bf16 autocast."""
    monkeypatch.setattr(common, "autocast", lambda device, on: torch.autocast("cpu", torch.bfloat16, enabled=on))
    dtypes, bicubic_up = [], mrda.bicubic_up
    monkeypatch.setattr(mrda, "bicubic_up", lambda img, s: dtypes.append((out := bicubic_up(img, s)).dtype) or out)
    handoff = {"pretrain": [], "teacher": ["--meta-ckpt", str(chain["meta"])]}[stage]
    mrda.main(["train", "--stage", stage, *handoff, "--steps", "1", "--amp", "--out-dir", str(tmp_path),
               "--data-dir", str(tiny_hr_dir), *SMOKE])
    assert dtypes and set(dtypes) == {torch.float32}


def test_student_adapts_and_degrades_as_its_teacher(chain, tiny_hr_dir, tmp_path):
    """Degradation and adaptation come from the teacher checkpoint; an explicit conflicting adaptation is an error."""
    ckpt = load(chain["teacher"])
    ckpt["config"].update(degradation="aniso_noise", released_step_sizes=True, inner_steps=2)
    common.save_checkpoint(teacher := tmp_path / "aniso_teacher.pt", ckpt)
    run = ["train", "--stage", "student", "--teacher-ckpt", str(teacher), "--data-dir", str(tiny_hr_dir), *SMOKE]
    config = load(mrda.main([*run, "--steps", "1", "--out-dir", str(tmp_path / "s")]))["config"]
    assert (config["degradation"], config["released_step_sizes"], config["inner_steps"]) == ("aniso_noise", True, 2)
    with pytest.raises(SystemExit, match="^error: .* has released_step_sizes=True but this stage has "
                                         "released_step_sizes=False: use the same --preset and flags"):
        mrda.main([*run, "--steps", "1", "--out-dir", str(tmp_path / "x"), "--no-released-step-sizes"])


def test_teacher_loss_goes_down_on_one_image(chain, tmp_path):
    (folder := tmp_path / "hr").mkdir()
    Image.fromarray(synthetic_image(3, 64, 64)).save(folder / "one.png")
    mrda.main(["train", "--stage", "teacher", "--meta-ckpt", str(chain["meta"]), "--data-dir", str(folder),
               "--steps", "300", "--log-every", "1", "--out-dir", str(tmp_path / "t"), *SMOKE])
    losses = [r["l_rec"] for r in log_records(tmp_path / "t")]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)  # measured: see README


@pytest.mark.parametrize("stage", mrda.STAGES)
def test_resume_continues_with_the_identical_loss(chain, tiny_hr_dir, tmp_path, stage):
    handoff = {"pretrain": [], "meta": ["--pretrain-ckpt", str(chain["pretrain"])],
               "teacher": ["--meta-ckpt", str(chain["meta"])], "student": ["--teacher-ckpt", str(chain["teacher"])]}
    train = ["train", "--stage", stage, "--data-dir", str(tiny_hr_dir), *SMOKE]
    full = mrda.main([*train, *handoff[stage], "--steps", "6", "--out-dir", str(tmp_path / "full")])
    mrda.main([*train, *handoff[stage], "--steps", "3", "--out-dir", str(tmp_path / "half")])
    # no hand-off flag on resume: the checkpoint remembers where it started from
    resumed = mrda.main([*train, "--steps", "6", "--out-dir", str(tmp_path / "half"), "--resume"])
    assert [r["step"] for r in log_records(tmp_path / "half")] == [1, 2, 3, 4, 5, 6]
    assert log_records(tmp_path / "half")[-1]["loss"] == log_records(tmp_path / "full")[-1]["loss"]
    full_state, resumed_state = load(full)["model"], load(resumed)["model"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def torchrun(tmp_path, *args) -> None:
    """`mrda.py train ARGS` on 2 gloo CPU ranks (tests/ddp_train_probe.py); the ranks' models must be bit-equal."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "mrda", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    probes = [json.loads(obj) for obj in re.findall(r'\{"rank"[^{}]*\}', result.stdout)]
    assert sorted(p["rank"] for p in probes) == [0, 1] and all(p["world"] == 2 and p["ranks_agree"] for p in probes)


def test_a_step_degrades_the_global_batch_alike_with_any_number_of_processes():
    """One degradation per step for the whole global batch (a shared draw), every item its own noise field."""
    cfg, img_hr = smoke_cfg(degradation="aniso_noise"), image_batch(4)
    one = mrda.degrade_batch(img_hr, cfg, step_random(7, 4))
    halves = [mrda.degrade_batch(img_hr[2 * r:2 * r + 2], cfg, step_random(7, 4, r, 2)) for r in (0, 1)]
    assert torch.equal(one, torch.cat(halves))
    (k0, n0), (k1, n1) = (mrda.sample_degradation(cfg, step_random(7, 4, r, 2)) for r in (0, 1))
    assert torch.equal(k0, k1) and torch.equal(n0, n1)                       # every rank: the step's one degradation
    assert not torch.equal(k0, mrda.sample_degradation(cfg, step_random(8, 4))[0])
    same = mrda.degrade_batch(image_batch(1).expand(4, -1, -1, -1), cfg, step_random(7, 4))
    assert not torch.equal(same[0], same[1])                                 # own noise field per item


@pytest.mark.parametrize("stage", ["meta", "teacher", "student"])
def test_two_processes_compute_the_run_of_one(chain, tiny_hr_dir, tmp_path, stage):
    """Global batch 4: one process, or two taking 2 each, train the same weights, and a resume may change the number
    of processes. The step's degradation and noise fields come from StepRandom; the MLN adaptation (meta: support
    and query L1) is the global batch's, each rank's gradient averaged over the ranks. Not bit-identical: the ranks'
    means are averaged instead of one mean taken, so float sums round differently (hence rtol 1e-5)."""
    handoff = {"meta": ["--pretrain-ckpt", str(chain["pretrain"])], "teacher": ["--meta-ckpt", str(chain["meta"])],
               "student": ["--teacher-ckpt", str(chain["teacher"])]}[stage]
    steps = 7 if stage == "student" else 3                                   # student: 5 estimator-only, 2 joint
    train = ["--stage", stage, *handoff, "--degradation", "aniso_noise", "--data-dir", str(tiny_hr_dir), *SMOKE,
             "--batch-size", "4"]
    one = mrda.main(["train", *train, "--steps", str(steps), "--out-dir", str(tmp_path / "one")])
    torchrun(tmp_path, *train, "--steps", str(steps), "--out-dir", str(tmp_path / "two"))
    mrda.main(["train", *train, "--steps", str(steps - 1), "--out-dir", str(tmp_path / "mixed")])       # 1 process ...
    torchrun(tmp_path, *train, "--steps", str(steps), "--out-dir", str(tmp_path / "mixed"), "--resume")  # ... then 2
    for run in ("two", "mixed"):
        state = load(tmp_path / run / "last.pt")["model"]
        for key, value in load(one)["model"].items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=f"{run}: {key}")
    assert [r["step"] for r in log_records(tmp_path / "two")] == list(range(1, steps + 1))  # rank 0 logs
    records = [log_records(tmp_path / run)[-1] for run in ("one", "two")]
    assert records[1]["loss"] == pytest.approx(records[0]["loss"], rel=1e-5)
    if stage == "meta":
        assert records[1]["l_support"] == pytest.approx(records[0]["l_support"], rel=1e-5)  # the global support L1


def test_meta_share_of_every_process_must_be_even(chain, tiny_hr_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "ddp_setup", lambda device=None: common.Dist(0, 2))  # rank 0 of 2: fails before any
    with pytest.raises(SystemExit, match=r"^error: the meta batch 2 is global: each of the 2 processes needs an "
                                         r"even share \(its support and query items alternate\)$"):
        mrda.main(["train", "--stage", "meta", "--pretrain-ckpt", str(chain["pretrain"]), "--batch-size", "2",
                   "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), *SMOKE])


def test_eval_adapts_as_the_release_only_with_its_flags(chain, tiny_bench_root, tmp_path, monkeypatch):
    calls, original = [], mrda.adapt_mln

    def spy(mln, img_lr, img_bicubic, img_hr, alphas, dist=None, adapted=mrda.ADAPTED):
        theta, losses = original(mln, img_lr, img_bicubic, img_hr, alphas, dist, adapted)
        calls.append((alphas, theta, {k: v.clone() for k, v in mln.state_dict().items()}))
        return theta, losses

    monkeypatch.setattr(mrda, "adapt_mln", spy)
    run = ["eval", "--ckpt", str(chain["teacher"]), "--data", "Tiny", "--data-root", str(tiny_bench_root),
           "--device", "cpu", "--limit", "1", "--protocol", "bicubic"]
    mrda.main([*run, "--out-dir", str(tmp_path / "ours")])
    alphas, theta, theta_m = calls[-1]
    assert alphas == [1e-2, 1e-2] and not any(k.startswith("tail.") for k in theta)  # defaults: paper alpha, head + body
    assert "MRDA_T-oracle-smoke x4 bicubic Tiny" in (tmp_path / "ours" / "results.md").read_text()
    mrda.main([*run, "--released-step-sizes", "--adapt-upscaler", "--out-dir", str(tmp_path / "release")])
    alphas, theta, theta_m = calls[-1]
    tail = [k for k in theta_m if k.startswith("tail.")]
    assert alphas == [1e-2, 5e-3] and len(tail) == 6 and all(k in theta for k in tail)  # smoke n = 2
    assert all(not torch.equal(theta[k], theta_m[k]) for k in tail)                      # the upscaler adapted
    assert all(torch.equal(theta_m[k], v) for k, v in load(chain["teacher"])["mln"].items())  # theta_M untouched
    assert "MRDA_T-oracle-smoke released-steps adapt-upscaler x4" in (tmp_path / "release" / "results.md").read_text()
    with pytest.raises(SystemExit, match="^error: --adapt-upscaler and --released-step-sizes are for a teacher"):
        mrda.main([*run[:2], str(chain["student"]), *run[3:], "--adapt-upscaler"])


# ---- robustness: signals, non-finite loss, tiles, wrong inputs -----------------------------------------------
@pytest.fixture
def saved_signal_handlers():
    """The loop installs its own SIGINT/SIGTERM handlers: whatever happens, put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield saved
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_writes_last_pt_and_resume_is_exact(chain, tiny_hr_dir, tmp_path, monkeypatch, capsys,
                                                    saved_signal_handlers):
    train = ["train", "--stage", "teacher", "--data-dir", str(tiny_hr_dir), *SMOKE]
    full = mrda.main([*train, "--meta-ckpt", str(chain["meta"]), "--steps", "6", "--out-dir", str(tmp_path / "full")])
    original_log = common.RunLog.log

    def log_then_signal(self, step, stage, **scalars):  # the signal lands in the middle of step 3's bookkeeping
        original_log(self, step, stage, **scalars)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common.RunLog, "log", log_then_signal)
    with pytest.raises(SystemExit) as exit_info:             # 128 + SIGTERM
        mrda.main([*train, "--meta-ckpt", str(chain["meta"]), "--steps", "6", "--out-dir", str(tmp_path / "half")])
    assert exit_info.value.code == 143
    stopped = tmp_path / "half" / "last.pt"
    assert load(stopped)["step"] == 3
    assert f"stopped by signal at step 3; checkpoint {stopped}; continue with --resume" in capsys.readouterr().out
    assert {sig: signal.getsignal(sig) for sig in saved_signal_handlers} == saved_signal_handlers  # restored
    monkeypatch.setattr(common.RunLog, "log", original_log)
    resumed = mrda.main([*train, "--out-dir", str(tmp_path / "half"), "--resume"])  # steps, meta-ckpt from last.pt
    assert [r["step"] for r in log_records(tmp_path / "half")] == [1, 2, 3, 4, 5, 6]
    assert log_records(tmp_path / "half")[-1]["loss"] == log_records(tmp_path / "full")[-1]["loss"]
    full_state, resumed_state = load(full)["model"], load(resumed)["model"]
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


# reconstruction_loss calls per step (smoke: m = 2 tasks, n = 2 inner steps): pretrain 1, meta m (n + 1), teacher n + 1
@pytest.mark.parametrize("stage, calls_per_step", [("pretrain", 1), ("meta", 6), ("teacher", 3)])
def test_nan_loss_stops_before_the_update_and_keeps_last_good(chain, tiny_hr_dir, tmp_path, monkeypatch, stage,
                                                              calls_per_step):
    calls, original = [], mrda.reconstruction_loss

    def nan_in_third_step(img_sr, img_hr):
        calls.append(1)
        loss = original(img_sr, img_hr)
        return loss * float("nan") if len(calls) == 3 * calls_per_step else loss

    monkeypatch.setattr(mrda, "reconstruction_loss", nan_in_third_step)
    handoff = {"pretrain": [], "meta": ["--pretrain-ckpt", str(chain["pretrain"])],
               "teacher": ["--meta-ckpt", str(chain["meta"])]}[stage]
    out = tmp_path / stage
    with pytest.raises(SystemExit) as exit_info:
        mrda.main(["train", "--stage", stage, *handoff, "--data-dir", str(tiny_hr_dir), "--steps", "6",
                   "--save-every", "2", "--out-dir", str(out), *SMOKE])
    message = str(exit_info.value)
    assert "\n" not in message and re.match(rf"^error: loss became nan at step 3; .*last good checkpoint is "
                                            rf"{re.escape(str(out / 'last.pt'))}", message), message
    ckpt = common.load_checkpoint(out / "last.pt", "mrda", (stage,))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in log_records(out)] == [1, 2]  # the bad step was neither applied nor logged


def test_tiled_eval_and_wrong_scale(chain, tiny_bench_root, tmp_path):
    run = ["eval", "--ckpt", str(chain["student"]), "--data", "Tiny", "--data-root", str(tiny_bench_root),
           "--device", "cpu", "--limit", "1"]
    whole = mrda.main([*run, "--out-dir", str(tmp_path / "w")])
    covering = mrda.main([*run, "--tile", "16", "--out-dir", str(tmp_path / "t16")])  # LR is 12x16: one tile
    assert [r["psnr"] for r in covering] == [r["psnr"] for r in whole]
    tiled = mrda.main([*run, "--tile", "8", "--tile-overlap", "2", "--out-dir", str(tmp_path / "t8")])
    assert all(math.isfinite(r["psnr"]) for r in tiled) and tiled != whole  # DEN_S pools per tile
    assert "MRDA_S-smoke tile8 x4 gaussian8 Tiny" in (tmp_path / "t8" / "results.md").read_text()
    with pytest.raises(SystemExit, match="^2$"):  # argparse usage error: expected int >= 0
        mrda.main([*run, "--tile", "8", "--tile-overlap", "-1"])
    with pytest.raises(SystemExit, match="^error: --tile is for the student"):
        mrda.main([*run[:2], str(chain["teacher"]), *run[3:], "--tile", "8"])
    with pytest.raises(SystemExit, match=r"^error: .* is a x4 model but --scale 2 was given: use --scale 4$"):
        mrda.main([*run, "--scale", "2"])


# ---- official weights --------------------------------------------------------------------------------------
def manifest_state(shared, name: str) -> dict:
    """A random tensor for every key/shape of an official manifest; the mean shift set to its fixed values."""
    gen, state = torch.Generator().manual_seed(0), {}
    for line in (shared / "manifests" / name).read_text().splitlines():
        key, shape = line.split("\t")
        state[key] = torch.randn([int(s) for s in shape.split("x")], generator=gen) * 0.02
    for conv, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
        if f"G.{conv}.weight" in state:
            state[f"G.{conv}.weight"] = torch.eye(3)[:, :, None, None]
            state[f"G.{conv}.bias"] = sign * torch.tensor(mrda.DIV2K_MEAN)
    return state


@pytest.mark.parametrize("name, teacher", [("MRDA_S_classic_keys.tsv", False), ("MRDA_T_classic_keys.tsv", True)])
def test_official_manifest_loads_strictly(shared, tmp_path, name, teacher):
    state = manifest_state(shared, name)
    torch.save(state, path := tmp_path / "official.pt")
    img_lr, fresh = torch.rand(1, 3, 8, 8), mrda.build_model(mrda.Config(), teacher).eval()
    model, cfg = mrda.load_official(path)
    d_in = torch.rand(1, 128, 8, 8) if teacher else None
    with torch.no_grad():  # loading really replaced the weights: the output moves
        assert not torch.allclose(fresh(img_lr, d_in)[0], model.eval()(img_lr, d_in)[0])
    assert model.teacher == teacher and (cfg.n_feats, cfg.n_blocks, cfg.den_feats, cfg.mln_feats) == (64, 27, 64, 128)
    ours = model.state_dict()
    prefix = "E." if teacher else "E_st."
    assert torch.equal(ours["G.blocks.26.da_conv2.conv.bias"], state["G.body.0.body.26.da_conv2.conv.bias"])
    assert torch.equal(ours["G.compress.weight"], state["G.compress.0.weight"])
    assert torch.equal(ours["G.upsample.2.weight"], state["G.tail.0.2.weight"])
    assert torch.equal(ours["E.features.10.weight"], state[f"{prefix}E.10.weight"])
    assert sorted(t.sum().item() for t in ours.values()) == sorted(t.sum().item() for t in state.values())


def test_official_mln_loads_strictly(shared, tmp_path):
    state = manifest_state(shared, "MRDA_MLN_keys.tsv")
    torch.save(state, path := tmp_path / "mln.pt")
    mln = mrda.load_official_mln(path, mrda.Config())
    assert all(torch.equal(mln.state_dict()[k], v) for k, v in state.items()) and len(state) == 20


def test_official_errors_name_the_keys(shared, tmp_path):
    state = manifest_state(shared, "MRDA_S_classic_keys.tsv")
    for label, broken, message in [
            ("missing", {k: v for k, v in state.items() if k != "G.body.0.body.5.conv1.weight"},
             r"official keys missing \(1\): G\.body\.0\.body\.5\.conv1\.weight"),
            ("extra", {**state, "G.foo.weight": torch.zeros(1)}, r"unexpected official keys \(1\): G\.foo\.weight"),
            ("shape", {**state, "G.head.0.bias": torch.zeros(65)}, r"shape mismatches \(1\): G\.head\.0\.bias")]:
        torch.save(broken, path := tmp_path / f"{label}.pt")
        with pytest.raises(common.UserError, match=message):
            mrda.load_official(path)
    with pytest.raises(SystemExit, match="^error: official weights not found"):
        mrda.main(["eval", "--official-weights", str(tmp_path / "none.pt"), "--device", "cpu"])


def test_official_student_and_teacher_eval(shared, tiny_bench_root, tmp_path, monkeypatch):
    torch.save(manifest_state(shared, "MRDA_S_classic_keys.tsv"), student := tmp_path / "iso_ST.pt")
    torch.save(manifest_state(shared, "MRDA_T_classic_keys.tsv"), teacher := tmp_path / "T.pt")
    torch.save(manifest_state(shared, "MRDA_MLN_keys.tsv"), mln := tmp_path / "mln.pt")
    run = ["--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu", "--limit", "1"]
    rows = mrda.main(["eval", "--official-weights", str(student), "--out-dir", str(tmp_path / "s"), *run])
    assert len(rows) == 9 and "MRDA_S x4" in (tmp_path / "s" / "results.md").read_text()
    with pytest.raises(SystemExit, match="^error: an MRDA_T file needs the released MLN too"):
        mrda.main(["eval", "--official-weights", str(teacher), *run])
    rows = mrda.main(["eval", "--official-weights", str(teacher), "--official-mln", str(mln), "--protocol", "bicubic",
                      "--out-dir", str(tmp_path / "t"), *run])
    assert len(rows) == 2 and math.isfinite(rows[0]["psnr"])
    assert "MRDA_T-oracle x4 bicubic" in (tmp_path / "t" / "results.md").read_text()   # the paper's adaptation
    alphas, original = [], mrda.adapt_mln
    monkeypatch.setattr(mrda, "adapt_mln", lambda *a, **k: alphas.append(a[4]) or original(*a, **k))
    mrda.main(["eval", "--official-weights", str(teacher), "--official-mln", str(mln), "--protocol", "bicubic",
               "--released-step-sizes", "--adapt-upscaler", "--out-dir", str(tmp_path / "r"), *run])
    assert alphas == [[1e-2] + [5e-3] * 4]                                   # the authors' own teacher test
    assert "MRDA_T-oracle released-steps adapt-upscaler x4" in (tmp_path / "r" / "results.md").read_text()


def test_meta_stage_under_compile_runs_its_functional_calls_on_the_plain_mln(chain, tiny_hr_dir, tmp_path):
    """The meta stage adapts copies of theta_M through torch.func.functional_call, by parameter name: it takes the MLN
    from under the compile wrapper (whose names carry a prefix) and runs it eagerly, the same run with --compile."""
    run = ["train", "--stage", "meta", "--pretrain-ckpt", str(chain["pretrain"]), "--data-dir", str(tiny_hr_dir),
           "--steps", "2", *SMOKE]
    eager, compiled = (mrda.main([*run, "--out-dir", str(tmp_path / name), *flag])
                       for name, flag in (("eager", []), ("compiled", ["--compile"])))
    losses = [[r["loss"] for r in log_records(tmp_path / name)] for name in ("eager", "compiled")]
    assert losses[0] == losses[1]
    states = [load(path)["model"] for path in (eager, compiled)]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[1][k], states[0][k]) for k in states[0])
    assert not torch.equal(states[0]["body.0.weight"], load(chain["pretrain"])["model"]["body.0.weight"])  # it learned


def test_compiled_training_and_eval_equal_eager(chain, tiny_hr_dir, tiny_bench_root, tmp_path):
    run = ["train", "--stage", "teacher", "--meta-ckpt", str(chain["meta"]), "--data-dir", str(tiny_hr_dir),
           "--steps", "2", *SMOKE]
    eager, compiled = (mrda.main([*run, "--out-dir", str(tmp_path / name), *flag])
                       for name, flag in (("eager", []), ("compiled", ["--compile"])))
    assert [r["loss"] for r in log_records(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in log_records(tmp_path / "eager")], rel=1e-5)
    states = [load(path)["model"] for path in (eager, compiled)]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)
    run = ["eval", "--ckpt", str(chain["student"]), "--data", "Tiny", "--data-root", str(tiny_bench_root),
           "--device", "cpu", "--limit", "1", "--protocol", "bicubic"]
    eager, compiled = (mrda.main([*run, "--out-dir", str(tmp_path / f"e{n}"), *flag])
                       for n, flag in enumerate(([], ["--compile"])))
    assert [r["psnr"] for r in compiled] == pytest.approx([r["psnr"] for r in eager], abs=1e-3)


def test_eval_with_channels_last_gives_the_same_scores(chain, tiny_bench_root, tmp_path):
    run = ["eval", "--ckpt", str(chain["student"]), "--data", "Tiny", "--data-root", str(tiny_bench_root),
           "--device", "cpu", "--limit", "1"]
    plain, nhwc = (mrda.main([*run, "--out-dir", str(tmp_path / f"e{n}"), *flag])
                   for n, flag in enumerate(([], ["--channels-last"])))
    assert len(plain) > 2 and [r["psnr"] for r in nhwc] == pytest.approx([r["psnr"] for r in plain], abs=1e-4)
