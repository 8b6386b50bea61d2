"""Speed benchmark (not collected by pytest): training ms/step at the paper's patch size and inference time at a
180x320 LR input, per method and stage, on CPU and, when present, CUDA (fp32, and bf16 + channels_last).

    python tests/bench_speed.py --out bench.md                       # everything available on this machine
    python tests/bench_speed.py --only kdsr --devices cuda --batch paper
    python tests/bench_speed.py --only kdsr --stages "real-world teacher" "real-world student" student-gan --batch 2

Each script runs through its own CLI with `--preset paper --steps N`, so the numbers include data loading,
the on-device degradation and the optimiser step; ms/step is read from its log.jsonl (the first step, warm-up,
is dropped). Inference is timed around the network call inside `common.run_benchmark` (3 runs after a warm-up).

Side by side, to measure a change (numbers from different runs are never compared):

    python tests/bench_speed.py --compare 397cc35 --out compare.md   # CPU batch 2 (+ CUDA at the paper's batch)
    python tests/bench_speed.py --compare HEAD~3 --only kdsr mrda --batch 1 --repeats 3
    python tests/bench_speed.py --compare 397cc35 --devices cuda --precision fp32 bf16 --variants channels-last compile
    python tests/bench_speed.py --compare                             # the working tree against a copy of itself
    python tests/bench_speed.py --profile --only redsr                # where each row's time goes (conv share)

--compare REV loads, in one process, the working tree's scripts and the top-level *.py of git revision REV, or of
folder REV on a machine without the git history (`git archive 397cc35 | tar -x -C old`; each revision's scripts
bound to its own common.py), builds the same networks in both with the same weights (REV's state
dicts loaded strictly into the working tree's), and calls each row's step alternately REV, tree, REV, tree, ...:
`--warmup` untimed calls, then the median of `--repeats`. A row is one training step through the script's own step
function (forward, loss, backward, optimiser step; seeded random tensors of the paper's patch size, `--batch`) or one
inference on a 180x320 LR image. ratio = REV ms / tree ms: > 1 means the working tree is faster. The first calls of
the two sides see the same weights and inputs, so their outputs and gradients must agree: the table gives the max
|difference| and flags a row beyond the precision's tolerance (relative to the output's scale: fp32 1e-4, CUDA fp32
with TF32 2e-3, bf16 3e-2) or whose step changed its inputs in place; the exit status is then 1. `--variants`
adds rows where only the working tree's networks run channels_last and/or torch.compile'd. Without REV, the working
tree is compared with a copy of itself: the ratio's noise floor on this machine. On a CPU shared with other jobs,
`--threads 1` keeps a step from waiting on a descheduled thread (2 threads on 2 busy cores: steps 100x slower).
"""
import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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


def cli_speeds(args) -> None:
    """The end-to-end mode: every script through its CLI."""
    args.batch, args.out = args.batch or "paper", args.out or "bench.md"
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


# ---- side by side: the working tree against a git revision, in one process ---------------------------------
SCRIPTS = ("kdsr", "mrda", "redsr", "pdm_sr", "craft_dist")
WORKTREE = "."                                  # --compare with no revision: the working tree against a copy of itself
INFER_LR = (180, 320)                           # LR height, width of the inference rows
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-3, "bf16": 3e-2}   # max |difference| / max |reference| that still agrees
VARIANTS = ("channels-last", "compile", "channels-last+compile")


@dataclasses.dataclass
class Side:
    """One revision's half of a row, built by a row builder from that revision's script."""
    call: object                      # () -> tensor compared between the sides: one train step or one inference
    nets: dict                        # every module whose state the sides share: REV's loaded strictly into the tree's
    optimizers: list = dataclasses.field(default_factory=list)  # their gradients are compared before the first step
    compiled: list | None = None      # modules whose forward the row calls, for the compile variant (None: every net)


@dataclasses.dataclass
class Ctx:
    device: torch.device
    amp: bool                         # bf16 autocast (CUDA), passed to the scripts' own `amp` arguments


