"""svdkern: SVD training (Yang et al. 2020) and TRP for low-rank networks, with Triton
kernels behind a pure-PyTorch reference path.

Layout: `reference` (the maths), `backend` and `dispatch` (which engine and which path run a
call), `ops` (the functional entry points), `kernels` (Triton kernels and their custom ops),
`layers`, `compress` (decompose, prune, export, checkpoints, summary), `methods` (SVD
training, TRP); `app` is the training application of `python -m svdkern`."""
from . import backend, ops, reference
from .compress.checkpoint import load, save
from .compress.decompose import decompose
from .compress.deploy import load_compressed, save_compressed
from .compress.distributed import prune_distributed
from .compress.export import export
from .compress.pruning import PruneRecord, prune
from .compress.summary import Coverage, ModelSummary, coverage, summary
from .dispatch import Plan, explain
from .layers import (SVDGRU, SVDLSTM, SVDRNN, SVDComposite, SVDConv, SVDConv1D, SVDConv1d,
                     SVDConv2d, SVDConv3d, SVDLayer, SVDLinear, SVDMultiheadAttention, cached,
                     svd_layers)
from .methods.svd_training import SVDRegularizer, SVDTraining, WithRegularizer
from .methods.trp import TRP

__version__ = "0.1.0"

__all__ = [
    "Coverage", "ModelSummary", "Plan", "PruneRecord", "SVDComposite", "SVDConv", "SVDConv1D",
    "SVDConv1d", "SVDConv2d", "SVDConv3d", "SVDGRU", "SVDLSTM", "SVDLayer", "SVDLinear",
    "SVDMultiheadAttention", "SVDRNN", "SVDRegularizer",
    "SVDTraining", "TRP", "WithRegularizer", "backend", "cached", "coverage", "decompose", "explain", "export", "load",
    "load_compressed", "ops", "prune", "prune_distributed", "reference", "save",
    "save_compressed", "summary", "svd_layers",
]
