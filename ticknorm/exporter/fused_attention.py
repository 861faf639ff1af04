"""Each decoder layer's attention written as one op with its KV cache, while the dynamo exporter
traces the model.

Matching a decomposed attention after the export (onnxscript's `ort_fusions` does) depends on how
each transformers version and exporter spelled it, and it found MultiHeadAttention where ONNX
Runtime's fast decode op is GroupQueryAttention (it then decoded slower than the plain graph).
Here the attention modules themselves (Llama's form: q/k/v/o projections, rotary position
embeddings, a cache layer per module; Llama, Qwen2/3, Mistral, Gemma 1/2, Granite and their kin)
are traced through a forward that calls one op, while the model's own mask and rotary code go
dead and leave the graph:

- `ort`: ONNX Runtime's `com.microsoft` GroupQueryAttention on the packed Q/K/V projection, the
  rotary embedding inside it (from cos/sin caches of the model's own rotary module), the cache
  concatenated inside it; the attention mask as its additive `attention_bias`, so left-padded
  batches keep PyTorch's numbers. Its CPU kernel takes a prompt continued on a cache at batch 1
  only (`attention_target.runnable_feeds`).
- `onnx`: ONNX's own `Attention` (opset 23): past and present inside it, grouped KV heads, the
  mask as a boolean input; Q/K/V packed, ONNX's RotaryEmbedding (opset 23) on this step's positions.
- BERT's family (bidirectional, `--target ort` only): ONNX Runtime's `Attention`, Q/K/V packed into
  its weights, the 2-D mask as its `mask_index`.

The op keeps its module scope (it is called inside the attention module's forward): profiles and
per-module checks map it to `model.layers.N.self_attn`. The PyTorch model is patched only while
the exporter traces it; every reference output comes from the untouched model.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticknorm.base.errors import InputSpecError
from ticknorm.exporter.attention_target import ATTENTION_TARGETS, FUSED, ORT

_GQA = "com.microsoft::GroupQueryAttention"
_ORT_ATTENTION = "com.microsoft::Attention"
_ROTARY_MULTIPLE = 16  # GroupQueryAttention's rotary takes head sizes in multiples of 16
# The bias of a position not seen: fp16's lowest, which fp32 and bf16 hold too (a --precision fp16
# graph keeps it finite) and which softmax takes to 0 in each.
_MASKED = -65504.0
# rotary types whose cos/sin depend on the sequence seen so far: no one cache serves every step
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class LayerShape:
    """What one attention module's fused op needs to know about it."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float  # 0: none
    window: int  # sliding window in tokens, the current one included; 0: none
    normed: bool  # q_norm and k_norm before the rotary: on each head (Qwen3) or on all heads (OLMo 2)


@dataclass
class StepValues:
    """What every layer's op takes, computed once per traced step from the graph's inputs."""

    total: Any  # a SymInt while traced: past + sequence
    total_int32: torch.Tensor  # a scalar
    seqlens_k: torch.Tensor  # (batch,) int32: total - 1, every row's cache read to its end
    bias: torch.Tensor  # (batch, 1, sequence, total) float, 0 or the type's lowest: padding only
    allowed: torch.Tensor  # (batch, 1, sequence, total) bool: causal and padding (ONNX Attention)
    rows: torch.Tensor  # (sequence, 1): each query's position
    position_ids: torch.Tensor | None  # the graph's own, when it takes them
    mask: torch.Tensor  # (batch, total) int32, 1 where a token is seen: ONNX Runtime's Attention's mask_index
    windowed: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def masks(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias and the allowed mask of a layer seeing the last `window` tokens (0: all),
        each made once per step and window, shared by the layers that see as far. The window
        goes in the mask, not in GroupQueryAttention's `local_window_size`, whose count ONNX
        Runtime's kernels do not agree on with the model's: the mask says exactly what it sees."""
        if not window:
            return self.bias, self.allowed
        if window not in self.windowed:
            near = torch.arange(self.total)[None, :] > self.rows - window
            self.windowed[window] = (torch.where(near, self.bias, _MASKED),
                                     self.allowed & near)
        return self.windowed[window]


def attention_modules(model: Any) -> list[Any]:
    """The modules written in Llama's form that this module can fuse."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))
            and isinstance(module.q_proj, nn.Linear)]


