"""A golden bundle's history drawn: error per output and per module, check after check."""

from datetime import datetime

import numpy as np

from ticknorm.base.errors import BundleError
from ticknorm.report.figures import pyplot, save_png


def plot_history(entries: list[dict], output, top_layers: int = 8) -> None:
    """Error per output against the tolerance, and the most-moved modules' statistics, over the
    checks' own times; each check's verdict marked (green pass, red cross DRIFT)."""
    if not entries:
        raise BundleError("the bundle has no history yet: run `ticknorm drift check` first")
    figure, (top, bottom) = pyplot().subplots(2, 1, figsize=(10, 7), sharex=True)
    times = [datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S%z") for e in entries]
    for name in entries[-1]["outputs"]:
        top.plot(times, [max(e["outputs"].get(name, np.nan), 1e-12) for e in entries], marker="o", label=name)
    atol = entries[-1].get("atol")
    if atol:
        top.axhline(atol, color="grey", linestyle="--", label=f"atol {atol:g} (+ rtol x |golden| per value)")
    for when, entry in zip(times, entries):
        worst = max(max(entry["outputs"].values(), default=1e-12), 1e-12)
        top.scatter([when], [worst], s=120, marker="o" if entry["passed"] else "X", zorder=3,
                    facecolors="none" if entry["passed"] else "red", edgecolors="green" if entry["passed"] else "red")
    top.set_yscale("log")
    top.set_ylabel("max |output - golden|")
    top.set_title("green ring: pass, red cross: DRIFT", fontsize="small")
    top.legend(fontsize="small")
    worst = sorted(entries[-1]["layers"], key=lambda m: -entries[-1]["layers"][m])[:top_layers]
    for module in worst:
        moved = [max(e["layers"].get(module, np.nan), 1e-12) for e in entries]
        bottom.plot(times, moved, marker=".", label=module or "(root)")
    bottom.set_yscale("log")
    bottom.set_ylabel("max |stat - golden| per module")
    bottom.legend(fontsize="x-small", ncol=2)
    figure.autofmt_xdate()
    figure.suptitle(f"ticknorm drift history: {len(entries)} checks, {sum(not e['passed'] for e in entries)} drifted")
    figure.tight_layout()
    save_png(figure, output)
