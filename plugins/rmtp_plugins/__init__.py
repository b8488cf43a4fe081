"""rmtp's built-in plugins, registered through entry points of group ``rmtp`` exactly as a
third-party package registers its own (see ``pyproject.toml``).

* :mod:`.architectures`: the timm families ``vit``, ``convnext``, ``resnet``.
* :mod:`.magnitude`, :mod:`.svd_mp`: the per-layer pruners ``magnitude`` and ``svd-mp``.
* :mod:`.nm`, :mod:`.spp`, :mod:`.tokens`: one package per pruner family (``n:m``; ``spp``;
  ``token-cls``, ``token-mean``, ``tome`` and the ``token-map`` command), each ``__init__`` its
  public face.
"""
