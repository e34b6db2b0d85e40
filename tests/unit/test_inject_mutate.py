"""Sidecar injection, the pure half: the patch applied to real pod specs (RFC 6902)."""

from __future__ import annotations

import base64
import copy
import json
import re
from typing import Any

import jsonpatch
import pytest

from pgcloak.inject.mutate import InjectorConfig, mutate

CONFIG = InjectorConfig(image="registry.example/pgcloak:1.0")
OPT_IN = {
    "pgcloak.dev/inject": "true",
    "pgcloak.dev/backend": "postgresql://db.shop.svc:5432",
    "pgcloak.dev/policy-configmap": "pgcloak-policy",
    "pgcloak.dev/master-key-secret": "pgcloak-key",
}


def _pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "api"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "shop/api:1"}], **spec},
    }


def _review(pod: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": "shop",
            "object": pod,
        },
    }


def _admit(pod: dict[str, Any], config: InjectorConfig = CONFIG) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the response, the pod as the API server stores it after the patch)."""
    answer = mutate(_review(pod), config)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    if "patch" not in response:
        return response, pod
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return response, jsonpatch.apply_patch(copy.deepcopy(pod), patch)


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == "pgcloak"]
    assert len(found) == 1
    return found[0]


def test_a_pod_that_opts_in_gets_a_native_sidecar_before_its_init_containers() -> None:
    pod = _pod(dict(OPT_IN), initContainers=[{"name": "migrate", "image": "shop/migrate:1"}])
    response, after = _admit(pod)
    assert response["allowed"] is True
    assert [c["name"] for c in after["spec"]["initContainers"]] == ["pgcloak", "migrate"]
    assert [c["name"] for c in after["spec"]["containers"]] == ["app"]  # untouched
    sidecar = _sidecar(after)
    assert sidecar["restartPolicy"] == "Always" and sidecar["image"] == CONFIG.image
    args = sidecar["args"]
    assert args[0] == "run"
    assert args[args.index("--listen") + 1] == "127.0.0.1:6432"
    assert args[args.index("--backend") + 1] == "postgresql://db.shop.svc:5432"
    assert args[args.index("--policy") + 1] == "/etc/pgcloak/policy/policy.yaml"
    assert args[args.index("--admin-listen") + 1] == "0.0.0.0:9187"
    # The key comes from the Secret through the environment, never in arguments.
    assert sidecar["env"] == [
        {"name": "PGCLOAK_MASTER_KEY", "valueFrom": {"secretKeyRef": {"name": "pgcloak-key", "key": "master-key"}}}
    ]
    assert not any("key" in a.lower() for a in args if a.startswith("--"))
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9187}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9187}
    sec = sidecar["securityContext"]
    assert sec["runAsNonRoot"] and sec["readOnlyRootFilesystem"] and sec["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in after["spec"]["volumes"]}
    assert volumes["pgcloak-policy"] == {"name": "pgcloak-policy", "configMap": {"name": "pgcloak-policy"}}
    assert "emptyDir" in volumes["pgcloak-state"]
    assert after["metadata"]["annotations"]["pgcloak.dev/status"] == "injected"


def test_ports_tls_mode_and_existing_volumes() -> None:
    annotations = {
        **OPT_IN,
        "pgcloak.dev/listen-port": "7000",
        "pgcloak.dev/admin-port": "7001",
        "pgcloak.dev/backend-tls-mode": "verify-full",
    }
    pod = _pod(annotations, volumes=[{"name": "cache", "emptyDir": {}}])
    _, after = _admit(pod)
    args = _sidecar(after)["args"]
    assert args[args.index("--listen") + 1] == "127.0.0.1:7000"
    assert args[args.index("--admin-listen") + 1] == "0.0.0.0:7001"
    assert args[args.index("--backend-tls-mode") + 1] == "verify-full"
    assert [v["name"] for v in after["spec"]["volumes"]] == ["cache", "pgcloak-policy", "pgcloak-state"]


def test_ordinary_container_for_older_clusters() -> None:
    config = InjectorConfig(image="pgcloak:1", native_sidecar=False)
    _, after = _admit(_pod(dict(OPT_IN)), config)
    assert [c["name"] for c in after["spec"]["containers"]] == ["app", "pgcloak"]
    assert "restartPolicy" not in _sidecar(after) and "initContainers" not in after["spec"]


@pytest.mark.parametrize(
    "pod",
    [
        _pod(None),  # no annotations at all
        _pod({"pgcloak.dev/inject": "false", "pgcloak.dev/backend": "postgresql://x:1"}),
        _pod({**OPT_IN, "pgcloak.dev/status": "injected"}),  # a second call of the webhook
    ],
)
def test_pods_that_do_not_ask_or_already_have_it_pass_unchanged(pod: dict[str, Any]) -> None:
    response, after = _admit(pod)
    assert response["allowed"] is True and "patch" not in response and after == pod


def test_updates_and_other_kinds_pass_unchanged() -> None:
    assert "patch" not in mutate(_review(_pod(dict(OPT_IN)), operation="UPDATE"), CONFIG)["response"]
    review = _review(_pod(dict(OPT_IN)))
    review["request"]["kind"]["kind"] = "Deployment"
    assert "patch" not in mutate(review, CONFIG)["response"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"pgcloak.dev/backend": ""}, "pgcloak.dev/backend is required"),
        ({"pgcloak.dev/backend": "db:5432"}, "postgresql://HOST:PORT"),
        ({"pgcloak.dev/policy-configmap": "Not_A_Name"}, "not a Kubernetes object name"),
        ({"pgcloak.dev/admin-port": "99999"}, "not a port number"),
        ({"pgcloak.dev/admin-port": "6432"}, "must differ"),
        ({"pgcloak.dev/backend-tls-mode": "maybe"}, "backend-tls-mode"),
    ],
)
def test_an_opt_in_without_what_pgcloak_needs_is_refused(change: dict[str, str], needle: str) -> None:
    """Never started without its proxy: the application would talk to the database directly."""
    response, _ = _admit(_pod({**OPT_IN, **change}))
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400 and needle in response["status"]["message"]


def test_a_volume_name_clash_is_refused() -> None:
    response, _ = _admit(_pod(dict(OPT_IN), volumes=[{"name": "pgcloak-state", "emptyDir": {}}]))
    assert response["allowed"] is False and "pgcloak-state" in response["status"]["message"]


def test_not_an_admission_review() -> None:
    with pytest.raises(ValueError, match=r"request\.uid"):
        mutate({"kind": "AdmissionReview"}, CONFIG)


def _labelled(labels: dict[str, str], annotations: dict[str, str] | None, **spec: Any) -> dict[str, Any]:
    pod = _pod(annotations, **spec)
    pod["metadata"]["labels"] = labels
    return pod


def test_the_opt_in_is_the_label_or_the_annotation() -> None:
    """The label is what the example webhook's objectSelector selects; the annotation
    still opts in where the webhook is registered without that selector."""
    config_only = {k: v for k, v in OPT_IN.items() if k != "pgcloak.dev/inject"}
    for pod in (
        _labelled({"app": "api", "pgcloak.dev/inject": "true"}, config_only),  # the label
        _labelled({"app": "api"}, dict(OPT_IN)),  # the annotation
        _labelled({"pgcloak.dev/inject": "true"}, dict(OPT_IN)),  # both
        _labelled({"pgcloak.dev/inject": "false"}, dict(OPT_IN)),  # either one is enough
    ):
        response, after = _admit(pod)
        assert response["allowed"] is True and "patch" in response
        assert _sidecar(after)["image"] == CONFIG.image
        assert after["metadata"]["annotations"]["pgcloak.dev/status"] == "injected"
    response, after = _admit(_labelled({"pgcloak.dev/inject": "false"}, config_only))
    assert "patch" not in response and "initContainers" not in after["spec"]
    # The label opts in; the configuration still has to come from the annotations.
    response, _ = _admit(_labelled({"pgcloak.dev/inject": "true"}, None))
    assert response["allowed"] is False
    assert "pgcloak.dev/backend is required" in response["status"]["message"]


@pytest.mark.parametrize(
    ("field", "needle"),
    [
        ("hostNetwork", "node's loopback"),
        ("shareProcessNamespace", "master key"),
        ("hostPID", "master key"),
    ],
)
def test_a_pod_sharing_its_network_or_processes_is_refused(field: str, needle: str) -> None:
    """On the host network the sidecar's 127.0.0.1 listener is the node's loopback; with a
    shared process namespace other processes can read its environment (the master key)."""
    response, _ = _admit(_pod(dict(OPT_IN), **{field: True}))
    assert response["allowed"] is False and "patch" not in response
    message = response["status"]["message"]
    assert f"spec.{field}: true" in message and needle in message
    # Explicitly off is fine; and a pod that did not opt in is not ours to judge.
    response, _ = _admit(_pod(dict(OPT_IN), **{field: False}))
    assert response["allowed"] is True and "patch" in response
    response, _ = _admit(_pod(None, **{field: True}))
    assert response["allowed"] is True and "patch" not in response


@pytest.mark.parametrize(
    ("annotations", "containers", "init_containers", "needle"),
    [
        ({}, [{"name": "app", "ports": [{"containerPort": 6432}]}], [], '"app" already declares port 6432'),
        ({}, [{"name": "app", "ports": [{"containerPort": 80}, {"containerPort": 9187}]}], [], "port 9187"),
        ({}, [{"name": "app"}], [{"name": "migrate", "ports": [{"containerPort": 9187}]}], '"migrate"'),
        ({"pgcloak.dev/listen-port": "5000"}, [{"name": "app", "ports": [{"containerPort": 5000}]}], [], "listen-port"),
        ({"pgcloak.dev/admin-port": "8080"}, [{"name": "app", "ports": [{"containerPort": 8080}]}], [], "admin-port"),
    ],
)
def test_a_port_the_sidecar_needs_already_declared_is_refused(
    annotations: dict[str, str], containers: list[dict[str, Any]], init_containers: list[dict[str, Any]], needle: str
) -> None:
    pod = _pod({**OPT_IN, **annotations}, initContainers=init_containers)
    pod["spec"]["containers"] = containers
    response, _ = _admit(pod)
    assert response["allowed"] is False and "patch" not in response
    assert needle in response["status"]["message"]


def test_other_declared_ports_are_fine() -> None:
    pod = _pod(dict(OPT_IN))
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8080, "name": "http"}]
    response, _ = _admit(pod)
    assert response["allowed"] is True and "patch" in response


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("where", "pod"),
    [
        ("metadata", {"metadata": ["pgcloak.dev/inject=true"], "spec": {}}),
        ("metadata.annotations", {"metadata": {"annotations": ["pgcloak.dev/inject=true"]}}),
        ("metadata.annotations", {"metadata": {"annotations": "pgcloak.dev/inject: true"}}),
        ("metadata.labels", {"metadata": {"labels": ["pgcloak.dev/inject"], "annotations": OPT_IN}}),
        ("annotation pgcloak.dev/inject", {"metadata": {"annotations": {**OPT_IN, "pgcloak.dev/inject": True}}}),
        ("label pgcloak.dev/inject", {"metadata": {"labels": {"pgcloak.dev/inject": ["true"]}}}),
        ("pgcloak.dev/backend", {"metadata": {"annotations": {**OPT_IN, "pgcloak.dev/backend": _deep(50_000)}}}),
        ("spec", {"metadata": {"annotations": OPT_IN}, "spec": ["containers"]}),
        ("spec", {"metadata": {"annotations": OPT_IN}, "spec": "hostNetwork"}),
        ("spec.containers", {"metadata": {"annotations": OPT_IN}, "spec": {"containers": {"name": "app"}}}),
        ("spec.containers", {"metadata": {"annotations": OPT_IN}, "spec": {"containers": "app"}}),
        ("spec.containers", {"metadata": {"annotations": OPT_IN}, "spec": {"containers": ["app"]}}),
        ("spec.initContainers", {"metadata": {"annotations": OPT_IN}, "spec": {"initContainers": 1}}),
        ("spec.volumes", {"metadata": {"annotations": OPT_IN}, "spec": {"volumes": {"cache": {}}}}),
        ("ports", {"metadata": {"annotations": OPT_IN}, "spec": {"containers": [{"name": "a", "ports": 80}]}}),
        ("containerPort", {"metadata": {"annotations": OPT_IN},
                           "spec": {"containers": [{"name": "a", "ports": [{"containerPort": "6432"}]}]}}),
    ],
)  # fmt: skip
def test_a_malformed_pod_is_a_value_error(where: str, pod: dict[str, Any]) -> None:
    """Not a pod as the API server sends one: ValueError, which the server answers 400."""
    with pytest.raises(ValueError, match=re.escape(where)):
        mutate(_review(pod), CONFIG)


@pytest.mark.parametrize(
    "review",
    [
        {"request": "uid"},
        {"request": {"uid": ["x"]}},
        {"apiVersion": _deep(50_000), "request": {"uid": "1", "object": _pod(None)}},
        {"apiVersion": "admission.k8s.io/v1", "request": {"uid": "1", "operation": "CREATE", "object": ["pod"]}},
        {"apiVersion": "admission.k8s.io/v1", "request": {"uid": "1", "operation": "CREATE"}},
    ],
)
def test_a_malformed_review_is_a_value_error(review: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        mutate(review, CONFIG)


def test_deeply_nested_pod_contents_are_not_walked() -> None:
    """What mutate does not look at can be anything; its answer stays small and printable."""
    pod = _pod(dict(OPT_IN))
    pod["spec"]["containers"][0]["env"] = _deep(50_000)
    answer = mutate(_review(pod), CONFIG)
    assert answer["response"]["allowed"] is True and "patch" in answer["response"]
    assert len(json.dumps(answer)) < 10_000


def test_a_recursion_error_inside_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgcloak.inject.mutate as module

    def explode(*_: Any) -> list[dict[str, Any]]:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(module, "sidecar_patch", explode)
    with pytest.raises(ValueError, match="nested too deeply"):
        mutate(_review(_pod(dict(OPT_IN))), CONFIG)
