"""ReDSR: parameter counts, networks, losses, batch construction, converter, CLI end-to-end, exact resume."""
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

import common
import redsr

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--device", "cpu", "--workers", "0", "--log-every", "1"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def log_records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


# ---- networks ----------------------------------------------------------------------------------------------
def test_parameter_counts_match_spec():
    model = redsr.build_model(redsr.Config())
    assert count(model.encoder) == 1_580_742
    assert count(model.generator) == 4_699_261
    assert sum(p.numel() for p in model.generator.parameters() if p.requires_grad) == 4_699_237
    assert count(model.encoder) + count(model.generator) == 6_280_003  # Tab. 1 "6.28M"
    assert count(model.degrader) == 1_237_924
    large = redsr.build_model(redsr.Config(**redsr.PRESETS["large"]), with_degrader=False)
    assert count(large) == 10_433_828  # Tab. 1 "10.43M" (layout inferred)


def test_shapes_and_encoder_minimum_size():
    torch.manual_seed(0)
    model = redsr.build_model(redsr.Config()).eval()
    with torch.no_grad():
        f = model.encoder(torch.rand(2, 3, 64, 64))
        assert f.shape == (2, 64)
        assert model.generator(torch.rand(2, 3, 40, 48), f).shape == (2, 3, 160, 192)
        assert model.degrader(torch.rand(2, 3, 96, 128), f).shape == (2, 3, 24, 32)
        assert model.encoder(torch.rand(1, 3, 24, 24)).shape == (1, 64)
        with pytest.raises(ValueError, match="24"):
            model.encoder(torch.rand(1, 3, 23, 23))
        assert model.super_resolve(torch.rand(1, 3, 12, 16)).shape == (1, 3, 48, 64)  # E input padded


