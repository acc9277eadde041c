"""A pickle-free file of JSON plus raw tensor bytes: the on-disk form of a cached case.

Layout: the 8-byte magic ``MEDCLB2\\n``, the header length (8 bytes, little-endian), the header (UTF-8
JSON: the object with every tensor replaced by ``{"__tensor__": i}``, and per tensor its dtype, shape,
byte offset, length and CRC-32), then the tensors' bytes, each aligned to 64 bytes. The checksums catch a file
altered at the same size (a cache keyed by size and time stamp would otherwise trust it); version-1 files
(``MEDCLB1``, no checksums) are refused as foreign and rebuilt by the cache. Reading is one ``read``, one
``json.loads`` and a ``torch.frombuffer`` per tensor: no unpickler at all (nothing in the file can
run code, which is stricter than ``torch.load(weights_only=True)``) and no zip archive to parse, which is
what made a cached read of a small volume cost as much as decoding it.

Values may be JSON types (str, int, float, bool, None, lists, dicts with str keys) and CPU tensors of
any fixed-size dtype. Tuples come back as lists.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from medcl.core.files import atomic_path

__all__ = ["write_blob", "read_blob"]

MAGIC = b"MEDCLB2\n"
_ALIGN = 64


def _strip(x: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        tensors.append(x.detach().cpu().contiguous())
        return {"__tensor__": len(tensors) - 1}
    if isinstance(x, dict):
        return {str(k): _strip(v, tensors) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strip(v, tensors) for v in x]
    return x


def _fill(x: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tensor__"}:
            return tensors[x["__tensor__"]]
        return {k: _fill(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_fill(v, tensors) for v in x]
    return x


def write_blob(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    tensors: list[torch.Tensor] = []
    skeleton = _strip(obj, tensors)
    specs, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0  # no copy: a buffer view
        specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                      "nbytes": nbytes, "crc32": crc})
        offset += -(-nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"object": skeleton, "tensors": specs}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        start = len(MAGIC) + 8 + len(header)
        pad = -start % _ALIGN
        f.write(MAGIC + struct.pack("<Q", len(header) + pad) + header + b" " * pad)
        for t, spec in zip(tensors, specs):
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            f.write(b"\0" * (-spec["nbytes"] % _ALIGN))


def read_blob(path: str | Path) -> Any:
    """Read a file written by :func:`write_blob`; raises ``ValueError`` on a foreign, truncated or corrupt file.

    Each tensor owns its memory (copied out of the file buffer: a few microseconds for a volume, and safe to
    send through DataLoader worker queues).
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 8:
        raise ValueError("not a medcl blob file")
    (n,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if start + n > len(data):
        raise ValueError("truncated header")
    header = json.loads(bytes(data[start : start + n]))
    base = start + n
    tensors = []
    for spec in header["tensors"]:
        dtype = getattr(torch, spec["dtype"])
        lo, nbytes = base + spec["offset"], spec["nbytes"]
        if lo + nbytes > len(data):
            raise ValueError("truncated tensor data")
        if zlib.crc32(memoryview(data)[lo : lo + nbytes]) != spec.get("crc32"):
            raise ValueError("checksum mismatch: the file was altered or damaged")
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=lo) if count else torch.empty(0, dtype=dtype)
        tensors.append(t.reshape(spec["shape"]).clone())
    return _fill(header["object"], tensors)
