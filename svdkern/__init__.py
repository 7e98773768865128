"""svdkern: SVD training (Yang et al. 2020) and TRP for low-rank networks, with Triton
kernels behind a pure-PyTorch reference path."""
from . import ops, reference
from .checkpoint import load, save
from .convert import decompose
from .export import export
from .layers import SVDConv2d, SVDLayer, SVDLinear, svd_layers
from .pruning import PruneRecord, prune
from .regularizers import SVDRegularizer
from .report import ModelSummary, summary

__version__ = "0.1.0"

__all__ = [
    "SVDConv2d", "SVDLayer", "SVDLinear", "SVDRegularizer", "ModelSummary", "PruneRecord",
    "decompose", "export", "load", "ops", "prune", "reference", "save", "summary",
    "svd_layers",
]
from .trainer import SVDTraining  # noqa: E402
from .trp import TRP  # noqa: E402

__all__ += ["SVDTraining", "TRP"]
