"""Resident memory of a process and its children, from /proc/<pid>/status (Linux)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Resident:
    """Resident size now (``VmRSS``) and its peak so far (``VmHWM``), in MiB, summed over the processes."""

    rss_mib: float
    hwm_mib: float
    processes: int


def _status_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren … (uvicorn's workers), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in (PROC / str(current) / "task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            pending.extend(children)
    return found


def resident(pid: int, include_children: bool = True) -> Resident | None:
    """VmRSS and VmHWM of ``pid`` (plus its descendants); None where /proc does not tell."""
    pids = [pid, *(descendants(pid) if include_children else [])]
    statuses = [status for status in map(_status_kib, pids) if "VmRSS" in status]
    if not statuses:
        return None
    return Resident(
        rss_mib=sum(status["VmRSS"] for status in statuses) / 1024.0,
        hwm_mib=sum(status.get("VmHWM", status["VmRSS"]) for status in statuses) / 1024.0,
        processes=len(statuses),
    )
