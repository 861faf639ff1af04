"""A sharded checkpoint (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) applied
to a model one shard at a time.

A large checkpoint is cut into shards so that nobody has to hold it whole. Reading every shard
into one state dict and then copying it into the model would hold the weights twice; here the
keys, shapes and types come from the shards' headers (safetensors) or a memory map (torch), the
model is checked against them before any tensor is read, and each shard's tensors are copied into
the model and dropped before the next shard is read: the peak is the model plus one shard.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ticknorm.base.errors import CheckpointError, first_line
from ticknorm.base.optional import require
from ticknorm.runtime.torch_runner import prevailing_precision

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch's name: float32, bfloat16, int64, ...


@dataclass(frozen=True)
class ShardedCheckpoint:
    """The index file and, per shard file, the tensor names it holds (in the index's order)."""

    index: Path
    shards: dict[Path, list[str]]  # shard file -> the tensor names it holds

    @classmethod
    def read(cls, index) -> "ShardedCheckpoint":
        """The index, every shard it names checked to exist inside the index's folder."""
        index = Path(index)
        if not index.is_file():
            raise CheckpointError(f"checkpoint not found: {index}")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a sharded checkpoint's index (no readable weight_map: "
                                  f"{first_line(exc)})") from exc
        folder = index.parent.resolve()
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            path = index.parent / str(shard)
            if not path.resolve().is_relative_to(folder) or Path(str(shard)).is_absolute():
                raise CheckpointError(f"weights outside the model's folder are refused: {index.name} maps {name} to "
                                      f"{shard}, outside {index.parent}")
            shards.setdefault(path, []).append(name)
        missing = [str(path) for path in shards if not path.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shards that are not there: {', '.join(missing)}")
        return cls(index, shards)

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo, from the shards' headers: no tensor is read."""
        infos = {}
        for path, names in self.shards.items():
            found = _infos(path)
            absent = [name for name in names if name not in found]
            if absent:
                raise CheckpointError(f"{path.name} lacks {', '.join(absent[:4])}, "
                                      f"which {self.index.name} says it holds")
            infos.update({name: found[name] for name in names})
        return infos

    @classmethod
    def of_folder(cls, folder) -> "ShardedCheckpoint":
        """A `save_pretrained` folder's weights: its index, or its one file as a single shard."""
        folder = Path(folder)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / (name + INDEX_SUFFIX)).is_file():
                return cls.read(folder / (name + INDEX_SUFFIX))
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return cls(folder / name, {folder / name: list(_infos(folder / name))})
        raise CheckpointError(f"{folder} holds no weights (model.safetensors, pytorch_model.bin, or their index)")

    def shard_tensors(self) -> Iterator[tuple[Path, dict[str, "torch.Tensor"]]]:
        """(shard path, {name: tensor}) for one shard at a time."""
        for path, names in self.shards.items():
            tensors = _load(path)
            yield path, {name: tensors[name] for name in names}
            del tensors


def _infos(path: Path) -> dict[str, TensorInfo]:
    if path.suffix == ".safetensors":
        safetensors = require("safetensors", "torch")
        try:
            with safetensors.safe_open(str(path), framework="pt") as shard:
                return {name: _info(shard.get_slice(name)) for name in shard.keys()}
        except Exception as exc:  # noqa: BLE001 - a damaged header fails in many ways
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from exc
    return {name: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, t in _load(path).items()}  # memory-mapped: nothing is read but the pickle


_SAFETENSORS_TYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _info(view) -> TensorInfo:
    return TensorInfo(tuple(view.get_shape()), _SAFETENSORS_TYPES.get(view.get_dtype(), view.get_dtype().lower()))


def _load(path: Path) -> dict[str, "torch.Tensor"]:
    """A shard's tensors: safetensors read whole, a torch shard memory-mapped (tensors only)."""
    torch = require("torch", "torch")
    try:
        if path.suffix == ".safetensors":
            return require("safetensors.torch", "torch").load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch and safetensors report damaged files in many ways
        raise CheckpointError(f"{path} is not a readable checkpoint shard ({first_line(exc)})") from exc


def checkpoint_precision(infos: dict[str, TensorInfo]) -> str:
    """The floating type most of a checkpoint's values are stored in (name -> TensorInfo), read
    from its headers: bf16 for a current LLM folder."""
    return prevailing_precision((info.dtype, math.prod(info.shape)) for info in infos.values())


class TensorReader:
    """One tensor at a time from a checkpoint's shards. A safetensors tensor is read with plain
    file reads at its offset: a memory map (what `safe_open` gives) would keep every page read
    resident in this process (RSS) for as long as the shard stays open, which for a model larger
    than memory is all of it."""

    def __init__(self, checkpoint: ShardedCheckpoint):
        self.where = {name: path for path, names in checkpoint.shards.items() for name in names}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._torch_shards: dict[Path, dict[str, torch.Tensor]] = {}

    def read(self, name: str) -> "torch.Tensor":
        path = self.where[name]
        if path.suffix != ".safetensors":
            if path not in self._torch_shards:
                self._torch_shards[path] = _load(path)
            return self._torch_shards[path][name]
        if path not in self._headers:
            self._headers[path] = _header(path)
        start, entries = self._headers[path]
        entry = entries[name]
        begin, end = entry["data_offsets"]
        torch = require("torch", "torch")
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as shard:
            shard.seek(start + begin)
            if shard.readinto(raw.numpy()) != end - begin:
                raise CheckpointError(f"{path} ends inside tensor {name}: the shard is cut short")
        dtype = getattr(torch, _SAFETENSORS_TYPES[entry["dtype"]])
        return raw.view(dtype).reshape(entry["shape"])


def _header(path: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its tensors' entries (dtype, shape, offsets)."""
    with open(path, "rb") as shard:
        length = int.from_bytes(shard.read(8), "little")
        try:
            entries = json.loads(shard.read(length))
        except ValueError as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from exc
    entries.pop("__metadata__", None)
    return 8 + length, entries
