"""The `aigis` command line: the demo end to end, start-up refusals, and reading the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aigis.tools.audit_cmd import parse_since, select
from aigis.tools.cli import main

REPO = Path(__file__).resolve().parent.parent


def aigis(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aigis.tools.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_the_whole_flow(tmp_path: Path) -> None:
    """`aigis demo` issues certs, serves, calls, and finds its three denials in the audit log."""
    result = aigis("demo", "--dir", str(tmp_path / "demo"), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Add(2, 40) = 42" in result.stdout
    assert "ClassifyImage(7.png) = 7" in result.stdout
    assert "OK: 3 denied request(s) audited: token_missing, scope_missing, cert_revoked" in result.stdout
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "demo" / "audit.jsonl").read_text().splitlines()]
    assert reasons == ["token_missing", "scope_missing", "cert_revoked"]
    assert "eyJ" not in result.stdout  # no token is ever printed by the demo
    assert f"everything is kept in {tmp_path / 'demo'}" in result.stdout


def test_serve_refuses_an_invalid_config_naming_the_key(tmp_path: Path) -> None:
    """A bad value stops start-up with exit code 2 and the key in the message."""
    config = tmp_path / "aigis.toml"
    config.write_text('[server]\nlisten = "localhost:notaport"\n')
    result = aigis("serve", "--config", str(config))
    assert result.returncode == 2
    assert "server.listen" in result.stderr


def test_serve_refuses_to_start_without_certificates(tmp_path: Path) -> None:
    """No PKI, no server: the message says which file is missing and what to run."""
    result = aigis("serve", "--certs", str(tmp_path / "nothing"), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "aigis certs init" in result.stderr


def test_serve_refuses_a_broken_policy(tmp_path: Path) -> None:
    """A policy with an unknown field stops start-up with the field named."""
    assert main(["certs", "init", "--dir", str(tmp_path / "certs")]) == 0
    policy = tmp_path / "policy.json"
    policy.write_text('{"name": "p", "allow_rules": [{"name": "r", "sorce": {}}]}')
    result = aigis("serve", "--certs", str(tmp_path / "certs"), "--policy", str(policy), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "sorce" in result.stderr


RECORDS = [
    {"timestamp": "2026-11-25T10:00:00.000Z", "reason": "token_expired", "principal": "a", "rpc_method": "/x/Add"},
    {"timestamp": "2026-11-25T11:00:00.000Z", "reason": "scope_missing", "principal": "b", "rpc_method": "/x/Sum"},
]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        pytest.param({}, ["token_expired", "scope_missing"], id="all"),
        pytest.param({"reason": "scope_missing"}, ["scope_missing"], id="reason"),
        pytest.param({"principal": "a"}, ["token_expired"], id="principal"),
        pytest.param({"method": "Sum"}, ["scope_missing"], id="method"),
        pytest.param({"since": parse_since("2026-11-25T10:30:00Z", None)}, ["scope_missing"], id="since"),  # type: ignore[arg-type]
    ],
)
def test_audit_show_filters(filters: dict, expected: list[str]) -> None:
    """Filters select records by reason, principal, method and time."""
    assert [r["reason"] for r in select(RECORDS, **filters)] == expected


def test_audit_show_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`audit show` prints a table by default and JSON lines with --json."""
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["audit", "show", "--audit-log", str(log), "--reason", "token_expired", "--json"]) == 0
    assert [json.loads(line)["reason"] for line in capsys.readouterr().out.splitlines()] == ["token_expired"]
    assert main(["audit", "show", "--audit-log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "REASON" in out and "2 record(s)" in out
    assert main(["audit", "show", "--audit-log", str(log), "--since", "yesterday"]) == 2


def _call_args(stack: Any) -> list[str]:
    return ["call", "--certs", str(stack.pki.root), "--client", "demo", "--issuer", stack.issuer_url,
            "--target", stack.target]


def test_call_infer_and_metadata(stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aigis call infer MODEL --input NAME=FILE.npy` prints and saves the outputs; `metadata` the signature."""
    import numpy as np

    x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main([*_call_args(stack), "infer", "digits", "--input", f"pixels={tmp_path / 'x.npy'}",
                 "--save-dir", str(tmp_path / "out")]) == 0
    assert "probabilities  float32  [2, 10]" in capsys.readouterr().out
    assert np.load(tmp_path / "out" / "probabilities.npy").shape == (2, 10)
    assert main([*_call_args(stack), "metadata", "digits"]) == 0
    out = capsys.readouterr().out
    assert "digits  versions=1  platform=onnxruntime_onnx" in out and "input  pixels  FP32  [-1, 64]" in out


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.npy", "not a readable .npy array"),
    (lambda d: (d / "obj.npy", __import__("numpy").save(d / "obj.npy", __import__("numpy").array([{}]),
                                                       allow_pickle=True))[0], "not a readable .npy array"),
])
def test_call_infer_bad_input_file_is_one_line(stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               make: Any, message: str) -> None:
    """A missing file or a pickled array is one clear line and exit 2, never a traceback (pickles not loaded)."""
    path = make(tmp_path)
    assert main([*_call_args(stack), "infer", "digits", "--input", f"pixels={path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_call_infer_server_refusal_is_one_line(stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused request (wrong shape) prints the server's message and the request id, exit 1."""
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 63), np.float32))
    assert main([*_call_args(stack), "infer", "digits", "--input", f"pixels={tmp_path / 'x.npy'}"]) == 1
    err = capsys.readouterr().err
    assert "input 'pixels': shape [1, 63]" in err and "request_id=" in err


HOSTILE_VALUES = [
    pytest.param("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m", id="ansi-colour"),
    pytest.param("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07", id="osc-title-and-bell"),
    pytest.param("a\nforged-row  token_expired", "a\\x0aforged-row  token_expired", id="newline-forges-a-row"),
    pytest.param("over\rwrite", "over\\x0dwrite", id="carriage-return"),
    pytest.param("\x9b31m", "\\x9b31m", id="c1-csi"),
    pytest.param("\x7fdel\x00nul\x08bs", "\\x7fdel\\x00nul\\x08bs", id="del-nul-backspace"),
    pytest.param("admin\u202egnp.exe", "admin\\u202egnp.exe", id="bidi-override"),
    pytest.param("zero\u200bwidth\u2028sep", "zero\\u200bwidth\\u2028sep", id="zero-width-and-line-separator"),
    pytest.param("tag\U000e0041", "tag\\U000e0041", id="unicode-tag-character"),
    pytest.param("lit\\x1b", "lit\\\\x1b", id="literal-backslash-stays-unambiguous"),
    pytest.param("café-ü-字", "café-ü-字", id="printable-unicode-kept"),
]


@pytest.mark.parametrize(("value", "shown"), HOSTILE_VALUES)
def test_audit_show_escapes_control_characters_and_json_stays_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, shown: str
) -> None:
    """A hostile client_id/principal reaches the terminal escaped, one row per record; --json is exact."""
    record = {"timestamp": "2026-01-01T00:00:00Z", "reason": "token_expired", "rpc_method": "/m",
              "principal": value, "client_id": value, "request_id": "r1"}  # fmt: skip
    log = tmp_path / "audit.jsonl"
    log.write_text(json.dumps(record) + "\n")
    assert main(["audit", "show", "--audit-log", str(log)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3  # header, the one record, the count
    assert all(ch == "\n" or ch.isprintable() for ch in out)
    assert lines[1].count(shown) == 2
    assert main(["audit", "show", "--audit-log", str(log), "--summary"]) == 0
    summary = capsys.readouterr().out
    assert all(ch == "\n" or ch.isprintable() for ch in summary) and shown in summary
    assert main(["audit", "show", "--audit-log", str(log), "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [record]
