"""Which patches each final token covers: the functions behind ``rmtp token-map RUN_DIR``
(:mod:`.cli`).

For a token-reduced model (``tome``, or ``token-cls`` / ``token-mean`` with or without fusion) the
forward pass is traced (:func:`~rmtp_plugins.tokens.patch.trace_sources`) and every patch of the
input is coloured by the token it ended up in after the last block: patches merged into one
token share a colour, patches still on their own are left as they are, and patches pruned away
are darkened.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rmtp.errors import RmtpError
from rmtp_plugins.tokens.patch import token_reduction, trace_sources


@torch.inference_mode()
def token_owners(model: nn.Module, images: Tensor) -> Tensor:
    """``(B, gh, gw)``: index of the final token covering each patch, −1 for pruned patches."""
    was_training = model.training
    model.eval()
    try:
        with trace_sources(model) as trace:
            model(images)
    finally:
        model.train(was_training)
    npt = trace.num_prefix
    source = trace.sources[-1][:, npt:, npt:]  # (B, final patch tokens, original patches)
    covered = source > 0
    owner = covered.float().argmax(dim=1)
    owner[~covered.any(dim=1)] = -1
    gh, gw = model.patch_embed.grid_size
    return owner.reshape(-1, gh, gw)


def save_token_map(model: nn.Module, images: Tensor, path: str | Path, *, columns: int = 4) -> Path:
    """Write a PNG: each image with its patches coloured by the final token that covers them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as exc:  # optional dependency
        raise RmtpError("token maps need matplotlib: pip install 'rmtp[plot]'") from exc
    owners = token_owners(model, images).cpu().numpy()
    ph, pw = model.patch_embed.patch_size
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(owners.max() + 2, 3))
    n = images.shape[0]
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        image = images[i].detach().float().cpu()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
        rgb = image[:3].permute(1, 2, 0).numpy() if image.shape[0] >= 3 else image[0].numpy()[:, :, None].repeat(3, -1)
        owner = owners[i].repeat(ph, axis=0).repeat(pw, axis=1)[: rgb.shape[0], : rgb.shape[1]]
        ids, counts = np.unique(owner, return_counts=True)
        group = {int(t): c for t, c in zip(ids, counts) if t >= 0 and c > ph * pw}
        out = rgb.copy()
        for token in group:
            mask = owner == token
            out[mask] = 0.45 * rgb[mask] + 0.55 * palette[token]
        out[owner < 0] *= 0.2
        n_tokens = len([t for t in ids if t >= 0])
        ax = axes.flat[i]
        ax.imshow(out, interpolation="nearest")
        ax.set_title(f"{n_tokens} tokens, {len(group)} merged", fontsize=8)
    fig.tight_layout()
    from rmtp.storage.atomic import save_figure_atomic

    try:
        return save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)


def visualize_run(folder: str | Path, out: str | Path | None = None, images: int = 8) -> Path:
    """Token map of the first ``images`` val images for the model saved in ``folder``.

    The data (and its split seed) come from the folder's ``recipe.yaml`` when it has one, else
    the embedded digits.
    """
    from rmtp.data import DataSpec, build_data
    from rmtp.sources import saved_data
    from rmtp.storage.atomic import check_writable
    from rmtp.storage.saving import load

    folder = Path(folder)
    out = Path(out) if out is not None else folder / "token_map.png"
    check_writable(out, what="--out", is_dir=False)  # before the model is loaded and run
    loaded = load(folder)
    if token_reduction(loaded.model) is None:
        raise RmtpError(f"{folder}: not a token-reduced model (no token-cls, token-mean or tome patch is applied "
                        f"to it), so there is no token map to draw")
    saved = saved_data(folder)  # the folder's recipe.yaml, read as rmtp bench and export read it
    spec = saved.spec if saved is not None else DataSpec()
    val = build_data(spec, loaded.model).val
    count = min(images, len(val))
    if count < 1:
        raise RmtpError(f"{folder}: the val split is empty")
    batch = torch.stack([val[i][0] for i in range(count)])
    return save_token_map(loaded.model, batch, out)
