"""docker-compose.yml and the Dockerfile are valid and agree with the relay they run.

No Docker engine: the compose file is checked against the compose-spec JSON schema (and by
``docker-compose config`` / ``docker compose config`` when one is on PATH), the Dockerfile
is read as text. The rest holds both to the relay's own rules: every ``OUTBOX_*`` variable
is a real setting with a value its parser accepts, the mounted TOML loads, ports, hosts and
paths line up between the services, and every file the stack mounts or builds from exists
and reaches the build context.
"""

from __future__ import annotations

import copy
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from relay import sample_app
from relay.cli_parser import build_parser
from relay.config import OPTIONS, Settings, load_settings
from relay.db import to_libpq
from tests.harness.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-relay-dashboard.json"
K8S_DEPLOYMENT = ROOT / "deploy" / "k8s" / "deployment.yaml"
OPTION_BY_ENV = {option.env: option for option in OPTIONS}
# The services that run the project's own image.
RELAY_IMAGE_SERVICES = ("migrate", "relay", "orders")
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"  # the prom/prometheus image's default
JOB = "outbox-relay"  # alerts.yml watches up{job="outbox-relay"}

Service = dict[str, Any]


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text("utf-8"))
    return document


COMPOSE_DOC = load_compose()
SERVICES: dict[str, Service] = COMPOSE_DOC["services"]


def service(name: str) -> Service:
    assert name in SERVICES, f"docker-compose.yml has no service {name!r}"
    return SERVICES[name]


