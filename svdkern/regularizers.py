"""`SVDRegularizer`: the orthogonality and sparsity terms of SVD training over a model."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .layers import svd_layers

SPARSITY = {"hoyer": ops.hoyer_loss, "l1": ops.l1_loss, None: None}


class SVDRegularizer:
    """Calling it returns `ortho * sum L_o(U, V) + strength * sum L_s(s)` over every SVD
    layer of `model` (docs/SPEC.md section 1), a differentiable scalar to add to the task loss.

    Layers are looked up at each call, so the regularizer follows pruning. `sparsity` may be
    set to None later (fine-tuning) but a regularizer that adds nothing is an error.
    """

    def __init__(self, model: nn.Module, ortho: float = 1.0, sparsity: str | None = "hoyer",
                 strength: float = 1e-3) -> None:
        self.check_settings(ortho, sparsity, strength)
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
            raise ValueError(f"SVDRegularizer: sparsity must be 'hoyer', 'l1' or None, got {sparsity!r}")
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
                                           for M in layer.factor_matrices()])

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
                f"strength={self.strength})")


def _without_autocast(layers) -> torch.autocast:
    """The regularizers accumulate in fp32 at least: autocast would run the Gram GEMMs in
    bf16/fp16, so it is switched off for them (half-precision factors are upcast by the ops)."""
    return torch.autocast(layers[0][1].U.device.type, enabled=False)
