"""Hugging Face models as graphs with named inputs and outputs, with or without a KV cache.

A `PreTrainedModel` returns a `ModelOutput` holding a cache object, and its forward takes flags
(`use_cache`, `return_dict`) that no exporter can pass: both exporters fail on it. `HfGraph` is the
thin wrapper that Optimum and onnx-diagnostic also put around such a model: tensors in by name,
a dict of named tensors out (`logits`, `last_hidden_state`, `present.0.key`, ...), flags set for the
user. It shares the model's submodules, parameters and buffers instead of holding the model as a
child, so every module path (and so every node scope) is the model's own: `model.layers.0...`,
not `hf.model.layers.0...`.

Tasks follow Optimum's names: `default` (no cache; what a classifier or an encoder serves),
`text-generation-with-past` (a decoder step: `past_key_values.N.key/value` in, `present.N.*` out,
dynamic batch / sequence / past axes, the mask spanning past + sequence) and
`text2text-generation-with-past` (an encoder-decoder's decoder step on the encoder's states, the
cache of its self- and cross-attention as `past_key_values.N.decoder.*` and `.encoder.*`).
"""

import inspect
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ticknorm.base.errors import InputSpecError
from ticknorm.exporter.tasks import PAST_INPUT as _PAST
from ticknorm.exporter.tasks import SEQ2SEQ_PAST_INPUT as _SEQ2SEQ_PAST
from ticknorm.exporter.tasks import DEFAULT, SEQ2SEQ_WITH_PAST, TASKS, WITH_PAST
from ticknorm.runtime.torch_runner import as_tensors, own_dtype, to_numpy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# The tensor arguments HfGraph.forward passes on, in the order the graph lists them.
TENSOR_ARGUMENTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values",
                    "input_features", "input_values", "decoder_input_ids", "decoder_attention_mask")
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
ENCODER = "encoder_sequence_length"
_SEQ2SEQ_CACHE = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")


