"""common.py: protocol numbers (README, Evaluation protocol), primitives, errors, checkpoints, DDP."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import REPO, synthetic_image

ORACLE = REPO.parent / "shared" / "specs" / "oracle"  # optional cross-check: the recipe below is the reference


# ---- Metrics ----------------------------------------------------------------------------------------------
def oracle_recipe():
    """Regenerate the oracle pairs exactly as protocol.md §6.1 describes (BGR order, then reversed)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    b = np.clip(np.round(a + rng.normal(0, 10, a.shape)), 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    s = np.round(np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 5),
                           128 + 60 * np.sin((x + y) / 9)], axis=-1)).astype(np.uint8)
    t = np.clip(np.round(s + rng.normal(0, 5, s.shape)), 0, 255).astype(np.uint8)
    return {k: v[..., ::-1].copy() for k, v in dict(a=a, b=b, s=s, t=t).items()}


ORACLE_TABLE = [("a", "b", 4, 33.1471134361, 0.9907064602, 28.2903523947),
                ("a", "b", 0, 33.1245326179, 0.9909123428, 28.2995192545),
                ("s", "t", 4, 39.1466997862, 0.9639819276, 34.2414420654),
                ("s", "t", 0, 39.1154078385, 0.9666538706, 34.2099138874)]


def test_oracle_recipe_pixel_sums():
    pairs = oracle_recipe()
    assert {k: int(v.sum(dtype=np.int64)) for k, v in pairs.items()} == \
        {"a": 880017, "b": 880126, "s": 1668852, "t": 1669503}


@pytest.mark.parametrize("first, second, crop, psnr, ssim, psnr_rgb", ORACLE_TABLE)
def test_metrics_match_basicsr_oracle(first, second, crop, psnr, ssim, psnr_rgb):
    pairs = oracle_recipe()
    if ORACLE.is_dir():                                       # the stored files equal the recipe
        for name in (first, second):
            assert np.array_equal(np.load(ORACLE / f"pair_{name}_rgb.npy"), pairs[name])
    assert common.psnr_y(pairs[first], pairs[second], crop) == pytest.approx(psnr, abs=1e-6)
    assert common.ssim_y(pairs[first], pairs[second], crop) == pytest.approx(ssim, abs=1e-6)
    assert common.psnr_y(pairs[first], pairs[second], crop, rgb=True) == pytest.approx(psnr_rgb, abs=1e-6)


def test_rgb_ssim_is_the_mean_of_the_channels_ssim():
    pairs = oracle_recipe()
    gray = lambda img, c: np.repeat(img[..., c:c + 1], 3, axis=2)                 # noqa: E731  channel c, 3 times
    per_channel = [common.ssim_y(gray(pairs["s"], c), gray(pairs["t"], c), 4, rgb=True) for c in range(3)]
    assert len(set(per_channel)) == 3
    assert common.ssim_y(pairs["s"], pairs["t"], 4, rgb=True) == pytest.approx(np.mean(per_channel), abs=1e-12)


def test_identical_images_and_shape_mismatch():
    img = synthetic_image(0, 40, 40)
    assert common.psnr_y(img, img, 4) == math.inf
    assert common.ssim_y(img, img, 4) == 1.0
    with pytest.raises(common.UserError, match="differ in shape"):
        common.psnr_y(img, img[:-1], 4)
    with pytest.raises(common.UserError, match="differ in shape"):
        common.ssim_y(img, img[:, :-1], 0)


# ---- Kernels, blur, resize, noise -------------------------------------------------------------------------
def test_kernel_values_and_normalisation():
    iso = common.isotropic_kernels(torch.tensor([1.8, 2.6, 3.2]))
    assert iso[:, 10, 10].tolist() == pytest.approx([0.04912190, 0.02354591, 0.01557316], abs=1e-7)
    aniso = common.anisotropic_kernels(3.5, 1.5, math.radians(30))[0]
    assert [aniso[10, 10].item(), aniso[10, 13].item(), aniso[13, 10].item()] == \
        pytest.approx([0.03033748, 0.01396946, 0.00617524], abs=1e-7)
    sigmas = torch.rand(16) * 3.8 + 0.2
    kernels = common.anisotropic_kernels(sigmas, torch.rand(16) * 3.8 + 0.2, torch.rand(16) * math.pi)
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(16), atol=1e-6)
    assert torch.allclose(common.anisotropic_kernels(sigmas, sigmas, torch.rand(16) * math.pi),
                          common.isotropic_kernels(sigmas), atol=1e-7)


