"""SVD training (Yang et al. 2020; docs/SPEC.md section 1): the regularizer over a model's
SVD layers, its schedule as a callback for any training loop, and the wrapper that runs the
regularizer inside the forward for FSDP.

`SVDTraining` makes no assumption about the optimizer, scheduler or data loader: the loop
adds `penalty()` to its loss and calls `on_epoch_start(epoch)`; the callback switches the
sparsity term on at `sparsity_start`, prunes at `prune_epoch` and then fine-tunes
(sparsity off, orthogonality kept), as in docs/SPEC.md section 1's pipeline.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..compress.pruning import PruneRecord, prune
from ..layers import svd_layers
from ..reference import (DEFAULT_TRAINING_ENERGY, check_precision, check_prune_rule,
                         check_prune_schedule, check_rank_multiple)

SPARSITY = {"hoyer": ops.hoyer_loss, "hoyer_square": ops.hoyer_square_loss, "l1": ops.l1_loss,
            None: None}


class SVDRegularizer:
    """Calling it returns `ortho * sum L_o(U, V) + strength * sum L_s(s)` over every SVD
    layer of `model` (docs/SPEC.md section 1), a differentiable scalar to add to the task loss.

    Layers are looked up at each call, so the regularizer follows pruning. `sparsity` may be
    set to None later (fine-tuning) but a regularizer that adds nothing is an error.
    `precision` of the orthogonality term's dots for fp32 factors ("ieee", "tf32", "bf16";
    None: TF32 on a GPU, IEEE elsewhere), as `svdkern.ops.orthogonality_loss` takes it
    (docs/SPEC.md section 4 bounds each mode's error).
    """

    def __init__(self, model: nn.Module, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 1e-3, precision: str | None = None) -> None:
        self.check_settings(ortho, sparsity, strength)
        check_precision("SVDRegularizer", precision)
        self.precision = precision
        if not svd_layers(model):
            raise ValueError("SVDRegularizer: the model has no SVD layers (call svdkern.decompose "
                             "first); the regularizer would add nothing")
        self.model = model
        self.ortho = float(ortho)
        self.sparsity = sparsity
        self.strength = float(strength)
        self._check_active()

    @staticmethod
    def check_settings(ortho: float, sparsity: str | None, strength: float) -> None:
        """The constructor's checks of its settings, with no model: a checkpoint's settings
        may have both terms off (fine-tuning after pruning), which only a call refuses."""
        if sparsity not in SPARSITY:
            raise ValueError(f"SVDRegularizer: sparsity must be 'hoyer', 'hoyer_square', 'l1' or "
                             f"None, got {sparsity!r}")
        for label, value in (("ortho", ortho), ("strength", strength)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SVDRegularizer: {label} must be a finite number >= 0, got {value!r}")

    def adds_nothing(self) -> bool:
        """Whether both terms are off (ortho 0, and no sparsity or strength 0)."""
        return self.ortho == 0 and (self.sparsity is None or self.strength == 0)

    def _check_active(self) -> None:
        if self.adds_nothing():
            raise ValueError("SVDRegularizer: both terms are off (ortho=0 and no sparsity); "
                             "the regularizer would add nothing")

    def orthogonality(self) -> Tensor:
        """Unweighted `sum L_o` over every U and V of the model."""
        layers = svd_layers(self.model)
        with _without_autocast(layers):
            return ops.orthogonality_loss([M for _, layer in layers
                                           for M in layer.factor_matrices()], self.precision)

    def sparsity_loss(self) -> Tensor:
        """Unweighted `sum L_s` over every singular-value vector of the model."""
        if self.sparsity is None:
            raise ValueError("SVDRegularizer: sparsity is None")
        layers = svd_layers(self.model)
        with _without_autocast(layers):
            return SPARSITY[self.sparsity]([s for _, layer in layers
                                            for s in layer.singular_values()])

    def __call__(self) -> Tensor:
        self._check_active()
        active = self.sparsity is not None and self.strength > 0
        total = self.ortho * self.orthogonality() if self.ortho else None
        if active:
            term = self.strength * self.sparsity_loss()
            total = term if total is None else total + term
        return total

    def __repr__(self) -> str:
        return (f"SVDRegularizer(ortho={self.ortho}, sparsity={self.sparsity!r}, "
                f"strength={self.strength}, precision={self.precision!r})")


def _without_autocast(layers) -> torch.autocast:
    """The regularizers accumulate in fp32 at least: autocast would run the Gram GEMMs in
    bf16/fp16, so it is switched off for them (half-precision factors are upcast by the ops)."""
    return torch.autocast(layers[0][1].U.device.type, enabled=False)


class SVDTraining:
    """Schedule of SVD training for a model already in SVD form: the regularizer, one prune
    (at an epoch or at an optimizer step), then fine-tuning with sparsity off.

    Example::

        hook = SVDTraining(model, strength=0.07, energy=0.01, prune_epoch=30)
        for epoch in range(40):
            hook.on_epoch_start(epoch, optimizer)   # prunes at epoch 30 (slices Adam state)
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + hook.penalty()
                optimizer.zero_grad(); loss.backward(); optimizer.step()

    `stage` is "orthogonality" (before `sparsity_start`, the paper's stage 1), "sparsity"
    (stage 2) or "finetune" (after the prune); `on_epoch_start` returns True when a stage
    begins, so a loop can give each stage a fresh optimizer and schedule, as the official
    scripts do (`Start up code.md`; `python -m svdkern train` runs it so).

    `threshold` prunes by the value rule instead of `energy` (exactly one; neither: energy
    0.01; see `svdkern.prune`); `prune_step` prunes after that many optimizer steps
    (`on_step_end`; 0: before the first) instead of at an epoch; `precision` is the
    orthogonality term's (`SVDRegularizer`); the trainer integrations
    (`svdkern.integrations`) drive it by steps or epochs.
    """

    def __init__(self, model: nn.Module, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 0.07, energy: float | None = None,
                 prune_epoch: int | None = None, sparsity_start: int = 0,
                 rank_multiple: int = 1, *, threshold: float | None = None,
                 prune_step: int | None = None, precision: str | None = None) -> None:
        if energy is None and threshold is None:
            energy = DEFAULT_TRAINING_ENERGY
        energy, threshold = check_prune_rule("SVDTraining", energy, threshold)
        check_rank_multiple("SVDTraining", rank_multiple)
        check_prune_schedule("SVDTraining", prune_epoch, prune_step)
        if prune_epoch is not None and prune_epoch < sparsity_start:
            raise ValueError(f"SVDTraining: prune_epoch {prune_epoch} comes before "
                             f"sparsity_start {sparsity_start}")
        self.regularizer = SVDRegularizer(model, ortho, sparsity, strength, precision)
        self.model = model
        self.sparsity = sparsity
        self.energy = energy
        self.threshold = threshold
        self.rank_multiple = rank_multiple
        self.prune_epoch = prune_epoch
        self.prune_step = prune_step
        self.sparsity_start = sparsity_start
        self.records: list[PruneRecord] = []
        self.finetuning = False
        self.regularizer.sparsity = None if sparsity_start > 0 else sparsity

    @property
    def stage(self) -> str:
        """"orthogonality", "sparsity" or "finetune": the paper's stage now."""
        if self.finetuning:
            return "finetune"
        return "orthogonality" if self.regularizer.sparsity is None else "sparsity"

    def on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Apply the schedule for `epoch` (0-based); True when a stage begins with it (the
        first epoch, the sparsity term's, the prune's). Pass the optimizer so pruning
        slices its state; without it, rebuild the optimizer after the pruning epoch."""
        before = self.stage
        if self.prune_epoch is not None and epoch > self.prune_epoch and not self.finetuning:
            self.start_finetuning()  # resumed after the pruning epoch: already pruned
        if not self.finetuning:
            self.regularizer.sparsity = self.sparsity if epoch >= self.sparsity_start else None
        if self.prune_epoch is not None and epoch == self.prune_epoch and not self.finetuning:
            self.prune_now(optimizer)
        return epoch == 0 or self.stage != before

    def on_step_end(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After optimizer step number `step` (1-based, as trainers count; 0: before the first
        step): prune there when it reaches `prune_step`."""
        if self.prune_step is not None and step >= self.prune_step and not self.finetuning:
            self.prune_now(optimizer)

    def resumed_at(self, step: int, epoch: float) -> None:
        """A run resumed from a checkpoint written after `step` optimizer steps, at `epoch`
        (fractional, as trainers count): when the prune already happened then, go straight
        to fine-tuning (the loaded model has the pruned ranks), never pruning again. A step
        prune happens at the end of `prune_step`, an epoch prune at the start of
        `prune_epoch`, so a checkpoint at exactly epoch `prune_epoch` precedes it."""
        if ((self.prune_step is not None and step >= max(self.prune_step, 1))
                or (self.prune_epoch is not None and epoch > self.prune_epoch)):
            self.start_finetuning()

    def prune_now(self, optimizer: torch.optim.Optimizer | None = None) -> list[PruneRecord]:
        """Prune by the rule and switch to fine-tuning (sparsity off, ortho kept)."""
        self.records = prune(self.model, self.energy if self.threshold is None else None,
                             optimizer=optimizer, rank_multiple=self.rank_multiple,
                             threshold=self.threshold)
        self.start_finetuning()
        return self.records

    def start_finetuning(self) -> None:
        """Fine-tune from now on (sparsity off, ortho kept), without pruning: the model was
        pruned already (a resumed run)."""
        self.finetuning = True
        self.regularizer.sparsity = None

    def penalty(self) -> Tensor:
        """The regularizer to add to the task loss (zero when every term is off)."""
        if self.regularizer.adds_nothing():
            return torch.zeros((), device=next(self.model.parameters()).device)
        return self.regularizer()

    def backward_penalty(self) -> Tensor:
        """Add the penalty's gradient to the factors' `.grad` and return its value (detached),
        for trainers whose loss a callback cannot change: called once per optimizer step,
        after the task loss's backward (all accumulated micro-batches) and on unscaled
        gradients, it gives the step the gradient of `task loss + penalty`."""
        penalty = self.penalty()
        if penalty.requires_grad:
            penalty.backward()
        return penalty.detach()


class WithRegularizer(nn.Module):
    """`model` whose forward also returns the regularizer: `(model(*args), regularizer())`.

    Under FSDP (`fully_shard`) parameters are sharded DTensors outside the forward pass, so
    the regularizer must run inside it: shard this wrapper (at its root, so every factor is
    unsharded during the forward) and add the second output to the task loss.
    """

    def __init__(self, model: nn.Module, regularizer) -> None:
        super().__init__()
        self.model = model
        self.regularizer = regularizer

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs), self.regularizer()
