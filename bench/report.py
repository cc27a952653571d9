"""The benchmark's Markdown report (docs/performance.md) and its JSON, from one run's results and goals.

Every figure in the report comes from one run of ``python -m bench``; ratios compare figures measured in
that same run. Goals (issue 13): on the 1024×768 photo at concurrency 8 the service answers at least 80 %
of the raw session's best images/s with full JSON answers and 90 % with the mask alone; on the 6 MP photo
at concurrency 1, (end-to-end latency − inference) is at most 1.0 × the inference time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.decode_check import render_section as render_decode_check
from bench.goals import (
    THROUGHPUT_CONCURRENCY,
    THROUGHPUT_TARGET,
    beyond_inference,
    evaluate_goals,
    goals_section,
    level_at,
)
from bench.http_load import PIPELINE_STEPS, WORK_STEPS
from bench.keras_compare import METHODS
from bench.markdown import number as _f
from bench.markdown import percent as _pct
from bench.markdown import table
from bench.pipeline import render_section as render_pipeline
from bench.raw import RawResult
from bench.results import BenchResults
from bench.timing import Timing

BATCHING_WORTH = 0.10

HOW_TO_RUN = """## How to run

`python -m bench` (or `make bench`) benchmarks `models/dermaseg.onnx` and rewrites this file; run it on a
quiet machine. `--quick` checks that everything runs (a few repetitions). Comparisons in one run:
`--threads 0,1,2 --spinning default,off` (raw session settings), `--service NAME:KEY=VALUE,...` repeated
(service configurations: `DERMASEG_*` settings such as `max_concurrency=1,intra_op_threads=2`,
`workers=N` for uvicorn workers, `query=outputs=mask` for the requests, `photo=PATH,concurrency=1,
requests=N` to load it with another photo), `--skip SECTION`. `python -m bench --help` lists the rest.
The decode check (section 8) also runs alone: `python -m bench.decode_check`."""

HTTP_HEADERS = (
    "concurrency",
    "requests ok",
    "errors",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "req/s",
    "of raw best",
    "queue p50",
    "inference p50",
    "overhead p50",
    "HTTP + JSON p50",
)
VARIANT_HEADERS = (
    "precision",
    "file",
    "MiB",
    "n",
    "p50 ms (batch 1)",
    "p95 ms",
    "speed vs float32",
    "Dice vs truth",
    "Δ Dice vs float32's",
    "Dice vs float32 masks",
    "max Δ probability",
)
RAW_HEADERS = (
    "intra-op threads, spinning",
    "batch",
    "n",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "ms / image",
    "images/s",
    "vs batch 1",
)


# ------------------------------------------------------------------------------------------------------------
# Markdown


def _mib(value: float | None) -> str:
    return _f(value, 0) + " MiB" if value is not None else "–"


def _timing_cells(timing: Timing) -> list[str]:
    return [str(timing.n), _f(timing.p50), _f(timing.p95), _f(timing.p99)]


def _machine_section(results: BenchResults) -> str:
    machine = results.machine
    load = ", ".join(
        f"{label} {' / '.join(f'{v:.2f}' for v in values)}"
        for label, values in (("start", machine.load_start), ("end", machine.load_end))
        if values is not None
    )
    versions = ", ".join(f"{name} {version}" for name, version in machine.versions.items())
    rows = [
        ("CPU", machine.cpu_model),
        (
            "CPUs usable",
            f"{machine.cpus}"
            + (
                f" ({machine.threads_per_core} hardware thread(s) per core)"
                if machine.threads_per_core
                else ""
            ),
        ),
        ("clock (/proc/cpuinfo)", f"{_f(machine.cpu_mhz, 0)} MHz"),
        ("SIMD", results.peak.simd),
        ("memory", f"{_f(machine.memory_gib)} GiB"),
        ("OS", machine.os),
        ("Python", machine.python),
        ("packages", versions),
        ("load average (1 / 5 / 15 min)", load or "–"),
        ("date (UTC)", machine.date),
        ("command", f"`{machine.command}`"),
        ("duration", f"{results.duration_s:.0f} s ({results.effort} effort)"),
    ]
    return "## Machine\n\n" + table(["", ""], rows)


def _model_section(results: BenchResults) -> str:
    model = results.model
    rows = [
        (
            "file",
            f"`{model.path}` ({model.size_bytes / 2**20:.1f} MiB, {model.precision}, "
            f"sha256 {model.sha256[:12]}…)",
        ),
        ("name / version", f"{model.name} {model.version}"),
        ("input", f"{model.input_size[0]}×{model.input_size[1]}, threshold {model.threshold}"),
        ("providers", ", ".join(model.providers)),
        ("photo", results.photo),
    ]
    return "## Model and input\n\n" + table(["", ""], rows)


def _raw_section(results: BenchResults) -> str:
    if not results.raw:
        return ""
    rows = []
    for result in results.raw:
        single = results.raw_at(1, result.setting)
        gain = result.images_per_s / single.images_per_s if single else None
        rows.append(
            [
                result.setting.describe(),
                result.batch,
                *_timing_cells(result.timing),
                _f(result.ms_per_image),
                _f(result.images_per_s, 2),
                _f(gain, 2) + "×" if gain else "–",
            ]
        )
    return (
        "## 1. Raw ONNX Runtime session\n\n"
        "`service.inference.OnnxModel` on the photo resized to the network's input, repeated to fill the "
        "batch; latency of one `session.run`. Images/s = batch / p50. The best of these is the service's "
        "ceiling.\n\n" + table(RAW_HEADERS, rows)
    )


def _keras_section(results: BenchResults) -> str:
    keras = results.keras
    if keras is None:
        return ""
    head = "## 2. Keras against ONNX Runtime (same network, same input)\n\n"
    if keras.error:
        return head + f"Not measured: {keras.error}"
    versions = ", ".join(f"{name} {version}" for name, version in keras.versions.items())
    rows = []
    same_file = Path(keras.onnx_path).resolve() == Path(results.model.path).resolve()
    several = same_file and len({r.setting for r in results.raw}) > 1
    for batch in sorted(keras.onnx):
        onnx = keras.onnx[batch]
        best = keras.best_keras(batch)
        cells = [_f(keras.keras.get(method, {}).get(batch, Timing()).p50) for method in METHODS]
        row = [batch, *cells, _f(onnx.p50), _f(best[1].p50 / onnx.p50, 2) + f"× ({best[0]})" if best else "–"]
        if several:
            fastest = min((r for r in results.raw if r.batch == batch), key=lambda r: r.timing.p50)
            speedup = _f(best[1].p50 / fastest.timing.p50, 2) + "×" if best else "–"
            row += [f"{_f(fastest.timing.p50)} ({fastest.setting.describe()})", speedup]
        rows.append(row)
    headers = [
        "batch",
        *(f"Keras {method} p50 ms" for method in METHODS),
        "ONNX Runtime p50 ms (default settings)",
        "ONNX Runtime speed-up vs fastest Keras",
    ]
    if several:
        headers += ["ONNX Runtime, best setting: p50 ms", "its speed-up vs fastest Keras"]
    return (
        head
        + f"Keras model: {keras.description}.\n\n"
        + f"Keras ran in a separate process ({versions}); TensorFlow was never loaded in the process that "
        "timed ONNX Runtime.\n\n" + table(headers, rows)
    )


def _http_section(results: BenchResults) -> str:
    if not results.http:
        return ""
    best = results.best_raw()
    parts = [
        "## 4. The service over HTTP (loopback)\n\n"
        "The service in its own process on 127.0.0.1, loaded by an asyncio + httpx client that keeps "
        "*concurrency* requests in flight (the photo as multipart, JSON answers with both PNGs). Latency is "
        "what the client waited; overhead = latency − (decode + inference + encode) as the service reports "
        "them in `timings_ms`, per request; *HTTP + JSON* = latency − all five steps. The client shares "
        "the CPU with the service."
    ]
    for http in results.http:
        head = f"### Configuration `{http.config.name}`: {http.config.describe()}\n\n"
        if http.photo and http.config.photo is not None:
            head += f"Photo: {http.photo}.\n\n"
        if http.error:
            parts.append(head + f"Not measured: {http.error}")
            continue
        rows = []
        for level in http.levels:
            errors = ", ".join(f"{code}: {count}" for code, count in sorted(level.errors.items())) or "0"
            rows.append(
                [
                    level.concurrency,
                    level.ok,
                    errors,
                    _f(level.latency.p50),
                    _f(level.latency.p95),
                    _f(level.latency.p99),
                    _f(level.requests_per_s, 2),
                    _pct(level.requests_per_s / best.images_per_s) if best else "–",
                    _f(level.step("queue").p50),
                    _f(level.step("inference").p50),
                    _f(level.overhead.p50),
                    _f(level.framework_overhead.p50),
                ]
            )
        ready = f"Ready {http.ready_s:.1f} s after start (model load and warm-up). " if http.ready_s else ""
        parts.append(head + ready + "\n\n" + table(HTTP_HEADERS, rows))
        one = level_at(http, 1)
        if one:
            steps = ["receive", "queue", *PIPELINE_STEPS]
            step_rows = [[name, _f(one.step(name).p50)] for name in steps]
            step_rows.append(["HTTP + JSON (the rest)", _f(one.framework_overhead.p50)])
            step_rows.append(["**client latency**", _f(one.latency.p50)])
            parts.append(
                "Where a request's time goes at concurrency 1 (p50 of each, ms; the service's own "
                f"`timings_ms`, work = {' + '.join(WORK_STEPS)}):\n\n" + table(["part", "p50 ms"], step_rows)
            )
    large = _large_photo_table(results)
    if large:
        parts.append(large)
    return "\n\n".join(parts)


def _large_photo_table(results: BenchResults) -> str:
    """Concurrency 1 on each configuration's own photo: latency, inference, and their ratio."""
    rows = []
    for http in results.http:
        one = level_at(http, 1)
        if http.config.photo is None or one is None:
            continue
        rows.append(
            [
                http.config.name,
                http.photo,
                one.ok,
                _f(one.latency.p50),
                *(_f(one.step(step).p50) for step in PIPELINE_STEPS),
                _f(one.framework_overhead.p50),
                _f(beyond_inference(one), 2) + "×",
            ]
        )
    if not rows:
        return ""
    headers = [
        "configuration",
        "photo",
        "n",
        "latency p50",
        *(f"{step} p50" for step in PIPELINE_STEPS),
        "HTTP + JSON p50",
        "(latency − inference) / inference",
    ]
    return (
        "### Large photos at concurrency 1 (full JSON answers)\n\n"
        "The configurations above that load their own photo, one request at a time: p50 in ms, the steps "
        "from the service's `timings_ms`.\n\n" + table(headers, rows)
    )


