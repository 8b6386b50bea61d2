"""Speed benchmark (not collected by pytest): training ms/step at the paper's patch size and inference time at a
180x320 LR input, per method and stage, on CPU and, when present, CUDA (fp32, and bf16 + channels_last).

    python tests/bench_speed.py --out bench.md                       # everything available on this machine
    python tests/bench_speed.py --only kdsr --devices cuda --batch paper
    python tests/bench_speed.py --only kdsr --stages "real-world teacher" "real-world student" student-gan --batch 2

Each script runs through its own CLI with `--preset paper --steps N`, so the numbers include data loading,
the on-device degradation and the optimiser step; ms/step is read from its log.jsonl (the first step, warm-up,
is dropped). Inference is timed around the network call inside `common.run_benchmark` (3 runs after a warm-up).
"""
import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import common  # noqa: E402
from conftest import synthetic_image  # noqa: E402  (conftest pins one thread for the tests)

torch.set_num_threads(os.cpu_count() or 1)

# (script, stage label, train argv after `train`, checkpoint the next entries may use as {name}, eval argv or None)
# Stages are listed in hand-off order; "{lr}" is a folder of 128x128 "real" LR images (PDM-SR's unpaired input).
PLAN = [
    ("kdsr", "teacher", ["--stage", "teacher"], "kdsr_t", None),
    ("kdsr", "student", ["--stage", "student", "--teacher-ckpt", "{kdsr_t}"], "kdsr_s", ["--ckpt", "{kdsr_s}"]),
    ("kdsr", "real-world teacher", ["--stage", "teacher", "--degradation", "realesrgan"], "kdsr_rt", None),
    ("kdsr", "real-world student", ["--stage", "student", "--teacher-ckpt", "{kdsr_rt}"], "kdsr_rs", None),
    ("kdsr", "student-gan", ["--stage", "student-gan", "--student-ckpt", "{kdsr_rs}", "--vgg-weights", "{vgg}"],
     "kdsr_g", ["--ckpt", "{kdsr_g}"]),
    ("mrda", "pretrain", ["--stage", "pretrain"], "mrda_p", None),
    ("mrda", "meta", ["--stage", "meta", "--pretrain-ckpt", "{mrda_p}"], "mrda_m", None),
    ("mrda", "teacher", ["--stage", "teacher", "--meta-ckpt", "{mrda_m}"], "mrda_t", None),
    ("mrda", "student", ["--stage", "student", "--teacher-ckpt", "{mrda_t}"], "mrda_s", ["--ckpt", "{mrda_s}"]),
    ("redsr", "joint", [], "redsr", ["--ckpt", "{redsr}"]),
    ("craft_dist", "sr", [], "craft", ["--ckpt", "{craft}", "--settings"]),
    ("pdm_sr", "joint", ["--lr-dir", "{lr}"], "pdm", ["--ckpt", "{pdm}"]),
]
PAPER_BATCH = {"kdsr": 64, "redsr": 16, "craft_dist": 16, "mrda": 16, "pdm_sr": 32}  # specs; mrda pretrain 64
REALWORLD_BATCH = 48                                       # KDSR's real-world stages (Sec. 4.1)


def degradation_rate(device: str, batch: int, repeats: int = 5) -> float:
    """Samples/s of common.realesrgan_degrade on (batch, 3, 400, 400) GT crops (median of `repeats` after a warm-up)."""
    img_gt, opts, times = torch.rand(batch, 3, 400, 400, device=device), common.RealESRGANOptions(), []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        common.realesrgan_degrade(img_gt, opts)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[1:]))


def timed_benchmark(repeats: int, results: list):
    """Wrap common.run_benchmark so the network call is timed (warm-up + `repeats` runs, synchronised)."""
    original = common.run_benchmark

    def run_benchmark(sr_fn, *args, **kwargs):
        if getattr(sr_fn, "__qualname__", "").startswith("bicubic_sr"):      # the reference row: not timed
            return original(sr_fn, *args, **kwargs)

        def timed(img_lr):
            out = sr_fn(img_lr)                                               # warm-up
            times = []
            for _ in range(repeats):
                if img_lr.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = sr_fn(img_lr)
                if img_lr.is_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results.append(1000 * float(np.median(times)))
            return out
        return original(timed, *args, **kwargs)
    return run_benchmark


