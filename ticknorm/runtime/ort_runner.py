"""ONNX Runtime: CPU or CUDA provider, selectable graph optimization, taps as extra outputs."""

import numpy as np
import onnx

from ticknorm.base.errors import OnnxFileError, RuntimeFailure, RuntimeUnavailable, first_line
from ticknorm.base.onnx_io import session_source
from ticknorm.plugins import plugin_nodes
from ticknorm.runtime.base import InputMeta, Runner, RunOutputs

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtRunner(Runner):
    def __init__(self, model: onnx.ModelProto, provider: str = "cpu", optimization: str = "all",
                 session_options=None, weights_dir=None):
        """`weights_dir` holds the weights of a staged model (`onnx_io.stage_weights`): sessions
        memory-map them from there instead of copying them."""
        super().__init__()
        self.model = model
        self.weights_dir = weights_dir
        self.provider = provider
        self.optimization = optimization
        self.name = f"ort-{provider}"
        self._extra_options = session_options
        self._sessions = {}

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        held = plugin_nodes(self.model)
        if held:
            raise RuntimeUnavailable(f"{self.name}: the graph holds {len(held)} TensorRT plugin node(s) (first: {held[0]}) "
                                     "that ONNX Runtime cannot run; export with --ln-target native for it")
        if PROVIDERS[self.provider] not in ort.get_available_providers():
            raise RuntimeUnavailable(f"{self.name}: onnxruntime {ort.__version__} has no {PROVIDERS[self.provider]} "
                                     "(install ticknorm[gpu] on a CUDA machine)")
        self.session(())

    def _deactivate_impl(self) -> None:
        self._sessions.clear()

    def _inputs_impl(self) -> list[InputMeta]:
        session = self.session(())
        return [InputMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), _np_dtype(i.type))
                for i in session.get_inputs()]

    def session_options(self):
        import onnxruntime as ort

        options = self._extra_options() if self._extra_options else ort.SessionOptions()
        options.log_severity_level = 3
        if self.weights_dir is not None:  # prepacked weights would be private copies of the mapped file
            options.add_session_config_entry("session.disable_prepacking", "1")
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        return options

    def session(self, taps: tuple = ()):
        """One session per tap set: extra outputs change what ORT may fuse, so they get their own."""
        if taps not in self._sessions:
            import onnxruntime as ort

            outputs = self.model.graph.output
            existing = {o.name for o in outputs}
            added = [name for name in taps if name not in existing]
            outputs.extend(onnx.ValueInfoProto(name=name) for name in added)  # no copy of the weights
            try:
                with session_source(self.model, self.weights_dir) as source:
                    self._sessions[taps] = ort.InferenceSession(source, self.session_options(),
                                                                providers=[PROVIDERS[self.provider]])
            except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors
                raise OnnxFileError(f"{self.name} cannot load the model: {first_line(exc)}") from exc
            finally:
                del outputs[len(outputs) - len(added):]
        return self._sessions[taps]

    def _infer_impl(self, feeds: dict, taps: tuple) -> RunOutputs:
        graph_outputs = [o.name for o in self.model.graph.output]
        session = self.session(taps)
        names = graph_outputs + [t for t in taps if t not in graph_outputs]
        try:
            values = dict(zip(names, session.run(names, feeds)))
        except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors (bad shapes, no kernel, bf16 I/O)
            raise RuntimeFailure(f"{self.name} failed to run the model: {first_line(exc)}") from exc
        return RunOutputs({n: values[n] for n in graph_outputs}, {t: values[t] for t in taps})


def _np_dtype(ort_type: str) -> np.dtype | None:
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    mapping = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
    try:
        return np.dtype(mapping.get(name, name))
    except TypeError:
        return None