def update(loss: torch.Tensor, optimizer) -> None:
    """The scripts' update after their step functions: zero_grad, backward, optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def trainable_adam(net: nn.Module, learning_rate: float, betas, **kwargs) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=learning_rate, betas=betas, **kwargs)


def step_randoms(mod, cfg, batch: int, device: torch.device):
    """() -> the k-th call's common.StepRandom(seed, k, batch), as the scripts' training loops draw a step's random
    numbers (outside the networks, so a compiled network sees the same ones), on one process."""
    steps = itertools.count(1)
    return lambda: mod.common.StepRandom(cfg.seed, next(steps), batch, mod.common.Dist(), device)


def inference(mod, model: nn.Module, ctx: Ctx, forward, compiled: list | None = None) -> Side:
    """One inference as the scripts' eval sr_fn: no grad, the revision's own autocast, a float32 output."""
    model.eval()

    @torch.no_grad()
    def call():
        with mod.common.autocast(ctx.device, ctx.amp):
            return forward().float()
    return Side(call, {"model": model}, compiled=compiled)


# Input shapes per row: {name: shape} from the config and the batch. Inference: one 180x320 LR image.
def infer_shapes(cfg, batch: int) -> dict:
    return {"img_lr": (1, 3, *INFER_LR)}


def lr_hr_shapes(cfg, batch: int) -> dict:
    p, s = cfg.lr_patch, cfg.scale
    return {"img_lr": (batch, 3, p, p), "img_hr": (batch, 3, s * p, s * p)}


def redsr_shapes(cfg, batch: int) -> dict:
    pair = lr_hr_shapes(cfg, batch)
    return {"img1_lr": pair["img_lr"], "img1_hr": pair["img_hr"], "img2_lr": pair["img_lr"], "img2_hr": pair["img_hr"]}


def pdm_shapes(cfg, batch: int) -> dict:
    return {"img_hr": (batch, 3, cfg.hr_patch, cfg.hr_patch), "img_real": (batch, 3, cfg.lr_patch, cfg.lr_patch)}


def craft_shapes(cfg, batch: int) -> dict:
    p = cfg.hr_patch
    return {"img_lr": (batch, 3, p // cfg.scale, p // cfg.scale), "img_hr": (batch, 3, p, p)}


# Row builders: (script module, its Config, inputs on the device, ctx) -> Side; the same code for both revisions,
# through each revision's own functions.
def kdsr_adam(cfg, net: nn.Module) -> torch.optim.Adam:                 # the optimiser of kdsr._training_state
    return trainable_adam(net, cfg.learning_rate, (cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


def kdsr_teacher_train(kdsr, cfg, x: dict, ctx: Ctx) -> Side:
    net = kdsr.build_model(cfg, teacher=True).to(ctx.device)
    optimizer = kdsr_adam(cfg, net)

    def call():
        loss, _, img_sr = kdsr.teacher_step(net, x["img_lr"], x["img_hr"], ctx.amp, ctx.device)
        update(loss, optimizer)
        return img_sr
    return Side(call, {"net": net}, [optimizer])


def kdsr_student_train(kdsr, cfg, x: dict, ctx: Ctx) -> Side:
    teacher = kdsr.build_model(cfg, teacher=True).to(ctx.device).eval().requires_grad_(False)
    net = kdsr.build_model(cfg, teacher=False).to(ctx.device)
    optimizer = kdsr_adam(cfg, net)

    def call():
        loss, _, img_sr = kdsr.student_step(net, teacher, x["img_lr"], x["img_hr"], cfg, ctx.amp, ctx.device, False)
        update(loss, optimizer)
        return img_sr
    return Side(call, {"net": net, "teacher": teacher}, [optimizer], compiled=[net, teacher.E])  # teacher.estimate


def kdsr_student_infer(kdsr, cfg, x: dict, ctx: Ctx) -> Side:
    model = kdsr.build_model(cfg, teacher=False).to(ctx.device)

    def forward():                                            # kdsr.evaluate's sr_fn, whole image
        d, _ = model.estimate(x["img_lr"])
        return model.G(x["img_lr"], d)
    return inference(kdsr, model, ctx, forward, compiled=[model.E, model.G])


def mrda_teacher_train(mrda, cfg, x: dict, ctx: Ctx) -> Side:
    mln = mrda.frozen_mln(mrda.build_mln(cfg).state_dict(), cfg, ctx.device)     # theta_M, adapted per batch
    net = mrda.build_model(cfg, teacher=True).to(ctx.device)
    optimizer = trainable_adam(net, cfg.learning_rate, (cfg.beta1, cfg.beta2))   # mrda.fit's optimiser

    def call():                       # mrda.train_teacher's classic step_fn (L_rec) on a given LR batch + fit's update
        d_prime = mrda.teacher_representation(mln, x["img_lr"], x["img_hr"], cfg)
        with mrda.common.autocast(ctx.device, ctx.amp):
            img_sr, _ = net(x["img_lr"], d_prime)
        update(mrda.reconstruction_loss(img_sr, x["img_hr"]), optimizer)
        return img_sr
    return Side(call, {"net": net, "mln": mln}, [optimizer], compiled=[net])  # the MLN runs by functional_call


def mrda_student_infer(mrda, cfg, x: dict, ctx: Ctx) -> Side:
    model = mrda.build_model(cfg, teacher=False).to(ctx.device)
    return inference(mrda, model, ctx, lambda: model(x["img_lr"])[0])          # mrda.evaluate's blind_sr


def redsr_train(redsr, cfg, x: dict, ctx: Ctx) -> Side:
    model = redsr.build_model(cfg).to(ctx.device)
    optimizer = trainable_adam(model, cfg.learning_rate, (cfg.beta1, cfg.beta2), eps=1e-8)  # as redsr._fit_joint
    batch = tuple(x[k] for k in ("img1_lr", "img1_hr", "img2_lr", "img2_hr"))
    rnd = step_randoms(redsr, cfg, batch[0].shape[0], ctx.device)

    def call():                       # rnd: the energy distance's prior samples
        loss, _ = redsr.training_step(model, batch, cfg, ctx.device, ctx.amp, rnd())
        update(loss, optimizer)
        return loss.detach()
    return Side(call, {"model": model}, [optimizer])


def redsr_infer(redsr, cfg, x: dict, ctx: Ctx) -> Side:
    model = redsr.build_model(cfg).to(ctx.device)
    return inference(redsr, model, ctx, lambda: model.super_resolve(x["img_lr"]), [model.encoder, model.generator])


def pdm_train(pdm_sr, cfg, x: dict, ctx: Ctx) -> Side:
    nets, opts, _ = pdm_sr.build_training(cfg, "joint", None, None, ctx.device)
    rnd = step_randoms(pdm_sr, cfg, x["img_hr"].shape[0], ctx.device)

    def call():                       # PDM, D, then SR; rnd: z_k, z_n; no finiteness check
        scalars = pdm_sr.train_step("joint", nets, opts, x["img_hr"], x["img_real"], cfg, ctx.amp, lambda loss: None,
                                    rnd())
        return torch.tensor(list(scalars.values()))
    return Side(call, nets, list(opts.values()))


def pdm_infer(pdm_sr, cfg, x: dict, ctx: Ctx) -> Side:
    model = pdm_sr.build_sr(cfg).to(ctx.device)
    return inference(pdm_sr, model, ctx, lambda: model(x["img_lr"]))


def craft_train(craft_dist, cfg, x: dict, ctx: Ctx) -> Side:
    net, ema, optimizer, scheduler, _ = craft_dist.build_training(cfg, argparse.Namespace(channels_last=False),
                                                                  ctx.device, None)

    def call():                       # craft_dist.train_sr's step on a given LR batch
        with craft_dist.common.autocast(ctx.device, ctx.amp):
            img_sr = net(x["img_lr"])
        update(F.l1_loss(img_sr.float(), x["img_hr"]), optimizer)
        scheduler.step()
        if ema is not None:
            # the script's own ema_update up to a87d3a2, common's since
            (getattr(craft_dist, "ema_update", None) or craft_dist.common.ema_update)(ema, net, cfg.ema_decay)
        return img_sr
    return Side(call, {"net": net, **({"ema": ema} if ema is not None else {})}, [optimizer], compiled=[net])


def craft_infer(craft_dist, cfg, x: dict, ctx: Ctx) -> Side:
    model = craft_dist.build_sr(cfg).to(ctx.device)
    return inference(craft_dist, model, ctx, lambda: model(x["img_lr"]).clamp(0, 1).contiguous())  # run_eval's


TRAIN, INFER = "train step", f"inference {INFER_LR[0]}x{INFER_LR[1]}"
# Gradients that the row's own math makes sensitive to rounding: in PDM-SR's joint step the noise module's last conv
# gets a gradient that moves by 6e-3 of its largest entry when the HR input moves by 1e-7 relative (measured: ReLU
# gates flip), so another layout or compiled kernels move it by ~2e-3; its rows hold the gradients to 1e-2.
GRAD_TOLERANCE = {("pdm_sr", TRAIN): 1e-2}
# (script, stage, what, input shapes, builder)
COMPARE_ROWS = [
    ("kdsr", "teacher", TRAIN, lr_hr_shapes, kdsr_teacher_train),
    ("kdsr", "student", TRAIN, lr_hr_shapes, kdsr_student_train),
    ("kdsr", "student", INFER, infer_shapes, kdsr_student_infer),
    ("mrda", "teacher", TRAIN, lr_hr_shapes, mrda_teacher_train),
    ("mrda", "student", INFER, infer_shapes, mrda_student_infer),
    ("redsr", "joint", TRAIN, redsr_shapes, redsr_train),
    ("redsr", "joint", INFER, infer_shapes, redsr_infer),
    ("pdm_sr", "joint", TRAIN, pdm_shapes, pdm_train),
    ("pdm_sr", "joint", INFER, infer_shapes, pdm_infer),
    ("craft_dist", "sr", TRAIN, craft_shapes, craft_train),
    ("craft_dist", "sr", INFER, infer_shapes, craft_infer),
]


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                       # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def load_revision(rev: str, folder: Path) -> dict:
    """REV's top-level *.py written to `folder` (WORKTREE: the working tree's, copied) and imported as rev_common,
    rev_kdsr, ...: while a script of REV is imported, sys.modules["common"] is REV's common, so each revision's
    scripts bind their own common; the working tree's binding is restored afterwards."""
    if rev == WORKTREE or Path(rev).is_dir():
        for path in (REPO if rev == WORKTREE else Path(rev)).glob("*.py"):
            shutil.copy(path, folder / path.name)
    else:
        for name in git("ls-tree", "-z", "--name-only", rev).decode().split("\0"):
            if name.endswith(".py"):
                (folder / name).write_bytes(git("show", f"{rev}:{name}"))
    tree_common, modules = sys.modules["common"], {}
    try:
        modules["common"] = sys.modules["common"] = import_file("rev_common", folder / "common.py")
        for name in SCRIPTS:
            if (folder / f"{name}.py").exists():
                modules[name] = import_file(f"rev_{name}", folder / f"{name}.py")
    finally:
        sys.modules["common"] = tree_common
    return modules


