"""rmtp's built-in plugins, registered through entry points of group ``rmtp`` exactly as a
third-party package registers its own (see ``pyproject.toml``).

* :mod:`.architectures`: the timm families ``vit``, ``convnext``, ``resnet``.
* :mod:`.magnitude`, :mod:`.svd_mp`, :mod:`.nm`, :mod:`.spp`, :mod:`.tokens`: one package per
  pruner family (``magnitude``; ``svd-mp``; ``n:m``; ``spp``; ``token-cls``, ``token-mean``,
  ``tome`` and the ``token-map`` command), all in one layout: ``__init__`` the plugin and public
  face, ``params.py``, ``pruner.py``, optional ``plan.py`` and ``speed.py``
  (``docs/pruner-contract.md``, "One layout for every built-in pruner").
"""
