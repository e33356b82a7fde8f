"""Process logging: human-readable text on stderr, or one JSON object per line on stdout.

JSON lines are for log collectors in containers (Fluent Bit, Vector, the Cloud Logging agent):
`time` (RFC 3339, UTC), `level`, `logger`, `message`, and `exception` (the formatted traceback)
when there is one. The audit log is a separate stream (auth/audit.py) and may share stdout: its
lines are the ones with a `chain` field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record; `static` fields (e.g. the worker id) go on every line."""

    def __init__(self, static: dict[str, object] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True, separators=(",", ":"), default=str)


def configure_logging(level: str | int, fmt: str = "text", *, static: dict[str, object] | None = None) -> None:
    """Replace the root logger's handlers: `fmt` "text" (stderr) or "json" (stdout)."""
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter(static))
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = " ".join(f"{k}={v}" for k, v in (static or {}).items())
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", f"{prefix} %(name)s" if prefix else
                                                                   "%(name)s")))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
