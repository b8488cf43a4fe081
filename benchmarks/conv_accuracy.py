"""rmtp's pruners on the digits reference ResNet (models/digits_resnet.safetensors): top-1 before and
after ≤3 epochs of distillation, at matched budgets, and CPU latency.

    python benchmarks/conv_accuracy.py [--epochs 3] [--seeds 0,1,2] [--json benchmarks/results/conv_accuracy.json]

The model is a bottleneck resnet26 (layers [2, 2, 2, 2], channels [32, 40, 56, 64], 1×32×32 input,
460k params; models/README.md). The "layers" are the ones svd-mp, magnitude and n:m act on by default:
every block conv1/conv2/conv3 and shortcut downsample conv (28 convs, no biases; stem and fc stay
dense). Rows, each pruned → evaluated → distilled from the dense model → evaluated:

* ``svd-mp`` at its own MP edge (``--margin``), and global magnitude pruning of the same layers down
  to exactly the same number of params;
* ``spp`` at ``ratios: [0.3, 0.5]`` (one search, ``structures: [channels]``: the conv1/conv2 output
  channels of every bottleneck), each next to svd-mp with ``target_params`` giving the same layer
  params. spp's ratio is a share of the gated branches' params (conv1, bn1, conv2, bn2, conv3 of each
  bottleneck; the shortcut convs are not gated), so of all 28 convs it removes less (the table's
  "removed"; the JSON's ``spp_share_removed`` is the share of the gated branches);
* ``n:m`` 2:4 with ``budget: uniform`` next to ``budget: mp`` (``target_macs: 0.5``,
  ``patterns: ["1:4", dense]``) at equal sparse-execution MACs of the layers (an n:m layer costs n/m).

Latency of dense, svd-mp and spp 50% at batch 32 is measured in interleaved rounds (medians), so the
shared machine's drift cancels. With several ``--seeds`` every row is repeated per seed (fine-tuning
shuffle and the spp search's calibration batches; the val split stays data.split_seed 0); top-1 is the
mean with the range. Prints a table and writes JSON with the machine, versions and every setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _seeds import aggregate, interleaved_latency_ms, spread

import rmtp
from rmtp import measure
from rmtp.data import DataSpec, build_data
from rmtp.reports.records import environment
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.atomic import write_json_atomic
from rmtp.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "models" / "digits_resnet.json"
SPP_LEVELS = (0.3, 0.5)
SHAPE = (1, 32, 32)
LATENCY_BATCH = 32


def _model_section() -> dict[str, Any]:
    card = json.loads(CARD.read_text())
    return {"name": card["timm_name"], "kwargs": card["kwargs"],
            "checkpoint": str(REPO / "models" / "digits_resnet.safetensors")}


def _data_section(calibration: int) -> dict[str, Any]:
    return {"name": "digits", "img_size": SHAPE[1], "calibration_size": calibration, "split_seed": 0}


def _run(steps: list[dict[str, Any]], seed: int, calibration: int, output: Path | None = None):
    recipe = {"model": _model_section(), "data": _data_section(calibration), "steps": steps, "seed": seed}
    if output is not None:
        recipe["output"] = {"dir": str(output), "overwrite": True}
    return run_recipe(parse_recipe(recipe, source=REPO / "benchmarks" / "conv_accuracy.yaml"))


def _layer_figures(rows) -> dict[str, Any]:
    """Params before/after, nonzeros after and sparse-execution MACs of a prune step's acted-on layers."""
    acted = [r for r in rows if not r.skipped or r.skipped.startswith("kept dense")]
    return {"layers": [r.layer for r in acted], "skipped": {r.layer: r.skipped for r in rows if r not in acted},
            "before": sum(r.params_before for r in acted), "after": sum(r.params_after for r in acted),
            "nonzeros": sum(r.nonzeros_after for r in acted)}


def _module_params(model: torch.nn.Module, names: list[str]) -> int:
    """Params now held by the modules at ``names`` (a split layer counts both factors)."""
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def _nm_macs(rows) -> tuple[int, int]:
    """(dense MACs, sparse-execution MACs) of an n:m step's layers, per image."""
    return sum(r.detail.get("MACs", 0) for r in rows), sum(r.detail.get("sparse MACs", 0) for r in rows)


def _pipeline_row(name: str, run, layer_params: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": name, "layer_params": layer_params, "model_params": run.report.final.params,
            "model_nonzeros": run.report.final.nonzeros, "macs": run.report.final.macs,
            "top1_pruned": run.report.steps[1].stats.top1, "top1_finetuned": run.report.steps[3].stats.top1,
            **(extra or {})}


