"""``svd-mp``: drop the singular directions inside the Marchenko–Pastur bulk, split layers in two.

For every selected layer the 2-D weight W (M×N; a conv as out × in·k_h·k_w; a fused qkv as its
q, k, v blocks when ``split_qkv``) is decomposed, W = U·S·Vᵀ, and the MP law is fitted to its
spectrum (:func:`rmtp.spectral.mp.fit_mp`). Directions whose singular value lies above the
bulk's edge s₊ (times ``margin``) carry signal; the rest is treated as noise and dropped.

* Rank per matrix: k = #{s > margin·s₊}, clamped to [``min_rank``, ``max_rank_fraction``·min(M,N)];
  with ``allocation: uniform`` each matrix instead keeps ``target_params`` of its own weights.
* With ``target_params`` the ranks are instead allocated across all selected layers at once: every
  singular direction is scored by how far it stands above its own layer's edge (s / s₊), and the
  best-scored directions are kept until the selected layers hold ``target_params`` of their
  original weight count. Layers whose split would not pay count at their dense size.
  ``allocation: sensitivity`` (calibration data) measures instead how far cutting each layer alone
  moves the model's predictions, and takes the shares with the least summed effect
  (:mod:`.sensitivity`: ASVD's measurement, a knapsack allocation).
* When k·(M+N) < M·N the layer is replaced by two thin layers (:mod:`rmtp_plugins.svd_mp.lowrank`), so params and
  MACs really drop; otherwise it stays dense and, by default, the rank-k reconstruction is written
  back (``when_split_does_not_pay: keep`` leaves it untouched; the default with calibration data,
  where the reconstruction saves nothing and only adds output error). The report says which.
* Speed (:mod:`.speed`, ``docs/latency.md``): with ``only_if_faster`` (default on, off under
  ``target_params``) a split predicted not faster on the target by the step's ``latency:`` stays
  dense and unchanged; ``target_speedup`` / ``target_latency_ms`` set one s/s₊ threshold for all
  selected layers so the model reaches that measured speed-up over the recipe's dense model.
* ``coefficient_pruning`` then zeroes that fraction of the smallest entries of each layer's new
  weights (the factors, or the dense reconstruction): the seeds' direct coefficient pruning. The
  zeros are reported as nonzeros and stay zero through a later ``finetune`` step.
* With calibration data (``whiten``, :mod:`.whitening`) every matrix is decomposed on its
  activation-whitened form W·S (S·Sᵀ = E[x·xᵀ] of the layer's inputs), SVD-LLM's truncation-aware
  whitening: the directions kept are those carrying the most output on real inputs, and the factors
  written are the output-error optimum at each rank, for the inputs of one calibration pass through
  the model as it came; ``sequential`` whitens each layer by its inputs in the model compressed so
  far instead (:func:`rmtp.fidelity.layerwise.compress_sequentially`; no better on a real ViT-Ti, ten times
  slower). The MP edge stays on W (``docs/spectral.md`` says why); budgets (``target_params``,
  speed targets) rank directions by their share of their layer's whitened output energy.
* A layer an earlier round already split (prune → finetune → prune, the seeds' Algorithm 3) holds
  a rank-k matrix: no noise bulk is left to fit, so its directions are measured against the edge s₊
  fitted on the dense weights, which the split layer carries (:mod:`rmtp_plugins.svd_mp.lowrank`). Fine-tuning
  with the ``l2``/``l1`` penalties shrinks the directions the task does not need, and the second
  round cuts those that fell under ``margin``·s₊ (the exact SVD of the factor product is cheap).

This package is the plugin (entry point ``svd-mp``), laid out as every built-in pruner
(``docs/pruner-contract.md``, "Where the pruner's code is imported"): the pruner's declaration
here; :mod:`.params` (``SvdMpParams``, no torch); :mod:`.pruner`, the work, which ``prune`` imports
when it runs, so that ``rmtp list`` and ``rmtp validate`` load no torch; :mod:`.plan`, the
per-layer records :mod:`.pruner` and :mod:`.speed` share; :mod:`.speed`, :mod:`.whitening` and
:mod:`.sensitivity`.
"""

from __future__ import annotations

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import CalibrationUse, PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp_plugins.svd_mp.params import SvdMpParams

__all__ = ["SvdMpParams", "SvdMpPruner"]


class SvdMpPruner(Pruner):
    name = "svd-mp"
    description = "Keep singular directions above the Marchenko–Pastur edge; split layers into two thin ones."
    kind = "weight"
    Params = SvdMpParams
    revisits_replaced_layers = True

    @classmethod
    def calibration_use(cls, params: PrunerParams | None = None) -> CalibrationUse:
        """svd-mp works with or without data: ``whiten: true`` and ``allocation: sensitivity`` require
        it (a recipe step loads it), the default uses it when a caller passes it, ``whiten: false``
        never sees it."""
        whiten = getattr(params, "whiten", None)
        if whiten is True or getattr(params, "allocation", None) == "sensitivity":
            return "required"
        return "unused" if whiten is False else "optional"

    @classmethod
    def strength_knob(cls, params: PrunerParams, model=None) -> StrengthKnob | None:
        """An accuracy budget searches ``target_params`` (0.95 of the selected layers' weights kept,
        weak, down to 0.2 or the value given), or the speed target when one is given."""
        return super().strength_knob(params, model) or StrengthKnob("target_params", weak=0.95, strong=0.2,
                                                                    resolution=0.01)

    def prune(self, ctx: PruneContext, params: SvdMpParams) -> PruneResult:
        from rmtp_plugins.svd_mp.pruner import prune  # the SVDs and splits (torch), imported when run

        return prune(ctx, params)


@hookimpl
def register_pruners(register) -> None:
    register(SvdMpPruner)


@hookimpl
def import_saved_types() -> None:
    import rmtp_plugins.svd_mp.lowrank  # noqa: F401 - registers the low-rank layers a saved svd-mp model is rebuilt from