def test_per_sample_blur_equals_loop_and_delta_is_identity():
    torch.manual_seed(0)
    img = torch.rand(5, 3, 24, 30)
    kernels = common.anisotropic_kernels(torch.rand(5) * 3 + 0.2, torch.rand(5) * 3 + 0.2, torch.rand(5) * 3)
    batched = common.blur(img, kernels)
    for i in range(5):
        padded = torch.nn.functional.pad(img[i:i + 1], (10, 10, 10, 10), mode="reflect")
        single = torch.nn.functional.conv2d(padded, kernels[i].expand(3, 1, 21, 21), groups=3)
        assert torch.allclose(batched[i:i + 1], single, atol=1e-6)
    delta = torch.zeros(21, 21)
    delta[10, 10] = 1
    assert torch.equal(common.blur(img, delta), img)


def test_resize_weights_and_sizes():
    down = common._resize_matrix(64, 0.25, "cpu")
    row = down[8][down[8] != 0]
    assert row.tolist() == pytest.approx([-0.001709, -0.010986, -0.018311, -0.011963, 0.022705, 0.097412,
                                          0.181885, 0.240967, 0.240967, 0.181885, 0.097412, 0.022705,
                                          -0.011963, -0.018311, -0.010986, -0.001709], abs=2e-6)
    up = common._resize_matrix(16, 4.0, "cpu")
    assert up[30][up[30] != 0].tolist() == pytest.approx([-0.047852, 0.963867, 0.090820, -0.006836], abs=2e-6)
    img = torch.rand(2, 3, 255, 97)
    assert common.imresize(img, 1 / 3).shape == (2, 3, 85, 33)
    assert common.imresize(img, 4).shape == (2, 3, 1020, 388)
    assert torch.allclose(common.imresize(torch.full((1, 3, 20, 20), 0.3), 0.25), torch.tensor(0.3), atol=1e-6)


def test_seeded_benchmark_lr_is_reproducible():
    hr = common.modcrop(synthetic_image(5, 50, 46), 4)
    assert hr.shape == (48, 44, 3)
    _, params = common.test_degradations("aniso_noise", 4)[12]               # kernel 4, noise 10
    first = common.benchmark_lr(hr, params, 4, "Set5/x")
    assert torch.equal(first, common.benchmark_lr(hr, params, 4, "Set5/x"))
    assert not torch.equal(first, common.benchmark_lr(hr, params, 4, "Set5/y"))
    assert first.shape == (1, 3, 12, 11) and torch.equal(first, common.quantize(first))


# ---- Benchmark numbers on the real Set5/Set14 (protocol.md §6) --------------------------------------------
def mean_row(rows):
    return [r for r in common.summarize(rows) if r["degradation"] == "mean"][0]


@pytest.mark.parametrize("data, psnr, ssim", [("Set5", 28.4314, 0.8113), ("Set14", 26.0918, 0.7050)])
def test_bicubic_x4_reference(bench_root, data, psnr, ssim):
    row = mean_row(common.run_benchmark(common.bicubic_sr(4), data, "bicubic", 4, bench_root))
    assert row["psnr"] == pytest.approx(psnr, abs=1e-4) and row["ssim"] == pytest.approx(ssim, abs=1e-4)


def test_bicubic_x2_set5_reference(bench_root):
    row = mean_row(common.run_benchmark(common.bicubic_sr(2), "Set5", "bicubic", 2, bench_root))
    assert row["psnr"] == pytest.approx(33.6818, abs=1e-4) and row["ssim"] == pytest.approx(0.9305, abs=1e-4)


@pytest.mark.parametrize("data, psnr, ssim", [("Set5", 25.8692, 0.7301), ("Set14", 24.2983, 0.6253)])
def test_gaussian8_x4_bicubic_reference(bench_root, data, psnr, ssim):
    row = mean_row(common.run_benchmark(common.bicubic_sr(4), data, "gaussian8", 4, bench_root))
    assert row["n"] == 8 * {"Set5": 5, "Set14": 14}[data]
    assert row["psnr"] == pytest.approx(psnr, abs=1e-4) and row["ssim"] == pytest.approx(ssim, abs=1e-4)


