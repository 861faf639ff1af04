"""The Runner protocol, shaped after Polygraphy's runners: public `activate/infer/deactivate`
check state and inputs, then call the `_impl` hooks a runtime fills in."""

from dataclasses import dataclass, field

import numpy as np

from ticknorm.base.errors import InputSpecError


@dataclass(frozen=True)
class InputMeta:
    name: str
    shape: tuple  # int for a static dim, str or None for a dynamic one
    dtype: np.dtype | None  # None when the runtime does not declare it (eager PyTorch)


@dataclass
class RunOutputs:
    """Graph outputs by name, and tapped intermediates by the key the caller asked for."""

    outputs: dict = field(default_factory=dict)
    taps: dict = field(default_factory=dict)


class Runner:
    name = "runner"
    taps_modules = False  # True when taps are module paths (PyTorch), False for tensor names

    def __init__(self):
        self.is_active = False

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self._activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def infer(self, feeds: dict[str, np.ndarray], taps=()) -> RunOutputs:
        """Run once. `taps` name intermediates in this runtime's terms (module paths for PyTorch,
        tensor names for ONNX Runtime and TensorRT)."""
        self.activate()
        check_feeds(self.name, self._inputs_impl(), feeds)
        return self._infer_impl(feeds, tuple(taps))

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass

    def _inputs_impl(self) -> list[InputMeta]:
        raise NotImplementedError

    def _infer_impl(self, feeds: dict, taps: tuple) -> RunOutputs:
        raise NotImplementedError


def check_feeds(runner: str, expected: list[InputMeta], feeds: dict) -> None:
    """Names, ranks, static dims and dtypes, with what exists named in the error."""
    names = [meta.name for meta in expected]
    missing = [n for n in names if n not in feeds]
    unexpected = [n for n in feeds if n not in names]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise InputSpecError(f"{runner}: inputs do not match the model ({'; '.join(parts)}); it takes: {', '.join(names)}")
    for meta in expected:
        value = feeds[meta.name]
        if meta.dtype is not None and value.dtype != meta.dtype:
            raise InputSpecError(f"{runner}: input '{meta.name}' is {value.dtype}, the model takes {meta.dtype}")
        if meta.shape and len(meta.shape) != value.ndim:
            raise InputSpecError(f"{runner}: input '{meta.name}' has shape {list(value.shape)}, the model takes rank "
                                 f"{len(meta.shape)} {list(meta.shape)}")
        for axis, (want, got) in enumerate(zip(meta.shape, value.shape)):
            if isinstance(want, int) and want != got:
                raise InputSpecError(f"{runner}: input '{meta.name}' has shape {list(value.shape)}, the model takes "
                                     f"{list(meta.shape)} (axis {axis} is fixed at {want})")

