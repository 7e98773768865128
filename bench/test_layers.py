"""Layer forward + backward: dense, eager reference, compiled reference, svdkern."""
import pytest
import torch

from .cases import (CROSSOVER_PATHS, LAYER_ALTERNATIVES, crossover_shapes, fused_can_run,
                    layer_case, layer_shapes)
from .config import preset_from_env

SHAPES = layer_shapes(preset_from_env())


@pytest.mark.parametrize("alternative", LAYER_ALTERNATIVES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_layer_forward_backward(benchmark, shape, alternative, preset, device):
    benchmark.group = f"layer {shape.id}"
    y, dx = benchmark(layer_case(shape, alternative, preset, device))
    assert y.shape == (shape.rows, shape.m) and dx.shape == (shape.rows, shape.n)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: s.id)
def test_layer_alternatives_agree(shape, preset, device):
    """The alternatives compute the same output and input gradient (same weight, same
    inputs), so the benchmark compares like with like."""
    torch.manual_seed(0)
    results = {}
    for alternative in LAYER_ALTERNATIVES:
        torch.manual_seed(1)
        results[alternative] = layer_case(shape, alternative, preset, device)()
    y0, dx0 = results["dense"]
    tol = 1e-4 if device.type == "cpu" else 5e-3  # GPU kernels may use TF32 for fp32
    for alternative, (y, dx) in results.items():
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol, msg=alternative)
        torch.testing.assert_close(dx, dx0, rtol=tol, atol=tol, msg=alternative)


CROSSOVER = crossover_shapes(preset_from_env())


@pytest.mark.parametrize("shape", CROSSOVER[:2] + CROSSOVER[-2:], ids=lambda s: s.id)
def test_crossover_paths_agree(shape, preset, device):
    """Each forced dispatch path (the fused kernel too, under the interpreter on CPU)
    computes what the dense layer does, so the crossover sweep times like with like."""
    paths = [p for p in CROSSOVER_PATHS if p != "fused" or fused_can_run(shape, preset, device)]
    assert "chain" in paths and "materialized" in paths
    results = {}
    for alternative in ("dense", *paths):
        torch.manual_seed(1)
        results[alternative] = layer_case(shape, alternative, preset, device)()
    y0, dx0 = results["dense"]
    tol = 1e-4 if device.type == "cpu" else 5e-3
    for alternative, (y, dx) in results.items():
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol, msg=alternative)
        torch.testing.assert_close(dx, dx0, rtol=tol, atol=tol, msg=alternative)


def test_crossover_report_names_the_fastest_path_and_the_dispatch_choice(preset, device):
    from .report import markdown, run
    report = run(preset, device, ["crossover"], log=lambda _: None)
    rows = [r for r in report["results"] if r["group"] == "crossover"]
    assert {(r["rows"], r["rank"]) for r in rows} == {(s.rows, s.rank) for s in CROSSOVER}
    assert all(r["dispatch"] in CROSSOVER_PATHS and r["time_ms"] > 0 for r in rows)
    text = markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| gpt2.mlp.c_fc")]
    assert len(table) == sum(s.model == "gpt2" for s in CROSSOVER)
