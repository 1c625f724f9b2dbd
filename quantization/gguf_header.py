"""A GGUF file's header — metadata and tensor infos — read without its arrays' contents.

    header = read_header(path)
    header.fields["general.architecture"]     # "gemma3"
    header.fields["tokenizer.ggml.tokens"]    # Array(type=STRING, count=262144): not read
    sum(t.n_bytes for t in header.tensors)    # the weights' bytes

``gguf.GGUFReader`` builds a numpy view for every element of every array, so the
262,144-token vocabulary of the default model alone took it ~20 s (on the 2-core test
machine) before ``lockgate serve`` could plan memory, and again for every reload. This
reads what the planner needs in well under a second: scalars, strings and numeric
arrays of up to :data:`SMALL_ARRAY` elements are decoded; longer arrays (vocabularies,
merges, scores) are skipped and reported by type and length. The layout is GGUF v2/v3
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SMALL_ARRAY = 4096  # longer arrays are skipped, not decoded

# GGUF metadata value types: struct format of the scalar ones.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = 10, 11, 12
_SCALARS = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
    _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}  # fmt: skip


class HeaderError(ValueError):
    """Not a GGUF file, or one cut short."""


@dataclass(frozen=True, slots=True)
class Array:
    """An array too long to decode: its element type (GGUF's number) and length."""

    type: int
    count: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int  # GGMLQuantizationType's value
    n_bytes: int


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    fields: dict[str, object]
    tensors: list[TensorInfo]


class _Reader:
    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def take(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise HeaderError("the file ends inside its header")
        return data

    def scalar(self, kind: int) -> object:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.take(8))[0]
        return value

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.file.seek(self.u64(), 1)

    def value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise HeaderError(f"unknown metadata type {kind}")
        return self.scalar(kind)

    def array(self) -> object:
        kind = int(self.scalar(_UINT32))  # type: ignore[call-overload]
        count = self.u64()
        if count <= SMALL_ARRAY:
            return [self.value(kind) for _ in range(count)]
        if kind == _STRING:
            for _ in range(count):
                self.skip_string()
        elif kind in _SCALARS:
            self.file.seek(count * struct.calcsize(_SCALARS[kind]), 1)
        else:  # arrays of arrays: each must be walked
            for _ in range(count):
                self.value(kind)
        return Array(kind, count)


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise HeaderError(f"unknown tensor type {ggml_type}") from None
    return math.prod(shape) // block * size


def read_header(path: Path) -> Header:
    """The header of the GGUF at ``path``; HeaderError if it is not one."""
    with open(path, "rb") as file:
        r = _Reader(file)
        if r.take(4) != b"GGUF":
            raise HeaderError("not a GGUF file (no GGUF magic)")
        version = int(r.scalar(_UINT32))  # type: ignore[call-overload]
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported")
        n_tensors, n_fields = r.u64(), r.u64()
        fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = r.string()
            fields[key] = r.value(int(r.scalar(_UINT32)))  # type: ignore[call-overload]
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = int(r.scalar(_UINT32))  # type: ignore[call-overload]
            shape = tuple(r.u64() for _ in range(dims))
            ggml_type = int(r.scalar(_UINT32))  # type: ignore[call-overload]
            r.u64()  # the data's offset
            tensors.append(TensorInfo(name, shape, ggml_type, _tensor_bytes(shape, ggml_type)))
    return Header(version, fields, tensors)
