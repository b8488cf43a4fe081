"""Top-1 of token reduction on the digits reference ViT, off the shelf, next to the dense model.

    python benchmarks/token_accuracy.py [--json benchmarks/results/token_accuracy.json]

The committed reference model (``models/digits_vit.safetensors``: 6 blocks, 1 + 64 tokens, val
top-1 97.77%) is patched, without any fine-tuning, with ``token-cls`` and ``token-mean`` at the
seed's r_max = 0.6 for a few α (pruning applied to the current count, as the seed; and to the
original count), with and without EViT fusion, and with ``tome`` at a few r. Each row gives
top-1 on the seeded digits val split (359 images), the change against dense, MACs of one image
(attention included) relative to dense, and the tokens left after the last block.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import timm
import torch

from rmtp import measure
from rmtp.contract.architecture import ModelSpec
from rmtp.contract.saved_types import apply_patch
from rmtp.data import DataSpec, build_data
from rmtp.plugins import get_plugins
from rmtp.storage.atomic import write_json_atomic
from rmtp_plugins.tokens.patch import TokenPlan, TokenReduction
from rmtp_plugins.tokens.schedule import keep_ratios, token_counts, tome_r_list

REPO = Path(__file__).resolve().parents[1]
KWARGS = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "depth": 6,
          "num_heads": 3, "mlp_ratio": 4.0}


def settings(depth: int) -> dict[str, TokenPlan]:
    out: dict[str, TokenPlan] = {}
    for method in ("cls", "mean"):
        name = f"token-{method}"
        for alpha in (2.0, 1.5, 1.2):
            out[f"{name} r_max=0.6 α={alpha:g}"] = TokenPlan(method=method, keep=keep_ratios(depth, 0.6, alpha))
        out[f"{name} r_max=0.6 α=2 fuse"] = TokenPlan(method=method, keep=keep_ratios(depth, 0.6, 2.0), fuse=True)
        out[f"{name} r_max=0.6 α=2 original"] = TokenPlan(method=method, keep=keep_ratios(depth, 0.6, 2.0),
                                                          relative_to="original")
    for r in (4, 8, 10):
        out[f"tome r={r}"] = TokenPlan(method="tome", r=tome_r_list(depth, r), prop_attn=True)
    out["tome r=8 no prop-attn"] = TokenPlan(method="tome", r=tome_r_list(depth, 8), prop_attn=False)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO / "models" / "digits_vit.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "token_accuracy.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=KWARGS, checkpoint=args.checkpoint)
    dense = get_plugins().architecture("vit").create(spec).eval()
    data = build_data(DataSpec(name="digits", split_seed=0), dense)
    loader = data.loader("val")
    input_shape = (1, 32, 32)
    depth, npt, n0 = len(dense.blocks), dense.num_prefix_tokens, dense.patch_embed.num_patches

    dense_top1 = measure.top1(dense, loader, device="cpu")
    dense_macs = measure.count_macs(dense, input_shape)
    rows = [{"method": "dense", "top1": dense_top1, "delta": 0.0, "macs": dense_macs, "macs_vs_dense": 1.0,
             "tokens_after_each_block": [npt + n0] * depth}]
    for name, plan in settings(depth).items():
        model = copy.deepcopy(dense)
        apply_patch(model, TokenReduction(**plan.model_dump()))
        top1 = measure.top1(model, loader, device="cpu")
        macs = measure.count_macs(model, input_shape)
        tokens = [npt + out for _, out in token_counts(n0, keep=plan.keep, r=plan.r, relative_to=plan.relative_to)]
        rows.append({"method": name, "top1": top1, "delta": top1 - dense_top1, "macs": macs,
                     "macs_vs_dense": macs / dense_macs, "tokens_after_each_block": tokens,
                     "plan": plan.model_dump(mode="json")})
        print(f"{name}: {top1:.2f}%", file=sys.stderr)

    report = {"benchmark": "token_accuracy",
              "command": "python benchmarks/token_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": {"checkpoint": str(args.checkpoint.relative_to(REPO)) if args.checkpoint.is_relative_to(REPO)
                        else str(args.checkpoint), "timm": "vit_tiny_patch16_224", "kwargs": KWARGS},
              "data": {"name": "digits", "split_seed": 0, "val_images": len(data.val)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
              "fine_tuning": "none (patched off the shelf)", "results": rows}
    print(f"\ndigits reference ViT ({depth} blocks, {npt} + {n0} tokens), val {len(data.val)} images, no fine-tuning "
          f"· torch {torch.__version__} · timm {timm.__version__}")
    print(f"| {'method':<34} | {'top-1':>6} | {'Δ dense':>7} | {'MACs':>5} | tokens after each block |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 9}|{'-' * 7}|{'-' * 25}|")
    for r in rows:
        print(f"| {r['method']:<34} | {r['top1']:>5.2f}% | {r['delta']:>+7.2f} | {r['macs_vs_dense']:>5.0%} | "
              f"{' '.join(map(str, r['tokens_after_each_block'])):<23} |")
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
