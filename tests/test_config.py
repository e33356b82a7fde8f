"""aigis.toml loads into one validated object; bad values stop start-up naming the key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from aigis.server.config import Config, ConfigError, HostPort, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aigis.toml"
    path.write_text(text)
    return path


def test_committed_example_loads_with_defaults() -> None:
    """The documented example file is valid and equals the built-in defaults."""
    config = load_config(REPO / "aigis.toml")
    default = Config()
    assert config.listen == default.listen
    assert config.certs == REPO / "certs"
    assert config.issuer == default.issuer
    assert config.algorithms == default.algorithms


def test_values_and_relative_paths(tmp_path: Path) -> None:
    """Values are read and relative paths resolve against the config file's directory."""
    path = write(tmp_path, '[server]\nlisten = "[::1]:6000"\ncerts = "pki"\n[issuer]\ntoken_ttl_seconds = 60\n')
    config = load_config(path)
    assert config.listen == HostPort("::1", 6000)
    assert config.certs == tmp_path / "pki"
    assert config.issuer.token_ttl == timedelta(seconds=60)


def test_command_line_overrides_win(tmp_path: Path) -> None:
    """Flags override the file."""
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\n')
    config = load_config(path, listen="127.0.0.1:7000", issuer_listen="127.0.0.1:7001", audit_log="a.jsonl")
    assert config.listen.port == 7000 and config.issuer.listen.port == 7001
    assert config.audit_log == Path("a.jsonl")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('[server]\nlisten = "nope"\n', "server.listen: expected HOST:PORT", id="listen-no-port"),
        pytest.param('[server]\nlisten = "h:99999"\n', "server.listen", id="listen-port-range"),
        pytest.param("[server]\nlisten = 5\n", "server.listen: expected a string", id="listen-not-string"),
        pytest.param("[server]\nlistne = 'x:1'\n", "server.listne: unknown key", id="typo-key"),
        pytest.param("[servr]\n", "servr: unknown key", id="typo-section"),
        pytest.param("[server]\ngrace_seconds = -1\n", "server.grace_seconds: must be greater than 0", id="grace"),
        pytest.param("[server]\ninference_threads = true\n", "server.inference_threads: expected an integer",
                     id="bool-as-int"),
        pytest.param('[auth]\nalgorithms = ["none"]\n', "auth.algorithms[0]", id="alg-none"),
        pytest.param('[auth]\nalgorithms = ["HS256"]\n', "auth.algorithms[0]", id="alg-hmac"),
        pytest.param("[auth]\nleeway_seconds = 3600\n", "auth.leeway_seconds", id="leeway-huge"),
        pytest.param('[issuer]\nurl = "http://x"\n', "issuer.url: must be an https:// URL", id="issuer-http"),
        pytest.param("[issuer]\nmax_connections = 0\n", "issuer.max_connections", id="issuer-no-connections"),
        pytest.param("[issuer]\nmax_connections = 8\nmax_connections_per_peer = 9\n",
                     "issuer.max_connections_per_peer: must not exceed", id="issuer-peer-cap-over-total"),
        pytest.param("[issuer]\nsecret_check_threads = 64\n", "issuer.secret_check_threads: at most 16",
                     id="issuer-too-many-scrypt-threads"),
        pytest.param("[issuer]\nrequest_timeout_seconds = -1\n", "issuer.request_timeout_seconds",
                     id="issuer-negative-timeout"),
        pytest.param('[[auth.issuers]]\nissuer = "http://i"\naudience = "a"\n',
                     "auth.issuers[0].issuer: discovery needs an https:// issuer", id="external-discovery-http"),
        pytest.param('[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\njwks_url = "https://k"\n'
                     'jwks_file = "f"\n', "auth.issuers[0]: set at most one", id="external-two-key-sources"),
        pytest.param('[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\ntoken_types = []\n',
                     "auth.issuers[0].token_types: must name", id="external-no-token-types"),
        pytest.param('[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\ntoken_types = [""]\n',
                     "auth.issuers[0].token_types[0]", id="external-empty-token-type"),
        pytest.param('[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\nscope_claim = ""\n',
                     "auth.issuers[0].scope_claim", id="external-empty-scope-claim"),
        pytest.param('[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\njwks_url = "http://k"\n',
                     "auth.issuers[0].jwks_url", id="external-http-jwks"),
        pytest.param("[issuer]\ntoken_ttl_seconds = 100000\n", "issuer.token_ttl_seconds: must be between 1 and 86400",
                     id="token-ttl-over-max"),
        pytest.param("[issuer]\ntoken_ttl_seconds = 0\n", "issuer.token_ttl_seconds", id="token-ttl-zero"),
        pytest.param('[auth]\nalgorithms = ["ES256", "HS512"]\n', "auth.algorithms[1]: 'HS512' is not one of",
                     id="alg-second-hmac"),
        pytest.param("[limits]\ndenial_rate_per_second = -1\n", "limits.denial_rate_per_second: must be 0",
                     id="denial-rate-negative"),
        pytest.param("[limits]\ndenial_burst = 0\n", "limits.denial_burst", id="denial-burst-zero"),
        pytest.param("[limits]\ndenial_hold_seconds = 31\n", r"limits.denial_hold_seconds: must be between 0 \(off\)",
                     id="denial-hold-too-long"),
        pytest.param("[limits]\nmax_held_denials = 0\n", "limits.max_held_denials", id="max-held-zero"),
        pytest.param("[server\n", "invalid TOML", id="bad-toml"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Each invalid value is refused with a message naming the key."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist is refused, not ignored."""
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "absent.toml")


def test_external_issuer_by_issuer_url_alone(tmp_path: Path) -> None:
    """An issuer URL and audience are enough: keys by discovery, RFC 9068 typ, scope/scp claims."""
    config = load_config(write(tmp_path, '[[auth.issuers]]\nissuer = "https://idp.example"\naudience = "aigis"\n'))
    (external,) = config.external_issuers
    assert (external.jwks_url, external.jwks_file) == (None, None)
    assert external.token_types == ("at+jwt",)
    assert external.scope_claim is None


def test_external_issuer_typ_and_scope_claim(tmp_path: Path) -> None:
    """token_types and scope_claim are read per issuer."""
    text = (
        '[[auth.issuers]]\nissuer = "https://i"\naudience = "a"\n'
        'token_types = ["at+jwt", "JWT"]\nscope_claim = "roles"\n'
    )
    (external,) = load_config(write(tmp_path, text)).external_issuers
    assert external.token_types == ("at+jwt", "JWT")
    assert external.scope_claim == "roles"


def test_every_algorithm_the_verifier_supports_is_configurable(tmp_path: Path) -> None:
    """One list: what the config accepts is exactly what the token verifier supports."""
    from aigis.auth.defaults import SUPPORTED_ALGORITHMS

    names = ", ".join(f'"{a}"' for a in sorted(SUPPORTED_ALGORITHMS))
    config = load_config(write(tmp_path, f"[auth]\nalgorithms = [{names}]\n"))
    assert set(config.algorithms) == SUPPORTED_ALGORITHMS


def test_the_longest_token_ttl_the_issuer_allows_is_accepted(tmp_path: Path) -> None:
    """The config's bound is the issuer's bound (24 h): the largest accepted value starts an issuer."""
    from aigis.auth.defaults import MAX_TOKEN_TTL

    config = load_config(write(tmp_path, f"[issuer]\ntoken_ttl_seconds = {int(MAX_TOKEN_TTL.total_seconds())}\n"))
    assert config.issuer.token_ttl == MAX_TOKEN_TTL
