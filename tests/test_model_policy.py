"""Per-model authorization: policy rules with "models" allow and deny by the model a call names, for
every RPC that names one, before any inference; each denial is audited with the model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from calls import DENIAL_MESSAGES, REQUEST_ID_KEY, bearer, channel, issuer_token, run
from onnx_models import write_affine
from private_stack import private_stack

from aigis.auth.decision import Reason
from aigis.auth.identity import PeerIdentity
from aigis.auth.policy import ANY_MODEL, ModelRef, Policy, PolicyError
from aigis.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from aigis.inference import grpc_service_pb2 as pb
from aigis.inference import grpc_service_pb2_grpc as pb_grpc
from aigis.inference.tensors import encode_inputs
from aigis.server.config import BUNDLED_MODELS

CLIENT = "spiffe://aigis.local/client/"
INFER = "/inference.GRPCInferenceService/"
CLASSIFY = "/aigis.classifier.v1.ImageClassificationService/"
SEVEN = (BUNDLED_MODELS / "digits" / "samples" / "7.png").read_bytes()

POLICY = {
    "name": "per-model",
    "deny_rules": [
        {"name": "no-versioned-1", "source": {"principals": [CLIENT + "reader"]}, "models": ["versioned/1"]},
    ],
    "allow_rules": [
        {"name": "demo-everything", "source": {"principals": [CLIENT + "demo"]},
         "request": {"paths": [INFER + "*", CLASSIFY + "*"]}, "scopes": ["classifier:predict"]},
        {"name": "reader-models", "source": {"principals": [CLIENT + "reader"]},
         "request": {"paths": [INFER + "*", CLASSIFY + "*"]},
         "models": ["affine", "versioned*", "digits/1"], "scopes": ["classifier:predict"]},
        {"name": "reader-server", "source": {"principals": [CLIENT + "reader"]},
         "request": {"paths": [INFER + "Server*", CLASSIFY + "ListModels"]}, "scopes": ["classifier:predict"]},
        {"name": "calc-affine", "source": {"principals": [CLIENT + "calc-only"]},
         "request": {"paths": [INFER + "*"]}, "models": ["affine"], "scopes": ["classifier:predict"]},
    ],
}


def build_models(root: Path) -> Path:
    models = root / "models"
    shutil.copytree(BUNDLED_MODELS / "digits", models / "digits")
    shutil.copytree(BUNDLED_MODELS / "digits", models / "digits2")
    toml = models / "digits2" / "model.toml"
    toml.write_text(toml.read_text().replace('name = "digits"', 'name = "digits2"').replace("default = true",
                                                                                           "default = false"))
    write_affine(models / "affine" / "model.onnx")
    write_affine(models / "secret" / "model.onnx", seed=5)
    write_affine(models / "versioned" / "1" / "model.onnx", seed=1)
    write_affine(models / "versioned" / "2" / "model.onnx", seed=2)
    return models


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("model-policy")
    with private_stack(root, policy=POLICY, models=build_models(root)) as running:
        yield running


class Caller:
    """One client's channel and token (tokens carry every scope the client was issued)."""

    def __init__(self, stack: Any, client: str) -> None:
        self.channel = channel(stack, client)
        self.metadata = bearer(issuer_token(stack, client))
        self.infer = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.classify = classifier_pb2_grpc.ImageClassificationServiceStub(self.channel)

    def __call__(self, stub: Any, method: str, request: Any) -> Any:
        return run(lambda: getattr(stub, method)(request, metadata=self.metadata, timeout=10))


@pytest.fixture(scope="module")
def callers(stack: Any) -> Iterator[dict[str, Caller]]:
    made = {name: Caller(stack, name) for name in ("demo", "reader", "calc-only")}
    yield made
    for caller in made.values():
        caller.channel.close()


def infer(model: str, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id="x")
    encode_inputs(request, {"x": np.ones((1, 4), np.float32)})
    return request


