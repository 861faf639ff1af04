"""The report page as a person sees it: rendered by headless Chromium where it is installed."""

import shutil
import subprocess

import pytest
from click.testing import CliRunner

from ticknorm import ExportOptions, Inputs, ModelRef, api
from ticknorm.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXAMPLE = ["--model", "examples/tiny_transformer.py:build", "--checkpoint", "examples/tiny_transformer.safetensors"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_report_page_renders_in_chromium(tmp_path):
    model = ModelRef("examples/tiny_transformer.py:build", "examples/tiny_transformer.safetensors")
    api.export(model, Inputs(("input_ids:batch=2xseq=16:int64:0..1000",)), tmp_path / "m.onnx",
               ExportOptions(exporter="torchscript"))
    done = CliRunner().invoke(main, ["report", str(tmp_path / "m.onnx"), *EXAMPLE, "--input", "input_ids:2x16:int64:0..1000",
                                     "--iterations", "3", "--warmup", "1", "--depth", "3", "-o", str(tmp_path / "r.html")])
    assert done.exit_code == 0, done.output
    shot = tmp_path / "r.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1800",
                    f"--screenshot={shot}", (tmp_path / "r.html").as_uri()], capture_output=True, timeout=120, check=True)
    png = shot.read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 50_000  # a page with the plot and the table, not a blank one
    page = (tmp_path / "r.html").read_text()
    assert "<td>layers.0.attention_norm</td>" in page and "model_digest" in page
