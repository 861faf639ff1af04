"""Plain-text tables for terminals and logs, drawn by rich: columns as wide as their widest cell,
so no module path is ever cut short, and no colour codes in a file or a pipe."""

import io


def render(columns: list[str], rows: list[list[str]], left_columns: int = 1) -> str:
    """`columns` headers and `rows` of cells; the first `left_columns` are text, the rest numbers."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < left_columns else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip())