def describe_revisions(rev: str) -> str:
    try:
        head = git("rev-parse", "--short", "HEAD").decode().strip()
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--", ":(glob)*.py").strip() else ""
    except (OSError, subprocess.CalledProcessError):            # a copy of the scripts without .git
        head, dirty = "unknown: no git history here", ""
    if Path(rev).is_dir() and rev != WORKTREE:
        return f"the working tree (HEAD {head}{dirty}) against the scripts in {rev}"
    if rev == WORKTREE:
        return f"the working tree (HEAD {head}{dirty}) against a copy of itself (the noise floor of the ratio)"
    return f"the working tree (HEAD {head}{dirty}) against {git('log', '-1', '--format=%h (%s)', rev).decode().strip()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat_grads(optimizer) -> torch.Tensor:
    """Every gradient the optimiser is about to apply, in parameter order (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                      for group in optimizer.param_groups for p in group["params"]])


def run_alternating(sides: dict, device: torch.device, warmup: int, repeats: int):
    """REV, tree, REV, tree, ... with the global generator seeded alike before the i-th call of each side. Returns
    ms per timed call, the first call's output and the gradients each optimiser got in that call, per side."""
    times, first, grads = {name: [] for name in sides}, {}, {name: [] for name in sides}
    for i in range(warmup + repeats):
        for name, side in sides.items():
            keep = grads[name].append
            hooks = [opt.register_step_pre_hook(lambda opt, args, kwargs: keep(flat_grads(opt)))
                     for opt in side.optimizers] if i == 0 else []
            torch.manual_seed(i)
            sync(device)
            start = time.perf_counter()
            out = side.call()
            sync(device)
            elapsed = time.perf_counter() - start
            for hook in hooks:
                hook.remove()
            if i == 0:
                first[name] = out.detach().float().cpu().clone()
            if i >= warmup:
                times[name].append(1000 * elapsed)
    return times, first, grads


