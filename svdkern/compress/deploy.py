"""`save_compressed` / `load_compressed`: a deployable low-rank model as plain files that
load with no pickle and no svdkern layers.

`save_compressed` writes the `export`ed low-rank model's tensors as `model.safetensors` and,
in `svdkern.json`, each SVD layer's form: the plain pair it became (its rank and geometry) or
"dense" (merged). `load_compressed` takes a freshly built dense architecture, checks every
tensor's name and shape against it, then swaps in the pairs and loads the tensors: the files
hold data only, so nothing in them is executed. A Hugging Face model's config is written
beside them (`config.json`), so `from_config` rebuilds the architecture.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from ..layers import SVDComposite, SVDConv1D, SVDLinear, conv_spec, is_conv1d, svd_layers
from ..reference import ConvSpec
from .decompose import module_paths, replace_modules
from .export import DENSE_CONVS, conv_pair, export, linear_pair

FORMAT = "svdkern-compressed"
VERSION = 2  # 2: convs of any dims (kind "conv"), transformers Conv1D as "transformers_conv1d"
TENSORS = "model.safetensors"
LAYOUT = "svdkern.json"


def save_compressed(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (in SVD form, pruned or not) as its low-rank export: `model.safetensors`
    (the tensors), `svdkern.json` (each SVD layer's form) and, for a Hugging Face model, its
    `config.json`. Returns the directory. The model is not modified."""
    from safetensors.torch import save_model
    layers = svd_layers(model)
    if not layers:
        raise ValueError("save_compressed: the model has no SVD layers (call svdkern.decompose "
                         "first, or save a dense model with its own tools)")
    plain = export(model, "lowrank")
    # attention and RNNs export as their torch module, merged, with the torch parameter
    # names a fresh dense model has: nothing to describe
    merged = [f"{n}." for n, m in model.named_modules() if isinstance(m, SVDComposite)]
    layout = {name: _describe(layer, plain.get_submodule(name) if name else plain)
              for name, layer in layers if not any(name.startswith(p) for p in merged)}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_model(plain, str(out / TENSORS))
    (out / LAYOUT).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                          "layers": layout}, indent=1))
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    return out


def _describe(layer, exported: nn.Module) -> dict:
    """JSON of one SVD layer's exported form."""
    form = "lowrank" if isinstance(exported, nn.Sequential) else "dense"
    entry = {"form": form, "rank": layer.rank, "bias": layer.bias is not None}
    if isinstance(layer, SVDLinear):
        entry.update(kind="transformers_conv1d" if isinstance(layer, SVDConv1D) else "linear",
                     in_features=layer.in_features, out_features=layer.out_features)
    else:
        entry.update(kind="conv", **{k: list(v) if isinstance(v, tuple) else v
                                       for k, v in layer.spec._asdict().items()})
    return entry