@pytest.mark.parametrize("reflect", [False, True])
def test_da_conv_grouped_equals_per_sample_loop(reflect):
    torch.manual_seed(0)
    conv = redsr.DAConv(8, reduction=4, reflect=reflect)
    x, z = torch.randn(3, 8, 10, 12), torch.randn(3, 8)
    batched = conv(x, z)
    looped = torch.cat([conv(x[i:i + 1], z[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], conv(x[:1], z[1:2])[0])  # the kernel really depends on z


def test_mean_shift_is_fixed_and_exact():
    gen = redsr.Generator(rep_dim=8, n_feats=8, n_groups=1, n_blocks=1)
    img = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(gen.sub_mean(img), img - torch.tensor(redsr.DIV2K_MEAN)[:, None, None])
    assert not gen.sub_mean.weight.requires_grad and not gen.add_mean.bias.requires_grad


# ---- losses ------------------------------------------------------------------------------------------------
def test_energy_distance_is_zero_for_identical_sets():
    t = torch.randn(64, 64)
    assert redsr.energy_distance(t, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dist", redsr.ED_DISTS)
def test_energy_distance_near_zero_for_samples_of_the_prior(dist):
    torch.manual_seed(0)
    values = torch.stack([redsr.energy_distance(redsr.sample_prior(dist, 16, 64, "cpu"),
                                                redsr.sample_prior(dist, 64, 64, "cpu")) for _ in range(40)])
    # V-statistic bias (1/n + 1/m) E||X - X'|| / C = 0.0138 for n = 16, m = 64, C = 64 (spec Sec. 8)
    assert values.mean().item() == pytest.approx(0.0138, abs=0.002)
    assert values.mean().item() > 0  # non-negative in expectation
    torch.manual_seed(1)
    big = redsr.energy_distance(redsr.sample_prior(dist, 512, 64, "cpu"), redsr.sample_prior(dist, 512, 64, "cpu"))
    assert 0 <= big.item() < 0.003  # tends to 0 as n, m grow


def test_energy_distance_larger_for_shifted_or_collapsed_f():
    torch.manual_seed(0)
    def mean_ed(make_f, draws=20):
        return np.mean([redsr.energy_distance(make_f(), torch.randn(64, 64)).item() for _ in range(draws)])
    matched = mean_ed(lambda: torch.randn(16, 64))
    cases = {"zero": (lambda: torch.zeros(16, 64), 0.076), "shift": (lambda: torch.randn(16, 64) + 1, 0.093),
             "scale": (lambda: 3 * torch.randn(16, 64), 0.119),
             "collapsed": (lambda: torch.randn(1, 64).expand(16, 64), 0.18)}
    for name, (make_f, expected) in cases.items():
        value = mean_ed(make_f)
        assert value == pytest.approx(expected, abs=0.02), name
        assert value > 4 * matched, name


def test_energy_distance_gradient_reaches_f_only_and_is_finite_with_duplicates():
    f = torch.randn(1, 64).repeat(16, 1).requires_grad_(True)  # duplicated rows: zero distances
    t = redsr.sample_prior("gaussian", 64, 64, "cpu")
    assert not t.requires_grad
    redsr.energy_distance(f, t).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert t.grad is None


def test_kl_variant_is_nonnegative_and_small_for_the_prior():
    torch.manual_seed(0)
    assert redsr.kl_to_standard_normal(torch.randn(4096, 64)).item() == pytest.approx(0.0, abs=2e-3)
    assert redsr.kl_to_standard_normal(torch.randn(16, 64) * 0.1 + 2).item() > 1.0


def test_modulation_weight():
    target = torch.rand(3, 3, 8, 8)
    assert torch.equal(redsr.modulation_weight(target, target), torch.full((3,), 2.0))
    w = redsr.modulation_weight((target + 0.1).requires_grad_(True), target)
    torch.testing.assert_close(w, torch.full((3,), 2 / 1.1))
    assert not w.requires_grad  # detached
    errors = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.5, 3.0])
    pred = target[:1] + errors[:, None, None, None]
    w = redsr.modulation_weight(pred, target[:1].expand_as(pred))
    assert ((w > 0) & (w <= 2)).all()
    assert (w[1:] < w[:-1]).all()  # larger for better re-degradation, per sample
    assert w[2].item() == pytest.approx(1.905, abs=1e-3)


def test_sr_loss_weights_each_sample():
    sr, hr = torch.zeros(2, 3, 4, 4), torch.cat([torch.full((1, 3, 4, 4), 0.1), torch.full((1, 3, 4, 4), 0.3)])
    assert redsr.sr_loss(sr, hr, torch.tensor([2.0, 1.0])).item() == pytest.approx((0.2 + 0.3) / 2)
    assert redsr.re_degradation_loss(sr, hr).item() == pytest.approx(0.2)


def test_one_adam_equals_three_adams():
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 4) for _ in range(3)]
    copies = [torch.nn.Linear(4, 4) for _ in range(3)]
    for a, b in zip(nets, copies):
        b.load_state_dict(a.state_dict())
    one = torch.optim.Adam([p for n in nets for p in n.parameters()], lr=1e-2)
    three = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in copies]
    x = torch.randn(8, 4)
    for _ in range(5):
        for group, opts in ((nets, [one]), (copies, three)):
            loss = sum(n(x).pow(2).mean() * (i + 1) for i, n in enumerate(group))
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
    for a, b in zip(nets, copies):
        assert torch.equal(a.weight, b.weight)


# ---- degradation and batch construction [Sec. 4.1] ---------------------------------------------------------
@pytest.mark.parametrize("kind", redsr.DEGRADATIONS)
def test_sampled_kernels(kind):
    kernels, noise = redsr.sample_degradations(common.StepRandom(0, 1, 6, common.Dist(), "cpu"), kind, 0.2, 4.0,
                                               25.0, 21)
    assert kernels.shape == (6, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(6))
    assert len({tuple(k.flatten().tolist()) for k in kernels}) == 6  # different items, different kernels
    assert (noise is None) == (kind == "iso")
    if noise is not None:
        assert ((noise >= 0) & (noise <= 25)).all()


