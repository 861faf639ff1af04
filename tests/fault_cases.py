"""Hostile input for every command, and writers killed at every rename: one table each, shared by
`tests/test_faults.py` (which asserts every case) and `benchmarks/faults.py` (which counts them).

A bad-input case is (name, command line, text the one-line error must hold). Files the cases
need are made by `make_files` in a folder, from a real export of the bundled example. A kill is
`os._exit` in a forked child at the n-th rename of a real writer: no `finally` runs, as with
SIGKILL; the parent then reads what is on disk."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from click.testing import CliRunner

from ticknorm import api
from ticknorm.base.inputs import Inputs
from ticknorm.base.manifest import write_manifest
from ticknorm.cli import main
from ticknorm.exporter.export import ExportOptions
from ticknorm.exporter.model_ref import ModelRef

EXAMPLE = "examples/tiny_transformer.py:build"
CHECKPOINT = "examples/tiny_transformer.safetensors"
SPEC = "input_ids:batch=2xseq=16:int64:0..1000"
BUNDLE_FILES = ["inputs.json", "outputs.json", "bundle.json"]


def make_files(folder: Path) -> dict:
    """The good files every case starts from, and the bad ones the cases feed."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "tiny.onnx"
    api.export(ModelRef(EXAMPLE, CHECKPOINT), Inputs((SPEC,)), good, ExportOptions(exporter="torchscript"))
    bundle = folder / "golden"
    api.snapshot(good, ModelRef(EXAMPLE, CHECKPOINT), Inputs((SPEC,)), bundle)
    np.savez(folder / "float.npz", input_ids=np.zeros((2, 16), np.float32))
    np.savez(folder / "rank.npz", input_ids=np.zeros((16,), np.int64))
    np.savez(folder / "long.npz", input_ids=np.zeros((2, 200), np.int64))
    np.savez(folder / "renamed.npz", ids=np.zeros((2, 16), np.int64))
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (folder / "corrupt.onnx").write_bytes(b"\x08\x07garbage that is no protobuf")
    (folder / "a_file").write_text("not a folder")
    state = {f"renamed.{key}": value for key, value in torch.load(_pt_checkpoint(folder), weights_only=True).items()}
    torch.save(state, folder / "renamed_keys.pt")
    torch.save({"w": _Evil()}, folder / "evil.pt")
    _unknown_op(good, folder / "unknown_op.onnx")
    external = folder / "external" / "big.onnx"
    api.fuse(good, external.parent / "staged.onnx")
    onnx.save_model(onnx.load(str(external.parent / "staged.onnx")), str(external), save_as_external_data=True,
                    location="big.onnx.data", size_threshold=0)
    (external.parent / "big.onnx.data").rename(external.parent / "moved.data")
    return {"good": good, "bundle": bundle}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this checkpoint ran code",))


def _pt_checkpoint(folder: Path) -> Path:
    from safetensors.torch import load_file

    path = folder / "tiny.pt"
    torch.save(load_file(CHECKPOINT), path)
    return path


def _unknown_op(source: Path, target: Path) -> None:
    model = onnx.load(str(source))
    node = model.graph.node[-1]
    node.op_type, node.domain = "NoSuchOp", "com.example"
    model.opset_import.add(domain="com.example", version=1)
    onnx.save(model, str(target))


