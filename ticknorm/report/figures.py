"""Matplotlib figures saved the one way ticknorm saves files: atomically, headless."""

import base64
import io

from ticknorm.base.atomic import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path, dpi: int = 100) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(figure)


def png_base64(figure, dpi: int = 90) -> str:
    """For self-contained HTML: the PNG as a data-URI payload."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode()
