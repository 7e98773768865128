"""What the trainer callbacks share: their settings, checked when the callback is built (not
at the first step of a long run), and the `SVDTraining` schedule they drive."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..methods.svd_training import SVDRegularizer, SVDTraining
from ..reference import (check_precision, check_prune_rule, check_prune_schedule,
                         check_rank_multiple)


@dataclass(frozen=True)
class CallbackSettings:
    """SVD-training settings of a trainer callback: the regularizer (`ortho`, `sparsity`,
    `strength`), the pruning rule (`energy` or `threshold`, at most one; energy 0.01 when
    neither) and when to prune (`prune_step`: after that optimizer step; `prune_epoch`: at the
    start of that 0-based epoch; neither: never; `prune_step=0` prunes before the first
    step), and the orthogonality term's `precision` (`SVDRegularizer`). After the prune,
    fine-tuning keeps the orthogonality term and drops sparsity."""

    ortho: float = 1.0
    sparsity: str | None = "hoyer"
    strength: float = 0.07
    energy: float | None = None
    threshold: float | None = None
    prune_step: int | None = None
    prune_epoch: int | None = None
    rank_multiple: int = 1
    precision: str | None = None

    def __post_init__(self) -> None:
        """SVDTraining's own checks, run here with no model (it is bound when training
        starts)."""
        who = "SVDTrainingCallback"
        SVDRegularizer.check_settings(self.ortho, self.sparsity, self.strength)
        if self.energy is not None or self.threshold is not None:
            check_prune_rule(who, self.energy, self.threshold)
        check_rank_multiple(who, self.rank_multiple)
        check_prune_schedule(who, self.prune_epoch, self.prune_step)
        check_precision(who, self.precision)

    @property
    def prunes(self) -> bool:
        return self.prune_step is not None or self.prune_epoch is not None

    def schedule(self, model: nn.Module) -> SVDTraining:
        """The schedule over `model`, which must already be in SVD form (`svdkern.decompose`
        before the trainer is built, so its optimizer holds the factors). Pruning under a
        multi-process run is refused here, before any step: it changes the shapes of
        parameters that the trainer's DDP/FSDP wrapper holds, and every rank must prune
        alike (train there without pruning, then `svdkern.prune_distributed` and wrap
        again)."""
        if self.prunes and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            raise RuntimeError("SVDTrainingCallback: pruning inside a distributed run "
                               f"({dist.get_world_size()} processes) would change parameter "
                               "shapes under the trainer's DDP/FSDP wrapper; train with "
                               "prune_step=None and prune_epoch=None, then prune with "
                               "svdkern.prune_distributed and wrap the model again")
        return SVDTraining(model, self.ortho, self.sparsity, self.strength, self.energy,
                           self.prune_epoch, rank_multiple=self.rank_multiple,
                           threshold=self.threshold, prune_step=self.prune_step,
                           precision=self.precision)


class SettingsCallback:
    """Base of both callbacks (first in their bases): the constructor every callback takes,
    which checks the settings before any training."""

    def __init__(self, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 0.07, energy: float | None = None,
                 threshold: float | None = None, prune_step: int | None = None,
                 prune_epoch: int | None = None, rank_multiple: int = 1,
                 precision: str | None = None) -> None:
        self.settings = CallbackSettings(ortho, sparsity, strength, energy, threshold,
                                         prune_step, prune_epoch, rank_multiple, precision)
        self.training: SVDTraining | None = None  # bound to the model when training starts
        super().__init__()


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), whose state pruning slices."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            raise TypeError(f"SVDTrainingCallback: cannot find the torch optimizer inside "
                            f"{type(optimizer).__name__}")
        optimizer = inner
    return optimizer
