"""Packaging for svdkern: the `svdkern` package plus the top-level `kernels/` folder
installed as `svdkern.kernels` (a namespace portion: no `__init__.py`, so a checkout's
`kernels/` never shadows PyPI's `kernels` package). pyproject.toml names the build
backend, whose editable installs (PEP 660) map `package_dir` for `pip install -e .` too."""
from setuptools import setup

APP = ["scikit-learn", "matplotlib", "tqdm"]  # python -m svdkern: data, plots, progress bars
TRANSFORMERS = ["transformers>=4.46", "accelerate>=0.26"]  # svdkern.integrations.transformers
LIGHTNING = ["lightning>=2.2"]  # svdkern.integrations.lightning
DEPLOY = ["safetensors>=0.4"]  # save_compressed / load_compressed
ONNX = ["onnx", "onnxscript", "onnxruntime"]  # the tests run exported models in ONNX Runtime

setup(
    name="svdkern",
    version="0.1.0",
    description="Triton kernels and PyTorch layers for SVD training of low-rank networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["svdkern", "svdkern.app", "svdkern.compress", "svdkern.integrations",
              "svdkern.kernels", "svdkern.layers", "svdkern.methods"],
    package_dir={"svdkern": "svdkern", "svdkern.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "app": APP,
        "transformers": TRANSFORMERS,
        "lightning": LIGHTNING,
        "deploy": DEPLOY,
        "triton": ["triton>=3.0"],
        # CI runs the bench smoke, the app's and the integrations' tests too, and checks
        # svdkern beside a current transformers (which brings PyPI's `kernels` package)
        # setuptools >= 70.1 builds wheels offline (tests/test_packaging.py builds one)
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "triton>=3.0",
                 "setuptools>=70.1",
                 "transformers>=5.25", *TRANSFORMERS[1:], *LIGHTNING, *DEPLOY, *ONNX, *APP],
        "bench": ["pytest-benchmark>=4", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["svdkern=svdkern.app.cli:main"]},
)
