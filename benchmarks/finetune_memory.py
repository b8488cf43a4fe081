"""Claim: bf16 autocast lowers the peak memory of a fine-tune step against fp32, and rmtp's loop needs
no more than a plain torch loop doing the same step.

    python benchmarks/finetune_memory.py [--batches 64,256] [--repeats 3] [--threads 1]
                                         [--scale] [--json benchmarks/results/finetune_memory.json]

One fine-tune step of the digits reference ViT (models/digits_vit.safetensors) with distillation from
a frozen copy of it, as in ``benchmarks/finetune_throughput.py``: rmtp's loop is
:func:`rmtp.training.train` with ``max_steps: 1`` (a fresh AdamW, so its two moment buffers are
allocated inside the step, as in a fine-tune's first step; then the val top-1 on 64 images), the
plain loop the same step written in torch. Each step is measured by
:func:`rmtp.measure.peak_memory_delta` (the peak of live tensor bytes during the call above those
alive before it: on the CPU from torch.profiler's allocation events) and, in a separate call, by
:func:`rmtp.measure.peak_rss_delta` (what the operating system saw: VmHWM reset, glibc trimmed).
Weights, the teacher and the data are alive before the call and not counted; gradients, optimizer
state, activations and autocast's bf16 weight copies are. Each figure is the median of
``--repeats`` calls, the contenders alternated (after one warm-up call each).

``--scale`` adds what docs/scale.md's memory estimates rest on, for timm's ViT-B/16 and DeiT-S at
224 px (random init: memory does not depend on the weights' values), tensor peak only: teacher
forward + student forward + backward on random batches of 1 and 4 images with the gradients already
allocated (its growth per image is the activation memory a batch adds; the intercept autocast's
weight copies and workspaces), and a whole plain step with a fresh AdamW at batch 1 (gradients,
AdamW's two moments and the optimizer's temporaries). CPU kernels, not CUDA's: an estimate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from finetune_throughput import (
    GRAD_CLIP,
    LR,
    TEMPERATURE,
    WEIGHT_DECAY,
    digits_vit,
    rmtp_loop,
    torch_loop,
)

import rmtp
from rmtp import measure
from rmtp.reports.records import environment
from rmtp.run.precision import autocast
from rmtp.storage.atomic import write_json_atomic
from rmtp.training import TrainConfig, param_groups

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def digits_rows(batches: list[int], precisions: list[str], repeats: int, eval_images: int) -> list[dict[str, Any]]:
    dense = digits_vit()
    teacher = rmtp.frozen_copy(dense)
    contenders = []
    for batch in batches:
        bundle = rmtp.build_data({"name": "digits", "eval_limit": eval_images, "batch_size": 64}, dense)
        for precision in precisions:
            config = TrainConfig(epochs=1, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, batch_size=batch,
                                 distill={"weight": 1.0, "temperature": TEMPERATURE}, precision=precision,
                                 max_steps=1, seed=0)
            contenders.append(((batch, precision, "rmtp"), rmtp_loop(copy.deepcopy(dense), teacher, bundle, config,
                                                                     torch.device("cpu"))))
            contenders.append(((batch, precision, "torch"), torch_loop(copy.deepcopy(dense), teacher, bundle, steps=1,
                                                                       batch=batch, precision=precision,
                                                                       device=torch.device("cpu"))))
    for _, fn in contenders:  # warm-up: lazy initialisation, kernel selection, the allocator's first pages
        fn()
    tensor: dict[tuple, list[int]] = {key: [] for key, _ in contenders}
    rss: dict[tuple, list[int]] = {key: [] for key, _ in contenders}
    for r in range(repeats):
        for key, fn in contenders:
            value = measure.peak_memory_delta(fn, "cpu")
            if value is not None:
                tensor[key].append(value)
            value = measure.peak_rss_delta(fn)
            if value is not None:
                rss[key].append(value)
        print(f"repeat {r + 1}/{repeats}", file=sys.stderr)
    rows = []
    for key, _ in contenders:
        batch, precision, loop = key
        rows.append({"batch": batch, "precision": precision, "loop": loop,
                     "tensor_peak_bytes": statistics.median(tensor[key]) if tensor[key] else None,
                     "tensor_peak_all": tensor[key],
                     "rss_peak_bytes": statistics.median(rss[key]) if rss[key] else None,
                     "rss_peak_all": rss[key]})
    return rows


def plain_step(model: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor,
               precision: str) -> Callable[[], None]:
    """One KD step of a plain loop on ``images`` (fresh AdamW: its state is allocated in the step)."""

    def run() -> None:
        optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, teacher, images, precision)()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    return run


def forward_backward(model: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor,
                     precision: str) -> Callable[[], None]:
    """Teacher forward, student forward, KD loss, backward: the part of a step that grows with the batch.
    Gradients accumulate into ``.grad`` (allocated by an earlier call, they are not counted again)."""
    device = torch.device("cpu")

    def run() -> None:
        with autocast(precision, device):
            with torch.no_grad():
                teacher_logits = teacher(images)
            logits = model(images)
        t = TEMPERATURE
        loss = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                        reduction="batchmean", log_target=True) * (t * t)
        loss.backward()
    return run


def scale_rows(precisions: list[str], batches: tuple[int, ...] = (1, 4)) -> list[dict[str, Any]]:
    """Per model and precision: the tensor peak of forward + backward at each batch (gradients already
    allocated), its growth per image and its intercept (autocast's weight copies, workspaces), and the
    peak of a whole step with a fresh AdamW at the smallest batch (gradients + AdamW state + temporaries)."""
    import timm

    rows = []
    for name in ("vit_base_patch16_224", "deit_small_patch16_224"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        teacher = rmtp.frozen_copy(model)
        params = sum(p.numel() for p in model.parameters())
        for precision in precisions:
            peaks = {}
            for batch in batches:
                images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
                step = forward_backward(model, teacher, images, precision)
                step()  # warm-up; allocates .grad
                peaks[batch] = measure.peak_memory_delta(step, "cpu")
                print(f"{name} {precision} batch {batch}: forward+backward {peaks[batch] / MIB:.0f} MiB",
                      file=sys.stderr)
            images = torch.randn(batches[0], 3, 224, 224, generator=torch.Generator().manual_seed(0))
            model.zero_grad(set_to_none=True)
            whole = measure.peak_memory_delta(plain_step(model, teacher, images, precision), "cpu")
            lo, hi = batches[0], batches[-1]
            per_image = (peaks[hi] - peaks[lo]) / (hi - lo)
            rows.append({"model": name, "params": params, "precision": precision,
                         "forward_backward_peak_bytes": {str(b): v for b, v in peaks.items()},
                         "per_image_bytes": per_image, "intercept_bytes": peaks[lo] - lo * per_image,
                         f"step_peak_bytes_batch_{lo}": whole})
            model.zero_grad(set_to_none=True)
        del model, teacher
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--scale", action="store_true", help="also ViT-B/16 and DeiT-S at 224 px (plain step)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "finetune_memory.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    torch.manual_seed(0)
    with measure.torch_threads(args.threads) as threads:
        rows = digits_rows(batches, precisions, args.repeats, args.eval_images)
        scale = scale_rows(precisions) if args.scale else []
    report = {
        "benchmark": "finetune_memory",
        "command": "python benchmarks/finetune_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {**environment(), "threads": str(threads)},
        "settings": {
            "model": "models/digits_vit.safetensors (vit_tiny_patch16_224, models/digits_vit.json kwargs), "
                     "student and teacher copies of it",
            "step": "one optimizer step with KD (weight 1, temperature 2), grad clip 1.0, a fresh AdamW "
                    f"(lr {LR}, weight decay {WEIGHT_DECAY}); rmtp: rmtp.training.train(max_steps=1) incl. "
                    f"the val top-1 on {args.eval_images} images; torch: the same as a plain loop",
            "batches": batches, "precisions": precisions, "repeats": args.repeats, "threads": threads,
            "methods": measure.MEMORY_METHODS,
            "scale": "timm vit_base_patch16_224 / deit_small_patch16_224 random init, random 224 px batches of 1 "
                     "and 4, KD teacher forward + student forward + backward with .grad already allocated, and "
                     "a whole plain step (fresh AdamW) at batch 1; tensor peak (cpu method)" if args.scale else None,
        },
        "results": rows,
        "scale": scale,
    }
    print_table(report)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def print_table(report: dict[str, Any]) -> None:
    env, s = report["environment"], report["settings"]
    print(f"\ndigits ViT fine-tune step with KD, peak memory above the step's start (MiB, median of "
          f"{s['repeats']}), threads={s['threads']} · {env['cpu']} · torch {env['torch']} · load {env['load_average']}")
    print("| batch | loop | fp32 tensor peak | bf16 tensor peak | bf16 / fp32 | fp32 RSS peak | bf16 RSS peak |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["batch"], r["loop"], r["precision"]): r for r in report["results"]}
    for batch in s["batches"]:
        for loop in ("rmtp", "torch"):
            f, b = by.get((batch, loop, "fp32")), by.get((batch, loop, "bf16"))
            if f is None or b is None:
                continue
            ratio = (b["tensor_peak_bytes"] / f["tensor_peak_bytes"]
                     if f["tensor_peak_bytes"] and b["tensor_peak_bytes"] is not None else None)
            print(f"| {batch} | {loop} | {_mib(f['tensor_peak_bytes'])} | {_mib(b['tensor_peak_bytes'])} | "
                  f"{'n/a' if ratio is None else f'×{ratio:.2f}'} | {_mib(f['rss_peak_bytes'])} | "
                  f"{_mib(b['rss_peak_bytes'])} |")
    if report["scale"]:
        print("\nscale (224 px, tensor peak on the CPU, MiB): forward+backward with gradients allocated, and a "
              "whole step with a fresh AdamW at batch 1")
        print("| model | params | precision | fwd+bwd batch 1 | fwd+bwd batch 4 | per image | intercept | "
              "whole step, batch 1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["scale"]:
            peaks = r["forward_backward_peak_bytes"]
            print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['precision']} | {_mib(peaks['1'])} | "
                  f"{_mib(peaks['4'])} | {_mib(r['per_image_bytes'])} | {_mib(r['intercept_bytes'])} | "
                  f"{_mib(r['step_peak_bytes_batch_1'])} |")


if __name__ == "__main__":
    main()
