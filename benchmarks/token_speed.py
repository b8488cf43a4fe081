"""Throughput of token reduction vs the dense model: ViT-S/16 at 224, batch 32, on the CPU.

    python benchmarks/token_speed.py                      # the issue's settings, 1 thread
    python benchmarks/token_speed.py --threads 2 --json benchmarks/results/token_speed_2threads.json
    python benchmarks/token_speed.py --model vit_tiny_patch16_224 --img-size 64 --batch 2 --rounds 1 \
        --reps 1 --json /tmp/token_speed_smoke.json     # a smoke run: seconds, numbers meaningless

Compares dense, ``tome`` r=13 and ``token-cls`` with r_max=0.6 applied to the current count
(compounding, as seed 001) at α=2 and at the seed's best α values (1.5 for its baseline model
pruned at inference, 1.2 for its pruning-trained model), plus ``token-mean`` at α=2 for reference.
``ToMe reference`` is facebookresearch/ToMe's own timm patch (transcribed in
``tests/_tome_reference.py``, the tests' oracle) at the same r, timed in the same rounds as rmtp's
``tome``; their logits are checked to agree first (``tome_vs_reference_max_rel_diff``), and the tome
row reports ``speedup_vs_tome_reference``. Random weights: speed does not depend on them (a
pretrained checkpoint needs the network).

The machine is shared and noisy, so: a fixed thread count; every model timed once per round, in
a rotated order, all rounds interleaved; per round the best of ``--reps`` forward passes; the
table reports medians over rounds, and each ratio is the median of per-round ratios (dense and
method timed within the same round). MACs are one image, counted by rmtp.measure (attention
included). Results go to stdout as a table and to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from rmtp import measure
from rmtp.contract.saved_types import apply_patch
from rmtp.reports.records import cpu_name
from rmtp.storage.atomic import write_json_atomic
from rmtp_plugins.tokens.patch import TokenPlan, TokenReduction
from rmtp_plugins.tokens.schedule import keep_ratios, token_counts, tome_r_list

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _tome_reference as tome_reference

REFERENCE = "ToMe reference r={r}"


def configs(depth: int, tome_r: int, r_max: float, alphas: list[float]) -> dict[str, TokenPlan | None]:
    out: dict[str, TokenPlan | None] = {"dense": None,
                                        f"tome r={tome_r}": TokenPlan(method="tome", r=tome_r_list(depth, tome_r),
                                                                      prop_attn=True)}
    for alpha in alphas:
        out[f"token-cls r_max={r_max} α={alpha:g}"] = TokenPlan(
            method="cls", keep=keep_ratios(depth, r_max, alpha), relative_to="current")
    out[f"token-mean r_max={r_max} α={alphas[0]:g}"] = TokenPlan(
        method="mean", keep=keep_ratios(depth, r_max, alphas[0]), relative_to="current")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a second thread mostly measures the "
                             "scheduler; every small op waits for the slower core)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=2, help="forward passes per model per round (best kept)")
    parser.add_argument("--tome-r", type=int, default=13)
    parser.add_argument("--r-max", type=float, default=0.6)
    parser.add_argument("--alphas", default="2,1.5,1.2", help="token-cls α values; the first is also token-mean's")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "token_speed.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, img_size=args.img_size).eval()
    depth, npt = len(dense.blocks), dense.num_prefix_tokens
    n0 = dense.patch_embed.num_patches
    models: dict[str, torch.nn.Module] = {}
    plans = configs(depth, args.tome_r, args.r_max, [float(a) for a in args.alphas.split(",")])
    for name, plan in plans.items():
        model = dense if plan is None else copy.deepcopy(dense)
        if plan is not None:
            apply_patch(model, TokenReduction(**plan.model_dump()))
        models[name] = model.eval()
    tome_name, reference_name = f"tome r={args.tome_r}", REFERENCE.format(r=args.tome_r)
    models[reference_name] = tome_reference.apply_patch(copy.deepcopy(dense), args.tome_r, prop_attn=True).eval()
    plans[reference_name] = plans[tome_name]  # the same per-block r: ToMe's parse_r is tome_r_list
    input_shape = (3, args.img_size, args.img_size)
    x = torch.randn(args.batch, *input_shape)
    agreement = reference_agreement(models[tome_name], models[reference_name], x)
    print(f"tome vs ToMe reference: max relative logit difference {agreement:.1e}", file=sys.stderr)

    info = {}
    for name, model in models.items():
        plan = plans[name]
        tokens = [npt + n0] + ([npt + out for _, out in token_counts(n0, keep=plan.keep, r=plan.r,
                                                                     relative_to=plan.relative_to)]
                               if plan is not None else [npt + n0] * depth)
        breakdown = measure.mac_breakdown(model, input_shape)
        info[name] = {"macs": sum(breakdown.values()), "attention_macs": breakdown.get(measure.ATTENTION, 0),
                      "tokens_after_each_block": tokens[1:]}

    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(x)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                best = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    models[name](x)
                    best = min(best, time.perf_counter() - start)
                times[name].append(best)
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n.split(' ')[0]} {times[n][-1]:.2f}s"
                                                                         for n in names), file=sys.stderr)

    dense_name = names[0]
    results = []
    for name in names:
        median = statistics.median(times[name])
        ratios = [d / t for d, t in zip(times[dense_name], times[name])]
        results.append({"method": name, "median_s": median, "images_per_s": args.batch / median,
                        "speedup_vs_dense": statistics.median(ratios),
                        "speedup_min": min(ratios), "speedup_max": max(ratios),
                        "macs": info[name]["macs"], "macs_vs_dense": info[name]["macs"] / info[dense_name]["macs"],
                        "attention_macs": info[name]["attention_macs"],
                        "tokens_after_each_block": info[name]["tokens_after_each_block"],
                        "round_times_s": times[name]})
        if name == tome_name:
            vs_reference = [ref / t for ref, t in zip(times[reference_name], times[name])]
            results[-1].update({"speedup_vs_tome_reference": statistics.median(vs_reference),
                                "speedup_vs_tome_reference_min": min(vs_reference),
                                "speedup_vs_tome_reference_max": max(vs_reference),
                                "tome_vs_reference_max_rel_diff": agreement})
    report = {
        "benchmark": "token_speed",
        "command": "python benchmarks/token_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "settings": {"model": args.model, "img_size": args.img_size, "batch": args.batch, "threads": args.threads,
                     "rounds": args.rounds, "reps": args.reps, "weights": "random (timm init), eval mode",
                     "timing": "best of reps per round, rotated order, median over rounds; ratio = median of "
                               "per-round dense/method (tome vs ToMe reference likewise)"},
        "results": results,
    }
    print_table(report)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


def reference_agreement(tome: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    """max |tome − reference| / max |reference| of the logits on ``x``; refuses to time two models
    that do not compute the same thing (the tests hold them to 1e-5 on tiny ViTs)."""
    with torch.inference_mode():
        got, expected = tome(x), reference(x)
    difference = float((got - expected).abs().max() / expected.abs().max())
    if not difference <= 1e-4:
        raise SystemExit(f"rmtp's tome and the ToMe reference disagree ({difference:.1e} relative): not timing them")
    return difference


def print_table(report: dict) -> None:
    s, m, v = report["settings"], report["machine"], report["versions"]
    print(f"\n{s['model']} @ {s['img_size']}, batch {s['batch']}, threads={s['threads']}, {s['rounds']} rounds "
          f"× best of {s['reps']} · {m['cpu']} ({m['cpu_count']} CPUs) · torch {v['torch']} · timm {v['timm']} "
          f"· python {v['python']}")
    header = f"| {'method':<28} | {'img/s':>7} | {'median s':>8} | {'× dense':>7} | {'range':>11} | " \
             f"{'GMACs':>6} | {'MACs':>5} | {'tokens after last block':>23} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in report["results"]:
        print(f"| {r['method']:<28} | {r['images_per_s']:>7.1f} | {r['median_s']:>8.3f} | "
              f"{r['speedup_vs_dense']:>6.2f}× | {r['speedup_min']:>4.2f}–{r['speedup_max']:<4.2f}  | "
              f"{r['macs'] / 1e9:>6.2f} | {r['macs_vs_dense']:>5.0%} | {r['tokens_after_each_block'][-1]:>23} |")
    for r in report["results"]:
        if "speedup_vs_tome_reference" in r:
            print(f"\n{r['method']} vs the ToMe reference: {r['speedup_vs_tome_reference']:.2f}× "
                  f"({r['speedup_vs_tome_reference_min']:.2f}–{r['speedup_vs_tome_reference_max']:.2f}), "
                  f"logits agree to {r['tome_vs_reference_max_rel_diff']:.1e} relative")


if __name__ == "__main__":
    main()
