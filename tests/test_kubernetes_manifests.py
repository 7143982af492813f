"""The Kubernetes deployment files: docker/kubernetes, docker/kserve and the Helm chart docker/helm/pagedserve.

Offline: the objects against the Kubernetes schemas that kubernetes-validate carries (strict), yamllint, helm lint,
and against the code they configure (the launcher's ports, the entrypoint's variables, the exported metrics, the
model-config checks). The chart is rendered once per values file.
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

from handler.config import handler_config
from handler.launcher import parser, split_engine_overrides
from handler.metrics import LLM_METRICS

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
MANIFESTS = DOCKER / "kubernetes"
KSERVE = DOCKER / "kserve"
CHART = DOCKER / "helm" / "pagedserve"
VALUES_FILES = {"default": None, "gpu-tp4": CHART / "values-gpu-tp4.yaml"}
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = latest_version()
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
# InferenceService predictor.model fields that are KServe's, not a Container's.
KSERVE_MODEL_KEYS = ("modelFormat", "runtime", "storageUri", "protocolVersion")
IMAGE_ROOT = "/opt/pagedserve/"  # where the images hold the repository's files
CONFIG_KEY = "model-config.yaml"
PLACEHOLDER_KEY = "change-me"
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def run_tool(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("helm", "template", "pagedserve", str(CHART), *args)


def kustomization_files() -> list[Path]:
    return [MANIFESTS / name for name in load_yaml(MANIFESTS / "kustomization.yaml")["resources"]]


def plain_objects() -> list[dict[str, Any]]:
    return [doc for path in kustomization_files() for doc in documents(path.read_text())]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def pod_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def model_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(objects, "ConfigMap")["data"][CONFIG_KEY])


def runtime() -> dict[str, Any]:
    return load_yaml(KSERVE / "cluster-serving-runtime.yaml")


def inference_service() -> dict[str, Any]:
    return load_yaml(KSERVE / "inference-service.yaml")


def runtime_container() -> dict[str, Any]:
    (container,) = runtime()["spec"]["containers"]
    return container


def isvc_container() -> dict[str, Any]:
    """The InferenceService's overrides of the runtime's container, as a Container."""
    model = inference_service()["spec"]["predictor"]["model"]
    return {"name": runtime_container()["name"], **{k: v for k, v in model.items() if k not in KSERVE_MODEL_KEYS}}


@pytest.fixture(scope="module")
def renderings() -> dict[str, list[dict[str, Any]]]:
    """The chart's objects per values file."""
    return {name: documents(render(path)) for name, path in VALUES_FILES.items()}


