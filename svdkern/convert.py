"""`decompose`: replace a model's Linear and Conv2d layers by their exact SVD form."""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch.nn as nn

from .layers import SVDConv2d, SVDLayer, SVDLinear
from .reference import SCHEMES


def decompose(model: nn.Module, scheme: str = "channel", skip: Iterable[str] = ()) -> nn.Module:
    """Replace every `nn.Linear` / `nn.Conv2d` of `model` (in place) by `SVDLinear` /
    `SVDConv2d` at full rank, computing the same function, and return the model.

    `scheme` is "channel" or "spatial" for convs; `skip` holds module names or glob
    patterns left dense. Every layer is validated and converted before any is swapped in,
    so a failure leaves the model unchanged. A bare Linear/Conv2d model is returned as its
    SVD layer.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"decompose: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    replacements, is_skipped = {}, skip_matcher(skip)
    for name, module in model.named_modules():
        if isinstance(module, SVDLayer) or is_skipped(name):
            continue
        label = name or type(module).__name__
        try:
            if isinstance(module, nn.Linear):
                replacements[name] = SVDLinear.from_dense(module, name=label)
            elif isinstance(module, nn.Conv2d):
                replacements[name] = SVDConv2d.from_dense(module, scheme=scheme, name=label)
        except ValueError as exc:
            raise ValueError(f"{exc} (pass skip=[{label!r}] to keep this layer dense)") from exc
    if "" in replacements:
        return replacements[""]
    for name, new in replacements.items():
        set_submodule(model, name, new)
    return model


def skip_matcher(skip: str | Iterable[str]) -> Callable[[str], bool]:
    """Whether a module name matches `skip`: one or several names or glob patterns."""
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
