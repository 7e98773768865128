"""DDP with SVD layers, the regularizer and pruning: 2 gloo processes on CPU must match one
process on the concatenated batch, before and after a prune followed by a re-wrap."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import svdkern
from svdkern.distributed import prune_distributed

WORLD = 2
LOCAL_BATCH = 5
STEPS_BEFORE, STEPS_AFTER = 3, 3
ENERGY = 0.2
TIMEOUT_S = 120


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 3))
    return svdkern.decompose(model.double(), scheme="spatial")


def make_data():
    g = torch.Generator().manual_seed(1)
    steps = STEPS_BEFORE + STEPS_AFTER
    x = torch.randn(steps, WORLD * LOCAL_BATCH, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(steps, WORLD * LOCAL_BATCH, 3, generator=g, dtype=torch.float64)
    return x, y


def train(net, module, optimizer, reg, x, y, steps):
    """A few steps of task loss + regularizer; `net` may be the DDP wrapper of `module`."""
    for step in steps:
        optimizer.zero_grad()
        loss = F.mse_loss(net(x[step]), y[step]) + reg()
        loss.backward()
        optimizer.step()


def run_training(rank: int | None):
    """The whole recipe: one process when `rank` is None, else this rank's DDP share."""
    model = make_model()
    x, y = make_data()
    if rank is not None:
        x = x[:, rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        y = y[:, rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reg = svdkern.SVDRegularizer(model, ortho=1.0, sparsity="hoyer", strength=0.05)
    net = DDP(model) if rank is not None else model
    train(net, model, optimizer, reg, x, y, range(STEPS_BEFORE))
    del net  # the old wrapper's hooks and buckets were built for the old shapes
    records = prune_distributed(model, ENERGY, optimizer)
    reg.sparsity = None  # fine-tuning: orthogonality only
    net = DDP(model) if rank is not None else model
    train(net, model, optimizer, reg, x, y, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    return model.state_dict(), [r.rank_after for r in records]


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        torch.set_num_threads(1)
        state, ranks = run_training(rank)
        torch.save({"state": state, "ranks": ranks, "forced": forced_decision(rank)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def forced_decision(rank: int) -> list[int]:
    """Ranks whose local energy rule disagrees still prune as rank 0 decided."""
    model = _flat_spectrum_model() if rank == 1 else make_model()  # rank 1 alone keeps more
    return [r.rank_after for r in prune_distributed(model, ENERGY)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(out_dir: str) -> None:
    """Run `worker` on WORLD processes; fail (never hang) after TIMEOUT_S."""
    context = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_train_prune_rewrap_matches_single_process(tmp_path):
    spawn(str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single_state, single_ranks = run_training(None)
    assert results[0]["ranks"] == results[1]["ranks"] == single_ranks
    full = [layer.rank for _, layer in svdkern.svd_layers(make_model())]
    assert single_ranks != full and min(single_ranks) >= 1  # the prune did something
    for key, value in single_state.items():
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key
        torch.testing.assert_close(results[0]["state"][key], value, rtol=1e-9, atol=1e-11)
    local_rule = [r.rank_after for r in svdkern.prune(_flat_spectrum_model(), ENERGY)]
    assert results[0]["forced"] == results[1]["forced"] != local_rule


def _flat_spectrum_model() -> nn.Module:
    model = make_model()
    with torch.no_grad():
        for _, layer in svdkern.svd_layers(model):
            layer.s.fill_(1.0)
    return model


def test_prune_distributed_rejects_the_ddp_wrapper_and_is_prune_without_a_group():
    model = make_model()
    with pytest.raises(TypeError, match="ddp.module"):
        prune_distributed(DDP.__new__(DDP), ENERGY)
    reference = make_model()
    assert prune_distributed(model, ENERGY) == svdkern.prune(reference, ENERGY)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
