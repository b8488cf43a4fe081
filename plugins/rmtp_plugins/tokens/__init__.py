"""Token reduction for timm ViTs: ``token-cls``, ``token-mean`` (attention-scored pruning, the
seed's schedule, optional EViT fusion) and ``tome`` (token merging by bipartite soft matching).

All three are one reversible forward-pass patch (:mod:`.patch`) saved with the model; the
arithmetic of the schedules is in :mod:`.schedule` and the tensor math in :mod:`.merge`.
See ``docs/tokens.md``.

Laid out as every built-in pruner (``docs/pruner-contract.md``, "Where the pruner's code is
imported"): the pruners' declarations here (:class:`TokenPruner` and its three subclasses, torch-free);
:mod:`.params` (their params); :mod:`.pruner` (the work, imported when a pruner runs); :mod:`.plan`
(:class:`~.plan.TokenPlan`, the patch config :mod:`.pruner` and :mod:`.speed` share); :mod:`.speed`.
Each pruner has its own entry module, :mod:`.token_cls`, :mod:`.token_mean`, :mod:`.tome`, which
only registers it (so ``RMTP_DISABLE_PLUGINS=tome`` blocks one of them). The package itself is the
``tokens`` plugin (entry point ``tokens``): it adds ``rmtp token-map`` (:mod:`.cli`), which serves
all three pruners, so blocking one of them keeps it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

from rmtp.contract.hookspecs import hookimpl
from rmtp.contract.pruner import PruneContext, Pruner, PruneResult, PrunerParams
from rmtp.errors import PluginError
from rmtp.fidelity.accuracy_budget import StrengthKnob
from rmtp.lazy import lazy_exports
from rmtp_plugins.tokens.params import (
    PruneScheduleParams,
    TokenClsParams,
    TokenMeanParams,
    TokenParams,
    TomeParams,
)
from rmtp_plugins.tokens.plan import Method, TokenPlan
from rmtp_plugins.tokens.schedule import tome_r_list

if TYPE_CHECKING:  # the patch and the MAC counts are imported where a pruner runs: the
    from torch import nn  # declarations load no torch (`rmtp list`, `rmtp validate`)

    from rmtp.contract.architecture import Architecture

_LAZY = {"block_macs": "rmtp_plugins.tokens.pruner"}

__all__ = ["PruneScheduleParams", "TokenClsParams", "TokenClsPruner", "TokenMeanParams", "TokenMeanPruner",
           "TokenParams", "TokenPlan", "TokenPruner", "TomeParams", "TomePruner", "block_macs"]


class TokenPruner(Pruner):
    """Base of ``token-cls``, ``token-mean`` and ``tome``: build a :class:`TokenPlan`, patch, report."""

    kind = "token"
    method: ClassVar[Method]

    @abstractmethod
    def plan(self, params: PrunerParams, depth: int) -> TokenPlan:
        """The patch config for a model of ``depth`` blocks."""

    def prune(self, ctx: PruneContext, params: PrunerParams) -> PruneResult:
        from rmtp_plugins.tokens.pruner import prune  # the patch, the MAC counts, the speed search (torch)

        return prune(ctx, params, name=self.name, plan=self.plan, strengths=self.speed_strengths)

    @classmethod
    def strength_knob(cls, params: PrunerParams, model: nn.Module | None = None) -> StrengthKnob | None:
        """An accuracy budget searches the schedule's strength (``r_max``; tome's ``r``), the shape
        (``alpha``, ``start_layer``, ``ramp``) as given, or the speed target when one is given; an
        explicit per-block list (``keep``, ``r_list``) has no strength to search."""
        knob = super().strength_knob(params, model)
        if knob is not None:
            return knob
        if getattr(params, params.explicit_key, None) is not None:
            raise ValueError(f"{params.explicit_key} sets every block by hand, so there is no strength to search; "
                             f"give {params.strength_key} instead (the strongest the budget may try)")
        return cls.schedule_knob(model)

    @classmethod
    def schedule_knob(cls, model: nn.Module | None) -> StrengthKnob:
        """The schedule's strength from none (weak) to its strong end (``r_max`` 0.9)."""
        return StrengthKnob("r_max", weak=0.0, strong=0.9, resolution=0.01)

    @classmethod
    def structure_problem(cls, arch: Architecture, model: nn.Module, params: PrunerParams) -> str | None:
        """What the patch refuses in ``model`` (:func:`~rmtp_plugins.tokens.patch.model_problem`: the
        family's token blocks, the pool, the class token a schedule scores by), in the words
        :meth:`prune` would raise."""
        from rmtp_plugins.tokens.patch import patch_refusal
        from rmtp_plugins.tokens.pruner import token_layout

        try:
            token_layout(cls.name, arch, model)
            return patch_refusal(model, cls().plan(params, len(model.blocks)), arch)
        except PluginError as exc:  # the family's refusal, or a per-block list of the wrong length
            return str(exc)

    def speed_strengths(self, ctx: PruneContext) -> list[object]:
        """The values of the schedule's strength a speed target searches, gentlest first."""
        return [i / 200 for i in range(200)]  # r_max in steps of 0.005, below 1 (keep(L−1) = 1 − r_max > 0)


class TokenClsPruner(TokenPruner):
    name = "token-cls"
    description = "ViT token pruning by class-token attention, keep(l) = 1 − r_max·((l+1)/L)^α (seed 001)."
    method = "cls"
    Params = TokenClsParams

    def plan(self, params: TokenClsParams, depth: int) -> TokenPlan:
        return TokenPlan(method="cls", keep=params.keep_list(depth), relative_to=params.relative_to,
                         min_tokens=params.min_tokens, fuse=params.fuse, score_from=params.score_from)


class TokenMeanPruner(TokenPruner):
    name = "token-mean"
    description = "ViT token pruning by the mean attention each patch receives from the others (seed 001)."
    method = "mean"
    Params = TokenMeanParams

    def plan(self, params: TokenMeanParams, depth: int) -> TokenPlan:
        return TokenPlan(method="mean", keep=params.keep_list(depth), relative_to=params.relative_to,
                         min_tokens=params.min_tokens, fuse=params.fuse)


class TomePruner(TokenPruner):
    name = "tome"
    description = "ViT token merging (ToMe): bipartite soft matching, proportional attention, r per block."
    method = "tome"
    Params = TomeParams

    @classmethod
    def schedule_knob(cls, model) -> StrengthKnob:
        """``r`` from 0 (weak) to half the model's patches (100 before a model exists)."""
        patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        return StrengthKnob("r", weak=0, strong=patches // 2 if patches else 100, integer=True)

    def speed_strengths(self, ctx) -> list[object]:
        return list(range(ctx.model.patch_embed.num_patches // 2 + 1))  # r: at most half the patches

    def plan(self, params: TomeParams, depth: int) -> TokenPlan:
        if params.r_list is None:
            r = tome_r_list(depth, params.r, params.ramp)
        elif len(params.r_list) != depth:
            raise PluginError(f"r_list lists {len(params.r_list)} counts but the model has {depth} blocks")
        else:
            r = list(params.r_list)
        return TokenPlan(method="tome", r=r, prop_attn=params.prop_attn)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


@hookimpl
def register_commands(app) -> None:
    from rmtp_plugins.tokens.cli import token_map_command

    app.command("token-map")(token_map_command)
