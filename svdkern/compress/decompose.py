"""`decompose`: replace a model's Linear and Conv2d layers by their exact SVD form."""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Iterable, Iterator

import torch.nn as nn
from torch.nn.utils import parametrize

from ..layers import SVDConv2d, SVDLinear
from ..reference import SCHEMES


def decompose(model: nn.Module, scheme: str = "channel", skip: Iterable[str] = ()) -> nn.Module:
    """Replace every `nn.Linear` / `nn.Conv2d` of `model` (in place) by `SVDLinear` /
    `SVDConv2d` at full rank, computing the same function, and return the model.

    `scheme` is "channel" or "spatial" for convs; `skip` holds module names or glob
    patterns left dense. Every layer is validated and converted before any is swapped in,
    so a failure leaves the model unchanged. A layer used at several places becomes one SVD
    layer at all of them; frozen weights, train/eval mode and module hooks carry over. Layers
    whose SVD form would compute something else are refused by name (`convertible_layers`).
    A bare Linear/Conv2d model is returned as its SVD layer.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"decompose: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    replacements = {}
    for name, module in convertible_layers(model, skip):
        with _skip_hint(name or type(module).__name__) as label:
            replacements[name] = (SVDLinear.from_dense(module, name=label)
                                  if isinstance(module, nn.Linear) else
                                  SVDConv2d.from_dense(module, scheme=scheme, name=label))
    return replace_modules(model, replacements)


def convertible_layers(model: nn.Module, skip: str | Iterable[str] = ()
                       ) -> list[tuple[str, nn.Module]]:
    """Every `nn.Linear` / `nn.Conv2d` of `model` (once per instance, by its first path)
    that `skip` matches at none of its paths, each checked to compute what its SVD form
    would: a ValueError names a layer whose own `forward` (on its class or the instance)
    would not run, whose weight is reparametrized (parametrize, weight_norm, spectral_norm)
    or tied to another module's."""
    is_skipped, paths, owners = skip_matcher(skip), module_paths(model), _owners(model)
    found = []
    for name, module in model.named_modules():
        if (not isinstance(module, (nn.Linear, nn.Conv2d))
                or any(map(is_skipped, paths[id(module)]))):
            continue
        with _skip_hint(name or type(module).__name__) as label:
            _check_convertible(label, module, paths, owners)
        found.append((name, module))
    return found


@contextlib.contextmanager
def _skip_hint(label: str) -> Iterator[str]:
    """Add to a ValueError about layer `label` how to keep it dense."""
    try:
        yield label
    except ValueError as exc:
        raise ValueError(f"{exc} (pass skip=[{label!r}] to keep this layer dense)") from exc


def _check_convertible(label: str, module: nn.Module, paths: dict[int, list[str]],
                       owners: dict[int, set[int]]) -> None:
    """A ValueError if `module`'s SVD form would not compute what `module` computes now."""
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    own = [f for f in ("forward", "_conv_forward") if f in vars(module) or
           (hasattr(base, f) and getattr(type(module), f) is not getattr(base, f))]
    if own:
        raise ValueError(f"{label}: {type(module).__name__} has its own {own[0]}, which its "
                         f"SVD form would not run")
    if parametrize.is_parametrized(module) or not isinstance(module.weight, nn.Parameter):
        raise ValueError(f"{label}: its weight is reparametrized (torch.nn.utils.parametrize, "
                         "weight_norm, spectral_norm); the SVD form would drop that")
    for pname, param in (("weight", module.weight), ("bias", module.bias)):
        others = [p for m_id in owners.get(id(param), ()) if m_id != id(module)
                  for p in paths[m_id][:1]]
        if others:
            raise ValueError(f"{label}: its {pname} is tied to {others[0] or 'the model'}'s; "
                             "an SVD layer would untie them")


def _owners(model: nn.Module) -> dict[int, set[int]]:
    """id of each parameter -> ids of the modules holding it."""
    owners: dict[int, set[int]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return owners


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """id of each submodule -> every dotted path it is reachable at (a module may be used
    at several places)."""
    paths: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


def skip_matcher(skip: str | Iterable[str]) -> Callable[[str], bool]:
    """Whether a module name matches `skip`: one or several names or glob patterns."""
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


# Module-level hook dicts moved to a replacement layer: the same dict objects, so the
# handles their owners hold still remove them.
_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Swap each module at path `name` for `replacements[name]` at every path the old module
    is used, carrying its train/eval mode and module hooks over; returns the model (the
    replacement itself when the root is replaced)."""
    paths = module_paths(model)
    for name, new in replacements.items():
        old = model.get_submodule(name)
        new.train(old.training)
        for attr in _MODULE_HOOKS:
            if hasattr(old, attr):
                setattr(new, attr, getattr(old, attr))
        if name == "":
            return new
        for path in paths[id(old)]:
            set_submodule(model, path, new)
    return model


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
