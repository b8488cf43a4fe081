"""Claim: a pruned model exported by ``rmtp export`` keeps its speed-up over dense in ONNX Runtime on
the CPU, next to PyTorch's: the digits reference ViT after svd-mp (the quickstart) and after ToMe.

    python benchmarks/export_latency.py [--threads 1] [--rounds 15] [--json benchmarks/results/export_latency.json]

Builds, in one process: the dense digits ViT (models/digits_vit.safetensors), its svd-mp pruning at
the MP edge (``recipes/quickstart.yaml``'s prune step; its fine-tune is skipped: speed does not
depend on the weights' values, only on the rank kept) and ToMe r=8 (``recipes/tome.yaml``), each
saved as an rmtp output folder. Each is exported with :func:`rmtp.export.export_model` to ONNX at
batch 1 and at batch 32 (static graphs), the pruned ones with ``check=True`` on 64 digits val
images (the dense model on a seeded random batch), then timed: PyTorch eager (``inference_mode``)
and ONNX Runtime's CPU provider, all six in one :func:`rmtp.measure.interleaved_timing` per batch
size (warm-up, rounds whose order rotates), threads fixed for both runtimes (torch intra-op threads;
ORT ``intra_op_num_threads``, one inter-op thread, sequential execution). Ratios are paired: per
round, dense / pruned within a runtime and PyTorch / ORT for one model; the table gives medians and
the IQR of the per-round figures. Prints a table and writes JSON with the machine, versions and
every setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from rmtp import measure
from rmtp.export import export_model
from rmtp.reports.records import environment
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp.storage.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dense", "svd-mp", "tome")


def _prune_steps(recipe_name: str) -> list[dict[str, Any]]:
    """The prune steps of ``recipes/<recipe_name>.yaml`` (its fine-tune and evaluations skipped)."""
    recipe = yaml.safe_load((REPO / "recipes" / f"{recipe_name}.yaml").read_text())
    steps = [step for step in recipe["steps"] if "prune" in step]
    for step in steps:
        (step.get("params") or {}).pop("visualize", None)  # no token-map PNG here
    return steps


def build_runs(root: Path) -> tuple[torch.nn.Module, dict[str, Path], dict[str, Any]]:
    """(the dense model, {pruned name: output folder}, the recipes' model section)."""
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    model = {**base["model"], "checkpoint": str(REPO / "models" / "digits_vit.safetensors")}
    folders, dense = {}, None
    for name, recipe_name in (("svd-mp", "quickstart"), ("tome", "tome")):
        raw = {"model": model, "data": {"name": "digits", "split_seed": 0}, "steps": _prune_steps(recipe_name),
               "output": {"dir": str(root / name)}, "seed": 0}
        result = run_recipe(parse_recipe(raw, source=REPO / "benchmarks" / "export_latency.yaml"))
        folders[name], dense = root / name, result.dense_model
    return dense.eval(), folders, {**model, "steps": {n: _prune_steps(r) for n, r in (("svd-mp", "quickstart"),
                                                                                     ("tome", "tome"))}}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_batch(torch_models: dict[str, torch.nn.Module], onnx_files: dict[str, Path], batch: int,
                  shape: tuple[int, ...], threads: int, rounds: int) -> dict[str, Any]:
    sessions = {name: ort_session(path, threads) for name, path in onnx_files.items()}
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    feed = x.numpy()
    labels, fns = [], []
    for name in MODELS:
        model, session = torch_models[name], sessions[name]
        input_name = session.get_inputs()[0].name
        labels += [("pytorch", name), ("onnxruntime", name)]
        fns += [lambda m=model: m(x), lambda s=session, n=input_name: s.run(None, {n: feed})]
    with measure.torch_threads(threads), torch.inference_mode():
        timings = measure.interleaved_timing(fns, rounds=rounds,
                                             on_round=lambda r: print(f"batch {batch}: round {r}/{rounds}",
                                                                      file=sys.stderr))
    seconds = {label: t.seconds for label, t in zip(labels, timings)}
    rows = []
    for name in MODELS:
        row: dict[str, Any] = {"model": name, "batch": batch}
        for runtime in ("pytorch", "onnxruntime"):
            own, dense = seconds[(runtime, name)], seconds[(runtime, "dense")]
            row[f"{runtime}_ms"] = measure.Spread.of([s * 1e3 for s in own]).to_dict()
            row[f"{runtime}_vs_dense"] = measure.Spread.of([d / s for d, s in zip(dense, own)]).to_dict()
        row["onnxruntime_vs_pytorch"] = measure.Spread.of(
            [p / o for p, o in zip(seconds[("pytorch", name)], seconds[("onnxruntime", name)])]).to_dict()
        row["iters_per_block"] = {runtime: timings[labels.index((runtime, name))].iters
                                  for runtime in ("pytorch", "onnxruntime")}
        rows.append(row)
    return {"batch": batch, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of both runtimes (1: steadiest timings on a shared machine)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--check-images", type=int, default=64)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "export_latency.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="rmtp-export-latency-") as tmp:
        root = Path(tmp)
        dense, folders, model_settings = build_runs(root)
        import rmtp

        torch_models = {"dense": dense, **{name: rmtp.load(folder).model for name, folder in folders.items()}}
        shape = (1, 32, 32)
        exports, results = [], []
        for batch in batches:
            files = {}
            for name in MODELS:
                source = dense if name == "dense" else folders[name]
                report = export_model(source, root / f"{name}-b{batch}.onnx", format="onnx", batch=batch,
                                      check=True, check_images=max(args.check_images, batch),
                                      input_shape=shape if name == "dense" else None)
                files[name] = report.path
                exports.append({"model": name, **report.to_dict(), "path": report.path.name})
            results.append(measure_batch(torch_models, files, batch, shape, args.threads, args.rounds))
    import onnxruntime

    env = environment()
    env.update({"onnxruntime": onnxruntime.__version__, "threads": str(args.threads)})
    report = {
        "benchmark": "export_latency",
        "command": "python benchmarks/export_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "settings": {"model": model_settings, "input_shape": list(shape), "batches": batches,
                     "threads": args.threads, "rounds": args.rounds,
                     "onnx": "torch.onnx.export TorchScript exporter, opset 17, static batch; onnxruntime "
                             "CPUExecutionProvider, intra_op_num_threads=threads, inter_op_num_threads=1, "
                             "ORT_SEQUENTIAL, default graph optimisations",
                     "pytorch": "eager, torch.inference_mode, torch.set_num_threads(threads)",
                     "timing": "rmtp.measure.interleaved_timing: warm-up >= 0.3 s per callable, blocks of "
                               "~0.1 s, order rotated each round; medians and IQR over rounds; ratios per round",
                     "weights": "digits_vit.safetensors, pruned, not fine-tuned (speed does not depend on it)"},
        "exports": exports,
        "results": results,
    }
    print_table(report)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


