"""The architecture-plugin contract: build a timm model of one family and name its prunable layers.

An architecture plugin answers four questions for the pruners, so that no pruner needs to know
timm's module names: how to create a model (by timm name and kwargs, pretrained or from a local
checkpoint), which layers are candidates for pruning (in forward order), how a fused qkv
projection splits into q, k and v, and which layers share a hidden dimension (:class:`Coupling`:
the producer/consumer pairs structured pruners cut or permute together, with what sits between
them). Two more questions serve the pruners that change a model's structure rather than its
weights: whether a coupling's groups (heads, neurons) can be removed and how a head count is recorded
(:meth:`Architecture.removal_problem`, :meth:`Architecture.set_head_count`: spp), and whether the
model runs its tokens through blocks a token pruner can reduce between (:class:`TokenBlocks`:
token-cls, token-mean, tome). Adding a model family is one architecture module; the pruners read
only this contract and never name a timm class.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from rmtp.errors import CheckpointError, PluginError, short_repr

if TYPE_CHECKING:  # the contract loads without torch (`rmtp list`, `rmtp validate`); models bring it
    from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the *unpruned* model: saved next to every pruned model."""

    name: str
    arch: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "pretrained": self.pretrained,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


#: Characters of a model name :func:`timm_name_hint` compares (timm's longest name has 39).
_HINT_CHARS = 64


def timm_name_hint(name: str, n: int = 5) -> str:
    """``"; similar: a, b, …"``, the timm model names closest to ``name`` (difflib similarity,
    closest first), or ``""`` when none is close: the tail of every "timm has no model" message.

    The names sharing ``name``'s stem (``vit`` of ``vit_tinyy_patch16``) are ranked; a misspelt
    stem falls back to the names across timm that are at least half similar. A pretrained tag
    (``.augreg_in21k``) is ignored.
    """
    import difflib

    import timm

    base = name.split(".")[0][:_HINT_CHARS]  # difflib is quadratic: a 100,000-character name took minutes
    stem = re.split(r"[_\d]", base)[0] or base
    names = timm.list_models()
    pool = [m for m in names if m.startswith(stem)]
    if not pool:
        pool = [m for m in names if difflib.SequenceMatcher(None, m, base).ratio() >= 0.5]
    close = sorted(pool, key=lambda m: -difflib.SequenceMatcher(None, m, base).ratio())[:n]
    return f"; similar: {', '.join(close)}" if close else ""


def _kwargs_rejected(spec: ModelSpec, exc: Exception) -> PluginError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return PluginError(f"model.kwargs: timm could not build {spec.name!r} with kwargs {short_repr(spec.kwargs)}: "
                       f"{exc.__class__.__name__}: {short_repr(detail, 200)[1:-1] if detail else '(no message)'}")


