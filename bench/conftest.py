"""Shared fixtures of the pytest-benchmark suite: the preset (SVDKERN_BENCH_PRESET, smoke by
default, so `pytest bench --benchmark-disable` is the CI smoke run) and the device."""
import pytest
import torch

from .config import default_device, preset_from_env


@pytest.fixture(scope="session")
def preset():
    return preset_from_env()


@pytest.fixture(scope="session")
def device():
    return default_device()


@pytest.fixture(autouse=True, scope="package")
def one_cpu_thread():
    """On a CPU shared with other jobs, torch's thread pool spins on busy cores and small
    ops slow down by orders of magnitude; one thread keeps the smoke run fast and stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
