"""`export --opset 23` of tiny Llama and Qwen2 folders runs in the installed ONNX Runtime with
PyTorch's numbers, for both tasks: the standard ops the exporter writes (RMSNormalization,
RotaryEmbedding, Attention) stay, and the one that ONNX Runtime refuses as exported (a
RotaryEmbedding whose caches broadcast a batch of 1) is rewritten to the form it runs, which the
export says in one note line. Each file is then driven as a deployer does, batch 1 and 2: a prefill
and a 3-step greedy decode (each step fed the file's own cache), logits within 1e-4 of the Hugging
Face model's and the same tokens."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from hf_models import build

from ticknorm.cli import main

ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM"]
TASKS = ["default", "text-generation-with-past"]
STEPS = 3
ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(architecture, task) -> (the Hugging Face model, the exported file, the export's output),
    each exported once through the CLI as a user runs it."""
    made = {}

    def get(architecture: str, task: str):
        if (architecture, task) not in made:
            root = tmp_path_factory.mktemp(f"{architecture}-{task}")
            model = build(architecture)
            model.save_pretrained(root / "model")
            result = CliRunner().invoke(main, ["export", "--model", str(root / "model"), "--opset", "23",
                                               "--task", task, "--input", "input_ids:batch=2xseq=8:int64",
                                               "-o", str(root / "m.onnx")])
            assert result.exit_code == 0, result.output
            made[architecture, task] = (model, root / "m.onnx", result.output)
        return made[architecture, task]

    return get


def _mask(batch: int, length: int) -> np.ndarray:
    """Ones, except the second row's first two tokens: a left-padded batch, as generation pads."""
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


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("task", TASKS)
def test_the_export_keeps_opset_23s_ops_and_says_what_it_rewrote(exported, architecture, task):
    _, path, output = exported(architecture, task)
    model = onnx.load(str(path))
    ops = Counter(node.op_type for node in model.graph.node)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 23 and ops["RMSNormalization"] == 5 and ops["RotaryEmbedding"] == 4 and ops["Attention"] == 2
    assert [line for line in output.splitlines() if "RotaryEmbedding" in line] == [
        "RotaryEmbedding: the cos/sin caches of 4 node(s) expanded to the batch, as the standard shapes them "
        "(the exporter broadcasts a batch of 1, which ONNX Runtime refuses)"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 2])
def test_with_past_greedy_decode_matches_pytorch(exported, architecture, batch):
    model, path, _ = exported(architecture, "text-generation-with-past")
    runner, config = _session(path), model.config
    outputs = [o.name for o in runner.get_outputs()]
    ids, mask = _ids(model, batch, 6), _mask(batch, 6)
    head = config.hidden_size // config.num_attention_heads
    past = {f"past_key_values.{layer}.{kind}": np.zeros((batch, config.num_key_value_heads, 0, head), np.float32)
            for layer in range(config.num_hidden_layers) for kind in ("key", "value")}
    cache, tokens = None, ids
    for _ in range(1 + STEPS):  # the prefill, then each decode step
        got = dict(zip(outputs, runner.run(None, {"input_ids": tokens, "attention_mask": mask, **past})))
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                             cache=cache, use_cache=True)
        _assert_logits(got["logits"], expected.logits.numpy(), mask)
        tokens, cache = got["logits"][:, -1:].argmax(-1), expected.cache
        assert np.array_equal(tokens, expected.logits[:, -1:].argmax(-1).numpy())
        past = {name.replace("present", "past_key_values", 1): value for name, value in got.items()
                if name.startswith("present.")}
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    assert next(iter(past.values())).shape[2] == 6 + STEPS


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 2])
def test_without_cache_greedy_decode_matches_pytorch(exported, architecture, batch):
    """The task without a cache decodes by running the whole sequence again each step."""
    model, path, _ = exported(architecture, "default")
    runner = _session(path)
    ids = _ids(model, batch, 5)
    for _ in range(STEPS):
        mask = _mask(batch, ids.shape[1])
        logits = runner.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        _assert_logits(logits, expected, mask)
        token = logits[:, -1:].argmax(-1)
        assert np.array_equal(token, expected[:, -1:].argmax(-1))
        ids = np.concatenate([ids, token], axis=1)
