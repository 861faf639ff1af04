"""Feeds derived from a graph alone, for files that come without a PyTorch model or inputs: random
values of the declared shapes, except where a decoder's inputs must fit together.

A decoder exported with its KV cache (Optimum's `*-with-past`, ticknorm's
`text-generation-with-past`, ONNX Runtime GenAI's builder) takes past keys/values of a past length
P, tokens of a sequence length S, an `attention_mask` of P+S, `position_ids` P..P+S-1 and, in a
merged decoder, a `use_cache_branch` flag. Random sizes break it (a mask shorter than the cache
makes a Gather index out of range); these feeds keep the sizes consistent, for a decode step (P>0)
and a prefill (P=0)."""

import numpy as np
import onnx

from ticknorm.base.inputs import PAST, USE_CACHE_BRANCH, graph_inputs, index_ranges, is_decoder_cache, random_array

DECODE_PAST, SEQUENCE = 3, 2  # a decode step's past length and sequence length when nothing says otherwise


def is_decoder(model: onnx.ModelProto) -> bool:
    return any(PAST.match(value.name) for value in graph_inputs(model))


def feed_sets_for_graph(model: onnx.ModelProto, seed: int = 0, dynamic_size: int = 2) -> list[dict[str, np.ndarray]]:
    """One feed dict for most graphs; for a decoder with a KV cache a decode step (past length
    DECODE_PAST), then a prefill (an empty cache)."""
    if not is_decoder(model):
        return [feeds_for_graph(model, seed, dynamic_size)]
    return [feeds_for_graph(model, seed, dynamic_size, past) for past in (DECODE_PAST, 0)]


def feeds_for_graph(model: onnx.ModelProto, seed: int = 0, dynamic_size: int = 2, past: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input; named or unknown dims get `dynamic_size`, token
    ids stay inside the table they index. With `past` (a decoder), the cache, mask and position
    inputs fit a step of SEQUENCE tokens after `past` cached ones."""
    rng = np.random.default_rng(seed)
    sizes = _decoder_sizes(model, past) if past is not None else {}
    limits = index_ranges(model)
    feeds = {}
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, dynamic_size)
                 for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = _value(value.name, shape, dtype, rng, limits, past)
    return feeds


def _decoder_sizes(model: onnx.ModelProto, past: int) -> dict[str, int]:
    """Dim name -> size: the cache's length axis P, the tokens' axis S, the mask's axis P+S."""
    dims = {value.name: [d.dim_param if not d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in graph_inputs(model)}
    sizes = {}
    for name, axes in dims.items():
        if is_decoder_cache(name):
            for axis in axes[1:]:  # axis 0 is the batch
                if axis:
                    sizes[axis] = past
    for name in ("input_ids", "inputs_embeds", "position_ids"):  # [batch, sequence(, hidden)], or [sequence]
        axes = dims.get(name) or [None]
        if axes[min(1, len(axes) - 1)]:
            sizes.setdefault(axes[min(1, len(axes) - 1)], SEQUENCE)
    if "attention_mask" in dims and dims["attention_mask"] and dims["attention_mask"][-1]:
        sizes.setdefault(dims["attention_mask"][-1], past + SEQUENCE)
    return sizes


def _value(name: str, shape: list[int], dtype, rng, limits: dict[str, int], past: int | None) -> np.ndarray:
    if past is not None and name == "attention_mask":
        return np.ones(shape, dtype)
    if past is not None and name == "position_ids":
        return np.broadcast_to(np.arange(past, past + shape[-1], dtype=dtype), shape).copy()
    if past is not None and name == USE_CACHE_BRANCH:
        return np.full(shape, past > 0, dtype)
    if name in limits:
        return random_array(shape, dtype, rng, 0, limits[name])
    return random_array(shape, dtype, rng)


def guessed_inputs(model: onnx.ModelProto) -> list[str]:
    """The inputs whose sizes derived feeds had to guess (a named or unknown dim), as `name[dims]`:
    what to name when those feeds do not fit the graph."""
    guessed = []
    for value in graph_inputs(model):
        shape = value.type.tensor_type.shape
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]
        if any(not isinstance(d, int) for d in dims):
            guessed.append(f"{value.name}[{', '.join(map(str, dims))}]")
    return guessed
