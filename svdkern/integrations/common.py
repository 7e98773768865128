"""What the trainer callbacks share: their settings, checked when the callback is built (not
at the first step of a long run), and the `SVDTraining` schedule they drive."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..methods.svd_training import SVDRegularizer, SVDTraining
from ..reference import check_prune_rule, check_rank_multiple

DEFAULT_ENERGY = 0.01  # SVDTraining's


@dataclass(frozen=True)
class CallbackSettings:
    """SVD-training settings of a trainer callback: the regularizer (`ortho`, `sparsity`,
    `strength`), the pruning rule (`energy` or `threshold`, at most one; energy 0.01 when
    neither) and when to prune (`prune_step`: after that optimizer step; `prune_epoch`: at the
    start of that 0-based epoch; neither: never). After the prune, fine-tuning keeps the
    orthogonality term and drops sparsity."""

    ortho: float = 1.0
    sparsity: str | None = "hoyer"
    strength: float = 0.07
    energy: float | None = None
    threshold: float | None = None
    prune_step: int | None = None
    prune_epoch: int | None = None
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        SVDRegularizer.check_settings(self.ortho, self.sparsity, self.strength)
        if self.energy is not None or self.threshold is not None:
            check_prune_rule("SVDTrainingCallback", self.energy, self.threshold)
        check_rank_multiple("SVDTrainingCallback", self.rank_multiple)
        if self.prune_step is not None and self.prune_epoch is not None:
            raise ValueError("SVDTrainingCallback: give at most one of prune_step and prune_epoch")
        for label in ("prune_step", "prune_epoch"):
            value = getattr(self, label)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"SVDTrainingCallback: {label} must be an integer >= 0, "
                                 f"got {value!r}")

    def schedule(self, model: nn.Module) -> SVDTraining:
        """The schedule over `model`, which must already be in SVD form (`svdkern.decompose`
        before the trainer is built, so its optimizer holds the factors)."""
        energy = DEFAULT_ENERGY if self.energy is None else self.energy
        return SVDTraining(model, self.ortho, self.sparsity, self.strength, energy,
                           self.prune_epoch, rank_multiple=self.rank_multiple,
                           threshold=self.threshold, prune_step=self.prune_step)


class SettingsCallback:
    """Base of both callbacks (first in their bases): the constructor every callback takes,
    which checks the settings before any training."""

    def __init__(self, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 0.07, energy: float | None = None,
                 threshold: float | None = None, prune_step: int | None = None,
                 prune_epoch: int | None = None, rank_multiple: int = 1) -> None:
        self.settings = CallbackSettings(ortho, sparsity, strength, energy, threshold,
                                         prune_step, prune_epoch, rank_multiple)
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
