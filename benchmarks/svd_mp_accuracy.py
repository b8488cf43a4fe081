"""Claim: svd-mp removes ≥80% of the pruned layers' params of the digits reference ViT, stays within
0.5 top-1 points of dense after ≤3 epochs of distillation, beats global magnitude pruning at the
same parameter count, and is really faster on CPU.

    python benchmarks/svd_mp_accuracy.py [--epochs 3] [--seeds 0,1,2] [--json benchmarks/results/svd_mp_accuracy.json]

Runs, in one process: svd-mp (MP edge, q/k/v fitted separately) → evaluate → distil → evaluate, then
global magnitude pruning of the same layers down to exactly the same number of parameters → same
distillation; once per fine-tuning seed (``--seeds``: shuffling and init of the run, never the val
split, which is data.split_seed 0 throughout), reporting the mean and the range. Latency of dense,
svd-mp and magnitude is measured in interleaved rounds (warmed up, order rotated, medians) so the
shared machine's drift cancels. Prints a table and writes JSON with the machine, versions and every
setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _seeds import interleaved_latency_ms, over_seeds, spread

from rmtp.reports.records import environment
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _recipe(steps: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    model = {**base["model"], "checkpoint": str(REPO / "models" / "digits_vit.safetensors")}
    return {"model": model, "data": {"name": "digits", "split_seed": 0}, "steps": steps, "seed": seed}


def _layer_params(step) -> tuple[int, int, int]:
    """(params before, params after, nonzeros after) summed over a prune step's layers."""
    rows = step.rows
    return (sum(r.params_before for r in rows), sum(r.params_after for r in rows), sum(r.nonzeros_after for r in rows))


def _run(steps: list[dict[str, Any]], seed: int = 0):
    return run_recipe(parse_recipe(_recipe(steps, seed), source=REPO / "benchmarks" / "svd_mp_accuracy.yaml"))


def _finetuned(runs: list) -> dict[str, Any]:
    """Top-1 after fine-tuning over the seeds: mean, min, max and each value."""
    return over_seeds("top1_finetuned", [run.report.steps[3].stats.top1 for run in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs after pruning (≤3 for the claim)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--margin", type=float, default=1.0, help="svd-mp margin on the MP edge")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds, comma-separated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest timings on a shared machine)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "svd_mp_accuracy.json")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    finetune = {"finetune": {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2,
                             "distill": {"weight": 1.0, "temperature": 2.0}, "l1": 1e-6}}
    svd_params = {"margin": args.margin, "split_qkv": True}
    svd_runs = [_run([{"prune": "svd-mp", "params": svd_params}, {"evaluate": {}}, finetune, {"evaluate": {}}], seed)
                for seed in seeds]
    svd = svd_runs[0]
    before, after, _ = _layer_params(svd.report.steps[0])
    biases = sum(m.bias.numel() for m in svd.dense_model.modules()
                 if isinstance(m, torch.nn.Linear) and m.bias is not None and m is not svd.dense_model.head)
    weights = before - biases
    sparsity = 1.0 - (after - biases) / weights  # magnitude keeps its biases: match total params exactly
    magnitude_runs = [_run([{"prune": "magnitude", "params": {"sparsity": sparsity, "scope": "global"}},
                            {"evaluate": {}}, finetune, {"evaluate": {}}], seed) for seed in seeds]
    magnitude = magnitude_runs[0]
    _, _, mag_nonzeros = _layer_params(magnitude.report.steps[0])

    shape = (1, 32, 32)
    models = {"dense": svd.dense_model, "svd-mp": svd.model, "magnitude": magnitude.model}
    latency = {batch: interleaved_latency_ms(models, shape, batch, args.rounds) for batch in (1, 32)}

    dense_top1 = svd.report.dense.top1
    rows = [
        {"model": "dense", "layer_params": before, "model_params": svd.report.dense.params,
         "macs": svd.report.dense.macs, "top1_pruned": dense_top1, "top1_finetuned": dense_top1,
         "top1_finetuned_min": dense_top1, "top1_finetuned_max": dense_top1, "top1_finetuned_seeds": [dense_top1]},
        {"model": f"svd-mp (margin {args.margin})", "layer_params": after, "model_params": svd.report.final.params,
         "macs": svd.report.final.macs, "top1_pruned": svd.report.steps[1].stats.top1, **_finetuned(svd_runs)},
        {"model": f"magnitude (global, {sparsity:.1%})", "layer_params": mag_nonzeros,
         "model_params": magnitude.report.final.nonzeros, "macs": magnitude.report.final.macs,
         "top1_pruned": magnitude.report.steps[1].stats.top1, **_finetuned(magnitude_runs)},
    ]
    for row, name in zip(rows, models):
        row["latency_ms_b1"] = latency[1][name]
        row["latency_ms_b32"] = latency[32][name]
        row["speedup_b1"] = latency[1]["dense"] / latency[1][name]
        row["speedup_b32"] = latency[32]["dense"] / latency[32][name]

    result = {
        "claim": "svd-mp: >=80% fewer params in pruned layers, top-1 within 0.5 of dense after <=3 epochs, "
                 "beats magnitude at equal params, real CPU speed-up",
        "environment": environment(),
        "settings": {"seeds": seeds, "epochs": args.epochs, "lr": args.lr, "svd_mp": svd_params,
                     "finetune": finetune["finetune"],
                     "latency_rounds": args.rounds, "threads": args.threads, "input": list(shape),
                     "model": _recipe([])["model"], "data": "digits val split (359 images), data.split_seed 0"},
        "rows": rows,
        "layer_param_reduction": 1 - after / before,
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(args.json, result)

    env = result["environment"]
    print(f"svd-mp vs magnitude on the digits reference ViT · torch {env['torch']} · timm {env['timm']} · "
          f"{env['machine']} · {args.threads} threads · {args.epochs} epochs distillation (lr {args.lr}) · "
          f"seeds {args.seeds}")
    header = f"{'model':<28} {'layer params':>13} {'MACs':>10} {'top-1 pruned':>13} {'top-1 +KD mean [min–max]':>25} " \
             f"{'ms b1':>8} {'×b1':>6} {'ms b32':>8} {'×b32':>6}"
    print(header)
    for row in rows:
        finetuned = spread(row, "top1_finetuned")
        print(f"{row['model']:<28} {row['layer_params']:>13,} {row['macs'] / 1e6:>9.2f}M {row['top1_pruned']:>12.2f}% "
              f"{finetuned:>25} {row['latency_ms_b1']:>8.2f} {row['speedup_b1']:>6.2f} "
              f"{row['latency_ms_b32']:>8.2f} {row['speedup_b32']:>6.2f}")
    print(f"pruned-layer params removed by svd-mp: {result['layer_param_reduction']:.1%}; "
          f"wrote {args.json} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
