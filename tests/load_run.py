"""The load run: thousands of requests, good and bad mixed, against the service on loopback.

``python -m tests.load_run`` (``make load``) starts the service in its own process (``python -m
service.main``, the shipped model unless ``--model``, the corpus's limits), then:

1. **reference**: sends every valid photo of the corpus (tests/bad_inputs.py) alone and keeps its mask;
2. **mixed load**: ``--requests`` requests at ``--concurrency``, half good photos and half the corpus's
   other cases (bad and odd inputs), in a seeded random order. Every answer must have its case's status
   and code; every good answer's mask must equal the reference. The service's resident memory is read
   after the first ``--warmup`` requests and at the end: growth after warm-up must stay under
   ``--max-growth`` (10 %);
3. **saturation**: a burst at ``--burst-concurrency`` (more than the service's slots + queue) of larger
   photos: the overflow must be answered 503 ``overloaded`` with Retry-After, the rest correctly, and the
   service must be ready afterwards.

It prints a summary, writes it as JSON (``--out``) and exits 1 when a check fails. The test suite runs it
in full (tests/test_service_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.http_load import ServiceConfig, ServiceProcess, drive
from service.config import DEFAULT_MODEL_PATH
from tests.bad_inputs import CORPUS_LIMITS, Case, corpus, encode, lesion, mask_of, multipart, photo_part

#: The service's own slots and queue during the run (its defaults, written out: the burst must exceed them).
MAX_CONCURRENCY = 2
MAX_QUEUED = 16


@dataclass
class Phase:
    """What one phase sent and got."""

    name: str
    concurrency: int
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    wrong_masks: int = 0
    good_answers: int = 0
    wall_s: float = 0.0


@dataclass
class LoadReport:
    """The load run's figures and verdict."""

    model: str
    kinds: int
    bad_kinds: int
    mixed: Phase
    saturation: Phase
    rss_after_warmup_mib: float
    rss_end_mib: float
    rss_growth: float
    max_growth: float
    ready_after: bool
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _judge(case: Case, answer: httpx.Response | Exception, references: dict[str, np.ndarray], phase: Phase,
           allow_overload: bool = False) -> None:  # fmt: skip
    """Checks one answer against its case (and the reference mask); records what was wrong."""
    if isinstance(answer, Exception):
        phase.statuses["transport error"] = phase.statuses.get("transport error", 0) + 1
        phase.unexpected.append(f"{case.name}: {type(answer).__name__}: {answer}")
        return
    status = answer.status_code
    phase.statuses[str(status)] = phase.statuses.get(str(status), 0) + 1
    if allow_overload and status == 503:
        code = answer.json()["error"]["code"]
        if code != "overloaded" or not answer.headers.get("retry-after"):
            phase.unexpected.append(f"{case.name}: 503 {code} without Retry-After")
        return
    if status != case.status:
        phase.unexpected.append(f"{case.name}: {status} instead of {case.status}: {answer.text[:120]}")
        return
    payload = answer.json()
    if case.valid:
        phase.good_answers += 1
        if not np.array_equal(mask_of(payload), references[case.name]):
            phase.wrong_masks += 1
    elif payload.get("error", {}).get("code") != case.code:
        phase.unexpected.append(f"{case.name}: code {payload.get('error')} instead of {case.code}")


async def _run_phase(
    url: str,
    phase: Phase,
    cases: Sequence[Case],
    references: dict[str, np.ndarray],
    *,
    allow_overload: bool = False,
    on_progress: Any = None,
) -> None:
    done = 0

    async def send(client: httpx.AsyncClient, case: Case) -> None:
        nonlocal done
        answer: httpx.Response | Exception
        try:
            answer = await client.post(case.path, content=case.body, headers=case.headers)
        except httpx.HTTPError as error:
            answer = error
        _judge(case, answer, references, phase, allow_overload)
        done += 1
        if on_progress is not None:
            on_progress(done)

    phase.wall_s = await drive(url, phase.concurrency, cases, send, timeout_s=120.0)
    phase.requests = len(cases)