def test_aniso_noise_free_kernels_set14(bench_root):
    expected = [25.3813, 25.2340, 24.1179, 23.9564, 24.0090, 23.8972, 23.6956, 23.3088, 22.9461]
    _, files = common.find_benchmark("Set14", bench_root)
    degradations = common.test_degradations("aniso_noise", 4)[:9]             # noise 0
    for (label, params), psnr in zip(degradations, expected):
        scores = []
        for path in files:
            hr = common.modcrop(common.load_uint8(path), 4)
            lr = common.benchmark_lr(hr, params, 4, f"Set14/{path.stem}")
            scores.append(common.psnr_y(common.to_uint8(common.imresize(lr, 4)), hr, 4))
        assert np.mean(scores) == pytest.approx(psnr, abs=1e-4), label


def test_baseline_cli_prints_table_and_writes_results(bench_root, tmp_path, capsys):
    common.main(["baseline", "--data", "Set5", "--protocol", "gaussian8", "--data-root", str(bench_root),
                 "--out-dir", str(tmp_path), "--limit", "1"])
    out = capsys.readouterr().out
    assert "sigma=1.80" in out and "sigma=3.20" in out and "mean" in out
    assert (tmp_path / "results.csv").read_text().startswith("method,set,degradation,psnr,ssim,psnr_rgb,ssim_rgb,lpips,n,model,limit,date")
    assert "| Set5 | mean |" in (tmp_path / "results.md").read_text()


