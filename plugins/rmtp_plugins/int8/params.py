"""``Int8Params``, the params of ``int8`` (:mod:`rmtp_plugins.int8`): plain pydantic, no torch."""

from __future__ import annotations

from pydantic import Field

from rmtp.contract.pruner import PrunerParams

#: The default ``max_layer_kl``. On the real ViT-Ti (``benchmarks/real_pretrained.py``, 64 calibration
#: images) one layer stands out, block 7's fc2, whose input has a channel ~100× its median (the
#: "massive activation" of pretrained ViTs): KL 0.076 quantized alone, 3 points of top-1; a few more
#: lie between 0.001 and 0.006, the median layer far below. At 0.001 (6 of 48 layers in float) int8
#: cost −0.27 points at ×1.70; at 0.002 (3 in float) −0.81 at ×1.79, and then tome r=8 compounded to
#: −2.55 where 0.001 gave −0.81. 0.001 was chosen on that split's held-out score; on a second split
#: (seed 1) it kept 10 layers in float: −0.94 at ×1.55 (benchmarks/README.md).
DEFAULT_MAX_LAYER_KL = 0.001


class Int8Params(PrunerParams):
    screen: bool = Field(
        True, description="measure each layer's sensitivity on calibration images first and keep the sensitive "
                          "ones in float (max_layer_kl); false: quantize every selected layer, no data read")
    max_layer_kl: float = Field(
        DEFAULT_MAX_LAYER_KL, ge=0.0,
        description="a layer stays in float when quantizing it alone moves the model's predictions by more "
                    "than this KL(dense ‖ quantized), mean over the screening images")
    screen_images: int = Field(64, ge=1, description="calibration images the screening runs the model on "
                                                     "(one pass per selected layer)")


__all__ = ["DEFAULT_MAX_LAYER_KL", "Int8Params"]
