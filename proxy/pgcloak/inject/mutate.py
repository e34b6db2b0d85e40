"""Kubernetes sidecar injection, the pure half: an AdmissionReview in, its answer out.

A pod opts in with a label; the answer is a JSONPatch that adds pgcloak as a sidecar
listening on the pod's loopback, so the application's connection string only changes
host and port (``127.0.0.1:6432``), and its database traffic is encrypted and audited
before it leaves the pod. No IO here: :mod:`pgcloak.inject.server` serves it.

The opt-in is ``pgcloak.dev/inject: "true"`` as a *label* (what the webhook's
``objectSelector`` selects, so pods without it never reach the injector and an injector
outage cannot block them) or, for a webhook registered without that selector, as an
annotation; either one opts the pod in, and nothing else is looked at without one.

Annotations (``pgcloak.dev/`` prefix) configure the sidecar:

* ``backend``: the PostgreSQL server, ``postgresql://host:port`` (required).
* ``policy-configmap``: ConfigMap holding the policy as ``policy.yaml`` (required).
* ``master-key-secret``: Secret holding the base64 master key as ``master-key``
  (required; handed over in ``PGCLOAK_MASTER_KEY``, never in arguments).
* ``listen-port`` (6432), ``admin-port`` (9187), ``backend-tls-mode`` (prefer).

A pod that opts in but cannot get a working, private sidecar is refused, not started
without its proxy: an application meant to run behind pgcloak must never talk to the
database directly by accident. That covers missing or invalid annotations, a volume
name or a declared container port the sidecar needs, ``hostNetwork`` (the sidecar's
``127.0.0.1`` listener would be the node's loopback, open to every host-network pod)
and ``shareProcessNamespace``/``hostPID`` (other processes could read the sidecar's
environment, which holds the master key). A review that is not shaped like one (a
``spec`` that is not an object, annotations given as a list, ...) raises ValueError.

The sidecar is a native sidecar (an init container that keeps running, Kubernetes
1.29+), so it is up before the application and its init containers (migrations
included) start; ``native_sidecar: false`` adds an ordinary container instead, for
older clusters.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ANNOTATION_PREFIX", "INJECT_LABEL", "InjectorConfig", "mutate", "sidecar_patch"]

ANNOTATION_PREFIX = "pgcloak.dev/"
#: The opt-in, as a label (preferred: the webhook's objectSelector) or an annotation.
INJECT_LABEL = ANNOTATION_PREFIX + "inject"
CONTAINER_NAME = "pgcloak"
STATUS_ANNOTATION = ANNOTATION_PREFIX + "status"
POLICY_DIR = "/etc/pgcloak/policy"
STATE_DIR = "/var/lib/pgcloak"
_PORT_RE = re.compile(r"^[1-9][0-9]{0,4}$")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS subdomain (ConfigMap/Secret)
_TLS_MODES = frozenset({"disable", "prefer", "require", "verify-ca", "verify-full"})
#: Pod-level settings under which the sidecar's secrets or listener are not the pod's own.
_SHARED = (
    ("hostNetwork", "its 127.0.0.1 listener would be the node's loopback, reachable from other host-network pods"),
    ("shareProcessNamespace", "other containers could read the sidecar's environment, which holds the master key"),
    ("hostPID", "processes outside the pod could read the sidecar's environment, which holds the master key"),
)


class InjectorConfig(BaseModel):
    """How the injector builds sidecars (``pgcloak inject serve --config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1, description="pgcloak container image")
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of the sidecar")
    native_sidecar: bool = Field(True, description="init container with restartPolicy: Always (Kubernetes 1.29+)")
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        description="resources of the sidecar container",
    )
    run_as_user: int = Field(65532, ge=1, description="the sidecar's non-root user id")


class Refused(Exception):
    """The pod asked for pgcloak but cannot get a working one: the admission is denied."""


