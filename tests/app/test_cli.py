"""`python -m svdkern train|compare` end to end on the bundled digits with tiny epochs:
the printed table and every file written (JSON numbers, markdown report, PNG plots)."""
import json
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

from tests.app.cifar_files import write_cifar_folder
from svdkern.app.cli import main

TINY = ["--epochs", "2", "--finetune-epochs", "1", "--no-progress", "--train-samples", "300"]


def _check_png(path):
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # not a blank canvas


@pytest.mark.parametrize("method, model", [("svd", "cnn"), ("trp", "cnn"), ("truncate", "mlp")])
def test_train_writes_json_report_plots(tmp_path, capsys, method, model):
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", model, "--energy", "0.2",
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "result.json").read_text())
    assert r["method"] == method and r["energy"] == 0.2 and r["config"]["epochs"] == 2
    assert 0 <= r["accuracy"] <= 100 and 0 <= r["accuracy_before"] <= 100
    assert len(r["history"]) == 2
    layers = r["summary"]["layers"]
    assert [l["name"] for l in layers] == list(r["ranks"]) == list(r["spectra"]["after"])
    for l in layers:
        assert r["ranks"][l["name"]] == [l["rank"], l["full_rank"]]
        assert len(r["spectra"]["after"][l["name"]]) == l["rank"]
        assert len(r["spectra"]["before"][l["name"]]) == l["full_rank"]
    assert r["deployed_flops"] <= r["dense_flops"] and r["flops"] == r["summary"]["total"]["flops"]
    assert any(k < full for k, full in r["ranks"].values())  # energy 0.2 prunes something
    assert 0 <= r["dense_accuracy"] <= 100
    # same budget: 300 samples at batch 128 (trp) or 32, two epochs
    assert r["dense_steps"] == r["steps"] == (3 if method == "trp" else 10) * 2
    first = printed.splitlines()[0]  # the reduction, the accuracy and the dense model's first
    assert first == (f"{method} energy=0.2: {r['dense_flops'] / r['deployed_flops']:.1f}x fewer "
                     f"deployed FLOPs than dense at {r['accuracy']:.2f}% test accuracy (dense "
                     f"model, same budget: {r['dense_accuracy']:.2f}%)")
    assert "total" in printed
    report = (out / "report.md").read_text()
    assert f"# svdkern train: {method}" in report and r["table"] in report
    for png in ("spectra.png", "ranks.png", "accuracy_vs_flops.png"):
        assert f"]({png})" in report
        _check_png(out / png)


def test_train_on_cifar_folder(tmp_path):
    write_cifar_folder(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "cnn",
                 "--method", "truncate", "--out", str(out), *TINY]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["config"]["data"] == "cifar10" and r["summary"]["layers"][0]["shape"] == [32, 27]
    assert len(r["history"]) == 2


def test_missing_cifar_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "svdkern: error:" in err and "does not exist" in err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "svdkern", "train", "--data", "cifar10",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr


@pytest.mark.parametrize("command, flag, value, named", [
    ("train", "--energy", "1.5", "energy"), ("train", "--rank-multiple", "0", "rank_multiple"),
    ("train", "--batch-size", "0", "batch_size"), ("train", "--batch-size", "-5", "batch_size"),
    ("train", "--lr", "0", "lr"), ("train", "--lambda-o", "-1", "lambda_o"),
    ("train", "--nuclear", "nan", "nuclear"), ("train", "--lambda-s", "inf", "lambda_s"),
    ("train", "--trp-period", "0", "trp_period"),
    ("compare", "--energies", "0.1,1.5", "energy")])
def test_bad_setting_is_a_clear_error_before_any_work(tmp_path, capsys, command, flag, value,
                                                       named):
    out = tmp_path / "run"
    assert main([command, flag, value, "--out", str(out), "--no-progress"]) == 2
    assert f"{named} must be" in capsys.readouterr().err
    assert not out.exists()


def test_sparsity_start_trains_orthogonality_only_first(tmp_path, monkeypatch):
    """--sparsity-start E: the paper's stage 1 (orthogonality only) for E epochs, then the
    sparsity term, then fine-tuning without it: recorded at every penalty call; each stage
    with a fresh optimizer, as the official scripts run them."""
    import svdkern.app.pipeline as pipeline
    from svdkern.methods.svd_training import SVDTraining
    seen, built = [], []
    penalty = SVDTraining.penalty
    make = pipeline.make_optimizer
    monkeypatch.setattr(pipeline, "make_optimizer",
                        lambda cfg, model: built.append(model) or make(cfg, model))

    def recording(self):
        seen.append(self.regularizer.sparsity)
        return penalty(self)
    monkeypatch.setattr(SVDTraining, "penalty", recording)
    assert main(["train", "--model", "mlp", "--epochs", "3", "--finetune-epochs", "1",
                 "--sparsity-start", "1", "--no-progress", "--train-samples", "300",
                 "--batch-size", "100", "--out", str(tmp_path)]) == 0
    assert seen == [None] * 3 + ["hoyer"] * 3 + [None] * 3  # 300 samples = 3 batches/epoch
    # stage 1, stage 2 and fine-tuning each built one (the last model, the dense baseline's)
    assert len(built) == 4 and built[0] is built[1] and built[1] is not built[2]


