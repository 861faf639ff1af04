"""Launch parameters of the LayerNorm kernel: plain arithmetic, shared by the PyTorch entry point
and the TensorRT plugin's ahead-of-time launch, and unit-tested without a GPU."""

from dataclasses import dataclass

MAX_HIDDEN = 65536  # a row must fit in one program's registers
_ROW_ELEMENTS = 4096  # small rows are batched until a program holds about this many elements


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # power of two >= hidden
    rows: int  # rows per program
    num_warps: int
    grid: int  # programs


def next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def launch_config(n_rows: int, n_cols: int) -> LaunchConfig:
    if n_cols < 1 or n_rows < 0:
        raise ValueError(f"cannot normalize {n_rows} rows of {n_cols} elements")
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} exceeds {MAX_HIDDEN}, the most one program holds in registers")
    block_n = next_power_of_two(n_cols)
    rows = max(1, min(16, _ROW_ELEMENTS // block_n))
    num_warps = min(16, max(1, block_n // 256))
    return LaunchConfig(block_n, rows, num_warps, (n_rows + rows - 1) // rows)