def difference(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |other - ref|, that / max |ref|); inf when the shapes differ."""
    if ref.shape != other.shape:
        return math.inf, math.inf
    diff = (other - ref).abs().max().item() if ref.numel() else 0.0
    return diff, diff / max(ref.abs().max().item() if ref.numel() else 0.0, 1e-12)


def tolerance(device: torch.device, precision: str) -> float:
    if precision == "bf16":
        return TOLERANCE["bf16"]
    tf32 = device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    return TOLERANCE["tf32" if tf32 else "fp32"]


def build_sides(row, modules: dict, configs: dict, inputs: dict, ctx: Ctx, variant: str) -> dict:
    """Both sides of a row with REV's weights in the tree's networks (strict), then the tree's variant applied."""
    script, _, _, _, build = row
    sides = {}
    for name in ("rev", "tree"):
        torch.manual_seed(0)
        sides[name] = build(modules[name][script], configs[name], inputs[name], ctx)
    rev, tree = sides["rev"], sides["tree"]
    if rev.nets.keys() != tree.nets.keys():
        raise RuntimeError(f"the row builds {sorted(rev.nets)} in REV but {sorted(tree.nets)} in the tree")
    for key, net in rev.nets.items():
        tree.nets[key].load_state_dict(net.state_dict(), strict=True)
    for net in tree.nets.values() if "channels-last" in variant else ():
        net.to(memory_format=torch.channels_last)
    for net in (tree.compiled or tree.nets.values()) if "compile" in variant else ():
        net.compile()                                # in place: the scripts' own calls run the compiled forward
    return sides