def test_pairs_share_degradation_and_differ_in_content(tmp_path):
    from conftest import synthetic_image
    Image.fromarray(synthetic_image(3, 160, 160)).save(tmp_path / "big.png")
    pairs = torch.stack([common.HRPatches(tmp_path, 64, crops_per_item=2)[i] for i in range(4)])  # (4, 2, 3, 64, 64)
    assert all(not torch.equal(p[0], p[1]) for p in pairs)  # two random crops: different content
    rnd = common.StepRandom(0, 1, 4, common.Dist(), "cpu")
    kernels, _ = redsr.sample_degradations(rnd, "aniso_noise", 0.2, 4.0, 25.0, 21)
    img1_lr, img1_hr, img2_lr, img2_hr = redsr.degrade_pairs(pairs, kernels, None, 4, rnd)
    assert img1_lr.shape == img2_lr.shape == (4, 3, 16, 16) and torch.equal(img2_hr, pairs[:, 1])
    for b in range(4):  # crop 2 of item b was degraded with item b's kernel
        torch.testing.assert_close(img2_lr[b:b + 1], common.degrade(pairs[b:b + 1, 1], kernels[b:b + 1], 4))
    assert torch.equal(img1_lr * 255, (img1_lr * 255).round())  # 8-bit LR
    same = pairs[:, :1].expand(-1, 2, -1, -1, -1)  # both crops at the same position
    lr1, _, lr2, _ = redsr.degrade_pairs(same, kernels, None, 4, rnd)
    assert torch.equal(lr1, lr2)  # noise off: identical
    lr1, _, lr2, _ = redsr.degrade_pairs(same, kernels, torch.full((4,), 20.0), 4, rnd)
    diff = (lr1 - lr2) * 255
    assert not torch.equal(lr1, lr2) and diff.std().item() == pytest.approx(20 * math.sqrt(2), rel=0.2)


# ---- official weights --------------------------------------------------------------------------------------
def manifest_state(shared) -> dict:
    state = {}
    for name in ("redsr_keys.tsv", "redsr_degrader_keys.tsv"):
        for line in open(shared / "manifests" / name):
            key, shape = line.split()
            state[key] = torch.randn([int(s) for s in shape.split("x")])
    for name, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
        state[f"SRN_MODEL.{name}.weight"] = torch.eye(3)[:, :, None, None]
        state[f"SRN_MODEL.{name}.bias"] = sign * torch.tensor(redsr.DIV2K_MEAN)
    return state


def test_converter_loads_manifest_strictly(shared, tmp_path):
    state = manifest_state(shared)
    assert len(state) == 671 + 95
    container = {"epoch": 3}
    for part, (prefix, _) in redsr.OFFICIAL_PARTS.items():
        container[part] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    torch.save(container, tmp_path / "setting1_ckp.tar")
    model, cfg = redsr.load_official(tmp_path / "setting1_ckp.tar")
    assert (cfg.n_groups, cfg.n_blocks, model.degrader is not None) == (5, 5, True)
    ours = model.state_dict()
    torch.testing.assert_close(ours["encoder.body.4.weight"], container["model_DP_state_dict"]["ConvNet.4.weight"])
    torch.testing.assert_close(ours["generator.tail.4.bias"], container["model_SRN_state_dict"]["tail.1.bias"])
    torch.testing.assert_close(ours["degrader.blocks.2.conv1.1.weight"],
                               container["model_RB_state_dict"]["blk3_A.conv1.0.1.weight"])
    fresh = redsr.build_model(redsr.Config()).eval()
    img = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert not torch.allclose(model.eval().super_resolve(img), fresh.super_resolve(img))
    torch.save(state, tmp_path / "flat.pt")  # manifest-prefixed flat dict is accepted too
    redsr.load_official(tmp_path / "flat.pt")


@pytest.mark.parametrize("edit, message", [("missing", "not filled"), ("extra", "unexpected"),
                                           ("shape", "shape mismatch")])