def mixed_cases(count: int, seed: int) -> list[Case]:
    """``count`` cases: half the good photos, half the corpus's other cases, in a seeded order."""
    everything = corpus()
    good = [case for case in everything if case.valid and case.name.startswith("good")]
    others = [case for case in everything if case not in good]
    generator = random.Random(seed)
    chosen = [good[i % len(good)] if i % 2 == 0 else others[(i // 2) % len(others)] for i in range(count)]
    generator.shuffle(chosen)
    return chosen


def burst_cases(count: int) -> list[Case]:
    """Larger photos (1024 × 768 JPEG), so that each holds its slot long enough to fill the queue."""
    data = encode(lesion((768, 1024), seed=11), "JPEG", quality=90)
    case = Case("burst 1024x768 JPEG", multipart(photo_part(data)), 200, None, size=(1024, 768))
    return [case] * count


def run(
    model: Path,
    requests: int = 2000,
    concurrency: int = 16,
    warmup: int = 200,
    burst: int = 240,
    burst_concurrency: int = 48,
    max_growth: float = 0.10,
    seed: int = 0,
    workdir: Path | None = None,
    log: Any = print,
) -> LoadReport:
    """Starts the service, runs the three phases and returns the report (``report.passed`` is the verdict)."""
    workdir = Path(workdir or Path.cwd())
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {**CORPUS_LIMITS, "max_concurrency": MAX_CONCURRENCY, "max_queued": MAX_QUEUED}
    config = ServiceConfig("load", tuple((key, str(value)) for key, value in settings.items()))
    everything = corpus()
    cases = mixed_cases(requests, seed)
    bursts = burst_cases(burst)
    with ServiceProcess(model, config, workdir / "load-service.log") as service:
        log(f"service ready in {service.ready_s:.1f} s at {service.url} ({model.name})")
        references: dict[str, np.ndarray] = {}
        with httpx.Client(base_url=service.url, timeout=120.0) as client:
            valid = {case.name: case for case in [*everything, *bursts] if case.valid}
            for case in valid.values():
                answer = client.post(case.path, content=case.body, headers=case.headers)
                answer.raise_for_status()
                references[case.name] = mask_of(answer.json())
        log(f"reference: {len(references)} valid photos, each sent alone")

        mixed = Phase("mixed", concurrency)
        rss: dict[str, float] = {}

        def progress(done: int) -> None:
            if done == warmup:
                resident = service.resident()
                rss["warm"] = resident.rss_mib if resident else float("nan")
            if done % 500 == 0:
                log(f"  {done}/{requests}")

        asyncio.run(_run_phase(service.url, mixed, cases, references, on_progress=progress))
        end = service.resident()
        rss["end"] = end.rss_mib if end else float("nan")
        saturation = Phase("saturation", burst_concurrency)
        asyncio.run(_run_phase(service.url, saturation, bursts, references, allow_overload=True))
        ready_after = httpx.get(f"{service.url}/health/ready", timeout=10).status_code == 200

    growth = (rss["end"] - rss["warm"]) / rss["warm"]
    report = LoadReport(
        model=str(model),
        kinds=len(everything),
        bad_kinds=sum(not case.valid for case in everything),
        mixed=mixed,
        saturation=saturation,
        rss_after_warmup_mib=round(rss["warm"], 1),
        rss_end_mib=round(rss["end"], 1),
        rss_growth=round(growth, 4),
        max_growth=max_growth,
        ready_after=ready_after,
    )
    for phase in (mixed, saturation):
        if phase.unexpected:
            report.failures.append(f"{phase.name}: {len(phase.unexpected)} unexpected answers, e.g. "
                                   f"{phase.unexpected[:3]}")  # fmt: skip
        if phase.wrong_masks:
            report.failures.append(f"{phase.name}: {phase.wrong_masks} good answers with a wrong mask")
    if not growth < max_growth:
        report.failures.append(f"resident memory grew {growth:.1%} after warm-up (limit {max_growth:.0%})")
    if not saturation.statuses.get("503"):
        report.failures.append("the burst was never refused with 503: the queue is not bounded")
    if not saturation.good_answers:
        report.failures.append("the burst got no good answer at all")
    if not ready_after:
        report.failures.append("the service was not ready after the load")
    return report


def summary(report: LoadReport) -> str:
    mixed, saturation = report.mixed, report.saturation
    lines = [
        f"corpus: {report.kinds} cases, {report.bad_kinds} of them bad input",
        f"mixed: {mixed.requests} requests at concurrency {mixed.concurrency} in {mixed.wall_s:.1f} s "
        f"({mixed.requests / mixed.wall_s:.1f} req/s); statuses {dict(sorted(mixed.statuses.items()))}; "
        f"{mixed.good_answers} good answers, {mixed.wrong_masks} wrong masks, "
        f"{len(mixed.unexpected)} unexpected",
        f"memory: {report.rss_after_warmup_mib} MiB after the warm-up requests, "
        f"{report.rss_end_mib} MiB at the end: {report.rss_growth:+.1%} (limit {report.max_growth:.0%})",
        f"saturation: {saturation.requests} requests at concurrency {saturation.concurrency} "
        f"(slots {MAX_CONCURRENCY} + queue {MAX_QUEUED}): "
        f"statuses {dict(sorted(saturation.statuses.items()))}, "
        f"{saturation.wrong_masks} wrong masks, {len(saturation.unexpected)} unexpected; "
        f"ready afterwards: {report.ready_after}",
        "PASSED" if report.passed else "FAILED: " + "; ".join(report.failures),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load_run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the memory baseline")
    parser.add_argument("--burst", type=int, default=240, help="requests in the saturation burst")
    parser.add_argument("--burst-concurrency", type=int, default=48)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/load.json"))
    args = parser.parse_args(argv)
    report = run(
        args.model,
        args.requests,
        args.concurrency,
        args.warmup,
        args.burst,
        args.burst_concurrency,
        args.max_growth,
        args.seed,
        workdir=args.out.parent,
    )
    text = summary(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(report), "passed": report.passed, "summary": text}, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