def is_hf_model(model) -> bool:
    """True for a transformers model, without importing transformers for anyone else."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def past_names(layers: int, seq2seq: bool = False) -> list[str]:
    kinds = _SEQ2SEQ_CACHE if seq2seq else ("key", "value")
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in kinds]


class HfGraph(nn.Module):
    """`forward(**named tensors) -> {name: tensor}` around a transformers model."""

    hf: "PreTrainedModel"  # set past nn.Module's __setattr__: not a child module

    def __init__(self, model, task: str = "default"):
        super().__init__()
        if task not in TASKS:
            raise InputSpecError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
        _exportable_switches(model)
        object.__setattr__(self, "hf", model)  # not a child: its children are ours, under their own names
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.task = task
        # Every cache layer keeps every token: a sliding-window layer's too (transformers keeps the
        # last window of those), its window applied by the mask. The fused attention's present is
        # that cache (GroupQueryAttention and ONNX's Attention append, they do not trim).
        self.full_cache = False
        self.accepts = set(inspect.signature(model.forward).parameters)
        if task == WITH_PAST and not model.can_generate():
            raise InputSpecError(f"{type(model).__name__} takes no KV cache; --task {WITH_PAST} needs a decoder")
        if task == SEQ2SEQ_WITH_PAST and not getattr(model.config, "is_encoder_decoder", False):
            raise InputSpecError(f"{type(model).__name__} is no encoder-decoder; --task {SEQ2SEQ_WITH_PAST} needs one "
                                 "(T5, BART, ...)")

    @property
    def architecture(self) -> str:
        return type(self.hf).__name__

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, pixel_values=None,
                input_features=None, input_values=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, **flat_past):
        """`past_key_values` is `[[key, value], ...]` (how the exporters see it) or given flat as
        `past_key_values.N.key=...` keywords (how ticknorm's feeds and the ONNX graph name it); an
        encoder-decoder's step takes `[[decoder key, decoder value, encoder key, encoder value], ...]`."""
        if self.task == SEQ2SEQ_WITH_PAST:
            return self._decoder_step(input_ids, encoder_hidden_states, encoder_attention_mask,
                                      past_key_values or _nested_past(flat_past, seq2seq=True))
        given = dict(zip(TENSOR_ARGUMENTS, (input_ids, attention_mask, token_type_ids, position_ids, pixel_values,
                                            input_features, input_values, decoder_input_ids, decoder_attention_mask)))
        arguments = {name: value for name, value in given.items() if value is not None}
        unknown = [name for name in [*arguments, *flat_past] if name not in self.accepts and not _PAST.fullmatch(name)]
        if unknown:
            raise InputSpecError(f"{self.architecture}.forward has no parameter {', '.join(unknown)}; it takes: "
                                 f"{', '.join(n for n in TENSOR_ARGUMENTS if n in self.accepts)}")
        if self.task == WITH_PAST:
            arguments[self._cache_argument()] = self._cache(past_key_values or _nested_past(flat_past))
        if "use_cache" in self.accepts:
            arguments["use_cache"] = self.task == WITH_PAST
        outputs = self.hf.forward(**arguments, return_dict=True)
        return self._named_outputs(outputs)

    def takes(self, name: str) -> bool:
        """Whether forward passes input `name` on to the model (the cache, flat or nested, included)."""
        if self.task == SEQ2SEQ_WITH_PAST:
            return name in ("input_ids", "encoder_hidden_states", "encoder_attention_mask") or bool(
                _SEQ2SEQ_PAST.fullmatch(name))
        return (name in TENSOR_ARGUMENTS and name in self.accepts) or bool(_PAST.fullmatch(name))

    def _cache_argument(self) -> str:
        return "cache" if "cache" in self.accepts else "past_key_values"  # transformers 5.24 renames it

    def _cache(self, past: list):
        from transformers import DynamicCache

        config = None if self.full_cache else self.hf.config
        return DynamicCache(ddp_cache_data=[tuple(pair) for pair in past], config=config)

    def _decoder_step(self, input_ids, encoder_hidden_states, encoder_attention_mask, past: list) -> dict:
        """An encoder-decoder's decoder on the encoder's states (as Optimum's decoder files take
        them): logits (or the last hidden state of a model without a head), and the cache of its
        self-attention and cross-attention per layer."""
        from transformers import EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        if input_ids is None or encoder_hidden_states is None:
            raise InputSpecError(f"{self.architecture}'s decoder step takes input_ids (the decoder's tokens) and "
                                 "encoder_hidden_states")
        cache = EncoderDecoderCache(self._cache([layer[:2] for layer in past]),
                                    self._cache([layer[2:] for layer in past]))
        outputs = self.hf.forward(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                                  attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                                  use_cache=True, return_dict=True, **{self._cache_argument(): cache})
        head = "logits" if "logits" in outputs else "last_hidden_state"  # a bare BartModel has no head
        named = {head: outputs[head]}
        cache = outputs[self._cache_argument()]
        pairs = zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers)
        for layer, (own, cross) in enumerate(pairs):
            named.update({f"present.{layer}.decoder.key": own.keys, f"present.{layer}.decoder.value": own.values,
                          f"present.{layer}.encoder.key": cross.keys, f"present.{layer}.encoder.value": cross.values})
        return named

    def _named_outputs(self, outputs) -> dict:
        named = {}
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor):
                named[key] = value
            elif self.task == WITH_PAST and hasattr(value, "layers"):  # the cache: present.N.key/value
                for layer, cached in enumerate(value.layers):
                    named[f"present.{layer}.key"], named[f"present.{layer}.value"] = cached.keys, cached.values
        return named

    def export_arguments(self, tensors: dict, dynamic_axes: dict) -> tuple[dict, dict, list]:
        """What the exporters take: keyword arguments with the past nested as `[[k, v], ...]`, the
        dynamic shapes in the same structure, and the flat input names in the order they flatten."""
        arguments = TENSOR_ARGUMENTS + (("encoder_hidden_states", "encoder_attention_mask")
                                        if self.task == SEQ2SEQ_WITH_PAST else ())
        kwargs = {name: tensors[name] for name in arguments if name in tensors}
        shapes = {name: dynamic_axes.get(name, {}) for name in kwargs}
        names = list(kwargs)
        seq2seq = self.task == SEQ2SEQ_WITH_PAST
        past = [name for name in tensors if (_SEQ2SEQ_PAST if seq2seq else _PAST).fullmatch(name)]
        if past:
            kwargs["past_key_values"] = _nested_past(tensors, seq2seq)
            shapes["past_key_values"] = _nested_past({name: dynamic_axes.get(name, {}) for name in past}, seq2seq)
            names += past_names(len(kwargs["past_key_values"]), seq2seq)
        return kwargs, shapes, names


