"""The one mechanism behind ``token-cls``, ``token-mean`` and ``tome``: a reversible patch of a
ViT's forward pass that reduces tokens between each block's attention and its MLP.

Which models qualify is the architecture's to say (:meth:`rmtp.contract.architecture.Architecture.token_blocks`:
timm's ``VisionTransformer`` for ``vit``, the distilled DeiT for ``deit``); this module names no
timm class. What it reproduces is the forward the architecture vouches for (:class:`TokenBlocks`):
``patch_embed`` → ``_pos_embed`` → ``patch_drop`` → ``norm_pre`` → pre-norm blocks → ``norm`` →
``forward_head``.

:class:`TokenReduction` is an :class:`rmtp.contract.saved_types.ModelPatch`. Applying it swaps the classes of
the model and of its blocks for subclasses made once per original class (:func:`token_class`:
:class:`TokenModel` or :class:`TokenBlock` first, then the original), the technique of
``torch.nn.utils.parametrize``: no module is replaced, no parameter or buffer is added or
renamed, so the state dict, the architecture adapter's layer names, weight pruners and optimizers
see the same model. Each block gets its per-layer plan (:class:`LayerSpec`) as a plain attribute.
Removing the patch restores the original classes and deletes those attributes: the model is then
exactly what it was.

A patched block does what a pre-norm transformer block and its fused-qkv attention do (pre-norm,
fused ``scaled_dot_product_attention`` or the explicit path when ``fused_attn`` is off, ``q_norm`` /
``k_norm``, ``norm`` (scale-norm), the sigmoid ``gate``, ``attn_drop``/``proj_drop``, LayerScale
``ls1``/``ls2``, ``drop_path``), plus, at a block whose plan reduces tokens::

    x = x + drop_path1(ls1(attn(norm1(x))))        # attention, scores from this very pass
    x, size = reduce(x, size, scores)              # prune (cls / mean scores) or merge (ToMe)
    x = x + drop_path2(ls2(mlp(norm2(x))))

Token counts come from the input's shape through :mod:`.schedule` (static per input size), the
selection is per image, and gradients flow through everything except the discrete choice of
tokens. The class, distillation and register tokens (``num_prefix_tokens``) are never reduced.
``tome`` plans say which tokens alternate into ToMe's sets (``ab_sets``, :mod:`.merge`): today's
plans use ToMe's (``sequence``); a record saved before the field existed keeps the patch-only sets
it ran with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmtp.contract.architecture import Architecture
from rmtp.contract.saved_types import ModelPatch, model_patch, patches_of
from rmtp.errors import PluginError
from rmtp.plugins import ArchitectureRef
from rmtp_plugins.tokens.merge import merge_tokens, prefix_attention, prune_tokens, received_attention
from rmtp_plugins.tokens.plan import ABSets, Method, TokenPlan
from rmtp_plugins.tokens.schedule import RelativeTo, merged_count, pruned_count

#: Children of a pre-norm block / its attention the patched forward reproduces (those of timm's
#: ``Block`` and ``Attention``). A block or attention with any other child (a newer timm feature)
#: is refused rather than run without it.
BLOCK_CHILDREN = frozenset({"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"})
ATTENTION_CHILDREN = frozenset({"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"})
#: Global pools whose result the patch knows how to keep right ('avg'/'avgmax' become size-weighted;
#: 'map', timm's attention pool, attends with proportional attention, :meth:`TokenModel.pool`).
SUPPORTED_POOLS = ("token", "avg", "avgmax", "max", "map")

#: Why a token-reduced model is refused a second token pruner (the patch and the pruners say it alike).
ALREADY_REDUCED = ("it is already token-reduced (token reducers do not stack: remove that patch first with "
                   "rmtp.unpatch(model))")

_SPEC_ATTR = "rmtp_tokens"
_TRACE_ATTR = "_rmtp_token_trace"


@dataclass(frozen=True)
class LayerSpec:
    """What one patched block does: how many patch tokens it passes on, and how it picks them."""

    index: int
    method: Method
    num_prefix: int
    keep: float = 1.0
    r: int = 0
    relative_to: RelativeTo = "current"
    min_tokens: int = 1
    fuse: bool = False
    score_rows: int = 1
    prop_attn: bool = False
    ab_sets: ABSets = "sequence"

    def patches_out(self, n: int, n0: int) -> int:
        """Patch tokens after this block for ``n`` in (``n0`` entering the first block)."""
        if self.method == "tome":
            return merged_count(n, self.r)
        return pruned_count(n, n0, self.keep, self.relative_to, self.min_tokens)


class TokenState(NamedTuple):
    """What travels with the token sequence from block to block."""

    size: Tensor | None  # (B, N, 1) patches per token; None while all are 1
    source: Tensor | None  # (B, N, N0) original tokens per token; None unless tracing
    n0: int  # patch tokens entering the first block


@dataclass
class SourceTrace:
    """Filled by :func:`trace_sources`: per forward call, the final ``source`` and ``size``."""

    sources: list[Tensor] = field(default_factory=list)
    sizes: list[Tensor | None] = field(default_factory=list)
    num_prefix: int = 0


# ---------------------------------------------------------------------------------- the forward


def _attention(attn: nn.Module, x: Tensor, bias: Tensor | None, need: str | None, spec: LayerSpec
               ) -> tuple[Tensor, Tensor | None]:
    """A fused-qkv attention's forward (timm's ``Attention``: fused or explicit, as the module is set), plus what the
    reduction ``need``s from this same pass: patch scores (cls/mean) or keys averaged over heads (tome)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    npt = spec.num_prefix
    aux = None
    if need == "mean" or not attn.fused_attn:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        if need == "mean":
            aux = received_attention(probs, npt)
        elif need == "cls":
            aux = probs[:, :, :spec.score_rows].mean(dim=(1, 2))[:, npt:]
        out = attn.attn_drop(probs) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        if need == "cls":
            aux = prefix_attention(q, k, attn.scale, spec.score_rows, bias)[:, npt:]
    if need == "tome":
        aux = k.mean(dim=1)
    out = out.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", attn.num_heads * attn.head_dim))
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), aux