def encoder_attention_modules(model: Any) -> list[Any]:
    """Bidirectional self-attention written as BERT's (query/key/value projections, the heads'
    count and size): BERT, RoBERTa, XLM-R, ELECTRA and their kin."""
    return [module for module in model.modules()
            if all(hasattr(module, name) for name in ("query", "key", "value", "num_attention_heads",
                                                       "attention_head_size"))
            and isinstance(module.query, nn.Linear) and not getattr(module, "is_causal", False)
            and not getattr(module, "is_decoder", False)]


def _fusable(model: Any) -> tuple[list[Any], list[Any]]:
    """The decoder attentions in Llama's form, else (none of those) the encoder attentions in BERT's."""
    decoders = attention_modules(model)
    return decoders, [] if decoders else encoder_attention_modules(model)


def fused_module_paths(graph: Any) -> list[str]:
    """The paths (in `graph`, an `HfGraph`) of the attention modules a fused target writes as one op."""
    fused = {module for modules in _fusable(graph.hf) for module in modules}
    return [name for name, module in graph.named_modules() if module in fused]


def _rotary_module(model: Any, architecture: str) -> Any:
    found = [module for name, module in model.named_modules() if name.endswith("rotary_emb")]
    if len(found) != 1:
        raise InputSpecError(f"{architecture}: {len(found)} rotary embedding modules where one serves every layer; "
                             "export it with --target plain")
    rope = getattr(found[0], "rope_type", "default")
    if not isinstance(rope, str) or not hasattr(found[0], "inv_freq"):  # Gemma 3: one per layer type
        raise InputSpecError(f"{architecture}'s rotary embedding differs by layer type; export it with --target plain")
    if rope in _DYNAMIC_ROPE:
        raise InputSpecError(f"{architecture}'s rotary embedding is '{rope}' (its cos/sin depend on the sequence); "
                             "export it with --target plain")
    return found[0]


def _layer_shape(module: Any) -> LayerShape:
    config = module.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    types = getattr(config, "layer_types", None)
    if types is not None:  # each layer says whether it slides (Qwen2, Gemma 2, Cohere 2, SmolLM3, ...)
        window = config.sliding_window if types[module.layer_idx] == "sliding_attention" else None
    elif hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:  # Mistral: the config's, every layer
        window = getattr(config, "sliding_window", None)
    normed = hasattr(module, "q_norm") and hasattr(module, "k_norm")
    return LayerShape(heads, kv_heads, module.head_dim, float(module.scaling),
                      float(getattr(module, "attn_logit_softcapping", None) or 0.0), int(window or 0), normed)


def _check_fusable(modules: list[Any], architecture: str) -> None:
    if not modules:
        raise InputSpecError(f"{architecture} has no attention written as q/k/v/o projections with rotary position "
                             "embeddings (Llama's form): export it with --target plain")
    for module in modules:
        if not getattr(module, "is_causal", True):
            raise InputSpecError(f"{architecture}'s attention is bidirectional: the fused ops are causal; "
                                 "export it with --target plain")