def test_converter_fails_clearly(shared, tmp_path, edit, message):
    state = manifest_state(shared)
    if edit == "missing":
        del state["SRN_MODEL.body.2.body.3.conv1.weight"]
    elif edit == "extra":
        state["SRN_MODEL.body.2.body.3.extra.weight"] = torch.zeros(1)
    else:
        state["DP_MODEL.ConvNet.7.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(common.UserError, match=message):
        redsr.load_official(tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="error: .*" + message):
        redsr.main(["eval", "--official-weights", str(tmp_path / "bad.pt"), "--device", "cpu"])


# ---- CLI end-to-end ----------------------------------------------------------------------------------------
def test_train_eval_embed_end_to_end(tiny_hr_dir, tiny_bench_root, tmp_path):
    run = tmp_path / "run"
    redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(run)])
    records = log_records(run)
    assert len(records) == redsr.PRESETS["smoke"]["steps"]
    for term in ("l_sr", "l_rd"):  # smoke training lowers both losses
        first, last = np.mean([r[term] for r in records[:5]]), np.mean([r[term] for r in records[-5:]])
        assert last < 0.8 * first, (term, first, last)
    assert all(1.0 < r["w_mean"] <= 2.0 for r in records)
    ckpt = common.load_checkpoint(run / "last.pt", "redsr", ["joint"])
    assert ckpt["step"] == 30 and ckpt["config"]["n_feats"] == 16

    ev = tmp_path / "eval"
    summary = redsr.main(["eval", "--ckpt", str(run / "last.pt"), "--data", "Tiny", "--data-root",
                          str(tiny_bench_root), "--out-dir", str(ev), "--device", "cpu", "--save-images"])
    assert summary[-1]["degradation"] == "mean" and summary[-1]["n"] == 16 and summary[-1]["psnr"] > 15
    assert "bicubic" in (ev / "results.md").read_text() and (ev / "results.csv").exists()
    assert len(list((ev / "images").rglob("*.png"))) == 16

    png = redsr.main(["embed", "--ckpt", str(run / "last.pt"), "--data", "Tiny", "--data-root",
                      str(tiny_bench_root), "--out-dir", str(ev), "--device", "cpu", "--n-prior", "200"])
    image = np.asarray(Image.open(png))
    assert image.shape == (720, 720, 3) and (image != 255).any()


def test_resume_continues_identically(tiny_hr_dir, tmp_path):
    base = ["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--degradation", "aniso_noise"]
    redsr.main([*base, "--out-dir", str(tmp_path / "a"), "--steps", "6"])
    redsr.main([*base, "--out-dir", str(tmp_path / "b"), "--steps", "3"])
    redsr.main([*base, "--out-dir", str(tmp_path / "b"), "--steps", "6", "--resume"])
    a, b = (common.load_checkpoint(tmp_path / d / "last.pt", "redsr") for d in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log_records(tmp_path / "a")[-1]["loss"] == log_records(tmp_path / "b")[-1]["loss"]


@pytest.mark.parametrize("flags, terms, has_degrader", [
    (["--no-rd", "--no-ed"], {"l_sr"}, False),                             # Tab. 2 Model 1
    (["--no-rd"], {"l_sr", "l_ed"}, False),                                 # Model 3
    (["--no-modulation", "--ed-dist", "exponential"], {"l_sr", "l_rd", "l_ed"}, True),  # Model 6
    (["--kl-instead-of-ed"], {"l_sr", "l_rd", "l_kl", "w_mean"}, True),    # Model 7
])
def test_ablation_switches(tiny_hr_dir, tmp_path, flags, terms, has_degrader):
    redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), "--steps", "2", *flags])
    record = log_records(tmp_path)[-1]
    assert set(record) - {"stage", "step", "loss", "lr", "ms_per_it"} == terms
    ckpt = common.load_checkpoint(tmp_path / "last.pt", "redsr")
    assert any(k.startswith("degrader.") for k in ckpt["model"]) == has_degrader


