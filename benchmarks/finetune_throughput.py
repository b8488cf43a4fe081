"""Claim: rmtp's fine-tuning loop costs at most 5% over a plain torch loop doing the same work, and
what bf16 autocast buys over fp32 on this CPU.

    python benchmarks/finetune_throughput.py [--steps 4] [--batch 64] [--rounds 20] [--threads 1]
                                             [--device cpu] [--json benchmarks/results/finetune_throughput.json]

One call of each contender is one short fine-tune of the digits reference ViT
(models/digits_vit.safetensors, 680k params) with distillation from a frozen copy of it:

* **rmtp**: :func:`rmtp.training.train` with ``epochs: 1, max_steps: STEPS`` (AdamW, lr warm-up and
  cosine, KD at weight 1 and temperature 2, grad-norm clipping at 1.0, a seeded shuffle, the
  per-step ``on_batch`` progress callback that ``rmtp prune`` draws from, a finite-loss check and
  the val top-1 after the epoch); a fresh optimizer each call, as a fine-tune step has.
* **torch**: the same work written as a plain loop: a shuffled ``DataLoader`` over the same train
  split at the same batch, ``torch.optim.AdamW`` over the same parameter groups (no decay on norms,
  biases, pos_embed, cls_token), the same lr schedule, teacher forward under ``no_grad``, the same
  KD loss (``τ²·KL``, in fp32), ``backward``, ``clip_grad_norm_``, ``step``, then the same val top-1.

Both run at each ``--precision`` (autocast bf16 and fp32 by default: the teacher and student
forwards under ``torch.autocast``, the loss in fp32) on the same data bundle
(``rmtp.build_data({"name": "digits", "eval_limit": 64}, model)``: 1,438 train images, the val
top-1 on 64 images so the evaluation does not hide the loop). All four callables are timed in one
:func:`rmtp.measure.interleaved_timing` (a warm-up per callable, then rounds whose order rotates);
per round: rmtp / torch seconds at each precision (the overhead) and fp32 / bf16 seconds of the rmtp
loop (bf16's speed-up). Throughput is train images per second of wall time of a whole call (set-up
and the val pass included, for both). The CPU time of this process is recorded around every call
too, and its per-round ratio given beside the wall-time one: other processes on a shared machine
take wall time, not this process's CPU time. Prints a table and writes JSON with the machine,
versions and every setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import rmtp
from rmtp import measure
from rmtp.reports.records import environment
from rmtp.run.precision import autocast
from rmtp.storage.atomic import write_json_atomic
from rmtp.training import TrainConfig, lr_at, param_groups, train

REPO = Path(__file__).resolve().parents[1]
CLAIM_OVERHEAD = 0.05
LR, WEIGHT_DECAY, GRAD_CLIP, TEMPERATURE = 1.0e-4, 0.05, 1.0, 2.0


def digits_vit() -> torch.nn.Module:
    """The committed digits reference ViT (models/digits_vit.json's timm name and kwargs)."""
    import timm

    spec = json.loads((REPO / "models" / "digits_vit.json").read_text())
    model = timm.create_model(spec["timm_name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(load_file(REPO / "models" / "digits_vit.safetensors"))
    return model


def rmtp_loop(model: torch.nn.Module, teacher: torch.nn.Module, bundle: Any, config: TrainConfig,
              device: torch.device):
    """One call: rmtp's loop, with a progress callback as ``rmtp prune`` passes one."""
    seen: list[float] = []

    def run() -> None:
        train(model, bundle, config, device=device, teacher=teacher,
              on_batch=lambda progress: seen.append(progress.images_per_second))
    return run


def torch_loop(model: torch.nn.Module, teacher: torch.nn.Module, bundle: Any, *, steps: int, batch: int,
               precision: str, device: torch.device, seed: int = 0):
    """One call: the same fine-tune as a plain torch loop."""
    model.to(device)
    teacher.to(device).eval()
    val = bundle.loader("val")

    def run() -> None:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(bundle.train, batch_size=batch, shuffle=True, generator=generator)
        optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        total = min(steps, len(loader))
        model.train()
        for step, (images, _targets) in enumerate(loader):
            if step >= total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps=total, warmup_steps=0, lr=LR)
            optimizer.zero_grad(set_to_none=True)
            images = images.to(device)
            with autocast(precision, device):
                with torch.no_grad():
                    teacher_logits = teacher(images)
                logits = model(images)
            t = TEMPERATURE
            loss = F.kl_div(F.log_softmax(logits.float() / t, dim=-1),
                            F.log_softmax(teacher_logits.float() / t, dim=-1),
                            reduction="batchmean", log_target=True) * (t * t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, labels in val:
                with autocast(precision, device):
                    correct += int((model(images.to(device)).argmax(-1) == labels.to(device)).sum())
        model.train()
    return run


def _with_cpu_time(fn, calls: list[float]):
    """``fn``, also recording the CPU time of this process (all its threads) per call: a cross-check
    that other processes on a shared machine do not move (they take wall time, not this CPU time)."""
    def run() -> None:
        started = time.process_time()
        fn()
        calls.append(time.process_time() - started)
    return run


def _per_round(calls: list[float], timing: measure.InterleavedTiming) -> list[float]:
    """Per-call CPU seconds of each round (the warm-up calls dropped, a block's calls averaged)."""
    timed = calls[timing.warmup_calls:]
    k = timing.iters
    return [sum(timed[i:i + k]) / k for i in range(0, len(timed), k)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per call (max_steps)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "finetune_throughput.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precisions = args.precisions.split(",")
    torch.manual_seed(0)
    dense = digits_vit()
    bundle = rmtp.build_data({"name": "digits", "eval_limit": args.eval_images, "batch_size": args.batch}, dense)
    teacher = rmtp.frozen_copy(dense).to(device)
    steps_per_epoch = math.ceil(len(bundle.train) / args.batch)
    if args.steps > steps_per_epoch:
        parser.error(f"--steps {args.steps} is more than one epoch ({steps_per_epoch} steps at batch {args.batch})")

    labels, fns = [], []
    for precision in precisions:
        config = TrainConfig(epochs=1, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, batch_size=args.batch,
                             distill={"weight": 1.0, "temperature": TEMPERATURE}, precision=precision,
                             max_steps=args.steps, seed=0)
        labels += [("rmtp", precision), ("torch", precision)]
        fns += [rmtp_loop(copy.deepcopy(dense), teacher, bundle, config, device),
                torch_loop(copy.deepcopy(dense), teacher, bundle, steps=args.steps, batch=args.batch,
                           precision=precision, device=device)]
    images = args.steps * args.batch
    cpu_calls: list[list[float]] = [[] for _ in fns]
    with measure.torch_threads(args.threads if device.type == "cpu" else None) as threads:
        timings = measure.interleaved_timing(
            [_with_cpu_time(fn, cpu_calls[i]) for i, fn in enumerate(fns)], device=device, rounds=args.rounds,
            warmup_s=1.0, block_s=0.1, on_round=lambda r: print(f"round {r}/{args.rounds}", file=sys.stderr))
    seconds = {label: t.seconds for label, t in zip(labels, timings)}
    cpu = {label: _per_round(calls, t) for label, calls, t in zip(labels, cpu_calls, timings)}
    rows = []
    for loop, precision in labels:
        own = seconds[(loop, precision)]
        row: dict[str, Any] = {"loop": loop, "precision": precision,
                               "seconds_per_call": measure.Spread.of(own).to_dict(),
                               "images_per_second": measure.Spread.of([images / s for s in own]).to_dict(),
                               "iters_per_block": timings[labels.index((loop, precision))].iters}
        row["cpu_seconds_per_call"] = measure.Spread.of(cpu[(loop, precision)]).to_dict()
        if loop == "rmtp":
            row["overhead_vs_torch"] = measure.Spread.of(
                [r / t - 1.0 for r, t in zip(own, seconds[("torch", precision)])]).to_dict()
            row["cpu_overhead_vs_torch"] = measure.Spread.of(
                [r / t - 1.0 for r, t in zip(cpu[(loop, precision)], cpu[("torch", precision)])]).to_dict()
            if precision != "fp32" and ("rmtp", "fp32") in seconds:
                row["speedup_vs_fp32"] = measure.Spread.of(
                    [f / s for f, s in zip(seconds[("rmtp", "fp32")], own)]).to_dict()
        rows.append(row)
    worst = max(r["overhead_vs_torch"]["median"] for r in rows if r["loop"] == "rmtp")
    worst_cpu = max(r["cpu_overhead_vs_torch"]["median"] for r in rows if r["loop"] == "rmtp")
    report = {
        "benchmark": "finetune_throughput",
        "command": "python benchmarks/finetune_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {**environment(), "threads": str(threads)},
        "settings": {
            "model": "models/digits_vit.safetensors (vit_tiny_patch16_224, models/digits_vit.json kwargs), "
                     "student and teacher copies of it",
            "data": {"name": "digits", "train_images": len(bundle.train), "eval_limit": args.eval_images},
            "device": str(device), "batch": args.batch, "steps_per_call": args.steps, "images_per_call": images,
            "precisions": precisions, "threads": threads, "rounds": args.rounds,
            "finetune": {"lr": LR, "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                         "distill": {"weight": 1.0, "temperature": TEMPERATURE}, "warmup_epochs": 0,
                         "optimizer": "AdamW, a fresh one per call"},
            "timing": "rmtp.measure.interleaved_timing: warm-up >= 1 s per callable, blocks of >= 0.1 s (one "
                      "call), order rotated each round; medians and IQR over rounds; ratios per round",
            "cpu_time": "time.process_time() around every call (this process, all threads), per round: the "
                        "overhead again, insensitive to other processes taking the cores",
            "claim": f"rmtp's overhead over the plain loop <= {CLAIM_OVERHEAD:.0%}",
        },
        "results": rows,
        "worst_overhead_median": worst,
        "worst_cpu_overhead_median": worst_cpu,
        "claim_holds": worst <= CLAIM_OVERHEAD,
    }
    print_table(report)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


def _fmt(spread: dict[str, float], digits: int = 1, percent: bool = False, times: bool = False) -> str:
    scale = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    prefix = "×" if times else ""
    m, q1, q3 = (spread[k] * scale for k in ("median", "q1", "q3"))
    sign = "+" if percent and m >= 0 else ""
    return f"{prefix}{sign}{m:.{digits}f}{unit} [{q1:.{digits}f}–{q3:.{digits}f}]"


def print_table(report: dict[str, Any]) -> None:
    env, s = report["environment"], report["settings"]
    print(f"\ndigits ViT fine-tune with KD, batch {s['batch']}, {s['steps_per_call']} steps per call, "
          f"{s['device']}, threads={s['threads']}, {s['rounds']} interleaved rounds · {env['cpu']} · "
          f"torch {env['torch']} · timm {env['timm']} · load {env['load_average']}")
    print("| loop | precision | s per call [IQR] | images/s [IQR] | rmtp vs torch, wall [IQR] | "
          "rmtp vs torch, CPU time [IQR] | bf16 vs fp32 [IQR] |")
    print("|---|---|---|---|---|---|---|")
    for r in report["results"]:
        overhead = _fmt(r["overhead_vs_torch"], 1, percent=True) if "overhead_vs_torch" in r else ""
        cpu = _fmt(r["cpu_overhead_vs_torch"], 1, percent=True) if "cpu_overhead_vs_torch" in r else ""
        speedup = _fmt(r["speedup_vs_fp32"], 2, times=True) if "speedup_vs_fp32" in r else ""
        print(f"| {r['loop']} | {r['precision']} | {_fmt(r['seconds_per_call'], 3)} | "
              f"{_fmt(r['images_per_second'], 0)} | {overhead} | {cpu} | {speedup} |")
    verdict = "holds" if report["claim_holds"] else "FAILS"
    print(f"\nclaim ({s['claim']}): {verdict} (worst median overhead {report['worst_overhead_median']:+.1%} wall, "
          f"{report['worst_cpu_overhead_median']:+.1%} CPU time)")


if __name__ == "__main__":
    main()
