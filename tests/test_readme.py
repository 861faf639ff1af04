"""The README stays an index, and the Python API page's example runs as written, in a fresh folder."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON_API = ROOT / "docs" / "python-api.md"
README_LIMIT = 6000  # characters: the front page lists and links; the manual lives in docs/


def python_example() -> str:
    section = PYTHON_API.read_text().split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_python_api_example_runs(tmp_path, capsys):
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(python_example(), str(PYTHON_API), "exec"), {"__name__": "readme"})
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out
    assert "LayerNorm" in printed and "PASS" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx", "golden"]


def test_the_readme_is_an_index():
    assert len(README.read_text()) < README_LIMIT
