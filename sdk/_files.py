"""File helpers every stage shares: content hashes and crash-safe writes."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable


def _files_of(path: Path) -> list[Path]:
    """The file itself, or every file in a directory in a stable order (Core ML packages are directories)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def size_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in _files_of(Path(path)))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file in a directory (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in _files_of(path):
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def json_sha256(payload: object) -> str:
    """sha256 of `payload` as canonical JSON (sorted keys, no spaces): the content hash of a JSON document."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `path` through a uniquely named temporary file beside it and an atomic rename: a crash leaves the
    old file or the new one, never half of one. `data` is text, bytes, or a function that writes the file it is
    given (e.g. safetensors' `save_file`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
