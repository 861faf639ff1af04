"""A ticks file drawn: each module's largest magnitude over the training steps, on a log scale
against fp16's largest number and the headroom below it, so a norm growing towards overflow
shows as a line rising to the red one."""

import numpy as np

from ticknorm.base.precision import LARGEST
from ticknorm.report.figures import pyplot, save_png
from ticknorm.ticks.ranges import TickSummary

LEGEND_LIMIT = 10  # the colours of one cycle; more names would repeat them. The rest are drawn grey and counted


def plot_ticks(summary: TickSummary, output, legend_limit: int = LEGEND_LIMIT) -> None:
    """One line per module, the highest peaks named in the legend, the others grey."""
    figure, axes = pyplot().subplots(figsize=(10, 6))
    ranked = sorted(summary.modules, key=lambda found: -max(found.absmax))
    for rank, found in enumerate(ranked):  # highest peak first in the legend; named lines on top of grey ones
        values = np.asarray(found.absmax, dtype=float)
        values = np.where(np.isfinite(values), np.maximum(values, 1e-12), np.nan)
        named = rank < legend_limit
        axes.plot(found.steps, values, marker="." if len(values) < 50 else None, linewidth=1.4 if named else 0.7,
                  color=None if named else "lightgrey", zorder=2 if named else 1,
                  label=(found.module or "(root)") if named else None)
    if len(ranked) > legend_limit:
        axes.plot([], [], color="lightgrey", label=f"{len(ranked) - legend_limit} more module(s) with lower peaks")
    fp16 = LARGEST["fp16"]
    axes.axhline(fp16, color="red", linestyle="--", label=f"fp16 max {fp16:g}")
    axes.axhline(summary.near_limit, color="orange", linestyle=":",
                 label=f"headroom: fp16 max / {summary.headroom:g} = {summary.near_limit:.6g}")
    axes.set_yscale("log")
    axes.set_xlabel("training step")
    axes.set_ylabel("absmax (input or output)")
    axes.set_title(f"{summary.source}: {len(ranked)} modules", fontsize="medium")
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    save_png(figure, output)
