"""The Kubernetes examples agree with the code: the app's pod gets its sidecar, the policy
it mounts is valid, and the webhook, Service and injector point at one another."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from pgcloak.inject.mutate import InjectorConfig, mutate
from pgcloak.policy import parse_policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def test_the_app_pod_gets_a_sidecar_with_its_policy_and_key() -> None:
    docs = _docs("app.yaml")
    policy_map = _one(docs, "ConfigMap")
    parse_policy(policy_map["data"]["policy.yaml"])  # raises if the example policy is invalid
    deployment = _one(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "1", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": pod}}  # fmt: skip
    response = mutate(review, InjectorConfig(image="pgcloak:test"))["response"]
    assert response["allowed"] is True, response
    after = jsonpatch.apply_patch(copy.deepcopy(pod), json.loads(base64.b64decode(response["patch"])))
    sidecar = after["spec"]["initContainers"][0]
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert volumes["pgcloak-policy"]["configMap"]["name"] == policy_map["metadata"]["name"]
    assert sidecar["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "pgcloak-key"
    # The application connects to the sidecar's port on the pod's loopback.
    listen = sidecar["args"][sidecar["args"].index("--listen") + 1]
    app_env = {e["name"]: e["value"] for e in after["spec"]["containers"][0]["env"]}
    assert f"@{listen}/" in app_env["DATABASE_URL"]


def test_the_webhook_reaches_the_injector() -> None:
    docs = _docs("injector.yaml")
    webhook = _one(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    service = _one(docs, "Service")
    container = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["inject", "serve"]
    client = webhook["clientConfig"]["service"]
    assert client["path"] == "/mutate"
    assert (client["name"], client["namespace"]) == (service["metadata"]["name"], service["metadata"]["namespace"])
    port = next(p for p in service["spec"]["ports"] if p["port"] == client["port"])
    assert args[args.index("--listen") + 1].endswith(f":{port['targetPort']}")
    assert webhook["rules"][0]["resources"] == ["pods"] and webhook["admissionReviewVersions"] == ["v1"]
    # The injector's serving certificate names the Service the API server calls.
    cert = _one(docs, "Certificate")
    assert f"{client['name']}.{client['namespace']}.svc" in cert["spec"]["dnsNames"]