def compare_row(result: dict, row, modules: dict, device: torch.device, variant: str, args) -> None:
    """Time one row both ways and check that the first calls agree; fills `result`."""
    script, shapes = row[0], row[3]
    configs = {name: modules[name][script].Config(**(modules[name][script].PRESETS["smoke"] if args.tiny else {}))
               for name in ("rev", "tree")}
    gen = torch.Generator().manual_seed(0)                                      # inputs drawn on the CPU
    originals = {key: torch.rand(shape, generator=gen)
                 for key, shape in shapes(configs["tree"], result["batch"]).items()}
    layouts = {"rev": torch.contiguous_format,
               "tree": torch.channels_last if "channels-last" in variant else torch.contiguous_format}
    inputs = {name: {key: value.to(device, copy=True).contiguous(memory_format=layout)   # each side its own copy
                     for key, value in originals.items()} for name, layout in layouts.items()}
    sides = build_sides(row, modules, configs, inputs, Ctx(device, result["precision"] == "bf16"), variant)
    warmup = max(args.warmup, 2) if "compile" in variant else args.warmup   # compiling takes the first calls
    times, first, grads = run_alternating(sides, device, warmup, args.repeats)
    result["rev_ms"], result["tree_ms"] = (float(np.median(times[name])) for name in ("rev", "tree"))
    result["ratio"] = result["rev_ms"] / result["tree_ms"]
    result["out_abs"], result["out_rel"] = difference(first["rev"], first["tree"])
    if grads["rev"] or grads["tree"]:
        result["grad_rel"] = difference(torch.cat(grads["rev"]), torch.cat(grads["tree"]))[1] \
            if len(grads["rev"]) == len(grads["tree"]) else math.inf
    changed = [name for name in ("rev", "tree")
               if any(not torch.equal(inputs[name][key].cpu(), value) for key, value in originals.items())]
    result["grad_tol"] = max(result["tol"], GRAD_TOLERANCE.get((row[0], row[2]), 0.0))
    limits = ((result["out_rel"], result["tol"]), (result.get("grad_rel", 0.0), result["grad_tol"]))
    over = [f"{value:.1e} > {tol:.0e}" for value, tol in limits if value > tol]
    result["check"] = (f"inputs changed in place ({', '.join(changed)})" if changed
                       else f"DIFFERS: {', '.join(over)}" if over else "ok")


