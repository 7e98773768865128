"""How svdkern is installed and imported: the library apart from its app, the kernels in the
wheel and in the source tree, and a checkout that never shadows PyPI's `kernels` package."""
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile

import pytest

import svdkern
from tests.helpers import REPO, run_script

# Makes the app's dependencies unimportable, as in an environment without the `app` extra
# (a None entry in sys.modules: `import` raises ModuleNotFoundError, find_spec says None).
BLOCK_APP_DEPENDENCIES = ("import sys\n"
                          "sys.modules.update(sklearn=None, matplotlib=None, tqdm=None)\n")


def test_the_library_runs_without_the_app_dependencies():
    done = run_script(BLOCK_APP_DEPENDENCIES + (
        "import torch, torch.nn as nn, svdkern\n"
        "model = svdkern.decompose(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(),\n"
        "                                        nn.Linear(4 * 4 * 4, 3)))\n"
        "loss = model(torch.randn(2, 1, 6, 6)).sum() + svdkern.SVDRegularizer(model)()\n"
        "loss.backward()\n"
        "svdkern.prune(model, 0.1)\n"
        "svdkern.export(model)\n"
        "str(svdkern.summary(model, example_input=torch.randn(1, 1, 6, 6), verbose=False))\n"
        "assert not [m for m in sys.modules if m.startswith('svdkern.app')], 'app imported'\n"
        "frameworks = {'transformers', 'lightning', 'safetensors', 'triton'} & set(sys.modules)\n"
        "assert not frameworks, f'import svdkern loaded {frameworks}'\n"
        "print('ok')\n"))
    assert done.returncode == 0 and done.stdout.split()[-1:] == ["ok"], done.stderr[-2000:]


def test_the_app_without_its_dependencies_says_what_to_install():
    done = run_script(BLOCK_APP_DEPENDENCIES + "import runpy\n"
                      "runpy.run_module('svdkern', run_name='__main__')\n")
    assert done.returncode == 1
    assert "scikit-learn, matplotlib, tqdm" in done.stderr and '".[app]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_no_package_path_hack():
    """svdkern's package path is its own folder: the repository's other folders are not
    subpackages (`svdkern.bench` was the repository's bench/)."""
    assert len(svdkern.__path__) == 1
    assert importlib.util.find_spec("svdkern.bench") is None
    assert importlib.util.find_spec("svdkern.tests") is None


def test_the_source_tree_imports_its_kernels_as_installed():
    """From the repository root with no installer's finder (PYTHONPATH, a copied tree),
    `svdkern.kernels` is the top-level kernels/ folder, a namespace portion."""
    done = run_script(
        "import os, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import svdkern.kernels, svdkern.kernels.svd_linear as L\n"
        "assert getattr(svdkern.kernels, '__file__', None) is None  # namespace portion\n"
        "assert os.path.samefile(os.path.dirname(L.__file__), 'kernels'), L.__file__\n"
        "print('found')\n", TRITON_INTERPRET="1")
    assert done.returncode == 0 and "found" in done.stdout, done.stderr[-2000:]


def _copy_of_the_tree(dest):
    """The checkout's tracked files (symbolic links kept), so a build leaves the tree alone."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif source.exists():
            shutil.copy2(source, target)
    return dest


def _offline_wheels() -> bool:
    """Whether the installed setuptools builds wheels with no network: from 70.1 it has
    bdist_wheel itself, before that it needs the `wheel` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _offline_wheels(), reason="the installed setuptools cannot build a wheel "
                    "offline (setuptools < 70.1 without the wheel package; the test extra "
                    "installs setuptools >= 70.1)")
def test_the_wheel_carries_the_kernels_and_nothing_else(tmp_path):
    """`pip wheel .` with the installed setuptools (no network, as on the device image); from
    the tree's root, where a folder passing for PyPI's `kernels` broke egg_info."""
    tree = _copy_of_the_tree(tmp_path / "tree")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
                          cwd=tree, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("svdkern-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in ("svd_linear", "orthogonality", "sparsity"):
        assert f"svdkern/kernels/{kernel}.py" in names
    tops = {name.split("/")[0] for name in names}
    assert tops == {"svdkern", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert not any(name.startswith("svdkern/kernels/__init__") for name in names)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None
                    or "site-packages" not in str(importlib.util.find_spec("kernels").origin),
                    reason="PyPI's kernels package is not installed (transformers >= 5.25 "
                           "brings it; CI installs it)")
def test_the_checkout_never_shadows_pypi_kernels():
    """From the repository root `import kernels` is Hugging Face's, and transformers' kernel
    hub integration imports."""
    done = run_script("import kernels, transformers.integrations.hub_kernels\n"
                      "print(kernels.__file__)\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "site-packages" in done.stdout and str(REPO / "kernels") not in done.stdout
