"""``int8``: Linear layers to int8 weights, run by PyTorch's dynamic-quantization kernel on CPU.

Not pruning: every weight stays, stored in 8 bits with one float scale per output row (4× smaller
than float32), and on a CPU each matmul runs in int8, activations quantized per call. On the real
ViT-Ti (``benchmarks/real_pretrained.py``) it is the one weight method that is faster without
costing accuracy, and it stacks with token merging.

**Data-aware.** With calibration data (``screen: true``, the default) the step first measures, for
each selected layer, how far quantizing that layer alone moves the model's predictions on
``screen_images`` calibration images (KL from the unquantized model), and keeps in float the
layers above ``max_layer_kl``. Pretrained ViTs have layers one int8 scale per activation tensor
cannot serve: an input channel ~100× the others ("massive activations", Sun et al. 2024). On the
real ViT-Ti that is block 7's fc2, −3 points alone; with the 6 of 48 layers above the default
threshold in float, int8 costs −0.27 points at ×1.70 (batch 32, one CPU thread; −0.94 at ×1.55 on
a second split). ``screen: false`` reads no data and quantizes every selected layer. An accuracy
budget searches ``max_layer_kl``.

**Where it runs.** The int8 kernel is a CPU kernel (fbgemm/x86, qnnpack on ARM). On a GPU the layer
emulates it in float ops (same outputs up to summation order, no speed-up), so screening there
sees what the CPU will run. Put ``int8`` after every step that trains (finetune, distill,
reconstruct): its layers pass no gradient.

This package is the plugin (entry point ``int8``): the pruner's declaration here, :mod:`.params`
(no torch), :mod:`.linear` (the saved layer, id ``int8.linear``) and :mod:`.pruner` (the screening
and the swap).
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import CalibrationUse, PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp_plugins.int8.params import Int8Params

__all__ = ["Int8Params", "Int8Pruner"]


class Int8Pruner(Pruner):
    name = "int8"
    description = ("Linear layers to int8 weights (per-channel), CPU int8 kernel; layers whose int8 version "
                   "moves the predictions on calibration images stay in float.")
    kind = "weight"
    Params = Int8Params
    passes_gradients = False

    @classmethod
    def calibration_use(cls, params: PrunerParams | None = None) -> CalibrationUse:
        """Calibration images screen the layers' sensitivity (``screen: true``, the default);
        ``screen: false`` reads none and quantizes every selected layer."""
        return "unused" if getattr(params, "screen", True) is False else "required"

    @classmethod
    def strength_knob(cls, params: PrunerParams, model=None) -> StrengthKnob | None:
        """An accuracy budget searches ``max_layer_kl`` from 0 (weak: every screened layer stays in
        float) up to 0.1 (nearly every layer quantized); the screening runs once per step. Without
        screening there is nothing to search."""
        knob = super().strength_knob(params, model)
        if knob is not None:
            return knob
        if getattr(params, "screen", True) is False:
            raise ValueError("with screen: false every selected layer is quantized, so there is no strength "
                             "to search; screen the layers (screen: true) or drop the accuracy budget")
        return StrengthKnob("max_layer_kl", weak=0.0, strong=0.1, resolution=0.0005)

    @classmethod
    def device_warning(cls, device: str, params: PrunerParams) -> str | None:
        """Off the CPU the int8 layers compute in float ops (the kernel's arithmetic, emulated)."""
        if device == "cpu":
            return None
        return ("int8 layers run emulated in float off the CPU, as accurate as on the CPU and no faster than "
                "float: the speed-up is the CPU's (rmtp bench --device cpu); a saved model runs the int8 kernel there")

    def prune(self, ctx: PruneContext, params: Int8Params) -> PruneResult:
        from rmtp_plugins.int8.pruner import prune  # the screening and the int8 layers (torch), imported when run

        return prune(ctx, params)


@hookimpl
def register_pruners(register) -> None:
    register(Int8Pruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.int8.linear  # noqa: F401 - registers the int8 layer a saved int8 model is rebuilt from
