"""Build the fine-tuned model: a factory plus a checkpoint, or a Hugging Face directory.

Checkpoints load with `torch.load(weights_only=True)`: tensors and plain containers only, so a
checkpoint file can never run code. A pickled full model or a TorchScript archive needs
`trust_pickle=True`, because unpickling executes whatever the file says.
"""

import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path

from ticknorm.base.optional import require
from ticknorm.base.errors import CheckpointError, first_line
from ticknorm.exporter.lora import (adapter_config_file, is_peft_state_dict, listing, merge_lora_weights,
                                    split_lora_state_dict, unwrap_peft_state_dict)
from ticknorm.exporter.shards import INDEX_SUFFIX, ShardedCheckpoint, TensorInfo, checkpoint_precision
from ticknorm.runtime.torch_runner import TORCH_DTYPES, module_precision

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_DDP_PREFIXES = ("module.", "_orig_mod.")


def load_factory(reference: str):
    """`pkg.module:fn` or `path/to/file.py:fn` -> the callable."""
    module_name, sep, attribute = reference.rpartition(":")
    if not sep or not module_name or not attribute:
        raise CheckpointError(f"bad factory '{reference}': expected pkg.module:function or path/to/file.py:function")
    try:
        is_file = module_name.endswith(".py")
        module = _import_file(Path(module_name)) if is_file else importlib.import_module(module_name)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user module can fail in any way while importing
        raise CheckpointError(f"cannot import '{module_name}' for factory '{reference}': "
                              f"{type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise CheckpointError(f"'{module_name}' has no callable '{attribute}'")
    return factory


def _import_file(path: Path):
    if not path.is_file():
        raise CheckpointError(f"factory file not found: {path}")
    name = f"ticknorm_factory_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CheckpointError(f"factory file {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(factory: str, checkpoint=None, trust_pickle: bool = False, adapter_config=None):
    """Call the factory, load the checkpoint into what it returns, and put it in eval mode."""
    torch = require("torch", "torch")
    try:
        model = load_factory(factory)()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"factory '{factory}' failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        model = load_apply_checkpoint(model, checkpoint, trust_pickle, adapter_config)
    return model.eval()


def load_apply_checkpoint(model, checkpoint, trust_pickle: bool = False, adapter_config=None):
    """`model` with the checkpoint's weights, or the whole module the checkpoint holds. A state
    dict saved from a PEFT-wrapped model with its LoRA weights is merged into the base weights
    with the scaling of `adapter_config` (or the `adapter_config.json` beside the checkpoint)."""
    torch = require("torch", "torch")
    if str(checkpoint).endswith(INDEX_SUFFIX):
        if adapter_config is not None:
            raise CheckpointError("--adapter-config merges the LoRA weights of a one-file state dict, not of a sharded "
                                  "checkpoint; merge first: peft_model.merge_and_unload(), then save_pretrained")
        apply_sharded(model, ShardedCheckpoint.read(checkpoint))
        return model
    loaded = load_checkpoint(checkpoint, trust_pickle)
    if isinstance(loaded, torch.nn.Module):
        return loaded
    source = Path(checkpoint).name
    base, adapter = split_lora_state_dict(strip_wrapper_prefixes(loaded))
    config = adapter_config_file(checkpoint, adapter_config, adapter, source)
    apply_state_dict(model, base, source)
    return model if config is None else merge_lora_weights(model, adapter, config, source)


def load_checkpoint(path, trust_pickle: bool = False):
    """A state dict (name -> tensor), or a whole module when trusted pickles are allowed."""
    torch = require("torch", "torch")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if _is_torchscript(path):
        if not trust_pickle:
            raise CheckpointError(f"{path} is a TorchScript archive, which runs its own code; "
                                  "pass --trust-pickle only if you trust where it came from")
        return torch.jit.load(str(path), map_location="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if named is None:  # anything else is a damaged or foreign file
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(exc)})") from exc
        raise CheckpointError(f"{path} holds pickled objects besides tensors (it names {named.group(1)}), and "
                              "unpickling runs code from the file; pass --trust-pickle only if you trust where it "
                              "came from") from exc
    except Exception as exc:  # noqa: BLE001 - torch.load reports corrupt files in many ways
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line(exc)})") from exc
    if isinstance(loaded, torch.nn.Module):
        return loaded
    return _unwrap_state_dict(loaded, path)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _load_safetensors(path: Path) -> dict:
    safetensors_torch = require("safetensors.torch", "torch")
    try:
        return safetensors_torch.load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from exc


