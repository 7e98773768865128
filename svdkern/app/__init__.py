"""The training application behind `python -m svdkern` (CLI, pipeline, datasets, models,
plots). It needs the `app` extra (`pip install -e ".[app]"`: scikit-learn, matplotlib,
tqdm); the library (`import svdkern`) never imports this package."""
from __future__ import annotations

import importlib.util

# import name -> PyPI name of what the app needs beyond svdkern's own dependencies
REQUIRES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def missing_dependency() -> str | None:
    """Why the app cannot run (the extras to install), or None when all are there."""
    missing = [pypi for name, pypi in REQUIRES.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"python -m svdkern needs {', '.join(missing)}: install the app extra "
            "(pip install -e \".[app]\" from a clone, or pip install \"svdkern[app]\")")