def _memory_section(results: BenchResults) -> str:
    rows = []
    for http in results.http:
        if http.error:
            continue
        snapshots = [
            ("ready (model loaded, warmed up)", http.memory_ready),
            ("after 3 warm-up requests", http.memory_warm),
        ]
        snapshots += [(f"after concurrency {level.concurrency}", level.memory_after) for level in http.levels]
        for label, memory in snapshots:
            if memory is not None:
                rows.append(
                    [http.config.name, label, _mib(memory.rss_mib), _mib(memory.hwm_mib), memory.processes]
                )
        if http.memory_ready and http.memory_end:
            growth = http.memory_end.rss_mib - http.memory_ready.rss_mib
            rows.append([http.config.name, "**growth over the load run**", f"**{growth:+.0f} MiB**", "", ""])
    if not rows:
        return ""
    return (
        "## 5. The service's memory\n\n"
        "`VmRSS` (resident now) and `VmHWM` (resident peak) from `/proc/<pid>/status`, summed over the "
        "service's processes.\n\n" + table(["configuration", "when", "VmRSS", "VmHWM", "processes"], rows)
    )


def _variants_section(results: BenchResults) -> str:
    variants = results.variants
    if variants is None:
        return ""
    reference = variants.get("float32")
    rows = []
    for variant in variants.variants:
        speed = reference.timing.p50 / variant.timing.p50 if reference else None
        delta = (
            variant.dice_vs_truth - reference.dice_vs_truth
            if reference and variant.dice_vs_truth is not None and reference.dice_vs_truth is not None
            else None
        )
        rows.append(
            [
                variant.precision,
                variant.origin,
                _f(variant.size_bytes / 2**20),
                *_timing_cells(variant.timing)[:3],
                _f(speed, 2) + "×" if speed else "–",
                _f(variant.dice_vs_truth, 4),
                f"{delta:+.4f}" if delta is not None else "–",
                _f(variant.dice_vs_float32, 4),
                _f(variant.max_abs_diff_vs_float32, 4),
            ]
        )
    notes = "".join(f"\n\n{note}." for note in variants.notes)
    return (
        "## 6. Precision variants\n\n"
        f"Dice: mean per photo at the photo's own size, threshold of the model; photos: {variants.photos}."
        + notes
        + "\n\n"
        + table(VARIANT_HEADERS, rows)
    )


