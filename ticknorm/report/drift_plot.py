"""A golden bundle's history drawn: error per output and per module, check after check."""

import numpy as np

from ticknorm.base.errors import BundleError
from ticknorm.report.figures import pyplot, save_png


def plot_history(entries: list[dict], output, top_layers: int = 8) -> None:
    """Error per output and the most-moved modules' statistics, check after check."""
    if not entries:
        raise BundleError("the bundle has no history yet: run `ticknorm drift check` first")
    figure, (top, bottom) = pyplot().subplots(2, 1, figsize=(10, 7), sharex=True)
    runs = range(len(entries))
    for name in entries[-1]["outputs"]:
        top.plot(runs, [max(e["outputs"].get(name, np.nan), 1e-12) for e in entries], marker="o", label=name)
    top.set_yscale("log")
    top.set_ylabel("max |output - golden|")
    top.legend(fontsize="small")
    worst = sorted(entries[-1]["layers"], key=lambda m: -entries[-1]["layers"][m])[:top_layers]
    for module in worst:
        bottom.plot(runs, [max(e["layers"].get(module, np.nan), 1e-12) for e in entries], marker=".", label=module or "(root)")
    bottom.set_yscale("log")
    bottom.set_ylabel("max |stat - golden| per module")
    bottom.set_xticks(list(runs), [f"{e['time'][:16]}\n{e['runtime']}" for e in entries], rotation=30, fontsize="x-small")
    bottom.legend(fontsize="x-small", ncol=2)
    figure.suptitle("ticknorm drift history")
    figure.tight_layout()
    save_png(figure, output)
