"""``python -m bench.v2_latency``: the Open Inference Protocol's infer beside ``POST /segment``, one photo.

One service on loopback (``python -m service.main``, the shipped model, default settings); one client
sends the same photo through each kind of request in turn, ``--runs`` times, so that every row sees the
same machine. The V2 requests go through the official client (``tritonclient[http]``), in binary tensors
and in JSON. Prints p50 and p90 in ms; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from bench.http_load import ServiceConfig, ServiceProcess
from bench.inputs import load_photo

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of each call, interleaved run by run (each kind sees the same moments of the machine)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - started) * 1000.0)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    import tritonclient.http as triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "dermaseg.onnx")
    parser.add_argument("--photo", type=Path, default=None, help="default: the benchmark's 1024×768 photo")
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args(argv)
    photo = load_photo(args.photo)
    data = photo.data

    with (
        tempfile.TemporaryDirectory() as workdir,
        ServiceProcess(args.model, ServiceConfig("v2-latency"), Path(workdir) / "service.log") as service,
    ):
        http = httpx.Client(base_url=service.url, timeout=60)
        client = triton.InferenceServerClient(url=f"127.0.0.1:{service.port}")

        def segment(query: str = "") -> object:
            answer = http.post("/segment" + query, files={"file": ("photo.jpg", data, photo.content_type)})
            answer.raise_for_status()
            return answer.json()

        def infer(names: list[str], binary: bool) -> object:
            image = triton.InferInput("image", [1], "BYTES")
            encoded = data if binary else base64.b64encode(data)
            image.set_data_from_numpy(np.array([encoded], dtype=object), binary_data=binary)
            outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
            return client.infer("dermaseg", [image], outputs=outputs).as_numpy(names[0])

        calls: dict[str, Callable[[], object]] = {
            "/segment, JSON with mask and confidence PNGs": lambda: segment(),
            "/segment?outputs=mask": lambda: segment("?outputs=mask"),
            "V2 binary: mask, probability, area_px, estimated_jaccard": lambda: infer(
                ["mask", "probability", "area_px", "estimated_jaccard"], True
            ),
            "V2 binary: mask": lambda: infer(["mask"], True),
            "V2 binary: area_px": lambda: infer(["area_px"], True),
            "V2 JSON: mask": lambda: infer(["mask"], False),
        }
        times = measure(calls, args.runs)
    print(f"photo: {photo.description}; {args.runs} runs each, interleaved")
    print("| request | p50 ms | p90 ms |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {float(np.percentile(values, 90)):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