def _flops_section(results: BenchResults) -> str:
    flops, peak = results.flops, results.peak
    if flops is None:
        return ""
    rows = [
        [op, flops.nodes_by_op[op], _f(2 * macs / 1e9, 3)] for op, macs in sorted(flops.macs_by_op.items())
    ]
    rows.append(["**total**", sum(flops.nodes_by_op.values()), f"**{_f(flops.flops / 1e9, 3)}**"])
    text = (
        "## 7. Floating-point work against the CPU's peak\n\n"
        "Counted from the ONNX file (batch fixed to 1, ONNX shape inference): 2 FLOPs per multiply–"
        "accumulate of Conv, ConvTranspose, MatMul and Gemm; element-wise work is not counted.\n\n"
        + table(["operator", "nodes", "GFLOP / image"], rows)
        + f"\n\nPeak (an estimate): {_f(peak.gflops, 0)} GFLOP/s = {peak.assumption}."
    )
    roofs = {threads: value for threads, value in results.gemm_gflops.items() if value}
    if roofs:
        kernels = "AVX-512 kernels" if results.peak.simd == "AVX-512" else "its own choice of kernels"
        text += f" Measured roof: numpy's float32 matrix product (OpenBLAS, {kernels}, best run) reaches " + (
            ", ".join(
                f"{value:.0f} GFLOP/s on {threads} thread(s)" for threads, value in sorted(roofs.items())
            )
            + "."
        )
    roof = max(roofs.values()) if roofs else None
    one_core = roofs.get(1)
    if one_core and peak.gflops and one_core > peak.gflops / peak.cores:
        text += (
            f" One thread beats the estimate's {peak.gflops / peak.cores:.0f} GFLOP/s per core: the core "
            f"runs at about {one_core / peak.flops_per_cycle:.1f} GHz or more (boost), above the clock the "
            "estimate used."
        )
    if flops.unresolved:
        text += f" Not counted (shapes unknown): {', '.join(flops.unresolved[:10])}."
    achieved = []
    for label, images_per_s in _throughputs(results):
        gflops = flops.flops / 1e9 * images_per_s
        achieved.append(
            [
                label,
                _f(images_per_s, 2),
                _f(gflops, 1),
                _pct(gflops / peak.gflops, 1) if peak.gflops else "–",
                _pct(gflops / roof, 1) if roof else "–",
            ]
        )
    if achieved and flops.flops:
        headers = ["running as", "images/s", "GFLOP/s achieved", "of estimated peak", "of measured roof"]
        text += "\n\n" + table(headers, achieved)
    return text


