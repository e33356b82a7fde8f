"""aigis.toml tells the truth: every accepted key is documented there with its default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from aigis.server.config import (
    Config,
    ConfigError,
    accepted_keys,
    config_from_mapping,
    config_to_mapping,
    find_config_file,
    load_config,
    to_toml,
)

REPO = Path(__file__).resolve().parent.parent
AIGIS_TOML = REPO / "aigis.toml"
_TABLE = re.compile(r"^#?\s*\[\[?([a-z_.]+)\]\]?\s*$")
_KEY = re.compile(r"^#?\s*([a-z_]+)\s*=")


def documented_keys(text: str) -> tuple[set[str], set[str]]:
    """(keys set in the file, keys shown only in comments like `# models = ...`), dotted."""
    active: set[str] = set()
    commented: set[str] = set()
    table = ""
    for line in text.splitlines():
        if m := _TABLE.match(line):
            table = m.group(1)
        elif m := _KEY.match(line):
            (commented if line.startswith("#") else active).add(f"{table}.{m.group(1)}")
    return active, commented


def flatten(document: dict[str, Any]) -> dict[str, Any]:
    return {f"{table}.{key}": value for table, keys in document.items() for key, value in keys.items()}


def test_aigis_toml_documents_every_accepted_key() -> None:
    """A key the loader accepts but aigis.toml does not mention fails here (and a stale one too)."""
    active, commented = documented_keys(AIGIS_TOML.read_text())
    assert accepted_keys() - active - commented == set(), "keys missing from aigis.toml"
    assert (active | commented) - accepted_keys() == set(), "aigis.toml documents keys the loader refuses"


def test_aigis_toml_values_are_the_defaults() -> None:
    """Every key set in aigis.toml has exactly the built-in default."""
    defaults = flatten(config_to_mapping(Config()))
    written = flatten(tomllib.loads(AIGIS_TOML.read_text()))
    assert written, "aigis.toml sets no keys"
    for key, value in written.items():
        assert key in defaults, f"{key} has no default to compare with"
        assert value == defaults[key], f"{key}: aigis.toml says {value!r}, the default is {defaults[key]!r}"


def test_aigis_toml_loads_as_the_defaults() -> None:
    """Loading the committed file gives the default configuration (paths resolved next to it)."""
    loaded = load_config(AIGIS_TOML)
    assert loaded == Config(certs=REPO / "certs", audit_log=REPO / "aigis-audit.jsonl")


def test_config_show_round_trips(tmp_path: Path) -> None:
    """What `aigis config show` prints loads back as the same configuration."""
    text = (
        '[server]\nlisten = "127.0.0.1:6000"\ncerts = "pki"\n[audit]\npath = "a.jsonl"\n'
        '[auth]\nrequire_bound_tokens = true\n'
        '[[auth.issuers]]\nissuer = "https://idp.example"\naudience = "aigis"\njwks_file = "j.json"\n'
        "[metrics]\nenabled = false\n"
    )
    config = config_from_mapping(tomllib.loads(text), tmp_path)
    shown = to_toml(config_to_mapping(config))
    assert config_from_mapping(tomllib.loads(shown), tmp_path) == config


def test_embedded_issuer_url_default_is_one_truth() -> None:
    """The configured default `iss`, aigis.toml's comment and the README name the same URL."""
    url = Config().issuer.issuer_url()
    assert url == "https://127.0.0.1:8443"
    assert url in AIGIS_TOML.read_text()
    assert url in (REPO / "README.md").read_text()


def test_dot_aigis_toml_is_read_without_config(tmp_path: Path) -> None:
    """./aigis.toml is used when --config is not given; an explicit file wins; none means defaults."""
    assert find_config_file(None, tmp_path) is None
    (tmp_path / "aigis.toml").write_text('[server]\nlisten = "127.0.0.1:6001"\n')
    assert find_config_file(None, tmp_path) == tmp_path / "aigis.toml"
    assert load_config(find_config_file(None, tmp_path)).listen.port == 6001
    other = tmp_path / "other.toml"
    assert find_config_file(other, tmp_path) == other
    with pytest.raises(ConfigError, match=r"other\.toml"):
        load_config(other)
