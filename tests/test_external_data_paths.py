"""External weights outside the model's folder (`../x.bin`, an absolute path, a link that leaves
it, in the main graph or a subgraph) are refused by every command that reads an ONNX file as one
line, exit 2, nothing written, and before that file is looked at: a location that does not exist
gets the same refusal, and a FIFO as the target (which an open would block on) is never opened."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fault_cases import EXAMPLE, handled
from ticknorm.cli import main

ROOT = Path(__file__).resolve().parent.parent
WEIGHT = np.arange(4, dtype=np.float32)
OUTSIDE = "outside the model's folder"


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(WEIGHT, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(WEIGHT.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model(location: str, where: str = "graph") -> onnx.ModelProto:
    """y = x + w, w external at `location`; `where` "branch" puts it in an If branch instead,
    "function" in a Constant of a model-local function's body."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if where == "graph":
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y],
                                  [_external("w", location)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if where == "function":
        body = [helper.make_node("Constant", [], ["c"], value=_external("c", location)),
                helper.make_node("Add", ["a", "c"], ["out"])]
        function = helper.make_function("local", "AddC", ["a"], ["out"], body, [helper.make_opsetid("", 17)])
        graph = helper.make_graph([helper.make_node("AddC", ["x"], ["y"], domain="local")], "g", [x], [y])
        return helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 17),
                                                                             helper.make_opsetid("local", 1)])
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])],
                               [_external("b", location)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["chosen"], then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["x", "chosen"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [cond])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A model folder beside an outside folder: one file per way out, and one legitimate model
    whose weights sit in a subfolder."""
    root = tmp_path_factory.mktemp("extdata")
    folder, outer = root / "model", root / "outer"
    (folder / "weights").mkdir(parents=True)
    outer.mkdir()
    (folder / "weights" / "w.bin").write_bytes(WEIGHT.tobytes())
    (outer / "outside.bin").write_bytes(WEIGHT.tobytes())
    os.mkfifo(outer / "fifo")
    os.symlink(outer / "outside.bin", folder / "link.bin")
    os.symlink(outer, folder / "linked")
    os.symlink(folder / "weights" / "w.bin", folder / "inside_link.bin")
    cases = {"climbs": "../outer/outside.bin", "absolute": str(outer / "outside.bin"), "link": "link.bin",
             "linked folder": "linked/outside.bin", "missing": "../outer/nope.bin",
             "windows drive": "C:\\weights\\w.bin", "fifo": "../outer/fifo"}
    files = {}
    for name, location in cases.items():
        files[name] = folder / f"{name.replace(' ', '_')}.onnx"
        onnx.save(_model(location), str(files[name]))
    for where in ("branch", "function"):
        files[f"in a {where}"] = folder / f"{where}.onnx"
        onnx.save(_model("../outer/outside.bin", where), str(files[f"in a {where}"]))
    files["inside link"] = folder / "inside_link.onnx"
    onnx.save(_model("inside_link.bin"), str(files["inside link"]))
    files["inside"] = folder / "inside.onnx"
    onnx.save(_model("weights/w.bin"), str(files["inside"]))
    reference = _saved_run(root)
    bundle = root / "bundle"
    made = CliRunner().invoke(main, ["drift", "snapshot", str(files["inside"]), *reference, "-o", str(bundle)])
    assert made.exit_code == 0, made.output
    return root, files, reference, bundle


def _saved_run(root: Path) -> list[str]:
    """Saved inputs and the outputs they give (x + w), as the options that judge against them."""
    from polygraphy.comparator import IterationResult, RunResults

    np.savez(root / "inputs.npz", x=WEIGHT)
    results = RunResults()
    results.append(("torch", [IterationResult({"y": WEIGHT * 2}, runner_name="torch")]))
    results.save(str(root / "outputs.json"))
    return ["--input-file", str(root / "inputs.npz"), "--reference-outputs", str(root / "outputs.json")]


def _commands(model: Path, root: Path, reference: list[str], bundle: Path) -> dict[str, tuple[list, Path | None]]:
    """Every command that reads an ONNX file, with the output it must not write."""
    out = root / "out"
    return {
        "inspect": (["inspect", str(model)], None),
        "fuse": (["fuse", str(model), "-o", str(out / "fused.onnx")], out / "fused.onnx"),
        "convert": (["convert", str(model), "--precision", "fp16", "-o", str(out / "half.onnx")], out / "half.onnx"),
        "trtexec-command": (["trtexec-command", str(model), "--prefix", str(out / "t")], None),
        "compare": (["compare", str(model), *reference, "--json", str(out / "c.json")], out / "c.json"),
        "drift snapshot": (["drift", "snapshot", str(model), *reference, "-o", str(out / "bundle")], out / "bundle"),
        "drift check": (["drift", "check", str(bundle), str(model), "--no-history"], None),
        # refused before the PyTorch model is built
        "profile": (["profile", str(model), "--model", EXAMPLE, "--runtime", "ort", "--json", str(out / "p.json")],
                    out / "p.json"),
        "report": (["report", str(model), "--model", EXAMPLE, "--runtime", "torch", "-o", str(out / "r.html")],
                   out / "r.html"),
    }


WAYS_OUT = ["climbs", "absolute", "link", "linked folder", "missing", "windows drive", "in a branch", "in a function"]


@pytest.mark.parametrize("way", WAYS_OUT)
def test_weights_outside_the_folder_are_one_line_for_every_command(made, way):
    root, files, reference, bundle = made
    failures = {}
    for command, (argv, output) in _commands(files[way], root, reference, bundle).items():
        result = CliRunner().invoke(main, argv)
        why = handled(result.exit_code, result.stderr, OUTSIDE, output)
        if why:
            failures[command] = why
    assert not failures, failures


def test_the_line_names_the_tensor_and_its_location(made):
    root, files, reference, bundle = made
    result = CliRunner().invoke(main, ["inspect", str(files["climbs"])])
    line = result.stderr.strip()
    assert line.startswith("error: weights outside the model's folder are refused: ")
    assert "tensor 'w'" in line and "'../outer/outside.bin'" in line
    branch = CliRunner().invoke(main, ["inspect", str(files["in a branch"])]).stderr
    assert "tensor 'b'" in branch
    function = CliRunner().invoke(main, ["inspect", str(files["in a function"])]).stderr
    assert "tensor 'c'" in function


@pytest.mark.parametrize("argv", [["inspect"], ["fuse", "-o", "{root}/fifo_fused.onnx"]], ids=["inspect", "fuse"])
def test_a_fifo_outside_is_never_opened(made, argv):
    """Opening a FIFO for reading blocks until a writer comes: a command that returns in time
    did not open it."""
    root, files, _, _ = made
    command = [sys.executable, "-m", "ticknorm.cli", argv[0], str(files["fifo"]),
               *[part.format(root=root) for part in argv[1:]]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and OUTSIDE in lines[0], done.stderr
    assert not (root / "fifo_fused.onnx").exists()


def test_weights_in_a_subfolder_still_load(made):
    root, files, reference, bundle = made
    assert CliRunner().invoke(main, ["inspect", str(files["inside"])]).exit_code == 0
    checked = CliRunner().invoke(main, ["drift", "check", str(bundle), str(files["inside"]), "--no-history"])
    assert checked.exit_code == 0, checked.output
    fused = CliRunner().invoke(main, ["fuse", str(files["inside"]), "-o", str(root / "inside_fused.onnx")])
    assert fused.exit_code == 0, fused.output


def test_a_link_that_stays_inside_is_onnx_s_own_one_line(made):
    """Not outside, so not refused here; onnx's reader refuses every link when it loads the
    weights, and says so in one line, not as an unexpected error."""
    result = CliRunner().invoke(main, ["inspect", str(made[1]["inside link"])])
    assert handled(result.exit_code, result.stderr, "is a symbolic link", None) is None, result.stderr
