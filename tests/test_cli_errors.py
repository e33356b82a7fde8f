"""The command line: every user mistake is one line naming what was wrong, with a documented exit
code (0 ok, 1 refused or failed, 2 usage or configuration), and the conveniences work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aigis.auth.certs import init_pki
from aigis.auth.crl import crl_status
from aigis.auth.pki import PkiPaths
from aigis.client_sdk import decode_unverified
from aigis.tools.cli import build_parser, client_settings, main
from tests.conftest import RunningStack

REPO = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def aigis(*args: str, cwd: Path = REPO, timeout: float = 60, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}\nimport sys\nfrom aigis.tools.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    paths = PkiPaths(tmp_path_factory.mktemp("cli") / "certs")
    init_pki(paths, now=datetime.now(UTC))
    return paths


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    """Run in an empty directory: no ./certs, no ./aigis.toml."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


MISTAKES = [
    # (id, argv (with {pki} / {tmp}), expected exit code, text the one line must contain)
    ("call-without-certs", ["call", "add", "1", "2"], EXIT_USAGE, "CA certificate certs/ca.pem not found"),
    ("token-without-certs", ["token", "--client", "nosuch"], EXIT_USAGE, "certs/ca.pem not found"),
    ("token-unknown-client", ["token", "--certs", "{pki}", "--client", "nosuch"], EXIT_USAGE,
     "client certificate {pki}/clients/nosuch.pem not found"),
    ("classify-missing-file", ["call", "--certs", "{pki}", "classify", "{tmp}/nope.png"], EXIT_USAGE,
     "image file {tmp}/nope.png not found"),
    ("classify-directory", ["call", "--certs", "{pki}", "classify", "{tmp}"], EXIT_USAGE,
     "image file {tmp} is a directory"),
    ("audit-unknown-reason", ["audit", "show", "--reason", "token_expird"], EXIT_USAGE,
     "invalid choice: 'token_expird'"),
    ("audit-missing-log", ["audit", "show", "--audit-log", "{tmp}/none.jsonl"], EXIT_USAGE,
     "no audit log at {tmp}/none.jsonl"),
    ("config-missing-file", ["config", "check", "--config", "{tmp}/missing.toml"], EXIT_USAGE, "{tmp}/missing.toml"),
    ("config-bad-key", ["config", "check", "--config", "{tmp}/bad.toml"], EXIT_USAGE, "server.lisen: unknown key"),
    ("call-bad-config", ["call", "--config", "{tmp}/bad.toml", "add", "1", "2"], EXIT_USAGE, "server.lisen"),
    ("certs-init-twice", ["certs", "init", "--dir", "{pki}"], EXIT_USAGE, "already exists"),
    ("certs-revoke-unknown", ["certs", "revoke", "nobody", "--dir", "{pki}"], EXIT_USAGE, "no client named 'nobody'"),
    ("keys-list-no-pki", ["keys", "list", "--dir", "{tmp}"], EXIT_USAGE, "{tmp}"),
    ("crl-no-pki", ["certs", "crl", "--dir", "{tmp}"], EXIT_USAGE, "{tmp}/ca.pem: not found"),
    ("demo-dir-not-empty", ["demo", "--dir", "{tmp}"], EXIT_USAGE, "--dir {tmp} is not empty"),
    ("demo-dir-is-a-file", ["demo", "--dir", "{tmp}/bad.toml"], EXIT_USAGE, "is a file, not a directory"),
    ("call-refused-no-issuer", ["call", "--certs", "{pki}", "--issuer", "https://127.0.0.1:1", "--timeout", "2",
                                "add", "1", "2"], EXIT_FAILED, "aigis call add:"),
    ("bad-number", ["call", "add", "one", "2"], EXIT_USAGE, "invalid int value: 'one'"),
]


