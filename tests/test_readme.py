"""The README's Python example runs as written, in a fresh folder."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, capsys):
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(python_example(), "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(here)
    printed = capsys.readouterr().out
    assert "LayerNorm" in printed and "PASS" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx", "golden"]
