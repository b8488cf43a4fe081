"""Token reduction for timm ViTs: ``token-cls``, ``token-mean`` (attention-scored pruning, the
seed's schedule, optional EViT fusion) and ``tome`` (token merging by bipartite soft matching).

All three are one reversible forward-pass patch (:mod:`.patch`) saved with the model; the
arithmetic of the schedules is in :mod:`.schedule` and the tensor math in :mod:`.merge`.
See ``docs/tokens.md``.

The package itself is the ``tokens`` plugin (entry point ``tokens``): it adds ``rmtp token-map``,
which serves all three pruners, so blocking one of them (``RMTP_DISABLE_PLUGINS=tome``) keeps it.
"""

from __future__ import annotations

from rmtp.hookspecs import hookimpl


@hookimpl
def register_commands(app) -> None:  # noqa: ANN001 - a typer.Typer
    from rmtp_plugins.tokens.cli import token_map_command

    app.command("token-map")(token_map_command)
