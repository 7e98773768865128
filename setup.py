"""Packaging for svdkern: the `svdkern` package plus the top-level `kernels/` folder
installed as `svdkern.kernels` (works for `pip install .` and `pip install -e .`)."""
from setuptools import setup

setup(
    name="svdkern",
    version="0.1.0",
    description="Triton kernels and PyTorch layers for SVD training of low-rank networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["svdkern", "svdkern.kernels"],
    package_dir={"svdkern": "svdkern", "svdkern.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy",
                      "scikit-learn", "matplotlib", "tqdm"],  # training CLI: data, plots, bars
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "triton>=3.0"],  # CI runs the bench smoke too
        "bench": ["pytest-benchmark>=4", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["svdkern=svdkern.cli:main"]},
)
