"""What users install: one top-level package, and a client-only install without the server's weight.

The wheel is built from this checkout; the client variant (`pip install aigis`, no extra) goes into
a fresh venv, where onnxruntime and Pillow must be absent, and is used from a project that has its
own `protos/`, `tools/` and `server/` packages — the names the repository's folders carry, and the
names a user's gRPC project most often has — to call a real server through the SDK and the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import RunningStack

REPO = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("onnxruntime", "PIL", "cryptography", "jwt", "prometheus_client")

pytestmark = pytest.mark.timeout(600)


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, REPO)
    assert built.returncode == 0, built.stderr
    return next(out.glob("aigis-*.whl"))


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the client install of the wheel (its dependencies from the package index)."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    made = _run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, timeout=600)
    assert installed.returncode == 0, installed.stderr
    return python


@pytest.fixture
def foreign_project(tmp_path: Path) -> Path:
    """A user's project whose own top-level packages share names with the repository's folders."""
    for name in ("protos", "tools", "server", "auth", "client_sdk"):
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text(f"OWNER = 'the user project: {name}'\n")
    return tmp_path


def test_wheel_holds_one_top_level_package_with_types(wheel: Path) -> None:
    """The wheel installs `aigis` alone (top_level.txt says so too) and ships py.typed."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        tops = {n.split("/")[0] for n in names} - {dist_info}
        assert tops == {"aigis"}
        assert "aigis/py.typed" in names
        assert "aigis/calculator/v1/calculator_pb2.py" in names  # import path = proto package
        top_level = f"{dist_info}/top_level.txt"
        if top_level in names:
            assert archive.read(top_level).decode().split() == ["aigis"]
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base, "the client install has dependencies"
    assert not [line for line in base if any(p in line.lower() for p in ("onnxruntime", "pillow"))], base


def test_client_install_has_no_onnxruntime_and_no_pillow(client_python: Path) -> None:
    """`pip install aigis` brings the SDK and its protocol code, and none of the server-only packages."""
    probe = textwrap.dedent(
        f"""
        import importlib.util, json
        import aigis.client_sdk, aigis.calculator.v1.calculator_pb2, aigis.classifier.v1.classifier_pb2
        print(json.dumps({{name: importlib.util.find_spec(name) is not None for name in {SERVER_ONLY!r}}}))
        """
    )
    result = _run(client_python, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == dict.fromkeys(SERVER_ONLY, False)


def test_a_project_with_its_own_protos_tools_server_uses_the_sdk(
    client_python: Path, foreign_project: Path, stack: RunningStack
) -> None:
    """From a project with its own protos/ tools/ server/: its packages stay its own, the SDK calls aigis."""
    ca, cert, key = stack.client_files("demo")
    script = foreign_project / "use_aigis.py"
    script.write_text(textwrap.dedent(
        f"""
        import protos, server, tools
        from aigis.client_sdk import Client, ClientCredentials

        assert protos.OWNER.endswith("protos") and tools.OWNER.endswith("tools") and server.OWNER.endswith("server")
        tokens = ClientCredentials({stack.token_url!r}, ca={str(ca)!r}, cert={str(cert)!r}, key={str(key)!r})
        with Client({stack.target!r}, ca={str(ca)!r}, cert={str(cert)!r}, key={str(key)!r},
                    token_provider=tokens, default_timeout=10) as client:
            print(client.add(2, 40))
        """
    ))  # fmt: skip
    result = _run(client_python, script, cwd=foreign_project, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"


def test_the_aigis_command_runs_from_such_a_project(client_python: Path, foreign_project: Path) -> None:
    """The `aigis` entry point resolves to aigis.tools.cli, never to the project's own tools/ package."""
    aigis = client_python.parent / "aigis"
    result = _run(aigis, "--help", cwd=foreign_project, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "call" in result.stdout and "token" in result.stdout
