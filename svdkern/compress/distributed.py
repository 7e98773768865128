"""Pruning under `torch.distributed`: every rank must drop the same singular values.

Ranks hold the same factors under DDP, but the energy rule compares sums of squares and
a last-bit difference between ranks (different reduction orders, hardware) could flip a
decision; one rank pruning differently breaks DDP (mismatched shapes, or a hang). So the
kept ranks are decided once, on `src`, and broadcast; every rank then applies them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .pruning import PruneRecord, apply_plan, plan


def prune_distributed(model: nn.Module, energy: float | None = None,
                      optimizer: torch.optim.Optimizer | None = None, src: int = 0,
                      group: dist.ProcessGroup | None = None,
                      rank_multiple: int = 1, *, threshold: float | None = None
                      ) -> list[PruneRecord]:
    """`svdkern.prune` for a model replicated on every rank of `group`: the ranks kept in
    each layer are chosen on global rank `src` and broadcast, then applied on every rank.

    Pass the bare module (`ddp.module`), not the DDP wrapper, and wrap it again afterwards
    (the parameters changed shape): `ddp = DistributedDataParallel(ddp.module, ...)`; the new
    wrapper also broadcasts `src`'s parameter values. `optimizer` is sliced, `rank_multiple`
    rounds the kept ranks and `threshold` replaces the energy rule as in `prune`.
    Without an initialized process group this is `svdkern.prune`.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("prune_distributed: pass ddp.module, then wrap it again in "
                        "DistributedDataParallel (pruning changes parameter shapes)")
    plans = plan(model, energy, rank_multiple, threshold=threshold)
    if dist.is_available() and dist.is_initialized():
        plans = [(name, layer, index) for (name, layer, _), index
                 in zip(plans, _broadcast_indices(plans, src, group))]
    return apply_plan(plans, optimizer)


def _broadcast_indices(plans, src: int, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """`src`'s per-layer (g, k) kept-rank indices on every rank: first the counts k, then
    the indices, each on its layer's device (so NCCL works too)."""
    device = plans[0][1].s.device
    counts = torch.tensor([index.shape[-1] for _, _, index in plans], dtype=torch.int64,
                          device=device)
    dist.broadcast(counts, src=src, group=group)
    out = []
    for (_, layer, index), k in zip(plans, counts.tolist()):
        device = layer.s.device
        buf = (index.to(device) if dist.get_rank() == src
               else torch.empty((layer.num_groups, k), dtype=torch.int64, device=device))
        dist.broadcast(buf, src=src, group=group)
        out.append(buf)
    return out