# ---- Image IO and datasets --------------------------------------------------------------------------------
def test_load_image_modes(tmp_path):
    rgb = synthetic_image(1, 8, 8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.zeros((8, 8), np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(common.load_uint8(tmp_path / "gray.png"), np.repeat(rgb[..., :1], 3, axis=2))
    assert np.array_equal(common.load_uint8(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(common.load_uint8(tmp_path / "deep.png"), np.repeat(rgb[..., 1:2], 3, axis=2))
    img = common.load_image(tmp_path / "rgba.png")
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32 and img.max() <= 1
    common.save_image(img, tmp_path / "out" / "copy.png")
    assert np.array_equal(common.load_uint8(tmp_path / "out" / "copy.png"), rgb)


def test_patch_stream_is_deterministic_and_resumable(tiny_hr_dir):
    data = common.HRPatches(tiny_hr_dir, 32)
    assert len(data.files) == 4 and all(img.dtype == np.uint8 for img in data.images)
    stream = common.infinite_batches(data, 3, "cpu", seed=7, workers=0)
    batches = [next(stream) for _ in range(4)]
    assert batches[0].shape == (3, 3, 32, 32) and not torch.equal(batches[0], batches[1])
    resumed = common.infinite_batches(common.HRPatches(tiny_hr_dir, 32), 3, "cpu", seed=7, start_step=2, workers=2)
    assert torch.equal(next(resumed), batches[2]) and torch.equal(next(resumed), batches[3])
    pairs = common.HRPatches(tiny_hr_dir, 32, crops_per_item=2)[0]
    assert pairs.shape == (2, 3, 32, 32) and not torch.equal(pairs[0], pairs[1])


# ---- Bad input: one clear line ----------------------------------------------------------------------------
def cli_error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        common.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input_messages(tmp_path, tiny_bench_root):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    assert "not found" in cli_error(["baseline", "--data", str(tmp_path / "missing" / "x")])
    assert "no images" in cli_error(["baseline", "--data", str(tmp_path / "empty")])
    assert "no images" in cli_error(["baseline", "--data", str(tmp_path / "text")])
    message = cli_error(["baseline", "--data", "Set6", "--data-root", str(tiny_bench_root)])
    assert "Set5, Set14, B100, Urban100, Manga109" in message and "<Set>/HR/*.png" in message
    assert "scales 2, 3, 4" in cli_error(["baseline", "--data", "Tiny", "--data-root", str(tiny_bench_root),
                                          "--scale", "5"])
    with pytest.raises(common.UserError, match="smaller than the 128x128"):
        common.HRPatches(tiny_bench_root, 128)
    with pytest.raises(common.UserError, match="does --scale 2 match"):
        common.run_benchmark(common.bicubic_sr(4), "Tiny", "bicubic", 2, tiny_bench_root)
    (tmp_path / "text" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(common.UserError, match="cannot read image .*broken.png"):
        common.HRPatches(tmp_path / "text", 8)


# ---- Checkpoints, logging, results ------------------------------------------------------------------------
def test_checkpoint_round_trip_and_checks(tmp_path):
    path = tmp_path / "run" / "last.pt"
    common.seed_everything(3)
    payload = {"script": "kdsr", "stage": "teacher", "step": 5, "model": {"w": torch.randn(3)},
               "config": {"lr": 1e-4, "sizes": [1, 2]}, "rng": common.rng_state()}
    common.save_checkpoint(path, payload)
    draw = torch.rand(2)
    loaded = common.load_checkpoint(path, "kdsr", stages=("teacher",))
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"]) and loaded["config"] == payload["config"]
    common.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(2), draw)
    with pytest.raises(common.UserError, match="written by kdsr.py, not mrda.py"):
        common.load_checkpoint(path, "mrda")
    with pytest.raises(common.UserError, match="'teacher' checkpoint; expected stage student"):
        common.load_checkpoint(path, "kdsr", stages=("student",))
    with pytest.raises(common.UserError, match="checkpoint not found"):
        common.load_checkpoint(tmp_path / "nope.pt", "kdsr")
    torch.save({"G.head.0.weight": torch.zeros(1)}, tmp_path / "official.pth")
    with pytest.raises(common.UserError, match="--official-weights"):
        common.load_checkpoint(tmp_path / "official.pth", "kdsr")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_checkpoint(path, {"script": "kdsr", "step": 1})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"script": "kdsr", "step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path, "kdsr")["step"] == 1


def test_runlog_and_results_files(tmp_path, capsys):
    log = common.RunLog(tmp_path, total_steps=10)
    log.log(5, "teacher", loss=0.5, lr=2e-4)
    line = capsys.readouterr().out
    assert line.startswith("[teacher] step 5/10 | loss 0.5000 | lr 2.00e-04 |") and "ms/it | ETA" in line
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert record["loss"] == 0.5 and record["step"] == 5
    rows = [{"set": "Set5", "degradation": "mean", "psnr": 30.0, "ssim": 0.9, "n": 5}]
    common.report(rows, "ours", tmp_path, "runs/a/last.pt (step 10)")
    common.report(rows, "bicubic", tmp_path, limit=2)
    common.report([{**rows[0], "psnr_rgb": 28.0, "ssim_rgb": 0.8}], "ours rgb", tmp_path)
    out = capsys.readouterr().out
    assert "set        degradation    PSNR (Y) SSIM (Y)    n\nSet5       mean            30.0000   0.9000    5" in out
    assert "PSNR (Y) SSIM (Y) PSNR RGB SSIM RGB    n\nSet5       mean            30.0000   0.9000  28.0000   0.8000" in out
    lines = (tmp_path / "results.csv").read_text().splitlines()
    today = __import__("time").strftime("%Y-%m-%d")
    assert [line.rsplit(",", 1)[0] for line in lines] == [  # each row: what was scored, --limit, then the date
        "method,set,degradation,psnr,ssim,psnr_rgb,ssim_rgb,lpips,n,model,limit",
        "ours,Set5,mean,30.0,0.9,,,,5,runs/a/last.pt (step 10),", "bicubic,Set5,mean,30.0,0.9,,,,5,,2",
        "ours rgb,Set5,mean,30.0,0.9,28.0,0.8,,5,,"] and all(line.split(",")[-1].startswith(today) for line in lines[1:])
    # a results.csv written before the model/limit/date columns is rewritten with them, its rows kept
    (old := tmp_path / "old").mkdir()
    (old / "results.csv").write_text("method,set,degradation,psnr,ssim,psnr_rgb,ssim_rgb,n\nx,Set5,mean,1.0,0.5,,,5\n")
    common.report(rows, "ours", old)
    assert [line.split(",")[:4] for line in (old / "results.csv").read_text().splitlines()] == [
        ["method", "set", "degradation", "psnr"], ["x", "Set5", "mean", "1.0"], ["ours", "Set5", "mean", "30.0"]]
    md = (tmp_path / "results.md").read_text()
    assert md.count("| Set5 | mean | 30.0000 | 0.9000 | 5 |") == 2 and "| Set5 | mean | 30.0000 | 0.9000 | 28.0000 | 0.8000 | 5 |" in md


def test_tiled_inference_equals_whole_image():
    img_lr = torch.rand(1, 3, 37, 53)
    whole = common.imresize(img_lr, 4)                            # bicubic x4: a local operator (2 px support)
    for tile, overlap in ((8, 4), (16, 2), (64, 4)):
        assert torch.allclose(common.tiled(common.bicubic_sr(4), 4, tile, overlap)(img_lr), whole, atol=1e-5)
    calls = []
    common.tiled(lambda x: calls.append(x.shape) or torch.zeros(1, 3, 2 * x.shape[-2], 2 * x.shape[-1]), 2, 16, 4)(
        img_lr)
    assert len(calls) == 3 * 4 and max(max(shape[-2:]) for shape in calls) <= 16 + 2 * 4
    assert common.tiled(common.bicubic_sr(4), 4, 0) is not None


def test_stop_signal_and_finite_check():
    import signal
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt), common.stop_on_signals() as flag:
        assert not common.stop_requested(flag, common.Dist(), "cpu")
        os.kill(os.getpid(), signal.SIGTERM)                        # handled: the process goes on
        assert common.stop_requested(flag, common.Dist(), "cpu") and flag["signal"] == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)                         # a second signal interrupts at once
        pytest.fail("not interrupted")
    assert {s: signal.getsignal(s) for s in previous} == previous   # handlers restored
    common.check_finite(torch.tensor(0.5), 3, "last.pt")
    with pytest.raises(common.UserError, match="loss became nan at step 7.*last good checkpoint is runs/last.pt"):
        common.check_finite(torch.tensor(float("nan")), 7, "runs/last.pt")


def test_device_and_autocast():
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="no CUDA device"):
            common.pick_device("cuda")
    with common.autocast(torch.device("cpu"), True):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_torchrun_two_processes_all_reduce(tiny_hr_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "tests" / "ddp_probe.py"), str(tiny_hr_dir)],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in records) == [0, 1]
    for record in records:
        assert record["world"] == 2 and record["mean"] == 1.5
        assert record["weights_agree"] and record["batches_differ"] and record["rng_per_rank"]


