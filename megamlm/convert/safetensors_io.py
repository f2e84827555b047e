"""Write a safetensors file tensor by tensor, without a second copy of the model in memory.

``safetensors.torch.save_file`` serialises every tensor to ``bytes`` before writing, so a conversion
briefly holds the model twice (and the anchors' tools more). This writer lays out the same format —
an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets; ``__metadata__``)
padded with spaces to 8 bytes, then the tensors' bytes — and writes each tensor straight from its
storage. The files are read by ``safetensors`` itself (tested).

:func:`read_header` reads a file's header back without ``safetensors``: it tells a file that is not
safetensors at all from one whose header or data is cut short (a truncated copy), which the library
reports alike.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

__all__ = ["write_safetensors", "read_header", "HeaderError", "MAX_HEADER"]

MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers

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


class HeaderError(ValueError):
    """A safetensors header that cannot be read, or a file shorter than its header says."""


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (``__metadata__`` included), after checking that the file
    holds every byte its header lays out. Raises :class:`HeaderError` saying what is wrong, with the sizes."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise HeaderError(f"header length {n} exceeds {MAX_HEADER} (not a safetensors file)")
        if 8 + n > size:
            raise HeaderError(f"{size} bytes, but its header alone needs {8 + n}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"the {n}-byte header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"the header is a JSON {type(header).__name__}, not an object")
    need = 8 + n + _data_end(header)
    if size < need:
        raise HeaderError(f"{size} bytes, but its header lays out {need} ({need - size} missing)")
    return header


def _data_end(header: dict) -> int:
    """The largest data offset the header's tensors name."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise HeaderError(f"tensor {name!r}: data_offsets {offsets!r} are not two byte offsets")
        end = max(end, offsets[1])
    return end