def _measure(args: argparse.Namespace, seed: int) -> tuple[list[dict[str, Any]], dict[str, torch.nn.Module], dict]:
    """One seed: (rows, the models to time, notes)."""
    finetune = {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2, "seed": seed,
                "distill": {"weight": 1.0, "temperature": 2.0}}
    tail = [{"evaluate": {}}, {"finetune": finetune}, {"evaluate": {}}]
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}

    # svd-mp at its own edge, and magnitude at exactly its params.
    svd_params = {"margin": args.margin}
    svd = _run([{"prune": "svd-mp", "params": svd_params}, *tail], seed, args.calibration)
    dense = svd.dense_model
    figures = _layer_figures(svd.report.steps[0].rows)
    layers, before = figures["layers"], figures["before"]
    biases = sum(dense.get_submodule(n).bias.numel() for n in layers if dense.get_submodule(n).bias is not None)
    weights = before - biases
    dense_top1 = svd.report.dense.top1
    notes.update(layers=layers, layer_params=before, svd_skipped=figures["skipped"],
                 svd_ranks={r.layer: r.detail.get("rank") for r in svd.report.steps[0].rows})
    rows.append({"model": "dense", "layer_params": before, "model_params": svd.report.dense.params,
                 "model_nonzeros": svd.report.dense.params, "macs": svd.report.dense.macs,
                 "top1_pruned": dense_top1, "top1_finetuned": dense_top1})
    rows.append(_pipeline_row(f"svd-mp (margin {args.margin:g})", svd, figures["after"]))
    sparsity = 1.0 - (figures["after"] - biases) / weights  # magnitude keeps its biases: match params exactly
    magnitude = _run([{"prune": "magnitude", "params": {"sparsity": sparsity, "scope": "global"}}, *tail],
                     seed, args.calibration)
    mag = _layer_figures(magnitude.report.steps[0].rows)
    if mag["layers"] != layers:
        raise RuntimeError(f"magnitude pruned other layers than svd-mp: {mag['layers']} vs {layers}")
    rows.append(_pipeline_row(f"magnitude global {sparsity:.1%}", magnitude, mag["nonzeros"],
                              {"sparsity": sparsity}))
    models = {"dense": dense, "svd-mp": svd.model}

    # spp 30% / 50% from one search, each next to svd-mp at the same layer params.
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        spp_params = {"ratios": list(SPP_LEVELS), "structures": ["channels"]}
        _run([{"prune": "spp", "params": spp_params}], seed, args.calibration, Path(tmp) / "spp")
        notes["spp_search_seconds"] = time.perf_counter() - started
        path = json.loads((Path(tmp) / "spp" / "spp_path.json").read_text())
        notes["spp_params"] = path["params"]
        bundle = build_data(DataSpec(**_data_section(args.calibration)), dense)
        val = bundle.loader("val")
        for ratio in SPP_LEVELS:
            model = rmtp.load(Path(tmp) / "spp" / f"spp-{ratio:.2f}").model
            level = path["levels"][f"{ratio:g}"]
            kept = _module_params(model, layers)
            summary = measure.model_summary(model, SHAPE)
            pruned_top1 = measure.top1(model, val, device="cpu")
            train(model, bundle, TrainConfig(**finetune), device="cpu", teacher=dense)
            rows.append({"model": f"spp ratio {ratio:g} (channels)", "layer_params": kept,
                         "model_params": summary["params"], "model_nonzeros": summary["params"],
                         "macs": summary["macs"], "top1_pruned": pruned_top1,
                         "top1_finetuned": measure.top1(model, val, device="cpu"),
                         "spp_share_removed": level["param_share_removed"],
                         "groups_removed": f"{level['groups_removed']}/{level['groups']}"})
            if ratio == 0.5:
                models["spp 0.5"] = model
            target = (kept - biases) / weights  # svd-mp's budget counts weights; it keeps every bias
            matched = _run([{"prune": "svd-mp", "params": {"margin": args.margin, "target_params": target}}, *tail],
                           seed, args.calibration)
            rows.append(_pipeline_row(f"svd-mp, params of spp {ratio:g}", matched,
                                      _layer_figures(matched.report.steps[0].rows)["after"],
                                      {"target_params": target}))

    # n:m 2:4: uniform vs the MP budget at equal sparse-execution MACs.
    for name, params in (("n:m 2:4 uniform", {"n": 2, "m": 4, "budget": "uniform"}),
                         ("n:m mp 1:4|2:4|dense @50%", {"n": 2, "m": 4, "budget": "mp", "target_macs": 0.5,
                                                         "patterns": ["1:4", "dense"]})):
        run = _run([{"prune": "n:m", "params": params}, *tail], seed, args.calibration)
        step_rows = run.report.steps[0].rows
        layer_macs, sparse_macs = _nm_macs(step_rows)
        patterns: dict[str, int] = {}
        for r in step_rows:
            key = r.detail.get("pattern") or f"skipped: {r.skipped}"
            patterns[key] = patterns.get(key, 0) + 1
        rows.append(_pipeline_row(name, run, _layer_figures(step_rows)["nonzeros"], {
            "nm_params": params, "patterns": patterns, "layer_macs": layer_macs, "layer_sparse_macs": sparse_macs,
            "macs": run.report.final.macs - layer_macs + sparse_macs,  # sparse execution of the pruned layers
            "skipped": {r.layer: r.skipped for r in step_rows if r.skipped and not r.skipped.startswith("kept")}}))
    return rows, models, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs after pruning (≤3)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--margin", type=float, default=1.0, help="svd-mp margin on the MP edge")
    parser.add_argument("--calibration", type=int, default=512, help="calibration images (spp search)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest timings on a shared machine)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "conv_accuracy.json")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    measured = [_measure(args, seed) for seed in seeds]
    rows = aggregate([m[0] for m in measured])
    for row in rows:  # share of the dense layers' params gone (nonzeros for masks)
        row["removed"] = 1 - row["layer_params"] / rows[0]["layer_params"]
    models, notes = measured[0][1], measured[0][2]
    latency = interleaved_latency_ms(models, SHAPE, LATENCY_BATCH, args.rounds)
    for row in rows:
        key = {"dense": "dense", f"svd-mp (margin {args.margin:g})": "svd-mp",
               "spp ratio 0.5 (channels)": "spp 0.5"}.get(row["model"])
        if key is not None:
            row[f"latency_ms_b{LATENCY_BATCH}"] = latency[key]
            row[f"speedup_b{LATENCY_BATCH}"] = latency["dense"] / latency[key]

    result = {
        "claim": "the conv path on a real trained ResNet: svd-mp vs magnitude at equal params, spp vs svd-mp at "
                 "equal params, n:m uniform vs MP budget at equal sparse MACs; top-1 before/after <=3 epochs KD",
        "environment": environment(),
        "settings": {"seeds": seeds, "epochs": args.epochs, "lr": args.lr, "margin": args.margin,
                     "finetune": {"epochs": args.epochs, "lr": args.lr, "warmup_epochs": 0.2,
                                  "distill": {"weight": 1.0, "temperature": 2.0}, "seed": "the row's seed"},
                     "calibration_size": args.calibration, "latency_rounds": args.rounds,
                     "latency_batch": LATENCY_BATCH, "threads": args.threads, "input": list(SHAPE),
                     "model": _model_section(), "data": "digits val split (359 images), data.split_seed 0",
                     "layer_params_are_of": "the block conv1/conv2/conv3 and downsample convs (28 convs)",
                     "nm_macs": "sparse execution: an n:m layer's MACs times n/m, other layers dense"},
        "rows": rows,
        "notes": notes,
        "spp_search_seconds_per_seed": [m[2].get("spp_search_seconds") for m in measured],
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(args.json, result)

    env = result["environment"]
    print(f"rmtp pruners on the digits reference ResNet (resnet26, 460k params) · torch {env['torch']} · "
          f"timm {env['timm']} · {env['machine']} · {args.threads} threads · {args.epochs} epochs distillation "
          f"(lr {args.lr}) · seeds {args.seeds} (mean [min–max]; sizes of seed {seeds[0]})")
    print(f"{'model':<30} {'removed':>8} {'layer params':>13} {'model params':>13} {'MACs':>8} {'top-1 pruned':>24} "
          f"{'top-1 +KD':>24} {'ms b32':>7} {'×b32':>5}")

    for row in rows:
        timing = (f" {row[f'latency_ms_b{LATENCY_BATCH}']:>7.2f} {row[f'speedup_b{LATENCY_BATCH}']:>5.2f}"
                  if f"latency_ms_b{LATENCY_BATCH}" in row else "")
        print(f"{row['model']:<30} {row['removed']:>8.1%} {row['layer_params']:>13,} {row['model_params']:>13,} "
              f"{row['macs'] / 1e6:>7.2f}M {spread(row, 'top1_pruned'):>24} "
              f"{spread(row, 'top1_finetuned'):>24}{timing}")
    print("removed, layer params: of the 28 block convs; nonzeros for magnitude and n:m (masks), stored params for "
          "svd-mp and spp; n:m MACs: sparse execution of its layers")
    print(f"wrote {args.json} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