def _unwrap_state_dict(loaded, path: Path) -> dict:
    torch = require("torch", "torch")
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} holds no state dict (name -> tensor), nor one under "
                              f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}")
    return loaded


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Remove `module.` (DDP, DataParallel) and `_orig_mod.` (torch.compile) from every key."""
    for prefix in _DDP_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def apply_state_dict(model, state_dict: dict, source: str = "checkpoint") -> None:
    """Load strictly; on mismatch, one error listing missing, unexpected and wrong-shape keys. A
    bf16 or fp16 checkpoint makes the model that type first, so it runs as it was saved."""
    infos = {name: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state_dict.items()}
    names = fitted_names(model, infos, source)
    model.load_state_dict({name: state_dict[original] for name, original in names.items()}, strict=True)


def apply_sharded(model, checkpoint: ShardedCheckpoint) -> None:
    """`apply_state_dict` for a sharded checkpoint: checked against the shards' headers, then
    copied in one shard at a time (see `shards`)."""
    names = fitted_names(model, checkpoint.tensor_infos(), checkpoint.index.name)
    model_name = {original: name for name, original in names.items()}
    for _, tensors in checkpoint.shard_tensors():
        model.load_state_dict({model_name[key]: tensor for key, tensor in tensors.items()}, strict=False)
        del tensors


def fitted_names(model, infos: dict, source: str) -> dict:
    """The model's parameter name -> the checkpoint's, once every key, shape and type fits: DDP
    and torch.compile prefixes and a PEFT wrapper's names taken off, and the model cast to the
    checkpoint's floating type when that is bf16 or fp16. A tied weight the checkpoint holds under
    one of its names only (safetensors keeps one) is read from that one for every name."""
    names = strip_wrapper_prefixes({name: name for name in infos})
    if is_peft_state_dict(names):
        names = unwrap_peft_state_dict(names, source)
    names = {**_tied_twins(model, names), **names}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    wrong_shape = sorted(f"{k} {infos[names[k]].shape} vs model {tuple(expected[k].shape)}"
                         for k in set(expected) & set(names) if infos[names[k]].shape != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        parts = [f"{label}: {listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(parts))
    _to_checkpoint_type(model, infos)
    return names


def _tied_twins(model, names: dict) -> dict:
    """Model name -> checkpoint name for each tied parameter the checkpoint names under a twin only."""
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    twins = {}
    for group in tied.values():
        stored = next((name for name in group if name in names), None)
        if stored is not None:
            twins.update({name: names[stored] for name in group if name not in names})
    return twins


def _to_checkpoint_type(model, infos: dict) -> None:
    """A bf16/fp16 checkpoint's model runs in that type (the reference is PyTorch as it was saved)."""
    precision = checkpoint_precision(infos)
    if precision != "fp32" and module_precision(model) == "fp32":
        model.to(getattr(require("torch", "torch"), TORCH_DTYPES[precision]))


def load_hf_directory(directory):
    """A `save_pretrained` directory, built from its own config and weights, never downloaded."""
    return _from_hf_directory(directory, lambda model_class, _config: model_class.from_pretrained(
        str(directory), local_files_only=True, use_safetensors=None))


def hf_architecture(directory):
    """The model a `save_pretrained` directory's config describes, before any fine-tuned state dict
    is put in it: fp32, so the state dict's own type decides the type it runs in (see
    `apply_state_dict`); the folder's weights are not read, as the state dict replaces them all."""
    torch = require("torch", "torch")
    return _from_hf_directory(directory, lambda model_class, config: model_class._from_config(
        config, dtype=torch.float32))


def _from_hf_directory(directory, build):
    """`build(model class, config)` on the class and config of the folder's config.json, in eval mode."""
    transformers = require("transformers", "hf")
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json)")
    transformers.utils.logging.disable_progress_bar()  # ticknorm prints its own progress
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model = build(hf_model_class(transformers, config, directory), config)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load the Hugging Face model in {directory}: {first_line(exc)}") from exc
    return model.eval()


def hf_model_class(transformers, config, directory):
    """The class config.json names (AutoModel when it names none)."""
    architectures = getattr(config, "architectures", None) or []
    model_class = _model_class(transformers, config, architectures[0]) if architectures else transformers.AutoModel
    if model_class is None:
        raise CheckpointError(f"transformers has no class {architectures[0]} named in {directory}/config.json")
    return model_class


def _model_class(transformers, config, name: str):
    """A class transformers exports by name, or one only its model module has (`WhisperEncoder`)."""
    found = getattr(transformers, name, None)
    if found is not None:
        return found
    try:
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    except ImportError:
        return None
    return getattr(module, name, None)