def _throughputs(results: BenchResults) -> list[tuple[str, float]]:
    found = []
    single, best = results.raw_at(1), results.best_raw()
    if single:
        found.append(("raw session, batch 1", single.images_per_s))
    if best and best is not single:
        found.append(
            (f"raw session, batch {best.batch}, threads {best.setting.describe()} (best)", best.images_per_s)
        )
    for http in results.http:
        level = level_at(http, THROUGHPUT_CONCURRENCY)
        if level:
            found.append(
                (f"service ({http.config.name}), concurrency {level.concurrency}", level.requests_per_s)
            )
    return found


def _batching_finding(single: RawResult, batched: RawResult) -> str:
    gain = batched.images_per_s / single.images_per_s - 1
    figures = f"({batched.images_per_s:.2f} against {single.images_per_s:.2f} images/s)"
    if batched.batch > 1 and gain >= BATCHING_WORTH:
        return (
            f"Batching pays in the raw session: batch {batched.batch} gives {gain:.0%} more images/s than "
            f"batch 1 {figures}. Micro-batching in the service (the requests that arrive within a few ms "
            "run as one `session.run`) could buy up to that much throughput under load, for that wait."
        )
    return (
        f"Batching does not pay on this CPU: the best batch gives {gain:+.0%} images/s against batch 1 "
        f"{figures}; micro-batching in the service would add waiting for no throughput."
    )


