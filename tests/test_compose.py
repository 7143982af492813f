"""docker/compose.yaml without a Docker engine: its services, ports and volumes against the launcher's defaults and
the repo, the Prometheus target, Grafana's provisioning of the shipped dashboard, and yamllint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from handler.launcher import parser

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
PROVISIONING = DOCKER / "grafana" / "provisioning"
DASHBOARD = DOCKER / "grafana" / "pagedserve-dashboard.json"
KEY_DIR = "/var/lib/pagedserve/keys"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def launcher_default(flag: str) -> int:
    return parser().get_default(flag)


def published(name: str) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of a service's published ports."""
    ports = []
    for spec in service(name).get("ports", []):
        address, host, container = str(spec).split(":")
        ports.append((address, int(host), int(container)))
    return ports


def volumes(name: str) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's short-syntax volumes."""
    return [tuple((spec.split(":") + [""])[:3]) for spec in service(name).get("volumes", [])]


def host_path(name: str, target: str) -> Optional[Path]:
    """The repo path that a service's bind mount puts at `target` (or at a folder above it)."""
    for source, mounted, _ in volumes(name):
        if source.startswith(".") and PurePosixPath(target).is_relative_to(mounted):
            return (DOCKER / source / PurePosixPath(target).relative_to(mounted)).resolve()
    return None


def provisioning(kind: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted((PROVISIONING / kind).glob("*.yaml"))]


def datasource_uids(node: Any) -> set[str]:
    """The `datasource.uid` values anywhere in a dashboard."""
    if isinstance(node, list):
        return set().union(*map(datasource_uids, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    own = {node["datasource"]["uid"]} if isinstance(node.get("datasource"), dict) else set()
    return own.union(*map(datasource_uids, node.values()))


def test_the_services_are_pagedserve_prometheus_and_grafana() -> None:
    assert set(compose()["services"]) == {"pagedserve", "prometheus", "grafana"}


def test_pagedserve_builds_the_cpu_image_with_the_torch_index_from_the_environment() -> None:
    pagedserve = service("pagedserve")
    build = pagedserve["build"]
    assert (DOCKER / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    assert re.fullmatch(r"\$\{TORCH_INDEX_URL(:-)?\}", build["args"]["TORCH_INDEX_URL"])
    assert pagedserve["image"] == "pagedserve:0.1.0-cpu"
    assert "healthcheck" not in pagedserve  # the image's HEALTHCHECK applies
    assert pagedserve["stop_grace_period"]


def test_pagedserve_publishes_the_launchers_inference_and_metrics_ports_on_loopback() -> None:
    expected = {launcher_default("inference_port"), launcher_default("metrics_port")}
    assert {(host, container) for _, host, container in published("pagedserve")} == {(p, p) for p in expected}


def test_every_port_is_published_on_the_hosts_loopback_only() -> None:
    for name in compose()["services"]:
        assert {address for address, _, _ in published(name)} == {"127.0.0.1"}, name


def test_other_images_have_exact_tags() -> None:
    for name in ("prometheus", "grafana"):
        tag = service(name)["image"].rpartition(":")[2]
        assert tag != "latest" and re.search(r"\d", tag), name


def test_named_volumes_are_declared_and_bind_sources_exist() -> None:
    declared = set(compose().get("volumes") or {})
    for name in compose()["services"]:
        for source, target, _ in volumes(name):
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: {source}"
            assert target.startswith("/"), f"{name}: {target}"


def test_pagedserve_keeps_its_keys_in_a_named_volume_and_reads_models_read_only() -> None:
    mounts = {target: (source, mode) for source, target, mode in volumes("pagedserve")}
    assert not mounts[KEY_DIR][0].startswith(".")
    assert mounts["/models"][1] == "ro"


def test_prometheus_scrapes_the_pagedserve_service_on_the_metrics_port() -> None:
    assert host_path("prometheus", "/etc/prometheus/prometheus.yml") == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"pagedserve:{launcher_default('metrics_port')}"]
    assert "pagedserve" in service("prometheus")["depends_on"]


def test_grafanas_provisioned_datasource_is_the_compose_prometheus() -> None:
    assert host_path("grafana", "/etc/grafana/provisioning") == PROVISIONING
    [datasource] = [source for file in provisioning("datasources") for source in file["datasources"]]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    prometheus_port = service("prometheus")["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"


def test_grafanas_dashboard_provider_loads_the_shipped_dashboard() -> None:
    [provider] = [each for file in provisioning("dashboards") for each in file["providers"]]
    folder = provider["options"]["path"]
    assert host_path("grafana", f"{folder}/{DASHBOARD.name}") == DASHBOARD
    assert DASHBOARD.is_file()


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    [datasource] = [source for file in provisioning("datasources") for source in file["datasources"]]
    dashboard = json.loads(DASHBOARD.read_text())
    [variable] = [each for each in dashboard["templating"]["list"] if each["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == datasource["uid"]
    assert datasource_uids(dashboard) == {f"${{{variable['name']}}}", "-- Grafana --"}


def test_yamllint_passes() -> None:
    yamllint = Path(sys.executable).parent / "yamllint"
    files = [COMPOSE, PROMETHEUS, *sorted(PROVISIONING.rglob("*.yaml"))]
    result = subprocess.run(
        [str(yamllint), "--strict", "-c", str(DOCKER / ".yamllint.yaml"), *map(str, files)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