@contextlib.contextmanager
def fused_attention(graph: Any, target: str) -> Iterator[nn.Module]:
    """`graph` (an `HfGraph`) to trace with each attention written as `target`'s op; the model is
    itself again on leaving. `plain` and `trt` give `graph` back untouched."""
    if target not in ATTENTION_TARGETS:
        raise InputSpecError(f"unknown attention target '{target}'; choose one of: {', '.join(ATTENTION_TARGETS)}")
    if target not in FUSED:
        yield graph
        return
    if not hasattr(graph, "hf"):
        raise InputSpecError(f"--target {target} fuses the attention of Hugging Face decoders; this model is a "
                             f"{type(graph).__name__}: export it with --target plain")
    architecture = type(graph.hf).__name__
    if "input_ids" not in graph.accepts:
        raise InputSpecError(f"--target {target} fuses the attention of text models (input_ids); {architecture} "
                             "takes none: export it with --target plain")
    tracer = FusedAttentionGraph(graph)
    modules, encoders = _fusable(graph.hf)
    if encoders:
        if target != ORT:
            raise InputSpecError(f"--target {target}: {architecture}'s bidirectional attention is fused for ONNX "
                                 "Runtime only (--target ort); export it with --target plain")
        with contextlib.ExitStack() as stack:
            for module in encoders:
                stack.enter_context(_patched_encoder(module, tracer))
            yield tracer
        return
    _check_fusable(modules, architecture)
    rotary = _rotary_module(graph.hf, architecture)
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(_rotary_caches(rotary))
        rotated = 2 * holder.cos_cache.shape[-1]
        if any(module.head_dim != rotated for module in modules):
            raise InputSpecError(f"{architecture}'s rotary embedding turns {rotated} of each head's dims, not all: "
                                 "export it with --target plain")
        for module in modules:
            stack.enter_context(_patched(module, tracer, target, holder))
        yield tracer


class FusedAttentionGraph(nn.Module):
    """`graph` as the exporter traces it: each step's shared values computed from its inputs
    first, for every layer's op. Holds `graph`'s modules under their own names, so scopes and
    weights keep theirs."""

    graph: Any  # set past nn.Module's __setattr__: not a child module

    def __init__(self, graph: nn.Module):
        super().__init__()
        object.__setattr__(self, "graph", graph)
        self._modules, self._parameters, self._buffers = graph._modules, graph._parameters, graph._buffers
        self.step: StepValues | None = None

    def export_arguments(self, tensors: dict, dynamic_axes: dict):
        return self.graph.export_arguments(tensors, dynamic_axes)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                past_key_values=None):
        """A step's inputs, named (not `**kwargs`: torch.export guards a dict of tensors by a name
        its guard code cannot resolve)."""
        self.step = _step_values(input_ids, attention_mask, position_ids, past_key_values)
        try:
            return self.graph(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              position_ids=position_ids, past_key_values=past_key_values)
        finally:
            self.step = None


def _step_values(input_ids, attention_mask, position_ids, past) -> StepValues:
    """Written with the fewest nodes each (a decode step runs them all): the total length from the
    mask's shape, every row's cache read to its end (padding is the bias's job), the bias one
    Cast, Sub and Mul of the mask."""
    batch, sequence = input_ids.shape
    if attention_mask is None:  # no mask: every token of the past and of the step is seen
        past_length = past[0][0].shape[2] if past else 0
        attention_mask = torch.ones((batch, past_length + sequence), dtype=torch.int64)
    total = attention_mask.shape[1]
    seen = attention_mask[:, None, None, :].to(torch.float32)
    bias = ((seen - 1.0) * -_MASKED).expand(-1, 1, sequence, -1)  # its rows, as GroupQueryAttention asks
    rows = torch.arange(sequence)[:, None] + (total - sequence)
    causal = torch.arange(total)[None, :] <= rows
    return StepValues(total, torch.scalar_tensor(total, dtype=torch.int32),
                      torch.full((batch,), total - 1, dtype=torch.int32), bias, seen.bool() & causal, rows,
                      position_ids, attention_mask.to(torch.int32))


@contextlib.contextmanager
def _rotary_caches(rotary: Any) -> Iterator[Any]:
    """`rotary` holding the fused ops' cos and sin caches, (max positions, rotary dim / 2): its own
    values (its scaling included) at every position it was made for, as its buffers while the
    exporter traces (read through the module, so that one initializer each, named after it, serves
    every layer)."""
    positions = int(rotary.max_seq_len_cached)
    inv_freq = rotary.inv_freq
    with torch.no_grad():
        cos, sin = rotary(torch.zeros((), dtype=inv_freq.dtype), torch.arange(positions)[None])
    half = cos.shape[-1] // 2
    names = ("cos_cache", "sin_cache")
    for name, values in zip(names, (cos, sin)):
        rotary.register_buffer(name, values[0, :, :half].float().contiguous(), persistent=False)
    try:
        yield rotary
    finally:
        for name in names:
            delattr(rotary, name)