def test_torchrun_one_rank_failing_ends_the_run(tiny_hr_dir):
    """The rank that raises leaves the group at once (no teardown barrier), so the waiting rank errors out too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "tests" / "ddp_probe.py"), str(tiny_hr_dir), "fail-on-rank-1"],
                            capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode != 0 and "rank 1 failed" in result.stderr


def test_a_set_is_named_alike_by_name_folder_or_hr_folder(tiny_bench_root):
    """The set name seeds every noisy test image: Tiny, <root>/Tiny and <root>/Tiny/HR give identical rows."""
    spellings = ["Tiny", str(tiny_bench_root / "Tiny"), str(tiny_bench_root / "Tiny" / "HR")]
    runs = [common.run_benchmark(common.bicubic_sr(4), data, "aniso_noise", 4, tiny_bench_root, limit=1)
            for data in spellings]
    assert runs[0] == runs[1] == runs[2] and {r["set"] for r in runs[2]} == {"Tiny"}


def test_basicsr_benchmark_layout_and_hidden_files(tmp_path):
    """Set5/GTmod12 + Set5/LRbicx4: only the GT images are scored; hidden files and folders are never images."""
    from PIL import Image
    for folder, size in (("GTmod12", 48), ("LRbicx4", 12)):
        (tmp_path / "Set5" / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(synthetic_image(i, size, size)).save(tmp_path / "Set5" / folder / f"im{i}.png")
    (tmp_path / "Set5" / "GTmod12" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(synthetic_image(9, 48, 48)).save(tmp_path / "Set5" / "GTmod12" / ".ipynb_checkpoints" / "im0.png")
    (tmp_path / "Set5" / "GTmod12" / "._im0.png").write_bytes(b"AppleDouble")
    name, files = common.find_benchmark(tmp_path / "Set5")
    assert name == "Set5" and [f.name for f in files] == ["im0.png", "im1.png"]
    assert common.find_benchmark("Set5", tmp_path)[1] == files
    rows = common.run_benchmark(common.bicubic_sr(4), tmp_path / "Set5", "bicubic", 4)
    assert len(rows) == 2 and all(r["set"] == "Set5" for r in rows)
    (tmp_path / "Set5" / "GT").mkdir()
    with pytest.raises(common.UserError, match="holds both GTmod12 and GT"):
        common.find_benchmark(tmp_path / "Set5")
    (tmp_path / "only_subfolders" / "a").mkdir(parents=True)
    with pytest.raises(common.UserError, match=r"no images in .*only_subfolders .*found folders: a\)"):
        common.find_benchmark(tmp_path / "only_subfolders")


def test_empty_truncated_and_foreign_checkpoints_say_what_they_are(tmp_path):
    (empty := tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(common.UserError, match=r"empty\.pt is empty \(0 bytes\)"):
        common.load_checkpoint(empty, "kdsr")
    common.save_checkpoint(good := tmp_path / "good.pt", {"script": "kdsr", "stage": "teacher", "x": torch.zeros(999)})
    (cut := tmp_path / "cut.pt").write_bytes(good.read_bytes()[:500])
    (text := tmp_path / "text.pt").write_text("not a checkpoint at all")
    for path in (cut, text):
        with pytest.raises(common.UserError, match=rf"{path.name} is corrupt, truncated or not a torch file"):
            common.load_checkpoint(path, "kdsr")
    torch.save({"weight": torch.zeros(3)}, official := tmp_path / "official.pt")
    with pytest.raises(common.UserError, match="not a checkpoint of these scripts"):
        common.load_checkpoint(official, "kdsr")
    with pytest.raises(common.UserError, match=r"empty\.pt is empty \(0 bytes\): expected a VGG"):
        common.read_weights(empty, "a VGG")


def test_aniso_noise_is_x4_only_and_bad_images_stop_an_eval_before_it_starts(tiny_bench_root, tmp_path):
    with pytest.raises(common.UserError, match="aniso_noise is defined for x4 only"):
        common.test_degradations("aniso_noise", 3)
    import shutil
    shutil.copytree(tiny_bench_root / "Tiny", tmp_path / "Tiny")
    (tmp_path / "Tiny" / "HR" / "z_broken.png").write_bytes(b"\x89PNG cut")
    calls = []
    with pytest.raises(common.UserError, match=r"cannot read image .*z_broken\.png"):
        common.run_benchmark(lambda x: calls.append(1) or common.imresize(x, 4), "Tiny", "bicubic", 4, tmp_path)
    assert calls == []                                    # refused before the first (good) image was scored
    (blocked := tmp_path / "file").write_text("")
    with pytest.raises(common.UserError, match="cannot write to"):
        common.writable_dir(blocked / "out")


def test_hr_patches_pad_small_images_and_flip_only_as_asked(tmp_path):
    """Real-ESRGAN loaders: an image smaller than the crop is reflect-padded (REFLECT_101) bottom/right; "h" flips only
    horizontally."""
    from PIL import Image
    img = synthetic_image(3, 80, 100)
    Image.fromarray(img).save(tmp_path / "small.png")
    data = common.HRPatches(tmp_path, 128, augment="", pad_small=True)
    padded = np.pad(img, ((0, 48), (0, 28), (0, 0)), mode="reflect")         # numpy reflect = cv2 REFLECT_101
    assert all(torch.equal(data[i], torch.from_numpy(padded).permute(2, 0, 1).float() / 255) for i in range(3))
    flips = common.HRPatches(tmp_path, 64, augment="h")
    crops = [flips[i] for i in range(40)]
    assert all(not torch.equal(c, c.transpose(-1, -2)) for c in crops)      # never transposed (a square crop)
    with pytest.raises(common.UserError, match=r"small\.png is 100x80, smaller than the 200x200 HR training patch can "
                                               r"be padded from \(101 px a side\)"):
        common.HRPatches(tmp_path, 200, pad_small=True)


def test_unwrap_gives_the_plain_module_back_from_under_compile():
    net = torch.nn.Linear(2, 2)
    wrapped = common.compiled(net, True)                       # built lazily: nothing is compiled until a call
    assert common.unwrap(wrapped) is net and common.unwrap(net) is net
    assert [n for n, _ in wrapped.named_parameters()] == ["_orig_mod.weight", "_orig_mod.bias"]  # why unwrap is needed
    assert common.compiled(net, False) is net
