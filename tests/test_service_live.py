"""The service as it runs in production (``python -m service.main`` in its own process, on loopback):
readiness during warm-up, SIGTERM with requests in flight, stalled uploads, and start-up failures.

These need a real server and real sockets: what uvicorn does with its listening socket, signals and slow
clients cannot be seen through a TestClient.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.http_load import ServiceConfig, ServiceProcess, free_port
from tests.bad_inputs import BOUNDARY, MULTIPART, encode, lesion, multipart, photo_part
from tests.conftest import metric_value
from tests.onnx_models import write_darkness_model, write_not_a_dermaseg_model

REPO = Path(__file__).resolve().parents[1]


Launch = Callable[..., ServiceProcess]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Launch]:
    """Launches ``python -m service.main`` (INFO logs) with a model, settings and extra environment; does not
    wait for it. Every service launched is stopped at the end."""
    launched: list[ServiceProcess] = []

    def launch(model: Path, env: dict[str, str] | None = None, **settings: str) -> ServiceProcess:
        config = ServiceConfig("live", (("log_level", "INFO"), *settings.items()))
        service = ServiceProcess(model, config, tmp_path / f"service-{len(launched)}.log", env)
        launched.append(service)
        service.launch()
        return service

    yield launch
    for service in launched:
        service.stop()


def log_text(service: ServiceProcess) -> str:
    return service.log_path.read_text(errors="replace")


def wait_listening(service: ServiceProcess, timeout_s: float = 60.0) -> None:
    """Waits until the service accepts connections (it does before it is ready)."""
    assert service.process is not None
    deadline = time.monotonic() + timeout_s
    while True:
        assert service.process.poll() is None, log_text(service)
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"not listening after {timeout_s} s: {log_text(service)}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_darkness_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


# --- readiness -------------------------------------------------------------------------------------


def test_ready_is_503_until_the_warm_up_ends(live: Launch, tmp_path: Path) -> None:
    # A 1024 × 1024 input makes each warm-up run take milliseconds: long enough to watch it.
    model = write_darkness_model(tmp_path / "slow.onnx", input_size=(1024, 1024))
    service = live(model, warmup_runs="400")
    wait_listening(service)
    seen_warming = False
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=service.url, timeout=10) as client:
        while True:
            ready = client.get("/health/ready")
            if ready.status_code == 200:
                break
            assert ready.status_code == 503
            assert ready.json()["status"] == "not_ready"
            assert ready.json()["reason"] == "warming up"
            seen_warming = True
            assert client.get("/health/live").status_code == 200
            refused = client.post("/segment", files={"file": ("a.png", encode(lesion(), "PNG"), "image/png")})
            if refused.status_code == 503:  # (the warm-up may end between the two probes)
                assert refused.json()["error"]["code"] == "not_ready"
                assert refused.headers["retry-after"]
                assert metric_value(client.get("/metrics").text, "dermaseg_ready") == 0.0
            assert time.monotonic() < deadline, log_text(service)
            time.sleep(0.05)
        assert seen_warming, "the server never answered while warming up"
        assert metric_value(client.get("/metrics").text, "dermaseg_ready") == 1.0
        assert client.post(
            "/segment", files={"file": ("a.png", encode(lesion(), "PNG"), "image/png")}
        ).is_success


# --- SIGTERM -----------------------------------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_cleanly(
    live: Launch, tiny_model: Path
) -> None:
    service = live(tiny_model, max_concurrency="1", max_queued="16")
    service.wait_ready()
    # Big photos: decoding, resizing back and encoding 6 MP takes a while, one at a time.
    photo = encode(lesion((2000, 3000), seed=5), "JPEG", quality=90)
    body = multipart(photo_part(photo))
    in_flight = 8
    answers: list[httpx.Response | Exception] = []
    finished_at: list[float] = []

    def client() -> None:
        try:
            response = httpx.post(
                f"{service.url}/segment?outputs=mask",
                content=body,
                headers={"Content-Type": MULTIPART},
                timeout=60,
            )
            answers.append(response)
        except Exception as error:  # recorded, asserted below
            answers.append(error)
        finished_at.append(time.monotonic())

    threads = [threading.Thread(target=client) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while True:  # every request has arrived, and most are still in the service (running or waiting)
        metrics = httpx.get(f"{service.url}/metrics", timeout=5).text
        held = metric_value(metrics, "dermaseg_segmentations_running")
        held += metric_value(metrics, "dermaseg_segmentations_waiting")
        if held + len(finished_at) == in_flight and held >= in_flight - 2:
            break
        assert time.monotonic() < deadline, f"{held} in the service, {len(finished_at)} done"
        time.sleep(0.01)

    service.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused_at = None
    while refused_at is None and time.monotonic() - signalled < 10:
        try:
            with socket.create_connection(("127.0.0.1", service.port), timeout=1):
                time.sleep(0.01)
        except ConnectionRefusedError:
            refused_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)

    assert refused_at is not None, "new connections were still accepted 10 s after SIGTERM"
    assert refused_at < max(finished_at), "new connections were refused only after the work was done"
    for answer in answers:
        assert isinstance(answer, httpx.Response), repr(answer)
        assert answer.status_code == 200, answer.text[:200]
        assert answer.json()["image"] == {"width": 3000, "height": 2000}
    assert len(answers) == in_flight
    # uvicorn drains, shuts the app down, then re-raises the signal on purpose, so that whoever started it
    # sees how it ended: -15 here, 143 in a shell or a container. Nothing was cut short.
    assert service.process.wait(timeout=30) in (0, -signal.SIGTERM), log_text(service)
    log = log_text(service)
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert "Application shutdown complete" in log
    assert "Finished server process" in log


# --- slow clients ------------------------------------------------------------------------------------


def _raw_request(port: int, head_body: bytes, drip: bytes = b"", every_s: float = 0.0) -> tuple[bytes, float]:
    """Sends ``head_body``, then ``drip`` a byte every ``every_s``; returns what came back and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head_body)
        received = b""
        connection.settimeout(every_s or 20)
        for byte in drip:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                chunk = None
            if chunk is not None:
                received += chunk
                break
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
        connection.settimeout(20)
        while chunk := connection.recv(65536):
            received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize("how", ["stalled", "dripping"])
