"""A Secret/ConfigMap volume laid out exactly as the kubelet's AtomicWriter does it.

    <dir>/..2026_11_30_20_00_00.123456789/tls.crt   the payload, in a timestamped directory
    <dir>/..data -> ..2026_11_30_20_00_00.123456789 one symlink, re-pointed atomically on update
    <dir>/tls.crt -> ..data/tls.crt                 what the container opens

An update writes a new timestamped directory, makes a `..data_tmp` symlink to it, renames that over
`..data` (the atomic step), adds links for new keys, removes links for dropped keys, then deletes the
old directory (kubernetes/pkg/volume/util/atomic_writer.go).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

DATA = "..data"


def project(directory: Path, files: Mapping[str, bytes], *, mode: int = 0o644) -> Path:
    """Create or update the volume at `directory` with `files` (key -> content); returns the new
    timestamped payload directory."""
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / DATA
    old = os.readlink(data_link) if data_link.is_symlink() else None
    stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S")
    payload = directory / f"..{stamp}.{time.monotonic_ns() % 1_000_000_000:09d}"
    payload.mkdir(mode=0o755)
    for name, content in files.items():
        (payload / name).write_bytes(content)
        (payload / name).chmod(mode)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(payload.name)
    os.rename(tmp_link, data_link)  # the one atomic step: every key switches at once
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA}/{name}")
    for link in directory.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    if old is not None:
        shutil.rmtree(directory / old)
    return payload
