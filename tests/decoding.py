"""A decoder file driven as a deployer drives it, beside the Hugging Face model: a prefill, then
greedy decode steps, logits within 1e-4 of PyTorch's and the same tokens each step. Batch 2 is
left-padded (the second row's first two tokens masked), as generation pads."""

import numpy as np
import onnxruntime as ort
import torch

ATOL = 1e-4


def _mask(batch: int, length: int) -> np.ndarray:
    mask = np.ones((batch, length), np.int64)
    mask[1:, :2] = 0
    return mask


def _ids(model, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, length))


def _assert_logits(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> None:
    """Logits agree on every position that is a token (a padded position's row is masked out
    entirely, and what a runtime writes there is no one's answer)."""
    kept = mask[:, -actual.shape[1]:].astype(bool)
    np.testing.assert_allclose(actual[kept], expected[kept], atol=ATOL, rtol=0)


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_cached_decode(model, path, batch: int, steps: int, prompt: int = 6, positions: bool = False) -> None:
    """A prefill on an empty cache, then `steps` one-token steps, each fed the file's own cache;
    with `positions`, each step also fed generate()'s position_ids (a padded row's count from its
    first token)."""
    runner, config = session(path), model.config
    outputs = [o.name for o in runner.get_outputs()]
    ids, mask = _ids(model, batch, prompt), _mask(batch, prompt)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = {f"past_key_values.{layer}.{kind}": np.zeros((batch, config.num_key_value_heads, 0, head), np.float32)
            for layer in range(config.num_hidden_layers) for kind in ("key", "value")}
    cache, tokens = None, ids
    for _ in range(1 + steps):
        given = {"input_ids": tokens, "attention_mask": mask}
        if positions:
            given["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -tokens.shape[1]:]
        got = dict(zip(outputs, runner.run(None, {**given, **past})))
        with torch.no_grad():
            expected = model(**{name: torch.from_numpy(value) for name, value in given.items()}, cache=cache,
                             use_cache=True)
        _assert_logits(got["logits"], expected.logits.numpy(), mask)
        tokens, cache = got["logits"][:, -1:].argmax(-1), expected.cache
        assert np.array_equal(tokens, expected.logits[:, -1:].argmax(-1).numpy())
        past = {name.replace("present", "past_key_values", 1): value for name, value in got.items()
                if name.startswith("present.")}
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    assert next(iter(past.values())).shape[2] == prompt + steps


def assert_recomputed_decode(model, path, batch: int, steps: int) -> None:
    """Without a cache: the whole sequence run again each step."""
    runner = session(path)
    ids = _ids(model, batch, 5)
    for _ in range(steps):
        mask = _mask(batch, ids.shape[1])
        logits = runner.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        _assert_logits(logits, expected, mask)
        token = logits[:, -1:].argmax(-1)
        assert np.array_equal(token, expected[:, -1:].argmax(-1))
        ids = np.concatenate([ids, token], axis=1)