def test_sparsity_start_after_pruning_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--epochs", "4", "--finetune-epochs", "1", "--sparsity-start", "4",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "sparsity_start must be in [0, 3]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["compare", "--energies", "0.1,abc"], "--energies: expected comma-separated numbers such "
                                           "as 0.05,0.1, got '0.1,abc'"),
    (["compare", "--methods", "svd,foo"], "--methods: unknown method(s) foo; choose from svd, "
                                          "trp, truncate"),
])
def test_unparsable_lists_name_the_option_and_the_problem(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--data-dir", "somewhere"], "--data-dir is read with --data cifar10 only (got --data "
                                  "digits)"),
    (["--device", "gpu"], "--device 'gpu': "),
])
def test_ignored_or_impossible_options_are_clear_errors(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("svdkern: error: ") and message in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a build without CUDA")
def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_help_shows_every_default():
    text = subprocess.run([sys.executable, "-m", "svdkern", "train", "--help"], capture_output=True,
                          text=True, check=True).stdout
    for piece in ("(default: svd)", "(default: svdkern-run)", "(default: cnn;",
                  "(default: 0.002 on digits, 0.01 on cifar10 and text)", "(default: hoyer)",
                  "0.01 hoyer_square", "default: official"):
        assert piece in " ".join(text.split()), piece
    text = subprocess.run([sys.executable, "-m", "svdkern", "compare", "--help"],
                          capture_output=True, text=True, check=True).stdout
    for piece in ("(default: svd,trp,truncate)", "(default: 0,1,2)", "(default: 0.333,1,3)",
                  "(default: 0.2)", "(default: 0.002,0.01,0.05,0.1,0.2)"):
        assert piece in " ".join(text.split()), piece


def test_threshold_prunes_by_value_and_trp_refuses_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "truncate", "--model", "mlp", "--threshold", "0.5",
                 "--out", str(out), *TINY]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["threshold"] == 0.5 and r["energy"] is None
    assert capsys.readouterr().out.startswith("truncate threshold=0.5: ")
    assert main(["train", "--method", "trp", "--threshold", "0.5", "--out", str(out)]) == 2
    assert "TRP truncates by the energy rule" in capsys.readouterr().err


def test_train_char_lstm_on_text_reports_perplexity_per_token(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["train", "--model", "lstm", "--data", "text", "--energy", "0.3",
                 "--out", str(out), "--epochs", "2", "--finetune-epochs", "1", "--no-progress",
                 "--train-samples", "96"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["metric"] == "perplexity" and r["unit"] == "token"
    assert 1 < r["perplexity"] < 128 and 1 < r["dense_perplexity"] < 128  # vocabulary: 128
    assert "accuracy" not in r and list(r["history"][0]) == ["epoch", "phase", "loss",
                                                             "test_perplexity"]
    # per token: the LSTM's four matrices and the decoder, 2 FLOPs per weight
    assert r["dense_flops"] == 2 * (512 * 64 + 3 * 512 * 128 + 128 * 128)
    assert r["flops"] < r["dense_flops"]  # energy 0.3 prunes the SVD form
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"svd energy=0.3: {r['dense_flops'] / r['deployed_flops']:.1f}x fewer "
                     f"deployed FLOPs than dense at test perplexity {r['perplexity']:.3f} "
                     f"(dense model, same budget: {r['dense_perplexity']:.3f})")
    _check_png(out / "accuracy_vs_flops.png")


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "lstm"], "--model lstm does not read --data digits"),
    (["train", "--data", "text"], "--model cnn does not read --data text"),
    (["compare", "--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["compare", "--lr-factors", "0,1"], "--lr-factors must be finite and > 0, got (0.0, 1.0)"),
    (["compare", "--seeds", "0,0"], "--seeds lists a value twice: 0,0"),
    (["compare", "--val-fraction", "0", "--tolerance", "2"], "--tolerance: read only when "
                                                              "tuning"),
    (["compare", "--train-samples", "2"], "validation fraction 0.2 of 2 training samples"),
    (["train", "--model", "lstm", "--data", "text", "--method", "trp", "--trp-scope",
      "official"], "TRP: scope='official' truncates only Conv2d layers"),
])
def test_model_data_and_study_mismatches_are_clear_errors(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unparsable_seeds_name_the_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--seeds", "0,x", "--out", str(tmp_path)])
    assert "--seeds: expected comma-separated integers such as 0,1,2, got '0,x'" in \
        capsys.readouterr().err
