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

from .distributed import WithRegularizer, prune_distributed  # noqa: E402  (distributed issue)

__all__ += ["WithRegularizer", "prune_distributed"]