def mutate(review: Mapping[str, Any], config: InjectorConfig) -> dict[str, Any]:
    """The AdmissionReview answering ``review`` (admission.k8s.io/v1).

    Raises ValueError for anything not shaped like an AdmissionReview of a pod (the
    server answers 400); a well-formed pod that cannot have pgcloak is refused in the
    answer (``allowed: false``)."""
    try:
        return _mutate(review, config)
    except RecursionError:  # a structure nested too deeply to walk (or print)
        raise ValueError("the review is nested too deeply") from None


def _mutate(review: Mapping[str, Any], config: InjectorConfig) -> dict[str, Any]:
    request = review.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ValueError("not an AdmissionReview request: no request.uid")
    api_version = review.get("apiVersion", "admission.k8s.io/v1")
    if not isinstance(api_version, str):
        raise ValueError("apiVersion is not a string")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    if request.get("operation", "CREATE") == "CREATE" and _is_pod(request):
        pod = request.get("object")
        if not isinstance(pod, Mapping):
            raise ValueError("request.object is not a pod")
        try:
            patch = sidecar_patch(pod, config)
        except Refused as exc:
            response["allowed"] = False
            response["status"] = {"code": 400, "reason": "BadRequest", "message": f"pgcloak injection: {exc}"}
        else:
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return not isinstance(kind, Mapping) or kind.get("kind", "Pod") == "Pod"


def _object(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as a JSON object (absent: empty); ValueError for anything else."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is not an object")
    return value