def _ceiling_finding(results: BenchResults, single: RawResult) -> str | None:
    """What the service can reach at most when the steps around the session cannot overlap it."""
    main = results.pipeline.main if results.pipeline is not None else None
    if main is None:
        return None
    cores = results.machine.cpus
    other = main.after.other_ms
    http_part = 0.0
    for http in results.http:
        one = level_at(http, 1)
        if one and http.config.photo is None:
            http_part = one.framework_overhead.p50 + one.step("receive").p50
            break
    inference = single.timing.p50
    ceiling = 1000.0 * cores / (cores * inference + other + http_part)
    best = results.best_raw()
    return (
        f"Besides the session ({inference:.1f} ms at batch 1) each request costs {other:.1f} ms of "
        f"single-threaded work (decode, resize, post-processing, PNG encoding) and {http_part:.1f} ms of "
        f"HTTP and JSON. If the session keeps all {cores} CPUs busy while it runs, the service cannot "
        f"exceed about {ceiling:.1f} req/s ({ceiling / single.images_per_s:.0%} of the raw batch-1 "
        f"images/s" + (f", {ceiling / best.images_per_s:.0%} of the raw best" if best else "") + ") "
        f"on this machine, before the load generator takes its share (the goal: {THROUGHPUT_TARGET:.0%} of "
        "the raw best)."
    )


