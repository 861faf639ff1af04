"""PyTorch eager: the training graph, the reference every other runtime is judged against."""

import inspect
from typing import TYPE_CHECKING

import numpy as np

from ticknorm.base.optional import require
from ticknorm.base.errors import InputSpecError, RuntimeUnavailable, TicknormError, first_line
from ticknorm.runtime.base import InputMeta, Runner, RunOutputs

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def module_precision(module) -> str:
    """The type a model computes in as loaded: its checkpoint's (a bf16 Hugging Face folder loads
    in bf16), read from the floating parameters that hold most of its weights."""
    return prevailing_precision((str(p.dtype).removeprefix("torch."), p.numel()) for p in module.parameters())


def prevailing_precision(tensors) -> str:
    """The short name (fp32, fp16, bf16) of the floating type that holds the most values among
    `(torch dtype name, number of values)` pairs; fp32 when none is floating."""
    counts: dict[str, int] = {}
    for dtype, count in tensors:
        if dtype in TORCH_DTYPES.values():
            counts[dtype] = counts.get(dtype, 0) + count
    largest = max(counts, key=counts.__getitem__) if counts else "float32"
    return next(short for short, name in TORCH_DTYPES.items() if name == largest)


class TorchRunner(Runner):
    """`output_names` name the flattened outputs (the ONNX graph's names, so results line up).
    `dtype` None runs the model in the type it was loaded in (the reference: a bf16 checkpoint runs
    in bf16, as it was trained and as transformers serves it); a type casts it.
    `fp32_modules` stay in fp32 when `dtype` is lower: the fix for LayerNorms that overflow fp16."""

    def __init__(self, module, output_names: list[str], device: str = "cpu", dtype: str | None = None,
                 fp32_modules=(), taps=()):
        super().__init__(taps)
        self.module = module
        self.output_names = list(output_names)
        self.device = device
        self.dtype = dtype
        self.fp32_modules = tuple(fp32_modules)
        self.name = f"torch-{device}" + ("" if dtype in (None, "fp32") else f"-{dtype}")
        self.open_inputs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(module))
        self._hooks: list[RemovableHandle] = []
        self._tapped: dict[str, np.ndarray] = {}
        self._others: dict[str, list[np.ndarray]] = {}  # see `RunOutputs.tap_others`

    def check_available(self) -> None:
        torch = require("torch", "torch")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"{self.name}: torch {torch.__version__} sees no CUDA device")

    def _activate_impl(self) -> None:
        torch = require("torch", "torch")
        self._torch_dtype = getattr(torch, TORCH_DTYPES[self.dtype or module_precision(self.module)])
        if not any(p.is_meta for p in self.module.parameters()):  # else its weights are read as it runs (`meta`)
            self.module.eval().to(self.device)
        if self.dtype:
            self.module.to(self._torch_dtype)
        for path in self.fp32_modules:
            submodule = self.module.get_submodule(path).float()
            to_fp32 = _cast_inputs(torch, torch.float32)
            self._hooks.append(submodule.register_forward_pre_hook(to_fp32, with_kwargs=True))
            self._hooks.append(submodule.register_forward_hook(_cast_output(torch, self._torch_dtype)))
        for path in self.taps:
            self._hooks.append(self.module.get_submodule(path).register_forward_hook(
                _capture(torch, self._tapped, self._others, path)))

    def _deactivate_impl(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _inputs_impl(self) -> list[InputMeta]:
        """forward()'s named parameters; those with a default may be left out."""
        return [InputMeta(p.name, (), None, required=p.default is inspect.Parameter.empty)
                for p in _parameters(self.module) if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> RunOutputs:
        self._tapped.clear()
        self._others.clear()
        leaves = self.graph_outputs(forward(self.module, self.tensors(feeds)))
        names = self.output_names or [f"output_{i}" for i in range(len(leaves))]
        return RunOutputs(dict(zip(names, (to_numpy(t) for t in leaves))), dict(self._tapped), dict(self._others))

    def graph_outputs(self, result) -> list:
        """What forward() returned, as tensors in the graph's output order (by name where the model
        names them: a file may order them otherwise). A model that returns other outputs than the
        graph has is one line: is it the same model?"""
        torch = require("torch", "torch")
        leaves = tensor_leaves(torch, result)
        if self.output_names and len(leaves) != len(self.output_names):
            raise InputSpecError(f"{self.name}: the model returned {len(leaves)} tensors but the ONNX graph has "
                                 f"{len(self.output_names)} outputs ({', '.join(self.output_names)}); "
                                 "is it the same model?")
        own = output_names(torch, result)
        unmatched = [name for name in self.output_names if name not in own]
        if unmatched and len(unmatched) < len(self.output_names):  # some by name, some not: no way to pair them
            extra = [name for name in own if name not in self.output_names]
            raise InputSpecError(f"{self.name}: the ONNX graph's output {', '.join(unmatched)} maps to no output of "
                                 f"the model, whose {', '.join(extra) or 'outputs'} the graph does not name; is it the "
                                 "same model, exported for the same task?")
        if self.output_names and not unmatched:
            by_name = dict(zip(own, leaves))
            leaves = [by_name[name] for name in self.output_names]
        return leaves

    def tensors(self, feeds: dict) -> dict:
        """The feeds as the module takes them: tensors on the runner's device, floats in its dtype
        (the profiler times the forward on these alone, as a deployment calls it)."""
        return as_tensors(feeds, self._torch_dtype, self.device)


def as_tensors(feeds: dict, dtype=None, device: str = "cpu") -> dict:
    """Arrays as a model takes them: tensors on `device`, floats in `dtype` (a torch dtype; None:
    the model's own, so a bf16 checkpoint's cache or hidden states are fed in bf16 as it computes)."""
    torch = require("torch", "torch")
    converted = {}
    for name, array in feeds.items():
        tensor = from_numpy(torch, array)
        converted[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).to(device)
    return converted


def own_dtype(module):
    """The torch dtype `module_precision` names."""
    torch = require("torch", "torch")
    return getattr(torch, TORCH_DTYPES[module_precision(module)])


def output_names(torch, outputs) -> list[str]:
    """Graph output names from the structure the model returns: `output` for one tensor, dict
    keys (`last_hidden_state`) for dicts and ModelOutputs, `output_0`, `output_1` for tuples."""
    from torch.utils import _pytree

    names = []
    for path, leaf in _pytree.tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts:
            names.append("output")
        elif all(p.isdigit() for p in parts):
            names.append("output_" + "_".join(parts))
        else:
            names.append("_".join(parts))
    return names


def forward(module, tensors: dict):
    """`module(**tensors)` without gradients. The user's forward can fail any way; its failure is
    one line that names the module it failed in (found by running it again with hooks on every
    module) and the inputs it was given."""
    torch = require("torch", "torch")
    with torch.no_grad():
        try:
            return module(**tensors)
        except TicknormError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            given = ", ".join(f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                              for name, t in tensors.items() if hasattr(t, "shape"))
            raise InputSpecError(f"the PyTorch model failed {_failing_module(module, tensors)} on {given}: "
                                 f"{type(exc).__name__}: {first_line(exc)}") from exc


def _failing_module(module, tensors: dict) -> str:
    """Where a failing forward fails: the innermost module that started and did not finish."""
    running: list[str] = []
    handles = []
    for path, submodule in module.named_modules():
        handles.append(submodule.register_forward_pre_hook(lambda *_, path=path: running.append(path)))
        handles.append(submodule.register_forward_hook(lambda *_: running.pop()))
    try:
        module(**tensors)
    except Exception:  # noqa: BLE001 - the failure we are locating
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not running:
        return "in its forward"
    path = running[-1]
    owner = module.get_submodule(path)
    summary = repr(owner).splitlines()[0].rstrip("(")
    if not path:
        return f"in {type(module).__name__}.forward's own code (outside its submodules)"
    return f"in module '{path}' ({summary})"


def from_numpy(torch, array: np.ndarray):
    """A tensor from an array; bfloat16 (ml_dtypes, which torch cannot read) goes through fp32."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def tensor_leaves(torch, value) -> list:
    """The tensors in a model's output, in the order the exporters flatten it (pytree order)."""
    from torch.utils import _pytree

    return [leaf for leaf in _pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _parameters(module) -> list:
    return list(inspect.signature(module.forward).parameters.values())


def _capture(torch, store: dict[str, np.ndarray], others: dict[str, list[np.ndarray]], path: str):
    def hook(_module, _args, output):
        leaves = tensor_leaves(torch, output)
        if leaves:
            store[path] = to_numpy(leaves[0])
        if len(leaves) > 1:
            others[path] = [to_numpy(leaf) for leaf in leaves[1:]]
    return hook


def _cast_inputs(torch, dtype):
    """Every float tensor a module is called with, keywords and nested tuples too (a transformers
    attention takes `hidden_states=` and `position_embeddings=(cos, sin)`)."""
    cast = _caster(torch, dtype)

    def hook(_module, args, kwargs):
        return cast(args), cast(kwargs)
    return hook


def _caster(torch, dtype):
    """Every float tensor in a structure (tuples, dicts, a ModelOutput's fields) in `dtype`."""
    from torch.utils import _pytree

    def cast(value):
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
    return lambda structure: _pytree.tree_map(cast, structure)


def _cast_output(torch, dtype):
    """An fp32 island's outputs back in the model's type, every one (an attention returns its
    output and its weights)."""
    cast = _caster(torch, dtype)
    return lambda _module, _args, output: cast(output)