def _objects(value: Any, where: str) -> list[Mapping[str, Any]]:
    """``value`` as a JSON list of objects (absent: empty); ValueError for anything else."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise ValueError(f"{where} is not a list of objects")
    return value


def _opted_in(labels: Mapping[str, Any], annotations: Mapping[str, Any]) -> bool:
    """Whether the label or the annotation ``pgcloak.dev/inject`` is "true"."""
    opted = False
    for where, values in (("label", labels), ("annotation", annotations)):
        value = values.get(INJECT_LABEL)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where} {INJECT_LABEL} is not a string")
        opted = opted or (value or "").strip().lower() == "true"
    return opted


def sidecar_patch(pod: Mapping[str, Any], config: InjectorConfig) -> list[dict[str, Any]]:
    """JSONPatch operations adding the sidecar to ``pod`` ([] when not asked for or
    already there); raises :class:`Refused` for an opt-in without what pgcloak needs,
    ValueError for a pod that is not shaped like one."""
    metadata = _object(pod.get("metadata"), "metadata")
    annotations = _object(metadata.get("annotations"), "metadata.annotations")
    labels = _object(metadata.get("labels"), "metadata.labels")
    if not _opted_in(labels, annotations):
        return []
    spec = _object(pod.get("spec"), "spec")
    init_containers = _objects(spec.get("initContainers"), "spec.initContainers")
    containers = [*init_containers, *_objects(spec.get("containers"), "spec.containers")]
    existing_volumes = _objects(spec.get("volumes"), "spec.volumes")
    for field, why in _SHARED:
        if spec.get(field) is True:
            raise Refused(f"a pod with spec.{field}: true cannot have the pgcloak sidecar: {why}")
    if STATUS_ANNOTATION in annotations or any(c.get("name") == CONTAINER_NAME for c in containers):
        return []  # already injected (a re-invocation of the webhook)
    settings = _settings(annotations)
    for name in ("listen-port", "admin-port"):
        port = int(settings[name])
        for other in containers:
            if port in _declared_ports(other):
                raise Refused(
                    f"container {_label(other.get('name'))} already declares port {port} "
                    f"(the sidecar's {ANNOTATION_PREFIX}{name}); choose another with that annotation"
                )
    container = _container(settings, config)
    ops: list[dict[str, Any]] = []
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
        if init_containers:
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": container})
    volumes = [
        {"name": "pgcloak-policy", "configMap": {"name": settings["policy-configmap"]}},
        {"name": "pgcloak-state", "emptyDir": {}},
    ]
    taken = {v.get("name") for v in existing_volumes if isinstance(v.get("name"), str)}
    clash = [name for name in ("pgcloak-policy", "pgcloak-state") if name in taken]
    if clash:
        raise Refused(f"the pod already has a volume named {clash[0]}")
    if existing_volumes:
        ops.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    if annotations:
        ops.append({"op": "add", "path": "/metadata/annotations/" + _pointer(STATUS_ANNOTATION), "value": "injected"})
    else:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {STATUS_ANNOTATION: "injected"}})
    return ops


def _declared_ports(container: Mapping[str, Any]) -> set[int]:
    declared: set[int] = set()
    for port in _objects(container.get("ports"), "a container's ports"):
        number = port.get("containerPort")
        if not isinstance(number, int) or isinstance(number, bool):
            raise ValueError("a containerPort is not a number")
        declared.add(number)
    return declared


def _label(name: Any) -> str:
    """A container name for a message: quoted, bounded."""
    return json.dumps(name[:63] if isinstance(name, str) else "(unnamed)")


def _settings(annotations: Mapping[str, Any]) -> dict[str, str]:
    def get(name: str, default: str | None = None) -> str:
        value = annotations.get(ANNOTATION_PREFIX + name, default)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"annotation {ANNOTATION_PREFIX}{name} is not a string")
        if value is None or not value.strip():
            raise Refused(f"annotation {ANNOTATION_PREFIX}{name} is required")
        return value.strip()

    settings = {
        "backend": get("backend"),
        "policy-configmap": get("policy-configmap"),
        "master-key-secret": get("master-key-secret"),
        "listen-port": get("listen-port", "6432"),
        "admin-port": get("admin-port", "9187"),
        "backend-tls-mode": get("backend-tls-mode", "prefer"),
    }
    if not settings["backend"].startswith(("postgresql://", "postgres://")):
        raise Refused(f"{ANNOTATION_PREFIX}backend must be postgresql://HOST:PORT")
    for name in ("policy-configmap", "master-key-secret"):
        if not _NAME_RE.match(settings[name]):
            raise Refused(f"{ANNOTATION_PREFIX}{name} is not a Kubernetes object name")
    for name in ("listen-port", "admin-port"):
        if not _PORT_RE.match(settings[name]) or int(settings[name]) > 65535:
            raise Refused(f"{ANNOTATION_PREFIX}{name} is not a port number")
    if settings["listen-port"] == settings["admin-port"]:
        raise Refused("listen-port and admin-port must differ")
    if settings["backend-tls-mode"] not in _TLS_MODES:
        raise Refused(f"{ANNOTATION_PREFIX}backend-tls-mode must be one of {', '.join(sorted(_TLS_MODES))}")
    return settings


def _container(settings: Mapping[str, str], config: InjectorConfig) -> dict[str, Any]:
    admin = int(settings["admin-port"])
    probe = {"path": "/healthz", "port": admin}
    return {
        "name": CONTAINER_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": [
            "run",
            "--listen", f"127.0.0.1:{settings['listen-port']}",
            "--backend", settings["backend"],
            "--backend-tls-mode", settings["backend-tls-mode"],
            "--policy", f"{POLICY_DIR}/policy.yaml",
            "--admin-listen", f"0.0.0.0:{admin}",
            "--log-format", "json",
        ],
        "env": [
            {
                "name": "PGCLOAK_MASTER_KEY",
                "valueFrom": {"secretKeyRef": {"name": settings["master-key-secret"], "key": "master-key"}},
            }
        ],
        # A relative audit sink or spill file in the policy lands in the pod's own volume.
        "workingDir": STATE_DIR,
        "ports": [{"name": "pgcloak-admin", "containerPort": admin, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "pgcloak-policy", "mountPath": POLICY_DIR, "readOnly": True},
            {"name": "pgcloak-state", "mountPath": STATE_DIR},
        ],
        "startupProbe": {"httpGet": probe, "periodSeconds": 1, "failureThreshold": 30},
        "livenessProbe": {"httpGet": probe, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": admin}, "periodSeconds": 5},
        "resources": config.resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _pointer(key: str) -> str:
    """A JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