@functools.cache
def render(values: Path | None) -> str:
    result = helm_template(*(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def core_registry() -> Registry:
    version = KUBERNETES_VERSION
    definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return Resource.from_contents(definitions) @ Registry()


def validate_core(value: Any, definition: str) -> None:
    """Validate `value` against the strict schema of io.k8s.api.core.v1.`definition`."""
    schema = {"$ref": f"{DEFINITIONS_ID}#/$defs/io.k8s.api.core.v1.{definition}"}
    jsonschema.Draft202012Validator(schema, registry=core_registry()).validate(value)


def pod_specs(renderings: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for objects in [plain_objects(), *renderings.values()]:
        yield by_kind(objects, "Deployment")["spec"]["template"]["spec"]


def all_containers(renderings: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for spec in pod_specs(renderings):
        yield from spec["containers"]
    yield runtime_container()
    yield isvc_container()


def test_kustomization_lists_every_manifest() -> None:
    listed = {path.name for path in kustomization_files()}
    assert listed == {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def test_manifests_validate_strictly() -> None:
    for obj in plain_objects():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUES_FILES)
def test_chart_renderings_validate_strictly(renderings: dict[str, list[dict[str, Any]]], values: str) -> None:
    assert {obj["kind"] for obj in renderings[values]} == {obj["kind"] for obj in plain_objects()}
    for obj in renderings[values]:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_kserve_runtime() -> None:
    spec = runtime()["spec"]
    assert (runtime()["apiVersion"], runtime()["kind"]) == ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    assert runtime_container()["name"] == "kserve-container"
    assert env(runtime_container())["PAGEDSERVE_MODEL"] == "/mnt/models"
    args, overrides = split_engine_overrides(parser(), runtime_container()["args"])
    assert args.model_name == "{{.Name}}" and overrides == {}  # KServe puts the InferenceService's name there
    assert [port["containerPort"] for port in runtime_container()["ports"]] == [parser().get_default("inference_port")]
    assert all(fmt["name"] and fmt["version"] for fmt in spec["supportedModelFormats"])
    validate_core(runtime_container(), "Container")
    for volume in spec["volumes"]:
        validate_core(volume, "Volume")


def test_kserve_inference_service_uses_the_runtime_on_gpus() -> None:
    isvc = inference_service()
    model = isvc["spec"]["predictor"]["model"]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime()["spec"]["supportedModelFormats"]}
    assert model["storageUri"].startswith("pvc://")
    validate_core(isvc_container(), "Container")


def test_kserve_multi_gpu_config_is_custom_parallel() -> None:
    """The model-config the InferenceService names (a file of the image) spans all of its GPUs."""
    resources, variables = isvc_container()["resources"], env(isvc_container())
    gpus = int(resources["limits"][GPU])
    assert int(resources["requests"][GPU]) == gpus > 1
    config = load_yaml(ROOT / variables["PAGEDSERVE_CONFIG"].removeprefix(IMAGE_ROOT))
    assert (config["deviceType"], config["parallelType"], config["parallelLevel"]) == ("gpu", "custom", gpus)
    assert int(variables["PAGEDSERVE_TENSOR_PARALLEL_SIZE"]) == gpus
    handler_config(config)


def test_yamllint_plain_files() -> None:
    paths = [str(path.relative_to(ROOT)) for path in (MANIFESTS, KSERVE, CHART)]
    result = run_tool("yamllint", "--strict", "-c", "docker/.yamllint.yaml", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES_FILES)
def test_yamllint_rendered_chart(values: str) -> None:
    result = run_tool("yamllint", "--strict", "-c", "docker/.yamllint.yaml", "-", stdin=render(VALUES_FILES[values]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES_FILES)
def test_helm_lint(values: str) -> None:
    path = VALUES_FILES[values]
    result = run_tool("helm", "lint", "--strict", str(CHART), *(["-f", str(path)] if path else []))
    assert result.returncode == 0, result.stdout + result.stderr


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with a ConfigMap's model-config YAML parsed, so that comments and key order do not count."""
    if obj["kind"] != "ConfigMap":
        return obj
    return {**obj, "data": {CONFIG_KEY: yaml.safe_load(obj["data"][CONFIG_KEY])}}


def test_default_rendering_equals_the_manifests(renderings: dict[str, list[dict[str, Any]]]) -> None:
    def keyed(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(obj["kind"], obj["metadata"]["name"]): comparable(obj) for obj in objects}

    rendered, plain = keyed(renderings["default"]), keyed(plain_objects())
    assert rendered.keys() == plain.keys()
    for key, obj in plain.items():
        assert rendered[key] == obj, key


def test_ports_are_the_launcher_defaults(renderings: dict[str, list[dict[str, Any]]]) -> None:
    defaults = parser().parse_args([])
    ports = {"http": defaults.inference_port, "metrics": defaults.metrics_port}
    for objects in [plain_objects(), *renderings.values()]:
        container = pod_container(objects)
        assert {port["name"]: port["containerPort"] for port in container["ports"]} == ports
        assert {port["name"]: port["port"] for port in by_kind(objects, "Service")["spec"]["ports"]} == ports
        annotations = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_probes(renderings: dict[str, list[dict[str, Any]]]) -> None:
    """Startup and readiness wait for a READY model, liveness is /ping; startup covers the startup timeout."""
    for objects in [plain_objects(), *renderings.values()]:
        container = pod_container(objects)
        ready = ["python", "-m", "handler.health_check", "--ready"]
        assert container["startupProbe"]["exec"]["command"] == container["readinessProbe"]["exec"]["command"] == ready
        assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
        timeout = model_config(objects)["startupTimeout"]
        assert int(env(container)["PAGEDSERVE_STARTUP_TIMEOUT"]) == timeout
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] > timeout


def test_env_names_are_the_entrypoints(renderings: dict[str, list[dict[str, Any]]]) -> None:
    """The entrypoint refuses a PAGEDSERVE_* variable it does not know."""
    script = (DOCKER / "entrypoint.sh").read_text()
    known = set(re.findall(r"\bPAGEDSERVE_[A-Z0-9_]*[A-Z0-9]\b", script))
    for container in all_containers(renderings):
        for name in env(container):
            assert name in known or (name.startswith("PAGEDSERVE_ENGINE_") and "PAGEDSERVE_ENGINE_" in script), name


def test_service_links_are_off(renderings: dict[str, list[dict[str, Any]]]) -> None:
    """Service links would add variables such as PAGEDSERVE_SERVICE_HOST, which the entrypoint refuses."""
    for spec in pod_specs(renderings):
        assert spec["enableServiceLinks"] is False
    assert inference_service()["spec"]["predictor"]["enableServiceLinks"] is False


def mounted_file(spec: dict[str, Any], volume_kind: str, key: str) -> str:
    (volume,) = [volume for volume in spec["volumes"] if volume_kind in volume]
    (mount,) = [mount for mount in spec["containers"][0]["volumeMounts"] if mount["name"] == volume["name"]]
    return f"{mount['mountPath']}/{key}"


def test_config_and_keys_are_the_mounted_files(renderings: dict[str, list[dict[str, Any]]]) -> None:
    for spec in pod_specs(renderings):
        variables = env(spec["containers"][0])
        assert variables["PAGEDSERVE_CONFIG"] == mounted_file(spec, "configMap", CONFIG_KEY)
        assert variables["PAGEDSERVE_API_KEY_FILE"] == mounted_file(spec, "secret", "api-keys")
    run_spec = {**runtime()["spec"], "containers": [runtime_container()]}
    assert env(runtime_container())["PAGEDSERVE_API_KEY_FILE"] == mounted_file(run_spec, "secret", "api-keys")


def test_shared_memory_is_memory(renderings: dict[str, list[dict[str, Any]]]) -> None:
    for spec in [*pod_specs(renderings), {**runtime()["spec"], "containers": [runtime_container()]}]:
        (mount,) = [mount for mount in spec["containers"][0]["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
        (volume,) = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"


def test_model_configs_pass_the_handler_checks(renderings: dict[str, list[dict[str, Any]]]) -> None:
    for objects in [plain_objects(), *renderings.values()]:
        config = model_config(objects)
        handler_config(config)
        template = config["handler"].get("chat_template")
        assert template is None or (ROOT / template.removeprefix(IMAGE_ROOT)).is_file()


def test_cpu_config_is_the_default_models() -> None:
    """The ConfigMap holds model-config/smollm2-135m-cpu.yaml's settings, the chat template by its image path."""
    expected = load_yaml(ROOT / "model-config" / "smollm2-135m-cpu.yaml")
    handler = {key: value for key, value in expected["handler"].items() if value is not None}
    handler["chat_template"] = IMAGE_ROOT + "model-config/" + handler["chat_template"]
    assert model_config(plain_objects()) == {**expected, "handler": handler}


def test_gpu_rendering_spans_its_gpus(renderings: dict[str, list[dict[str, Any]]]) -> None:
    values, objects = load_yaml(VALUES_FILES["gpu-tp4"]), renderings["gpu-tp4"]
    container, config = pod_container(objects), model_config(objects)
    assert int(container["resources"]["limits"][GPU]) == values["gpus"] == values["tensorParallelSize"] > 1
    assert (config["deviceType"], config["parallelType"], config["parallelLevel"]) == ("gpu", "custom", values["gpus"])
    assert container["image"].endswith("-gpu")
    assert env(container)["PAGEDSERVE_MODEL"] == values["model"]["id"]
    volumes = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": values["model"]["pvc"], "readOnly": True} in [v.get("persistentVolumeClaim") for v in volumes]


def test_gpu_rendering_is_the_tp4_example(renderings: dict[str, list[dict[str, Any]]]) -> None:
    """model-config/llama-3.1-70b-gpu-tp4.yaml, its model given by model.id instead."""
    expected = load_yaml(ROOT / "model-config" / "llama-3.1-70b-gpu-tp4.yaml")
    expected["handler"].pop("model")
    assert model_config(renderings["gpu-tp4"]) == expected


def test_tensor_parallel_size_above_gpus_fails() -> None:
    result = helm_template("--set", "gpus=2", "--set", "tensorParallelSize=4")
    assert result.returncode != 0
    assert "tensorParallelSize (4) is more than gpus (2)" in result.stderr


def test_hpa_scales_the_deployment_on_an_exported_metric() -> None:
    objects = plain_objects()
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind(objects, "Deployment")["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in LLM_METRICS


def test_secret_holds_only_a_placeholder() -> None:
    secret = by_kind(plain_objects(), "Secret")
    assert "data" not in secret and secret["stringData"] == {"api-keys": PLACEHOLDER_KEY}
    assert load_yaml(CHART / "values.yaml")["apiKey"]["value"] == PLACEHOLDER_KEY
