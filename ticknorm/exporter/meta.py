"""A Hugging Face model that holds no weights: built on the meta device from its folder's config,
its weights read from the checkpoint's shards one tensor at a time, when something needs them.

This is what lets a model larger than memory be exported and checked: the exporter traces the
meta model (shapes only), the ONNX weights are written tensor by tensor from the shards, and the
PyTorch reference runs the model with each module's weights loaded just before it runs and
dropped right after (`weights_on_demand`), so the peak is one module's weights, not the model's.
"""

import contextlib

from ticknorm.base.errors import CheckpointError, first_line
from ticknorm.base.optional import require
from ticknorm.exporter.shards import ShardedCheckpoint, TensorReader, checkpoint_precision
from ticknorm.runtime.torch_runner import TORCH_DTYPES


class MetaModel:
    """The model of a `save_pretrained` folder on the meta device (fp32 shapes), and where each of
    its parameters and persistent buffers lives in the checkpoint (tied weights share a source)."""

    def __init__(self, folder):
        torch = require("torch", "torch")
        transformers = require("transformers", "hf")
        from ticknorm.exporter.load import hf_model_class

        self.folder = folder
        self.checkpoint = ShardedCheckpoint.of_folder(folder)
        self.infos = self.checkpoint.tensor_infos()
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        dtype = getattr(torch, TORCH_DTYPES[self.precision])  # as from_pretrained loads it
        try:
            with torch.device("meta"):
                self.model = hf_model_class(transformers, config, folder)._from_config(config, dtype=dtype).eval()
        except Exception as exc:  # noqa: BLE001 - a model class can fail in any way on a config
            raise CheckpointError(f"cannot build the model of {folder} on the meta device: {first_line(exc)}") from exc
        self.sources = self._sources()
        self.reader = TensorReader(self.checkpoint)
        self._materialize_generated_buffers()

    def _sources(self) -> dict:
        """Model tensor name -> checkpoint name. Tied parameters (one object under several names)
        take the name the checkpoint stores; a checkpoint whose names are not the model's (one a
        transformers version converts while loading) cannot be streamed, and is named."""
        groups: dict[int, list[str]] = {}
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False), *self._persistent_buffers()]:
            groups.setdefault(id(tensor), []).append(name)
        sources, missing = {}, []
        for names in groups.values():
            stored = next((name for name in names if name in self.infos), None)
            if stored is None:
                missing.append(names[0])
            sources.update({name: stored for name in names})
        if missing:
            extra = sorted(set(self.infos) - set(sources.values()))
            raise CheckpointError(f"{self.checkpoint.index.name} does not name the model's weights as the model does "
                                  f"(missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; it has "
                                  f"{', '.join(extra[:4]) or 'nothing else'}): it cannot be read tensor by tensor; "
                                  "export it whole (--streaming off)")
        return sources

    def _persistent_buffers(self):
        generated = {name for name, _ in self.model.named_non_persistent_buffers()}
        return [(name, buffer) for name, buffer in self.model.named_buffers(remove_duplicate=False)
                if name not in generated]

    def _materialize_generated_buffers(self) -> None:
        """Buffers no checkpoint holds (a rotary embedding's inverse frequencies) computed on the
        CPU as transformers computes them after loading on the meta device: small, kept."""
        for name, _ in list(self.model.named_non_persistent_buffers()):
            owner = self.model.get_submodule(name.rpartition(".")[0])
            if any(b.is_meta for b in owner.buffers(recurse=False)):
                owner.to_empty(device="cpu", recurse=False)
                self.model._init_weights(owner)

    @property
    def precision(self) -> str:
        """The checkpoint's floating type (bf16 for a current LLM folder)."""
        return checkpoint_precision(self.infos)

    def tensor(self, name: str, dtype=None):
        """The model tensor `name` read from its shard, in `dtype` (a torch dtype) when given."""
        tensor = self.reader.read(self.sources[name])
        return tensor if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point() else tensor.to(dtype)

    @contextlib.contextmanager
    def weights_on_demand(self):
        """Run the model with each module's own weights read just before its forward and dropped
        right after, each in the type the model has it in (the checkpoint's, or fp32 once the meta
        model is upcast): PyTorch's forward on a model that never holds more than one module's
        weights."""
        handles = []
        for _, module in self.model.named_modules():
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            own = [name for name, value in tensors if value.is_meta]
            if own:
                handles += [module.register_forward_pre_hook(self._loader(module)),
                            module.register_forward_hook(_releaser)]
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()

    def _loader(self, module):
        paths = {id(m): p for p, m in self.model.named_modules()}
        prefix = paths[id(module)]

        def load(_module, _args):
            module.to_empty(device="cpu", recurse=False)
            for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                full = f"{prefix}.{name}" if prefix else name
                if full in self.sources:
                    value.data = self.tensor(full, value.dtype)
        return load


def _releaser(module, _args, _output):
    module.to_empty(device="meta", recurse=False)
