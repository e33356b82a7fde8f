"""The multi-host rehearsal: three server replicas on three hosts and the issuer on a fourth, each
host a network namespace the test makes, every process started from the ConfigMaps in
deploy/kubernetes with its volumes laid out as the kubelet mounts them.

The only change to the manifests' aigis.toml is where the volumes are: `/etc/aigis/...` becomes
`<pod dir>/etc/aigis/...`. Listen addresses stay `0.0.0.0` (inside a namespace that is only the
namespace's own address and loopback); the issuer's Service name resolves through the namespace's
/etc/hosts. Targets are only those namespace addresses; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from aigis.auth.audit_chain import verify_log
from aigis.auth.certs import issue_server_certificate, revoke_client
from aigis.auth.pki import PkiPaths
from aigis.auth.signing_keys import rotate_signing_key
from aigis.client_sdk import Client, ClientCredentials, TokenError
from tests.calls import RPC_KINDS, Outcome, bearer, run
from tests.conftest import make_pki
from tests.kube_volume import project
from tests.netns import Hosts, unavailable
from tests.procs import AigisProcess

pytestmark = pytest.mark.timeout(170)

REPO = Path(__file__).resolve().parent.parent
CONFIGMAPS = REPO / "deploy" / "kubernetes" / "configmaps.yaml"
SERVICE = "aigis-headless.aigis.svc"
ISSUER_SERVICE = "aigis-issuer.aigis.svc"
REPLICAS = (1, 2, 3)
ISSUER_HOST = 4
GRPC_PORT, METRICS_PORT, ISSUER_PORT = 50051, 9464, 8443
PROPAGATION_BOUND_SECONDS = 15.0  # generous: the documented bounds are 2 s (files) and 10 s (keys)
SIGNING_FILES = ("token-signing-key.pem", "jwks.json", "signing-keys.json")


def _configmaps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["data"] for doc in yaml.safe_load_all(CONFIGMAPS.read_text()) if doc}


@dataclass
class Pod:
    """One process and the volumes mounted into it, under `root` instead of `/`."""

    root: Path
    process: AigisProcess | None = None

    def volume(self, name: str) -> Path:
        return self.root / "etc" / "aigis" / name

    def config(self, aigis_toml: str) -> Path:
        path = self.volume("config") / "aigis.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(aigis_toml.replace('"/etc/aigis/', f'"{self.root}/etc/aigis/'))
        return path


@dataclass
class Cluster:
    hosts: Hosts
    pki: PkiPaths
    servers: dict[int, Pod]
    issuer: Pod
    policy: dict[str, Any]

    def address(self, host: int) -> str:
        return self.hosts.address(host)

    @property
    def token_url(self) -> str:
        return f"https://{self.address(ISSUER_HOST)}:{ISSUER_PORT}/oauth2/token"

    def token(self, client: str = "demo") -> str:
        return self.credentials(client).token()

    def credentials(self, client: str) -> ClientCredentials:
        return ClientCredentials(self.token_url, ca=self.pki.ca_cert, cert=self.pki.client_cert(client),
                                 key=self.pki.client_key(client))

    def call(self, host: int, client: str, token: str) -> Outcome:
        """Add on one replica, over a new mTLS channel presenting `client`'s certificate."""
        files = (self.pki.ca_cert, self.pki.client_key(client), self.pki.client_cert(client))
        credentials = grpc.ssl_channel_credentials(*(p.read_bytes() for p in files))
        options = [("grpc.ssl_target_name_override", SERVICE)]
        with grpc.secure_channel(f"{self.address(host)}:{GRPC_PORT}", credentials, options=options) as ch:
            return run(lambda: RPC_KINDS["unary"](ch, bearer(token)))

    def adds_served(self, host: int) -> float:
        url = f"http://{self.address(host)}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        prefix = 'aigis_requests_total{code="OK",method="/aigis.calculator.v1.Calculator/Add"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    def publish(self, volume: str, files: dict[str, bytes], pods: list[Pod]) -> None:
        """A ConfigMap/Secret update: the kubelet swaps each pod's volume."""
        for pod in pods:
            project(pod.volume(volume), files, mode=0o440)