def compare_plan(args) -> list:
    """(device, precision, row, tree variant) in the order they run."""
    rows = [row for row in COMPARE_ROWS
            if (not args.only or row[0] in args.only) and (not args.stages or row[1] in args.stages)]
    plan = []
    for device in args.devices:
        for precision in args.precision:
            if precision == "bf16" and device != "cuda":
                print(f"note: bf16 is autocast on CUDA only, skipped on {device}")
                continue
            plan += [(torch.device(device), precision, row, variant)
                     for row in rows for variant in ["", *args.variants]]
    return plan


def row_batch(script: str, what: str, device: torch.device, size: str | None) -> int:
    """Inference: 1; train: --batch, by default 2 on the CPU and the paper's batch on CUDA."""
    if what == INFER:
        return 1
    size = size or ("paper" if device.type == "cuda" else "2")
    batch = PAPER_BATCH[script] if size == "paper" else int(size)
    if script == "pdm_sr" and batch < 2:
        print("note: pdm_sr trains with batch 2 at least (netK's BatchNorm normalises over the batch of z_k)")
        return 2
    return batch


def ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def sci(value: float | None) -> str:
    return "" if value is None else "0" if value == 0 else f"{value:.1e}"


def summary(result: dict) -> str:
    if "ratio" not in result:
        return result["check"]
    grad = f", rel Δ grad {sci(result['grad_rel'])}" if "grad_rel" in result else ""
    return (f"REV {ms(result['rev_ms'])} ms, tree {ms(result['tree_ms'])} ms, ratio {result['ratio']:.3f}, "
            f"max abs Δ out {sci(result['out_abs'])} (rel {sci(result['out_rel'])}){grad}: {result['check']}")


def tol_text(result: dict) -> str:
    grad = result.get("grad_tol", result["tol"])
    return f"{result['tol']:.0e}" + (f" (grad {grad:.0e})" if grad != result["tol"] else "")


