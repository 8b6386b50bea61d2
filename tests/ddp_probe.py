"""Run under `torchrun --nproc_per_node=2`: exercises common's DDP helpers and prints one JSON line per rank;
with `fail-on-rank-1` rank 1 raises instead, and the run must end (not hang in teardown)."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

dist = common.ddp_setup(torch.device("cpu"))
if sys.argv[2:] == ["fail-on-rank-1"]:                      # one rank fails while the other waits in a collective
    try:
        if dist.rank == 1:
            raise RuntimeError("rank 1 failed")
        torch.distributed.all_reduce(torch.ones(1))
    finally:
        common.ddp_teardown(dist)
mean = common.all_reduce_mean(torch.tensor(float(dist.rank + 1)), dist).item()
torch.manual_seed(0)                                        # same initial weights on every rank
model = common.wrap_ddp(torch.nn.Linear(4, 1), dist)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.full((8, 4), float(dist.rank))                    # different data per rank
model(x).pow(2).mean().backward()
optimizer.step()
weights = common.unwrap(model).weight.detach().flatten()
gathered = [torch.zeros_like(weights) for _ in range(dist.world_size)]
torch.distributed.all_gather(gathered, weights)
batch = next(common.infinite_batches(common.HRPatches(sys.argv[1], 16), 2, "cpu", seed=3, workers=0, dist=dist))
batches = [torch.zeros_like(batch) for _ in range(dist.world_size)]
torch.distributed.all_gather(batches, batch)
torch.manual_seed(100 + dist.rank)                          # ranks draw different degradations
states = common.rng_state(dist)                              # collective: every rank's state
expected = torch.rand(3)
common.set_rng_state(states, dist)                           # each rank gets its own state back
rng_per_rank = len(states["ranks"]) == 2 and torch.equal(torch.rand(3), expected)
record = {"rank": dist.rank, "world": dist.world_size, "mean": mean, "rng_per_rank": rng_per_rank,
          "weights_agree": all(torch.equal(g, gathered[0]) for g in gathered),
          "batches_differ": not torch.equal(batches[0], batches[1])}
sys.stdout.flush()
os.write(1, (json.dumps(record) + "\n").encode())       # one write(2): the two ranks' lines never interleave
common.ddp_teardown(dist)
os._exit(0)  # done and torn down: skip the interpreter's C++ teardown (it has aborted a gloo rank under heavy load)
