r"""Speed and agreement of ``rmtp analyze-spectrum`` vs WeightWatcher and a bare ``torch.linalg.svdvals`` loop.

    python benchmarks/analyze_spectrum_speed.py                        # the issue's settings, CPU
    python benchmarks/analyze_spectrum_speed.py --rounds 5 --threads 2 \
        --json benchmarks/results/analyze_spectrum_speed.json

Times, on timm ``vit_base_patch16_224`` with timm's random init (speed does not depend on the
weights), each built once:

- ``rmtp``: the library path of the command, ``rmtp.spectral.analyze_model(model, arch)``
  (SVDs of every prunable matrix, qkv split into q, k, v, plus the MP fits), and the fits alone
  (``fit_mp`` on precomputed singular values: rmtp's own work beyond the SVDs);
- ``svdvals loop``: a bare ``for W in matrices: torch.linalg.svdvals(W)`` over exactly the
  matrices rmtp analyses, with torch at ``--threads`` threads and again at 1 thread; the faster
  of the two is the floor the issue's 1.5× target refers to;
- ``WeightWatcher``: ``weightwatcher.WeightWatcher(model=model).analyze(mp_fit=True)``, its
  defaults otherwise, with the BLAS pools (threadpoolctl) and torch at ``--threads``. It
  analyses its own choice of matrices (fused qkv as one 2304×768 matrix, ...).
- ``rmtp CLI``: ``python -m rmtp analyze-spectrum timm:vit_base_patch16_224 --quiet`` in a
  subprocess, start-up and model build included (for information; not in the ratios).

The machine is shared and noisy, so every tool runs once per round, in a rotated order, all
rounds interleaved; the table reports medians over rounds, and each ratio is the median of the
per-round ratios. Then, on planted-spike matrices W = Σ θᵢ uᵢvᵢᵀ + σG at ViT-Base shapes, it
prints the spikes each tool counts and the σ each recovers next to the truth. If WeightWatcher
cannot be imported (``pip install 'rmtp[bench]'``), it says so and prints the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

import rmtp
from rmtp.contract.architecture import ModelSpec
from rmtp.plugins import get_plugins
from rmtp.reports.records import cpu_name
from rmtp.spectral import analyze_model, fit_mp, weight_matrix
from rmtp.storage.atomic import write_json_atomic


def _weightwatcher() -> tuple[Any, str | None]:
    """The weightwatcher module, or None and why not."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import weightwatcher
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        return weightwatcher, None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install: say so and go on
        return None, f"{exc.__class__.__name__}: {exc}"


def _limits(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _quiet(fn: Callable[[], Any]) -> Any:
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO())):
        warnings.simplefilter("ignore")
        return fn()


def rmtp_matrices(model: nn.Module, arch: Any) -> list[torch.Tensor]:
    """Exactly the matrices rmtp analyses (its rows with a fit), as contiguous tensors."""
    out = []
    for row in analyze_model(model, arch):
        if row.fit is None:
            continue
        matrix = weight_matrix(model.get_submodule(row.module).weight)
        if row.rows is not None:
            matrix = matrix[row.rows[0]:row.rows[1]]
        out.append(matrix.contiguous())
    return out


