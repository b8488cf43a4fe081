"""spp on the digits reference ViT: the family at 30/50/70% params removed from one search, before and
after ≤3 epochs of distillation, next to svd-mp at the same parameter count.

    python benchmarks/spp_accuracy.py [--epochs 3] [--seeds 0,1,2] [--json benchmarks/results/spp_accuracy.json]

"Params removed" is the share of the block layers' params (qkv, proj, fc1, fc2 with biases: the
layers both pruners act on by default; 668,736 in the dense model) that the slicing removed.
One spp run (default search settings, ``ratios: [0.3, 0.5, 0.7]``) saves the three variants;
each is evaluated, distilled from the dense model with the repo's training loop and evaluated
again. svd-mp runs with ``target_params`` chosen so its block layers hold the same number of
params as the spp variant, then gets the same distillation. With several ``--seeds`` everything
is repeated per seed (the spp search's calibration batches and the fine-tuning change; the val
split stays ``data.split_seed: 0``); top-1 is the mean, with the range. Prints a table and writes
JSON with the machine, versions and every setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _seeds import aggregate, spread

import rmtp
from rmtp import measure
from rmtp.data import build_data
from rmtp.reports.records import environment
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.atomic import write_json_atomic
from rmtp.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
LEVELS = (0.3, 0.5, 0.7)


def _recipe(steps: list[dict[str, Any]], output: Path | None = None, calibration: int = 512,
            seed: int = 0) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    model = {**base["model"], "checkpoint": str(REPO / "models" / "digits_vit.safetensors")}
    recipe = {"model": model, "data": {"name": "digits", "calibration_size": calibration, "split_seed": 0},
              "steps": steps, "seed": seed}
    if output is not None:
        recipe["output"] = {"dir": str(output), "overwrite": True}
    return recipe


def _run(recipe: dict[str, Any]):
    return run_recipe(parse_recipe(recipe, source=REPO / "benchmarks" / "spp_accuracy.yaml"))


def _block_layers(model: torch.nn.Module) -> tuple[int, int]:
    """(weights, biases) of the dense model's qkv/proj/fc1/fc2 layers."""
    weights = biases = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") \
                and name.startswith("blocks."):
            weights += module.weight.numel()
            biases += module.bias.numel() if module.bias is not None else 0
    return weights, biases


def _measure(args: argparse.Namespace, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """One seed: (rows, the spp path JSON, search + extraction seconds)."""
    finetune = {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2, "seed": seed,
                "distill": {"weight": 1.0, "temperature": 2.0}}
    spp_params = {"ratios": list(LEVELS)}

    with tempfile.TemporaryDirectory() as tmp:
        search_started = time.perf_counter()
        spp = _run(_recipe([{"prune": "spp", "params": spp_params}], Path(tmp) / "spp", args.calibration, seed))
        search_seconds = time.perf_counter() - search_started
        dense = spp.dense_model
        data_recipe = parse_recipe(_recipe([{"evaluate": {}}]), source=REPO / "benchmarks" / "spp_accuracy.yaml")
        bundle = build_data(data_recipe.data, dense)
        shape = tuple(bundle.val[0][0].shape)
        val = bundle.loader("val")
        dense_top1 = measure.top1(dense, val, device="cpu")
        dense_summary = measure.model_summary(dense, shape)
        weights, biases = _block_layers(dense)
        layer_params = weights + biases
        path = json.loads((Path(tmp) / "spp" / "spp_path.json").read_text())
        rows: list[dict[str, Any]] = [{"model": "dense", "removed": 0.0, "layer_params": layer_params,
                                       "model_params": dense_summary["params"], "macs": dense_summary["macs"],
                                       "top1_pruned": dense_top1, "top1_finetuned": dense_top1}]
        for ratio in LEVELS:
            name = f"spp-{ratio:.2f}"
            model = rmtp.load(Path(tmp) / "spp" / name).model
            level = path["levels"][f"{ratio:g}"]
            summary = measure.model_summary(model, shape)
            pruned_top1 = measure.top1(model, val, device="cpu")
            train(model, bundle, TrainConfig(**finetune), device="cpu", teacher=dense)
            kept = layer_params - level["params_removed"]
            rows.append({"model": f"spp {ratio:.0%}", "removed": level["param_share_removed"],
                         "groups_removed": f"{level['groups_removed']}/{level['groups']}",
                         "layer_params": kept, "model_params": summary["params"], "macs": summary["macs"],
                         "top1_pruned": pruned_top1, "top1_finetuned": measure.top1(model, val, device="cpu")})
            target = (kept - biases) / weights  # svd-mp keeps every bias; its budget counts weights
            svd = _run(_recipe([{"prune": "svd-mp", "params": {"target_params": target}}, {"evaluate": {}},
                                {"finetune": finetune}, {"evaluate": {}}],
                               seed=seed))
            svd_layers = sum(r.params_after for r in svd.report.steps[0].rows)
            rows.append({"model": f"svd-mp, params of spp {ratio:.0%}", "target_params": target,
                         "removed": 1 - svd_layers / layer_params,
                         "layer_params": svd_layers, "model_params": svd.report.final.params,
                         "macs": svd.report.final.macs, "top1_pruned": svd.report.steps[1].stats.top1,
                         "top1_finetuned": svd.report.steps[3].stats.top1})
    return rows, path, search_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs after pruning (≤3)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--calibration", type=int, default=512, help="calibration images for the spp search")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "spp_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    measured = [_measure(args, seed) for seed in seeds]
    rows = aggregate([m[0] for m in measured])
    path, search_seconds = measured[0][1], measured[0][2]
    finetune = {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2,
                "distill": {"weight": 1.0, "temperature": 2.0}}

    result = {
        "claim": "spp: one search gives 30/50/70% structured families; top-1 before/after <=3 epochs KD, "
                 "next to svd-mp at equal block-layer params",
        "environment": environment(),
        "settings": {"seeds": seeds, "epochs": args.epochs, "finetune": finetune, "spp": path["params"],
                     "spp_search_and_extraction_seconds": search_seconds, "threads": args.threads,
                     "calibration_size": args.calibration, "model": _recipe([])["model"],
                     "data": "digits val split (359 images), data.split_seed 0",
                     "removed_is_of": "params of the blocks' qkv/proj/fc1/fc2 (weights + biases)"},
        "rows": rows,
        "spp_entered": [m[1]["entered"] for m in measured],
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(args.json, result)

    env = result["environment"]
    print(f"spp vs svd-mp on the digits reference ViT · torch {env['torch']} · timm {env['timm']} · "
          f"{env['machine']} · {args.threads} threads · {args.epochs} epochs distillation (lr {args.lr}) · "
          f"seeds {args.seeds} (mean [min–max]; sizes of seed {seeds[0]})")
    print(f"{'model':<30} {'removed':>8} {'layer params':>13} {'model params':>13} {'MACs':>9} "
          f"{'top-1 pruned':>24} {'top-1 +KD':>24}")

    for row in rows:
        print(f"{row['model']:<30} {row['removed']:>8.1%} {row['layer_params']:>13,} {row['model_params']:>13,} "
              f"{row['macs'] / 1e6:>8.2f}M {spread(row, 'top1_pruned'):>24} {spread(row, 'top1_finetuned'):>24}")
    print(f"spp search + extraction {search_seconds:.0f} s (groups entered the path: {result['spp_entered']}); "
          f"wrote {args.json} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
