"""deploy/kubernetes renders and validates offline: every core object against the Kubernetes 1.37
schemas (`kubernetes-validate --strict`: unknown fields are errors), every cert-manager object
against cert-manager's published CRD schemas (node, tests/crds), and the settings that matter are
what the README promises: non-root, read-only, no escalation, seccomp, probes, digests, and
aigis.toml files that load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aigis.auth.policy import Policy
from aigis.server.config import config_from_mapping

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
CRDS = Path(__file__).resolve().parent / "crds"
KUBERNETES_VERSION = "1.37.0"
CERT_MANAGER = "cert-manager.io/v1"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = _documents()
CORE = [(name, doc) for name, doc in DOCUMENTS if doc["apiVersion"] != CERT_MANAGER]
CRD_OBJECTS = [(name, doc) for name, doc in DOCUMENTS if doc["apiVersion"] == CERT_MANAGER]


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in DOCUMENTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def test_every_object_the_issue_asks_for_is_there() -> None:
    """Deployments, Services (ClusterIP + headless), ConfigMaps, cert-manager PKI, PDB, HPA, policies."""
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCUMENTS}
    assert {("Deployment", "aigis"), ("Deployment", "aigis-issuer"), ("Service", "aigis"),
            ("Service", "aigis-headless"), ("Service", "aigis-issuer"), ("ConfigMap", "aigis-config"),
            ("ConfigMap", "aigis-issuer-config"), ("ConfigMap", "aigis-policy"),
            ("PodDisruptionBudget", "aigis"), ("HorizontalPodAutoscaler", "aigis"), ("NetworkPolicy", "aigis"),
            ("NetworkPolicy", "aigis-issuer"), ("Issuer", "aigis-ca"), ("Certificate", "aigis-ca"),
            ("Certificate", "aigis-server"), ("Certificate", "aigis-issuer"),
            ("Certificate", "aigis-client-demo")} <= kinds
    assert _one("Service", "aigis-headless")["spec"]["clusterIP"] == "None"
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize(("name", "doc"), CORE, ids=[name for name, _ in CORE])
def test_core_object_validates_strictly(name: str, doc: dict[str, Any]) -> None:
    """Against the Kubernetes schemas bundled with kubernetes-validate, unknown fields refused."""
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """The core check is real: `readOnlyRootFileSystem` (capital S) is an unknown field, an error."""
    deployment = json.loads(json.dumps(_one("Deployment", "aigis")))
    security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security["readOnlyRootFileSystem"] = security.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_cert_manager_objects_validate_against_their_crd_schemas() -> None:
    """Certificates and Issuers against cert-manager's published CRD schemas (types, required
    fields, enums). Those validators allow unknown fields, so a misspelt optional key would pass."""
    node = shutil.which("node")
    if node is None or not (CRDS / "node_modules").is_dir():
        pytest.skip("cert-manager CRD schemas not installed: run `make crds` (node + npm; .ci/run does)")
    lines = "".join(json.dumps(doc) + "\n" for _, doc in CRD_OBJECTS)
    done = subprocess.run([node, str(CRDS / "validate.mjs")], input=lines, capture_output=True, text=True,
                          timeout=60, check=True, cwd=CRDS)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(CRD_OBJECTS) > 0
    failures = {name: r["error"] for (name, _), r in zip(CRD_OBJECTS, results, strict=True) if not r["ok"]}
    assert failures == {}


def test_crd_validator_catches_a_broken_certificate() -> None:
    """The CRD check is real: a Certificate without secretName and with a numeric duration fails."""
    node = shutil.which("node")
    if node is None or not (CRDS / "node_modules").is_dir():
        pytest.skip("cert-manager CRD schemas not installed: run `make crds` (node + npm; .ci/run does)")
    broken = {"apiVersion": CERT_MANAGER, "kind": "Certificate", "metadata": {"name": "x"},
              "spec": {"issuerRef": {"name": "aigis-ca"}, "duration": 5}}
    done = subprocess.run([node, str(CRDS / "validate.mjs")], input=json.dumps(broken) + "\n",
                          capture_output=True, text=True, timeout=60, check=True, cwd=CRDS)
    assert json.loads(done.stdout)["ok"] is False


def test_client_certificates_carry_one_spiffe_id_and_client_auth_only() -> None:
    """What aigis's client-certificate policy needs: exactly one spiffe:// URI SAN, clientAuth."""
    for _, doc in CRD_OBJECTS:
        spec = doc["spec"]
        if doc["kind"] == "Certificate" and "client auth" in spec.get("usages", []):
            assert [u for u in spec["uris"] if u.startswith("spiffe://aigis.local/client/")] == spec["uris"]
            assert len(spec["uris"]) == 1 and "server auth" not in spec["usages"]