class TokenBlock(nn.Module):
    """A pre-norm block whose forward reduces tokens: mixed in before the block's own class by
    :class:`TokenReduction` (:func:`token_class`).

    Called the usual way (no ``tokens``), it is exactly the block's own forward, so code outside
    the patched model forward (``forward_intermediates``, a block used on its own) runs dense.
    """

    rmtp_tokens: LayerSpec

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *,
                tokens: TokenState | None = None) -> Any:
        if tokens is None:
            if attn_mask is None and not is_causal:
                return super().forward(x)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        spec = self.rmtp_tokens
        npt = spec.num_prefix
        n = x.shape[1] - npt
        n_out = spec.patches_out(n, tokens.n0)
        need = spec.method if n_out < n else None
        size, source = tokens.size, tokens.source
        bias = size.log()[:, None, None, :, 0] if spec.prop_attn and size is not None else None
        y, aux = _attention(self.attn, self.norm1(x), bias, need, spec)
        x = x + self.drop_path1(self.ls1(y))
        if need == "tome":
            x, size, source = merge_tokens(x, aux, n - n_out, npt, size=size, source=source, sets=spec.ab_sets)
        elif need is not None:
            x, size, source = prune_tokens(x, aux, n_out, npt, fuse=spec.fuse, size=size, source=source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, TokenState(size, source, tokens.n0)


class TokenModel(nn.Module):
    """A ViT whose blocks reduce tokens: mixed in before the model's own class by
    :class:`TokenReduction` (:func:`token_class`).

    ``forward`` carries token sizes to the pool, so ``avg`` pooling is size-weighted and timm's
    attention pool (``map``) attends with proportional attention (:meth:`pool`).
    ``forward_features`` returns the reduced sequence; ``forward_head`` on its own cannot know the
    sizes and pools unweighted unless given ``size`` (use ``forward_tokens`` to get them). A head
    that reads the prefix tokens alone (``token`` pooling, DeiT's class and distillation heads) is
    the model's own.
    """

    def forward_tokens(self, x: Tensor, attn_mask: Tensor | None = None,
                       is_causal: bool = False) -> tuple[Tensor, TokenState]:
        """Embeddings, the token-reducing blocks and the final norm: ``(tokens, state)``."""
        if attn_mask is not None or is_causal:
            raise ValueError("a token-reduced ViT takes no attn_mask or is_causal: the token count "
                             "changes inside the model, so a mask cannot follow it")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        trace: SourceTrace | None = self.__dict__.get(_TRACE_ATTR)
        source = None
        if trace is not None:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        state = TokenState(None, source, x.shape[1] - self.num_prefix_tokens)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, state = torch.utils.checkpoint.checkpoint(block, x, tokens=state, use_reentrant=False)
            else:
                x, state = block(x, tokens=state)
        x = self.norm(x)
        if trace is not None:
            trace.sources.append(state.source)
            trace.sizes.append(state.size)
        return x, state

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.forward_tokens(x, attn_mask, is_causal)[0]

    def pool(self, x: Tensor, pool_type: str | None = None, size: Tensor | None = None) -> Tensor:
        """The model's own pool, with token sizes: ``avg``/``avgmax`` weigh each token by its size, and
        an attention pool (``map``) adds ``log(size)`` to its logits, ToMe's proportional attention, so a
        token standing for ``s`` patches weighs as its ``s`` copies would."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is not None and getattr(self, "attn_pool", None) is not None:
            if not self.pool_include_prefix:
                x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
            return self.attn_pool(x, attn_mask=size.log().to(x.dtype)[:, None, None, :, 0])
        if size is None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        avg = (x * size).sum(dim=1) / size.sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (x.amax(dim=1) + avg)

    def forward_head(self, x: Tensor, pre_logits: bool = False, size: Tensor | None = None) -> Tensor:
        if size is None or (self.global_pool not in ("avg", "avgmax") and getattr(self, "attn_pool", None) is None):
            return super().forward_head(x, pre_logits)
        x = self.pool(x, size=size)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x, state = self.forward_tokens(x, attn_mask, is_causal)
        return self.forward_head(x, size=state.size)


#: The name of :class:`TokenModel` before families other than timm's plain ViT could be patched.
TokenVisionTransformer = TokenModel


# ------------------------------------------------------------------------------------ the patch


def model_problem(model: nn.Module, plan: TokenPlan, arch: Architecture) -> str | None:
    """Why the token patch cannot handle ``model`` (``None`` if it can): ``arch`` says whether it runs
    its tokens through blocks the patch reproduces; the pool and the plan are the patch's to check."""
    if token_reduction(model) is not None:
        return ALREADY_REDUCED
    try:
        blocks = arch.token_blocks(model)
    except PluginError as exc:
        return str(exc)
    except (AttributeError, TypeError) as exc:  # not a model of that family at all (no blocks, ...)
        return f"it is a {type(model).__qualname__}, not a {arch.name} model the token patch knows ({exc})"
    if getattr(model, "attn_pool", None) is not None:
        if not blocks.pool_takes_mask:
            return (f"its global_pool {model.global_pool!r} is an attention pool that does not take the tokens' "
                    f"sizes (an attn_mask over them; timm's AttentionPoolLatent without a position embedding does)")
    elif model.global_pool not in SUPPORTED_POOLS:
        return (f"its global_pool {model.global_pool!r} returns the token sequence itself, whose length token "
                f"reduction changes (supported: {', '.join(SUPPORTED_POOLS)})")
    if blocks.depth != plan.depth:
        return f"the plan has {plan.depth} per-block entries but the model has {blocks.depth} blocks"
    for index, block in enumerate(model.blocks):
        extra = set(block._modules) - BLOCK_CHILDREN
        if extra:
            return f"blocks.{index} has children the patch does not know: {', '.join(sorted(extra))}"
        extra = set(block.attn._modules) - ATTENTION_CHILDREN
        if extra:
            return f"blocks.{index}.attn has children the patch does not know: {', '.join(sorted(extra))}"
    if plan.method == "cls":
        if plan.score_from == "cls" and not blocks.has_class_token:
            return "token-cls scores patches by the class token's attention, and the model has no class token " \
                   "(use score_from: prefix with register tokens, or token-mean / tome)"
        if blocks.num_prefix_tokens == 0:
            return "token-cls scores patches by attention from prefix tokens, and the model has none"
    return None


_TOKEN_CLASSES: dict[tuple[type, type], type] = {}


def token_class(mixin: type[nn.Module], original: type[nn.Module]) -> type[nn.Module]:
    """``mixin`` first, then ``original``: the class a patched model or block is swapped to, made
    once per original class (so ``type(model)`` is stable across patches and runs)."""
    key = (mixin, original)
    if key not in _TOKEN_CLASSES:
        _TOKEN_CLASSES[key] = type(f"{mixin.__name__}[{original.__name__}]", (mixin, original),
                                   {"__module__": __name__,
                                    "__qualname__": f"{mixin.__name__}[{original.__qualname__}]"})
    return _TOKEN_CLASSES[key]


def _original(cls: type, mixin: type) -> type:
    """The class :func:`token_class` mixed ``mixin`` into (``cls`` itself when it is not such a class)."""
    return cls.__bases__[1] if issubclass(cls, mixin) and cls.__bases__[0] is mixin else cls


#: Every field rmtp wrote in a token patch record before ``ab_sets`` existed: it always wrote them all
#: (``model_dump``), so a tome record with exactly these fields comes from then.
_FIELDS_BEFORE_AB_SETS = frozenset({"method", "keep", "r", "relative_to", "min_tokens", "fuse", "score_from",
                                    "prop_attn"})


def _upgrade_record(config: dict[str, Any]) -> dict[str, Any]:
    """A tome record saved before ``ab_sets`` existed keeps the matching it was saved with.

    That rmtp split the prefix tokens off before alternating A/B (``ab_sets: patches``); a folder it
    saved, perhaps fine-tuned under that matching, must give the outputs it gave then. A config
    built today either names ``ab_sets`` (every :class:`TokenPlan` dump does) or leaves some field
    out, and gets ToMe's matching.
    """
    if config.get("method") == "tome" and set(config) == _FIELDS_BEFORE_AB_SETS:
        return {**config, "ab_sets": "patches"}
    return config


@model_patch("tokens.reduction", aliases=["rmtp_plugins.tokens.patch.TokenReduction"])
class TokenReduction(ModelPatch):
    """Token reduction in a ViT's forward pass (``token-cls``, ``token-mean``, ``tome``).

    ``arch`` is the architecture that vouches for the model's token blocks (an instance, or the
    name of a registered one); it is recorded by name, and omitted for ``vit``, which every record
    written before the field existed was.
    """

    def __init__(self, arch: str | Architecture = ArchitectureRef.UNNAMED, **config: Any):
        self._arch = ArchitectureRef(arch)
        self.plan = TokenPlan(**_upgrade_record(config))

    @property
    def arch(self) -> Architecture:
        return self._arch.get()

    def rmtp_config(self) -> dict[str, Any]:
        config = self.plan.model_dump(mode="json")
        if config["ab_sets"] is None:
            del config["ab_sets"]  # token-cls / token-mean records stay as older rmtp wrote and reads them
        return self._arch.recorded_in(config)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.plan.model_dump(exclude_defaults=True).items())
        return f"TokenReduction({fields})"

    def layer_specs(self, model: nn.Module) -> list[LayerSpec]:
        plan, npt = self.plan, model.num_prefix_tokens
        rows = 1 if plan.score_from == "cls" else npt
        return [LayerSpec(index=i, method=plan.method, num_prefix=npt,
                          keep=plan.keep[i] if plan.keep is not None else 1.0,
                          r=plan.r[i] if plan.r is not None else 0,
                          relative_to=plan.relative_to, min_tokens=plan.min_tokens, fuse=plan.fuse,
                          score_rows=rows, prop_attn=plan.prop_attn, ab_sets=plan.ab_sets or "sequence")
                for i in range(plan.depth)]

    def apply(self, model: nn.Module) -> None:
        refusal = patch_refusal(model, self.plan, self.arch)
        if refusal:
            raise PluginError(refusal)
        for block, spec in zip(model.blocks, self.layer_specs(model)):
            block.__class__ = token_class(TokenBlock, type(block))
            block.__dict__[_SPEC_ATTR] = spec
        model.__class__ = token_class(TokenModel, type(model))

    def remove(self, model: nn.Module) -> None:
        for block in model.blocks:
            block.__dict__.pop(_SPEC_ATTR, None)
            block.__class__ = _original(type(block), TokenBlock)
        model.__class__ = _original(type(model), TokenModel)


