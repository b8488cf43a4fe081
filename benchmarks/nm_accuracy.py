"""Claim: on the digits reference ViT, N:M with Marchenko–Pastur layer budgets is at least as accurate
as plain magnitude N:M at equal (sparse-execution) MACs, and 2:4 ends within 1 top-1 point of dense
after ≤ 3 epochs of distillation.

    python benchmarks/nm_accuracy.py [--epochs 3] [--seeds 0] [--json benchmarks/results/nm_accuracy.json]

For each pattern (2:4 and 4:8) it runs, in one process, prune → evaluate → distil → evaluate for:

* ``uniform``: plain magnitude N:M on every block layer (MACs of the pruned layers: n/m = 50%);
* ``mp, S:M``: MP budget choosing per layer between N:M and a sparser S:M (1:4 / 2:8) or dense,
  at the uniform run's 50% — equal MACs to ``uniform``;
* ``score-only budget``: the same knapsack at 60% with N:M or dense per layer but z_scale 0 (layer
  choice by magnitude scores alone) — the plain-magnitude allocation at equal MACs to the next row;
* ``mp``: the MP budget (z_scale 0.5) at 60%, N:M or dense per layer;
* ``mp + permute + restore``: the full method at 60%, and at 50% with the sparser pattern.

All runs score weights by magnitude; only the budget, permutation and restore differ. MACs are
sparse-execution MACs: an n:m layer counts n/m of its dense MACs (what sparse tensor cores execute),
summed over the pruned layers ("layer MACs") and for the whole model with attention ("model MACs").
With ``--seeds 0,1,2`` every run is repeated per fine-tuning seed (the val split stays
``data.split_seed: 0``) and top-1 after distillation is the mean, with the range. Prints a table
and writes JSON with the machine, versions and every setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _seeds import over_seeds

from rmtp.plugins import load_plugins
from rmtp.reports.records import environment
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _plugins():
    """The installed plugins; each recipe carries them into its run (``parse_recipe(plugins=...)``)."""
    return load_plugins()


def _recipe(steps: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    model = {**base["model"], "checkpoint": str(REPO / "models" / "digits_vit.safetensors")}
    return {"model": model, "data": {"name": "digits", "calibration_size": 256, "split_seed": 0}, "steps": steps,
            "seed": seed}


def _configs(n: int, m: int) -> list[tuple[str, dict[str, Any]]]:
    sparser = f"{n // 2}:{m}"
    common = {"n": n, "m": m, "score": "magnitude"}
    return [
        ("uniform (plain magnitude)", {**common, "budget": "uniform"}),
        (f"mp, {sparser}|{n}:{m}|dense @50%", {**common, "target_macs": 0.5, "patterns": [sparser, "dense"]}),
        ("score-only budget @60% (z=0)", {**common, "target_macs": 0.6, "z_scale": 0.0}),
        ("mp @60%", {**common, "target_macs": 0.6, "z_scale": 0.5}),
        (f"mp+perm+restore, {sparser}|{n}:{m}|dense @50%",
         {**common, "target_macs": 0.5, "patterns": [sparser, "dense"], "permute": True, "restore": True}),
        ("mp+perm+restore @60%", {**common, "target_macs": 0.6, "permute": True, "restore": True}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs after pruning (≤3 for the claim)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--patterns", default="2:4,4:8", help="comma-separated N:M patterns to run")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "nm_accuracy.json")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plugins = _plugins()
    finetune = {"finetune": {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2,
                             "distill": {"weight": 1.0, "temperature": 2.0}}}

    rows: list[dict[str, Any]] = []
    dense: dict[str, Any] | None = None
    for text in args.patterns.split(","):
        n, m = (int(v) for v in text.split(":"))
        for label, params in _configs(n, m):
            run_started = time.perf_counter()
            steps = [{"prune": "n:m", "params": params}, {"evaluate": {}}, finetune, {"evaluate": {}}]
            reports = [run_recipe(parse_recipe(_recipe(steps, seed), source=REPO / "benchmarks" / "nm_accuracy.yaml",
                                               plugins=plugins)).report for seed in seeds]
            report = reports[0]
            finetuned = [r.steps[3].stats.top1 for r in reports]
            layer_rows = [r for r in report.steps[0].rows if r.detail.get("MACs")]
            layer_macs = sum(r.detail["MACs"] for r in layer_rows)
            sparse_macs = sum(r.detail["sparse MACs"] for r in layer_rows)
            patterns: dict[str, int] = {}
            for r in layer_rows:
                patterns[r.detail["pattern"]] = patterns.get(r.detail["pattern"], 0) + 1
            if dense is None:
                dense = {"top1": report.dense.top1, "macs": report.dense.macs, "layer_macs": layer_macs,
                         "layer_weights": sum(r.params_before for r in report.steps[0].rows)}
            rows.append({
                "pattern": text, "run": label, "params": params,
                "layer_mac_share": sparse_macs / layer_macs,
                "model_macs": report.final.macs - (layer_macs - sparse_macs),
                "layers": patterns,
                "layer_nonzeros": sum(r.nonzeros_after for r in report.steps[0].rows),
                "top1_pruned": report.steps[1].stats.top1,
                "top1_pruned_seeds": [r.steps[1].stats.top1 for r in reports],
                **over_seeds("top1_finetuned", finetuned),
                "seconds": time.perf_counter() - run_started,
            })
            print(f"  {text} {label}: {rows[-1]['top1_pruned']:.2f}% → {rows[-1]['top1_finetuned']:.2f}% "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)

    result = {
        "claim": "n:m: MP budgets at least as accurate as plain magnitude N:M at equal sparse-execution MACs; "
                 "2:4 within 1 top-1 point of dense after <=3 epochs of distillation",
        "environment": {**environment(), "threads": str(args.threads)},
        "settings": {"seeds": seeds, "epochs": args.epochs, "lr": args.lr, "finetune": finetune["finetune"],
                     "threads": args.threads, "model": _recipe([])["model"], "calibration_size": 256,
                     "data": "digits val split (359 images), data.split_seed 0",
                     "layers": "the 24 block Linears (qkv, proj, fc1, fc2); head and patch embedding dense"},
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(args.json, result)

    env = result["environment"]
    print(f"\nn:m on the digits reference ViT · torch {env['torch']} · timm {env['timm']} · {env['machine']} · "
          f"{args.threads} thread(s) · magnitude scores · {args.epochs} epochs distillation (lr {args.lr}) · "
          f"seeds {args.seeds}")
    header = f"{'pattern':<7} {'run':<36} {'layer MACs':>10} {'model MACs':>10} {'layers (pattern×count)':<26} " \
             f"{'top-1 pruned':>12} {'top-1 +KD mean [min–max]':>25}"
    print(header)
    print(f"{'dense':<7} {'':<36} {1.0:>10.1%} {dense['macs'] / 1e6:>9.2f}M {'':<26} {dense['top1']:>11.2f}% "
          f"{dense['top1']:>24.2f}%")
    for row in rows:
        layers = " ".join(f"{k}×{v}" for k, v in sorted(row["layers"].items()))
        print(f"{row['pattern']:<7} {row['run']:<36} {row['layer_mac_share']:>10.1%} {row['model_macs'] / 1e6:>9.2f}M "
              f"{layers:<26} {row['top1_pruned']:>11.2f}% "
              f"{row['top1_finetuned']:>9.2f}% [{row['top1_finetuned_min']:.2f}–{row['top1_finetuned_max']:.2f}]")
    print(f"wrote {args.json} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