def _until(check: Callable[[], bool], bound: float) -> float:
    """Seconds until `check()` holds (polled every 0.1 s), failing after `bound` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < bound, f"not within {bound} s"
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"multi-host rehearsal needs network namespaces: {reason}")
    root = tmp_path_factory.mktemp("rehearsal")
    hosts = Hosts(4)
    now = datetime.now(UTC)
    pki, _ = make_pki(root / "pki", now)
    # One certificate for the Services' names and the hosts' addresses (cert-manager would make two).
    issue_server_certificate(pki, now=now, server_names=[SERVICE, ISSUER_SERVICE, *(hosts.address(i) for i in
                                                                                  (*REPLICAS, ISSUER_HOST))])
    maps = _configmaps()
    policy = json.loads(maps["aigis-policy"]["policy.json"])
    servers = {i: Pod(root / f"aigis-{i}") for i in REPLICAS}
    issuer = Pod(root / "aigis-issuer")
    cluster = Cluster(hosts, pki, servers, issuer, policy)
    tls = {"tls.crt": pki.server_cert.read_bytes(), "tls.key": pki.server_key.read_bytes(),
           "ca.crt": pki.ca_cert.read_bytes()}
    pods = [*servers.values(), issuer]
    cluster.publish("tls", tls, pods)
    cluster.publish("crl", {"crl.pem": pki.crl.read_bytes()}, pods)
    cluster.publish("policy", {"policy.json": json.dumps(policy).encode()}, list(servers.values()))
    cluster.publish("clients", {"clients.json": pki.clients_registry.read_bytes()}, [issuer])
    cluster.publish("signing", {n: (pki.root / n).read_bytes() for n in SIGNING_FILES if (pki.root / n).exists()},
                    [issuer])
    try:
        hosts.create({ISSUER_SERVICE: ISSUER_HOST})
        # The issuer first, as readiness would order it: replicas fetch its JWK Set when they start.
        issuer.process = AigisProcess("issuer", issuer.root, config=issuer.config(maps["aigis-issuer-config"]
                                                                                  ["aigis.toml"]),
                                      netns=hosts.name(ISSUER_HOST))
        issuer.process.wait_ready()
        for i, pod in servers.items():
            pod.process = AigisProcess("serve", pod.root, config=pod.config(maps["aigis-config"]["aigis.toml"]),
                                       netns=hosts.name(i))
        for pod in servers.values():
            assert pod.process is not None
            pod.process.wait_ready()
        yield cluster
    finally:
        for pod in pods:
            if pod.process is not None:
                pod.process.stop(timeout=20)
        hosts.remove()


def _ready(cluster: Cluster, host: int) -> int:
    try:
        with urllib.request.urlopen(f"http://{cluster.address(host)}:8080/readyz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rehearsal_on_four_hosts(cluster: Cluster, tmp_path: Path) -> None:
    """Token on every replica; the SDK spreads calls over all three; revocation, a policy change and
    a signing-key rotation reach every replica in bounded time; kill -9 of a replica under load fails
    no call; every replica's audit log verifies."""
    timings: dict[str, float] = {}
    assert [_ready(cluster, i) for i in REPLICAS] == [200, 200, 200]

    # A token from the issuer on host 4 works on every replica.
    token = cluster.token("demo")
    assert [cluster.call(i, "demo", token).value for i in REPLICAS] == [5, 5, 5]

    # The SDK spreads calls over all three (round_robin over the addresses).
    target = "ipv4:" + ",".join(f"{cluster.address(i)}:{GRPC_PORT}" for i in REPLICAS)
    files = {"ca": cluster.pki.ca_cert, "cert": cluster.pki.client_cert("demo"), "key": cluster.pki.client_key("demo")}
    demo_tokens = cluster.credentials("demo")
    before = {i: cluster.adds_served(i) for i in REPLICAS}
    with Client(target, **files, token_provider=demo_tokens, default_timeout=10, server_name=SERVICE) as client:
        for _ in range(60):
            assert client.add(2, 3) == 5
    spread = {i: cluster.adds_served(i) - before[i] for i in REPLICAS}
    assert all(count >= 10 for count in spread.values()), spread

    # Revoking a client: the CRL ConfigMap and the clients Secret are updated; every replica refuses it.
    reader_token = cluster.token("reader")
    assert {cluster.call(i, "reader", reader_token).code for i in REPLICAS} == {grpc.StatusCode.PERMISSION_DENIED}
    revoke_client(cluster.pki, "reader", now=datetime.now(UTC))
    published = time.monotonic()
    cluster.publish("crl", {"crl.pem": cluster.pki.crl.read_bytes()}, [*cluster.servers.values(), cluster.issuer])
    cluster.publish("clients", {"clients.json": cluster.pki.clients_registry.read_bytes()}, [cluster.issuer])
    for i in REPLICAS:
        _until(lambda i=i: cluster.call(i, "reader", reader_token).code == grpc.StatusCode.UNAUTHENTICATED,
               PROPAGATION_BOUND_SECONDS)
    timings["revocation"] = time.monotonic() - published
    with pytest.raises(TokenError):
        cluster.token("reader")

    # A policy change (deny calc-only) reaches every replica.
    calc_token = cluster.token("calc-only")
    assert [cluster.call(i, "calc-only", calc_token).value for i in REPLICAS] == [5, 5, 5]
    policy = dict(cluster.policy, deny_rules=[{"name": "deny-calc-only",
                                               "source": {"principals": ["spiffe://aigis.local/client/calc-only"]}}])
    published = time.monotonic()
    cluster.publish("policy", {"policy.json": json.dumps(policy).encode()}, list(cluster.servers.values()))
    for i in REPLICAS:
        _until(lambda i=i: cluster.call(i, "calc-only", calc_token).code == grpc.StatusCode.PERMISSION_DENIED,
               PROPAGATION_BOUND_SECONDS)
    timings["policy"] = time.monotonic() - published

    # Rotating the signing key in the Secret: the issuer signs with the new key, every replica accepts it.
    staging = PkiPaths(tmp_path / "staging")
    staging.root.mkdir()
    signing = cluster.issuer.volume("signing")
    for name in SIGNING_FILES:
        if (signing / name).exists():
            shutil.copy(signing / name, staging.root / name)
    rotation = rotate_signing_key(staging, now=datetime.now(UTC))
    published = time.monotonic()
    cluster.publish("signing", {n: (staging.root / n).read_bytes() for n in SIGNING_FILES}, [cluster.issuer])
    fresh: list[str] = []

    def issuer_signs_with_new_key() -> bool:
        import jwt

        fresh[:] = [cluster.token("demo")]
        return jwt.get_unverified_header(fresh[0])["kid"] == rotation.active

    _until(issuer_signs_with_new_key, PROPAGATION_BOUND_SECONDS)
    for i in REPLICAS:
        _until(lambda i=i: cluster.call(i, "demo", fresh[0]).value == 5, PROPAGATION_BOUND_SECONDS)
    timings["signing_key"] = time.monotonic() - published
    assert [cluster.call(i, "demo", token).value for i in REPLICAS] == [5, 5, 5]  # the old key still verifies

    # kill -9 of one replica under steady load: no failed call, the other two carry on.
    victim = cluster.servers[3].process
    assert victim is not None
    assert b"python" in Path(f"/proc/{victim.process.pid}/cmdline").read_bytes()  # ip netns exec has exec'd
    stop, failures, answered = threading.Event(), [], []

    def load() -> None:
        with Client(target, **files, token_provider=demo_tokens, default_timeout=10, server_name=SERVICE) as client:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and len(answered) < 20_000:
                try:
                    assert client.add(2, 3) == 5
                    answered.append(time.monotonic())
                except Exception as exc:
                    failures.append(repr(exc))

    worker = threading.Thread(target=load, name="rehearsal-load")
    worker.start()
    time.sleep(2.0)
    os.kill(victim.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    survivors_before = {i: cluster.adds_served(i) for i in (1, 2)}
    time.sleep(4.0)
    stop.set()
    worker.join(30)
    assert not worker.is_alive()
    assert victim.wait(10) == -signal.SIGKILL
    assert failures == []
    assert len([t for t in answered if t < killed]) > 10 and len([t for t in answered if t > killed + 1]) > 10
    assert all(cluster.adds_served(i) > survivors_before[i] for i in (1, 2))

    # Each replica's audit log (the chained lines on its stdout) verifies and holds its denials.
    for i, pod in cluster.servers.items():
        assert pod.process is not None
        lines = [json.loads(line) for line in pod.process.output().splitlines() if '"chain"' in line]
        reasons = {record.get("reason") for record in lines}
        assert {"scope_missing", "cert_revoked", "policy_denied"} <= reasons, (i, reasons)
        collected = tmp_path / f"audit-{i}.jsonl"
        collected.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
        report = verify_log(collected, None)
        assert report.ok, (i, report.problems)
    print(f"\nrehearsal propagation (s): {json.dumps({k: round(v, 2) for k, v in timings.items()})}")
