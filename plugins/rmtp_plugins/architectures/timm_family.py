"""What the built-in architecture plugins share: a timm model family described by its module names.

Each built-in adapter (``vit``, ``convnext``, ``resnet``) is a declaration: the timm names it
covers, the timm source modules those models come from, the regular expressions that pick its
prunable layers out of ``named_modules()``, and the children every repeated block must have.
Keeping the logic here means the three adapters read the same way and cannot drift apart.

Why the timm *source module* matters: name globs alone are too coarse. ``vit_*`` also names Eva
models (``vit_base_patch16_dinov3``), parallel-block models (``vit_base_patch16_xp_224``) and
others whose layers are named or wired differently; an adapter that claimed them would list the
wrong layers or none.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from rmtp.contract.architecture import Architecture, Coupling, ModelSpec, PrunableLayer, has_submodule
from rmtp.errors import PluginError

if TYPE_CHECKING:  # torch is imported by the methods that are handed a model, so that `rmtp list`
    from torch import nn  # and `rmtp validate` load this plugin without it


def prunable_types() -> tuple[type[nn.Module], ...]:
    """Module types a pruner can treat as one weight matrix. Anything else at a matching name (an
    ``nn.Identity`` head when ``num_classes=0``, a pruner's replacement module) is not a candidate."""
    from torch import nn

    return (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerRule:
    """Module names fully matching ``pattern`` (a regular expression) are prunable with ``role``."""

    pattern: str
    role: str
    optional: bool = False

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


def replaced_on_path(block: nn.Module, dotted: str) -> bool:
    """Whether a module on the way to ``dotted`` inside ``block`` is a pruner's replacement (so the
    modules below it are gone by design)."""
    from rmtp.contract.saved_types import is_replacement

    module = block
    for part in dotted.split("."):
        module = module._modules.get(part)
        if module is None:
            return False
        if is_replacement(module):
            return True
    return False


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped or depthwise convolution: its weight is ``groups`` separate matrices, not one."""
    from torch import nn

    return isinstance(module, nn.Conv2d) and module.groups > 1


class TimmFamily(Architecture):
    """An :class:`Architecture` for one timm model family, driven by the class attributes below."""

    #: timm source modules (``timm.models.<module>``) whose models use this family's layer names.
    timm_modules: ClassVar[tuple[str, ...]]
    #: Model names inside those modules that are built from other block types (fnmatch globs).
    unsupported_patterns: ClassVar[tuple[str, ...]] = ()
    #: Regular expression of the repeated blocks' names, e.g. ``blocks\.\d+``.
    block_pattern: ClassVar[str]
    #: Children (dotted, relative to a block) every block must have for the rules to make sense.
    block_children: ClassVar[tuple[str, ...]]
    #: The prunable layers, tried in order; the first rule matching a module's name decides its role.
    layer_rules: ClassVar[tuple[LayerRule, ...]]

    def matches(self, model_name: str) -> bool:
        """Name globs, narrowed to the timm source modules whose models this family really fits.

        A name timm does not know is judged by the globs alone, so that :meth:`create` gets to
        answer it with timm's similar names instead of "no plugin covers it".
        """
        if not super().matches(model_name):
            return False
        import timm
        from timm.models import is_model_in_modules

        base = model_name.split(".")[0]
        if not timm.is_model(base):
            return True
        if any(fnmatch.fnmatchcase(base, pattern) for pattern in self.unsupported_patterns):
            return False
        return is_model_in_modules(base, self.timm_modules)

    def create(self, spec: ModelSpec) -> nn.Module:
        """Build the model, then refuse it if its layout is not this family's (see :meth:`check_structure`)."""
        model = super().create(spec)
        self.check_structure(model, spec.name)
        return model

    def check_structure(self, model: nn.Module, model_name: str = "the model") -> None:
        """Raise :class:`PluginError` unless every block of ``model`` has the children this family expects.

        Run on the freshly built model, and by :func:`rmtp.infer_architecture` on a model in hand,
        which may be one a pruner has already cut: a child missing because a pruner replaced a module
        on its path (spp turns an attention or MLP that lost every head or neuron into one constant
        module) is the family's layout, pruned, not another layout.
        """
        blocks = self._blocks(model)
        if not blocks:
            raise self._not_this_family(model_name, f"it has no blocks named like {self.block_pattern!r}")
        for block_name, block in blocks:
            for child in self.block_children:
                if not has_submodule(block, child) and not replaced_on_path(block, child):
                    raise self._not_this_family(model_name, f"block {block_name} has no {child!r}")
            problem = self.block_problem(block)
            if problem:
                raise self._not_this_family(model_name, f"block {block_name}: {problem}")

    def block_problem(self, block: nn.Module) -> str | None:
        """A family-specific reason why ``block`` cannot be pruned by layer, or ``None``."""
        return None

    def prunable_layers(self, model: nn.Module, *, include_replaced: bool = False) -> list[PrunableLayer]:
        """The modules matching :attr:`layer_rules`, in ``named_modules`` (forward) order.

        Only plain ``nn.Linear`` / dense ``nn.Conv2d`` modules are listed: grouped and depthwise
        convolutions never are (their weight is not one matrix), nor, unless ``include_replaced``,
        are layers a pruner has already replaced.
        """
        from rmtp.contract.saved_types import is_replacement

        if not self._blocks(model):
            raise self._not_this_family("the model", f"it has no blocks named like {self.block_pattern!r}")
        layers, types = [], prunable_types()
        for name, module in model.named_modules():
            rule = self._rule_for(name)
            if rule is None:
                continue
            plain = isinstance(module, types) and not is_grouped_conv(module)
            if not plain and not (include_replaced and is_replacement(module)):
                continue
            layers.append(PrunableLayer(name=name, role=rule.role, optional=rule.optional))
        return layers

    def _rule_for(self, name: str) -> LayerRule | None:
        return next((rule for rule in self.layer_rules if rule.matches(name)), None)

    def blocks(self, model: nn.Module) -> list[str]:
        """The modules named like :attr:`block_pattern`, in ``named_modules`` (forward) order."""
        return [name for name, _ in self._blocks(model)]

    def _blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in model.named_modules() if re.fullmatch(self.block_pattern, name)]

    def _not_this_family(self, model_name: str, why: str) -> PluginError:
        return PluginError(
            f"architecture {self.name!r} cannot handle {model_name}: {why}; it covers timm models "
            f"{', '.join(self.model_patterns)} from timm.models.{{{', '.join(self.timm_modules)}}} "
            f"built with their default block types"
        )


def children_present(block: nn.Module, block_name: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The full paths of those of ``names`` (children of ``block``, in the order given) that exist."""
    return tuple(f"{block_name}.{n}" for n in names if has_submodule(block, n))


def mlp_coupling(model: nn.Module, mlp_name: str) -> Coupling | None:
    """The hidden neurons of a timm MLP at ``mlp_name`` (``fc1`` → act, dropout, norm/GRN → ``fc2``),
    or ``None`` when it has no ``fc1``/``fc2`` pair (an earlier pruner removed the branch)."""
    try:
        mlp = model.get_submodule(mlp_name)
    except AttributeError:
        return None
    if not (has_submodule(mlp, "fc1") and has_submodule(mlp, "fc2")):
        return None
    from torch import nn

    norms = tuple(p for p in children_present(mlp, mlp_name, ("norm", "grn"))
                  if not isinstance(model.get_submodule(p), nn.Identity))
    return Coupling("neurons", mlp_name, f"{mlp_name}.fc1", f"{mlp_name}.fc2",
                    between=children_present(mlp, mlp_name, ("act", "drop1", "norm", "grn")), norms=norms)


def head_coupling(model: nn.Module, attn_name: str) -> Coupling | None:
    """The heads of the fused-qkv attention at ``attn_name``: ``num_heads`` groups of head_dim
    channels (its ``head_dim``, else proj's inputs over the heads), the v rows of ``qkv`` (all of
    q, then k, then v) feeding ``proj``; ``None`` when the sizes do not say so (an earlier pruner
    replaced the branch, or this is not a fused-qkv attention)."""
    try:
        attn = model.get_submodule(attn_name)
        qkv, proj = attn.get_submodule("qkv"), attn.get_submodule("proj")
    except AttributeError:
        return None
    heads = getattr(attn, "num_heads", None)
    qkv_weight, proj_weight = getattr(qkv, "weight", None), getattr(proj, "weight", None)
    if not isinstance(heads, int) or heads < 1 or qkv_weight is None or proj_weight is None or proj_weight.ndim != 2:
        return None
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None and proj_weight.shape[1] % heads == 0:
        head_dim = proj_weight.shape[1] // heads
    if not isinstance(head_dim, int):
        return None
    dim = heads * head_dim
    if qkv_weight.ndim != 2 or qkv_weight.shape[0] != 3 * dim or proj_weight.shape[1] != dim:
        return None
    return Coupling("heads", attn_name, f"{attn_name}.qkv", f"{attn_name}.proj",
                    between=children_present(attn, attn_name, ("norm", "gate")), rows=slice(2 * dim, 3 * dim),
                    group=head_dim)


def timm_attention_problem(attn: nn.Module) -> str | None:
    """Why the heads of ``attn`` cannot be removed when it is meant to be timm's ``Attention``
    (``None`` if they can): another attention class, an output gate, a norm over all heads."""
    from timm.layers import Attention
    from torch import nn

    if type(attn) is not Attention:
        return f"a {type(attn).__name__}, not timm's Attention"
    if getattr(attn, "gate", None) is not None:
        return "it has an output gate (gated attention), which spp does not slice"
    if not isinstance(getattr(attn, "norm", None), nn.Identity):
        return "it normalises the concatenated heads (scale_norm), which mixes heads"
    return None


def timm_mlp_problem(mlp: nn.Module) -> str | None:
    """Why the hidden units of ``mlp`` cannot be removed one by one when it is meant to be timm's
    ``Mlp`` (``None`` if they can).

    ConvNeXt-V2's ``GlobalResponseNormMlp`` divides every hidden channel by the *mean over all
    channels* of their spatial norms, so removing a channel changes the others; gated MLPs (GLU,
    SwiGLU) mix two halves of the hidden layer."""
    from timm.layers import GlobalResponseNormMlp, Mlp

    if isinstance(mlp, GlobalResponseNormMlp):
        return ("a GlobalResponseNormMlp (ConvNeXt-V2): its GRN divides each hidden channel by the mean "
                "over all channels, so removing a channel changes the others and cannot be sliced exactly")
    if type(mlp) is not Mlp:
        return f"a {type(mlp).__name__}, not timm's Mlp (gated MLPs such as SwiGLU are not supported)"
    return None


def fused_qkv_split(rule: LayerRule, layer_name: str, module: nn.Module) -> dict[str, slice] | None:
    """q, k and v as thirds of a fused qkv Linear's output rows (all of q, then k, then v: the order
    timm's attentions unbind them in), for a layer named by ``rule``; ``None`` for any other."""
    from torch import nn

    if not rule.matches(layer_name) or not isinstance(module, nn.Linear) or module.out_features % 3:
        return None
    dim = module.out_features // 3
    return {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}


def attention_and_mlp_couplings(family: TimmFamily, model: nn.Module) -> list[Coupling]:
    """Per block of ``family``, in forward order: the heads of its ``attn`` (:func:`head_coupling`)
    and the hidden neurons of its ``mlp`` (:func:`mlp_coupling`), where the sizes say so."""
    found: list[Coupling] = []
    for block_name, _ in family._blocks(model):
        heads = head_coupling(model, f"{block_name}.attn")
        neurons = mlp_coupling(model, f"{block_name}.mlp")
        found += [c for c in (heads, neurons) if c is not None]
    return found


def bypasses_qkv(attn: nn.Module) -> bool:
    """Whether ``attn`` computes its fused projection as ``F.linear(x, qkv.weight, bias)`` rather
    than by calling ``qkv``: an attention with q/v biases (Eva's, Swin V2's, BEiT's) and
    ``qkv_bias_separate`` off."""
    return (getattr(attn, "qkv", None) is not None and getattr(attn, "q_bias", None) is not None
            and not getattr(attn, "qkv_bias_separate", False))


def route_qkv_through_module(model: nn.Module) -> list[str]:
    """Switch every attention of ``model`` that bypasses its ``qkv`` module (:func:`bypasses_qkv`)
    to timm's ``qkv_bias_separate`` path, ``qkv(x) + bias``: the same function through the module,
    so a pruner may replace ``qkv``. Returns the attentions switched (names), in forward order."""
    switched = []
    for name, module in model.named_modules():
        if bypasses_qkv(module):
            module.qkv_bias_separate = True
            switched.append(name)
    return switched


class QkvBiasOutside(TimmFamily):
    """A family whose attentions may keep their q/v biases outside ``qkv`` and compute
    ``F.linear(x, qkv.weight, bias)`` (Eva's ``EvaAttention``, Swin V2's ``WindowAttention``, BEiT's
    ``Attention``), and
    whose MLP hidden neurons are its only couplings.

    :meth:`create` (every model rmtp builds or reloads) routes such attentions through their ``qkv``
    module (:func:`route_qkv_through_module`), so a pruner's replacement of ``qkv`` is used; on a
    model handed in as timm built it, :meth:`prunable_layers` leaves a bypassed ``qkv`` out. Heads
    are not declared: the q/k/v biases sit outside ``qkv``, so n:m's permutation of its rows within a
    head would leave them behind, and these attentions keep per-head state (rotary dimensions,
    logit scales, position-bias MLPs) that removing heads would not follow.
    """

    def create(self, spec: ModelSpec) -> nn.Module:
        """Build (and load) the model, then route every bypassed ``qkv`` through its module, so recipes
        and reloaded folders prune and run the same layers."""
        model = super().create(spec)
        route_qkv_through_module(model)
        return model

    def prunable_layers(self, model: nn.Module, *, include_replaced: bool = False) -> list[PrunableLayer]:
        """:class:`TimmFamily`'s layers, less each ``attn.qkv`` its attention bypasses (:func:`bypasses_qkv`)."""
        layers = super().prunable_layers(model, include_replaced=include_replaced)
        bypassed = {f"{name}.qkv" for name, module in model.named_modules() if bypasses_qkv(module)}
        return [layer for layer in layers if layer.name not in bypassed]

    def couplings(self, model: nn.Module) -> list[Coupling]:
        """Per block, the hidden neurons of a plain timm ``Mlp`` (``mlp.fc1`` → ``mlp.fc2``); no heads
        (class docstring) and no gated MLPs, whose ``fc1`` rows are not ``fc2``'s inputs one for one."""
        from timm.layers import Mlp

        found = []
        for block_name, block in self._blocks(model):
            if type(block.get_submodule("mlp")) is Mlp:
                coupling = mlp_coupling(model, f"{block_name}.mlp")
                if coupling is not None:
                    found.append(coupling)
        return found

    def removal_problem(self, model: nn.Module, coupling: Coupling) -> str | None:
        """Neurons of timm's ``Mlp`` can be removed; heads are never declared."""
        if coupling.kind == "neurons":
            return timm_mlp_problem(model.get_submodule(coupling.name))
        return super().removal_problem(model, coupling)
