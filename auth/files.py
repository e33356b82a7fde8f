"""Atomic file replacement for the PKI and registry files every component reads while we write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a fresh temp file beside `path`, fsync it, then os.replace it into place.

    Readers never see half a file, and an old file's looser mode is not inherited (O_TRUNC would
    keep it). mkstemp creates the temp file 0600, so secrets are never readable by others, even
    briefly; `mode` can only loosen that (public certificates: 0644).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