@contextlib.contextmanager
def _patched(module: Any, tracer: FusedAttentionGraph, target: str, rotary: Any) -> Iterator[None]:
    """`module` traced through the fused forward for `target`, its Q/K/V weights packed into one
    buffer of its own (one MatMul, named after the module)."""
    shape = _layer_shape(module)
    weight, bias = _packed_projections((module.q_proj, module.k_proj, module.v_proj))
    forward = _gqa_forward if target == ORT else _onnx_forward

    def traced(self, hidden_states, position_embeddings=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        assert tracer.step is not None  # set by the tracer's forward around the model's
        return forward(self, hidden_states, Layer(tracer.step, shape, rotary, cache))

    with _traced_as(module, traced, qkv_weight=weight, qkv_bias=bias):
        yield


@contextlib.contextmanager
def _patched_encoder(module: Any, tracer: FusedAttentionGraph) -> Iterator[None]:
    """BERT's self-attention traced as ONNX Runtime's `Attention` (what its transformers optimizer
    makes of BERT): the Q/K/V projections packed into its weights (input x 3 * hidden) and bias, the
    2-D mask as its `mask_index`."""
    weight, bias = _packed_projections((module.query, module.key, module.value))
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    heads, size = int(module.num_attention_heads), int(module.attention_head_size)
    scale = float(getattr(module, "scaling", size ** -0.5))

    def traced(self, hidden_states, *args, **kwargs):
        assert tracer.step is not None  # set by the tracer's forward around the model's
        batch, sequence = hidden_states.shape[:2]
        output = torch.onnx.ops.symbolic(
            _ORT_ATTENTION, [hidden_states, self.qkv_weight, self.qkv_bias, tracer.step.mask],
            dict(num_heads=heads, scale=scale), dtype=hidden_states.dtype, shape=(batch, sequence, heads * size),
            version=1)
        return output, None

    with _traced_as(module, traced, qkv_weight=weight.t().contiguous(), qkv_bias=bias):
        yield


def _packed_projections(projections) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projections' weights stacked (out x in, as nn.Linear holds them), and their biases (a
    missing one as zeros; None when none has one)."""
    weight = torch.cat([p.weight for p in projections]).detach()
    if all(p.bias is None for p in projections):
        return weight, None
    return weight, torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                              for p in projections]).detach()


@contextlib.contextmanager
def _traced_as(module: Any, forward, **buffers: torch.Tensor | None) -> Iterator[None]:
    """`module` running `forward`, holding `buffers` (None: not held) while the exporter traces
    it: they are read through the module, so their initializers are named after it. The module
    is itself again on leaving."""
    held = [name for name, value in buffers.items() if value is not None]
    own = module.__dict__.get("forward")  # an instance's own forward (a hook's wrapper) comes back too
    try:
        for name in held:
            module.register_buffer(name, buffers[name], persistent=False)
        module.forward = types.MethodType(forward, module)
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            module.__dict__.pop("forward", None)
        for name in held:
            if name in module._buffers:
                delattr(module, name)


def _packed(module: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden_states, module.qkv_weight, getattr(module, "qkv_bias", None))


def _split_heads(module: Any, shape: LayerShape, qkv: torch.Tensor):
    """Q, K, V as (batch, sequence, heads, head_dim), each head normed where the model norms it."""
    batch, sequence = qkv.shape[:2]
    q, k, v = qkv.split([shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim,
                         shape.kv_heads * shape.head_dim], dim=-1)
    whole = shape.normed and module.q_norm.weight.numel() != shape.head_dim  # OLMo 2: over all heads at once
    if whole:
        q, k = module.q_norm(q), module.k_norm(k)
    q, k, v = (t.reshape(batch, sequence, -1, shape.head_dim) for t in (q, k, v))
    if shape.normed and not whole:
        q, k = module.q_norm(q), module.k_norm(k)
    return q, k, v


@dataclass(frozen=True)
class Layer:
    """One attention call as the fused forward sees it."""

    step: StepValues
    shape: LayerShape
    rotary: Any  # the model's rotary module, holding the cos/sin caches by position
    cache: Any  # the model's cache (None without one)

    @property
    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.cos_cache, self.rotary.sin_cache

    def cache_layer(self, module: Any):
        """`module`'s layer of the cache (None without one): its keys and values are the past in,
        and are set to the op's present."""
        return None if self.cache is None else self.cache.layers[module.layer_idx]


