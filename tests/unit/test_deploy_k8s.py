"""deploy/k8s/ is valid Kubernetes and agrees with the relay it deploys.

Offline: kubernetes-validate checks every built-in kind against the schemas it bundles (no
cluster); the PodMonitor, a Prometheus Operator resource it has no schema for, is checked
field by field here. The rest holds the manifests to the relay's own rules: every
``OUTBOX_*`` variable is a real setting with a value its parser accepts, the routes file in
the ConfigMap loads with the Secret's placeholder values, ports, paths, labels and secret
keys line up, and the pod is hardened.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from outbox_lib._signature import parse_secrets
from relay.config import OPTIONS, Settings, load_settings, signing_keys
from relay.db import to_libpq

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
# Native sidecars (restartPolicy on an init container) are GA from 1.33, on by default from 1.29.
KUBERNETES_VERSION = "1.33"
OPTION_BY_ENV = {option.env: option for option in OPTIONS}
PLACEHOLDER = re.compile(r"placeholder", re.IGNORECASE)

Resource = dict[str, Any]


def load(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc]


def manifests() -> Iterator[tuple[str, Resource]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in load(path):
                yield path.name, doc


RESOURCES = list(manifests())
BUILT_IN = [(name, doc) for name, doc in RESOURCES if doc["kind"] != "PodMonitor"]


def only(kind: str) -> Resource:
    found = [doc for _, doc in RESOURCES if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(kind: str) -> Resource:
    spec: Resource = only(kind)["spec"]["template"]["spec"]
    return spec


def sidecar() -> Resource:
    init: list[Resource] = pod_spec("Deployment")["initContainers"]
    (relay,) = [c for c in init if c["name"] == "outbox-relay"]
    return relay


def containers(spec: Mapping[str, Any]) -> list[Resource]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def plain_env(container: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_values() -> dict[str, str]:
    values: dict[str, str] = only("Secret")["stringData"]
    return values


def relay_env() -> dict[str, str]:
    """The sidecar's environment as the kubelet would build it, secrets included."""
    env = plain_env(sidecar())
    for entry in sidecar()["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[entry["name"]] = secret_values()[ref["key"]]
    return env


def port_number(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def relay_settings(tmp_path: Path) -> Settings:
    """What the sidecar's ``outbox-relay run`` would load: the ConfigMap's file, its env."""
    config = tmp_path / "relay.toml"
    config.write_text(only("ConfigMap")["data"]["relay.toml"], "utf-8")
    return load_settings({}, relay_env(), str(config))


# -- every file is a valid resource ----------------------------------------------------------


def test_kustomization_lists_exactly_the_manifests() -> None:
    (kustomization,) = load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.iterdir()} - {"kustomization.yaml"}
    assert set(listed) == on_disk


@pytest.mark.parametrize(
    "resource", [doc for _, doc in BUILT_IN], ids=[f"{n}:{d['kind']}" for n, d in BUILT_IN]
)
def test_manifest_validates_against_the_kubernetes_schema(resource: Resource) -> None:
    """Strict schemas: an unknown or misspelt field fails, not only a wrong type."""
    version = kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    assert version == KUBERNETES_VERSION


def test_the_validator_rejects_a_misspelt_field() -> None:
    """Guards the test above against a validator that accepts anything."""
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text("utf-8"))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_resource_is_expected_and_named_once() -> None:
    kinds = sorted(doc["kind"] for _, doc in RESOURCES)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "PodMonitor",
            "Secret",
            "ServiceAccount",
        ]
    )
    for _, doc in RESOURCES:
        assert "namespace" not in doc["metadata"], "the namespace is the applier's choice"


