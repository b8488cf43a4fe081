"""What the reference-model scripts share: train a timm model on the embedded digits, write it and
its card.

``scripts/train_digits_vit.py`` and ``scripts/train_digits_resnet.py`` differ only in the model, the
digits size and a few training settings (a :class:`Reference`); data, split (``data.split_seed``
0), training loop, file formats and the card are the same, so they are written once here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from rmtp.data import DataSpec, build_data
from rmtp.storage.atomic import write_text_atomic
from rmtp.storage.weights import write_safetensors_atomic
from rmtp.training import EpochStats, TrainConfig, train

DATA_SEED = 0


@dataclass(frozen=True)
class Reference:
    """One reference model: what to build, how to train it, where to write it."""

    stem: str  # files <out>/<stem>.safetensors and <out>/<stem>.json
    script: str  # recorded in the card's command
    timm_name: str
    kwargs: dict[str, Any]
    lr: float
    warmup_epochs: float
    threads: int | None  # default of --threads (None: torch's choice)
    threads_help: str
    img_size: int | None = None  # digits side; None: the model's own input size


def parse_args(reference: Reference, description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models/)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, shuffle and augmentation (default: 0)")
    parser.add_argument("--lr", type=float, default=reference.lr,
                        help=f"peak learning rate (default: {reference.lr:g})")
    parser.add_argument("--threads", type=int, default=reference.threads, help=reference.threads_help)
    return parser.parse_args(argv)


def main(reference: Reference, description: str, argv: list[str] | None = None) -> int:
    args = parse_args(reference, description, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)  # the init
    model = timm.create_model(reference.timm_name, pretrained=False, **reference.kwargs)
    spec = DataSpec(name="digits", img_size=reference.img_size, batch_size=64, split_seed=DATA_SEED)
    bundle = build_data(spec, model)
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=0.05,
        batch_size=64,
        warmup_epochs=reference.warmup_epochs,
        min_lr_ratio=0.01,
        grad_clip=1.0,
        label_smoothing=0.1,
        augment=True,
        seed=args.seed,
    )
    n_params = sum(p.numel() for p in model.parameters())
    size = f" {reference.img_size}x{reference.img_size}" if reference.img_size else ""
    print(f"{reference.timm_name} {reference.kwargs}: {n_params:,} params; "
          f"digits{size} train {len(bundle.train)} / val {len(bundle.val)}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def on_epoch(s: EpochStats) -> None:
        print(f"epoch {s.epoch:3d}/{config.epochs}  loss {s.train_loss:.4f}  val top-1 {s.val_top1:6.2f}%"
              f"  lr {s.lr:.2e}  {s.seconds:5.1f}s", flush=True)

    result = train(model, bundle, config, device="cpu", on_epoch=on_epoch)
    print(f"done: val top-1 {result.final_val_top1:.2f}% in {result.seconds:.0f}s", flush=True)

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_path = args.out / f"{reference.stem}.safetensors"
    write_safetensors_atomic(state, weights_path,
                             metadata={"timm_name": reference.timm_name, "kwargs": json.dumps(reference.kwargs)})
    meta = {
        "timm_name": reference.timm_name,
        "kwargs": reference.kwargs,
        "params": n_params,
        "seed": args.seed,
        "epochs": args.epochs,
        "train": config.model_dump(mode="json"),
        "data": {**spec.model_dump(mode="json"),
                 "train_images": len(bundle.train), "val_images": len(bundle.val)},
        "final_val_top1_percent": result.final_val_top1,
        "history": [{"epoch": s.epoch, "train_loss": round(s.train_loss, 5), "val_top1_percent": s.val_top1}
                    for s in result.history],
        "train_seconds": round(result.seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "command": " ".join(["python", reference.script, *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta_path = args.out / f"{reference.stem}.json"
    write_text_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {weights_path} ({weights_path.stat().st_size:,} bytes) and {meta_path}", flush=True)
    return 0