DEPLOYMENTS = [doc for _, doc in DOCUMENTS if doc["kind"] == "Deployment"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["metadata"]["name"] for d in DEPLOYMENTS])
def test_pods_are_locked_down(deployment: dict[str, Any]) -> None:
    """Non-root, seccomp RuntimeDefault, no token, read-only root, no escalation, no capabilities,
    image pinned by digest, resources set, anti-affinity, probes on /livez and /readyz."""
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["affinity"]["podAntiAffinity"]
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", container["image"])
        assert {"requests", "limits"} <= container["resources"].keys()
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "probes"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}


def _aigis_toml(configmap: str) -> dict[str, Any]:
    return tomllib.loads(_one("ConfigMap", configmap)["data"]["aigis.toml"])


@pytest.mark.parametrize(
    ("deployment", "configmap"), [("aigis", "aigis-config"), ("aigis-issuer", "aigis-issuer-config")]
)
def test_config_loads_and_fits_its_deployment(deployment: str, configmap: str) -> None:
    """The ConfigMap's aigis.toml is a valid configuration; its probe and metrics ports are the
    container's named ports; every file it names lies under a mounted volume; SIGKILL cannot cut
    the drain and grace short."""
    config = config_from_mapping(_aigis_toml(configmap), Path("/"), {})
    pod = _one("Deployment", deployment)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.probes_listen is not None and config.probes_listen.port == ports["probes"]
    assert config.metrics_listen is not None and config.metrics_listen.port == ports["metrics"]
    mounts = [Path(m["mountPath"]) for m in container["volumeMounts"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert Path(env["AIGIS_CONFIG"]).parent in mounts
    pki = config.pki
    files = [pki.server_cert, pki.server_key, pki.ca_cert, pki.crl]
    if deployment == "aigis":
        files.append(config.policy)
        assert config.issuer.enabled is False and config.external_issuers
    else:
        files += [pki.clients_registry, pki.signing_key, pki.jwks]
    for file in files:
        assert file.parent in mounts, f"{file} is not on a mounted volume"
    assert pod["terminationGracePeriodSeconds"] > config.drain_seconds + config.grace_seconds


def test_issuer_url_is_the_one_the_servers_trust() -> None:
    """Servers trust exactly the `iss` the issuer replicas write, and fetch keys from its Service."""
    server, issuer = _aigis_toml("aigis-config"), _aigis_toml("aigis-issuer-config")
    trusted = server["auth"]["issuers"]
    assert [t["issuer"] for t in trusted] == [issuer["issuer"]["url"]]
    assert trusted[0]["jwks_url"] == issuer["issuer"]["url"] + "/.well-known/jwks.json"
    host = issuer["issuer"]["url"].removeprefix("https://").split(":")[0]
    assert host in _one("Certificate", "aigis-issuer")["spec"]["dnsNames"]


def test_policy_configmap_is_a_valid_policy() -> None:
    Policy.from_json(_one("ConfigMap", "aigis-policy")["data"]["policy.json"], source="aigis-policy")


def test_containerfile_is_multi_stage_non_root_and_pinned() -> None:
    text = CONTAINERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^ARG BASE=\S+@sha256:[0-9a-f]{64}$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    server = _one("Deployment", "aigis")["spec"]["template"]["spec"]["securityContext"]
    assert server["runAsUser"] == 10001