def environment(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as compose passes it: map or ``KEY=VALUE`` list."""
    env = svc.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    kind: str  # "bind" or "volume"

    @property
    def host_path(self) -> Path:
        return (ROOT / self.source).resolve()


def mounts(svc: Mapping[str, Any]) -> list[Mount]:
    found = []
    for entry in svc.get("volumes", []):
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            source, target, kind = entry["source"], entry["target"], entry["type"]
        found.append(Mount(source, target, kind))
    return found


def binds(name: str) -> dict[str, Path]:
    """Container path -> file in the repository, for one service's bind mounts."""
    return {m.target: m.host_path for m in mounts(service(name)) if m.kind == "bind"}


def host_file(name: str, container_path: str) -> Path:
    """The repository file a service sees at ``container_path`` (itself or under a mount)."""
    for target, source in binds(name).items():
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / PurePosixPath(container_path).relative_to(target)
    raise AssertionError(f"{name}: nothing is mounted at {container_path}")


def container_ports(svc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``ports`` in the long form, whatever form the file uses."""
    found = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            found.append(entry)
            continue
        parts = str(entry).split(":")
        target = int(parts[-1].split("/")[0])
        published = parts[-2] if len(parts) >= 2 else ""
        found.append({"target": target, "published": published or None})
    return found


def relay_env() -> dict[str, str]:
    return environment(service("relay"))


def relay_settings() -> Settings:
    """What ``outbox-relay run`` in the relay container loads: its env and mounted TOML."""
    env = relay_env()
    env["OUTBOX_CONFIG"] = str(host_file("relay", env["OUTBOX_CONFIG"]))
    return load_settings({}, env)


def metrics_port() -> int:
    port: int = OPTION_BY_ENV["OUTBOX_METRICS_PORT"].parse(relay_env()["OUTBOX_METRICS_PORT"])
    return port


# -- the compose file is valid ---------------------------------------------------------------


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    argv = [str(exe), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_compose_file_validates_against_the_compose_spec() -> None:
    done = check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    """Guards the test above against a validator that accepts anything."""
    broken = copy.deepcopy(COMPOSE_DOC)
    broken["services"]["relay"]["depends_on"]["migrate"]["condition"] = "service_done"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken), "utf-8")
    assert check_jsonschema(path).returncode != 0


def compose_cli() -> list[str] | None:
    """``docker-compose`` (v1, Debian's package) or the ``docker compose`` plugin, if any."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is on PATH")
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_image_is_pinned() -> None:
    for name, svc in SERVICES.items():
        image = svc["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_the_project_image_is_built_here_and_tagged_with_the_version() -> None:
    version = tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]["version"]
    for name in RELAY_IMAGE_SERVICES:
        svc = service(name)
        assert svc["image"] == f"outbox-relay:{version}", name
        build = svc["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE, name


# -- every file the stack uses exists --------------------------------------------------------


def test_every_mounted_file_exists_and_every_volume_is_declared() -> None:
    declared = set(COMPOSE_DOC.get("volumes") or {})
    for name, svc in SERVICES.items():
        for mount in mounts(svc):
            if mount.kind == "bind":
                assert mount.host_path.exists(), f"{name}: {mount.source} does not exist"
                assert mount.host_path.is_relative_to(ROOT), f"{name}: {mount.source}"
            else:
                assert mount.source in declared, f"{name}: volume {mount.source} not declared"
        for env_file in svc.get("env_file", []):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (ROOT / path).is_file(), f"{name}: env_file {path} does not exist"


def test_config_files_are_mounted_read_only() -> None:
    for name, svc in SERVICES.items():
        for entry in svc.get("volumes", []):
            if isinstance(entry, str) and entry.startswith("./"):
                assert entry.endswith(":ro"), f"{name}: {entry} should be read-only"


# -- dependencies and start order ------------------------------------------------------------


def depends(name: str) -> dict[str, str]:
    found = service(name).get("depends_on", {})
    if isinstance(found, list):
        return dict.fromkeys(found, "service_started")
    return {other: spec.get("condition", "service_started") for other, spec in found.items()}


def test_services_start_in_order() -> None:
    assert depends("migrate") == {"postgres": "service_healthy"}
    assert depends("relay") == {
        "migrate": "service_completed_successfully",
        "kafka": "service_healthy",
    }
    assert depends("orders") == {"migrate": "service_completed_successfully"}
    assert depends("grafana") == {"prometheus": "service_healthy"}


def test_every_awaited_health_has_a_healthcheck() -> None:
    for name in SERVICES:
        for other, condition in depends(name).items():
            assert other in SERVICES, f"{name} depends on unknown {other}"
            if condition == "service_healthy":
                check = service(other).get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), other


def test_one_shot_and_app_services_do_not_inherit_the_relays_healthcheck() -> None:
    """The image's HEALTHCHECK probes /healthz of `run`; nothing else serves it."""
    for name in ("migrate", "orders"):
        assert service(name)["healthcheck"] == {"disable": True}, name
    assert "healthcheck" not in service("relay"), "the relay keeps the image's /healthz check"


def test_commands_are_what_the_programs_accept() -> None:
    assert service("migrate")["command"] == ["migrate"]
    assert service("relay")["command"] == ["run"]
    parser = build_parser()
    for name in ("migrate", "relay"):
        parser.parse_args(service(name)["command"])
    orders = service("orders")
    assert orders["entrypoint"] == ["python", "-m", "relay.sample_app"]
    args = sample_app._parser().parse_args(orders["command"])
    assert args.rate > 0 and args.count == 0, "a continuous stream of orders"


# -- the relay's settings ----------------------------------------------------------------------


def test_every_outbox_variable_is_a_setting_with_a_valid_value() -> None:
    for name, svc in SERVICES.items():
        for key, value in environment(svc).items():
            if not key.startswith("OUTBOX_") or key == "OUTBOX_CONFIG":
                continue
            assert key in OPTION_BY_ENV, f"{name}: {key} is not a relay setting"
            OPTION_BY_ENV[key].parse(value)


def test_the_mounted_toml_loads_with_the_relays_environment() -> None:
    settings = relay_settings()
    assert settings.routes, "the stack shows a route from the file"
    assert {route.sink for route in settings.routes} == {"kafka"}
    assert any(route.matches(sample_app.TOPIC) for route in settings.routes)
    assert settings.kafka_bootstrap_servers == relay_env()["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    assert settings.metrics_port == metrics_port() == 9464
    assert settings.database_url == relay_env()["OUTBOX_DATABASE_URL"]


def test_every_service_uses_the_one_database_postgres_serves() -> None:
    urls = {environment(service(name))["OUTBOX_DATABASE_URL"] for name in RELAY_IMAGE_SERVICES}
    assert len(urls) == 1, urls
    url = urlsplit(to_libpq(urls.pop()))
    pg = environment(service("postgres"))
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.username == pg["POSTGRES_USER"]
    assert url.password == pg["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg["POSTGRES_DB"]
    schemas = {environment(service(n)).get("OUTBOX_SCHEMA") for n in RELAY_IMAGE_SERVICES}
    assert len(schemas) == 1, "migrate, relay and the app must agree on the schema"


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> name -> (host, port)."""
    found = {}
    for item in value.split(","):
        name, _, address = item.partition("://")
        host, _, port = address.rpartition(":")
        found[name] = (host, int(port))
    return found


def test_the_relay_reaches_kafka_on_its_advertised_listener() -> None:
    kafka = environment(service("kafka"))
    advertised = listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    bound = listeners(kafka["KAFKA_LISTENERS"])
    for server in relay_env()["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"].split(","):
        host, _, port = server.rpartition(":")
        names = [n for n, address in advertised.items() if address == (host, int(port))]
        assert names, f"{server} is not among the advertised listeners {advertised}"
        assert host == "kafka", "clients in the stack reach the broker by its service name"
        (name,) = names
        assert bound[name][1] == int(port), f"listener {name} does not listen on {port}"
        assert name not in kafka["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    # KRaft, one node: it is its own controller quorum, on the controller listener.
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node, _, voter = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == kafka["KAFKA_NODE_ID"]
    controller = bound[kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]]
    assert voter == f"kafka:{controller[1]}"
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


# -- ports, scraping and scaling -------------------------------------------------------------


def test_the_relay_has_no_fixed_host_port_so_it_scales() -> None:
    relay = service("relay")
    assert "container_name" not in relay, "a fixed container name prevents --scale"
    ports = container_ports(relay)
    assert [p["target"] for p in ports] == [metrics_port()]
    for port in ports:
        assert not port.get("published"), "a fixed host port prevents --scale relay=N"


def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        host_file("prometheus", PROMETHEUS_CONFIG).read_text("utf-8")
    )
    return config


def test_prometheus_scrapes_every_relay_on_the_metrics_port() -> None:
    (job,) = [j for j in prometheus_config()["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert f'up{{job="{JOB}"}}' in ALERTS.read_text("utf-8")
    # DNS discovery: the service name resolves to every replica, so scaling needs no edit.
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["relay"] and sd.get("type", "SRV") == "A"
    assert sd["port"] == metrics_port()


def test_prometheus_loads_the_shipped_alert_rules() -> None:
    config_dir = PurePosixPath(PROMETHEUS_CONFIG).parent
    for rule_file in prometheus_config()["rule_files"]:
        path = config_dir / rule_file
        assert host_file("prometheus", str(path)) == ALERTS.resolve()


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """Checked where the container sees it: every bind mount copied to its target path."""
    promtool = require_binary("promtool")
    for target, source in binds("prometheus").items():
        dest = tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    config = tmp_path / PROMETHEUS_CONFIG.lstrip("/")
    done = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr


def test_grafana_reads_prometheus_from_the_prometheus_service() -> None:
    folder = "/etc/grafana/provisioning/datasources"
    files = sorted(host_file("grafana", folder).glob("*.yml"))
    assert files, "no data source is provisioned"
    sources = [s for f in files for s in yaml.safe_load(f.read_text("utf-8"))["datasources"]]
    (prom,) = sources
    assert prom["type"] == "prometheus" and prom["access"] == "proxy"
    assert prom["isDefault"] is True, "the dashboard's datasource variable picks the default"
    url = urlsplit(prom["url"])
    assert url.hostname == "prometheus" and url.hostname in SERVICES
    assert url.port in [p["target"] for p in container_ports(service("prometheus"))]


def test_grafana_provisions_the_shipped_dashboard() -> None:
    folder = "/etc/grafana/provisioning/dashboards"
    files = sorted(host_file("grafana", folder).glob("*.yml"))
    (provider,) = [p for f in files for p in yaml.safe_load(f.read_text("utf-8"))["providers"]]
    assert provider["type"] == "file"
    dashboards = provider["options"]["path"]
    mounted = [t for t, s in binds("grafana").items() if s == DASHBOARD.resolve()]
    assert mounted and all(PurePosixPath(t).parent == PurePosixPath(dashboards) for t in mounted)
    home = environment(service("grafana"))["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_file("grafana", home) == DASHBOARD.resolve()


def test_the_example_prometheus_config_uses_the_same_port() -> None:
    example = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    targets = yaml.safe_load(example.read_text("utf-8"))["scrape_configs"][0]["static_configs"]
    ports = {int(t.rsplit(":", 1)[1]) for group in targets for t in group["targets"]}
    assert ports == {metrics_port()}


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # -1 before the first FROM


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments and blank lines may sit inside a continuation too
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        found.append(Instruction(keyword, " ".join(args.split()), stage))
        pending = ""
    return found


DOCKER = instructions(DOCKERFILE.read_text("utf-8"))
STAGES = max(i.stage for i in DOCKER) + 1
FINAL = [i for i in DOCKER if i.stage == STAGES - 1]


def final(keyword: str) -> list[str]:
    return [i.args for i in FINAL if i.keyword == keyword]


def exec_form(args: str) -> list[str]:
    loaded = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(loaded, list), f"{args}: not the exec (JSON array) form"
    return [str(item) for item in loaded]


def env_values() -> dict[str, str]:
    """``ENV`` of the final stage (``KEY=VALUE`` pairs)."""
    found = {}
    for args in final("ENV"):
        for pair in re.findall(r"(\w+)=(\S+)", args):
            found[pair[0]] = pair[1]
    return found


def global_args() -> dict[str, str]:
    found = {}
    for i in DOCKER:
        if i.stage == -1 and i.keyword == "ARG":
            name, _, default = i.args.partition("=")
            found[name] = default
    return found


def test_the_image_is_multi_stage_on_slim_python() -> None:
    froms = [i.args for i in DOCKER if i.keyword == "FROM"]
    assert len(froms) >= 2
    names = [f.split()[-1] for f in froms if " AS " in f.upper()]
    base = froms[-1].split()[0]
    for name, default in global_args().items():
        base = base.replace("${" + name + "}", default).replace("$" + name, default)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base
    for args in final("COPY"):
        source = re.search(r"--from=(\S+)", args)
        if source:
            assert source[1] in names[:-1], f"COPY --from={source[1]}: no such earlier stage"


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    users = final("USER")
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric, so Kubernetes can verify runAsNonRoot"
    if K8S_DEPLOYMENT.exists():
        docs = list(yaml.safe_load_all(K8S_DEPLOYMENT.read_text("utf-8")))
        run_as = {
            str(d["spec"]["template"]["spec"]["securityContext"].get("runAsUser"))
            for d in docs
            if d and d.get("kind") == "Deployment"
        }
        assert run_as <= {user, "None"}, f"deploy/k8s runs as {run_as}, the image as {user}"


def test_entrypoint_is_the_console_script_and_run_the_default() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]["scripts"]
    assert exec_form(final("ENTRYPOINT")[-1]) == ["outbox-relay"]
    assert "outbox-relay" in scripts
    assert exec_form(final("CMD")[-1]) == ["run"]


def test_the_metrics_port_is_exposed_set_and_probed() -> None:
    env = env_values()
    port = OPTION_BY_ENV["OUTBOX_METRICS_PORT"].parse(env["OUTBOX_METRICS_PORT"])
    for key, value in env.items():
        if key.startswith("OUTBOX_"):
            OPTION_BY_ENV[key].parse(value)
    assert final("EXPOSE") == [str(port)]
    assert port == metrics_port()
    (check,) = final("HEALTHCHECK")
    assert "/healthz" in check and "/readyz" not in check
    command = exec_form(check.split(" CMD ", 1)[1])
    assert command[0] == "python", "no curl or wget in a slim image"
    assert "urllib" in command[-1]
    assert "OUTBOX_METRICS_PORT" in command[-1] and f"'{port}'" in command[-1]
    assert re.search(r"--start-period=\d+s", check)


def test_the_healthcheck_script_is_valid_python() -> None:
    (check,) = final("HEALTHCHECK")
    compile(exec_form(check.split(" CMD ", 1)[1])[-1], "HEALTHCHECK", "exec")


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH")
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the build context ---------------------------------------------------------------------------


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) pairs, in file order."""
    rules = []
    for raw in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().strip("/"))
        rules.append((negated, re.compile(glob_regex(pattern))))
    return rules


def glob_regex(pattern: str) -> str:
    """Docker's ignore-file globs: ``**`` any depth, ``*`` and ``?`` within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


RULES = ignore_rules()


def excluded(path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last rule matching it, or one of
    its parent directories, decides."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negated, rule in RULES:
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


def context_files(path: Path) -> Iterator[str]:
    if path.is_file():
        yield path.relative_to(ROOT).as_posix()
        return
    for found in sorted(path.rglob("*")):
        if found.is_file() and "__pycache__" not in found.parts:
            yield found.relative_to(ROOT).as_posix()


def copy_sources() -> list[str]:
    sources = []
    for i in DOCKER:
        if i.keyword in {"COPY", "ADD"} and "--from=" not in i.args:
            words = [w for w in i.args.split() if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


def test_every_copy_source_exists_and_reaches_the_context() -> None:
    sources = copy_sources()
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = list(context_files(path))
        assert files, f"COPY {source}: empty"
        left_out = [f for f in files if excluded(f)]
        assert not left_out, f"COPY {source}: .dockerignore excludes {left_out[:3]}"


def test_the_context_holds_everything_the_wheel_is_built_from() -> None:
    project = tomllib.loads(PYPROJECT.read_text("utf-8"))
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", project["project"]["readme"], *wheel["packages"]]
    needed += list(wheel.get("force-include", {}))
    copied = [PurePosixPath(s.rstrip("/")) for s in copy_sources()]
    for item in needed:
        path = PurePosixPath(item)
        assert any(path == c or c in path.parents for c in copied), f"{item} is not copied"
        assert not any(excluded(f) for f in context_files(ROOT / item)), item
    assert not excluded("relay/sample_app.py"), "the same image runs the sample app"


def test_the_context_leaves_out_what_the_image_does_not_need() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "docs/index.md",
                 "relay/__pycache__/app.cpython-311.pyc", "bench-results/x.json",
                 "deploy/k8s/deployment.yaml", ".env"):  # fmt: skip
        assert excluded(path), f"{path} would be sent to the builder"


def test_the_ignore_matcher_follows_docker_rules() -> None:
    """Guards the two tests above against a matcher that includes or excludes everything."""
    assert re.fullmatch(glob_regex("**/__pycache__"), "__pycache__")
    assert re.fullmatch(glob_regex("**/__pycache__"), "a/b/__pycache__")
    assert not re.fullmatch(glob_regex("*"), "a/b")
    assert re.fullmatch(glob_regex("*.py[cod]"), "x.pyc")
    assert not excluded("outbox_lib/__init__.py")
    assert excluded("Makefile")


# -- the guide -----------------------------------------------------------------------------------


def guide_section(heading: str) -> str:
    text = (ROOT / "docs" / "deployment.md").read_text("utf-8")
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_guide_describes_the_stack_and_the_image() -> None:
    compose = guide_section("docker-compose")
    for name, svc in SERVICES.items():
        assert f"`{name}`" in compose and f"`{svc['image']}`" in compose, name
    for needle in ("docker compose up", "--scale relay=3", "localhost:3000", "localhost:9090"):
        assert needle in compose, needle
    image = guide_section("Docker image")
    user = final("USER")[-1].split(":")[0]
    for needle in (user, "/healthz", str(metrics_port()), "manylinux"):
        assert needle in image, needle
