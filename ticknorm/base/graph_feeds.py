"""Feeds derived from a graph: every command's feeds are the user's (`--input`, `--input-file`)
completed from the file, so a file that declares its inputs runs without any.

A decoder exported with its KV cache (Optimum's `*-with-past`, ticknorm's
`text-generation-with-past`, ONNX Runtime GenAI's builder) takes past keys/values of a past length
P, tokens of a sequence length S, an `attention_mask` of P+S, `position_ids` P..P+S-1 and, in a
merged decoder, a `use_cache_branch` flag. Random sizes break it (a mask shorter than the cache
makes a Gather index out of range); these feeds keep the sizes consistent, for a decode step (P>0)
and a prefill (P=0), unless what was given fixes P. A symbolic dim takes the size a given array
has on it; one nothing gives is chosen here, and said (`GraphFeeds.note`)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ticknorm.base.graph import inferred_types
from ticknorm.base.inputs import (PAST, USE_CACHE_BRANCH, Inputs, assumed_feeds, graph_inputs, index_ranges,
                                  is_decoder_cache, random_array)

DECODE_PAST, SEQUENCE = 3, 2  # a decode step's past length and sequence length when nothing says otherwise
GROUPED_QUERY_ATTENTION = "GroupQueryAttention"  # ONNX Runtime's (com.microsoft): see `grouped_query_cut`
DYNAMIC_SIZE = 2  # any other symbolic dim nothing gives


@dataclass
class GraphFeeds:
    """Every iteration's feeds, and the size chosen for each symbolic dim that nothing given fixed
    (dim -> its sizes, one per iteration where they differ: a decode step's past, then a prefill's)."""

    feed_sets: list[dict[str, np.ndarray]]
    chosen: dict[str, list[int]] = field(default_factory=dict)
    cut: bool = False  # a feed set cut to its first row: `grouped_query_cut`

    @property
    def note(self) -> str:
        """The one line that says the sizes chosen, so a run on them is not mistaken for one on the
        sizes the model serves; empty when the given arrays fixed every dim."""
        notes = []
        if self.chosen:
            sizes = ", ".join(f"{dim}={' then '.join(map(str, dict.fromkeys(values)))}"
                              for dim, values in self.chosen.items())
            steps = " (a decode step, then a prefill)" if any(len(set(v)) > 1 for v in self.chosen.values()) else ""
            notes.append(f"inputs built from the graph, its symbolic dims at {sizes}{steps}; --input NAME:DIMS sets "
                         "them")
        if self.cut:
            notes.append("GroupQueryAttention continues a prompt on a cache at batch 1 only: those feeds run on "
                         "their first row")
        return "; ".join(notes)


def feeds_for_file(model: onnx.ModelProto, inputs: Inputs | None = None,
                   complete: Callable[[dict], dict] | None = None) -> GraphFeeds:
    """Every iteration's feeds for `model`: the ones `inputs` give (none: the graph's alone), each
    passed through `complete` (a PyTorch model's task adds its mask and a real KV cache), then
    every graph input still missing built from the graph's shapes, index ranges and decoder
    conventions, sized by what was given. Feeds that name an input the graph lacks stay as given,
    for the runner to name what is missing and what it did not expect."""
    given_sets = inputs.feed_sets(model) if inputs is not None and inputs.given else [{}]
    seed = inputs.seed if inputs is not None else 0
    declared = {value.name for value in graph_inputs(model)}
    found = GraphFeeds([])
    grouped_query = _runs_grouped_query_attention(model)
    heads = _head_sizes(model) if grouped_query else {}
    for given in given_sets:
        if not given.keys() <= declared:  # a name the graph does not know: misspelt, not to be made up around
            found.feed_sets.append(complete(given) if complete is not None else given)
            continue
        given = complete(given) if complete is not None else given
        pasts = _past_lengths(model, given)
        for past in pasts:
            feeds, chosen = _completed(model, given, seed, past, fixed=len(pasts) == 1, heads=heads)
            if grouped_query:
                runnable = grouped_query_cut(feeds)
                found.cut = found.cut or runnable is not feeds
                feeds = runnable
            found.feed_sets.append(feeds)
            for dim, size in chosen.items():
                found.chosen.setdefault(dim, []).append(size)
    return found


def feed_sets_for_graph(model: onnx.ModelProto, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One feed dict for most graphs; for a decoder with a KV cache a decode step (past length
    DECODE_PAST), then a prefill (an empty cache)."""
    return feeds_for_file(model, Inputs(seed=seed)).feed_sets


def grouped_query_cut(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` as ONNX Runtime's GroupQueryAttention takes them: its CPU kernel continues a prompt
    on a cache (tokens > 1 and a past) at batch 1 only, so such feeds keep their first row, which
    checks the same graph (a prompt on an empty cache and every decode step run at any batch)."""
    ids = feeds.get("input_ids")
    chunked = (ids is not None and np.ndim(ids) == 2 and ids.shape[1] > 1
               and any(np.shape(value)[2] for name, value in feeds.items() if is_decoder_cache(name)
                       and np.ndim(value) > 2))
    if not chunked or ids is None or ids.shape[0] == 1:
        return feeds
    batch = ids.shape[0]  # what is batched has it first and a second axis (a 1-D position_ids does not)
    return {name: value[:1] if np.ndim(value) >= 2 and np.shape(value)[0] == batch else value
            for name, value in feeds.items()}


def _runs_grouped_query_attention(model: onnx.ModelProto) -> bool:
    return any(node.op_type == GROUPED_QUERY_ATTENTION and node.domain == "com.microsoft" for node in model.graph.node)


def is_decoder(model: onnx.ModelProto) -> bool:
    return any(PAST.match(value.name) for value in graph_inputs(model))


def _past_lengths(model: onnx.ModelProto, given: dict) -> Sequence[int | None]:
    """The past lengths to build feeds for: None for a graph without a KV cache; a given cache's
    (or a given mask's beyond the given tokens); else a decode step's, then a prefill's."""
    if not is_decoder(model):
        return [None]
    cache = [value for name, value in given.items() if is_decoder_cache(name) and np.ndim(value) > 2]
    if cache:
        return [cache[0].shape[2]]
    tokens, mask = given.get("input_ids"), given.get("attention_mask")
    if tokens is not None and mask is not None and tokens.ndim == mask.ndim == 2 and mask.shape[1] >= tokens.shape[1]:
        return [mask.shape[1] - tokens.shape[1]]
    return [DECODE_PAST, 0]


def _bound_dims(model: onnx.ModelProto, given: dict) -> dict[str, int]:
    """Symbolic dim -> the size a given array has on it."""
    bound: dict[str, int] = {}
    for value in graph_inputs(model):
        if value.name in given:
            for dim, size in zip(value.type.tensor_type.shape.dim, np.shape(given[value.name])):
                if dim.dim_param:
                    bound.setdefault(dim.dim_param, size)
    return bound


def _completed(model: onnx.ModelProto, given: dict, seed: int, past: int | None,
               fixed: bool, heads: dict[str, int]) -> tuple[dict, dict[str, int]]:
    """`given` with every graph input it lacks: seeded random values, token ids inside the table
    they index; then the mask, positions and branch flag a model assumes (`assumed_feeds`), sized
    by those tokens and that cache (`heads`: a cache's head size, `_head_sizes`). Also the sizes
    chosen for symbolic dims nothing given fixed (a `past` that what was given `fixed` is not one)."""
    rng = np.random.default_rng(seed)
    bound = _bound_dims(model, given)
    if fixed and past is not None:
        bound.update(dict.fromkeys(_cache_dims(model), past))
    sizes = {**(_decoder_sizes(model, past, bound) if past is not None else {}), **heads, **bound}
    limits = index_ranges(model)
    feeds, chosen = dict(given), dict[str, int]()
    missing = {value.name: value for value in graph_inputs(model) if value.name not in given}
    for name, value in missing.items():
        if name not in _CONVENTIONAL:
            feeds[name] = _drawn(value, sizes, rng, limits.get(name), chosen)
    feeds.update(assumed_feeds({n: v for n, v in missing.items() if n in _CONVENTIONAL}, feeds))
    for name, value in missing.items():
        if name not in feeds:  # no tokens to size it by
            feeds[name] = _drawn(value, sizes, rng, limits.get(name), chosen)
    return feeds, {dim: size for dim, size in chosen.items() if dim not in bound}


_CONVENTIONAL = ("attention_mask", "position_ids", USE_CACHE_BRANCH)  # sized by the tokens and the cache


def _drawn(value: onnx.ValueInfoProto, sizes: dict[str, int], rng: np.random.Generator, limit: int | None,
           chosen: dict[str, int]) -> np.ndarray:
    """One input of the declared shape, each symbolic dim at `sizes`' size (else DYNAMIC_SIZE,
    noted in `chosen`): ids in [0, `limit`), other values random."""
    tensor_type = value.type.tensor_type
    shape = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        key = dim.dim_param or f"{value.name}[{axis}]"
        fixed = dim.HasField("dim_value")
        shape.append(dim.dim_value if fixed else chosen.setdefault(key, sizes.get(key, DYNAMIC_SIZE)))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    return random_array(shape, dtype, rng, 0, limit) if limit else random_array(shape, dtype, rng)


def _decoder_sizes(model: onnx.ModelProto, past: int, bound: dict[str, int]) -> dict[str, int]:
    """Dim name -> size: the cache's length axis P, the tokens' axis S (a given one's, else
    SEQUENCE), the mask's axis P+S."""
    dims = {value.name: [d.dim_param if not d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            for value in graph_inputs(model)}
    sizes = dict.fromkeys(_cache_dims(model), past)
    sequence = None
    for name in ("input_ids", "inputs_embeds", "position_ids"):  # [batch, sequence(, hidden)], or [sequence]
        axes = dims.get(name) or [None]
        axis = axes[min(1, len(axes) - 1)]
        if axis:
            sizes.setdefault(axis, SEQUENCE)
            sequence = sequence or bound.get(axis, sizes[axis])
    if "attention_mask" in dims and dims["attention_mask"] and dims["attention_mask"][-1]:
        sizes.setdefault(dims["attention_mask"][-1], past + (sequence or SEQUENCE))
    return sizes


_CACHE_RANK, _CACHE_LENGTH_AXIS = 4, 2  # (batch, heads, length, head size), as every exporter writes it now


def _cache_dims(model: onnx.ModelProto) -> list[str]:
    """The symbolic dims of the decoder's KV cache that are its length P: axis 2 of a rank-4 cache
    (the GenAI builder names its head size too, `kv_cache_dim`, which is no length), else every
    symbolic dim past the batch axis (a rank-3 cache of a model folding heads into the batch)."""
    names = []
    for value in graph_inputs(model):
        if is_decoder_cache(value.name):
            dims = value.type.tensor_type.shape.dim
            axes = dims[_CACHE_LENGTH_AXIS:_CACHE_LENGTH_AXIS + 1] if len(dims) == _CACHE_RANK else dims[1:]
            names += [d.dim_param for d in axes if d.dim_param]
    return names


def _head_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Dim name -> size for a symbolic head size of a cache GroupQueryAttention reads (the GenAI
    builder's `kv_cache_dim`): the width of the op's query, from shape inference, over its heads
    (its query, keys and values when Q/K/V come packed in it)."""
    declared = {value.name: value.type.tensor_type.shape.dim for value in graph_inputs(model)}
    wanted = []  # (the op, its cache's head-size dim)
    for node in model.graph.node:
        if (node.op_type == GROUPED_QUERY_ATTENTION and node.domain == "com.microsoft"
                and len(node.input) > _PAST_KEY_INPUT and node.input[_PAST_KEY_INPUT] in declared):
            dims = declared[node.input[_PAST_KEY_INPUT]]
            if len(dims) == _CACHE_RANK and dims[_HEAD_AXIS].dim_param:
                wanted.append((node, dims[_HEAD_AXIS].dim_param))
    if not wanted:
        return {}
    found: dict[str, int] = {}
    types = inferred_types(model)
    producers = {output: node for node in model.graph.node for output in node.output}
    for node, dim in wanted:
        width = _last_dim(types.get(node.input[0]), producers.get(node.input[0]))
        attributes = {a.name: a.i for a in node.attribute}
        heads = attributes.get("num_heads", 0)
        if len(node.input) < 2 or not node.input[1]:  # packed: the query's heads, then the keys' and the values'
            heads += 2 * attributes.get("kv_num_heads", 0)
        if width and heads and width % heads == 0:
            found.setdefault(dim, width // heads)
    return found


def _last_dim(inferred: onnx.TypeProto | None, producer: onnx.NodeProto | None) -> int | None:
    """A value's last dim: what ONNX's inference gave it, else, made by ONNX Runtime's MatMulNBits
    (an int4 builder file's projection, which that inference does not know), the op's `N`."""
    dims = inferred.tensor_type.shape.dim if inferred is not None else []
    if dims and dims[-1].HasField("dim_value"):
        return dims[-1].dim_value
    if producer is not None and producer.op_type == "MatMulNBits" and producer.domain == "com.microsoft":
        return next((a.i for a in producer.attribute if a.name == "N"), None)
    return None


_PAST_KEY_INPUT, _HEAD_AXIS = 3, 3  # GroupQueryAttention's past_key; a (batch, heads, length, head size) cache's


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