def compare_table(results: list[dict], args, rev_text: str) -> list[str]:
    cpu = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    gpu = torch.cuda.get_device_name() + " | " if "cuda" in args.devices else ""
    machine = f"{gpu}{cpu}, torch {torch.__version__}"
    lines = [f"Speed of {rev_text}, in one process{' (smoke presets)' if args.tiny else ''}.", f"Machine: {machine}",
             f"ms: median of {args.repeats} calls per side after {args.warmup} warm-up call(s) (compile: 2), "
             "alternating REV, tree; ratio = REV ms / tree ms (> 1: the working tree is faster). Train step: forward, "
             "loss, backward, optimiser step at the paper's patch size; inference: one 180x320 LR image.",
             "Δ: first call of each side (same weights, same seeded inputs): max |tree - REV| of the output (SR "
             "image, or the losses where the step returns no image), relative to max |REV|, and of the gradients "
             "before the first optimiser step; tol: relative.", "",
             "| script | stage | row | device | precision | tree variant | batch | REV ms | tree ms | ratio | "
             "max abs Δ out | rel Δ out | rel Δ grad | tol | check |", "|" + "---|" * 15]
    for r in results:
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        cells = [r["script"], r["stage"], r["what"], r["device"], r["precision"], r["variant"], str(r["batch"]),
                 ms(r.get("rev_ms")), ms(r.get("tree_ms")), ratio, sci(r.get("out_abs")), sci(r.get("out_rel")),
                 sci(r.get("grad_rel")), tol_text(r), r["check"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compare(args, rev: str) -> int:
    """The --compare mode; exit status 1 when a row differs beyond its tolerance or fails."""
    tree = {name: importlib.import_module(name) for name in ("common", *SCRIPTS)}
    results, rev_text = [], describe_revisions(rev)
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"rev": load_revision(rev, Path(tmp)), "tree": tree}
        plan = compare_plan(args)
        for i, (device, precision, row, variant) in enumerate(plan, 1):
            script, stage, what = row[:3]
            batch = row_batch(script, what, device, args.batch)
            result = {"script": script, "stage": stage, "what": what, "device": device.type, "precision": precision,
                      "variant": variant or "-", "batch": batch, "tol": tolerance(device, precision)}
            label = " | ".join([f"[{i}/{len(plan)}] {script} {stage} {what}", f"{device.type} {precision}",
                                *([f"tree {variant}"] if variant else []), f"batch {batch}"])
            print(f"{label}: running", flush=True)
            try:
                if script not in modules["rev"]:
                    raise RuntimeError(f"{script}.py is not in {args.compare}")
                compare_row(result, row, modules, device, variant, args)
            except Exception as error:                 # one broken row must not stop the others
                traceback.print_exc()
                result["check"] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if "compile" in variant:
                    torch._dynamo.reset()
            results.append(result)
            print(f"{label}: {summary(result)}", flush=True)
    lines = compare_table(results, args, rev_text)
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if all(r["check"] == "ok" for r in results) else 1


# ---- where a row's time goes ---------------------------------------------------------------------------------
def profile_row(row, tree: dict, device: torch.device, precision: str, batch: int, tiny: bool) -> dict:
    """One call of the working tree's side of a row under torch.profiler, after a warm-up call: self time per op
    (CPU time on the CPU, kernel time on CUDA), the share of convolution ops (forward and backward) and
    1 / share, the most that any change to everything else could gain at the same math."""
    script, _, _, shapes, build = row
    mod = tree[script]
    cfg = mod.Config(**(mod.PRESETS["smoke"] if tiny else {}))
    gen = torch.Generator().manual_seed(0)
    x = {key: torch.rand(shape, generator=gen).to(device) for key, shape in shapes(cfg, batch).items()}
    torch.manual_seed(0)
    side = build(mod, cfg, x, Ctx(device, precision == "bf16"))
    side.call()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        side.call()
        sync(device)
        elapsed = time.perf_counter() - start
    cuda, events = device.type == "cuda", prof.key_averages()
    own = {e.key: e.self_device_time_total if cuda else e.self_cpu_time_total for e in events}   # without children
    within = {e.key: e.device_time_total if cuda else e.cpu_time_total for e in events}          # with its kernels
    total = sum(own.values()) or 1
    conv = sum(within.get(key, 0) for key in ("aten::convolution", "aten::convolution_backward"))
    # the largest other aten op: by its own time on the CPU; on CUDA by the kernels it launched
    ranked = within if cuda else own
    other, other_time = max(((k, ranked[k]) for k in own if k.startswith("aten::") and "conv" not in k),
                            key=lambda item: item[1], default=("-", 0))
    return {"ms": 1000 * elapsed, "conv_share": conv / total, "other": other, "other_share": other_time / total}


def profile(args) -> int:
    """The --profile mode: where each row's time goes, as a markdown table."""
    tree = {name: importlib.import_module(name) for name in ("common", *SCRIPTS)}
    lines = [f"Where the time goes: one profiled call per row, working tree, torch {torch.__version__}, "
             f"CPU threads: {torch.get_num_threads()}{' (smoke presets)' if args.tiny else ''}. conv share: self time "
             "in convolution ops (forward + backward); bound = 1 / conv share: the most a same-math change to "
             "everything else could gain.", "",
             "| script | stage | row | device | precision | batch | ms | conv share | largest other op | bound |",
             "|" + "---|" * 10]
    for device, precision, row, variant in compare_plan(args):
        if variant:
            continue
        script, stage, what = row[:3]
        batch = row_batch(script, what, device, args.batch)
        r = profile_row(row, tree, device, precision, batch, args.tiny)
        lines.append(f"| {script} | {stage} | {what} | {device.type} | {precision} | {batch} | {ms(r['ms'])} | "
                     f"{100 * r['conv_share']:.0f} % | {r['other']} ({100 * r['other_share']:.1f} %) | "
                     f"{1 / max(r['conv_share'], 1e-9):.2f} |")
        print(lines[-1], flush=True)
        gc.collect()
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs="?", const=WORKTREE, metavar="REV",
                        help="side by side against git revision REV (or a folder holding a revision's *.py) in one "
                             "process (no REV: the working tree against a copy of itself); default: off, every "
                             "script through its CLI")
    parser.add_argument("--profile", action="store_true",
                        help="where the time of each --compare row goes in the working tree: the share of "
                             "convolutions and the largest other op (the --compare options select rows)")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="script names (default: all)")
    parser.add_argument("--stages", nargs="+",
                        help="stage labels, e.g. 'real-world teacher' student-gan; --compare: teacher student joint sr "
                             "(default: all)")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                        help="default: cpu, and cuda when present")
    parser.add_argument("--batch", help="'paper' or a number (per process); default: paper, with --compare 2 on the "
                                        "CPU and paper on CUDA")
    parser.add_argument("--steps", type=int, default=4, help="training steps per CLI run (default: 4)")
    parser.add_argument("--out", help="markdown table file (default: bench.md; with --compare none, printed only)")
    parser.add_argument("--repeats", type=int, default=5, help="--compare: timed calls per side (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="--compare: untimed first calls per side, >= 1 "
                                                              "(default: 1; compile: 2 at least)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="--compare: bf16 = autocast on CUDA, both sides (default: fp32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=[],
                        help="--compare: extra rows with the working tree's networks in channels_last and/or "
                             "torch.compile'd, REV as is (default: none)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core; on a machine shared with "
                                                   "other jobs fewer threads avoid waiting on a descheduled one)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke presets: checks the mechanics
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")
    if args.profile:
        sys.exit(profile(args))
    if args.compare is None:
        return cli_speeds(args)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1")
    rev = args.compare
    if rev != WORKTREE and Path(rev).is_dir():
        if not (Path(rev) / "common.py").is_file():
            parser.error(f"--compare {rev}: a folder must hold a revision's top-level scripts (common.py, ...)")
        rev = str(Path(rev).resolve())
    elif rev != WORKTREE:
        try:
            rev = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
        except subprocess.CalledProcessError:
            parser.error(f"--compare {args.compare}: not a commit of {REPO}")
    sys.exit(compare(args, rev))


if __name__ == "__main__":
    main()
