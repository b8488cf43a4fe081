"""What the accuracy benchmarks share: summaries over fine-tuning seeds and interleaved latency.

Each script is run as ``python benchmarks/<name>.py``, so this module is importable as ``_seeds``.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from rmtp import metrics

#: The top-1 figures a benchmark row summarises over seeds.
TOP1_KEYS = ("top1_pruned", "top1_finetuned")


def over_seeds(key: str, values: list[float]) -> dict[str, Any]:
    """``key`` as the mean over seeds, with ``key_min``, ``key_max`` and every value (``key_seeds``)."""
    return {key: statistics.fmean(values), f"{key}_min": min(values), f"{key}_max": max(values),
            f"{key}_seeds": list(values)}


def aggregate(per_seed: list[list[dict[str, Any]]], keys: tuple[str, ...] = TOP1_KEYS) -> list[dict[str, Any]]:
    """The first seed's rows, with each of ``keys`` summarised over the seeds (:func:`over_seeds`)."""
    rows = []
    for index, row in enumerate(per_seed[0]):
        out = dict(row)
        for key in keys:
            out.update(over_seeds(key, [seed_rows[index][key] for seed_rows in per_seed]))
        rows.append(out)
    return rows


def spread(row: dict[str, Any], key: str) -> str:
    """``mean% [min–max]`` of a summarised ``key``."""
    return f"{row[key]:.2f}% [{row[key + '_min']:.2f}–{row[key + '_max']:.2f}]"


def interleaved_latency_ms(models: dict[str, torch.nn.Module], shape: tuple[int, ...], batch: int,
                           rounds: int) -> dict[str, float]:
    """Median batch latency per model in ms, measured in interleaved rounds (A B C A B C …) so the
    drift of a shared machine falls on every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(metrics.measure_latency(model, shape, batch_size=batch, min_run_time=0.3).median_s)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}
