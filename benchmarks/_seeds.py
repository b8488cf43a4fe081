"""What the accuracy benchmarks share: summaries over fine-tuning seeds and interleaved latency.

Each script is run as ``python benchmarks/<name>.py``, so this module is importable as ``_seeds``.
"""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

import torch

from rmtp import measure

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
    """Median batch latency per model in ms, by :func:`rmtp.measure.interleaved_timing`, the method
    of ``rmtp bench`` and ``evaluate: latency``: a warm-up per model, then ``rounds`` rounds that
    each time one block of every model, the order rotated every round (A B C, B C A, …), so the
    drift of a shared machine falls on every model alike. One random batch of ``shape`` (per
    sample, no batch dimension), in eval mode under ``inference_mode``; the models' modes are
    restored afterwards."""
    names = list(models)
    training = {name: model.training for name, model in models.items()}
    try:
        with torch.inference_mode():
            inputs = {name: torch.randn((batch, *shape), dtype=_input_dtype(model)) for name, model in models.items()}
            for model in models.values():
                model.eval()
            fns = [partial(models[name], inputs[name]) for name in names]
            timings = measure.interleaved_timing(fns, rounds=rounds)
    finally:
        for name, model in models.items():
            model.train(training[name])
    return {name: statistics.median(t.seconds) * 1e3 for name, t in zip(names, timings)}


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    parameter = next(iter(model.parameters()), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
