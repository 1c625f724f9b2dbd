"""The lean GGUF header reader against llama.cpp's own ``gguf.GGUFReader``, on the real
default model and on tiny Llama and Qwen2 files written at test time."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from backends.model_store import default_model_path
from quantization import gguf_header
from quantization.gguf_header import Array, HeaderError, read_header
from tests.tiny_gguf import byte_alphabet, write_tiny_gguf


def _agrees(path: Path) -> None:
    header = read_header(path)
    reader = GGUFReader(path)
    assert set(header.fields) == {k for k in reader.fields if not k.startswith("GGUF.")}
    for key, value in header.fields.items():
        theirs = reader.fields[key]
        if isinstance(value, Array):
            assert value.count == len(theirs.data), key
        else:
            assert value == pytest.approx(theirs.contents()), key
    assert [(t.name, t.type, t.n_bytes) for t in header.tensors] == [
        (t.name, int(t.tensor_type), int(t.n_bytes)) for t in reader.tensors
    ]
    assert [tuple(reversed(t.shape)) for t in header.tensors] == [
        tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors
    ]


def test_the_default_model_reads_as_gguf_reader_reads_it() -> None:
    path = default_model_path(progress=False)
    _agrees(path)
    tokens = read_header(path).fields["tokenizer.ggml.tokens"]
    assert tokens == Array(type=8, count=262_144)  # skipped, not decoded


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_read_as_gguf_reader_reads_them(tmp_path: Path, arch: str) -> None:
    _agrees(write_tiny_gguf(tmp_path / f"{arch}.gguf", arch))  # type: ignore[arg-type]


def test_arrays_are_decoded_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    tokens = read_header(path).fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and tokens[:256] == byte_alphabet()
    monkeypatch.setattr(gguf_header, "SMALL_ARRAY", 10)
    skipped = read_header(path).fields["tokenizer.ggml.tokens"]
    assert skipped == Array(type=8, count=len(tokens))


def test_what_is_not_a_whole_gguf_is_refused(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000])
    with pytest.raises(HeaderError, match="ends inside its header"):
        read_header(cut)
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(HeaderError, match="no GGUF magic"):
        read_header(other)
