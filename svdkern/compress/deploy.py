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

from ..layers import SVDLinear, conv_spec, svd_layers
from ..reference import ConvSpec
from .decompose import replace_modules
from .export import conv_pair, export, linear_pair

FORMAT = "svdkern-compressed"
VERSION = 1
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
    layout = {name: _describe(layer, plain.get_submodule(name) if name else plain)
              for name, layer in layers}
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
        entry.update(kind="linear", in_features=layer.in_features,
                     out_features=layer.out_features)
    else:
        entry.update(kind="conv2d", **{k: list(v) if isinstance(v, tuple) else v
                                       for k, v in layer.spec._asdict().items()})
    return entry


def load_compressed(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load what `save_compressed` wrote into `model`, a freshly built dense architecture
    (the one decomposed before saving): each low-rank layer's `nn.Linear` / `nn.Conv2d` is
    replaced by its plain pair, then every tensor is loaded. Every name and shape is checked
    first, so a mismatched directory leaves `model` unchanged. Returns the model (the pair
    itself when `model` is a bare layer)."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    root = Path(directory)
    layout = _read_layout(root / LAYOUT)
    replacements = {name: _pair_for(name, model, entry) for name, entry in layout.items()
                    if entry["form"] == "lowrank"}
    with safe_open(str(root / TENSORS), framework="pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    _check_tensors(model, replacements, stored, root)
    model = replace_modules(model, replacements)
    load_model(model, str(root / TENSORS), strict=True)
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
    if layout.get("version") != VERSION:
        raise ValueError(f"load_compressed: {path} has version {layout.get('version')!r}; this "
                         f"svdkern reads version {VERSION}")
    return layout["layers"]


def _pair_for(name: str, model: nn.Module, entry: dict) -> nn.Sequential:
    """The empty pair replacing the dense layer at `name`, checked against that layer."""
    label = name or "<root>"
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"load_compressed: the model has no layer {label} (saved from another "
                         "architecture?)") from None
    factory = dict(device=dense.weight.device, dtype=dense.weight.dtype)
    if entry["kind"] == "linear":
        want = (nn.Linear, (entry["in_features"], entry["out_features"]))
        have = getattr(dense, "in_features", None), getattr(dense, "out_features", None)
        pair = linear_pair(entry["in_features"], entry["out_features"], entry["rank"],
                           entry["bias"], **factory)
    else:
        spec = ConvSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()
                           if k in ConvSpec._fields})
        want = (nn.Conv2d, spec[:-1])
        have = conv_spec(dense, spec.scheme, label)[:-1] if isinstance(dense, nn.Conv2d) else ()
        pair = conv_pair(spec, entry["rank"], entry["bias"], **factory)
    if not isinstance(dense, want[0]) or tuple(have) != tuple(want[1]) or (
            (dense.bias is not None) != entry["bias"]):
        raise ValueError(f"load_compressed: layer {label} is {dense!r}, but a "
                         f"{want[0].__name__} {want[1]} (bias {entry['bias']}) was saved")
    return pair


def _check_tensors(model: nn.Module, replacements: dict[str, nn.Module],
                   stored: dict[str, tuple[int, ...]], root: Path) -> None:
    """Every tensor the model will hold is in the file at its shape (a weight tied to
    another may be stored once, under either name) and the file holds nothing else."""
    replaced = tuple(f"{name}." if name else "" for name in replacements)
    expected: dict[str, tuple[tuple[int, ...], int]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not any(key.startswith(prefix) for prefix in replaced):
            expected[key] = (tuple(t.shape), t.untyped_storage().data_ptr() if t.numel() else -1)
    for name, pair in replacements.items():
        for key, t in pair.state_dict().items():
            expected[f"{name}.{key}" if name else key] = (tuple(t.shape), -1)
    problems = [f"{key}: saved {stored[key]}, expected {shape}"
                for key, (shape, _) in expected.items() if key in stored and stored[key] != shape]
    stored_storage = {expected[k][1] for k in stored if k in expected}
    problems += [f"{key}: missing" for key, (_, storage) in expected.items()
                 if key not in stored and not (storage != -1 and storage in stored_storage)]
    problems += [f"{key}: not in the model" for key in stored if key not in expected]
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5
                                           else "")
        raise ValueError(f"load_compressed: {root / TENSORS} does not fit the model: {shown}")
