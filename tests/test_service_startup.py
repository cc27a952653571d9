"""Start-up and configuration: the model is loaded once, failures are one clear line, settings come from
the environment, a required provider that is not in use means not ready, and no TensorFlow is imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import onnxruntime
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.types import Message

from bench.http_load import free_port
from service.config import DEFAULT_MODEL_PATH, Settings
from service.inference import ModelLoadError
from service.main import create_app
from service.observability import Metrics
from service.routes.deps import NOT_LOADED, InferenceLimiter
from tests.conftest import serving
from tests.onnx_models import write_darkness_model, write_not_a_dermaseg_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "samples" / "images" / "ISIC_0009995.jpg"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_darkness_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this one without DERMASEG_* and PORT, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMASEG_") and k != "PORT"}
    env.update(extra)
    return env


# --- start-up failures -------------------------------------------------------------------------------


def _corrupt_model(folder: Path) -> Path:
    path = folder / "corrupt.onnx"
    path.write_bytes(b"\x08\x07 not an onnx model" * 50)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder / "missing.onnx", "model file not found"),
        (_corrupt_model, "cannot load model"),
        (lambda folder: write_not_a_dermaseg_model(folder / "vector.onnx"), "is not a DermaSeg model"),
    ],
)
def test_a_bad_model_stops_the_start_up(tmp_path: Path, make: Any, message: str) -> None:
    path = make(tmp_path)
    app = create_app(Settings(model_path=path))  # building the app never touches the model
    with pytest.raises(ModelLoadError, match=message), TestClient(app):
        pass
    assert app.state.not_ready_reason == NOT_LOADED


def test_start_up_failure_is_reported_in_one_line(tmp_path: Path) -> None:
    app = create_app(Settings(model_path=tmp_path / "missing.onnx"))
    sent: list[Message] = []

    async def lifespan() -> None:
        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        async def send(message: Message) -> None:
            sent.append(message)

        with pytest.raises(ModelLoadError):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    anyio.run(lifespan)
    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    reason = sent[0]["message"]
    assert reason == f"cannot start DermaSeg: model file not found: {tmp_path / 'missing.onnx'}"


def test_serve_exits_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "service.main", "--model", str(missing), "--port", "1"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot start DermaSeg: model file not found: {missing}" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_settings_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.main"],
        cwd=REPO,
        env=clean_env(DERMASEG_MAX_CONCURRENCY="none"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid settings" in result.stderr
    assert "max_concurrency" in result.stderr


# --- providers -------------------------------------------------------------------------------------


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_required_but_not_in_use_is_not_ready(model_path: Path) -> None:
    settings = Settings(model_path=model_path, providers=["cuda"], require_providers=True)
    with serving(create_app(settings)) as client:
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "not_ready"
        assert body["providers"] == ["CPUExecutionProvider"]
        assert body["requested_providers"] == ["cuda"]
        assert body["fallback"] is True
        assert "CUDAExecutionProvider was required" in body["reason"]
        refused = client.post("/segment", files={"file": ("a.png", b"\x89PNG", "image/png")})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"
        # The card still says what runs where, for whoever investigates.
        assert client.get("/v1/model").json()["providers"] == ["CPUExecutionProvider"]
        metrics = client.get("/metrics").text
        assert "dermaseg_ready 0.0" in metrics
        assert "dermaseg_provider_fallback 1.0" in metrics
        assert 'fallback="true"' in metrics and 'requested_providers="cuda"' in metrics


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_wanted_but_not_required_falls_back_to_cpu(model_path: Path) -> None:
    settings = Settings(model_path=model_path, providers=["cuda", "cpu"])
    with serving(create_app(settings)) as client:
        body = client.get("/health/ready").json()
        assert body["status"] == "ready"
        assert body["providers"] == ["CPUExecutionProvider"]
        assert body["requested_providers"] == ["cuda", "cpu"]
        assert body["fallback"] is True
        metrics = client.get("/metrics").text
        assert "dermaseg_ready 1.0" in metrics
        assert "dermaseg_provider_fallback 1.0" in metrics
        assert 'providers="CPUExecutionProvider"' in metrics and 'fallback="true"' in metrics
        assert client.post("/segment", files={"file": ("a.png", _gray_png(), "image/png")}).status_code == 200


def test_cpu_asked_for_is_no_fallback(model_path: Path) -> None:
    with serving(create_app(Settings(model_path=model_path))) as client:
        assert client.get("/health/ready").json()["fallback"] is False
        assert "dermaseg_provider_fallback 0.0" in client.get("/metrics").text


# --- settings --------------------------------------------------------------------------------------


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DERMASEG_") or name == "PORT":
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model_path == REPO / "models" / "dermaseg.onnx" == DEFAULT_MODEL_PATH
    assert settings.providers == ["cpu"]
    assert settings.require_providers is False
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_pixels == 50_000_000
    assert settings.api_keys == []
    assert settings.cors_origins == []
    assert settings.docs is False
    assert settings.upload_timeout_s == 30.0
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DERMASEG_MODEL_PATH", "models/other.onnx")
    monkeypatch.setenv("DERMASEG_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("DERMASEG_REQUIRE_PROVIDERS", "true")
    monkeypatch.setenv("DERMASEG_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("DERMASEG_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("DERMASEG_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("DERMASEG_LOG_LEVEL", "debug")
    monkeypatch.setenv("PORT", "9123")
    settings = Settings()
    assert settings.model_path == tmp_path / "models" / "other.onnx"  # relative: from the current folder
    assert settings.providers == ["cuda", "cpu"]
    assert settings.require_providers is True
    assert settings.api_key_bytes() == [b"k1", b"k2"]
    assert "k1" not in repr(settings)
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.max_upload_bytes == 1000
    assert settings.log_level == "DEBUG"
    assert settings.port == 9123
    monkeypatch.setenv("DERMASEG_PORT", "9124")
    assert Settings().port == 9124
    monkeypatch.setenv("DERMASEG_MODEL_PATH", "/srv/models/m.onnx")
    assert Settings().model_path == Path("/srv/models/m.onnx")


@pytest.mark.parametrize(
    "overrides",
    [{"providers": []}, {"max_concurrency": 0}, {"max_queued": -1}, {"log_level": "chatty"}, {"port": 70000}],
)
def test_invalid_settings(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)


def test_the_environment_is_read_in_config_only() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "service").rglob("*.py"))
        if path.name != "config.py" and re.search(r"os\.environ|getenv\(", path.read_text())
    ]
    assert offenders == []


# --- the limiter on its own --------------------------------------------------------------------------


def test_limiter_counts_and_refuses() -> None:
    limiter = InferenceLimiter(max_concurrency=2, max_queued=1, retry_after_s=3, metrics=Metrics())

    async def scenario() -> None:
        await limiter.acquire()
        await limiter.acquire()
        async with anyio.create_task_group() as group:
            group.start_soon(limiter.acquire)  # waits: both slots are taken
            await anyio.sleep(0.01)
            assert (limiter.running, limiter.waiting) == (2, 1)
            with pytest.raises(Exception, match="busy") as refused:
                await limiter.acquire()
            assert refused.value.headers == {"Retry-After": "3"}  # type: ignore[attr-defined]
            limiter.release()
        assert (limiter.running, limiter.waiting) == (2, 0)
        limiter.release()
        limiter.release()
        assert limiter.running == 0

    anyio.run(scenario)


# --- no TensorFlow, and a real server ---------------------------------------------------------------


def test_the_service_never_imports_tensorflow(model_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import io, sys
        import numpy as np
        from PIL import Image
        from tests.conftest import serving
        import service.openapi
        from service.config import Settings
        from service.main import create_app

        buffer = io.BytesIO()
        Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(buffer, format="PNG")
        with serving(create_app(Settings(model_path={str(model_path)!r}))) as client:
            response = client.post("/segment", files={{"file": ("a.png", buffer.getvalue(), "image/png")}})
            assert response.status_code == 200, response.text
        heavy = {"tensorflow", "keras", "tf2onnx"}
        print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_m_service_main_serves(model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(DERMASEG_MODEL_PATH=str(model_path), PORT=str(port), DERMASEG_LOG_LEVEL="info")
    with log.open("w") as stream:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.main"], cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        photo = SAMPLE.read_bytes() if SAMPLE.is_file() else _gray_png()
        response = httpx.post(f"{url}/segment", files={"file": ("p.jpg", photo, "image/jpeg")}, timeout=60)
        assert response.status_code == 200, response.text
        assert "server" not in response.headers
        request_id = response.headers["x-request-id"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = log.read_text().splitlines()
    assert any("ready: model dermaseg-test-darkness" in line for line in lines)
    access = [line for line in lines if "dermaseg.access" in line and request_id in line]
    assert len(access) == 1
    record = json.loads(access[0].split("dermaseg.access ", 1)[1])
    assert record["status"] == 200
    assert "p.jpg" not in "\n".join(lines)


def _gray_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), 100, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_app_factory_builds_without_a_model(tmp_path: Path) -> None:
    app = create_app(Settings(model_path=tmp_path / "nothing-here.onnx"))
    assert isinstance(app, FastAPI)
    assert app.state.served is None


def test_intra_op_threads_default_to_the_cpus_shared_by_concurrent_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.config as config

    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    assert Settings(max_concurrency=2).resolved_intra_op_threads() == 4
    assert Settings(max_concurrency=3).resolved_intra_op_threads() == 2
    assert Settings(max_concurrency=16).resolved_intra_op_threads() == 1
    assert Settings(max_concurrency=2, intra_op_threads=0).resolved_intra_op_threads() == 0  # ONNX Runtime's
    assert Settings(max_concurrency=2, intra_op_threads=3).resolved_intra_op_threads() == 3
