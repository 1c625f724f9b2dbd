"""A high-precision reference GGUF to quantize from and measure against.

    python -m quantization.reference SOURCE.gguf OUT.gguf

A GGUF whose weights are already F32, F16 or BF16 is its own reference. A quantized one
(the default model ships only as Q4_K_M) is dequantized with the ``gguf`` package's
reference dequantizers: matrices to F16, vectors (norms) to F32, as llama.cpp's converter
writes them; metadata is copied as it is, except ``general.file_type`` (now F16). Figures
measured against such a reference are relative to the dequantized source, not to the
model as it was trained: the source's own quantization error is invisible to them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# llama.cpp's llama_ftype values
FTYPE_ALL_F32, FTYPE_MOSTLY_F16, FTYPE_MOSTLY_BF16 = 0, 1, 32
HIGH_PRECISION = {"F32", "F16", "BF16"}


def is_high_precision(path: Path) -> bool:
    """Whether every matrix of the file is F32, F16 or BF16 (no quantized tensor)."""
    from gguf import GGUFReader

    return all(t.tensor_type.name in HIGH_PRECISION for t in GGUFReader(path).tensors)


def dequantize(source: Path, out: Path) -> None:
    """Write ``out``: ``source`` with every quantized tensor dequantized (see the module)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize as dequantize_values

    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    partial = out.with_suffix(".partial")
    writer = GGUFWriter(partial, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes these itself
        if name == "general.file_type":
            writer.add_uint32(name, FTYPE_MOSTLY_F16)
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value: Any = field.contents()
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest first
        if tensor.tensor_type.name in HIGH_PRECISION:
            values = np.asarray(tensor.data).reshape(shape)
        else:
            values = dequantize_values(tensor.data, tensor.tensor_type).reshape(shape)
            values = values.astype(np.float16 if len(shape) > 1 else np.float32)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)  # a crash leaves no half-written reference behind


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    dequantize(args.source, args.out)


if __name__ == "__main__":
    main()
