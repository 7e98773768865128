"""summary(): parameters and FLOPs per layer against the dense original."""
import pytest
import torch
import torch.nn as nn

import svdkern
from tests.helpers import small_cnn


def test_linear_counts_and_ratios(capsys):
    model = svdkern.decompose(nn.Sequential(nn.Linear(40, 30)))
    with torch.no_grad():
        model[0].s[4:] = 0
    svdkern.prune(model, 0.01)
    result = svdkern.summary(model)
    (row,) = result.layers
    assert (row.rank, row.full_rank, row.shape) == (4, 30, (30, 40))
    assert row.params == 4 * (30 + 40 + 1) + 30 and row.dense_params == 30 * 40 + 30
    assert row.flops == 2 * 4 * 70 and row.dense_flops == 2 * 30 * 40
    printed = capsys.readouterr().out
    assert "total" in printed and "4/30" in printed


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_flops_match_a_direct_count(scheme):
    model = svdkern.decompose(small_cnn(), scheme=scheme, include=[nn.Conv2d, nn.Linear])
    x = torch.randn(1, 3, 10, 8, dtype=torch.float64)
    result = svdkern.summary(model, x, verbose=False)
    first = result.layers[0]
    # layer 0: Conv2d(3, 7, 3, stride 2, padding 1) on 10x8 -> 5x4 outputs
    assert first.dense_flops == 2 * 7 * 3 * 9 * 5 * 4
    r = first.rank
    if scheme == "channel":
        assert first.flops == 2 * r * 27 * 20 + 2 * 7 * r * 20
    else:  # kh x 1 conv over 5 x 8, then 1 x kw conv over 5 x 4
        assert first.flops == 2 * r * 9 * 5 * 8 + 2 * 7 * r * 3 * 20
    assert result.flops == sum(l.flops for l in result.layers)
    assert "conv2d-" in str(result) and result.to_dict()["total"]["dense_flops"] == result.dense_flops


def test_conv_flops_blank_without_example_input():
    result = svdkern.summary(svdkern.decompose(small_cnn()), verbose=False)
    assert result.layers[0].flops is None and result.flops is None
    assert result.layers[-1].flops is not None


def test_summary_probe_does_not_touch_batchnorm_or_mode():
    model = svdkern.decompose(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.train()
    before = model[1].running_mean.clone()
    svdkern.summary(model, torch.randn(2, 3, 6, 6), verbose=False)
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
    assert model.training


def test_coverage_names_what_is_dense_and_the_share_in_svd_form():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Bilinear(10, 10, 5))
    before = svdkern.coverage(model)
    assert before.converted == [] and before.svd_fraction == 0.0
    assert [name for name, _ in before.left_dense] == ["0", "1", "2"]
    with pytest.warns(UserWarning, match="no SVD form of Bilinear"):
        svdkern.decompose(model, skip=["1"])
    after = svdkern.coverage(model)
    bilinear = 5 * 10 * 10  # weight (out, in1, in2)
    assert after.converted == ["0"]
    assert after.svd_fraction == pytest.approx(100 / (100 + 100 + bilinear))
    assert dict(after.left_dense)["1"].startswith("svdkern converts it, but it was not")
    assert "1 SVD layers hold" in str(after) and "dense: 2: svdkern has no SVD form" in str(after)