def _fmt(spread: dict[str, float], unit: str = "") -> str:
    if unit == "×":
        return f"×{spread['median']:.2f} [{spread['q1']:.2f}–{spread['q3']:.2f}]"
    return f"{spread['median']:.2f} [{spread['q1']:.2f}–{spread['q3']:.2f}]"


def print_table(report: dict[str, Any]) -> None:
    env, s = report["environment"], report["settings"]
    print(f"\ndigits ViT {tuple(s['input_shape'])}, threads={s['threads']}, {s['rounds']} interleaved rounds · "
          f"{env['cpu']} · torch {env['torch']} · onnxruntime {env['onnxruntime']} · python {env['python']}")
    header = ("| batch | model | PyTorch ms | ONNX Runtime ms | PyTorch × dense | ONNX Runtime × dense | "
              "ORT vs PyTorch |")
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for block in report["results"]:
        for r in block["rows"]:
            print(f"| {r['batch']} | {r['model']} | {_fmt(r['pytorch_ms'])} | {_fmt(r['onnxruntime_ms'])} | "
                  f"{_fmt(r['pytorch_vs_dense'], '×')} | {_fmt(r['onnxruntime_vs_dense'], '×')} | "
                  f"{_fmt(r['onnxruntime_vs_pytorch'], '×')} |")
    print("\nexports (check: max |ONNX Runtime − PyTorch| on the inputs named):")
    for e in report["exports"]:
        print(f"  {e['model']:<7} batch {e['batch']:>2}: {e['bytes'] / 1e6:.2f} MB, max diff {e['max_abs_diff']:.1e} "
              f"on {e['images']} {e['inputs'].split(' (')[0]}")


if __name__ == "__main__":
    main()
