"""The host a benchmark ran on, recorded with its figures: CPU or GPU name, cores, load, versions.

The 1-minute load average before and after the run is what tells a reader (and the report's
notes) whether the machine was busy while it was timed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["busy_note", "cpu_name", "device_name", "host_environment", "loadavg", "usable_cores"]


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def busy_note(loads: Sequence[float | None], cores: int) -> str:
    """'' unless a 1-minute load taken around the timing (``None``: unknown) exceeded the usable
    ``cores``; then the words that say the timings are noisy. ``rmtp bench`` and prune steps that
    time share it, so a busy machine reads the same wherever it spoiled a figure."""
    known = [x for x in loads if x is not None]
    if not known or not cores or max(known) <= cores:
        return ""
    return f"the machine was busy (1-min load {max(known)} on {cores} cores): timings are noisy"


def host_environment(load_before: float | None) -> dict[str, Any]:
    """Versions (:func:`rmtp.reports.records.environment`), CPU, usable cores and the load before and now."""
    from rmtp.reports.records import environment

    env: dict[str, Any] = dict(environment())
    env.update({"cpu": cpu_name(), "cpu_cores": usable_cores(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "loadavg_1min_start": load_before, "loadavg_1min_end": loadavg()})
    return env
