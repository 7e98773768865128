"""DDP and FSDP with SVD layers, the regularizer and pruning: 2 gloo processes on CPU must
match one process on the concatenated batch, before and after a prune and a re-wrap."""
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
from svdkern import WithRegularizer, prune_distributed

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None

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


def train(net, optimizer, x, y, steps):
    """A few steps of task loss + regularizer; `net` returns both (WithRegularizer)."""
    for step in steps:
        optimizer.zero_grad()
        out, reg = net(x[step])
        (F.mse_loss(out, y[step]) + reg).backward()
        optimizer.step()


def local_share(rank: int | None):
    """The whole batches for one process (`rank` None), else this rank's slice."""
    x, y = make_data()
    if rank is None:
        return x, y
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[:, part], y[:, part]


def regularized(model, sparsity="hoyer"):
    return WithRegularizer(model, svdkern.SVDRegularizer(model, ortho=1.0, sparsity=sparsity,
                                                         strength=0.05))


def run_ddp(rank: int | None):
    """DDP recipe: prune the bare module (optimizer state sliced), then wrap it again."""
    model = make_model()
    x, y = local_share(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    wrap = (lambda m: DDP(m)) if rank is not None else (lambda m: m)  # noqa: E731
    net = wrap(regularized(model))
    train(net, optimizer, x, y, range(STEPS_BEFORE))
    del net  # the old wrapper's hooks and buckets were built for the old shapes
    records = prune_distributed(model, ENERGY, optimizer)
    net = wrap(regularized(model, sparsity=None))  # fine-tuning: orthogonality only
    train(net, optimizer, x, y, range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    return model.state_dict(), [r.rank_after for r in records]


def run_fsdp(rank: int | None):
    """FSDP recipe: the regularizer runs inside the sharded forward; pruning runs on an
    unsharded copy made from the full state dict, which is then sharded again with a new
    optimizer (sharded optimizer state is not carried across the prune)."""
    def shard(module):
        if rank is not None:
            fully_shard(module)
        return module

    def full_state(net):
        state = {k.removeprefix("model."): v for k, v in net.state_dict().items()}
        return {k: v.full_tensor() if rank is not None else v for k, v in state.items()}

    x, y = local_share(rank)
    net = shard(regularized(make_model()))
    train(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), x, y,
          range(STEPS_BEFORE))
    model = make_model()
    model.load_state_dict(full_state(net))
    records = prune_distributed(model, ENERGY)
    net = shard(regularized(model, sparsity=None))
    train(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), x, y,
          range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER))
    return full_state(net), [r.rank_after for r in records]


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        torch.set_num_threads(1)
        result = {"ddp": run_ddp(rank), "forced": forced_decision(rank)}
        if fully_shard is not None:
            result["fsdp"] = run_fsdp(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
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


GLOO = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Both recipes run once on 2 gloo processes; each rank's results."""
    out_dir = tmp_path_factory.mktemp("ddp")
    spawn(str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_ranks_agree_with_one_process(results, single):
    (state0, ranks0), (state1, ranks1) = results
    single_state, single_ranks = single
    assert ranks0 == ranks1 == single_ranks
    full = [layer.rank for _, layer in svdkern.svd_layers(make_model())]
    assert single_ranks != full and min(single_ranks) >= 1  # the prune did something
    assert state0.keys() == single_state.keys()
    for key, value in single_state.items():
        assert torch.equal(state0[key], state1[key]), key
        torch.testing.assert_close(state0[key], value, rtol=1e-9, atol=1e-11)


@GLOO
def test_ddp_train_prune_rewrap_matches_single_process(rank_results):
    assert_ranks_agree_with_one_process([r["ddp"] for r in rank_results], run_ddp(None))


@GLOO
@pytest.mark.skipif(fully_shard is None, reason="torch.distributed.fsdp.fully_shard missing")
def test_fsdp_train_prune_reshard_matches_single_process(rank_results):
    assert_ranks_agree_with_one_process([r["fsdp"] for r in rank_results], run_fsdp(None))


@GLOO
def test_prune_distributed_applies_the_source_ranks_decision(rank_results):
    local_rule = [r.rank_after for r in svdkern.prune(_flat_spectrum_model(), ENERGY)]
    source_rule = [r.rank_after for r in svdkern.prune(make_model(), ENERGY)]
    assert rank_results[0]["forced"] == rank_results[1]["forced"] == source_rule != local_rule


def _flat_spectrum_model() -> nn.Module:
    model = make_model()
    with torch.no_grad():
        for _, layer in svdkern.svd_layers(model):
            layer.s.fill_(1.0)
    return model


def test_prune_distributed_rejects_the_ddp_wrapper_and_prunes_by_hand_rule_without_a_group():
    """Without a process group it keeps, per layer, the ranks the energy rule gives by hand
    on a designed spectrum, and the factors of the largest singular values."""
    with pytest.raises(TypeError, match="ddp.module"):
        prune_distributed(DDP.__new__(DDP), ENERGY)
    model = make_model()
    # (s, kept rank at ENERGY = 0.2): drop the smallest s_j^2 while their sum <= 0.2 * total
    designed = {"3": ([1.0, 5.0, 2.0, 4.0, 3.0, 0.5, 0.25], 3),     # total 55.3125, drop 5.3125
                "5": ([3.0, 1.0, 2.0], 2),                          # total 14, drop 1
                "0": ([6.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], 1)}  # rank 1 left
    before = {}
    with torch.no_grad():
        for name, layer in svdkern.svd_layers(model):
            values = torch.tensor(designed[name][0], dtype=layer.s.dtype)
            layer.s.copy_(values[:layer.s.shape[-1]].expand_as(layer.s))
            before[name] = (layer.U.clone(), layer.s.clone(), layer.V.clone())
    records = prune_distributed(model, ENERGY)
    assert [r.rank_after for r in records] == [designed[n][1] for n, _ in svdkern.svd_layers(model)]
    for name, layer in svdkern.svd_layers(model):
        U, s, V = before[name]
        keep = torch.sort(torch.argsort(s.reshape(-1, s.shape[-1])[0], descending=True)
                          [:designed[name][1]]).values
        torch.testing.assert_close(layer.s, s[..., keep], rtol=0, atol=0)
        torch.testing.assert_close(layer.U, U[..., keep], rtol=0, atol=0)
        torch.testing.assert_close(layer.V, V[..., keep], rtol=0, atol=0)