def load_compressed(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load what `save_compressed` wrote into `model`, a freshly built dense architecture
    (the one decomposed before saving): each low-rank layer's `nn.Linear` / `nn.Conv*d` is
    replaced by its plain pair, then every tensor is loaded. Every layer's kind and geometry,
    and every tensor's name and shape, are checked first, so a mismatched directory leaves
    `model` unchanged. Returns the model (the pair itself when `model` is a bare layer)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    root = Path(directory)
    layout = _read_layout(root / LAYOUT)
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("load_compressed: the model is on the meta device, where nothing can "
                         "be loaded; build it on a device (or call model.to_empty(device=...))")
    layers = {name: _checked_layer(name, model, entry) for name, entry in layout.items()}
    replacements = {name: _empty_pair(layers[name], entry) for name, entry in layout.items()
                    if entry["form"] == "lowrank"}
    with safe_open(str(root / TENSORS), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    _check_tensors(_expected_tensors(model, replacements), stored, root)
    tensors = load_file(str(root / TENSORS))
    model = replace_modules(model, replacements)
    model.load_state_dict(tensors, strict=False)  # the keys left out are tied to loaded ones
    return model


def _read_layout(path: Path) -> dict:
    try:
        layout = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"load_compressed: {path} is missing (write it with "
                                "svdkern.save_compressed)") from None
    except ValueError as exc:
        raise ValueError(f"load_compressed: {path} is not valid JSON: {exc}") from exc
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise ValueError(f"load_compressed: {path} is not an svdkern layout")
    if layout.get("version") not in (1, VERSION):
        raise ValueError(f"load_compressed: {path} has version {layout.get('version')!r}; this "
                         f"svdkern reads versions 1 and {VERSION}")
    if layout["version"] == 1:  # the kinds were named after the only dims they held
        renamed = {"conv2d": "conv", "conv1d": "transformers_conv1d"}
        return {name: {**e, "kind": renamed.get(e["kind"], e["kind"])}
                for name, e in layout["layers"].items()}
    return layout["layers"]


def _checked_layer(name: str, model: nn.Module, entry: dict) -> nn.Module:
    """The dense layer at `name`, checked against what was saved for it (kind, geometry,
    bias), whether it becomes a pair or stays dense."""
    label = name or "<root>"
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"load_compressed: the model has no layer {label} (saved from another "
                         "architecture?)") from None
    if entry["kind"] == "conv":
        spec = _saved_spec(entry)
        conv = DENSE_CONVS[spec.dims]
        expected, want = conv.__name__, tuple(spec[:-1])
        have = (tuple(conv_spec(dense, spec.scheme, label)[:-1]) if isinstance(dense, conv)
                else None)
    else:  # a linear, or transformers' Conv1D (nx in, nf out)
        want = (entry["in_features"], entry["out_features"])
        if entry["kind"] == "transformers_conv1d":
            expected, have = "Conv1D", ((dense.nx, dense.nf) if is_conv1d(dense) else None)
        else:
            expected = "Linear"
            have = (dense.in_features, dense.out_features) if isinstance(dense, nn.Linear) else None
    if have != want or (dense.bias is not None) != entry["bias"]:
        found = type(dense).__name__ + (f" {have} (bias {dense.bias is not None})"
                                        if have is not None else "")
        raise ValueError(f"load_compressed: layer {label} is a {found}, but a {expected} "
                         f"{want} (bias {entry['bias']}) was saved")
    return dense


def _saved_spec(entry: dict) -> ConvSpec:
    return ConvSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()
                       if k in ConvSpec._fields})


def _empty_pair(dense: nn.Module, entry: dict) -> nn.Sequential:
    """The plain pair replacing `dense` (checked), on its device and dtype."""
    factory = dict(device=dense.weight.device, dtype=dense.weight.dtype)
    if entry["kind"] in ("linear", "transformers_conv1d"):
        return linear_pair(entry["in_features"], entry["out_features"], entry["rank"],
                           entry["bias"], **factory)
    return conv_pair(_saved_spec(entry), entry["rank"], entry["bias"], **factory)


def _expected_tensors(model: nn.Module, replacements: dict[str, nn.Module]
                      ) -> dict[str, tuple[tuple[int, ...], object]]:
    """Every tensor name the model will hold (a replaced layer at each of its paths) with
    its shape and its tie group: names of one group share one tensor, which safetensors
    stores once."""
    paths = module_paths(model)
    expected: dict[str, tuple[tuple[int, ...], object]] = {}
    replaced = []
    for name, pair in replacements.items():
        for path in paths[id(model.get_submodule(name))]:
            replaced.append(f"{path}." if path else "")
            for key, t in pair.state_dict().items():
                expected[f"{path}.{key}" if path else key] = (tuple(t.shape), (name, key))
    for key, t in model.state_dict(keep_vars=True).items():
        if not any(key.startswith(prefix) for prefix in replaced):
            group = t.untyped_storage().data_ptr() if t.numel() else key
            expected[key] = (tuple(t.shape), group)
    return expected


def _check_tensors(expected: dict[str, tuple[tuple[int, ...], object]],
                   stored: dict[str, tuple[int, ...]], root: Path) -> None:
    """Each tie group stored exactly once, every stored tensor at its name's shape, and
    nothing else in the file."""
    groups: dict[object, list[str]] = {}
    for key, (_, group) in expected.items():
        groups.setdefault(group, []).append(key)
    problems = [f"{key}: saved {stored[key]}, expected {shape}"
                for key, (shape, _) in expected.items() if key in stored and stored[key] != shape]
    for names in groups.values():
        held = [n for n in names if n in stored]
        if not held:
            problems.append(f"{names[0]}: missing")
        elif len(held) > 1:
            problems.append(f"{' and '.join(held)}: stored apart, but one tensor in the model")
    problems += [f"{key}: not in the model" for key in stored if key not in expected]
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5
                                           else "")
        raise ValueError(f"load_compressed: {root / TENSORS} does not fit the model: {shown}")
