"""svdkern: SVD training (Yang et al. 2020) and TRP for low-rank networks, with Triton
kernels behind a pure-PyTorch reference path."""
import importlib.util
import os

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

# `kernels/` is installed as svdkern.kernels (setup.py's package_dir; the submodules above
# import it lazily). A source tree no installer mapped (a legacy `setup.py develop`, which
# `pip install -e .` falls back to with an old setuptools lacking `wheel`, or PYTHONPATH)
# would lose the Triton kernels: find them next to this package then.
if importlib.util.find_spec(__name__ + ".kernels") is None:
    __path__.append(os.path.join(os.path.dirname(__file__), os.pardir))

__version__ = "0.1.0"

__all__ = [
    "ModelSummary", "Plan", "PruneRecord", "SVDConv2d", "SVDLayer", "SVDLinear", "SVDRegularizer",
    "SVDTraining", "TRP", "WithRegularizer", "backend", "decompose", "explain", "export", "load",
    "ops", "prune", "prune_distributed", "reference", "save", "summary", "svd_layers",
]
