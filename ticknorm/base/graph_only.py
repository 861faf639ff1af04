"""The graph of an ONNX file without its weights, for commands whose runtimes read the file
themselves (a profile on PyTorch and ONNX Runtime): the weights are then never held in Python.

A file with its weights inside is read from a map of it, protobuf field by field, and each large
tensor's bytes are left where they are: the tensor becomes a reference to them inside the file
(ONNX external data whose location is the file itself, at their offset), so what is returned is a
valid model, its weights loadable like any external weights (`onnx.load_external_data_for_model`
with the file's folder). On BERT-base (434 MB inline) this reads about 100 KB of the file instead
of all of it and keeps none of the weights in memory, which also leaves ONNX Runtime's session the
memory it would otherwise fault in afresh."""

import mmap
from pathlib import Path

# protobuf field numbers (onnx.proto) and wire types
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
SMALLEST_LEFT = 1024  # bytes: smaller tensors are copied (shapes, constants the graph reads)


def graph_bytes(path: Path) -> bytes:
    """The serialized model at `path` with each inline tensor of SMALLEST_LEFT bytes or more made
    a reference into the file. Raises ValueError on bytes that are not a protobuf message."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return _Skim(mapped, path.name).message(0, len(mapped), {_MODEL_GRAPH: "graph"})


class _Skim:
    def __init__(self, data, location: str):
        self.data, self.location = data, location

    def message(self, start: int, end: int, nested: dict) -> bytes:
        """The message in data[start:end], its fields copied as they are except those in `nested`
        (field number -> 'graph' or 'tensor'), rewritten."""
        out = bytearray()
        for number, wire, field_start, value_start, value_end in self._fields(start, end):
            kind = nested.get(number) if wire == _LENGTH else None
            if kind is None:
                out += self.data[field_start:value_end]
                continue
            inner = (self.message(value_start, value_end, {_GRAPH_INITIALIZER: "tensor"}) if kind == "graph"
                     else self.tensor(value_start, value_end))
            out += _key(number, _LENGTH) + _varint(len(inner)) + inner
        return bytes(out)

    def tensor(self, start: int, end: int) -> bytes:
        out, left = bytearray(), None
        for number, wire, field_start, value_start, value_end in self._fields(start, end):
            if number == _TENSOR_RAW_DATA and wire == _LENGTH and value_end - value_start >= SMALLEST_LEFT:
                left = (value_start, value_end - value_start)
            else:
                out += self.data[field_start:value_end]
        if left is not None:
            for key, value in (("location", self.location), ("offset", str(left[0])), ("length", str(left[1]))):
                entry = _string(1, key) + _string(2, value)
                out += _key(_TENSOR_EXTERNAL_DATA, _LENGTH) + _varint(len(entry)) + entry
            out += _key(_TENSOR_DATA_LOCATION, _VARINT) + _varint(_EXTERNAL)
        return bytes(out)

    def _fields(self, start: int, end: int):
        """(number, wire type, where the field starts, where its value starts, where it ends)."""
        position = start
        while position < end:
            field_start = position
            key, position = self._read_varint(position)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                _, value_end = self._read_varint(position)
            elif wire == _LENGTH:
                length, position = self._read_varint(position)
                value_end = position + length
            elif wire in (_FIXED64, _FIXED32):
                value_end = position + (8 if wire == _FIXED64 else 4)
            else:
                raise ValueError(f"protobuf wire type {wire} at byte {field_start}")
            if number == 0 or value_end > end:
                raise ValueError(f"a field runs past its message at byte {field_start}")
            yield number, wire, field_start, position, value_end
            position = value_end

    def _read_varint(self, position: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if position >= len(self.data) or shift > 63:
                raise ValueError(f"a truncated number at byte {position}")
            byte = self.data[position]
            value |= (byte & 0x7F) << shift
            position += 1
            if byte < 0x80:
                return value, position
            shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _string(number: int, text: str) -> bytes:
    encoded = text.encode()
    return _key(number, _LENGTH) + _varint(len(encoded)) + encoded
