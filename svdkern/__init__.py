"""svdkern: SVD training (Yang et al. 2020) and TRP for low-rank networks, with Triton
kernels behind a pure-PyTorch reference path."""
from . import backend, ops, reference
from .checkpoint import load, save
from .convert import decompose
from .distributed import WithRegularizer, prune_distributed
from .export import export
from .layers import SVDConv2d, SVDLayer, SVDLinear, svd_layers
from .ops import Plan, explain
from .pruning import PruneRecord, prune
from .regularizers import SVDRegularizer
from .report import ModelSummary, summary
from .trainer import SVDTraining
from .trp import TRP

__version__ = "0.1.0"

__all__ = [
    "ModelSummary", "Plan", "PruneRecord", "SVDConv2d", "SVDLayer", "SVDLinear", "SVDRegularizer",
    "SVDTraining", "TRP", "WithRegularizer", "backend", "decompose", "explain", "export", "load",
    "ops", "prune", "prune_distributed", "reference", "save", "summary", "svd_layers",
]
