"""Write a safetensors file tensor by tensor, without a second copy of the model in memory.

``safetensors.torch.save_file`` serialises every tensor to ``bytes`` before writing, so a conversion
briefly holds the model twice (and the anchors' tools more). This writer lays out the same format —
an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets; ``__metadata__``)
padded with spaces to 8 bytes, then the tensors' bytes — and writes each tensor straight from its
storage. The files are read by ``safetensors`` itself (tested).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

__all__ = ["write_safetensors"]

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (name → CPU tensor, or a lazy tensor with ``shape``, ``dtype`` and ``.contiguous()``
    such as DeepSpeed's ZeRO-3 ``GatheredTensor``, gathered only when written) → a safetensors file."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    names = sorted(tensors)
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors equivalent")
        n = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name]
            t = t.detach() if isinstance(t, torch.Tensor) else t.contiguous()  # a lazy one: gathered now
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()  # a copy of this one tensor only, when it is a strided view
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            del t
