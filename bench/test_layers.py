"""Layer forward + backward: dense, eager reference, compiled reference, svdkern."""
import pytest
import torch

from .cases import (INIT_ALTERNATIVES, LAYER_ALTERNATIVES, TRADEOFF_ALTERNATIVES, ConvShape,
                    LayerShape, crossover_case, crossover_paths, crossover_shapes, init_case,
                    layer_case, layer_shapes, tradeoff_case, tradeoff_shapes)
from .config import preset_from_env

SHAPES = layer_shapes(preset_from_env())


TRADEOFFS = tradeoff_shapes(preset_from_env())
# (case builder, shape, alternative): the layer group, then the tradeoffs group (biased)
LAYER_CASES = ([(layer_case, s, a) for s in SHAPES for a in LAYER_ALTERNATIVES]
               + [(tradeoff_case, s, a) for s in TRADEOFFS for a in TRADEOFF_ALTERNATIVES])


@pytest.mark.parametrize("build,shape,alternative", LAYER_CASES,
                         ids=[f"{b.__name__}-{s.id}-{a}" for b, s, a in LAYER_CASES])
def test_layer_forward_backward(benchmark, build, shape, alternative, preset, device):
    benchmark.group = f"{build.__name__} {shape.id}"
    y, dx = benchmark(build(shape, alternative, preset, device))
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


def test_tradeoff_alternatives_agree(preset, device):
    """Dense, the chain with the bias in its GEMM and the chain with it apart compute the
    same output and input gradient, at a rank the fused kernel holds and at one past it."""
    assert any(s.rank <= 128 for s in TRADEOFFS) and any(s.rank > 128 for s in TRADEOFFS)
    tol = 1e-4 if device.type == "cpu" else 5e-3
    for shape in (TRADEOFFS[0], TRADEOFFS[-1]):
        y0, dx0 = tradeoff_case(shape, "dense", preset, device)()
        for alternative in TRADEOFF_ALTERNATIVES[1:]:
            y, dx = tradeoff_case(shape, alternative, preset, device)()
            torch.testing.assert_close(y, y0, rtol=tol, atol=tol, msg=alternative)
            torch.testing.assert_close(dx, dx0, rtol=tol, atol=tol, msg=alternative)


CROSSOVER = crossover_shapes(preset_from_env())
LINEAR_CROSSOVER = [s for s in CROSSOVER if isinstance(s, LayerShape)]
CONV_CROSSOVER = [s for s in CROSSOVER if isinstance(s, ConvShape)]


@pytest.mark.parametrize("shape", LINEAR_CROSSOVER[:2] + LINEAR_CROSSOVER[-1:] +
                         CONV_CROSSOVER[:2] + CONV_CROSSOVER[-1:], ids=lambda s: s.id)
def test_crossover_paths_agree(shape, preset, device):
    """Each forced dispatch path (the fused kernel too, under the interpreter on CPU)
    computes the same output and input gradient, so the crossover sweep times like with
    like; linear cases also match the dense layer."""
    paths = crossover_paths(shape, preset, device)
    assert {"chain", "materialized"} <= set(paths)
    assert ("fused" in paths) == isinstance(shape, LayerShape)  # CPU: the interpreter
    names = paths + (["dense"] if isinstance(shape, LayerShape) else [])
    results = {}
    for name in names:
        torch.manual_seed(1)  # the same weights and inputs for every path
        results[name] = crossover_case(shape, name, preset, device)()
    y0, dx0 = results["chain"]
    tol = 1e-4 if device.type == "cpu" else 5e-3
    for name, (y, dx) in results.items():
        torch.testing.assert_close(y, y0, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(dx, dx0, rtol=tol, atol=tol, msg=name)


def test_crossover_report_names_the_fastest_path_and_the_dispatch_choice(preset, device):
    from .report import markdown, run
    # on_row renders each partial report, as the script does (the first row once lacked
    # the fields the crossover table reads, which crashed every crossover run)
    report = run(preset, device, ["crossover"], log=lambda _: None, on_row=markdown)
    rows = [r for r in report["results"] if r["group"] == "crossover"]
    assert {r["case"] for r in rows} == {s.id for s in CROSSOVER}
    assert all(r["dispatch"] in ("chain", "materialized", "fused") and r["time_ms"] > 0
               for r in rows)
    text = markdown(report)
    for layer, shapes in (("| gpt2.mlp.c_fc |", LINEAR_CROSSOVER),
                          ("| resnet50.layer1.conv2 3x3 (conv) |", CONV_CROSSOVER)):
        table = [line for line in text.splitlines() if line.startswith(layer)]
        assert len(table) == sum(f"{s.model}.{s.layer}" in layer for s in shapes)


def test_report_selects_cases_and_hands_over_every_row(preset, device):
    """`--cases` globs pick layer cases by id; `on_row` sees the report grow one row at a
    time (the script rewrites its files there), and the markdown of a report cut short
    before svdkern was timed leaves that case out instead of failing."""
    from .report import markdown, run
    wanted = [SHAPES[-1].id]
    seen = []
    report = run(preset, device, ["layers"], log=lambda _: None, cases=wanted,
                 on_row=lambda rep: seen.append(len(rep["results"])))
    assert {r["case"] for r in report["results"]} == set(wanted)
    assert seen == list(range(1, len(LAYER_ALTERNATIVES) + 1))
    assert f"| {wanted[0]} |" in markdown(report)
    assert LAYER_ALTERNATIVES[-1] == "svdkern"
    cut = dict(report, results=report["results"][:-1])  # cut short before svdkern ran
    assert f"| {wanted[0]} |" not in markdown(cut)


def test_a_failing_case_is_recorded_and_the_group_goes_on(preset, device, monkeypatch):
    """An error in one case (an OOM, a compiler error) must not cost the rest of the run."""
    from . import report as report_module
    real = report_module.layer_case

    def flaky(shape, alternative, *args):
        if alternative == "compiled reference":
            raise RuntimeError("out of memory (simulated)")
        return real(shape, alternative, *args)
    monkeypatch.setattr(report_module, "layer_case", flaky)
    wanted = [s.id for s in SHAPES[:2]]
    report = report_module.run(preset, device, ["layers"], log=lambda _: None, cases=wanted,
                               on_row=report_module.markdown)
    rows = report["results"]
    assert len(rows) == 2 * len(LAYER_ALTERNATIVES)
    failed = [r for r in rows if r.get("error")]
    assert [r["alternative"] for r in failed] == ["compiled reference"] * 2
    assert all(r["time_ms"] > 0 for r in rows if not r.get("error"))
    text = report_module.markdown(report)
    assert "## Errors" in text and "out of memory (simulated)" in text
    assert all(f"| {case} |" in text for case in wanted)  # svdkern timed: rows stay


def test_a_model_whose_svd_form_fails_still_times_its_other_groups(preset, device, monkeypatch):
    from . import report as report_module

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(report_module, "regularizer_work", out_of_memory)
    report = report_module.run(preset, device, ["regularizer", "inference"], models=("gpt2",),
                               log=lambda _: None)
    groups = [(r["group"], bool(r.get("error"))) for r in report["results"]]
    assert ("regularizer", True) in groups and ("inference", False) in groups
    assert "out of memory (simulated)" in report_module.markdown(report)


@pytest.mark.parametrize("alternative", INIT_ALTERNATIVES)
def test_layer_from_scratch(benchmark, alternative, device):
    """Building a square layer (256 here; the report times 1024 and 4096)."""
    benchmark.group = "init 256x256"
    out = benchmark(init_case(256, alternative, device))
    assert torch.isfinite(out).all()
