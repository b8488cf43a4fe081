"""Token reduction for timm ViTs: ``token-cls``, ``token-mean`` (attention-scored pruning, the
seed's schedule, optional EViT fusion) and ``tome`` (token merging by bipartite soft matching).

All three are one reversible forward-pass patch (:mod:`.patch`) saved with the model; the
arithmetic of the schedules is in :mod:`.schedule` and the tensor math in :mod:`.merge`.
See ``docs/tokens.md``.
"""