def patch_refusal(model: nn.Module, plan: TokenPlan, arch: Architecture) -> str | None:
    """The line :class:`TokenReduction` refuses ``model`` with (:func:`model_problem`), or ``None``."""
    problem = model_problem(model, plan, arch)
    return f"token reduction ({plan.method}) cannot patch this model: {problem}" if problem else None


def token_reduction(model: nn.Module) -> TokenReduction | None:
    """The token patch applied to ``model``, if any."""
    return next((p for p in patches_of(model) if isinstance(p, TokenReduction)), None)


@contextmanager
def trace_sources(model: nn.Module) -> Iterator[SourceTrace]:
    """Record, for each forward call inside the block, which original tokens each final token covers.

    ``trace.sources[i]`` is ``(B, N_final, N_0)`` (prefix tokens included, first). Costs an extra
    ``(B, N, N_0)`` tensor per block, so it is for visualisation, never on by default.
    """
    if not isinstance(model, TokenModel):
        raise PluginError("trace_sources needs a token-reduced ViT (run token-cls, token-mean or tome first)")
    trace = SourceTrace(num_prefix=model.num_prefix_tokens)
    model.__dict__[_TRACE_ATTR] = trace
    try:
        yield trace
    finally:
        model.__dict__.pop(_TRACE_ATTR, None)