def test_user_errors(tiny_hr_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: .*modulated"):
        redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--no-rd", "--modulation"])
    with pytest.raises(SystemExit, match="error: checkpoint not found"):
        redsr.main(["eval", "--ckpt", str(tmp_path / "nope.pt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="error: give --ckpt"):
        redsr.main(["eval", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        redsr.main(["--help"])
    assert exit_info.value.code == 0


# ---- robustness: signals, non-finite loss, tiling, wrong inputs, torchrun ----------------------------------
@pytest.fixture
def signal_handlers_restored():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield saved
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def smoke_ckpt(tiny_hr_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("redsr_smoke")
    return redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(out), "--steps", "2"])


def test_sigterm_writes_last_and_resume_continues_exactly(tiny_hr_dir, tmp_path, monkeypatch, capsys,
                                                          signal_handlers_restored):
    base = ["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--degradation", "aniso_noise", "--steps", "6"]
    redsr.main([*base, "--out-dir", str(tmp_path / "a")])
    log = common.RunLog.log

    def log_then_signal(self, step, stage, **scalars):
        log(self, step, stage, **scalars)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(common.RunLog, "log", log_then_signal)
    with pytest.raises(SystemExit) as exit_info:             # 128 + SIGTERM
        redsr.main([*base, "--out-dir", str(tmp_path / "b")])
    assert exit_info.value.code == 143
    last = tmp_path / "b" / "last.pt"
    assert f"stopped by signal at step 3; checkpoint {last}; continue with --resume" in capsys.readouterr().out
    assert common.load_checkpoint(last, "redsr", ["joint"])["step"] == 3
    assert [r["step"] for r in log_records(tmp_path / "b")] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == signal_handlers_restored[signal.SIGTERM]  # handlers given back
    monkeypatch.undo()
    redsr.main([*base, "--out-dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / d / "last.pt", "redsr") for d in "ab")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert log_records(tmp_path / "a")[-1]["loss"] == log_records(tmp_path / "b")[-1]["loss"]


def test_non_finite_loss_stops_before_the_checkpoint(tiny_hr_dir, tmp_path, monkeypatch, signal_handlers_restored):
    calls, l_rd = [], redsr.re_degradation_loss

    def nan_on_fifth_call(img2_lr_hat, img2_lr):
        calls.append(1)
        value = l_rd(img2_lr_hat, img2_lr)
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr(redsr, "re_degradation_loss", nan_on_fifth_call)
    last = tmp_path / "last.pt"
    with pytest.raises(SystemExit, match=r"^error: loss became nan at step 5; stopped\. The last good checkpoint is "
                                         + re.escape(str(last))) as info:
        redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), "--steps", "8",
                    "--save-every", "2"])
    assert "\n" not in str(info.value)
    ckpt = common.load_checkpoint(last, "redsr", ["joint"])
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert log_records(tmp_path)[-1]["step"] == 4  # the bad step never reached the log either
    assert signal.getsignal(signal.SIGTERM) == signal_handlers_restored[signal.SIGTERM]


def test_tiled_eval(smoke_ckpt, tiny_bench_root, tmp_path):
    def run(out, *flags):
        return redsr.main(["eval", "--ckpt", str(smoke_ckpt), "--data", "Tiny", "--data-root", str(tiny_bench_root),
                           "--out-dir", str(tmp_path / out), "--device", "cpu", *flags])
    whole = run("whole")
    assert run("cover", "--tile", "16") == whole  # LR is 12x16: one tile covers it, so exactly the same metrics
    small = run("small", "--tile", "8", "--tile-overlap", "2")  # E sees one 10x10 tile (padded to 24) at a time
    assert small[-1]["n"] == 16 and np.isfinite(small[-1]["psnr"]) and small[-1]["psnr"] != whole[-1]["psnr"]
    assert "ReDSR tile8 x4 gaussian8 Tiny" in (tmp_path / "small" / "results.md").read_text()
    with pytest.raises(SystemExit, match="^2$"):  # argparse usage error: expected int >= 0
        run("bad", "--tile", "-1")


def test_eval_with_channels_last_gives_the_same_scores(smoke_ckpt, tiny_bench_root, tmp_path):
    run = ["eval", "--ckpt", str(smoke_ckpt), "--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu"]
    plain, nhwc = (redsr.main([*run, "--out-dir", str(tmp_path / f"e{n}"), *flag])
                   for n, flag in enumerate(([], ["--channels-last"])))
    assert len(plain) > 2 and [r["psnr"] for r in nhwc] == pytest.approx([r["psnr"] for r in plain], abs=1e-4)


def test_wrong_scale_and_foreign_checkpoints(smoke_ckpt, tiny_hr_dir, tiny_bench_root, tmp_path):
    bench = ["--data", "Tiny", "--data-root", str(tiny_bench_root), "--device", "cpu", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"^error: .* is a x4 model .* --scale 2 was given: use --scale 4$"):
        redsr.main(["eval", "--ckpt", str(smoke_ckpt), "--scale", "2", *bench])
    with pytest.raises(SystemExit, match=r"error: .* x4 model .*--scale 3"):
        redsr.main(["embed", "--ckpt", str(smoke_ckpt), "--scale", "3", *bench])
    assert not (tmp_path / "results.csv").exists()  # refused before running anything
    common.save_checkpoint(other := tmp_path / "other.pt", {"script": "kdsr", "stage": "teacher", "step": 1,
                                                            "config": {}, "model": {}})
    common.save_checkpoint(wrong_stage := tmp_path / "stage.pt", {"script": "redsr", "stage": "x", "step": 1})
    train = ["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path)]
    for argv, message in (
            (["eval", "--ckpt", str(other), *bench], "written by kdsr.py, not redsr.py"),
            ([*train, "--resume", str(other)], "written by kdsr.py, not redsr.py"),
            (["eval", "--ckpt", str(wrong_stage), *bench], "is a 'x' checkpoint; expected stage joint"),
            ([*train, "--resume", str(wrong_stage)], "is a 'x' checkpoint; expected stage joint"),
            (["eval", "--official-weights", str(smoke_ckpt), *bench], "written by redsr.py, not released .* --ckpt")):
        with pytest.raises(SystemExit, match="^error: .*" + message) as info:
            redsr.main(argv)
        assert "\n" not in str(info.value)


def test_torchrun_two_ranks_agree(tiny_hr_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "redsr", "train", *SMOKE, "--data-dir", str(tiny_hr_dir),
           "--out-dir", str(out), "--steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in records) == [0, 1] and all(r["world"] == 2 for r in records)
    assert all(r["models"] >= 1 and r["ranks_agree"] for r in records)
    assert records[0]["checksum"] == records[1]["checksum"]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]  # no stray temp file
    assert [r["step"] for r in log_records(out)] == [1, 2, 3]  # rank 0 alone logs
    ckpt = common.load_checkpoint(out / "last.pt", "redsr", ["joint"])
    ranks = ckpt["rng"]["ranks"]  # rank 0 wrote both ranks' RNG states: --resume continues each rank exactly
    assert ckpt["step"] == 3 and len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_line_budget():
    assert len((REPO / "redsr.py").read_text().splitlines()) <= 1000


def test_eval_on_real_set5_with_bicubic_reference(tiny_hr_dir, bench_root, tmp_path):
    redsr.main(["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path), "--steps", "1"])
    summary = redsr.main(["eval", "--ckpt", str(tmp_path / "last.pt"), "--data", "Set5", "--data-root",
                          str(bench_root), "--protocol", "bicubic", "--limit", "1", "--out-dir", str(tmp_path),
                          "--device", "cpu"])
    assert summary[-1]["n"] == 1 and np.isfinite(summary[-1]["psnr"])
    rows = (tmp_path / "results.csv").read_text().splitlines()
    bicubic = [r for r in rows if r.startswith("bicubic") and ",mean," in r]
    assert float(bicubic[0].split(",")[3]) == pytest.approx(31.7867, abs=1e-3)  # Set5 baby, protocol.md Sec. 6


def torchrun(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_train_probe.py"), "redsr", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_compute_the_run_of_one(tiny_hr_dir, tmp_path):
    """Global batch 4: the energy distance sees all 4 representations (gathered with their gradients) and every item
    its own degradation, so 2 processes x 2 train the network 1 process x 4 does; a resume may change the count."""
    train = [*SMOKE, "--degradation", "aniso_noise", "--data-dir", str(tiny_hr_dir), "--batch-size", "4"]
    one = torch.load(redsr.main(["train", *train, "--steps", "3", "--out-dir", str(tmp_path / "one")]),
                     weights_only=True)["model"]
    torchrun(tmp_path, *train, "--steps", "3", "--out-dir", str(tmp_path / "two"))
    redsr.main(["train", *train, "--steps", "2", "--out-dir", str(tmp_path / "mixed")])
    torchrun(tmp_path, *train, "--steps", "3", "--out-dir", str(tmp_path / "mixed"), "--resume")
    for run in ("two", "mixed"):
        state = torch.load(tmp_path / run / "last.pt", weights_only=True)["model"]
        for key, value in one.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=f"{run}: {key}")
    l_ed = [log_records(tmp_path / run)[-1]["l_ed"] for run in ("one", "two")]
    assert l_ed[1] == pytest.approx(l_ed[0], rel=1e-5)          # the whole batch's energy distance on rank 0 too


def test_no_augment_keeps_crops_as_they_are(tmp_path):
    from conftest import synthetic_image
    Image.fromarray(img := synthetic_image(4, 64, 64)).save(tmp_path / "one.png")
    data = common.HRPatches(tmp_path, 64, crops_per_item=2, augment="")
    assert all(torch.equal(c, torch.from_numpy(img).permute(2, 0, 1).float() / 255) for i in range(6) for c in data[i])
    assert not all(torch.equal(a, b) for i in range(6) for a, b in zip(data[i], common.HRPatches(tmp_path, 64, 2)[i]))
    assert redsr.config_from_args(redsr.build_parser().parse_args(["train", "--data-dir", "d", "--no-augment"])).augment \
        is False


def test_resume_refuses_flags_that_differ_from_the_checkpoint(tiny_hr_dir, tmp_path):
    run = ["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--out-dir", str(tmp_path)]
    redsr.main([*run, "--steps", "1"])
    with pytest.raises(SystemExit, match=r"^error: --resume continues .* drop --degradation aniso_noise \(checkpoint: "
                                         r"iso\), --no-ed \(checkpoint: True\)$"):
        redsr.main([*run, "--steps", "2", "--degradation", "aniso_noise", "--no-ed", "--resume"])


# ---- fast paths: the same math -----------------------------------------------------------------------------
def previous_da_conv(conv: redsr.DAConv, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """DAConv.forward as it was before it called dynamic_depthwise: the grouped conv written out, out + attention."""
    b, c, h, w = x.shape
    kernels = conv.kernel(z).view(b * c, 1, 3, 3)
    x_pad, pad = (F.pad(x, (1,) * 4, mode="reflect"), 0) if conv.reflect else (x, 1)
    out = F.conv2d(x_pad.reshape(1, b * c, *x_pad.shape[-2:]), kernels, padding=pad, groups=b * c)
    out = conv.conv(conv.prelu(out.view(b, c, h, w)))
    return out + x * conv.attention(z[:, :, None, None])


@pytest.mark.parametrize("batch, reflect", [(1, False), (3, False), (1, True), (3, True)])
def test_da_conv_equals_the_previous_formula_in_value_and_gradient(batch, reflect):
    torch.manual_seed(0)
    conv = redsr.DAConv(8, reduction=4, reflect=reflect)
    x, z = torch.randn(batch, 8, 7, 9, requires_grad=True), torch.randn(batch, 8, requires_grad=True)
    outs = [conv(x, z), previous_da_conv(conv, x, z)]
    assert torch.equal(outs[0], outs[1])                       # eager on CPU: the same grouped conv, bit for bit
    grad_out, inputs = torch.randn_like(outs[0]), (x, z, *conv.parameters())
    for got, expected in zip(*(torch.autograd.grad(out, inputs, grad_out) for out in outs)):
        assert torch.equal(got, expected)
    weight = torch.randn(batch, 8, 3, 3)                      # the tap-by-tap form (compiled on CUDA): equal too
    torch.testing.assert_close(redsr.dynamic_depthwise(x, weight, reflect, taps=True),
                               redsr.dynamic_depthwise(x, weight, reflect, taps=False))


def test_compiled_training_equals_eager(tiny_hr_dir, tmp_path):
    run = ["train", *SMOKE, "--data-dir", str(tiny_hr_dir), "--steps", "2"]
    eager, compiled = (redsr.main([*run, "--out-dir", str(tmp_path / name), *flag])
                       for name, flag in (("eager", []), ("compiled", ["--compile"])))
    assert [r["loss"] for r in log_records(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in log_records(tmp_path / "eager")], rel=1e-5)
    states = [torch.load(path, weights_only=True)["model"] for path in (eager, compiled)]
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)
