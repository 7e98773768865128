"""`decompose`: replace a model's Linear, Conv1d/2d/3d, transformers Conv1D, attention and
recurrent layers by their exact SVD form, naming every matrix it leaves dense."""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from typing import Callable, Iterable, Iterator

import torch.nn as nn
from torch.nn.modules.utils import _ntuple
from torch.nn.utils import parametrize

from ..layers import (SVD_CONVS, SVDGRU, SVDLSTM, SVDRNN, SVDComposite, SVDConv1D, SVDLayer,
                      SVDLinear, SVDMultiheadAttention, is_conv1d, scheme_for)
from ..reference import SCHEMES, ConvSpec

# torch modules that multiply by their matrices themselves -> their SVD form
COMPOSITES: dict[type, type[SVDComposite]] = {
    nn.MultiheadAttention: SVDMultiheadAttention, nn.LSTM: SVDLSTM, nn.GRU: SVDGRU,
    nn.RNN: SVDRNN}


def _svd_form(module: nn.Module, scheme: str, label: str) -> nn.Module:
    """The exact SVD form of a layer `layer_kind` recognizes."""
    kind = layer_kind(module)
    if kind is nn.Linear:
        return SVDLinear.from_dense(module, name=label)
    if kind in SVD_CONVS:
        return SVD_CONVS[kind].from_dense(module, scheme=scheme_for(module, scheme), name=label)
    if kind in COMPOSITES:
        return COMPOSITES[kind].from_dense(module, name=label)
    return SVDConv1D.from_dense(module, name=label)


def layer_kind(module: nn.Module) -> type | None:
    """The class whose instances svdkern converts that `module` is one of (`nn.Linear`,
    `nn.Conv1d/2d/3d`, transformers' `Conv1D`, `nn.MultiheadAttention`, `nn.LSTM`, `nn.GRU`,
    `nn.RNN`), or None (an SVD form already is None)."""
    if isinstance(module, (SVDLayer, SVDComposite)):
        return None
    if is_conv1d(module):
        return type(module)
    return next((k for k in (nn.Linear, *SVD_CONVS, *COMPOSITES) if isinstance(module, k)), None)