@pytest.mark.parametrize(("argv", "code", "text"), [pytest.param(a, c, t, id=i) for i, a, c, t in MISTAKES])
def test_user_mistakes_get_one_line_and_an_exit_code(
    argv: list[str], code: int, text: str, pki: PkiPaths, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each common mistake: the documented exit code and one stderr line naming the file or value."""
    (in_tmp / "bad.toml").write_text('[server]\nlisen = "127.0.0.1:1"\n')
    values = {"pki": str(pki.root), "tmp": str(in_tmp)}
    try:
        result = main([a.format(**values) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors: the usage, then one error line
        result = int(exc.code or 0)
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.splitlines()[-1].startswith("aigis")
        err = err.splitlines()[-1]
    else:
        err = one_line_error(capsys.readouterr().err)
    assert result == code
    assert text.format(**values) in err


def test_serve_names_a_busy_issuer_port(pki: PkiPaths, tmp_path: Path) -> None:
    """A busy issuer port stops `serve` with exit 2 and the address, like a busy gRPC port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = aigis("serve", "--certs", str(pki.root), "--listen", "127.0.0.1:0", "--issuer-listen",
                       f"127.0.0.1:{port}", "--metrics-listen", "off", "--audit-log", str(tmp_path / "a.jsonl"),
                       "--log-level", "WARNING", cwd=tmp_path)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"aigis serve: cannot start: token issuer: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


CLIENT_ONLY = (
    "import sys\n"
    "for m in ('cryptography', 'jwt', 'onnxruntime', 'PIL', 'prometheus_client', 'grpc_reflection', 'grpc_status',\n"
    "          'aiohttp'):\n"
    "    sys.modules[m] = None\n"
)


@pytest.mark.parametrize("argv", [["serve"], ["issuer"], ["certs", "list"], ["keys", "rotate"], ["doctor"],
                                  ["demo"], ["bench", "--quick"]], ids=lambda a: a[0])
def test_client_only_install_names_the_extra(argv: list[str], tmp_path: Path) -> None:
    """Without the server extra's modules, server-side commands say in one line what to install."""
    result = aigis(*argv, cwd=tmp_path, prelude=CLIENT_ONLY)
    assert result.returncode == EXIT_USAGE, result.stderr
    line = one_line_error(result.stderr)
    assert "pip install 'aigis[server]'" in line and line.startswith(f"aigis {argv[0]}")


def test_client_only_install_still_calls_and_reads_config(tmp_path: Path) -> None:
    """The client commands work without the extra: they get as far as the missing certificates."""
    assert aigis("--version", prelude=CLIENT_ONLY).stdout.startswith("aigis ")
    result = aigis("call", "add", "1", "2", cwd=tmp_path, prelude=CLIENT_ONLY)
    assert result.returncode == EXIT_USAGE
    assert "CA certificate certs/ca.pem not found" in one_line_error(result.stderr)
    assert aigis("config", "check", cwd=tmp_path, prelude=CLIENT_ONLY).returncode == EXIT_OK
    result = aigis("audit", "show", "--audit-log", str(tmp_path / "none.jsonl"), cwd=tmp_path, prelude=CLIENT_ONLY)
    assert result.returncode == EXIT_USAGE and "no audit log at" in one_line_error(result.stderr)


def test_version_and_global_options_after_the_subcommand(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`aigis --version` prints the version; --log-level and --config work before and after the subcommand."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("aigis ")
    config = in_tmp / "other.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:6010"\n')
    for argv in (["--log-level", "WARNING", "--config", str(config), "config", "show"],
                 ["config", "show", "--config", str(config), "--log-level", "WARNING"],
                 ["config", "--config", str(config), "show"]):
        assert main(argv) == EXIT_OK
        out = capsys.readouterr().out
        assert f"# effective configuration from {config}" in out and 'listen = "127.0.0.1:6010"' in out


def test_call_and_token_help_show_their_defaults() -> None:
    """`call --help` and `token --help` state every default."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    call_help, token_help = sub["call"].format_help(), sub["token"].format_help()
    for text in ("default: demo", "127.0.0.1:50051", "https://127.0.0.1:8443", "default: 10.0", "./certs"):
        assert text in " ".join(call_help.split()), text
    token_help = " ".join(token_help.split())
    assert "default: demo" in token_help and "https://127.0.0.1:8443" in token_help


def test_call_and_token_read_the_server_configuration(in_tmp: Path, pki: PkiPaths) -> None:
    """./aigis.toml (or --config) gives `call`/`token` their target, issuer and certificate directory."""
    (in_tmp / "aigis.toml").write_text(
        f'[server]\nlisten = "0.0.0.0:6123"\ncerts = "{pki.root}"\n[issuer]\nlisten = "127.0.0.1:9999"\n'
    )
    args = build_parser().parse_args(["call", "add", "1", "2"])
    settings = client_settings(args)
    assert settings.target == "localhost:6123"
    assert settings.token_url == "https://127.0.0.1:9999/oauth2/token"
    assert settings.ca == pki.ca_cert and settings.cert == pki.client_cert("demo")
    args = build_parser().parse_args(["token", "--issuer", "https://idp.example:1/", "--certs", str(pki.root)])
    assert client_settings(args).token_url == "https://idp.example:1/oauth2/token"


def test_call_json_token_decode_and_lists(stack: RunningStack, capsys: pytest.CaptureFixture[str]) -> None:
    """--json on call, certs list and keys list; token --decode shows claims and never the token."""
    common = ["--certs", str(stack.pki.root), "--issuer", stack.issuer_url]
    assert main(["call", *common, "--target", stack.target, "--json", "add", "2", "40"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"rpc": "add", "result": 42}
    assert main(["call", *common, "--client", "reader", "--target", stack.target, "--json", "add", "1", "1"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == "PermissionDeniedError" and json.loads(out)["request_id"]
    assert one_line_error(err).startswith("aigis call add: ")
    assert main(["token", *common, "--decode"]) == EXIT_OK
    out = capsys.readouterr().out
    decoded = json.loads(out)
    assert decoded["header"]["typ"] == "at+jwt" and decoded["claims"]["sub"] == "demo"
    assert "eyJ" not in out
    assert main(["certs", "list", "--dir", str(stack.pki.root), "--json"]) == EXIT_OK
    listing = json.loads(capsys.readouterr().out)
    assert [c["role"] for c in listing["certificates"]] == ["ca", "server"]
    assert all(c["not_after"] and not c["expired"] for c in listing["certificates"])
    assert listing["crl"]["stale"] is False and listing["crl"]["revoked"] >= 1
    assert {"demo", "revoked"} <= {c["name"] for c in listing["clients"]}
    assert main(["certs", "list", "--dir", str(stack.pki.root)]) == EXIT_OK
    table = capsys.readouterr().out
    assert "CERTIFICATE" in table and "\nca " in table and "\nserver " in table and "CRL #" in table
    assert main(["keys", "list", "--dir", str(stack.pki.root), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["status"] == "active"


def test_decode_unverified_refuses_non_jws() -> None:
    """token --decode's helper reads header and claims, and refuses anything not a JWS."""
    from aigis.client_sdk import TokenError

    assert decode_unverified("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")[1] == {"sub": "x"}
    for bad in ("abc", "a.b.c", "e30.W10.x"):
        with pytest.raises(TokenError):
            decode_unverified(bad)


def test_shell_completion_through_argcomplete(tmp_path: Path) -> None:
    """argcomplete completes subcommands (`eval "$(register-python-argcomplete aigis)"`)."""
    out = tmp_path / "completions"
    env = {**os.environ, "PYTHONPATH": str(REPO), "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n",
           "COMP_LINE": "aigis ce", "COMP_POINT": "8", "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
    subprocess.run([sys.executable, "-m", "aigis.tools.cli"], cwd=tmp_path, env=env, timeout=60, check=False,
                   capture_output=True)
    assert out.read_text().split() == ["certs"]


# ------------------------------------------------------------------------------------- CRL freshness


def stale_pki(root: Path, age_days: int) -> PkiPaths:
    paths = PkiPaths(root)
    init_pki(paths, now=datetime.now(UTC) - timedelta(days=age_days))
    return paths


def test_certs_crl_reports_stale_and_renews(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`certs crl` exits 1 on a CRL past nextUpdate; `--renew` re-signs it with the next number."""
    paths = stale_pki(tmp_path / "certs", age_days=100)
    assert main(["certs", "crl", "--dir", str(paths.root)]) == EXIT_FAILED
    assert "STALE" in capsys.readouterr().out
    before = crl_status(paths)
    assert main(["certs", "crl", "--dir", str(paths.root), "--renew", "--json"]) == EXIT_OK
    renewed = json.loads(capsys.readouterr().out)
    assert renewed["number"] == before.number + 1 and renewed["stale"] is False and renewed["renewed"] is True
    assert renewed["revoked"] == before.revoked
    assert crl_status(paths).next_update > datetime.now(UTC) + timedelta(days=89)  # type: ignore[operator]
    paths.ca_key.unlink()
    assert main(["certs", "crl", "--dir", str(paths.root), "--renew"]) == EXIT_USAGE
    assert "ca-key.pem" in one_line_error(capsys.readouterr().err)


def test_doctor_passes_a_healthy_stack_and_fails_a_stale_crl(
    stack: RunningStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """doctor: exit 0 against the running stack (clock skew measured); exit 1 naming a stale CRL."""
    issuer_port = stack.issuer_url.rsplit(":", 1)[1]
    config = tmp_path / "aigis.toml"
    config.write_text(f'[server]\nlisten = "{stack.target.replace("localhost", "127.0.0.1")}"\n'
                      f'certs = "{stack.pki.root}"\n[issuer]\nlisten = "127.0.0.1:{issuer_port}"\n'
                      '[metrics]\nenabled = false\n')
    assert main(["doctor", "--config", str(config), "--json"]) == EXIT_OK
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["clock skew"]["status"] == "ok", checks["clock skew"]
    assert checks["CRL"]["status"] == "ok" and checks["policy"]["status"] == "ok"
    assert checks["gRPC port"]["detail"].endswith("in use (a running server, or `aigis serve` will find it busy)")
    stale = stale_pki(tmp_path / "old", age_days=100)
    assert main(["doctor", "--config", str(config), "--certs", str(stale.root)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "FAIL  CRL" in out and "STALE" in out and "a running server renews it" in out


def test_server_renews_a_crl_that_is_due(start_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A server holding the CA key renews a CRL within 30 days of nextUpdate at start-up."""
    paths = stale_pki(tmp_path / "due", age_days=70)
    before = crl_status(paths)
    running = start_stack(paths)
    after = crl_status(paths)
    assert after.number == before.number + 1 and after.next_update > before.next_update  # type: ignore[operator]
    assert running.server.crl is not None and running.server.crl.stale is False


def test_server_reports_a_stale_crl_it_cannot_renew(start_stack, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Without the CA key a stale CRL is kept and enforced, and reported: log line and metric."""
    paths = stale_pki(tmp_path / "stale", age_days=100)
    paths.ca_key.rename(tmp_path / "ca-key-elsewhere.pem")
    with caplog.at_level("WARNING", logger="aigis.crl"):
        running = start_stack(paths)
    assert running.server.crl is not None and running.server.crl.stale is True
    assert any("is stale" in r.getMessage() and "still enforcing" in r.getMessage() for r in caplog.records)
    assert running.server.metrics.crl_stale._value.get() == 1
    assert running.run(running.server.readiness())["crl"] is None  # stale_crl = "warn": still ready


def test_stale_crl_can_fail_readiness(start_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With [auth] stale_crl = "unready" a stale CRL also fails /readyz (fail closed)."""
    paths = stale_pki(tmp_path / "stale", age_days=100)
    paths.ca_key.rename(tmp_path / "ca-key-elsewhere.pem")
    running = start_stack(paths, stale_crl="unready")
    assert running.run(running.server.readiness())["crl"] == "stale: past its nextUpdate"


def test_call_reads_aigis_environment_overrides(in_tmp: Path, pki: PkiPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """AIGIS_<SECTION>_<KEY> variables reach `call` and `token` as they reach the server."""
    monkeypatch.setenv("AIGIS_SERVER_LISTEN", "127.0.0.1:6200")
    monkeypatch.setenv("AIGIS_SERVER_CERTS", str(pki.root))
    monkeypatch.setenv("AIGIS_ISSUER_URL", "https://issuer.example:9443")
    settings = client_settings(build_parser().parse_args(["call", "health"]))
    assert settings.target == "127.0.0.1:6200" and settings.ca == pki.ca_cert
    assert settings.token_url == "https://issuer.example:9443/oauth2/token"


def test_doctor_says_why_an_external_key_set_is_unreachable(
    tmp_path: Path, pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    """doctor fetches each external issuer's keys like the server (discovery, jwks_url, file) and names the failure."""
    config = tmp_path / "aigis.toml"
    config.write_text(
        f'[server]\ncerts = "{pki.root}"\nlisten = "127.0.0.1:0"\n[issuer]\nlisten = "127.0.0.1:0"\n'
        '[metrics]\nenabled = false\n'
        '[[auth.issuers]]\nissuer = "https://127.0.0.1:1"\naudience = "aigis"\n'
        '[[auth.issuers]]\nissuer = "https://idp.example"\naudience = "aigis"\njwks_file = "missing.json"\n'
    )
    assert main(["doctor", "--config", str(config), "--json"]) == EXIT_FAILED
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    unreachable = checks["JWKS of https://127.0.0.1:1"]
    assert unreachable["status"] == "fail"
    assert "https://127.0.0.1:1/.well-known/openid-configuration: cannot connect" in unreachable["detail"]
    assert checks["JWKS of https://idp.example"]["status"] == "fail"
    assert "missing.json: cannot read JWK Set" in checks["JWKS of https://idp.example"]["detail"]
    assert checks["signing keys"]["status"] == "ok" and checks["CRL"]["status"] == "ok"


def test_file_commands_default_to_the_configured_locations(
    in_tmp: Path, pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    """certs, keys and audit without --dir / --audit-log use the configuration's [server] certs and [audit] path."""
    log = in_tmp / "elsewhere.jsonl"
    log.write_text(json.dumps({"timestamp": "2026-11-25T10:00:00.000Z", "reason": "token_expired"}) + "\n")
    (in_tmp / "aigis.toml").write_text(f'[server]\ncerts = "{pki.root}"\n[audit]\npath = "elsewhere.jsonl"\n')
    assert main(["certs", "list", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["certificates"][0]["path"] == str(pki.ca_cert)
    assert main(["keys", "list", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)[0]["status"] == "active"
    assert main(["audit", "show", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["reason"] == "token_expired"
    (in_tmp / "aigis.toml").write_text('[server]\ncerts = 5\n')
    assert main(["certs", "list"]) == EXIT_USAGE
    assert "invalid configuration: server.certs: expected a string" in one_line_error(capsys.readouterr().err)