def findings(results: BenchResults) -> list[str]:
    """What the figures say about where the time goes and what would pay, computed from them."""
    lines = []
    single, best = results.raw_at(1), results.best_raw()
    if single:
        same_setting = [r for r in results.raw if r.setting == single.setting]
        lines.append(_batching_finding(single, max(same_setting, key=lambda r: r.images_per_s)))
        ceiling = _ceiling_finding(results, single)
        if ceiling:
            lines.append(ceiling)
    settings = list(dict.fromkeys(r.setting for r in results.raw))
    if len(settings) > 1:
        setting_cells = []
        for setting in settings:
            at_one = results.raw_at(1, setting)
            if at_one is None:
                continue
            top = max((r for r in results.raw if r.setting == setting), key=lambda r: r.images_per_s)
            setting_cells.append(
                f"{setting.describe()}: {at_one.timing.p50:.1f} ms at batch 1, best batch {top.batch} "
                f"{top.images_per_s / at_one.images_per_s - 1:+.0%} images/s"
            )
        lines.append(
            "Session settings (intra-op threads, spinning): "
            + "; ".join(setting_cells)
            + ". Judge batching (and "
            "so micro-batching) at the setting the service will run with."
        )
    for http in results.http:
        one, eight = level_at(http, 1), level_at(http, THROUGHPUT_CONCURRENCY)
        if one and single:
            steps = sum(one.step(s).p50 for s in PIPELINE_STEPS if s != "inference")
            lines.append(
                f"Service ({http.config.name}) at concurrency 1: {one.requests_per_s:.2f} req/s, "
                f"{one.requests_per_s / single.images_per_s:.0%} of the raw batch-1 session; of its "
                f"{one.latency.p50:.1f} ms p50, inference is {one.step('inference').p50:.1f} ms, the other "
                f"steps {steps:.1f} ms and HTTP + JSON {one.framework_overhead.p50:.1f} ms."
            )
        if one and eight:
            lines.append(
                f"Service ({http.config.name}) from concurrency 1 to {eight.concurrency}: "
                f"{one.requests_per_s:.2f} → {eight.requests_per_s:.2f} req/s, p50 {one.latency.p50:.0f} → "
                f"{eight.latency.p50:.0f} ms (queue p50 {eight.step('queue').p50:.0f} ms; inference p50 "
                f"{one.step('inference').p50:.0f} → {eight.step('inference').p50:.0f} ms as concurrent "
                "sessions share the cores)."
            )
    if len([h for h in results.http if h.levels]) > 1:
        cells = ", ".join(
            f"{h.config.name}: {lvl.requests_per_s:.2f} req/s"
            for h in results.http
            if (lvl := level_at(h, THROUGHPUT_CONCURRENCY)) is not None
        )
        lines.append(f"Configurations at concurrency {THROUGHPUT_CONCURRENCY}: {cells}.")
    if results.pipeline:
        for photo in results.pipeline.photos:
            before, after = photo.before, photo.after
            lines.append(
                f"{photo.label}, in process: the steps besides inference took {before.other_ms:.1f} ms "
                f"with release 1.0.0's code and {after.other_ms:.1f} ms as served, "
                f"{before.other_per_inference:.2f}× → {after.other_per_inference:.2f}× the inference "
                f"({after.p50('inference'):.1f} ms)."
            )
    if results.flops and results.flops.flops and results.peak.gflops and best:
        achieved = results.flops.flops / 1e9 * best.images_per_s
        lines.append(
            f"At its best the session does {achieved:.0f} GFLOP/s, {achieved / results.peak.gflops:.0%} "
            f"of the estimated {results.peak.gflops:.0f} GFLOP/s peak."
        )
    return lines


def render(results: BenchResults) -> str:
    """The whole report as Markdown."""
    machine = results.machine
    warning = []
    if machine.contended:
        warning.append(
            f"**Measured under contention**: the load average was over half the {machine.cpus} CPUs "
            "while this ran (other work shared the CPU). Ratios within this run are comparable; absolute "
            "figures are not those of a quiet machine."
        )
    if results.effort.startswith("quick"):
        warning.append(
            "**Quick run** (`--quick`): a few repetitions per figure; this checks that the benchmark "
            "runs, the figures are not to be quoted."
        )
    if results.note:
        warning.append(f"Note: {results.note}")
    sections = [
        "# DermaSeg performance",
        f"Written by `{machine.command}` on {machine.date}. Do not edit by hand: rerun the command. All "
        "figures come from this one run, on the same photo; latencies are medians (p50) and 95th / 99th "
        "percentiles over *n* repetitions (with n < 100 the p99 is close to the maximum).",
        *warning,
        goals_section(results),
        _machine_section(results),
        _model_section(results),
        _raw_section(results),
        _keras_section(results),
        render_pipeline(results.pipeline),
        _http_section(results),
        _memory_section(results),
        _variants_section(results),
        _flops_section(results),
        render_decode_check(results.decode_check),
    ]
    lines = findings(results)
    if lines:
        sections.append("## What the numbers say\n\n" + "\n".join(f"- {line}" for line in lines))
    if results.skipped:
        sections.append(f"Sections left out of this run: {', '.join(results.skipped)}.")
    sections.append(HOW_TO_RUN)
    return "\n\n".join(section for section in sections if section) + "\n"


# ------------------------------------------------------------------------------------------------------------
# JSON


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.summary()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_json(results: BenchResults, path: Path) -> None:
    """The results as JSON (timings as n / p50 / p95 / p99 / mean), plus the goals."""
    document = _jsonable(results)
    document["goals"] = [
        {"name": goal.name, "target": goal.target, "measured": goal.measured, "met": goal.met}
        for goal in evaluate_goals(results)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
