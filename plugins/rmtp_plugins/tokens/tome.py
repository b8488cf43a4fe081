"""``tome``: Token Merging (Bolya et al., ICLR 2023) by bipartite soft matching.

Exactly facebookresearch/ToMe's timm patch for a ViT with a class token (tested against a
transcription of its code, ``tests/_tome_reference.py``): at each block, between attention and
MLP, *all* tokens alternate into sets A (even positions, so the class token is A's first) and B;
each A patch token's edge goes to its most similar B patch token (cosine similarity of the keys
averaged over heads, from this forward pass); the ``r`` strongest edges are merged as size-weighted
means, and the sequence becomes [prefix, unmerged A, B]. Proportional attention adds ``log(size)``
to the attention logits (an additive SDPA mask in the query's dtype) so a merged token counts as
the patches it stands for; average pooling is size-weighted. Class and register tokens never merge
(with one register token this is ToMe's handling of DeiT's distillation token). ``visualize: N``
(every token pruner) writes ``token_map-tome.png`` to the output folder, and ``rmtp token-map
RUN_DIR`` draws the same for a saved run: which patches merged, for a few val images.
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp_plugins.tokens import TomePruner
from rmtp_plugins.tokens.params import TomeParams

__all__ = ["TomeParams", "TomePruner"]  # their first home; declared in rmtp_plugins.tokens now


@hookimpl
def register_pruners(register) -> None:
    register(TomePruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.tokens.patch  # noqa: F401 - registers the token patch (tokens.reduction)