def _exportable_switches(model) -> None:
    """transformers' own switches for exporters, which compute the same numbers with ops they take:
    - a mixture of experts runs them as `batched_mm`: transformers 5's default `grouped_mm` is an op
      neither exporter takes (dynamo has no translation, TorchScript fails on its `aten::histc`);
    - `config.onnx_export` where a model has one (Longformer chunks its attention without
      `as_strided`, whose ONNX emulation reads memory as if contiguous: 2.9e-4 off on a tiny one)."""
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation not in (None, "eager", "batched_mm") and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    if getattr(model.config, "onnx_export", None) is False:
        model.config.onnx_export = True


def _nested_past(flat: dict, seq2seq: bool = False) -> list:
    pattern = _SEQ2SEQ_PAST if seq2seq else _PAST
    matches = (pattern.fullmatch(name) for name in flat)
    layers = sorted({int(match.group(1)) for match in matches if match})
    if layers != list(range(len(layers))) or not set(past_names(len(layers), seq2seq)) <= flat.keys():
        which = "decoder and encoder keys and values" if seq2seq else "keys and values both"
        raise InputSpecError(f"past_key_values.N.* must be given for every layer 0..N-1, {which}")
    kinds = _SEQ2SEQ_CACHE if seq2seq else ("key", "value")
    return [[flat[f"past_key_values.{i}.{kind}"] for kind in kinds] for i in layers]


def complete_inputs(graph: HfGraph, feeds: dict[str, np.ndarray], dynamic_axes: dict, past_length: int | None = None,
                    seed: int = 0) -> tuple[dict, dict]:
    """The feeds and dynamic axes the task needs beyond what the user gave: an all-ones
    `attention_mask` when the model takes one, `decoder_input_ids` for an encoder-decoder, and for
    a decoder with past the KV cache (from a real prefill run of the model) with its mask of past +
    sequence. Axes the user named keep their names; the ones added follow Optimum's."""
    feeds, axes = dict(feeds), {name: dict(a) for name, a in dynamic_axes.items()}
    ids = feeds.get("input_ids")
    if ids is None and graph.task == DEFAULT:
        return _decoder_start(graph, feeds, axes, seed), axes
    if ids is None or ids.ndim != 2:
        return feeds, axes
    if graph.task == SEQ2SEQ_WITH_PAST:
        return _decoder_step_inputs(graph, feeds, axes, past_length, seed)
    with_past = graph.task == WITH_PAST
    if with_past:  # a decoder step serves any batch and length: both axes are dynamic
        axes.setdefault("input_ids", {}).setdefault(0, BATCH)
        axes["input_ids"].setdefault(1, SEQUENCE)
    batch_axis = axes.get("input_ids", {}).get(0)
    if "decoder_input_ids" in graph.accepts and "decoder_input_ids" not in feeds and graph.hf.config.is_encoder_decoder:
        feeds["decoder_input_ids"] = ids.copy()
        axes["decoder_input_ids"] = {a: f"decoder_{n}" if a == 1 else n for a, n in axes.get("input_ids", {}).items()}
    past = {name: value for name, value in feeds.items() if _PAST.fullmatch(name)}  # the user's own, if given
    if with_past and not past:
        length = past_length or _distinct_length(ids.shape)
        past = prefill_cache(graph, ids.shape[0], length, seed)
        feeds.update(past)
    for name in past:
        axes.setdefault(name, {**({0: batch_axis} if batch_axis else {}), 2: PAST})
    if "attention_mask" in graph.accepts:
        mask = feeds.get("attention_mask", np.ones(ids.shape, np.int64))
        if with_past and mask.shape[-1] == ids.shape[1]:
            mask = np.concatenate([np.ones((ids.shape[0], _past_length(past)), mask.dtype), mask], axis=1)
        feeds["attention_mask"] = mask
        mask_axis = TOTAL if with_past else axes.get("input_ids", {}).get(1)
        axes["attention_mask"] = {a: n for a, n in ((0, batch_axis), (1, mask_axis)) if n}
    return feeds, {name: a for name, a in axes.items() if a}


