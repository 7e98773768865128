"""Shared test utilities: relative error and small model builders."""
import torch
import torch.nn as nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| computed in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def small_cnn(dtype=torch.float64) -> nn.Module:
    """Convs with stride, padding, dilation, groups, depthwise, no-bias, then a Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 7, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(7, 7, 3, padding=2, dilation=2, groups=7, bias=False),  # depthwise
        nn.Conv2d(7, 10, (3, 2), padding=(1, 0), groups=1, bias=False),
        nn.Conv2d(10, 6, 1, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 5 * 3, 9),
    ).to(dtype)
