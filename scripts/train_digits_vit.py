#!/usr/bin/env python
"""Train rmtp's reference model: a small timm ViT on scikit-learn's digits (CPU, a few minutes).

Writes ``<out>/digits_vit.safetensors`` (the state dict) and ``<out>/digits_vit.json`` (the timm
name and exact kwargs to rebuild it, every training setting, the final val top-1, versions and
timing). Seeded: the same command on the same machine gives the same weights.

    python scripts/train_digits_vit.py --out models/
"""

from __future__ import annotations

from _reference_training import Reference, main

DIGITS_VIT = Reference(
    stem="digits_vit",
    script="scripts/train_digits_vit.py",
    timm_name="vit_tiny_patch16_224",
    kwargs={
        "img_size": 32,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 96,
        "depth": 6,
        "num_heads": 3,
        "mlp_ratio": 4.0,
    },
    lr=1e-3,
    warmup_epochs=3.0,
    threads=None,
    threads_help="torch CPU threads (default: torch's choice)",
)

if __name__ == "__main__":
    raise SystemExit(main(DIGITS_VIT, __doc__.splitlines()[0]))
