"""ONNX Runtime: CPU or CUDA provider, selectable graph optimization, taps as extra outputs."""

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ticknorm.base.errors import OnnxFileError, RuntimeFailure, RuntimeUnavailable, TicknormError, first_line
from ticknorm.base.onnx_io import has_external_weights, session_source
from ticknorm.base.precision import Precision
from ticknorm.base.upcast import upcast_bf16
from ticknorm.base.scopes import exposed
from ticknorm.plugins import plugin_nodes
from ticknorm.runtime.base import InputMeta, Runner, RunOutputs, split_outputs, tapped_tensors

if TYPE_CHECKING:
    import onnxruntime as ort

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class MappedWeights:
    """The folder of the files a graph's weights are references into, which a session maps; and
    whether ONNX Runtime may make prepacked private copies of them (the kernels a deployment
    runs, for a session that is timed or judged)."""

    folder: str
    prepack: bool = True

    @classmethod
    def staged(cls, folder) -> "MappedWeights | None":
        """An export's staged weights (`onnx_io.stage_weights`), or None: mapped and not
        prepacked, as the sessions verifying an export count toward its peak memory."""
        return None if folder is None else cls(str(folder), prepack=False)


class OrtRunner(Runner):
    """One InferenceSession. Tapped modules' tensors and `extra_outputs` (ONNX tensor names, for
    checks that read the graph itself: fused norms, norm inputs) are outputs of that session;
    extra outputs come back among the outputs."""

    def __init__(self, model: onnx.ModelProto, provider: str = "cpu", optimization: str = "all",
                 session_options=None, mapped: "MappedWeights | None" = None, taps=(), extra_outputs=(),
                 model_file=None):
        """`mapped` says where the weights `model` references are (a staged model,
        `onnx_io.stage_weights`, or a file's graph read alone, `graph_only`): the session
        memory-maps them from there instead of copying them. `session_options` makes the
        `onnxruntime.SessionOptions` to start from (the profiler's). `model_file` is the file
        `model` was read from: a session that adds no output to a graph holding its weights reads
        it from there, with no serialized copy of the model made in memory."""
        super().__init__(taps)
        self.model = model
        self.model_file = model_file
        self.mapped = mapped
        self.provider = provider
        self.optimization = optimization
        self.name = f"ort-{provider}"
        self._extra_options = session_options
        self._tap_tensors = tapped_tensors(model, self.taps)
        graph_outputs = [o.name for o in model.graph.output]
        self._outputs = list(dict.fromkeys([*graph_outputs, *extra_outputs]))
        self._fetched = list(dict.fromkeys([*self._outputs, *self._tap_tensors.values()]))
        self._added = [name for name in self._fetched if name not in graph_outputs]  # made outputs for the session
        self._session: ort.InferenceSession | None = None

    def check_available(self) -> None:
        import onnxruntime as ort

        held = plugin_nodes(self.model)
        if held:
            raise RuntimeUnavailable(f"{self.name}: the graph holds {len(held)} TensorRT plugin node(s) "
                                     f"(first: {held[0]}) that ONNX Runtime cannot run; export with --ln-target "
                                     "native for it")
        if PROVIDERS[self.provider] not in ort.get_available_providers():
            raise RuntimeUnavailable(f"{self.name}: onnxruntime {ort.__version__} has no {PROVIDERS[self.provider]} "
                                     "(install ticknorm[gpu] on a CUDA machine)")

    @property
    def emulates_bf16(self) -> bool:
        """Whether this session runs a bf16 graph's fp32 emulation (`upcast`): the CPU provider has
        no bf16 kernels, so a check there runs the graph upcast, each bf16 value rounded as made."""
        return self.provider == "cpu" and Precision.of_graph(self.model).dtype == "bf16"

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        model = upcast_bf16(self.model) if self.emulates_bf16 else self.model
        try:
            with exposed(model, self._added), self._source(model) as source:
                self._session = ort.InferenceSession(source, self.session_options(),
                                                     providers=[PROVIDERS[self.provider]])
        except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors
            raise OnnxFileError(f"{self.name} cannot load the model: {first_line(exc)}") from exc

    def _source(self, model: onnx.ModelProto):
        """What the session loads: the file itself where it may read it (`_reads_file`), else
        `model` (the graph itself or its upcast) as `session_source` hands it over."""
        if self._reads_file and model is self.model:
            return contextlib.nullcontext(str(self.model_file))
        return session_source(model, self.mapped.folder if self.mapped else None)

    def _deactivate_impl(self) -> None:
        self._session = None

    def variant(self, session_options) -> "OrtRunner":
        """A runner of the same model, provider and optimization with other session options."""
        return OrtRunner(self.model, self.provider, self.optimization, session_options, self.mapped, self.taps,
                         model_file=self.model_file)

    @property
    def _maps_weights(self) -> bool:
        """Whether the graph's weights are references the session maps from `mapped.folder`: then
        it gets the graph's bytes alone (faster to build than from the file, with taps or without)."""
        return self.mapped is not None and has_external_weights(self.model)

    @property
    def _reads_file(self) -> bool:
        """Whether the session reads `model_file` itself (a graph holding its weights, with no
        output added to it)."""
        return bool(self.model_file) and not self._added and not self._maps_weights

    @property
    def session(self) -> "ort.InferenceSession":
        """The one session (the profiler runs it directly, to time nothing but ONNX Runtime),
        which exists only while the runner is active."""
        if self._session is None:
            raise TicknormError(f"{self.name} has no session until it is activated (`with runner:`)")
        return self._session

    def _inputs_impl(self) -> list[InputMeta]:
        return [InputMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _np_dtype(i.type))
                for i in self.session.get_inputs()]

    def session_options(self):
        import onnxruntime as ort

        options = self._extra_options() if self._extra_options else ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failure reaches the user as our one line, not ORT's log too
        mapped = self.mapped
        if mapped is not None and self._maps_weights:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", mapped.folder)
        if mapped is not None and not mapped.prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = {"disabled": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
                                            "extended": levels.ORT_ENABLE_EXTENDED,
                                            "all": levels.ORT_ENABLE_ALL}[self.optimization]
        return options

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> RunOutputs:
        try:
            values = dict(zip(self._fetched, self.session.run(self._fetched, feeds)))
        except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors (bad shapes, no kernel, bf16 I/O)
            raise failed_run(self.name, exc) from exc
        return split_outputs(values, self._outputs, self._tap_tensors)


def failed_run(runner: str, exc: Exception) -> RuntimeFailure:
    """A session's failing run (bad shapes, no kernel, bf16 I/O) as one line."""
    return RuntimeFailure(f"{runner} failed to run the model: {first_line(exc)}")


def _np_dtype(ort_type: str) -> np.dtype | None:
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    mapping = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
    try:
        return np.dtype(mapping.get(name, name))
    except TypeError:
        return None
