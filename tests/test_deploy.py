"""deploy/kubernetes: the manifests validate offline against the Kubernetes schemas, render with kustomize,
and agree with the service they run: probe paths are real routes, DERMASEG_* names are real settings.

``kubectl kustomize`` renders where kubectl is installed; elsewhere a small renderer that does only what
these kustomizations use (labels with selectors, image tags, strategic-merge patches) stands in, and where
kubectl is there the two are compared, so the stand-in cannot drift. KServe's resources are custom
resources that ``kubernetes-validate`` has no schema for: their container is validated as a Pod's, and the
rest is checked field by field.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.main import GRACEFUL_SHUTDOWN_S, create_app

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra"
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
GPU = DEPLOY / "overlays" / "gpu"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
UID = 10001


# --- rendering ----------------------------------------------------------------------------------------------


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these patches: maps merged, lists of named maps by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in patch)
    ):
        by_name = {item["name"]: item for item in base if isinstance(item, dict) and "name" in item}
        patched = [_merge(by_name[item["name"]], item) if item["name"] in by_name else item for item in patch]
        names = {item["name"] for item in patch}
        return patched + [item for item in base if not (isinstance(item, dict) and item.get("name") in names)]
    return patch


def _label(resource: dict[str, Any], labels: dict[str, str]) -> None:
    resource.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    spec = resource.get("spec", {})
    if resource["kind"] == "Deployment":
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
        spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    elif resource["kind"] == "Service":
        spec.setdefault("selector", {}).update(labels)
    # kustomize adds to these selectors but never creates them (a missing one would select every pod).
    elif resource["kind"] == "PodDisruptionBudget" and "selector" in spec:
        spec["selector"]["matchLabels"].update(labels)
    elif resource["kind"] == "NetworkPolicy" and "podSelector" in spec:
        spec["podSelector"]["matchLabels"].update(labels)


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize directory`` gives for the features these kustomizations use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text())))
    for label_set in kustomization.get("labels", []):
        assert label_set.get("includeSelectors"), "the renderer only knows labels with selectors"
        for resource in resources:
            _label(resource, label_set["pairs"])
    for patch_entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        for index, resource in enumerate(resources):
            if (resource["kind"], resource["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"]):
                resources[index] = _merge(resource, patch)
    for image in kustomization.get("images", []):
        for resource in resources:
            for container in (
                resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            ):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return resources


def by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {resource["kind"]: resource for resource in resources}


def container_of(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = by_kind(resources)["Deployment"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _canonical(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def normalize(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: normalize(item) for key, item in value.items()}
        if isinstance(value, list):
            items = [normalize(item) for item in value]
            if all(isinstance(item, dict) and "name" in item for item in items):
                return sorted(items, key=lambda item: item["name"])
            return items
        return value

    return sorted((normalize(r) for r in resources), key=lambda r: (r["kind"], r["metadata"]["name"]))


# --- the service's truth ------------------------------------------------------------------------------------


def app_get_paths() -> set[str]:
    """The app's GET routes (from its OpenAPI document: FastAPI includes routers lazily)."""
    paths = create_app(Settings.model_construct()).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def setting_env_names() -> set[str]:
    """Every environment name a Settings field is read from."""
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"DERMASEG_{name.upper()}")
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []):
            if isinstance(choice, str) and choice.startswith("DERMASEG_"):
                names.add(choice)
    return names


def check_settings_parse(env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The manifest's DERMASEG_* values are valid settings (read the way the service reads them)."""
    names = setting_env_names()
    for name in [key for key in __import__("os").environ if key.startswith("DERMASEG_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("DERMASEG_"):
            assert name in names, f"{name} is not a setting of service/config.py"
            if value is not None:
                monkeypatch.setenv(name, value)
    return Settings()


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [BASE, GPU], ids=["base", "gpu"])
def test_rendered_manifests_validate_strictly(directory: Path) -> None:
    resources = render(directory)
    assert {r["kind"] for r in resources} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"
    }  # fmt: skip
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (Debian has no package)"
)
@pytest.mark.parametrize("directory", [BASE, GPU], ids=["base", "gpu"])
def test_kubectl_kustomize_renders_what_the_tests_check(directory: Path) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    resources = list(yaml.safe_load_all(rendered))
    for resource in resources:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
    assert _canonical(resources) == _canonical(render(directory))


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    """The validation above has teeth: a misspelt field fails it."""
    deployment = by_kind(render(BASE))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


# --- the base against the service ---------------------------------------------------------------------------


def test_probes_ports_and_env_match_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = render(BASE)
    container = container_of(resources)
    paths = app_get_paths()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live" in paths
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready" in paths
    (port,) = container["ports"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    settings = check_settings_parse(env_of(container), monkeypatch)
    assert settings.port == port["containerPort"]
    assert settings.host == "0.0.0.0"
    assert str(settings.model_path) == "/app/models/dermaseg.onnx"
    assert settings.providers == ["cpu"]
    # The pod's CPUs are shared out explicitly: slots × threads = the CPU limit.
    cpus = int(container["resources"]["limits"]["cpu"])
    assert settings.max_concurrency * settings.resolved_intra_op_threads() == cpus
    service = by_kind(resources)["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    api_keys = next(item for item in container["env"] if item["name"] == "DERMASEG_API_KEYS")
    assert api_keys["valueFrom"]["secretKeyRef"]["optional"] is True


def test_security_context_matches_the_image_and_compose() -> None:
    resources = render(BASE)
    pod = by_kind(resources)["Deployment"]["spec"]["template"]["spec"]
    container = container_of(resources)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"--uid {UID}\b", dockerfile) and f"USER {UID}" in dockerfile
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/tmp"
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and "emptyDir" in volume
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-dermaseg"]
    assert compose["read_only"] is True and compose["cap_drop"] == ["ALL"]
    assert any(entry.startswith("/tmp") for entry in compose["tmpfs"])


def test_grace_period_covers_draining() -> None:
    resources = render(BASE)
    pod = by_kind(resources)["Deployment"]["spec"]["template"]["spec"]
    pause = container_of(resources)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + GRACEFUL_SHUTDOWN_S


def test_selectors_and_targets_agree() -> None:
    kinds = by_kind(render(BASE))
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert kinds["Service"]["spec"]["selector"] == labels
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert kinds["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"] == labels
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", kinds["Deployment"]["metadata"]["name"])
    (metric,) = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    assert [peer.keys() for peer in rule["from"]] == [{"namespaceSelector": None}.keys()]


def test_gpu_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    container = container_of(render(GPU))
    assert container["image"].endswith(":gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    settings = check_settings_parse(env_of(container), monkeypatch)
    assert settings.providers == ["cuda", "cpu"]
    assert settings.require_providers is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True  # kept from the base


# --- KServe -------------------------------------------------------------------------------------------------


def test_kserve_inference_service(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(KSERVE.read_text())}
    runtime, service = documents["ServingRuntime"], documents["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert "v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    # No schema for KServe's resources: the container is checked as a Pod's, strictly.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": [container]},
    }
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    settings = check_settings_parse(env_of(container), monkeypatch)
    (port,) = container["ports"]
    assert settings.port == port["containerPort"] == container["readinessProbe"]["httpGet"]["port"]
    paths = app_get_paths()
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live" in paths
    assert container["securityContext"]["runAsUser"] == UID
    assert container["image"].split(":")[0] == container_of(render(BASE))["image"].split(":")[0]

    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    assert predictor["scaleMetric"] == "concurrency"
    assert predictor["scaleTarget"] == settings.max_concurrency
    assert predictor["containerConcurrency"] == settings.max_concurrency + settings.max_queued
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
