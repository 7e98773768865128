"""Shared test utilities: relative error, small model builders, compiling for a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]


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


def run_script(script: str, **env: str | None) -> subprocess.CompletedProcess:
    """Run a Python `script` in a fresh interpreter from the repository root, with the
    environment variables in `env` set (None: removed)."""
    environ = dict(os.environ)
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run([sys.executable, "-c", script], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def run_without_interpreter(script: str) -> subprocess.CompletedProcess:
    """`run_script` without TRITON_INTERPRET: what this process, which runs Triton in
    interpreter mode, cannot do."""
    return run_script(script, TRITON_INTERPRET=None)


def compile_for_sm90(script: str) -> None:
    """Run `script`, which compiles kernels for sm_90 and prints "compiled". The interpreter
    does not check what only the compiler does (dot operand types, loop-carried types,
    globals): this does, no GPU needed."""
    done = run_without_interpreter(script)
    if "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's CUDA toolchain is not installed")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def config_id(cfg) -> str:
    """Test id of a Triton config: its block sizes, warps and stages."""
    blocks = "-".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cfg.kwargs.items())
    return f"{blocks}-w{cfg.num_warps}-s{cfg.num_stages}"


def distinct_blocks(configs: list) -> list:
    """The first config of each distinct block shape: the interpreter ignores warps and
    stages, so configs differing only in those run the same program there."""
    first: dict = {}
    for cfg in configs:
        first.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    return list(first.values())