def infer_bad_tensor(model: str) -> pb.ModelInferRequest:
    """A request whose tensor would be refused: a denial must come first (checked before inference)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="nope", datatype="FP32", shape=[1])
    return request


# (client, service, method, request, expected code, reason, audited model, audited version)
OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
CASES: dict[str, tuple[str, str, str, Any, grpc.StatusCode, str | None, str, str]] = {
    "allowed-by-name": ("reader", "infer", "ModelInfer", infer("affine"), OK, None, "", ""),
    "allowed-by-prefix-newest": ("reader", "infer", "ModelInfer", infer("versioned"), OK, None, "", ""),
    "allowed-by-prefix-explicit": ("reader", "infer", "ModelInfer", infer("versioned", "2"), OK, None, "", ""),
    "deny-rule-on-version": ("reader", "infer", "ModelInfer", infer("versioned", "1"), DENIED, "policy_denied",
                             "versioned", "1"),
    "other-model": ("reader", "infer", "ModelInfer", infer("secret"), DENIED, "no_matching_rule", "secret", "1"),
    "unknown-model-not-revealed": ("reader", "infer", "ModelInfer", infer("nope"), DENIED, "no_matching_rule",
                                   "nope", ""),
    "denied-before-tensor-check": ("reader", "infer", "ModelInfer", infer_bad_tensor("secret"), DENIED,
                                   "no_matching_rule", "secret", "1"),
    "allowed-pattern-unknown-model": ("reader", "infer", "ModelInfer", infer("versioned-x"),
                                      grpc.StatusCode.NOT_FOUND, None, "", ""),
    "metadata-denied": ("reader", "infer", "ModelMetadata", pb.ModelMetadataRequest(name="secret"), DENIED,
                        "no_matching_rule", "secret", "1"),
    "metadata-allowed": ("reader", "infer", "ModelMetadata", pb.ModelMetadataRequest(name="affine"), OK, None, "", ""),
    "ready-denied": ("reader", "infer", "ModelReady", pb.ModelReadyRequest(name="versioned", version="1"), DENIED,
                     "policy_denied", "versioned", "1"),
    "server-metadata": ("reader", "infer", "ServerMetadata", pb.ServerMetadataRequest(), OK, None, "", ""),
    "classify-default-model": ("reader", "classify", "ClassifyImage", classifier_pb2.Image(data=SEVEN), OK, None,
                               "", ""),
    "classify-other-model": ("reader", "classify", "ClassifyImage", classifier_pb2.Image(data=SEVEN, model="digits2"),
                             DENIED, "no_matching_rule", "digits2", "1"),
    "scope-missing-on-model-rule": ("calc-only", "infer", "ModelInfer", infer("affine"), DENIED, "scope_missing",
                                    "affine", "1"),
    "no-rule-for-model": ("calc-only", "infer", "ModelInfer", infer("secret"), DENIED, "no_matching_rule", "secret",
                          "1"),
    "demo-unrestricted": ("demo", "infer", "ModelInfer", infer("secret"), OK, None, "", ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_model_rules(stack: Any, callers: dict[str, Caller], case: str) -> None:
    """Each call is allowed or denied by the model it names; a denial has the generic message, a request
    id, and exactly one audit record with the reason and the model."""
    client, service, method, request, code, reason, model, version = CASES[case]
    caller = callers[client]
    before = len(stack.audit_records())
    outcome = caller(getattr(caller, service), method, request)
    assert outcome.code == code, outcome
    records = stack.audit_records()[before:]
    if reason is None:
        assert records == []
        return
    assert outcome.details == DENIAL_MESSAGES[code] and outcome.request_id
    assert [(r["request_id"], r["reason"], r["model"], r["model_version"]) for r in records] == [
        (outcome.request_id, reason, model, version)
    ]


def test_list_models_shows_only_usable_models(callers: dict[str, Caller]) -> None:
    """ListModels names only the models the caller may classify with."""
    request = classifier_pb2.ListModelsRequest()
    reader = callers["reader"](callers["reader"].classify, "ListModels", request).value
    demo = callers["demo"](callers["demo"].classify, "ListModels", request).value
    assert [m.name for m in reader.models] == ["digits"]
    assert [m.name for m in demo.models] == ["digits", "digits2"]


def test_stream_is_denied_at_the_message_naming_a_forbidden_model(stack: Any, callers: dict[str, Caller]) -> None:
    """ModelStreamInfer: messages for allowed models are answered; the first naming a forbidden model ends the
    stream with PERMISSION_DENIED, audited with that model, and nothing after it runs."""
    reader = callers["reader"]
    before = len(stack.audit_records())
    replies: list[Any] = []

    def consume() -> None:
        for reply in reader.infer.ModelStreamInfer(iter([infer("affine"), infer("versioned"), infer("secret"),
                                                          infer("affine")]), metadata=reader.metadata, timeout=10):
            replies.append(reply)

    outcome = run(consume)
    assert outcome.code == DENIED and outcome.request_id
    assert [r.infer_response.model_name for r in replies] == ["affine", "versioned"]
    records = stack.audit_records()[before:]
    assert [(r["request_id"], r["reason"], r["model"], r["model_version"], r["rpc_method"]) for r in records] == [
        (outcome.request_id, "no_matching_rule", "secret", "1", INFER + "ModelStreamInfer")
    ]


def test_classify_stream_is_checked_per_message(stack: Any, callers: dict[str, Caller]) -> None:
    """ClassifyStream: the default model is allowed; a message naming digits2 ends the stream."""
    reader = callers["reader"]
    images = [classifier_pb2.Image(data=SEVEN), classifier_pb2.Image(data=SEVEN, model="digits2")]
    replies: list[Any] = []
    outcome = run(lambda: replies.extend(reader.classify.ClassifyStream(iter(images), metadata=reader.metadata,
                                                                        timeout=10)))
    assert outcome.code == DENIED
    assert [r.category for r in replies] == ["7"]
    assert stack.audit_records()[-1]["model"] == "digits2"


def test_stream_without_any_rule_is_denied_at_the_open(stack: Any) -> None:
    """A caller no rule could allow is refused when the stream opens, before any message; the audit record
    names the model as "*" (not known yet)."""
    with channel(stack, "secret-client") as ch:
        metadata = bearer(issuer_token(stack, "secret-client"))
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        before = len(stack.audit_records())
        call = stub.ModelStreamInfer(iter([]), metadata=metadata, timeout=10)
        outcome = run(lambda: list(call))
    assert outcome.code == DENIED
    assert [(r["reason"], r["model"]) for r in stack.audit_records()[before:]] == [("no_matching_rule", "*")]
    assert dict(call.trailing_metadata() or ()).get(REQUEST_ID_KEY) == outcome.request_id


# ---- the policy itself ------------------------------------------------------------------------------------------

def _peer(name: str) -> PeerIdentity:
    return PeerIdentity(principal=CLIENT + name, uri_sans=(CLIENT + name,), dns_sans=(), subject="",
                        serial=1, issuer="CN=ca", fingerprint=name)


@pytest.mark.parametrize(("patterns", "model", "allowed"), [
    (["digits"], ModelRef("digits", "3"), True),
    (["digits"], ModelRef("digits2", "1"), False),
    (["digits/3"], ModelRef("digits", "3"), True),
    (["digits/3"], ModelRef("digits", "4"), False),
    (["dig*"], ModelRef("digits2", "1"), True),
    (["digits/1*"], ModelRef("digits", "12"), True),
    (["*"], ModelRef("anything", ""), True),
    (["a", "b/2"], ModelRef("b", "2"), True),
    (["a"], None, False),  # a call naming no model never matches a rule with models
    (["a"], ANY_MODEL, True),  # a stream's open: judged again per message
])
def test_model_patterns(patterns: list[str], model: Any, allowed: bool) -> None:
    """name, name/version, "*" and "prefix*" patterns."""
    policy = Policy.from_json(
        '{"name": "p", "allow_rules": [{"name": "r", "models": ' + str(patterns).replace("'", '"') + "}]}"
    )
    assert policy.evaluate("/x.Y/Z", _peer("a"), (), None, model).allowed is allowed


def test_deny_rules_with_models_are_skipped_at_a_stream_open() -> None:
    """ANY_MODEL skips deny rules with models (they apply per message), and only those."""
    policy = Policy.from_json(
        '{"name": "p", "deny_rules": [{"name": "d", "models": ["x"]}, {"name": "all", "source": {"principals": '
        '["' + CLIENT + 'evil"]}}], "allow_rules": [{"name": "r"}]}'
    )
    assert policy.evaluate("/x.Y/Z", _peer("a"), (), None, ANY_MODEL).allowed
    assert policy.evaluate("/x.Y/Z", _peer("a"), (), None, ModelRef("x", "1")).reason is Reason.POLICY_DENIED
    assert policy.evaluate("/x.Y/Z", _peer("evil"), (), None, ANY_MODEL).reason is Reason.POLICY_DENIED


@pytest.mark.parametrize("bad", ['[]', '["*x"]', '["a b"]', '[""]', '[3]', '"digits"', '["-a"]'])
def test_invalid_model_patterns_are_refused(bad: str) -> None:
    """A pattern that is not a name, name/version, "*" or prefix stops the policy from loading."""
    with pytest.raises(PolicyError, match=r"allow_rules\[0\]\.models"):
        Policy.from_json('{"name": "p", "allow_rules": [{"name": "r", "models": ' + bad + "}]}")


def test_every_model_naming_method_is_registered(stack: Any) -> None:
    """The model readers name real registered methods (a typo would silently skip per-model rules)."""
    from aigis.server.app import model_readers

    readers = model_readers(stack.server.repository, "digits")
    assert set(readers) <= set(stack.server.methods)
    assert {m for m in stack.server.methods if m.startswith(INFER + "Model")} <= set(readers)