def has_submodule(module: nn.Module, dotted: str) -> bool:
    """Whether ``module`` has the submodule ``dotted`` (``get_submodule`` raises instead)."""
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight layer of a model.

    ``optional`` layers (a classifier head, a patch embedding) are left alone unless a step's
    ``layers`` filter names them explicitly: pruning them costs accuracy out of proportion to the
    parameters saved, so they are opt-in.
    """

    name: str
    role: str
    optional: bool = False


CouplingKind = Literal["heads", "neurons", "channels"]


@dataclass(frozen=True)
class Coupling:
    """A hidden dimension one layer writes and the next reads: what structured pruning must cut,
    or permute, in both layers at once.

    ``producer``'s output rows (``rows`` of them, all when ``None``) are, channel for channel,
    ``consumer``'s inputs, after the modules ``between`` (dotted paths, in forward order). Among
    those, ``norms`` are the normalisations whose per-channel parameters and statistics belong to
    the producer's channels (a BatchNorm after a conv): they are sliced or permuted along with it.
    The other modules in ``between`` are meant to act on each channel alike (activations, dropout,
    pooling); a pruner still checks each one it is handed, and refuses the coupling, naming the
    module, when it is not.

    ``kind`` says what the channels are: ``"heads"`` (attention heads: the v rows of a fused qkv
    projection feed the output projection, ``group`` = head_dim consecutive channels per head, so a
    head is cut or permuted as a whole block), ``"neurons"`` (an MLP's hidden layer) or
    ``"channels"`` (a conv's output channels read by the next conv of a residual branch).
    ``name`` is what reports call it: the attention or MLP module, or the producing conv.
    """

    kind: CouplingKind
    name: str
    producer: str
    consumer: str
    between: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    rows: slice | None = None
    group: int = 1

    def touches(self, layer_names: set[str]) -> bool:
        """Whether the producer or the consumer is among ``layer_names`` (a step's selected layers)."""
        return self.producer in layer_names or self.consumer in layer_names


@dataclass(frozen=True)
class TokenBlocks:
    """How a model runs its token sequence, declared by its architecture for the token pruners.

    The model's forward is timm's ``VisionTransformer`` one (``patch_embed`` → ``_pos_embed`` →
    ``patch_drop`` → ``norm_pre`` → ``blocks`` → ``norm`` → ``forward_head``), and every block is a
    pre-norm transformer block (``norm1``, ``attn`` with a fused ``qkv``, ``ls1``, ``drop_path1``,
    ``norm2``, ``mlp``, ``ls2``, ``drop_path2``): the token patch reproduces exactly that and
    reduces tokens between each block's attention and its MLP. ``num_prefix_tokens`` (class,
    distillation and register tokens, first in the sequence) are never dropped or merged;
    ``has_class_token`` says whether the first of them is a class token (``token-cls`` scores by it).
    ``pool_takes_mask`` says that the model's attention pool (``attn_pool``, if it has one) adds an
    ``attn_mask`` over the tokens it pools to its attention logits, through which the patch gives it
    the tokens' sizes (proportional attention); a model whose attention pool does not is refused.
    """

    num_prefix_tokens: int
    has_class_token: bool
    num_patches: int
    depth: int
    pool_takes_mask: bool = False


class Architecture(ABC):
    """Base class of architecture plugins (``vit``, ``convnext``, ``resnet`` and third-party ones)."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: fnmatch patterns of the timm model names this family covers, e.g. ``("vit_*", "deit_*")``.
    model_patterns: ClassVar[tuple[str, ...]]

    def matches(self, model_name: str) -> bool:
        """Whether this family covers the timm model ``model_name``."""
        base = model_name.split(".")[0]  # drop a pretrained tag such as ".augreg_in21k"
        return any(fnmatch.fnmatchcase(base, p) for p in self.model_patterns)

    def create(self, spec: ModelSpec) -> nn.Module:
        """Build the model ``spec`` describes: random init, timm pretrained weights, or a local checkpoint."""
        import timm

        from rmtp import sources
        from rmtp.storage.weights import load_state_dict_into, read_state_dict

        name = sources.normalise_name(spec.name)  # timm/NAME.tag; hf-hub: names are timm's to read
        if not sources.is_hub_name(name) and not timm.is_model(name.split(".")[0]):
            raise PluginError(f"model.name: timm has no model {short_repr(spec.name, 80)}{timm_name_hint(name)}")
        if spec.pretrained and spec.checkpoint:
            raise CheckpointError("model: give either pretrained: true or checkpoint, not both")
        try:
            model = timm.create_model(name, pretrained=spec.pretrained, **spec.kwargs)
        except (OSError, RuntimeError) as exc:
            what = (f"model.pretrained: could not fetch pretrained weights for {spec.name!r}" if spec.pretrained
                    else f"model.name: could not read {spec.name!r}")
            failure = sources.fetch_failure(what, sources.pretrained_repo(name), exc) \
                if spec.pretrained or sources.is_hub_name(name) else None
            if failure is not None:
                raise failure from exc
            if spec.pretrained:
                raise CheckpointError(
                    f"{what} (timm needs network access to the Hugging Face hub; offline, download the "
                    f"weights elsewhere and pass model.checkpoint): {exc.__class__.__name__}: "
                    f"{' '.join(str(exc).split())}"
                ) from exc
            raise _kwargs_rejected(spec, exc) from exc
        except Exception as exc:
            # a size timm asserts on (AssertionError), a wrong type (TypeError) all come from the recipe
            raise _kwargs_rejected(spec, exc) from exc
        if spec.checkpoint is not None:
            load_state_dict_into(model, read_state_dict(spec.checkpoint), source=str(spec.checkpoint))
        return model.eval()

    @abstractmethod
    def prunable_layers(self, model: nn.Module, *, include_replaced: bool = False) -> list[PrunableLayer]:
        """The candidate layers of ``model`` in forward order, optional ones flagged.

        Plain layers only by default. ``include_replaced`` also lists, under the same names, layers a
        pruner already replaced (e.g. a low-rank split); the pipeline asks for them only for pruners
        that declare ``revisits_replaced_layers`` (svd-mp's second round in prune → finetune → prune).
        """

    def qkv_split(self, layer_name: str, module: nn.Module) -> dict[str, slice] | None:
        """For a fused qkv projection, the output-row slices of q, k and v; ``None`` otherwise."""
        return None

    def blocks(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s repeated blocks in forward order, each taking and returning one
        tensor: what block-wise reconstruction (:mod:`rmtp.fidelity.blockwise`) fits one at a time. The
        default declares none, and such a family is refused by ``reconstruct`` with the reason."""
        return []

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """The producer/consumer pairs of ``model`` that share a hidden dimension, in forward order.

        Structured pruners (spp's heads, neurons and channels; n:m's input permutations absorbed by
        the producer) work only where a coupling is declared. The default declares none: a family
        without couplings still gets every per-layer pruner.
        """
        return []

    def removal_problem(self, model: nn.Module, coupling: Coupling) -> str | None:
        """Why a structured pruner cannot remove groups of ``coupling`` (heads, neurons, channels),
        or ``None`` when it can.

        The pruner checks what removal needs of the two layers and of the modules between them
        (plain layers, matching sizes, per-channel norms); the family answers for what only it
        knows: what its attention computes per head or across heads (a per-head bias table, a norm
        over the concatenated heads, rotary embeddings), what its MLP mixes across hidden units (a
        gated or GLU MLP, a global response norm). Heads removed must then be recorded with
        :meth:`set_head_count`. The default refuses heads (a family that declares heads couplings
        for n:m's permutations alone need not support removing them) and accepts the rest.
        """
        if coupling.kind == "heads":
            return f"the {self.name} architecture does not say how its attention records a head count"
        return None

    def set_head_count(self, model: nn.Module, attention: str, count: int) -> None:
        """Record that the attention at ``attention`` now has ``count`` heads (its qkv and output
        projection already sliced to them), so its forward reshapes by the new count.

        Called when spp slices heads and again when a saved head-pruned model is loaded (the
        ``spp.attention_heads`` patch). Raises :class:`PluginError` when the sizes do not fit.
        """
        raise PluginError(f"the {self.name} architecture does not say how its attention records a head count")

    def token_blocks(self, model: nn.Module) -> TokenBlocks:
        """How ``model`` runs its tokens (:class:`TokenBlocks`), for the token pruners; raises
        :class:`PluginError` with the reason when they cannot reduce its tokens (windowed attention
        on a fixed grid, rotary positions, a block type the token patch does not reproduce).

        The default refuses: token reduction needs a family that vouches for its forward pass.
        """
        raise PluginError(f"the {self.name} architecture declares no token blocks (Architecture.token_blocks), "
                          f"so token pruners cannot reduce its tokens")
