"""Run a script's `train` under `torchrun --nproc_per_node=2` and report whether the ranks agree.

    torchrun --standalone --nproc_per_node=2 tests/ddp_train_probe.py kdsr train --stage teacher ...

Every model the script hands to `common.wrap_ddp` is remembered; when the script tears the process group
down, each rank prints one JSON line with a checksum of those models' parameters and whether the checksums
of all ranks are identical (DDP must keep the replicas bit-equal after every optimiser step).
"""
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

wrapped = []
wrap_ddp, ddp_teardown = common.wrap_ddp, common.ddp_teardown


def recording_wrap(model, dist, *args, **kwargs):
    wrapped.append(model)
    return wrap_ddp(model, dist, *args, **kwargs)


def checking_teardown(dist):
    flat = torch.cat([p.detach().float().flatten().cpu() for m in wrapped for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, flat)
    record = {"rank": dist.rank, "world": dist.world_size, "models": len(wrapped),
              "checksum": float(flat.double().sum()), "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)}
    sys.stdout.flush()
    os.write(1, (json.dumps(record) + "\n").encode())   # one write(2): the two ranks' lines never interleave
    ddp_teardown(dist)


common.wrap_ddp, common.ddp_teardown = recording_wrap, checking_teardown
try:
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
except SystemExit as stop:                               # an `error:` line, or 128 + signal: pass its status on
    sys.stderr.write(f"{stop.code}\n" if isinstance(stop.code, str) else "")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(stop.code if isinstance(stop.code, int) else 1)
# The run is over and its process group torn down: leave without the interpreter's C++ teardown, which under heavy
# load has aborted a gloo rank ("terminate called without an active exception") after all its work was done.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
