"""TensorRT from the ONNX file, kept thin and written against the `tensorrt` Python API that 10.x
and 11.x share, as NVIDIA's samples use it (Builder -> OnnxParser -> BuilderConfig -> serialized
engine -> execute_async_v3). TensorRT is imported only when a TensorRT runner is activated.

Networks are strongly typed: the precision comes from the ONNX graph (TensorRT 11 knows no other
way; 10.x is asked for it with the STRONGLY_TYPED flag, which 11 keeps and ignores). So `trt-fp16`
and `trt-bf16` build a graph converted to that type (`ticknorm convert`), never builder flags:
BuilderFlag.FP16/BF16, OBEY_PRECISION_CONSTRAINTS, ILayer.precision and set_output_type are gone
in 11, and tests/test_tensorrt_names.py keeps them out.

NOT VERIFIED on TensorRT: no machine this project runs on has it. Everything around the API
calls (cache keys, profiles, precision choices) is plain Python and unit-tested. LayerNormalization
nodes become TensorRT's own normalization layer (the ONNX parser's mapping); `ticknorm::LayerNorm`
nodes (`--ln-target plugin`) become our plugin, registered before the parser runs."""

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx

from ticknorm.base.atomic import atomic_path
from ticknorm.base.errors import RuntimeFailure, RuntimeUnavailable, TicknormError, first_line
from ticknorm.base.inputs import graph_inputs
from ticknorm.base.onnx_io import model_digest, save_onnx
from ticknorm.plugins import plugin_nodes
from ticknorm.plugins.trt_plugin import kernel_source_digest, register_plugin
from ticknorm.runtime.base import InputMeta, Runner, RunOutputs, split_outputs, tapped_tensors
from ticknorm.runtime.torch_runner import from_numpy, to_numpy

if TYPE_CHECKING:
    import tensorrt as trt

SUPPORTED = "TensorRT 10.x (10.9+ for the plugin) and 11.x"
Shape = tuple[int, ...]
# Input name -> the (min, opt, max) shapes an engine accepts.
ShapeProfile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass
class TrtSettings:
    precision: str = "fp32"  # the graph's: names the runner and keys the engine cache
    workspace_bytes: int = 4 << 30


def optimization_profile(inputs: dict[str, np.ndarray], dynamic_axes: dict[str, dict[int, str]]) -> ShapeProfile:
    """{input: (min, opt, max)}: dynamic axes range from 1 to the example size, which is also
    the size TensorRT optimizes for; static inputs are fixed at their example shape."""
    profile: ShapeProfile = {}
    for name, array in inputs.items():
        dynamic = dynamic_axes.get(name, {})
        low = tuple(1 if axis in dynamic else size for axis, size in enumerate(array.shape))
        profile[name] = (low, tuple(array.shape), tuple(array.shape))
    return profile


