"""`svdkern compare`: equal optimizer steps, tuning on a validation split carved from the
training data, the operating-point rule, mean and spread over seeds."""
import json
import math

import pytest

import svdkern.app.pipeline as pipeline
from svdkern.app.cli import main
from svdkern.app.compare import Study, aggregate, equal_steps, rank_key
from svdkern.app.pipeline import TrainConfig

TINY = ["--epochs", "2", "--finetune-epochs", "1", "--no-progress", "--train-samples", "300"]


def _result(score, deployed, metric="accuracy", **extra):
    return {"metric": metric, metric: score, "deployed_flops": deployed, "flops": deployed,
            "dense_flops": 100, "deployed_params": deployed, "unit": "sample", **extra}


@pytest.mark.parametrize("tolerance, expected", [(1.0, 50), (0.2, 100), (5.0, 10)])
def test_operating_point_is_fewest_flops_within_tolerance(tolerance, expected):
    """Dense at 99%: 99.5% at 100, 98.5% at 50, 97% at 10 FLOPs."""
    results = [_result(99.5, 100), _result(98.5, 50), _result(97.0, 10)]
    study = Study((0.1,), tolerance=tolerance)
    best = min(results, key=lambda r: rank_key(r, 99.0, study))
    assert best["deployed_flops"] == expected


def test_operating_point_without_any_within_tolerance_is_the_best_score():
    results = [_result(97.0, 10), _result(98.0, 80), _result(96.0, 5)]
    best = min(results, key=lambda r: rank_key(r, 100.0, Study((0.1,))))
    assert best["accuracy"] == 98.0


def test_perplexity_tolerance_is_percent_above_dense_and_ranks_by_chosen_cost():
    """Dense 10.0, 1%: up to 10.1. Ranked by the SVD form's FLOPs (`cost="flops"`)."""
    results = [_result(10.05, 80, "perplexity", flops=30), _result(10.2, 40, "perplexity"),
               _result(10.08, 60, "perplexity", flops=20)]
    study = Study((0.1,), cost="flops")
    best = min(results, key=lambda r: rank_key(r, 10.0, study))
    assert best["perplexity"] == 10.08  # 20 SVD-form FLOPs; by deployed ones 10.05 would win


def test_aggregate_mean_and_sd_over_seeds():
    runs = [_result(98.0, 40, energy=0.1, method="svd", threshold=None, steps=7,
                    config={"lr": 1e-3}),
            _result(99.0, 60, energy=0.1, method="svd", threshold=None, steps=7,
                    config={"lr": 1e-3})]
    dense = [{"metric": "accuracy", "accuracy": 99.5, "flops": 100, "deployed_flops": 100,
              "deployed_params": 100, "lr": 3e-3, "steps": 7, "unit": "sample"}] * 2
    tuning = {"chosen": {"svd": {"energy": 0.1, "within_tolerance": True}}}
    dense_row, row = aggregate(runs, dense, tuning)
    assert dense_row["flops_ratio_mean"] == 1.0 and dense_row["accuracy_std"] == 0.0
    assert row["accuracy_mean"] == 98.5 and row["chosen"] and row["seeds"] == 2
    assert math.isclose(row["accuracy_std"], math.sqrt(0.5))  # sample sd of 98, 99
    assert row["flops_ratio_mean"] == 0.5 and math.isclose(row["flops_ratio_std"], math.sqrt(0.02))


def test_equal_steps_gives_every_method_one_batch_size():
    configs = {m: TrainConfig(method=m) for m in ("svd", "trp", "truncate")}
    assert {c.resolved().batch_size for c in equal_steps(configs).values()} == {32}
    assert TrainConfig(method="trp").resolved().batch_size == 128  # its own default
    configs = {m: TrainConfig(method=m, batch_size=50) for m in ("svd", "trp")}
    assert {c.batch_size for c in equal_steps(configs).values()} == {50}


def test_compare_tunes_on_validation_and_reports_test_over_seeds(tmp_path, capsys, monkeypatch):
    """Tuning runs score only the validation split (carved from training), the final runs
    only the test split; every method and the dense model take the same steps; the chosen
    learning rate is one of the candidates and its operating point is bold."""
    scored = []
    evaluate = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda model, data, device: scored.append(
        data.name) or evaluate(model, data, device))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "mlp", "--energies", "0.05,0.3", "--seeds", "0,1",
                 "--lr-factors", "1,3", "--out", str(out), *TINY]) == 0
    payload = json.loads((out / "compare.json").read_text())
    tuning = payload["tuning"]
    n_tuning = len(tuning["dense_candidates"])  # the dense runs are first
    assert set(scored[:scored.index("digits")]) == {"digits (validation split)"}
    assert len(tuning["candidates"]) == 3 * 2 * 2  # methods x lr factors x energies
    for method, chosen in tuning["chosen"].items():
        lrs = {c["lr"] for c in tuning["candidates"] if c["method"] == method} if method != \
            "dense" else {c["lr"] for c in tuning["dense_candidates"]}
        assert chosen["lr"] in lrs and len(lrs) == 2
    assert n_tuning == 2
    # final runs: test split only, both seeds, each method at its chosen lr, equal steps
    final = payload["results"]
    assert len(final) == 2 * 3 * 2 and {r["config"]["seed"] for r in final} == {0, 1}
    assert all(r["config"]["lr"] == tuning["chosen"][r["method"]]["lr"] for r in final)
    steps = {r["steps"] for r in final} | {d["steps"] for d in payload["dense_runs"]}
    assert steps == {20}  # 300 samples / batch 32 = 10 steps x 2 epochs, for every method
    rows = payload["rows"]
    assert [r["method"] for r in rows] == ["dense"] + ["svd"] * 2 + ["trp"] * 2 + ["truncate"] * 2
    assert [sum(r["chosen"] for r in rows if r["method"] == m) for m in ("svd", "trp",
                                                                         "truncate")] == [1, 1, 1]
    table = capsys.readouterr().out
    within = [c["within_tolerance"] for m, c in tuning["chosen"].items() if m != "dense"]
    assert "test accuracy %, mean (sd) of 2" in table
    assert table.count("**") == 4 * sum(within) and table.count(" †") == within.count(False)
    md = (out / "compare.md").read_text()
    assert "20 optimizer steps" in md and "validation split (0.2 of the training data" in md
    assert table.splitlines()[0] in md


def test_compare_without_tuning_runs_defaults(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "mlp", "--energies", "0.3", "--seeds", "0",
                 "--val-fraction", "0", "--methods", "svd", "--out", str(out), *TINY]) == 0
    payload = json.loads((out / "compare.json").read_text())
    assert payload["tuning"] is None and payload["results"][0]["config"]["lr"] == 3e-3
    assert not any(r["chosen"] for r in payload["rows"])
