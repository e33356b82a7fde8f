"""Request ids: 32 hex digits, unique within a process and across forked worker processes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from aigis.auth.enforcer import new_request_id


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    """Every id is 32 lowercase hex digits (what clients and the audit log have always seen)."""
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_does_not_repeat_the_parents_ids() -> None:
    """`aigis serve --workers N` may fork: a child starts a new random prefix, so two workers never
    hand out the same id (their audit logs are read together). Forked in a fresh interpreter, which
    has no threads to make fork unsafe."""
    script = textwrap.dedent("""
        import os, sys
        from aigis.auth.enforcer import new_request_id
        parent = new_request_id()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, new_request_id().encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read, 64).decode()
        print(parent, child, new_request_id())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    parent, child, after = done.stdout.split()
    assert child[:16] != parent[:16], (parent, child)
    assert len({parent, child, after}) == 3