def profile_for(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> ShapeProfile:
    """The profile for `feeds`, with the ONNX inputs' named or unknown dims dynamic."""
    dynamic = {}
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        dynamic[value.name] = {axis: d.dim_param or "?" for axis, d in enumerate(dims) if not d.HasField("dim_value")}
    return optimization_profile(feeds, dynamic)


def engine_cache_key(model_bytes_digest: str, trt_version: str, gpu: str, settings: TrtSettings, profile: ShapeProfile,
                     plugin_kernel: str = "") -> str:
    """An engine is only valid for the same model, TensorRT, GPU, settings and profile, and,
    when it holds our plugin, the same kernel source (its PTX is inside the engine)."""
    payload = json.dumps({"model": model_bytes_digest, "trt": trt_version, "gpu": gpu, "settings": asdict(settings),
                          "plugin_kernel": plugin_kernel,
                          "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# trt.DataType member -> the numpy/torch type name (trt.nptype knows no bfloat16).
TYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
              "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def type_name(trt_dtype) -> str:
    if trt_dtype.name not in TYPE_NAMES:
        raise RuntimeFailure(f"trt: an engine tensor of type {trt_dtype.name}, which ticknorm does not feed or read")
    return TYPE_NAMES[trt_dtype.name]


def numpy_dtype(trt_dtype) -> np.dtype:
    name = type_name(trt_dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TICKNORM_CACHE", Path.home() / ".cache" / "ticknorm")) / "engines"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeUnavailable(f"trt: the tensorrt module is not installed ({exc}); install ticknorm[trt] "
                                 "on a machine with an NVIDIA GPU") from exc
    major = int(str(getattr(tensorrt, "__version__", "0")).split(".")[0] or 0)
    if major not in (10, 11):
        raise RuntimeUnavailable(f"trt: TensorRT {getattr(tensorrt, '__version__', '?')} is installed; ticknorm is "
                                 f"written for {SUPPORTED}")
    return tensorrt


class TrtRunner(Runner):
    """One engine (cached on disk) and its execution context. Tapped modules' tensors are marked
    as network outputs before the build, so a tapped runner has an engine of its own."""

    def __init__(self, model: onnx.ModelProto, profile: ShapeProfile, settings: TrtSettings | None = None,
                 cache_dir=None, taps=()):
        super().__init__(taps)
        self.model = model
        self.shape_profile = profile
        self.settings = settings or TrtSettings()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.name = f"trt-{self.settings.precision}"
        self._tap_tensors = tapped_tensors(model, self.taps)
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self.compute_ns = 0

    def check_available(self) -> None:
        import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable("trt: no CUDA device is visible")

    def _activate_impl(self) -> None:
        try:
            self._build_context()
        except AttributeError as exc:  # an API this TensorRT lacks: name both, in one line
            raise RuntimeUnavailable(f"trt: TensorRT {self._trt.__version__} has no {exc.name or first_line(exc)} "
                                     f"that ticknorm uses; it is written for {SUPPORTED}") from exc

    def _build_context(self) -> None:
        import torch

        self._trt, self._torch = import_tensorrt(), torch
        kernel = ""
        if plugin_nodes(self.model):
            register_plugin()
            kernel = kernel_source_digest()
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        key = engine_cache_key(model_digest(self.model), self._trt.__version__, torch.cuda.get_device_name(),
                               self.settings, self.shape_profile, kernel)
        self._engine, self._context = self._load_engine(key)

    def _deactivate_impl(self) -> None:
        self._engine = self._context = None

    @property
    def context(self) -> "trt.IExecutionContext":
        """The engine's execution context, where the profiler attaches."""
        return self._built()[1]

    def _built(self) -> "tuple[trt.ICudaEngine, trt.IExecutionContext]":
        """The engine and its context, which exist only while the runner is active."""
        if self._engine is None or self._context is None:
            raise TicknormError(f"{self.name} has no engine until it is activated (`with runner:`)")
        return self._engine, self._context

    def _load_engine(self, key: str):
        taps = tuple(sorted(set(self._tap_tensors.values())))
        suffix = "-" + hashlib.sha256(repr(taps).encode()).hexdigest()[:8] if taps else ""
        path = self.cache_dir / f"{key}{suffix}.engine"
        if not path.exists():
            serialized = self._build(taps)
            with atomic_path(path) as tmp:  # two processes building the same engine never tear it
                tmp.write_bytes(serialized)
        engine = self._trt.Runtime(self._logger).deserialize_cuda_engine(path.read_bytes())
        return engine, engine.create_execution_context()

    def _build(self, taps: tuple[str, ...]) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self._logger)
        with tempfile.TemporaryDirectory() as workdir:
            path = Path(workdir) / "model.onnx"
            save_onnx(self.model, path)
            if not parser.parse_from_file(str(path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeFailure(f"trt: the TensorRT ONNX parser rejected the model: {errors}")
        self._mark_taps(network, taps)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings.workspace_bytes)
        shapes = builder.create_optimization_profile()
        for name, (low, opt, high) in self.shape_profile.items():
            shapes.set_shape(name, low, opt, high)
        config.add_optimization_profile(shapes)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeFailure("trt: TensorRT could not build an engine (see the TensorRT log above)")
        return bytes(serialized)

    def _mark_taps(self, network, taps: tuple[str, ...]) -> None:
        wanted = set(taps)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            for output in range(layer.num_outputs):
                tensor = layer.get_output(output)
                if tensor.name in wanted and not tensor.is_network_output:
                    network.mark_output(tensor)
                    wanted.discard(tensor.name)
        if wanted:
            raise RuntimeFailure(f"trt: TensorRT fused away or renamed {', '.join(sorted(wanted))}; cannot tap them")

    def _inputs_impl(self) -> list[InputMeta]:
        (engine, _), trt = self._built(), self._trt
        metas = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(name))
                metas.append(InputMeta(name, shape, numpy_dtype(engine.get_tensor_dtype(name))))
        return metas

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> RunOutputs:
        trt, torch = self._trt, self._torch
        engine, context = self._built()
        buffers = {}
        for name, value in feeds.items():
            buffers[name] = from_numpy(torch, value).cuda()
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, buffers[name].data_ptr())
        outputs = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = getattr(torch, type_name(engine.get_tensor_dtype(name)))
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                context.set_tensor_address(name, buffers[name].data_ptr())
                outputs.append(name)
        stream = torch.cuda.current_stream()
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record(stream)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeFailure("trt: TensorRT execution failed")
        ended.record(stream)
        stream.synchronize()
        self.compute_ns = int(began.elapsed_time(ended) * 1e6)  # GPU compute of this run, copies excluded
        values = {name: to_numpy(buffers[name]) for name in outputs}
        return split_outputs(values, [o.name for o in self.model.graph.output], self._tap_tensors)
