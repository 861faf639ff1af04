"""The PyTorch model a command judges or exports: a module object, a factory (`pkg.mod:fn`,
`file.py:fn`) or a Hugging Face `save_pretrained` folder, with the checkpoint and LoRA adapter
that make it the fine-tuned model."""

import inspect
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ticknorm.base.errors import InputSpecError
from ticknorm.exporter.load import build_model, hf_architecture, load_apply_checkpoint, load_hf_directory
from ticknorm.exporter.lora import merge_adapter
from ticknorm.exporter.tasks import DEFAULT, WITH_PAST


@dataclass(frozen=True)
class ModelRef:
    source: object  # an nn.Module, a factory string, or a Hugging Face folder
    checkpoint: str | None = None  # .pt/.pth/.bin state dict or .safetensors
    adapter: str | None = None  # a PEFT adapter folder, merged in
    trust_pickle: bool = False  # allow checkpoints that unpickle objects (runs code from the file)
    adapter_config: str | None = None  # the adapter_config.json that scales a checkpoint's LoRA weights

    @property
    def owned(self) -> bool:
        """Whether `load` builds a model of its own (from a factory, a checkpoint or a folder), which
        nobody else holds: a command may then free its weights once it no longer needs them."""
        return isinstance(self.source, (str, Path))

    def load(self, task: str = DEFAULT):
        """The model as the exporters and the PyTorch runner call it: a transformers model behind
        `HfGraph` (named tensors in and out, flags and cache handled for `task`), any other
        module as it is, in eval mode."""
        module = self._module()
        if self.adapter is not None:
            module = merge_adapter(module, self.adapter)
        return exportable(module.eval(), task)

    def _module(self):
        if self.adapter_config is not None and self.checkpoint is None:
            raise InputSpecError("--adapter-config scales the LoRA weights of a --checkpoint state dict; give the "
                                 "checkpoint too (an adapter folder goes to --adapter)")
        loading = (self.checkpoint, self.trust_pickle, self.adapter_config)
        if not isinstance(self.source, (str, Path)):
            return self.source if self.checkpoint is None else load_apply_checkpoint(self.source, *loading)
        if Path(self.source).is_dir():
            if self.checkpoint is None:
                return load_hf_directory(self.source)
            return load_apply_checkpoint(hf_architecture(self.source), *loading)  # the folder's model, fine-tuned
        return build_model(str(self.source), *loading)


def task_feeds(module, feeds: dict, dynamic_axes: dict, seed: int = 0) -> tuple[dict, dict]:
    """The feeds and dynamic axes completed with what the model's task needs (a transformers
    model's masks, decoder ids, a KV cache); any other model's as they are."""
    from ticknorm.exporter.hf import HfGraph, complete_inputs

    if isinstance(module, HfGraph):
        return complete_inputs(module, feeds, dynamic_axes, seed=seed)
    return feeds, dynamic_axes


def torch_feeds(module, feeds: dict, graph_inputs: Collection[str]) -> dict:
    """`feeds` less the graph inputs that `module`'s forward does not take: a file exported
    elsewhere may take more than the model (a merged decoder's `use_cache_branch`, positions a
    model computes itself), and ONNX runners get those again as the model assumes them
    (`graph_feeds`). Any other name stays, for forward() to refuse."""
    from ticknorm.exporter.hf import HfGraph

    if isinstance(module, HfGraph):
        return {name: value for name, value in feeds.items() if name not in graph_inputs or module.takes(name)}
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return feeds
    names = {p.name for p in parameters}
    return {name: value for name, value in feeds.items() if name not in graph_inputs or name in names}


def exportable(module, task: str = DEFAULT):
    from ticknorm.exporter.hf import HfGraph, is_hf_model

    if isinstance(module, HfGraph):
        return module
    if is_hf_model(module):
        return HfGraph(module, task)
    if task == WITH_PAST:
        raise InputSpecError(f"--task {task} needs a Hugging Face decoder; {type(module).__name__} is not a "
                             "transformers model")
    return module