def test_pod_monitor_scrapes_the_relay_as_job_outbox_relay() -> None:
    monitor = only("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    assert matches(monitor["spec"]["selector"], pod_labels())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    # The named port exists on the sidecar only, so the application is not scraped as a relay.
    named = [p["name"] for c in containers(pod_spec("Deployment")) for p in c.get("ports", [])]
    assert named.count(endpoint["port"]) == 1
    assert port_number(sidecar(), endpoint["port"]) == int(relay_env()["OUTBOX_METRICS_PORT"])
    # alerts.yml selects up{job="outbox-relay"}; the operator's default job is ns/name.
    assert 'up{job="outbox-relay"}' in ALERTS.read_text("utf-8")
    assert {"action": "replace", "targetLabel": "job", "replacement": "outbox-relay"} in endpoint[
        "relabelings"
    ]


# -- the relay's settings ----------------------------------------------------------------------


def test_the_relay_is_a_native_sidecar() -> None:
    spec = pod_spec("Deployment")
    assert [c["name"] for c in spec["initContainers"]] == ["outbox-relay"]
    relay = sidecar()
    assert relay["restartPolicy"] == "Always"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["version"]
    assert relay["image"] == f"outbox-relay:{version}"
    assert relay["args"] == ["run"]
    assert "command" not in relay, "the image's ENTRYPOINT is outbox-relay"
    assert [c["name"] for c in spec["containers"]] == ["orders-app"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_outbox_variable_is_a_setting_with_a_valid_value(kind: str) -> None:
    for container in containers(pod_spec(kind)):
        for entry in container.get("env", []):
            name = entry["name"]
            if not name.startswith("OUTBOX_") or name == "OUTBOX_CONFIG":
                continue
            assert name in OPTION_BY_ENV, f"{container['name']}: {name} is not a relay setting"
            if "value" in entry:
                OPTION_BY_ENV[name].parse(entry["value"])


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_secret_reference_is_a_key_of_the_secret(kind: str) -> None:
    secret = only("Secret")
    refs = [
        entry["valueFrom"]["secretKeyRef"]
        for container in containers(pod_spec(kind))
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
        assert ref.get("optional") is not True


def test_the_routes_file_loads_with_the_pods_environment(tmp_path: Path) -> None:
    settings = relay_settings(tmp_path)
    sinks = {route.sink for route in settings.routes}
    assert sinks == {"kafka", "webhook"}
    assert settings.kafka_bootstrap_servers
    assert settings.metrics_port == 9464
    assert settings.log_format == "json"
    for route in settings.routes:
        if route.sink == "webhook":
            assert route.secret_env, "the signing secret comes from the Secret, not the file"
            assert signing_keys(route), "the relay refuses a secret that is not whsec_ base64"
    to_libpq(settings.require_database_url())


def test_every_secret_env_is_filled_from_the_secret(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(only("ConfigMap")["data"]["relay.toml"], "utf-8")
    routes = load_settings({}, relay_env(), str(config)).routes
    from_secret = {e["name"] for e in sidecar()["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    for route in routes:
        if route.secret_env:
            assert route.secret_env in from_secret


def test_the_secret_holds_only_obvious_placeholders() -> None:
    values = secret_values()
    assert "data" not in only("Secret"), "stringData only: nothing hidden in base64"
    assert PLACEHOLDER.search(values["database-url"])
    assert ".invalid:" in values["database-url"]
    for key, value in values.items():
        if value.startswith("whsec_"):
            for secret in parse_secrets(value):
                assert PLACEHOLDER.search(secret.decode()), key


def test_the_config_mount_is_where_outbox_config_points() -> None:
    relay = sidecar()
    config = Path(relay_env()["OUTBOX_CONFIG"])
    (mount,) = [m for m in relay["volumeMounts"] if m["mountPath"] == str(config.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec("Deployment")["volumes"] if v["name"] == mount["name"]]
    configmap = only("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config.name in configmap["data"]


def test_probes_and_port_are_the_relays_metrics_port() -> None:
    relay = sidecar()
    port = int(relay_env()["OUTBOX_METRICS_PORT"])
    assert port_number(relay, "metrics") == port == 9464
    for probe in ("startupProbe", "livenessProbe"):
        get = relay[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert port_number(relay, get["port"]) == port, probe


def test_readiness_is_never_gated_on_readyz() -> None:
    """deploy/README.md: a broker outage must not take the application out of service."""
    assert "readinessProbe" not in sidecar()
    for container in containers(pod_spec("Deployment")):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = container.get(probe, {}).get("httpGet", {}).get("path")
            assert path != "/readyz", f"{container['name']} {probe}"


def test_the_startup_probe_outlasts_the_relays_database_connect() -> None:
    """``run`` waits up to 30 s for the database before it serves /healthz."""
    probe = sidecar()["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > 30


def test_termination_grace_covers_the_relays_shutdown_grace() -> None:
    grace = OPTION_BY_ENV["OUTBOX_SHUTDOWN_GRACE"].parse(relay_env()["OUTBOX_SHUTDOWN_GRACE"])
    # The pod's budget is shared: the application stops first, then the relay finishes its
    # batch, records it and hands its buckets over; leave room beyond the send grace.
    assert pod_spec("Deployment")["terminationGracePeriodSeconds"] >= grace + 15


# -- the pod and its neighbours ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_container_is_hardened_and_bounded(kind: str) -> None:
    spec = pod_spec(kind)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == only("ServiceAccount")["metadata"]["name"]
    for container in containers(spec):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert "privileged" not in context
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_the_service_account_mounts_no_token() -> None:
    assert only("ServiceAccount")["automountServiceAccountToken"] is False


def test_the_disruption_budget_covers_the_pods() -> None:
    deployment = only("Deployment")
    pdb = only("PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"], pod_labels())
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_the_migration_job_runs_migrate_with_the_relays_database() -> None:
    job = only("Job")
    assert job["spec"]["backoffLimit"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    spec = pod_spec("Job")
    assert spec["restartPolicy"] in {"Never", "OnFailure"}
    (migrate,) = spec["containers"]
    assert migrate["image"] == sidecar()["image"]
    assert migrate["args"] == ["migrate"]
    # Same database and schema as the relays (OUTBOX_SCHEMA unset in both means `outbox`).
    relay_refs = {e["name"]: e.get("valueFrom") for e in sidecar()["env"]}
    job_refs = {e["name"]: e.get("valueFrom") for e in migrate["env"]}
    for name in ("OUTBOX_DATABASE_URL", "OUTBOX_SCHEMA"):
        assert job_refs.get(name) == relay_refs.get(name), name
    assert plain_env(migrate).get("OUTBOX_SCHEMA") == plain_env(sidecar()).get("OUTBOX_SCHEMA")
    # Its pods are neither counted by the budget nor scraped as relays.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not matches(only("PodDisruptionBudget")["spec"]["selector"], job_labels)
    assert not matches(only("PodMonitor")["spec"]["selector"], job_labels)


def test_the_deployment_guide_describes_the_manifests() -> None:
    text = DEPLOYMENT_DOC.read_text("utf-8")
    section = text.split("## Kubernetes sidecar", 1)[1]
    for needle in ("kubectl apply -k deploy/k8s", "restartPolicy: Always", "/readyz"):
        assert needle in section, needle
