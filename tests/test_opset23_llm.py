"""`export --opset 23` of tiny Llama and Qwen2 folders runs in the installed ONNX Runtime with
PyTorch's numbers, for both tasks: the standard ops the exporter writes (RMSNormalization,
RotaryEmbedding, Attention) stay, and the one that ONNX Runtime refuses as exported (a
RotaryEmbedding whose caches broadcast a batch of 1) is rewritten to the form it runs, which the
export says in one note line. Each file is then driven as a deployer does, batch 1 and 2: a prefill
and a 3-step greedy decode (each step fed the file's own cache), logits within 1e-4 of the Hugging
Face model's and the same tokens."""

from collections import Counter

import onnx
import pytest
from click.testing import CliRunner
from decoding import assert_cached_decode, assert_recomputed_decode
from hf_models import build

from ticknorm.cli import main

ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM"]
TASKS = ["default", "text-generation-with-past"]
STEPS = 3


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
    assert_cached_decode(model, path, batch, STEPS)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 2])
def test_without_cache_greedy_decode_matches_pytorch(exported, architecture, batch):
    """The task without a cache decodes by running the whole sequence again each step."""
    model, path, _ = exported(architecture, "default")
    assert_recomputed_decode(model, path, batch, STEPS)