def _decoder_start(graph: HfGraph, feeds: dict, axes: dict, seed: int) -> dict:
    """An encoder-decoder fed by features (Whisper's `input_features`, a vision encoder's pixels)
    gets decoder tokens too: its start token, then random ones; the model computes no logits
    without them. The axes follow the encoder input's batch axis, the tokens' own is dynamic."""
    given = next((name for name in TENSOR_ARGUMENTS if name in feeds), None)
    if (given is None or "decoder_input_ids" in feeds or "decoder_input_ids" not in graph.accepts
            or not getattr(graph.hf.config, "is_encoder_decoder", False)):
        return feeds
    batch = feeds[given].shape[0]
    ids = np.random.default_rng(seed + 4).integers(0, _vocabulary(graph), (batch, 4))
    start = getattr(graph.hf.config, "decoder_start_token_id", None)
    if start is not None:
        ids[:, 0] = start
    batch_axis = axes.get(given, {}).get(0)
    axes["decoder_input_ids"] = {**({0: batch_axis} if batch_axis else {}), 1: f"decoder_{SEQUENCE}"}
    return {**feeds, "decoder_input_ids": ids}


def _encoder_states(graph: HfGraph, batch: int, length: int, seed: int) -> np.ndarray:
    """The encoder's states on random input of its own kind: tokens, or (Whisper) log-mel
    features as long as the encoder takes."""
    encoder = graph.hf.get_encoder()
    rng = np.random.default_rng(seed + 3)
    inputs: dict[str, np.ndarray]
    if "input_features" in inspect.signature(encoder.forward).parameters:
        config = graph.hf.config
        frames = 2 * config.max_source_positions  # its two convolutions halve the frames once
        inputs = {"input_features": rng.standard_normal((batch, config.num_mel_bins, frames)).astype(np.float32)}
    else:
        inputs = {"input_ids": rng.integers(0, _vocabulary(graph), (batch, length))}
    with torch.no_grad():
        return to_numpy(encoder(**as_tensors(inputs, own_dtype(graph))).last_hidden_state)