def tampered_bundle(files: dict, folder: Path, name: str, change) -> Path:
    """A copy of the good bundle with bundle.json changed by `change` and its manifest rewritten to
    match: a bundle consistent with itself whose content is wrong."""
    bundle = folder / name
    shutil.copytree(files["bundle"], bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    write_manifest(bundle, BUNDLE_FILES, 7)
    return bundle


def cases(folder: Path, files: dict) -> list[tuple]:
    """(name, argv, what the error line must say, output that must not appear)."""
    good, bundle = str(files["good"]), files["bundle"]
    model = ["--model", EXAMPLE, "--checkpoint", CHECKPOINT]
    compare = ["compare", good, *model]
    out = folder / "never.onnx"

    def edited(name: str, change) -> str:
        return str(tampered_bundle(files, folder, name, change))

    hand_edited = folder / "hand_edited"
    shutil.copytree(bundle, hand_edited)
    (hand_edited / "bundle.json").write_text((hand_edited / "bundle.json").read_text().replace('"rule"', '"rule" '))
    unmanifested = folder / "no_manifest"
    shutil.copytree(bundle, unmanifested)
    (unmanifested / "manifest.json").unlink()
    foreign_outputs = folder / "foreign_outputs"
    shutil.copytree(bundle, foreign_outputs)
    (foreign_outputs / "outputs.json").write_text(json.dumps({"objs": [], "polygraphy_class": "NotAClass"}))
    write_manifest(foreign_outputs, BUNDLE_FILES, 3)
    return [
        ("missing ONNX file", ["compare", str(folder / "none.onnx"), *model, "--input", SPEC], "ONNX file not found", None),
        ("corrupt ONNX file", ["compare", str(folder / "corrupt.onnx"), *model, "--input", SPEC], "is not a readable ONNX model", None),
        ("wrong input dtype", [*compare, "--input-file", str(folder / "float.npz")], "input 'input_ids' is float32, the model takes int64", None),
        ("wrong input rank", [*compare, "--input-file", str(folder / "rank.npz")], "has shape [16], the model takes rank 2", None),
        ("sequence past the position table", [*compare, "--input-file", str(folder / "long.npz")],
         "failed in TinyTransformer.forward's own code (outside its submodules) on input_ids [2, 200] int64", None),
        ("wrong input name", [*compare, "--input-file", str(folder / "renamed.npz")], "missing input_ids", None),
        ("corrupt .npz", [*compare, "--input-file", str(folder / "corrupt.npz")], "is not a readable .npz file", None),
        ("export: sequence past the position table", ["export", *model, "--input-file", str(folder / "long.npz"), "-o", str(out)],
         "failed in TinyTransformer.forward's own code", out),
        ("mismatched checkpoint keys", ["export", "--model", EXAMPLE, "--checkpoint", str(folder / "renamed_keys.pt"),
                                        "--input", SPEC, "-o", str(out)], "renamed.", out),
        ("checkpoint that runs code", ["export", "--model", EXAMPLE, "--checkpoint", str(folder / "evil.pt"), "--input", SPEC,
                                       "-o", str(out)], "names posix.system", out),
        ("output under a file", ["export", *model, "--input", SPEC, "-o", str(folder / "a_file" / "m.onnx")],
         "a_file is a file, not a folder", None),
        ("report under a file", ["export", *model, "--input", SPEC, "-o", str(out), "--report", str(folder / "a_file" / "r.json")],
         "a_file is a file, not a folder", out),
        ("output in a read-only folder", ["export", *model, "--input", SPEC, "-o", "/proc/sys/m.onnx"],
         "no permission to write in /proc/sys", None),
        ("bundle folder is a file", ["drift", "snapshot", good, *model, "--input", SPEC, "-o", str(folder / "a_file")],
         "is a file, not a folder", None),
        ("fuse to an opset onnx does not know", ["fuse", good, "-o", str(out), "--opset", "99"], "--opset 99 is not one", out),
        ("unsupported op", ["compare", str(folder / "unknown_op.onnx"), *model, "--input", SPEC], "NoSuchOp", None),
        ("weights file missing", ["inspect", str(folder / "external" / "big.onnx")], "which is missing next to it", None),
        ("bundle edited by hand", ["drift", "check", str(hand_edited), good], "incomplete or damaged bundle", None),
        ("bundle without manifest", ["drift", "check", str(unmanifested), good], "has no manifest.json", None),
        ("bundle: foreign outputs.json", ["drift", "check", str(foreign_outputs), good], "is not a readable Polygraphy RunResults", None),
        ("bundle: atol not a number", ["drift", "check", edited("atol", lambda m: m["tolerances"].update(atol="abc")), good],
         "field 'tolerances.atol' is not a number", None),
        ("bundle: atol missing", ["drift", "check", edited("no_atol", lambda m: m["tolerances"].pop("atol")), good],
         "field 'tolerances.atol'", None),
        ("bundle: outputs not a list", ["drift", "check", edited("outputs", lambda m: m.update(outputs=3)), good],
         "field 'outputs' is not a list", None),
        ("bundle: statistic not a number", ["drift", "check", edited("stat", lambda m: next(iter(m["layers"].values())).update(mean="x")), good],
         "is not an object with numbers", None),
        ("bundle: per-output tolerance not a pair", ["drift", "check", edited("per_output", lambda m: m["tolerances"].update(per_output={"output": 1})), good],
         "field 'tolerances.per_output'", None),
        ("bundle: no bundle.json", ["drift", "check", str(folder / "external"), good], "is not a ticknorm bundle", None),
    ]


def run_case(argv: list) -> tuple[int, str]:
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.stderr


def handled(exit_code: int, stderr: str, expected: str, output) -> str | None:
    """Why a case is not handled as promised (one line, exit 2, the message, nothing written), or None."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("... ")]  # progress lines
    if exit_code != 2:
        return f"exit {exit_code}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one error line: {lines}"
    if lines[0].startswith("error: unexpected "):
        return f"an unexpected error: {lines[0]}"
    if expected not in lines[0]:
        return f"'{expected}' not in: {lines[0]}"
    if output is not None and Path(output).exists():
        return f"{output} was written"
    return None


def killed_at(step: int, write) -> bool:
    """Run `write()` in a forked child that dies (os._exit, no cleanup) at its `step`-th rename;
    True when the writer reached that rename, False when it finished with fewer."""
    pid = os.fork()
    if pid == 0:  # the child: count renames, die at the chosen one
        calls = {"n": 0}
        originals = {name: getattr(os, name) for name in ("rename", "replace")}

        def counting(name):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == step:
                    os._exit(9)
                return originals[name](*args, **kwargs)
            return call

        for name in originals:
            setattr(os, name, counting(name))
        import ticknorm.base.atomic as atomic
        exchange = atomic._exchange

        def counted_exchange(first, second):
            calls["n"] += 1
            if calls["n"] == step:
                os._exit(9)
            return exchange(first, second)

        atomic._exchange = counted_exchange
        try:
            write()
        except BaseException:  # noqa: BLE001 - the child reports through its exit code only
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 1:
        raise AssertionError(f"the writer failed at step {step} before any kill")
    return code == 9


def _bundle_texts(bundle: Path) -> dict:
    return {name: (bundle / name).read_text() for name in BUNDLE_FILES}


def bundle_kills(made: dict, folder: Path, exchange: bool) -> list[str]:
    """A snapshot over a good bundle, killed at each of its renames in turn (swapping by atomic
    exchange, or by two renames): what each kill left ('previous', 'new', or 'parked': the
    previous bundle intact beside a missing one, named in the error), then 'finished'. A mix of
    the two generations, or a verdict other than PASS on the unchanged model, fails here."""
    from ticknorm.base import atomic
    from ticknorm.base.errors import BundleError
    from ticknorm.base.onnx_io import load_onnx
    from ticknorm.validate import drift

    model = load_onnx(made["good"])
    previous = _bundle_texts(made["bundle"])
    newer = dict(previous, **{"bundle.json": previous["bundle.json"].replace('"format": 1', '"format": 1, "note": "gen 2"')})
    outcomes = []
    for step in range(1, 20):
        target = folder / f"{'exchange' if exchange else 'renames'}{step}" / "golden"
        shutil.copytree(made["bundle"], target)

        def write():
            if not exchange:
                atomic._exchange = lambda first, second: False
            drift._write_unit(target, newer)

        if not killed_at(step, write):
            assert _bundle_texts(target) == newer
            return outcomes + ["finished"]
        try:
            assert drift.check_bundle(target, model, record=False).passed, f"step {step}: a false verdict"
            found = _bundle_texts(target)
            assert found in (previous, newer), f"step {step}: a mix of two generations"
            outcomes.append("previous" if found == previous else "new")
        except BundleError as exc:
            assert "the previous bundle is intact at" in str(exc), exc
            assert _bundle_texts(target.with_name("golden" + atomic.PARKED_SUFFIX)) == previous
            outcomes.append("parked")
    raise AssertionError("the writer never finished")


def onnx_kills(made: dict, folder: Path) -> list[str]:
    """An export with external weights over an older pair, killed at each rename in turn: which
    generation `load_onnx` then reads whole ('previous' or 'new'), then 'finished'."""
    from ticknorm.base.onnx_io import load_onnx, model_digest, save_onnx

    first = load_onnx(made["good"])
    second = onnx.ModelProto()
    second.CopyFrom(first)
    weight = next(t for t in second.graph.initializer if len(t.dims) == 2)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 2, weight.name))
    digests = {model_digest(first): "previous", model_digest(second): "new"}
    outcomes = []
    for step in range(1, 20):
        path = folder / f"pair{step}" / "m.onnx"
        save_onnx(first, path, external_data_threshold=0)
        if not killed_at(step, lambda: save_onnx(second, path, external_data_threshold=0)):
            assert digests[model_digest(load_onnx(path))] == "new"
            return outcomes + ["finished"]
        outcomes.append(digests[model_digest(load_onnx(path))])
    raise AssertionError("the writer never finished")
