#!/usr/bin/env python
"""Train rmtp's reference conv model: a small timm bottleneck ResNet on scikit-learn's digits (CPU, a few minutes).

Writes ``<out>/digits_resnet.safetensors`` (the state dict) and ``<out>/digits_resnet.json`` (the
timm name and exact kwargs to rebuild it, every training setting, the final val top-1, versions
and timing). Seeded: the same command on the same machine gives the same weights. The twin of
``scripts/train_digits_vit.py``: same data, same split (``data.split_seed`` 0), same training loop
(both in ``scripts/_reference_training.py``).

    python scripts/train_digits_resnet.py --out models/
"""

from __future__ import annotations

from _reference_training import Reference, main

# resnet26's own layout (Bottleneck blocks, [2, 2, 2, 2]) at a quarter to an eighth of its widths:
# every block conv and shortcut has min(M, N) >= 32 (the svd-mp / spectral default min_dim), so
# every one of them gets a Marchenko-Pastur fit.
DIGITS_RESNET = Reference(
    stem="digits_resnet",
    script="scripts/train_digits_resnet.py",
    timm_name="resnet26",
    kwargs={
        "layers": [2, 2, 2, 2],
        "channels": [32, 40, 56, 64],
        "in_chans": 1,
        "num_classes": 10,
    },
    lr=2e-3,
    warmup_epochs=2.0,
    threads=1,
    threads_help="torch CPU threads (default: 1: this net's convs are tiny; 2 threads on busy cores took an "
                 "epoch from 2 s to 100 s)",
    img_size=32,  # timm ResNets carry a 224 px pretrained_cfg: the digits size must be given explicitly
)

if __name__ == "__main__":
    raise SystemExit(main(DIGITS_RESNET, __doc__.splitlines()[0]))