def _decoder_step_inputs(graph: HfGraph, feeds: dict, axes: dict, past_length: int | None,
                         seed: int) -> tuple[dict, dict]:
    """An encoder-decoder's decoder step after `input_ids` (the decoder's tokens): the encoder's
    states on random tokens, their mask, and the cache a real step over earlier decoder tokens
    left (self-attention P long, cross-attention as long as the encoder's), unless given."""
    ids = feeds["input_ids"]
    batch = ids.shape[0]
    axes.setdefault("input_ids", {}).setdefault(0, BATCH)
    axes["input_ids"].setdefault(1, SEQUENCE)
    if "encoder_hidden_states" not in feeds:
        feeds["encoder_hidden_states"] = _encoder_states(graph, batch, _distinct_length(ids.shape), seed)
    encoded = feeds["encoder_hidden_states"].shape[1]
    feeds.setdefault("encoder_attention_mask", np.ones((batch, encoded), np.int64))
    for name in ("encoder_hidden_states", "encoder_attention_mask"):
        axes.setdefault(name, {0: BATCH, 1: ENCODER})
    if not any(_SEQ2SEQ_PAST.fullmatch(name) for name in feeds):
        length = past_length or _distinct_length((*ids.shape, encoded))
        earlier = np.random.default_rng(seed + 1).integers(0, _vocabulary(graph), (batch, length))
        step_feeds = {"input_ids": earlier, "encoder_hidden_states": feeds["encoder_hidden_states"],
                      "encoder_attention_mask": feeds["encoder_attention_mask"]}
        feeds.update(_as_past(step(graph, step_feeds)))
    for name in feeds:
        if _SEQ2SEQ_PAST.fullmatch(name):
            axes.setdefault(name, {0: BATCH, 2: PAST if ".decoder." in name else ENCODER})
    return feeds, {name: a for name, a in axes.items() if a}


def _past_length(past: dict) -> int:
    return next(iter(past.values())).shape[2] if past else 0


def _distinct_length(shape) -> int:
    """An example past length unlike every other example size (and so is past + sequence), so the
    exporter cannot mistake one dynamic axis for another."""
    return next(n for n in range(3, 64) if n not in shape and n + shape[1] not in shape)


def prefill_cache(graph: HfGraph, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`past_key_values.N.key/value` as the model itself fills them on `length` random tokens."""
    ids = np.random.default_rng(seed + 1).integers(0, _vocabulary(graph), (batch, length))
    return _as_past(step(graph, step_feeds(graph, ids, {})))


def _vocabulary(graph: HfGraph) -> int:
    return getattr(graph.hf.config.get_text_config(), "vocab_size", 2)


def _as_past(outputs: dict) -> dict:
    """A step's `present.N.*` outputs as the next step's `past_key_values.N.*` inputs."""
    return {name.replace("present", "past_key_values", 1): value for name, value in outputs.items()
            if name.startswith("present.")}


def step_feeds(graph: HfGraph, ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A decoder step's feeds: new tokens `ids` after the cache `past` (empty for a prefill)."""
    feeds = {"input_ids": ids, **past}
    if "attention_mask" in graph.accepts:
        feeds["attention_mask"] = np.ones((ids.shape[0], _past_length(past) + ids.shape[1]), np.int64)
    return feeds


def step(graph: HfGraph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decoder step in PyTorch: output name -> array, in the graph's output order."""
    with torch.no_grad():
        outputs = graph(**as_tensors(feeds, own_dtype(graph)))
    return {name: to_numpy(tensor) for name, tensor in outputs.items()}


def generation_checks(graph: HfGraph, feeds: dict[str, np.ndarray], decode_steps: int = 2, seed: int = 0) -> list:
    """`(label, feeds, PyTorch outputs)` for a prefill (empty cache) and `decode_steps` one-token
    steps, each past being the present PyTorch returned for the step before: what a generation
    loop feeds the graph, with the reference each step is judged by."""
    ids = feeds["input_ids"]
    past = {name: value[:, :, :0] for name, value in feeds.items() if _PAST.fullmatch(name)}
    rng = np.random.default_rng(seed + 2)
    checks, tokens = [], ids
    for label in ["prefill"] + [f"decode {n + 1}" for n in range(decode_steps)]:
        inputs = step_feeds(graph, tokens, past)
        outputs = step(graph, inputs)
        checks.append((label, inputs, list(outputs.values())))
        past = _as_past(outputs)
        tokens = rng.integers(0, _vocabulary(graph), (ids.shape[0], 1))
    return checks