def matrix_shapes(module: nn.Module, scheme: str = "channel") -> list[tuple[int, int]]:
    """(rows, cols) of every (per-group) weight matrix the SVD form of `module` (a
    `layer_kind`) holds, from its sizes alone (no weight is read)."""
    kind = layer_kind(module)
    if kind in SVD_CONVS:
        tup = _ntuple(len(module.kernel_size))
        return [ConvSpec(module.in_channels, module.out_channels, tup(module.kernel_size),
                         tup(1), tup(0), tup(1), module.groups, "zeros",
                         scheme_for(module, scheme)).matrix_shape]
    if kind in COMPOSITES:
        shapes = []
        for pname, keys in COMPOSITES[kind].layout(module).items():
            rows, cols = module._parameters[pname].shape
            shapes += [(rows // len(keys), cols)] * len(keys)
        return shapes
    if kind is nn.Linear:
        return [(module.out_features, module.in_features)]
    return [(module.nf, module.nx)]  # transformers' Conv1D


def _saves_nothing(module: nn.Module, scheme: str) -> str | None:
    """Why `module`'s SVD form cannot save anything: its matrices all have rank <= 1 (a
    depthwise conv's 1 x k*k, a one-output linear), or None (also for a lazy layer: no
    sizes yet). A module of several matrices (an LSTM of input size 1) converts when one
    of them can shrink."""
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        return None
    shapes = matrix_shapes(module, scheme)
    if max(min(shape) for shape in shapes) > 1:
        return None
    what = ("every weight matrix" if len(shapes) > 1 else
            "its per-group weight matrix" if getattr(module, "groups", 1) > 1 else
            "its weight matrix")
    return (f"{what} is {'x'.join(map(str, shapes[0]))}, of rank <= 1, so a factorization "
            "saves nothing (name it in include= to convert it anyway)")


def decompose(model: nn.Module, scheme: str = "channel", skip: Iterable[str] = (), *,
              include: Iterable[str | type] | None = None, min_size: int = 0) -> nn.Module:
    """Replace every `nn.Linear`, `nn.Conv1d/2d/3d`, transformers `Conv1D` (GPT-2's linears),
    `nn.MultiheadAttention` and `nn.LSTM` / `nn.GRU` / `nn.RNN` of `model` (in place) by its
    SVD form at full rank, computing the same function, and return the model.

    `scheme` is "channel" or "spatial" for 2-D convs (1-D and 3-D convs take "channel");
    `skip` holds module names or glob patterns left dense (one that matches no module is an
    error: a typo would skip nothing). `include` (PEFT's `target_modules`: names, glob
    patterns or module classes) converts only the layers it matches, each entry matching at
    least one; `min_size` leaves dense the layers whose largest matrix has fewer elements.
    Layers these leave dense are the user's choice and not warned about. Layers whose
    matrices have rank <= 1 (depthwise convs, one-output linears) save nothing in SVD form
    and stay dense, warned, unless `include` is given and matches them.
    Every layer is validated and converted before any is swapped in, so a failure leaves the
    model unchanged. A layer used at several places becomes one SVD layer at all of them;
    frozen weights, train/eval mode and module hooks carry over. Layers whose SVD form would
    compute something else are refused by name (`convertible_layers`). Never silent: one
    UserWarning names every module holding a matrix (a >= 2-D weight) left dense, with the
    reason (a weight tied to another module's, as GPT-2's head to its embedding, is left dense
    there); a model with nothing to convert (and no SVD layer yet: decompose is idempotent)
    is an error. A bare layer is returned as its SVD layer.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"decompose: unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"decompose: min_size must be an integer >= 0, got {min_size!r}")
    skip = [skip] if isinstance(skip, str) else list(skip)  # read twice below
    _check_patterns_match(model, skip, "skip")
    chosen = _chooser(model, include, min_size)
    wanted = convertible_layers(model, skip, tied="keep dense", chosen=chosen)
    found = [(name, m) for name, m in wanted
             if include is not None or _saves_nothing(m, scheme) is None]
    left = left_dense(model, skip, [m for _, m in found], chosen, scheme)
    already = any(isinstance(m, (SVDLayer, SVDComposite)) for m in model.modules())
    if not wanted and not already and convertible_layers(model, (), tied="keep dense",
                                                         frozen_unchecked=True):
        raise ValueError(f"decompose: skip, include and min_size leave every layer of "
                         f"{type(model).__name__} that svdkern would convert dense")
    if not found and not already:
        reasons = "; ".join(f"{name or '<root>'}: {why}" for name, why in left[:5]) or (
            "it holds no weight matrix")
        raise ValueError(f"decompose: {type(model).__name__} has no layer svdkern converts "
                         f"({reasons})")
    replacements = {}
    for name, module in found:
        with _skip_hint(name, module) as label:
            replacements[name] = _svd_form(module, scheme, label)
    if left:
        warnings.warn("decompose left these modules dense: " + "; ".join(
            f"{name or '<root>'} ({why})" for name, why in left), UserWarning, stacklevel=2)
    return replace_modules(model, replacements)


def _check_patterns_match(model: nn.Module, patterns: str | Iterable, what: str) -> None:
    """A ValueError for a name, pattern or (for include) class that matches no module
    (for include: no layer svdkern converts; a container matched covers its layers)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
             if what != "include" or layer_kind(m) is not None]
    unmatched = [p for p in patterns if not any(
        isinstance(m, p) if isinstance(p, type) else path_matches(n, p) for n, m in named)]
    if unmatched:
        example = next((n for n, _ in named if n), "")
        shown = [p.__name__ if isinstance(p, type) else p for p in unmatched]
        kind = "layer svdkern converts" if what == "include" else "module"
        raise ValueError(f"decompose: {what} {shown} matches no {kind} of "
                         f"{type(model).__name__} (names look like {example!r})")


def _chooser(model: nn.Module, include: Iterable[str | type] | None, min_size: int):
    """Whether the user wants the layer at `paths` converted: `include` matches it (by any
    of its paths, or its class) and its weight holds at least `min_size` elements."""
    if include is not None:
        include = [include] if isinstance(include, (str, type)) else list(include)
        _check_patterns_match(model, include, "include")
    names = [p for p in include or () if not isinstance(p, type)]
    kinds = tuple(p for p in include or () if isinstance(p, type))

    def chosen(paths: list[str], module: nn.Module) -> bool:
        if include is not None and not (isinstance(module, kinds) or any(
                path_matches(path, p) for path in paths for p in names)):
            return False
        if min_size == 0 or any(isinstance(p, nn.parameter.UninitializedParameter)
                                for p in module.parameters(recurse=False)):
            return True  # a lazy layer: checked (and refused by name) by check_layer
        return max(r * c for r, c in matrix_shapes(module)) >= min_size  # per group
    return chosen


def left_dense(model: nn.Module, skip: str | Iterable[str], converted: list[nn.Module],
               chosen=None, scheme: str = "channel") -> list[tuple[str, str]]:
    """(path, reason) of every module holding a >= 2-D parameter of its own that is neither
    converted nor left dense by the user (`skip`, or `chosen(paths, module)` False)."""
    is_skipped, paths, owners = skip_matcher(skip), module_paths(model), _owners(model)
    done = {id(m) for m in converted}
    out = []
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # a parametrization's own modules: their layer is reported instead
        matrices = [p for p in module.parameters(recurse=parametrize.is_parametrized(module))
                    if isinstance(p, nn.parameter.UninitializedParameter) or p.dim() >= 2]
        if (not matrices or id(module) in done or isinstance(module, (SVDLayer, SVDComposite))
                or any(map(is_skipped, paths[id(module)]))
                or (chosen is not None and not chosen(paths[id(module)], module))):
            continue
        tied = _tied_to(module, paths, owners)
        if parametrize.is_parametrized(module):
            why = "its weight is reparametrized (parametrize, weight_norm, spectral_norm)"
        elif layer_kind(module) is not None and tied:
            why = (f"its weight is tied to {tied}'s, and an SVD layer would untie them; "
                   "untie them to convert it")
        elif layer_kind(module) is not None and (useless := _saves_nothing(module, scheme)):
            why = useless
        elif layer_kind(module) is not None:
            why = "svdkern converts it, but it was not converted (skipped, or not decomposed)"
        elif isinstance(module, nn.Embedding):
            why = "an embedding is a lookup table, not a matrix product"
        else:
            why = f"svdkern has no SVD form of {type(module).__name__}"
        out.append((name, why))
    return out


def convertible_layers(model: nn.Module, skip: str | Iterable[str] = (), *,
                       kinds: tuple[type, ...] | None = None, tied: str = "refuse",
                       frozen_unchecked: bool = False, chosen=None
                       ) -> list[tuple[str, nn.Module]]:
    """Every layer svdkern converts (`layer_kind`; TRP passes `kinds`, the dense classes it
    truncates) of `model` (once per instance, by its first path) that `skip` matches at none
    of its paths, each checked to compute what its SVD form would: a ValueError names a layer
    whose own `forward` (on its class or the instance) would not run, or whose weight is
    reparametrized (parametrize, weight_norm, spectral_norm). A layer whose weight is tied to
    another module's is refused too, or with `tied="keep dense"` left out (`left_dense` names
    it). With `frozen_unchecked`, layers whose weight is frozen are listed unchecked (TRP
    leaves them alone, and checks one when it is unfrozen, `check_layer`); `chosen(paths,
    module)` False leaves a layer out (decompose's `include` and `min_size`)."""
    is_skipped, paths, owners = skip_matcher(skip), module_paths(model), _owners(model)
    found = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if (kind is None or (kinds is not None and not issubclass(kind, kinds))
                or any(map(is_skipped, paths[id(module)]))
                or (chosen is not None and not chosen(paths[id(module)], module))):
            continue
        if frozen_unchecked and not _trainable(module):
            found.append((name, module))
            continue
        other = _tied_to(module, paths, owners)
        if other is not None and tied == "keep dense":
            continue
        check_layer(name, module, other)
        found.append((name, module))
    return found


def _trainable(module: nn.Module) -> bool:
    """Whether the layer's weight trains (a parametrized one counts as training: it is
    checked, and refused, without running its parametrization)."""
    if parametrize.is_parametrized(module):
        return True
    weights = [module._parameters.get(n) for n in _weight_names(module, layer_kind(module))]
    return any(isinstance(w, nn.Parameter) and w.requires_grad for w in weights)


def _weight_names(module: nn.Module, kind: type) -> list[str]:
    """The names of the parameters the SVD form of `module` factors."""
    return list(COMPOSITES[kind].layout(module)) if kind in COMPOSITES else ["weight"]


def check_layer(name: str, module: nn.Module, tied_to: str | None = None) -> None:
    """A ValueError naming layer `name` (with how to keep it dense) if its SVD form would
    not compute what it computes now: its own `forward`, a reparametrized or uninitialized
    (lazy) weight, or weights tied to `tied_to`'s."""
    with _skip_hint(name, module) as label:
        _check_convertible(label, module, layer_kind(module))
        if tied_to is not None:
            raise ValueError(f"{label}: its weights are tied to {tied_to}'s; an SVD layer "
                             "would untie them")


@contextlib.contextmanager
def _skip_hint(name: str, module: nn.Module) -> Iterator[str]:
    """Add to a ValueError about the layer at path `name` how to keep it dense; yields the
    label errors name the layer by (its path, or its class for the model itself, which has
    no path to skip)."""
    label = name or type(module).__name__
    try:
        yield label
    except ValueError as exc:
        hint = (f"pass skip=[{name!r}] to keep this layer dense" if name else
                "it is the model itself: keep it dense rather than convert it")
        raise ValueError(f"{exc} ({hint})") from exc


def _check_convertible(label: str, module: nn.Module, kind: type) -> None:
    """A ValueError if `module`'s SVD form would not compute what `module` computes now."""
    own = [f for f in ("forward", "_conv_forward") if _own_method(module, kind, f)]
    if own:
        raise ValueError(f"{label}: {type(module).__name__} has its own {own[0]}, which its "
                         f"SVD form would not run")
    # parametrized first: reading its weight would run the parametrization (spectral_norm's
    # power iteration updates its buffers)
    names = _weight_names(module, kind)
    if parametrize.is_parametrized(module) or not all(
            isinstance(module._parameters.get(n), nn.Parameter) for n in names):
        raise ValueError(f"{label}: its weight is reparametrized (torch.nn.utils.parametrize, "
                         "weight_norm, spectral_norm); the SVD form would drop that")
    if any(isinstance(module._parameters[n], nn.parameter.UninitializedParameter)
           for n in names):
        raise ValueError(f"{label}: {type(module).__name__} is not initialized yet (a lazy "
                         "module): run one forward pass first, so its weight has a shape")


def _own_method(module: nn.Module, kind: type, name: str) -> bool:
    """Whether `module` runs its own `name` rather than `kind`'s: one set on the instance
    (unless it is `kind`'s function bound to this very module, as accelerate's
    `remove_hook` leaves it) or a subclass's."""
    if name in vars(module):
        bound = vars(module)[name]
        return not (getattr(bound, "__self__", None) is module
                    and getattr(bound, "__func__", None) is getattr(kind, name, None))
    return hasattr(kind, name) and getattr(type(module), name) is not getattr(kind, name)


def tied_to(model: nn.Module, module: nn.Module) -> str | None:
    """The path of another module of `model` holding one of `module`'s own parameters."""
    return _tied_to(module, module_paths(model), _owners(model))


def _tied_to(module: nn.Module, paths: dict[int, list[str]],
             owners: dict[int, set[int]]) -> str | None:
    """The path of another module holding one of `module`'s own parameters, or None."""
    for param in module.parameters(recurse=False):
        for m_id in owners.get(id(param), ()):
            if m_id != id(module):
                return paths[m_id][0] or "the model"
    return None


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


def path_matches(path: str, pattern: str) -> bool:
    """Whether the module at `path` is named by `pattern`: a glob on its path, or PEFT's
    `target_modules` rule (the exact path or a `.name` suffix), on the path itself or on a
    container above it (a container named covers what it holds)."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), 0, -1):
        candidate = ".".join(parts[:depth])
        if (fnmatch.fnmatchcase(candidate, pattern) or candidate == pattern
                or candidate.endswith("." + pattern)):
            return True
    return path == pattern


def skip_matcher(skip: str | Iterable[str]) -> Callable[[str], bool]:
    """Whether a module name matches `skip`: one or several names or glob patterns
    (`path_matches`)."""
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name: any(path_matches(name, p) for p in patterns)


# Module-level hook dicts moved to a replacement layer: the same dict objects, so the
# handles their owners hold still remove them.
_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Swap each module at path `name` for `replacements[name]` at every path the old module
    is used, carrying its train/eval mode and module hooks over; returns the model (the
    replacement itself when the root is replaced: the other replacements then land in it)."""
    paths = module_paths(model)
    root = replacements.get("")
    if root is not None:
        _carry_over(model, root)
    for name, new in replacements.items():
        if name == "":
            continue
        old = model.get_submodule(name)
        _carry_over(old, new)
        for path in paths[id(old)]:
            set_submodule(model if root is None else root, path, new)
    return model if root is None else root


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the train/eval mode and the module hooks of `old`, which it replaces."""
    new.train(old.training)
    for attr in _MODULE_HOOKS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
