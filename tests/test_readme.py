"""Every python block of README's "With your trainer" and "Deploy" sections runs as written."""
import re

import pytest

from tests.helpers import REPO

SECTIONS = ("With your trainer", "Deploy")


def readme_blocks():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = []
    for title in SECTIONS:
        section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
        assert section, f"README has no section {title!r}"
        found = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
        assert found, f"README section {title!r} has no python block"
        blocks += [pytest.param(code, id=f"{title}-{i}") for i, code in enumerate(found)]
    return blocks


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for needed in re.findall(r"^(?:from|import) (transformers|lightning)\b", code, re.M):
        pytest.importorskip(needed)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
