#!/usr/bin/env python
"""Train rmtp's reference conv model: a small timm bottleneck ResNet on scikit-learn's digits (CPU, a few minutes).

Writes ``<out>/digits_resnet.safetensors`` (the state dict) and ``<out>/digits_resnet.json`` (the
timm name and exact kwargs to rebuild it, every training setting, the final val top-1, versions
and timing). Seeded: the same command on the same machine gives the same weights. The twin of
``scripts/train_digits_vit.py``: same data, same split (``data.split_seed`` 0), same training loop.

    python scripts/train_digits_resnet.py --out models/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from rmtp.data import DataSpec, build_data
from rmtp.training import EpochStats, TrainConfig, train

# resnet26's own layout (Bottleneck blocks, [2, 2, 2, 2]) at a quarter to an eighth of its widths:
# every block conv and shortcut has min(M, N) >= 32 (the svd-mp / spectral default min_dim), so
# every one of them gets a Marchenko-Pastur fit.
MODEL_NAME = "resnet26"
MODEL_KWARGS = {
    "layers": [2, 2, 2, 2],
    "channels": [32, 40, 56, 64],
    "in_chans": 1,
    "num_classes": 10,
}
IMG_SIZE = 32  # timm ResNets carry a 224 px pretrained_cfg: the digits size must be given explicitly
DATA_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models/)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, shuffle and augmentation (default: 0)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1: this net's convs are tiny; 2 threads on busy "
                             "cores took an epoch from 2 s to 100 s)")
    return parser.parse_args(argv)


def atomic_write_bytes(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` to a temp file next to ``path``, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)  # the init
    model = timm.create_model(MODEL_NAME, pretrained=False, **MODEL_KWARGS)
    spec = DataSpec(name="digits", img_size=IMG_SIZE, batch_size=64, split_seed=DATA_SEED)
    bundle = build_data(spec, model)
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=0.05,
        batch_size=64,
        warmup_epochs=2.0,
        min_lr_ratio=0.01,
        grad_clip=1.0,
        label_smoothing=0.1,
        augment=True,
        seed=args.seed,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL_NAME} {MODEL_KWARGS}: {n_params:,} params; "
          f"digits {IMG_SIZE}x{IMG_SIZE} train {len(bundle.train)} / val {len(bundle.val)}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def on_epoch(s: EpochStats) -> None:
        print(f"epoch {s.epoch:3d}/{config.epochs}  loss {s.train_loss:.4f}  val top-1 {s.val_top1:6.2f}%"
              f"  lr {s.lr:.2e}  {s.seconds:5.1f}s", flush=True)

    result = train(model, bundle, config, device="cpu", on_epoch=on_epoch)
    print(f"done: val top-1 {result.final_val_top1:.2f}% in {result.seconds:.0f}s", flush=True)

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_path = args.out / "digits_resnet.safetensors"
    atomic_write_bytes(weights_path, lambda tmp: save_file(
        state, tmp, metadata={"timm_name": MODEL_NAME, "kwargs": json.dumps(MODEL_KWARGS)}))
    meta = {
        "timm_name": MODEL_NAME,
        "kwargs": MODEL_KWARGS,
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
        "command": " ".join(["python", "scripts/train_digits_resnet.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta_path = args.out / "digits_resnet.json"
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write_bytes(meta_path, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {weights_path} ({weights_path.stat().st_size:,} bytes) and {meta_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
