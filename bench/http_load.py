"""Sections 4 and 5: the service end to end over HTTP on loopback, and its resident memory.

The service runs as it does in production, in its own process (``python -m service.main``, or uvicorn
with ``--workers N``), on a free port of 127.0.0.1 with ``DERMASEG_MODEL_PATH`` set; a load generator
(asyncio + httpx, one connection per simulated client) keeps ``concurrency`` requests in flight until a
bounded number of requests is done or a time limit passes. Each answer's ``timings_ms`` (decode,
inference, encode …, see ``service.schemas.Timings``) is read so that the service's own overhead can be
told apart from the work: overhead = what the client waited − (decode + inference + encode).

The load generator shares the CPU with the service (it is the same machine); on a small machine its
share shows up in the latencies, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench.inputs import Photo
from bench.memory import Resident, resident
from bench.timing import Effort, Timing

logger = logging.getLogger(__name__)

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Steps the issue counts as work; the rest of what the client waits is the service's overhead.
WORK_STEPS = ("decode", "inference", "encode")
#: All the steps the service times in the worker thread (the rest is HTTP, parsing, queueing, JSON).
PIPELINE_STEPS = ("decode", "preprocess", "inference", "postprocess", "encode")
STARTUP_TIMEOUT_S = 180.0
WARMUP_REQUESTS = 3


@dataclass(frozen=True)
class ServiceConfig:
    """How the service is started: ``DERMASEG_*`` settings and the number of uvicorn worker processes.

    Written on the command line as ``name:key=value,key=value`` (name optional), e.g.
    ``one-thread:max_concurrency=2,intra_op_threads=1`` or ``workers=2,intra_op_threads=1``; keys are
    ``service.config.Settings`` fields (``max_concurrency``, ``intra_op_threads`` …), ``workers``,
    ``query``: the query string of every request (``query=outputs=mask`` asks for the mask alone, to
    see what the probability PNG costs; join several parameters with ``&``), and for loading the service
    with another photo than the benchmark's: ``photo=PATH``, ``concurrency=N`` (several joined with
    ``/``; default: the run's ``--concurrency``) and ``requests=N`` (per level; default: the effort's).
    """

    name: str = "defaults"
    settings: tuple[tuple[str, str], ...] = ()
    workers: int = 1
    query: str = ""
    photo: Path | None = None
    concurrency: tuple[int, ...] = ()
    requests: int | None = None

    @classmethod
    def parse(cls, text: str) -> ServiceConfig:
        name, _, rest = text.rpartition(":") if ":" in text else ("", "", text)
        settings: list[tuple[str, str]] = []
        workers, query, photo, concurrency, requests = 1, "", None, (), None
        for item in filter(None, (piece.strip() for piece in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"service setting {item!r} is not KEY=VALUE")
            key = key.strip().lower().removeprefix("dermaseg_")
            if key == "workers":
                workers = _positive(key, value)
            elif key == "query":
                query = value.strip().lstrip("?")
            elif key == "photo":
                photo = Path(value.strip())
            elif key == "concurrency":
                concurrency = tuple(_positive(key, level) for level in value.split("/"))
            elif key == "requests":
                requests = _positive(key, value)
            else:
                settings.append((key, value.strip()))
        return cls(name or rest or "defaults", tuple(settings), workers, query, photo, concurrency, requests)

    @property
    def mask_only(self) -> bool:
        """Whether the requests ask for the mask alone (``outputs=mask``), not the whole JSON answer."""
        for pair in self.query.split("&"):
            key, _, value = pair.partition("=")
            if key == "outputs":
                return value.replace("%2C", ",").split(",") == ["mask"]
        return False

    def environment(self, model_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The service's environment: this one without its DERMASEG_* and ORT_* variables (the service is
        configured here, and sets ONNX Runtime's itself), plus ``extra``, the model, quiet logs and these
        settings (which may set ``log_level`` too)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DERMASEG_", "ORT_"))}
        env.update(extra or {})
        env.update({"DERMASEG_MODEL_PATH": str(model_path), "DERMASEG_LOG_LEVEL": "WARNING"})
        env.update({f"DERMASEG_{key.upper()}": value for key, value in self.settings})
        return env

    def describe(self) -> str:
        pairs = [f"{key}={value}" for key, value in self.settings]
        pairs.append(f"workers={self.workers}")
        if self.query:
            pairs.append(f"requests to /segment?{self.query}")
        if self.photo is not None:
            pairs.append(f"photo {self.photo.name}")
        return ", ".join(pairs)

    @property
    def path(self) -> str:
        return f"/segment?{self.query}" if self.query else "/segment"


def _positive(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, not {value!r}") from None
    if number < 1:
        raise ValueError(f"{key} must be at least 1")
    return number


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """The service in a subprocess on loopback; ``start()`` returns once ``/health/ready`` says ready.

    ``launch()`` and ``wait_ready()`` are ``start()``'s two halves, for whoever watches the start-up itself.
    ``env`` adds environment variables that are not settings (e.g. ``TMPDIR``).
    """

    def __init__(
        self, model_path: Path, config: ServiceConfig, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.model_path = Path(model_path).resolve()
        self.config = config
        self.log_path = log_path
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None
        self._launched_at = 0.0

    def command(self) -> list[str]:
        host_port = ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.config.workers == 1:
            return [sys.executable, "-m", "service.main", *host_port, "--model", str(self.model_path)]
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:create_app",
            "--factory",
            *host_port,
            "--workers",
            str(self.config.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]

    def launch(self) -> subprocess.Popen[bytes]:
        """Starts the service's process and returns at once."""
        self._launched_at = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=self.config.environment(self.model_path, self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.process

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Waits until ``/health/ready`` answers 200.

        Raises:
            RuntimeError: the service exited or was not ready within ``timeout_s`` (with its log's tail).
        """
        assert self.process is not None, "launch() first"
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.perf_counter() - self._launched_at < timeout_s:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the service exited with {self.process.returncode}: {self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/health/ready").status_code == 200:
                        self.ready_s = time.perf_counter() - self._launched_at
                        return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the service was not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Starts the service and waits until it is ready (see :meth:`wait_ready`)."""
        self.launch()
        self.wait_ready(timeout_s)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def resident(self) -> Resident | None:
        return resident(self.process.pid) if self.process is not None else None

    def stop(self) -> None:
        """Asks the service to shut down (SIGTERM), and kills it if it has not after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> ServiceProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def multipart_body(photo: Photo, field_name: str = "file") -> tuple[bytes, str]:
    """The upload, encoded once (the client then spends nothing on it per request); body and content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{photo.filename}"\r\nContent-Type: {photo.content_type}\r\n\r\n'
    ).encode()
    return head + photo.data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class LevelResult:
    """One concurrency level: what the clients saw and what the service said it spent."""

    concurrency: int
    latency: Timing = field(default_factory=Timing)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    steps_ms: dict[str, list[float]] = field(default_factory=dict)
    overhead: Timing = field(default_factory=Timing)
    framework_overhead: Timing = field(default_factory=Timing)
    memory_after: Resident | None = None

    @property
    def ok(self) -> int:
        return self.latency.n

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else float("nan")

    def step(self, name: str) -> Timing:
        return Timing(list(self.steps_ms.get(name, [])))


@dataclass
class HttpResult:
    """All concurrency levels of one service configuration, and its memory."""

    config: ServiceConfig
    #: The photo loaded (the benchmark's, or the configuration's own).
    photo: str = ""
    url: str = ""
    ready_s: float | None = None
    levels: list[LevelResult] = field(default_factory=list)
    memory_ready: Resident | None = None
    memory_warm: Resident | None = None
    memory_end: Resident | None = None
    error: str | None = None


def _record(level: LevelResult, elapsed_ms: float, timings: dict[str, Any]) -> None:
    level.latency.samples_ms.append(elapsed_ms)
    for name, value in timings.items():
        level.steps_ms.setdefault(name, []).append(float(value))
    level.overhead.samples_ms.append(elapsed_ms - sum(float(timings.get(s, 0.0)) for s in WORK_STEPS))
    level.framework_overhead.samples_ms.append(
        elapsed_ms - sum(float(timings.get(s, 0.0)) for s in PIPELINE_STEPS)
    )


async def drive(
    url: str,
    concurrency: int,
    items: Iterable[T],
    handle: Callable[[httpx.AsyncClient, T], Awaitable[None]],
    *,
    max_seconds: float = math.inf,
    timeout_s: float = 300.0,
) -> float:
    """``concurrency`` simulated clients, one connection each: each takes the next item and awaits
    ``handle(client, item)``, until the items run out or ``max_seconds`` pass. Returns the wall time in s."""
    pending = iter(items)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        started = time.perf_counter()
        deadline = started + max_seconds

        async def client_loop() -> None:
            for item in pending:
                await handle(client, item)
                if time.perf_counter() >= deadline:
                    return

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return time.perf_counter() - started


async def _load(
    url: str, path: str, body: bytes, content_type: str, concurrency: int, total: int, max_seconds: float
) -> LevelResult:
    level = LevelResult(concurrency)
    errors: Counter[str] = Counter()
    headers = {"Content-Type": content_type, "Accept": "application/json"}

    async def post(client: httpx.AsyncClient, _: int) -> None:
        sent = time.perf_counter()
        try:
            response = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError as error:
            errors[type(error).__name__] += 1
            return
        elapsed_ms = (time.perf_counter() - sent) * 1000.0
        if response.status_code == 200:
            _record(level, elapsed_ms, response.json().get("timings_ms", {}))
        else:
            errors[str(response.status_code)] += 1

    level.wall_s = await drive(url, concurrency, range(total), post, max_seconds=max_seconds)
    level.errors = dict(errors)
    return level


def run_level(
    url: str, photo: Photo, concurrency: int, total: int, max_seconds: float, path: str = "/segment"
) -> LevelResult:
    """Keeps ``concurrency`` requests in flight until ``total`` are done or ``max_seconds`` pass."""
    body, content_type = multipart_body(photo)
    return asyncio.run(_load(url, path, body, content_type, concurrency, total, max_seconds))


@contextlib.contextmanager
def running_service(model_path: Path, config: ServiceConfig, workdir: Path) -> Iterator[ServiceProcess]:
    """A started service (stopped on exit), its log in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(model_path, config, workdir / f"service-{config.name}.log")
    with service:
        yield service


def bench_http(
    model_path: Path,
    photo: Photo,
    concurrencies: Sequence[int],
    config: ServiceConfig,
    effort: Effort,
    workdir: Path,
) -> HttpResult:
    """Starts the service, warms it up, and loads it at each concurrency; the memory between levels.

    The configuration's own ``concurrency`` and ``requests``, where given, replace ``concurrencies`` and
    the effort's; its ``photo`` is the caller's to load and pass as ``photo``.
    """
    result = HttpResult(config, photo=photo.description)
    concurrencies = config.concurrency or concurrencies
    requests = config.requests or effort.http_requests
    try:
        with running_service(model_path, config, workdir) as service:
            result.url, result.ready_s = service.url, service.ready_s
            result.memory_ready = service.resident()
            run_level(service.url, photo, 1, WARMUP_REQUESTS, effort.http_seconds, config.path)
            result.memory_warm = service.resident()
            for concurrency in concurrencies:
                total = max(requests, 2 * concurrency)
                level = run_level(service.url, photo, concurrency, total, effort.http_seconds, config.path)
                level.memory_after = service.resident()
                logger.info(
                    "http c=%d: %d ok, %s errors, p50 %.1f ms, %.2f req/s",
                    concurrency,
                    level.ok,
                    level.errors or "no",
                    level.latency.p50,
                    level.requests_per_s,
                )
                result.levels.append(level)
            result.memory_end = service.resident()
    except RuntimeError as error:
        result.error = str(error)
        logger.error("service %s: %s", config.name, error)
    return result