def run_plan(plan, device: str, batch: str, steps: int, amp: bool, root: Path) -> list[dict]:
    rows, ckpts = [], {"lr": str(root / "lr"), "vgg": str(root / "vgg19.pth")}
    data, bench = root / "data", root / "bench"
    for name, stage, train_argv, key, eval_argv in plan:
        module = importlib.import_module(name)
        out = root / "runs" / f"{name}-{stage}-{device}-{amp}"
        flags = ["--device", device, "--workers", "2", "--log-every", "1"] + (["--amp", "--channels-last"] if amp else [])
        real = stage.startswith("real-world") or stage == "student-gan"
        paper_batch = REALWORLD_BATCH if real else PAPER_BATCH[name]
        size = ["--batch-size", str(paper_batch if batch == "paper" else int(batch))]
        argv = [a.format(**ckpts) for a in ["train", *train_argv, "--preset", "paper", "--data-dir", str(data),
                                            "--steps", str(steps), "--out-dir", str(out), *size, *flags]]
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.stdout", "w") as log, contextlib.redirect_stdout(log):
            module.main(argv)
        records = [json.loads(line) for line in open(out / "log.jsonl")]
        ms = float(np.median([r["ms_per_it"] for r in records[1:]] or [records[0]["ms_per_it"]]))
        ckpts[key] = str(out / "last.pt")
        row = {"method": name, "stage": stage, "device": device, "precision": "bf16+CL" if amp else "fp32",
               "batch": size[1], "train_ms_per_step": ms, "infer_ms_180x320": None}
        if eval_argv is not None:
            times = []
            original = common.run_benchmark
            common.run_benchmark = timed_benchmark(3, times)
            try:
                with open(out / "eval.stdout", "w") as log, contextlib.redirect_stdout(log):
                    module.main([a.format(**ckpts) for a in ["eval", *eval_argv, "--data", str(bench), "--protocol",
                                                             "bicubic", "--out-dir", str(out), *flags[:2], *flags[6:]]])
            finally:
                common.run_benchmark = original
            row["infer_ms_180x320"] = times[0] if times else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="script names")
    parser.add_argument("--stages", nargs="+", help="stage labels, e.g. 'real-world teacher' student-gan")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--batch", default="paper", help="'paper' or a number (per process)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="bench.md")
    args = parser.parse_args()
    plan = [p for p in PLAN if (not args.only or p[0] in args.only) and (not args.stages or p[1] in args.stages)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        (root / "bench").mkdir()
        (root / "lr").mkdir()
        torch.save(importlib.import_module("kdsr").VGG19Features().state_dict(), root / "vgg19.pth")  # random
        for i in range(4):
            Image.fromarray(synthetic_image(i, 512, 512)).save(root / "data" / f"{i}.png")
            Image.fromarray(synthetic_image(20 + i, 128, 128)).save(root / "lr" / f"{i}.png")
        Image.fromarray(synthetic_image(9, 720, 1280)).save(root / "bench" / "hd.png")   # LR 180x320 at x4
        rows = [r for device in args.devices for amp in ([False, True] if device == "cuda" else [False])
                for r in run_plan(plan, device, args.batch, args.steps, amp, root)]
    machine = (torch.cuda.get_device_name() if "cuda" in args.devices else "") + \
        f" | CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"Machine: {machine}", "", "| method | stage | device | precision | batch | train ms/step | "
             "inference ms (180x320 LR) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        infer = "" if r["infer_ms_180x320"] is None else f"{r['infer_ms_180x320']:.0f}"
        lines.append(f"| {r['method']} | {r['stage']} | {r['device']} | {r['precision']} | {r['batch']} | "
                     f"{r['train_ms_per_step']:.0f} | {infer} |")
    if not args.only or "kdsr" in args.only:
        for device in args.devices:
            batch = REALWORLD_BATCH if args.batch == "paper" else int(args.batch)
            lines.append(f"\nReal-ESRGAN degradation ({device}, batch {batch}, 400x400 GT -> 100x100 LR): "
                         f"{degradation_rate(device, batch):.1f} samples/s")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
