"""Nothing lost, nothing torn, every failure one clear line: the hostile-input table, writers
killed at every rename (the previous unit must survive, a torn one must never get a verdict), and
history appends from several processes at once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from fault_cases import bundle_kills, cases, handled, make_files, onnx_kills, run_case
from ticknorm.base.errors import OnnxFileError
from ticknorm.base.onnx_io import load_onnx, save_onnx
from ticknorm.cli import main
from ticknorm.validate import drift

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    return folder, make_files(folder)


def test_every_hostile_input_is_one_clear_line_and_writes_nothing(files):
    folder, made = files
    table = cases(folder, made)
    if os.access("/proc/sys", os.W_OK):  # a host where even /proc/sys is writable has no read-only folder to use
        table = [case for case in table if "/proc/sys" not in " ".join(case[1])]
    failures = {}
    for name, argv, expected, output in table:
        why = handled(*run_case(argv), expected, output)
        if why:
            failures[name] = why
    assert not failures, f"{len(failures)} of {len(table)} cases not handled: {failures}"


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_a_bundle_survives_a_kill_at_every_rename(files, tmp_path, exchange):
    """The previous bundle stays whole until the new one is whole; a kill in between never makes
    `drift check` give a verdict on a mix of the two (`bundle_kills` asserts each step)."""
    outcomes = bundle_kills(files[1], tmp_path, exchange)
    assert outcomes[0] == "previous" and outcomes[-1] == "finished", outcomes
    assert ("parked" in outcomes) == (not exchange)  # only two renames leave a gap, and it is named


def test_an_onnx_pair_survives_a_kill_at_every_rename(files, tmp_path):
    outcomes = onnx_kills(files[1], tmp_path)
    # renames: onnx-ir's weights file into the stage, the weights file beside the .onnx, the .onnx (the switch)
    assert outcomes == ["previous", "previous", "previous", "finished"], outcomes


def test_a_weights_file_from_another_export_is_refused(files, tmp_path):
    folder, made = files
    model = load_onnx(made["good"])
    save_onnx(model, tmp_path / "a" / "m.onnx", external_data_threshold=0)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    largest = max(other.graph.initializer, key=lambda tensor: len(tensor.raw_data))
    largest.raw_data = bytes(len(largest.raw_data))  # the same size, other bytes
    written = save_onnx(other, tmp_path / "b" / "m.onnx", external_data_threshold=0)
    shutil.copyfile(written[1], tmp_path / "a" / written[1].name)
    with pytest.raises(OnnxFileError, match="do not belong together"):
        load_onnx(tmp_path / "a" / "m.onnx")


def test_history_skips_a_torn_line_and_appends_on_a_fresh_one(files, tmp_path):
    folder, made = files
    bundle = tmp_path / "golden"
    shutil.copytree(made["bundle"], bundle)
    good = str(made["good"])
    assert CliRunner().invoke(main, ["drift", "check", str(bundle), good]).exit_code == 0
    with open(bundle / "history.jsonl", "a") as handle:
        handle.write('{"time": "2026-12-04T1')  # a killed append
    assert CliRunner().invoke(main, ["drift", "check", str(bundle), good]).exit_code == 0
    shown = CliRunner().invoke(main, ["drift", "history", str(bundle)])
    assert shown.exit_code == 0 and "skipped 1 damaged line(s) of history.jsonl (line 2)" in shown.stderr
    assert shown.output.count("pass") == 2
    assert len(drift.read_history(bundle).entries) == 2


def test_history_appends_from_several_processes_all_land(files, tmp_path):
    """Two real `ticknorm drift check` processes at once, then forked writers hammering the lock."""
    folder, made = files
    bundle = tmp_path / "golden"
    shutil.copytree(made["bundle"], bundle)
    command = [sys.executable, "-m", "ticknorm.cli", "drift", "check", str(bundle), str(made["good"])]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    report = drift.DriftReport("ort", [], tolerance=(1e-4, 1e-3, "ticknorm"))
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            for _ in range(25):
                drift._append_history(bundle, report, "hash", {}, {})
            os._exit(0)
        children.append(pid)
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children)
    found = drift.read_history(bundle)
    assert len(found.entries) == 2 + 100 and not found.damaged
    lines = (bundle / "history.jsonl").read_text().splitlines()
    assert all(json.loads(line)["time"] for line in lines)


def test_a_read_only_bundle_is_checked_without_history_only_when_asked(files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission check cannot be exercised as root")
    folder, made = files
    bundle = tmp_path / "golden"
    shutil.copytree(made["bundle"], bundle)
    bundle.chmod(0o555)
    try:
        refused = CliRunner().invoke(main, ["drift", "check", str(bundle), str(made["good"])])
        assert refused.exit_code == 2 and "--no-history" in refused.stderr
        assert CliRunner().invoke(main, ["drift", "check", str(bundle), str(made["good"]), "--no-history"]).exit_code == 0
    finally:
        bundle.chmod(0o755)