def svd_loop(matrices: list[torch.Tensor], threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for matrix in matrices:
            torch.linalg.svdvals(matrix)
    finally:
        torch.set_num_threads(before)


def ww_analyze(ww: Any, model: nn.Module, threads: int) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _limits(threads):
            return _quiet(lambda: ww.WeightWatcher(model=model).analyze(mp_fit=True))
    finally:
        torch.set_num_threads(before)


def cli_run(model_name: str) -> None:
    subprocess.run([sys.executable, "-m", "rmtp", "analyze-spectrum", f"timm:{model_name}", "--quiet"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_rounds(tools: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            tools[name]()
            times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    return times


# --- planted spikes ------------------------------------------------------------------------------


def planted(m: int, n: int, strengths: list[float], sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = sigma * torch.randn(m, n, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(m, len(strengths), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(strengths), generator=g, dtype=torch.float64))
    return (w + u @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ v.T).float()


def ww_on_matrix(ww: Any, w: torch.Tensor, threads: int) -> tuple[int, float]:
    """WeightWatcher's spike count and per-entry sigma for one matrix (wrapped as a Linear layer)."""
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    details = ww_analyze(ww, nn.Sequential(layer), threads)
    row = details.iloc[0]
    n = max(w.shape)
    # WW rescales eigenvalues s² to mean 1 (W_scale² = p / Σ s²) and fits sigma_mp there; back in
    # rmtp's units (λ = s²/n, per-entry σ): σ = sigma_mp / (W_scale · sqrt(n)).
    return int(row["num_spikes"]), float(row["sigma_mp"]) / (float(row["W_scale"]) * math.sqrt(n))


def planted_comparison(ww: Any, threads: int, seeds: int, sigma: float = 0.02) -> list[dict[str, Any]]:
    rows = []
    for m, n in ((768, 768), (3072, 768), (768, 3072)):
        threshold = sigma * (m * n) ** 0.25
        multiples = [0.5, 1.5, 3.0, 6.0]  # of the BBP threshold sigma (MN)^(1/4): 3 detectable, 1 not
        for seed in range(seeds):
            w = planted(m, n, [k * threshold for k in multiples], sigma, seed)
            s = torch.linalg.svdvals(w)
            plain = fit_mp(s, (m, n))
            margin = fit_mp(s, (m, n), tw_confidence=0.99)
            row = {"shape": [m, n], "seed": seed, "sigma": sigma, "planted": multiples,
                   "above_threshold": sum(k > 1 for k in multiples),
                   "rmtp_rank": plain.rank, "rmtp_sigma": plain.sigma,
                   "rmtp_rank_tw99": margin.rank, "rmtp_sigma_tw99": margin.sigma}
            if ww is not None:
                row["ww_spikes"], row["ww_sigma"] = ww_on_matrix(ww, w, threads)
            rows.append(row)
    return rows


# --- report --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="rmtp's SVD workers, torch threads of the first svdvals loop, "
                             "WeightWatcher's BLAS threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--planted-seeds", type=int, default=2)
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI timing")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "analyze_spectrum_speed.json")
    args = parser.parse_args(argv)

    ww, ww_missing = _weightwatcher()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = get_plugins().architecture_for(args.model)
    model = arch.create(ModelSpec(name=args.model))
    matrices = rmtp_matrices(model, arch)
    shapes = sorted({tuple(m.shape) for m in matrices})
    print(f"{args.model}: {len(matrices)} matrices ({', '.join(f'{a}×{b}' for a, b in shapes)}), "
          f"{sum(m.numel() for m in matrices) / 1e6:.1f}M weights", flush=True)

    spectra = [(torch.linalg.svdvals(m).numpy(), tuple(m.shape)) for m in matrices]
    tools: dict[str, Callable[[], Any]] = {
        "rmtp": lambda: analyze_model(model, arch, threads=args.threads),
        "rmtp MP fits only": lambda: [fit_mp(s, shape) for s, shape in spectra],
        f"svdvals loop ({args.threads} thr)": lambda: svd_loop(matrices, args.threads),
        "svdvals loop (1 thr)": lambda: svd_loop(matrices, 1),
    }
    if ww is not None:
        tools["WeightWatcher"] = lambda: ww_analyze(ww, model, args.threads)
    if not args.no_cli:
        tools["rmtp CLI (end to end)"] = lambda: cli_run(args.model)
    times = time_rounds(tools, args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    floor_per_round = [min(a, b) for a, b in zip(times[f"svdvals loop ({args.threads} thr)"],
                                                  times["svdvals loop (1 thr)"])]
    ratios = {"rmtp / svdvals floor": statistics.median(r / f for r, f in zip(times["rmtp"], floor_per_round))}
    if ww is not None:
        ratios["rmtp / WeightWatcher"] = statistics.median(r / w for r, w in zip(times["rmtp"], times["WeightWatcher"]))

    print("planted spikes ...", flush=True)
    planted_rows = planted_comparison(ww, args.threads, args.planted_seeds)

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    ww_version = getattr(ww, "__version__", None) if ww is not None else None
    environment = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, load average {load} at the end",
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "numpy": np.__version__, "rmtp": rmtp.__version__,
        "weightwatcher": ww_version or f"not available ({ww_missing})",
        "threads": args.threads, "rounds": args.rounds,
    }
    settings = {"model": args.model, "weights": "timm random init, torch.manual_seed(0)",
                "rmtp": "analyze_model defaults: qkv split, min_dim 32, alpha 0.25, asymptotic edge, float32 SVDs",
                "weightwatcher": "analyze(mp_fit=True), other arguments default",
                "matrices": len(matrices)}

    print()
    print("analyze-spectrum speed (CPU)")
    for key, value in environment.items():
        print(f"  {key:14s} {value}")
    for key, value in settings.items():
        print(f"  {key:14s} {value}")
    print()
    width = max(len(n) for n in median) + 2
    print(f"  {'tool':{width}s} {'median s':>9s}  rounds")
    for name, value in median.items():
        print(f"  {name:{width}s} {value:9.2f}  " + " ".join(f"{t:.2f}" for t in times[name]))
    print()
    targets = {"rmtp / svdvals floor": 1.5, "rmtp / WeightWatcher": 0.2}
    for name, value in ratios.items():
        verdict = "meets" if value <= targets[name] else "MISSES"
        print(f"  {name:24s} {value:6.3f}×   (target ≤ {targets[name]}×: {verdict})")
    if ww is None:
        print(f"  WeightWatcher: not timed, it could not be imported ({ww_missing}); pip install 'rmtp[bench]'")

    print()
    print("planted spikes W = Σ θ uvᵀ + σG, σ = 0.02, θ = (0.5, 1.5, 3, 6) × σ(MN)^¼: 3 above the BBP threshold")
    header = f"  {'shape':>10s} {'seed':>4s} {'true k':>6s} {'rmtp k':>6s} {'rmtp σ':>9s} {'k TW.99':>7s}"
    header += f" {'WW k':>5s} {'WW σ':>9s}" if ww is not None else ""
    print(header)
    for row in planted_rows:
        line = (f"  {row['shape'][0]:>4d}×{row['shape'][1]:<5d} {row['seed']:>4d} {row['above_threshold']:>6d} "
                f"{row['rmtp_rank']:>6d} {row['rmtp_sigma']:>9.5f} {row['rmtp_rank_tw99']:>7d}")
        if ww is not None:
            line += f" {row['ww_spikes']:>5d} {row['ww_sigma']:>9.5f}"
        print(line)

    result = {"environment": environment, "settings": settings, "times_s": times, "median_s": median,
              "ratios": ratios, "targets": targets, "planted": planted_rows}
    if args.json:
        write_json_atomic(args.json, result)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
