"""The Kubernetes examples agree with the code: the app's pod gets its sidecar, the policy
it mounts is valid, the webhook, Service and injector point at one another, and the
webhook selects the app's pod. Also: the Docker build context is what the Dockerfile copies."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import yaml

from pgcloak.inject.mutate import INJECT_LABEL, InjectorConfig, mutate
from pgcloak.policy import parse_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _app_pod() -> dict[str, Any]:
    template = _one(_docs("app.yaml"), "Deployment")["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]}


def _admit(pod: dict[str, Any]) -> dict[str, Any]:
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "1", "kind": {"kind": "Pod"}, "operation": "CREATE", "object": pod}}  # fmt: skip
    response: dict[str, Any] = mutate(review, InjectorConfig(image="pgcloak:test"))["response"]
    return response


def test_the_app_pod_gets_a_sidecar_with_its_policy_and_key() -> None:
    policy_map = _one(_docs("app.yaml"), "ConfigMap")
    parse_policy(policy_map["data"]["policy.yaml"])  # raises if the example policy is invalid
    pod = _app_pod()
    response = _admit(pod)
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


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_the_webhook_selects_only_pods_that_opt_in_by_label() -> None:
    """objectSelector: pods without the opt-in label never reach the injector, so an
    injector outage (failurePolicy: Fail) cannot hold them back; the app's pod has it."""
    webhook = _one(_docs("injector.yaml"), "MutatingWebhookConfiguration")["webhooks"][0]
    selector = webhook["objectSelector"]
    pod = _app_pod()
    labels = pod["metadata"]["labels"]
    assert _selects(selector, labels)
    assert labels[INJECT_LABEL] == "true"
    # Selected because of the opt-in label, not because of other labels.
    assert not _selects(selector, {k: v for k, v in labels.items() if k != INJECT_LABEL})
    assert not _selects(selector, {"app": "other"})
    # And the label alone is what opts the example pod in (it carries no inject annotation).
    assert INJECT_LABEL not in pod["metadata"].get("annotations", {})
    without = copy.deepcopy(pod)
    del without["metadata"]["labels"][INJECT_LABEL]
    response = _admit(without)
    assert response["allowed"] is True and "patch" not in response


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's patterns as (negated, regex), in Docker's syntax: ``**`` any
    directories, ``*`` and ``?`` within one path segment; a pattern matching a directory
    covers everything under it."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_the_docker_build_context_is_what_the_dockerfile_copies() -> None:
    rules = _dockerignore()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    needed = [p.strip("/") for line in copied for p in line.split()]
    assert sorted(needed) == ["README.md", "proxy", "pyproject.toml", "setup.py"]
    kept = ["pyproject.toml", "setup.py", "README.md"]
    for dirpath, dirnames, filenames in os.walk(ROOT / "proxy"):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
        kept += [str(Path(dirpath, f).relative_to(ROOT)) for f in filenames if not f.endswith((".pyc", ".so"))]
    assert "proxy/pgcloak/__init__.py" in kept and "proxy/pgcloak/py.typed" in kept
    assert "proxy/pgcloak/audit/_chain_core.c" in kept
    assert [p for p in kept if _ignored(p, rules)] == []
    left_out = [
        ".git/HEAD", ".mypy_cache/3.11/x.json", ".ruff_cache/CACHEDIR.TAG", ".pytest_cache/README.md",
        "__pycache__/x.pyc", "proxy/pgcloak/__pycache__/cli.cpython-311.pyc", "proxy/pgcloak/sql/__pycache__/a.pyc",
        "proxy/pgcloak.egg-info/PKG-INFO", "pgcloak.egg-info/PKG-INFO", "build/lib/pgcloak/cli.py",
        "dist/pgcloak-0.1.0.whl", "tests/unit/test_examples.py", "bench/passthrough.py",
        "proxy/pgcloak/audit/_chain_core.cpython-311-x86_64-linux-gnu.so",
    ]  # fmt: skip
    assert [p for p in left_out if not _ignored(p, rules)] == []


# -- examples/compose ----------------------------------------------------------------------
COMPOSE = ROOT / "examples" / "compose"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    return loaded


def test_the_compose_proxy_command_is_one_pgcloak_runs() -> None:
    """The service's arguments are what `pgcloak run` takes; the policy it names is the
    file mounted there, valid; the backend is the database service; ports line up; the
    key comes from the environment variable the settings read."""
    from pgcloak import cli
    from pgcloak.config import ENV_PREFIX

    services = _compose()["services"]
    proxy = services["pgcloak"]
    args = cli.build_parser().parse_args(proxy["command"])
    assert args.func is cli.cmd_run
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1)[::-1] for v in proxy["volumes"] if v.startswith("./"))
    policy_host = mounts[args.policy]
    parse_policy((COMPOSE / policy_host).read_text(), source=policy_host)
    assert urlsplit(args.backend).hostname in services and urlsplit(args.backend).port == 5432
    listen_port = args.listen.rsplit(":", 1)[1]
    admin_port = args.admin_listen.rsplit(":", 1)[1]
    published = {p.rsplit(":", 1)[1] for p in proxy["ports"]}
    assert {listen_port, admin_port} <= published
    assert f":{admin_port}/readyz" in " ".join(proxy["healthcheck"]["test"])
    assert f"{ENV_PREFIX}MASTER_KEY" in proxy["environment"]
    assert args.master_key_file is None  # the key never sits in the compose directory
    # The policy's directory is a read-only mount: nothing may be written next to it.
    assert f"{policy_host}:{args.policy}:ro" in proxy["volumes"]
    # The audit trail is a relative file sink, which pgcloak resolves against its working
    # directory (tests/unit/test_audit_paths.py; not the policy's directory): the image's
    # workdir, where the compose file mounts the `audit` volume. Its spill file goes
    # next to it, unless a spill_dir says otherwise.
    audit = parse_policy((COMPOSE / policy_host).read_text(), source=policy_host).audit
    assert audit.sink.startswith("file:") and not Path(audit.sink[len("file:") :]).is_absolute()
    assert audit.spill_dir is None
    workdir = re.findall(r"^WORKDIR (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1]
    assert f"audit:{workdir}" in proxy["volumes"]  # (the final stage's)
    assert not Path(workdir).is_relative_to(Path(args.policy).parent)


def test_the_compose_schema_is_the_policy_ddl() -> None:
    """schema.sql ends with exactly what `pgcloak policy ddl` prints for the policy."""
    import contextlib
    import io

    from pgcloak import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["policy", "ddl", str(COMPOSE / "policy.yaml"), "--unique", "users.email"]) == 0
    schema = (COMPOSE / "schema.sql").read_text()
    assert schema.endswith(out.getvalue())
    db = _compose()["services"]["db"]
    assert "./schema.sql:/docker-entrypoint-initdb.d/10-schema.sql:ro" in db["volumes"]
    assert db["environment"]["POSTGRES_USER"] in yaml.safe_load((COMPOSE / "policy.yaml").read_text())["roles"]


def test_the_commands_in_the_example_policys_comments_are_ones_pgcloak_parses() -> None:
    """`pgcloak --policy FILE` (no subcommand) was once written there."""
    from pgcloak import cli

    text = (ROOT / "policies" / "example.yaml").read_text()
    commands = re.findall(r"`pgcloak ([^`]+)`", text)
    assert commands
    for command in commands:
        args = cli.build_parser().parse_args(command.split())
        assert callable(args.func), command
