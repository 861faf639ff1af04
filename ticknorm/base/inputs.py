"""Model inputs: `--input name:DIMS:DTYPE[:LOW..HIGH]` specs, `.npz` files, and seeded random data.

DIMS are sizes joined by `x`; a size may carry a dynamic axis name (`batch=2xseq=16`): the export
makes that axis dynamic and uses the number as the example size. Integer inputs draw from
[LOW, HIGH), default [0, 2) so token ids, token types and attention masks are all valid (with an
ONNX model at hand, inputs that index an embedding table draw from the whole vocabulary, and an
export draws them again once its graph exists); a spec without DTYPE takes the graph's; floats
draw from a standard normal, or uniformly from [LOW, HIGH) when given.
"""

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from ticknorm.base.errors import InputSpecError, first_line

DTYPES = {
    "float32": np.float32, "fp32": np.float32, "float": np.float32,
    "float16": np.float16, "fp16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
    "float64": np.float64, "fp64": np.float64, "double": np.float64,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_,
}
# A decoder's KV cache inputs (Optimum's and ticknorm's `past_key_values.N.key`, GenAI's `past.N.key`),
# and the flag with which a merged decoder picks its branch
# (an encoder-decoder's name which attention's cache: `past_key_values.N.decoder.key`, `.encoder.key`)
PAST = re.compile(r"^(past_key_values|past)[._](\d+)[._](?:(decoder|encoder)[._])?(key|value)$")
USE_CACHE_BRANCH = "use_cache_branch"


def is_decoder_cache(name: str) -> bool:
    """A KV cache input of the decoder's own attention: its length is the past's (an
    encoder-decoder's cross-attention cache is as long as the encoder's input)."""
    found = PAST.match(name)
    return found is not None and found.group(3) != "encoder"


_DIM = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_]*)=)?([0-9]+)")
_RANGE = re.compile(r"(-?[0-9.eE+-]+)\.\.(-?[0-9.eE+-]+)")
_SPEC_FORMAT = "NAME:DIMS[:DTYPE[:LOW..HIGH]], e.g. input_ids:batch=2xseq=16:int64:0..30522"


@dataclass(frozen=True)
class Dim:
    size: int
    name: str | None = None


@dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple[Dim, ...]
    dtype: np.dtype
    low: float | None = None
    high: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {axis: d.name for axis, d in enumerate(self.dims) if d.name}

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        return random_array(self.shape, self.dtype, rng, self.low, self.high)


def parse_input_spec(text: str, declared: dict[str, np.dtype] | None = None) -> InputSpec:
    """`declared` (input -> the graph's dtype, from `declared_dtypes`) types a spec that names no
    dtype: with a graph at hand, `input_ids:1x8` means its int64 ids, not floats."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4 or not parts[0]:
        raise InputSpecError(f"bad input spec '{text}': expected {_SPEC_FORMAT}")
    name, dims_text = parts[0], parts[1]
    dims = _parse_dims(text, dims_text)
    dtype_name = parts[2] if len(parts) > 2 and parts[2] else ""
    if not dtype_name:
        default = (declared or {}).get(name)
        dtype_name = default.name if default is not None and default.name in DTYPES else "float32"
    if dtype_name.lower() not in DTYPES:
        raise InputSpecError(f"bad input spec '{text}': unknown dtype '{dtype_name}' "
                             f"(known: {', '.join(sorted(DTYPES))})")
    low = high = None
    if len(parts) == 4:
        low, high = _parse_range(text, parts[3], np.dtype(DTYPES[dtype_name.lower()]))
    return InputSpec(name, dims, np.dtype(DTYPES[dtype_name.lower()]), low, high)


def _parse_range(text: str, range_text: str, dtype: np.dtype) -> tuple[float, float]:
    found = _RANGE.fullmatch(range_text)
    try:
        if found is None:
            raise ValueError(range_text)
        low, high = float(found.group(1)), float(found.group(2))
    except ValueError:
        raise InputSpecError(f"bad input spec '{text}': range '{range_text}' is not LOW..HIGH") from None
    if not low < high:
        raise InputSpecError(f"bad input spec '{text}': range {range_text} is empty (LOW must be below HIGH)")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if low != int(low) or high != int(high) or low < info.min or high - 1 > info.max:
            raise InputSpecError(f"bad input spec '{text}': {dtype} takes whole numbers in [{info.min}, {info.max}]")
    return low, high


def _parse_dims(text: str, dims_text: str) -> tuple[Dim, ...]:
    if dims_text in ("", "scalar"):
        return ()
    dims = []
    for token in dims_text.split("x") if "=" not in dims_text else _split_named(dims_text):
        found = _DIM.fullmatch(token)
        if not found or int(found.group(2)) < 0:
            raise InputSpecError(f"bad input spec '{text}': dim '{token}' is not SIZE or NAME=SIZE")
        dims.append(Dim(int(found.group(2)), found.group(1)))
    return tuple(dims)


def _split_named(dims_text: str) -> list[str]:
    """Split `batch=2xmax_len=16`: an `x` separates dims only right after a size's digits."""
    return re.split(r"(?<=[0-9])x", dims_text)


