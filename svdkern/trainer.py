"""`SVDTraining`: the SVD-training schedule of the paper as a callback for any training loop.

It makes no assumption about the optimizer, scheduler or data loader: the loop adds
`penalty()` to its loss and calls `on_epoch_start(epoch)`; the callback switches the
sparsity term on at `sparsity_start`, prunes at `prune_epoch` and then fine-tunes
(sparsity off, orthogonality kept), as in docs/SPEC.md section 1's pipeline.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .pruning import PruneRecord, prune
from .reference import check_energy, check_rank_multiple
from .regularizers import SVDRegularizer


class SVDTraining:
    """Schedule of SVD training over epochs for a model already in SVD form.

    Example::

        hook = SVDTraining(model, strength=0.07, energy=0.01, prune_epoch=30)
        for epoch in range(40):
            hook.on_epoch_start(epoch, optimizer)   # prunes at epoch 30 (slices Adam state)
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + hook.penalty()
                optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(self, model: nn.Module, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 0.07, energy: float = 0.01, prune_epoch: int | None = None,
                 sparsity_start: int = 0, rank_multiple: int = 1) -> None:
        energy = check_energy("SVDTraining", energy)
        check_rank_multiple("SVDTraining", rank_multiple)
        if prune_epoch is not None and prune_epoch < sparsity_start:
            raise ValueError(f"SVDTraining: prune_epoch {prune_epoch} comes before "
                             f"sparsity_start {sparsity_start}")
        self.regularizer = SVDRegularizer(model, ortho, sparsity, strength)
        self.model = model
        self.sparsity = sparsity
        self.energy = energy
        self.rank_multiple = rank_multiple
        self.prune_epoch = prune_epoch
        self.sparsity_start = sparsity_start
        self.records: list[PruneRecord] = []
        self.finetuning = False
        self.regularizer.sparsity = None if sparsity_start > 0 else sparsity

    def on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the schedule for `epoch` (0-based). Pass the optimizer so pruning slices its
        state; without it, rebuild the optimizer after the pruning epoch."""
        if self.prune_epoch is not None and epoch > self.prune_epoch and not self.finetuning:
            self._start_finetuning()  # resumed after the pruning epoch: already pruned
        if not self.finetuning:
            self.regularizer.sparsity = self.sparsity if epoch >= self.sparsity_start else None
        if self.prune_epoch is not None and epoch == self.prune_epoch and not self.finetuning:
            self.prune_now(optimizer)

    def prune_now(self, optimizer: torch.optim.Optimizer | None = None) -> list[PruneRecord]:
        """Prune by the energy rule and switch to fine-tuning (sparsity off, ortho kept)."""
        self.records = prune(self.model, self.energy, optimizer=optimizer,
                             rank_multiple=self.rank_multiple)
        self._start_finetuning()
        return self.records

    def _start_finetuning(self) -> None:
        self.finetuning = True
        self.regularizer.sparsity = None

    def penalty(self) -> Tensor:
        """The regularizer to add to the task loss (zero when every term is off)."""
        if self.regularizer.adds_nothing():
            return torch.zeros((), device=next(self.model.parameters()).device)
        return self.regularizer()
