"""The Runner protocol, shaped after Polygraphy's runners: public `activate/infer/deactivate`
check state and inputs, then call the `_impl` hooks a runtime fills in. Taps speak one
vocabulary on every runtime, PyTorch's module paths: each row of every report is a module."""

from dataclasses import dataclass, field

import numpy as np

from ticknorm.base.errors import InputSpecError, TicknormError
from ticknorm.base.scopes import module_output_tensors


@dataclass(frozen=True)
class InputMeta:
    name: str
    shape: tuple[int | str | None, ...]  # a dynamic dim is named (str) or not (None)
    dtype: np.dtype | None  # None when the runtime does not declare it (eager PyTorch)
    required: bool = True  # False for a forward() parameter with a default


@dataclass
class RunOutputs:
    """Graph outputs by name, and the tapped modules' outputs by module path."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    taps: dict[str, np.ndarray] = field(default_factory=dict)
    # PyTorch only: a tapped module's further tensors when it returned several (a rotary embedding's
    # cos and sin). `taps` holds its first; the graph does not say which of them its tensor is.
    tap_others: dict[str, list[np.ndarray]] = field(default_factory=dict)


class Runner:
    """One runtime holding one model, built once with what it returns: the graph's outputs and,
    for each module path in `taps`, that module's output (PyTorch: a forward hook; ONNX runtimes:
    the tensor the scope map names, made an output of the one session or engine). Use it as a
    context manager: `activate` builds the session, `deactivate` frees it."""

    name = "runner"
    open_inputs = False  # True when the model takes any keyword (a forward with **kwargs)

    def __init__(self, taps=()):
        self.taps = tuple(dict.fromkeys(taps))
        self.is_active = False

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def check_available(self) -> None:
        """Raise RuntimeUnavailable, with the reason, before anything is built or run."""

    def activate(self) -> None:
        if not self.is_active:
            self.check_available()
            self._activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def infer(self, feeds: dict[str, np.ndarray]) -> RunOutputs:
        self.check(feeds)
        return self._infer_impl(feeds)

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        """The feeds against what the model takes, without running it: for callers that time the
        runtime's own run (the profiler), so a feed that does not fit is one line before any run."""
        if not self.is_active:
            raise TicknormError(f"{self.name} is not active: use it as `with runner: runner.infer(feeds)`")
        check_feeds(self.name, self._inputs_impl(), feeds, self.open_inputs)

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass

    def _inputs_impl(self) -> list[InputMeta]:
        raise NotImplementedError

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> RunOutputs:
        raise NotImplementedError


def check_feeds(runner: str, expected: list[InputMeta], feeds: dict[str, np.ndarray],
                open_inputs: bool = False) -> None:
    """Names, ranks, static dims and dtypes, with what exists named in the error."""
    names = [meta.name for meta in expected]
    missing = [meta.name for meta in expected if meta.required and meta.name not in feeds]
    unexpected = [] if open_inputs else [n for n in feeds if n not in names]
    if missing or unexpected:
        parts = [f"{what} {', '.join(which)}" for what, which in (("missing", missing), ("unexpected", unexpected))
                 if which]
        raise InputSpecError(f"{runner}: inputs do not match the model ({'; '.join(parts)}); "
                             f"it takes: {', '.join(names)}")
    for meta in expected:
        if meta.name not in feeds:
            continue
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



def graph_input_meta(model) -> list[InputMeta]:
    """The inputs an ONNX graph declares (initializers listed as inputs left out): what feeds are
    checked against before any runtime, PyTorch included, is given them."""
    import onnx

    initializers = {t.name for t in model.graph.initializer}
    metas = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        metas.append(InputMeta(value.name, dims, np.dtype(dtype) if dtype is not None else None))
    return metas


def tapped_tensors(model, taps: tuple[str, ...]) -> dict[str, str]:
    """Module path -> the ONNX tensor that is its output, for the taps the graph's scope map knows
    (a module without one is left out: its row then says so)."""
    if not taps:
        return {}
    scope_map = module_output_tensors(model)
    return {module: scope_map[module] for module in taps if module in scope_map}


def split_outputs(values: dict[str, np.ndarray], graph_outputs: list[str], taps: dict[str, str]) -> RunOutputs:
    """A run's values by tensor name, as graph outputs and tapped modules."""
    return RunOutputs({name: values[name] for name in graph_outputs},
                      {module: values[tensor] for module, tensor in taps.items()})