def test_a_slow_or_stalled_upload_is_cut_off(live: Launch, tiny_model: Path, how: str) -> None:
    service = live(tiny_model, upload_timeout_s="1")
    service.wait_ready()
    body = multipart(photo_part(encode(lesion(), "PNG")))
    head = (
        f"POST /segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MULTIPART}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    if how == "stalled":  # a third of the body, then nothing
        answer, elapsed = _raw_request(service.port, head + body[: len(body) // 3])
    else:  # a byte every 0.2 s: alive, but the whole body would take hours
        answer, elapsed = _raw_request(service.port, head + body[:100], drip=body[100:], every_s=0.2)
    status_line, headers, payload = _parse(answer)
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
    assert b"connection: close" in headers
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert 0.9 < elapsed < 10  # cut at the 1 s limit, and the connection closed (recv saw the end)
    # The service is unharmed.
    good = httpx.post(f"{service.url}/segment", content=body, headers={"Content-Type": MULTIPART}, timeout=30)
    assert good.status_code == 200
    assert BOUNDARY not in log_text(service)


def _parse(answer: bytes) -> tuple[bytes, bytes, bytes]:
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    return status_line, headers.lower(), payload


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("how", ["silent", "stalled in the headers", "dripping headers"])
def test_slow_request_headers_are_cut_off(live: Launch, tiny_model: Path, parser: str, how: str) -> None:
    service = live(tiny_model, header_timeout_s="1", http=parser)
    service.wait_ready()
    head = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    if how == "silent":  # connects, sends nothing
        answer, elapsed = _raw_request(service.port, b"")
    elif how == "stalled in the headers":
        answer, elapsed = _raw_request(service.port, head[:30])
    else:  # a byte every 0.2 s: the headers would take a minute
        answer, elapsed = _raw_request(service.port, head[:10], drip=head[10:], every_s=0.2)
    status_line, headers, payload = _parse(answer)
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
    assert b"connection: close" in headers
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert 0.9 < elapsed < 10
    assert httpx.get(f"{service.url}/health/ready", timeout=10).status_code == 200


def _read_response(connection: socket.socket) -> bytes:
    """One whole HTTP/1.1 answer with a Content-Length from ``connection``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_the_header_deadline_spares_kept_alive_connections_and_times_each_request(
    live: Launch, tiny_model: Path, parser: str
) -> None:
    service = live(tiny_model, header_timeout_s="1", http=parser)
    service.wait_ready()
    request = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as connection:
        for _ in range(3):  # idle well past the deadline between requests (but within keep-alive's 5 s)
            connection.sendall(request)
            answer = _read_response(connection)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            time.sleep(1.5)
        # Headers sent within the deadline but slowly (0.5 s in all) still make a request.
        for index in range(0, len(request), 10):
            connection.sendall(request[index : index + 10])
            time.sleep(0.1)
        assert _read_response(connection).startswith(b"HTTP/1.1 200")
        # The next request's clock starts at its first byte.
        connection.sendall(request[:20])
        started = time.monotonic()
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert _parse(answer)[0] == b"HTTP/1.1 408 Request Timeout"
    assert 0.9 < time.monotonic() - started < 10


# --- start-up failures -------------------------------------------------------------------------------


def _truncated(folder: Path) -> Path:
    whole = write_darkness_model(folder / "whole.onnx").read_bytes()
    path = folder / "truncated.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.onnx"
    path.write_bytes(b"")
    return path


def _text(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 56000000\n")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: folder / "missing.onnx", "model file not found"),
        (_empty, "cannot load model"),
        (_truncated, "cannot load model"),
        (_text, "cannot load model"),
        (lambda folder: write_not_a_dermaseg_model(folder / "vector.onnx"), "is not a DermaSeg model"),
        (lambda folder: folder, "model path is a folder"),
    ],
    ids=["missing", "empty", "truncated", "git-lfs pointer", "not DermaSeg's", "a folder"],
)
def test_a_bad_model_file_stops_the_service_with_one_clear_line(
    tmp_path: Path, make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMASEG_")}
    result = subprocess.run(
        [sys.executable, "-m", "service.main", "--model", str(path), "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "cannot start DermaSeg" in line]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


# --- uploads never touch the disk --------------------------------------------------------------------


def _open_files(pid: int) -> set[str]:
    """The regular files ``pid`` has open (what its /proc/PID/fd links point to)."""
    found = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("/") and Path(target).is_file():
            found.add(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_large_upload_in_progress_opens_no_file(live: Launch, tiny_model: Path, tmp_path: Path) -> None:
    temp = tmp_path / "service-tmp"
    temp.mkdir()
    service = live(tiny_model, env={"TMPDIR": str(temp)}, max_upload_bytes=str(32 * 1024 * 1024))
    service.wait_ready()
    before = _open_files(service.process.pid)
    photo = encode(np.random.default_rng(3).integers(0, 255, (2300, 2300, 3), dtype=np.uint8), "BMP")
    body = multipart(photo_part(photo, b"big.bmp", "image/bmp"))
    assert len(body) > 15_000_000
    head = (
        f"POST /segment?outputs=mask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MULTIPART}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as connection:
        connection.sendall(head + body[: len(body) * 2 // 3])
        time.sleep(0.5)  # two thirds of a 16 MB upload are in the service, the rest not yet sent
        during = _open_files(service.process.pid)
        connection.sendall(body[len(body) * 2 // 3 :])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert during <= before, f"files opened during the upload: {during - before}"
    assert list(temp.iterdir()) == []  # ONNX Runtime's telemetry would have left a .ses file here
