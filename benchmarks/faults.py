"""Fault figures: the hostile-input table of `tests/fault_cases.py` run through the CLI (cases
tried, cases handled: one error line naming the problem, exit 2, no traceback, nothing written),
and writers killed at every rename (kills survived with the previous output intact, or the new
one whole; never a mix, never a false verdict).

    python benchmarks/faults.py
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fault_cases import bundle_kills, cases, handled, make_files, onnx_kills, run_case  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        made = make_files(folder / "files")
        table = cases(folder / "files", made)
        failures = []
        for name, argv, expected, output in table:
            why = handled(*run_case(argv), expected, output)
            if why:
                failures.append(f"{name}: {why}")
        print(f"hostile inputs: {len(table)} cases tried, {len(table) - len(failures)} handled")
        for line in failures:
            print(f"  NOT HANDLED {line}")
        for label, outcomes in (("bundle, atomic exchange", bundle_kills(made, folder, True)),
                                ("bundle, two renames", bundle_kills(made, folder, False)),
                                (".onnx + .data pair", onnx_kills(made, folder))):
            kills = [o for o in outcomes if o != "finished"]
            kept = sum(o in ("previous", "parked") for o in kills)
            print(f"{label}: killed at {len(kills)} renames, survived all {len(kills)} (previous output intact: {kept}, "
                  f"new output whole: {kills.count('new')}): {', '.join(kills)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
