"""Budgets in measured speed (issue 15): never slower by default, and target_speedup reached.

    python benchmarks/latency_budgets.py                 # the issue's settings (~10 min on 2 cores)
    python benchmarks/latency_budgets.py --epochs 0 --rounds 5 --json /tmp/lb.json --figure /tmp/lb.png  # smoke

1. digits ResNet (models/digits_resnet.*): svd-mp at its MP edge with ``only_if_faster`` (the
   default) and without, each timed against dense at batch 1 and 32, top-1 after ``--epochs``
   epochs of distillation next to the dense model's.
2. digits ViT (models/digits_vit.*): ``target_speedup`` (default 1.5, latency batch 32) for svd-mp,
   spp, token-cls (schedule α = 2, the default, and α = 1), and one recipe combining them (svd-mp
   to half the target's gain, then token-cls to the target: both targets are relative to the
   dense model, so they share one budget). Each: predicted speed-up (the cost model), measured
   speed-up (median and IQR of per-round ratios, interleaved with dense, right after the prune),
   params, MACs, top-1 after ``--epochs`` epochs of distillation from the dense model; then every
   final model timed in the same rounds (``jointly``: one machine state for all, 2 × ``--rounds``
   rounds).
3. One figure: top-1 vs measured latency at batch 32 for dense and every method, Pareto front
   marked (``--figure``).

The figure needs matplotlib (``pip install -e ".[plot]"``). Every time is measured in this run
with 1 thread (``--threads``), the cost table in a fresh folder (so the figures include measuring
it). Results: a table on stdout, JSON (``--json``) with machine,
versions and settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=1.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/latency_budgets.json")
    parser.add_argument("--figure", type=Path, default=REPO / "docs/img/latency_budgets.png")
    args = parser.parse_args()
    os.environ["RMTP_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="rmtp-latency-bench-")
    os.environ["RMTP_LATENCY_COST"] = "measured"

    import timm
    import torch
    from safetensors.torch import load_file

    import rmtp
    from rmtp import measure
    from rmtp.reports.records import cpu_name
    from rmtp.storage.atomic import write_json_atomic

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def load(stem: str) -> torch.nn.Module:
        import json

        meta = json.loads((REPO / f"models/{stem}.json").read_text())
        name = meta.get("timm_name", "vit_tiny_patch16_224")
        kwargs = meta["kwargs"] if "kwargs" in meta else meta["model"]["kwargs"]
        model = timm.create_model(name, **kwargs)
        model.load_state_dict(load_file(REPO / f"models/{stem}.safetensors"))
        return model.eval()

    def finish(model, dense, bundle) -> float:
        if args.epochs:
            rmtp.finetune(model, bundle, teacher=dense, epochs=args.epochs, lr=1e-3, warmup_epochs=0.2,
                          distill={"weight": 1.0, "temperature": 2.0})
        return rmtp.evaluate(model, bundle).stats.top1

    def timed(dense, model, shape, batch):
        return measure.paired_speedup(dense, model, shape, batch=batch, rounds=args.rounds, threads=args.threads)

    def jointly(models, shape, batch):
        """(latency ms, per-round ratio to models[0]) of each model, all timed in the same rounds."""
        seconds, _ = measure.models_timed_together(models, shape, batch=batch, rounds=2 * args.rounds,
                                                   threads=args.threads)
        return [(measure.Spread.of([t * 1e3 for t in each]),
                 measure.Spread.of([d / t for d, t in zip(seconds[0], each)])) for each in seconds]

    rows, points = [], []
    started = time.time()

    # 1. digits ResNet: never slower
    dense = load("digits_resnet")
    bundle = rmtp.build_data({"name": "digits", "img_size": 32, "batch_size": 64, "calibration_size": 256}, dense)
    shape = tuple(bundle.val[0][0].shape)
    dense_top1 = rmtp.evaluate(dense, bundle).stats.top1
    for label, extra in [("svd-mp margin 1, only_if_faster (default)", {}),
                         ("svd-mp margin 1, only_if_faster: false", {"only_if_faster": False})]:
        for batch in (1, 32):
            model = rmtp.frozen_copy(dense).requires_grad_(True)
            report = rmtp.prune(model, "svd-mp", dense=dense, margin=1.0, input_shape=shape,
                                latency={"batch": batch, "threads": args.threads, "verify_rounds": 0}, **extra)
            stayed = sum(1 for r in report.rows if "not faster" in r.note)
            split = sum(1 for r in report.rows if r.note.startswith("split"))
            speed = timed(dense, model, shape, batch)
            top1 = finish(model, dense, bundle)
            rows.append({"model": "digits ResNet", "method": label, "batch": batch, "layers_split": split,
                         "layers_kept_dense_not_faster": stayed,
                         "predicted": (report.speed or {}).get("predicted_speedup"),
                         "measured": speed.ratio.to_dict(), "params": measure.count_params(model),
                         "macs": measure.count_macs(model, shape), "top1": top1, "dense_top1": dense_top1})

    # 2. digits ViT: target_speedup
    dense = load("digits_vit")
    bundle = rmtp.build_data({"name": "digits", "batch_size": 64, "calibration_size": 256}, dense)
    shape = tuple(bundle.val[0][0].shape)
    dense_top1 = rmtp.evaluate(dense, bundle).stats.top1
    latency = {"batch": 32, "threads": args.threads, "verify_rounds": 0}
    calibration = bundle.loader("calibration")
    half = 1 + (args.target - 1) / 2
    plans = {
        "svd-mp": [("svd-mp", {"target_speedup": args.target})],
        "spp": [("spp", {"target_speedup": args.target, "steps": 200})],
        "token-cls": [("token-cls", {"target_speedup": args.target})],
        # the same pruner with its schedule's other shape knob: α = 1 prunes from the first blocks on
        # (α = 2, the default, keeps nearly every token in the first two of the six)
        "token-cls α=1": [("token-cls", {"target_speedup": args.target, "alpha": 1.0})],
        f"svd-mp ×{half:.2f} + token-cls α=1 ×{args.target:g}": [
            ("svd-mp", {"target_speedup": half}), ("token-cls", {"target_speedup": args.target, "alpha": 1.0})],
    }
    finals = {}
    for label, steps in plans.items():
        model = rmtp.frozen_copy(dense).requires_grad_(True)
        predicted, notes = None, []
        for pruner, params in steps:
            report = rmtp.prune(model, pruner, dense=dense, calibration=calibration, input_shape=shape,
                                latency=latency, **params)
            predicted = (report.speed or {}).get("predicted_speedup")
            notes += [f"{pruner}: {n}" for n in report.notes
                      if any(word in n for word in ("chosen", "corrected", "not reachable"))]
        speed = timed(dense, model, shape, 32)  # right after the prune: the state its prediction saw
        top1 = finish(model, dense, bundle)
        finals[label] = model.eval()
        rows.append({"model": "digits ViT", "method": f"{label} (target ×{args.target:g})", "batch": 32,
                     "predicted": predicted, "measured": speed.ratio.to_dict(),
                     "prediction_error": predicted / speed.ratio.median - 1 if predicted else None,
                     "params": measure.count_params(model), "macs": measure.count_macs(model, shape),
                     "top1": top1, "dense_top1": dense_top1, "notes": notes})

    # Every final model timed in the same rounds, after all the work: the methods compared under
    # one machine state (a shared 2-core VM drifts by ±15% between sessions, and a token-reduced
    # model's ratio to dense moves with it), which is also what the figure plots.
    together = jointly([dense, *finals.values()], shape, 32)
    points.append(("dense", together[0][0].median, dense_top1))
    for (label, _model), row, (ms, ratio) in zip(finals.items(), rows[-len(finals):], together[1:]):
        row["measured_jointly"] = ratio.to_dict()
        row["latency_ms_jointly"] = ms.to_dict()
        points.append((label, ms.median, row["top1"]))

    print(f"\n{'model':14} {'method':46} {'batch':>5} {'pred':>6} {'measured [IQR]':>20} {'miss':>6} "
          f"{'jointly [IQR]':>20} {'params':>8} {'MACs':>9} {'top-1':>6} {'dense':>6}")
    for r in rows:
        m, j = r["measured"], r.get("measured_jointly")
        pred = f"×{r['predicted']:.2f}" if r.get("predicted") else "–"
        miss = f"{r['predicted'] / m['median'] - 1:+.0%}" if r.get("predicted") else "–"
        joint = f"×{j['median']:.2f} [{j['q1']:.2f}–{j['q3']:.2f}]" if j else "–"
        measured = f"×{m['median']:.2f} [{m['q1']:.2f}–{m['q3']:.2f}]"
        print(f"{r['model']:14} {r['method'][:46]:46} {r['batch']:>5} {pred:>6} "
              f"{measured:>20} {miss:>6} {joint:>20} "
              f"{r['params']:>8} {r['macs']:>9} "
              f"{r['top1']:6.2f} {r['dense_top1']:6.2f}")
    figure = _figure(points, args.figure)
    write_json_atomic(args.json, {
        "benchmark": "latency_budgets", "rows": rows, "pareto_points": points, "figure": str(figure),
        "settings": {"target": args.target, "epochs": args.epochs, "threads": args.threads, "rounds": args.rounds,
                     "latency_batch": 32, "distill": {"weight": 1.0, "temperature": 2.0}, "lr": 1e-3},
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "timm": timm.__version__, "rmtp": rmtp.__version__},
        "seconds": time.time() - started})
    print(f"\nwrote {args.json} and {figure} in {time.time() - started:.0f} s")


def _figure(points: list[tuple[str, float, float]], path: Path) -> Path:
    """Top-1 vs latency, Pareto front (no other point is both faster and more accurate) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rmtp.bench import pareto_front
    from rmtp.storage.atomic import save_figure_atomic

    front = [points[i] for i in pareto_front([(ms, top1) for _, ms, top1 in points])]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    span_ms = max(p[1] for p in points) - min(p[1] for p in points) or 1.0
    span_top1 = max(p[2] for p in points) - min(p[2] for p in points) or 1.0
    for i, (label, ms, top1) in enumerate(points):
        ax.scatter(ms, top1, s=40, zorder=3, color="black" if (label, ms, top1) in front else "grey")
        # a label whose point sits close to an earlier one's goes below it, so the two do not overlap
        crowded = any(abs(ms - q[1]) < 0.2 * span_ms and abs(top1 - q[2]) < 0.05 * span_top1 for q in points[:i])
        ax.annotate(label, (ms, top1), textcoords="offset points", xytext=(5, -11 if crowded else 4), fontsize=8)
    ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="tab:blue", label="Pareto front")
    ax.set_xlabel("latency at batch 32, 1 CPU thread (ms, median)")
    ax.set_ylabel("top-1 on digits val (%)")
    ax.set_title("digits ViT: accuracy vs measured latency")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