def random_array(shape, dtype, rng: np.random.Generator, low=None, high=None) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        low, high = (0, 2) if low is None else (int(low), int(high))
        return rng.integers(low, high, size=shape).astype(dtype)
    if low is None:
        return rng.standard_normal(size=shape).astype(np.float32).astype(dtype)
    return rng.uniform(low, high, size=shape).astype(np.float32).astype(dtype)


def feeds_from_specs(specs: list[InputSpec], seed: int = 0, index_limits: dict | None = None) -> dict[str, np.ndarray]:
    """`index_limits` (from `index_ranges`) bound integer inputs given without a range."""
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputSpecError(f"input {', '.join(duplicates)} is given more than once")
    rng = np.random.default_rng(seed)
    limits = index_limits or {}
    return {spec.name: (replace(spec, low=0, high=limits[spec.name]) if spec.low is None and spec.name in limits
                        and np.issubdtype(spec.dtype, np.integer) else spec).sample(rng) for spec in specs}


def load_npz(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"input file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("it holds one array, not named inputs (save with np.savez(path, name=array))")
        with data:
            return {name: data[name] for name in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy reports damaged archives in many ways
        reason = str(exc).splitlines()[0] or type(exc).__name__
        raise InputSpecError(f"{path} is not a readable .npz file ({reason})") from exc


def read_polygraphy_json(path: Path, role: str, kind: str):
    """A file in Polygraphy's JSON (its arrays, RunResults and input lists decoded), read with
    Polygraphy's own reader; a missing or unreadable one is InputSpecError naming the file, as the
    `role` it was given for and the `kind` of file it should be."""
    if not path.is_file():
        raise InputSpecError(f"{role} file not found: {path}")
    from polygraphy.json import from_json
    from polygraphy.logger import G_LOGGER

    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # its own warning before it raises: ours is the one line
            return from_json(path.read_text())
    except Exception as exc:  # noqa: BLE001 - Polygraphy and json report bad files in many ways
        raise InputSpecError(f"{path} is not a readable {kind} file ({first_line(exc)})") from exc


def as_feed_sets(feeds) -> list[dict]:
    """One feed dict, or one per iteration, as a list of them."""
    return [feeds] if isinstance(feeds, dict) else list(feeds)


def load_feed_sets(path) -> list[dict[str, np.ndarray]]:
    """Every feed dict a file holds: an `.npz` (one), Polygraphy's inputs JSON (`polygraphy run
    --save-inputs`, `data_loader`, a ticknorm bundle's inputs.json: a list of them, one per
    iteration), or a bundle folder (its inputs.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "inputs.json"
    if path.suffix != ".json":
        return [load_npz(path)]
    loaded = read_polygraphy_json(path, "input", "Polygraphy inputs")
    feed_sets = [dict(feeds) for feeds in loaded] if isinstance(loaded, list) else []
    if not feed_sets or not all(isinstance(v, np.ndarray) for feeds in feed_sets for v in feeds.values()):
        raise InputSpecError(f"{path} holds no Polygraphy inputs "
                             "(a JSON list of name -> array dicts, one per iteration)")
    return feed_sets


@dataclass(frozen=True)
class Inputs:
    """Example inputs, given once: `--input` specs, an `.npz` file, or arrays a caller already
    holds (name -> array), with the axes that are dynamic (specs name their own)."""

    specs: tuple[str, ...] = ()  # `--input` texts
    file: str | None = None
    seed: int = 0
    arrays: dict[str, np.ndarray] | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {axis: name}

    @property
    def given(self) -> bool:
        return bool(self.specs) or self.file is not None or self.arrays is not None

    def feed_sets(self, onnx_model: onnx.ModelProto | None = None) -> list[dict[str, np.ndarray]]:
        """Every iteration's feeds: several from a Polygraphy inputs file or a bundle, else one."""
        if self.file is not None and self.arrays is None and not self.specs:
            return load_feed_sets(self.file)
        return [self.feeds(onnx_model)[0]]

    def feeds(self, onnx_model: onnx.ModelProto | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, dict[int, str]]]:
        """(feeds, dynamic axes): the first iteration's, for an export's example. With `onnx_model`,
        token-id specs given without a range span the model's vocabulary."""
        if sum((bool(self.specs), self.file is not None, self.arrays is not None)) > 1:
            raise InputSpecError("give inputs either as --input specs or as an .npz file, not both")
        if self.arrays is not None:
            return dict(self.arrays), dict(self.dynamic_axes)
        if self.file is not None:
            return load_feed_sets(self.file)[0], dict(self.dynamic_axes)
        if not self.specs:
            raise InputSpecError("no inputs: give --input NAME:DIMS:DTYPE (e.g. input_ids:batch=2xseq=16:int64) "
                                 "or --input-file")
        declared = declared_dtypes(onnx_model) if onnx_model is not None else None
        parsed = [parse_input_spec(spec, declared) for spec in self.specs]
        limits = index_ranges(onnx_model) if onnx_model is not None else None
        axes = {spec.name: spec.dynamic_axes for spec in parsed if spec.dynamic_axes}
        return feeds_from_specs(parsed, self.seed, limits), {**axes, **self.dynamic_axes}

    def in_index_ranges(self, onnx_model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The integer inputs of specs that name no range, drawn again inside `onnx_model`'s index
        ranges: an export draws its example before the graph exists, in [0, 2), which leaves most
        of an embedding unread by every check that follows."""
        if not self.specs or self.file is not None or self.arrays is not None:
            return {}
        limits = index_ranges(onnx_model)
        drawn = [spec.name for spec in map(parse_input_spec, self.specs)
                 if spec.low is None and spec.name in limits and np.issubdtype(spec.dtype, np.integer)]
        if not drawn:
            return {}
        feeds = self.feeds(onnx_model)[0]  # every spec drawn as every later command draws them, so the same ids
        return {name: feeds[name] for name in drawn}


def declared_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Input -> the dtype the graph declares for it."""
    return {value.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
            for value in graph_inputs(model) if value.type.tensor_type.elem_type}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed (initializers listed as inputs have defaults)."""
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def graph_feeds(model: onnx.ModelProto, feeds: dict) -> dict:
    """The feeds an ONNX graph takes: exporters drop forward() arguments the model never reads,
    so PyTorch may be fed more than the graph. Where the graph takes an input that PyTorch was not
    fed (a file exported elsewhere: Optimum's `position_ids`, a merged decoder's branch flag), it
    gets the value the model assumes without it (`assumed_feeds`)."""
    declared = {value.name: value for value in graph_inputs(model)}
    taken = {name: value for name, value in feeds.items() if name in declared}
    missing = {name: value for name, value in declared.items() if name not in taken}
    return {**taken, **assumed_feeds(missing, feeds)} if missing else taken


def assumed_feeds(missing: dict[str, onnx.ValueInfoProto], feeds: dict) -> dict[str, np.ndarray]:
    """What a transformers model assumes for an input it is not given, for the `missing` graph
    inputs that have such a default, sized by the tokens and the KV cache in `feeds`: positions
    that continue the cache, a mask of ones over cache and tokens, token type 0, and a merged
    decoder's flag choosing the cache's branch when the cache is not empty."""
    tokens = next((feeds[name] for name in ("input_ids", "inputs_embeds")
                   if name in feeds and np.ndim(feeds[name]) >= 2), None)
    cache = [value for name, value in feeds.items() if is_decoder_cache(name) and np.ndim(value) > 2]
    past = cache[0].shape[2] if cache else 0
    found = {}
    for name, value in missing.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if name == USE_CACHE_BRANCH and cache:
            found[name] = np.array([past > 0], dtype)
        elif tokens is not None and name in _ASSUMED:
            batch, sequence = tokens.shape[:2]
            found[name] = _ASSUMED[name](batch, sequence, past, dtype)
            if len(value.type.tensor_type.shape.dim) == 1:  # one row for the whole batch
                found[name] = found[name][0]
    return found


_ASSUMED = {
    "position_ids": lambda batch, sequence, past, dtype: np.tile(np.arange(past, past + sequence, dtype=dtype),
                                                                 (batch, 1)),
    "attention_mask": lambda batch, sequence, past, dtype: np.ones((batch, past + sequence), dtype),
    "token_type_ids": lambda batch, sequence, past, dtype: np.zeros((batch, sequence), dtype),
}


def index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs that index something of a fixed size: input -> how many valid indices (the
    rows of a Gather's table, on its axis; a OneHot's depth; the smallest when it indexes several),
    so random ids stay inside the vocabulary: ids of [0, 2) leave most of an embedding unmeasured.
    Follows Cast/Identity/Reshape/Unsqueeze/Squeeze/Flatten on the way, and back from a table to
    the initializer or Constant it is cast from. Masks (a name holding "mask") stay 0/1."""
    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    tensors.update({node.output[0]: attribute.t for node in graph.node if node.op_type == "Constant"
                    for attribute in node.attribute if attribute.name == "value"})
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    ranges: dict[str, int] = {}
    for value in graph_inputs(model):
        if "mask" in value.name.lower():
            continue
        bounds = [bound for name in _carried(value.name, readers) for node in readers.get(name, [])
                  if (bound := _index_bound(node, name, tensors, producers) or 0) > 0]
        if bounds:
            ranges[value.name] = min(bounds)
    return ranges


_CARRIES = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")  # values pass through unchanged


def _carried(name: str, readers: dict[str, list]) -> list[str]:
    """`name` and every value that holds its numbers unchanged."""
    found, frontier = [], [name]
    while frontier:
        current = frontier.pop()
        found.append(current)
        frontier.extend(output for node in readers.get(current, []) if node.op_type in _CARRIES
                        and node.input[0] == current for output in node.output
                        if output not in found and output not in frontier)
    return found


def _index_bound(node: onnx.NodeProto, name: str, tensors: dict, producers: dict) -> int | None:
    """How many indices `node` takes where `name` is its index operand; None when it does not say."""
    if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
        table = _constant(node.input[0], tensors, producers)
        if table is not None and table.dims:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            return table.dims[axis % len(table.dims)]
    if node.op_type == "OneHot" and node.input[0] == name and len(node.input) > 1:
        depth = _constant(node.input[1], tensors, producers)
        if depth is not None and depth.data_location != onnx.TensorProto.EXTERNAL:
            return int(onnx.numpy_helper.to_array(depth).reshape(-1)[0])
    return None


def _constant(name: str, tensors: dict, producers: dict) -> onnx.TensorProto | None:
    """The initializer or Constant `name` holds, through the Casts and Identities on the way."""
    while name not in tensors and name in producers and producers[name].op_type in ("Cast", "Identity"):
        name = producers[name].input[0]
    return tensors.get(name)