def _gqa_forward(module, hidden_states, call: Layer):
    step, shape = call.step, call.shape
    batch, sequence = hidden_states.shape[:2]
    qkv = _packed(module, hidden_states)
    # GroupQueryAttention's rotary reads a prompt's positions from its first row only: a graph taking
    # position_ids (a left-padded batch's own) rotates with ONNX Runtime's RotaryEmbedding before it
    rotate_inside = shape.head_dim % _ROTARY_MULTIPLE == 0 and step.position_ids is None
    if shape.normed or not rotate_inside:
        query, key, value = (t.reshape(batch, sequence, -1) for t in _split_heads(module, shape, qkv))
        if not rotate_inside:  # ONNX Runtime's own rotary op, outside the attention
            query, key = (_ort_rotary(t, heads, call) for t, heads in ((query, shape.heads), (key, shape.kv_heads)))
    else:
        query, key, value = qkv, None, None
    layer = call.cache_layer(module)
    past = (layer.keys, layer.values) if layer is not None else (None, None)
    cos, sin = call.caches
    attributes: dict[str, Any] = dict(num_heads=shape.heads, kv_num_heads=shape.kv_heads, scale=shape.scale,
                                      do_rotary=int(rotate_inside), rotary_interleaved=0, softcap=shape.softcap)
    present = (batch, shape.kv_heads, step.total, shape.head_dim)
    output, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        _GQA, [query, key, value, *past, step.seqlens_k, step.total_int32,
               cos if rotate_inside else None, sin if rotate_inside else None,
               None, step.masks(shape.window)[0]],
        attributes, dtypes=[hidden_states.dtype] * 3,
        shapes=[(batch, sequence, shape.heads * shape.head_dim), present, present], version=1)
    if layer is not None:
        layer.keys, layer.values = present_key, present_value
    return module.o_proj(output), None


def _positions(step: StepValues, batch: int, sequence: int) -> torch.Tensor:
    """(batch, sequence) int64: the graph's position_ids, or each token's place after the past."""
    if step.position_ids is not None:
        return step.position_ids
    return step.rows.reshape(1, sequence).expand(batch, sequence)


def _ort_rotary(x: torch.Tensor, heads: int, call: Layer) -> torch.Tensor:
    """ONNX Runtime's RotaryEmbedding on (batch, sequence, heads * head_dim)."""
    cos, sin = call.caches
    return torch.onnx.ops.symbolic(
        "com.microsoft::RotaryEmbedding", [x, _positions(call.step, *x.shape[:2]), cos, sin],
        dict(num_heads=heads, interleaved=0), dtype=x.dtype, shape=x.shape, version=1)


def _onnx_forward(module, hidden_states, call: Layer):
    """ONNX's Attention: past and present inside it, grouped KV heads by their count, the mask
    (causal, padding, the sliding window) as a boolean input; ONNX's RotaryEmbedding before it,
    on the positions of this step."""
    step, shape = call.step, call.shape
    batch, sequence = hidden_states.shape[:2]
    q, k, v = (t.transpose(1, 2) for t in _split_heads(module, shape, _packed(module, hidden_states)))
    positions = _positions(step, batch, sequence)
    q, k = (torch.onnx.ops.rotary_embedding(t, *call.caches, positions) for t in (q, k))
    allowed = step.masks(shape.window)[1]
    layer = call.cache_layer(module)
    past = (layer.keys, layer.values) if layer is not None else (None, None)
    output, present_key, present_value, _ = torch.onnx.ops.attention(
        q, k, v, allowed, *past, scale=shape.scale, softcap=shape.softcap)
    if layer is not None:
        layer.keys, layer.values = present_key, present_value
    return module.o_proj(output.transpose(1, 2).reshape(batch, sequence, -1)), None
