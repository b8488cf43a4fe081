"""rmtp.measure: parameter counts, MACs (closed forms), top-1, timing and memory, on tiny CPU models."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rmtp.errors import DataError, DeviceError
from rmtp.measure import (
    ATTENTION,
    count_macs,
    count_nonzeros,
    count_params,
    mac_breakdown,
    model_summary,
    paired_speedup,
    top1,
)

IMG = 32
PATCH = 8
DEPTH = 2
DIM = 32
HEADS = 2
CLASSES = 10


def tiny_vit(fused: bool = True) -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=DEPTH,
                              embed_dim=DIM, num_heads=HEADS, num_classes=CLASSES)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


def vit_tokens(model: nn.Module) -> int:
    """Tokens per image, CLS included: (32/8)² patches + 1."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert tokens == (IMG // PATCH) ** 2 + 1
    return tokens


def vit_attention_macs(tokens: int) -> int:
    head_dim = DIM // HEADS
    return DEPTH * 2 * HEADS * tokens**2 * head_dim  # QKᵀ and AV per head per block


# --------------------------------------------------------------------------- params


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # tied: one tensor, two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_count_params_is_the_hand_count() -> None:
    model = tiny_vit()
    assert count_params(model) == sum(p.numel() for _, p in model.named_parameters())
    linear = nn.Linear(7, 5)
    assert count_params(linear) == 7 * 5 + 5


def test_tied_weights_count_once() -> None:
    model = Tied()
    assert count_params(model) == 36 + 6 + 6
    assert count_nonzeros(model) <= 48
    # Distinct Parameter objects over the same memory are tied too.
    model.b.weight = nn.Parameter(model.a.weight.data)
    assert model.b.weight is not model.a.weight
    assert count_params(model) == 36 + 6 + 6


def test_count_nonzeros_drops_by_the_zeroed_count() -> None:
    model = tiny_vit()
    weight = model.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        weight.fill_(1.0)
        before = count_nonzeros(model)
        weight[: weight.shape[0] // 2].zero_()
    assert count_nonzeros(model) == before - weight.numel() // 2
    assert count_params(model) == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- MACs


@pytest.mark.parametrize("bias, op", [(True, "aten.addmm"), (False, "aten.mm")])
def test_linear_macs_are_in_times_out_bias_ignored(bias: bool, op: str) -> None:
    n, m = 12, 7
    # FlopCounterMode counts addmm as its matrix product only: the bias adds nothing.
    assert mac_breakdown(nn.Linear(n, m, bias=bias), (n,)) == {op: m * n}


def test_conv_macs_match_the_closed_form() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)  # bias ignored as for linear
    h_out, w_out = (15 + 2 - 3) // 2 + 1, (17 + 2 - 3) // 2 + 1
    assert count_macs(conv, (3, 15, 17)) == 8 * 3 * 3 * 3 * h_out * w_out
    depthwise = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)  # ConvNeXt-style
    assert count_macs(depthwise, (8, 10, 10)) == 8 * 1 * 3 * 3 * 10 * 10


def test_norm_activation_softmax_count_zero() -> None:
    model = nn.Sequential(nn.LayerNorm(16), nn.GELU(), nn.Softmax(dim=-1))
    assert mac_breakdown(model, (5, 16)) == {}
    assert count_macs(model, (5, 16)) == 0


def test_vit_attention_macs_closed_form() -> None:
    model = tiny_vit(fused=True)
    tokens = vit_tokens(model)
    breakdown = mac_breakdown(model, (3, IMG, IMG))
    assert breakdown[ATTENTION] > 0  # the CPU flash kernel used to count zero
    assert breakdown[ATTENTION] == vit_attention_macs(tokens)


def test_vit_total_macs_closed_form() -> None:
    model = tiny_vit(fused=True)
    tokens = vit_tokens(model)
    linear = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rows = 1 if name == "head" else tokens  # the head sees the pooled CLS token only
            linear += rows * module.in_features * module.out_features
    patches = (IMG // PATCH) ** 2
    conv = DIM * 3 * PATCH * PATCH * patches
    attention = vit_attention_macs(tokens)
    assert mac_breakdown(model, (3, IMG, IMG)) == {
        "aten.addmm": linear, "aten.convolution": conv, ATTENTION: attention}
    assert count_macs(model, (3, IMG, IMG)) == linear + conv + attention


def test_macs_do_not_depend_on_fused_attention() -> None:
    fused, explicit = tiny_vit(fused=True), tiny_vit(fused=False)
    assert all(blk.attn.fused_attn for blk in fused.blocks)
    assert mac_breakdown(fused, (3, IMG, IMG)) == mac_breakdown(explicit, (3, IMG, IMG))
    assert count_macs(fused, (3, IMG, IMG)) == count_macs(explicit, (3, IMG, IMG))


def test_multihead_attention_fast_path_is_counted() -> None:
    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    tokens = 17
    expected = tokens * DIM * 3 * DIM + tokens * DIM * DIM + 2 * HEADS * tokens**2 * (DIM // HEADS)
    assert count_macs(SelfAttention(), (tokens, DIM)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on


def test_counting_keeps_the_model_mode() -> None:
    model = tiny_vit()
    model.train()
    model.blocks[0].eval()
    count_macs(model, (3, IMG, IMG))
    assert model.training and model.blocks[1].training and not model.blocks[0].training


def test_model_summary() -> None:
    model = tiny_vit()
    summary = model_summary(model, (3, IMG, IMG))
    assert summary == {
        "params": count_params(model),
        "nonzeros": count_nonzeros(model),
        "macs": count_macs(model, (3, IMG, IMG)),
        "attention_macs": vit_attention_macs(vit_tokens(model)),
    }


# --------------------------------------------------------------------------- top-1


class Lookup(nn.Module):
    """Reads the label stored in the image: always right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), CLASSES).float()


class Constant(nn.Module):
    """Always predicts ``cls`` (has a parameter, like a real model)."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], CLASSES)
        logits[:, self.cls] = self.scale
        return logits


def labelled_loader(labels: list[int], batch_size: int = 4) -> DataLoader:
    y = torch.tensor(labels)
    return DataLoader(TensorDataset(y.float().unsqueeze(1), y), batch_size=batch_size)


LABELS = [3, 1, 3, 0, 2, 3, 5, 3, 9, 1]  # ten images, class 3 four times


def test_top1_perfect_and_constant_models() -> None:
    loader = labelled_loader(LABELS)
    assert top1(Lookup(), loader, device="cpu") == 100.0
    assert top1(Constant(3), loader, device="cpu") == pytest.approx(100.0 * 4 / 10)
    assert top1(Constant(7), loader, device="cpu") == 0.0


def test_top1_progress_once_per_batch() -> None:
    calls: list[tuple[int, int | None]] = []
    top1(Lookup(), labelled_loader(LABELS, batch_size=4), device="cpu",
         progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_top1_limit_counts_images() -> None:
    calls: list[tuple[int, int | None]] = []
    # First five labels hold class 3 twice.
    accuracy = top1(Constant(3), labelled_loader(LABELS, batch_size=4), device="cpu", limit=5,
                    progress=lambda done, total: calls.append((done, total)))
    assert accuracy == pytest.approx(100.0 * 2 / 5)
    assert calls == [(1, 2), (2, 2)]


def test_top1_empty_loader_is_an_error() -> None:
    with pytest.raises(DataError):
        top1(Lookup(), labelled_loader([]), device="cpu")


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("call", [
    lambda m: paired_speedup(m, m, (16,), batch=1, device="cuda"),
    lambda m: count_macs(m, (16,), device="cuda"),
    lambda m: top1(m, labelled_loader(LABELS), device="cuda"),
])
def test_cuda_without_gpu_is_a_device_error(call) -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        call(nn.Linear(16, 4))


def test_bad_device_string_is_a_device_error() -> None:
    with pytest.raises(DeviceError):
        count_macs(nn.Linear(4, 4), (4,), device="nonsense")


# --------------------------------------------------------------------------- benchmarking primitives

import time  # noqa: E402

from rmtp.measure import (  # noqa: E402
    Spread,
    interleaved_timing,
    model_bytes,
    peak_memory_delta,
    peak_rss_delta,
    peak_rss_supported,
    time_calls,
)


def test_spread_is_the_closed_form() -> None:
    s = Spread.of([5, 1, 4, 2, 3])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3, 2, 4, 1, 5, 5)
    assert s.iqr == 2
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError):
        Spread.of([])


def test_model_bytes_counts_params_and_buffers_at_their_dtype() -> None:
    assert model_bytes(nn.Linear(7, 5)) == (35 + 5) * 4
    assert model_bytes(nn.Linear(7, 5).to(torch.bfloat16)) == (35 + 5) * 2
    bn = nn.BatchNorm1d(3)  # weight, bias + running_mean, running_var (fp32) + num_batches_tracked (int64)
    assert model_bytes(bn) == 4 * 3 * 4 + 8
    assert model_bytes(Tied()) == (36 + 6 + 6) * 4


def test_time_calls_measures_a_known_sleep() -> None:
    per_call = time_calls(lambda: time.sleep(0.004), 3, torch.device("cpu"))
    assert 0.004 <= per_call < 0.05  # sleep never returns early; a busy machine can only add
    with pytest.raises(ValueError):
        time_calls(lambda: None, 0, torch.device("cpu"))


def test_interleaved_rounds_rotate_the_order() -> None:
    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "ABC"]
    rounds = []
    timings = interleaved_timing(fns, rounds=4, warmup_s=0, block_s=1e-9, min_warmup_calls=1,
                                 on_round=rounds.append)
    assert rounds == [1, 2, 3, 4]
    assert all(t.iters == 1 and len(t.seconds) == 4 and t.warmup_calls == 1 for t in timings)
    assert "".join(calls) == "ABC" + "ABC" + "BCA" + "CAB" + "ABC"  # warm-up, then rotated rounds


def test_interleaved_timing_recovers_a_planted_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock that only the callables advance: 2 ms and 6 ms per call, exactly, so the
    # calibration, the per-call division and the pairing are checked without machine noise.
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def cost(seconds: float):
        def call() -> None:
            clock[0] += seconds
        return call

    timings = interleaved_timing([cost(0.002), cost(0.006)], rounds=5, warmup_s=0.05, block_s=0.012)
    assert [t.iters for t in timings] == [6, 2]  # ceil(block / per call)
    assert [t.warmup_calls for t in timings] == [25, 9]  # until 50 ms of warm-up have passed
    assert timings[0].seconds == pytest.approx([0.002] * 5) and timings[1].seconds == pytest.approx([0.006] * 5)
    ratios = [b / a for a, b in zip(timings[0].seconds, timings[1].seconds)]
    assert Spread.of(ratios).median == pytest.approx(3.0)


def test_peak_tensor_memory_is_the_planted_allocation() -> None:
    def allocate() -> None:
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**19)  # 2 MiB, while a is alive: peak 6 MiB
        del a, b
        torch.ones(2**21)  # 8 MiB once both are gone: the peak

    assert peak_memory_delta(allocate, "cpu") == 8 * 2**20
    x = torch.ones(2**20)
    # Tensors alive before the call do not count; the output of the call does.
    assert peak_memory_delta(lambda: x + x, "cpu") == 4 * 2**20


def test_peak_tensor_memory_of_a_linear_layer_is_its_output() -> None:
    layer, x = nn.Linear(64, 256), torch.randn(32, 64)
    with torch.inference_mode():
        assert peak_memory_delta(lambda: layer(x), "cpu") == 32 * 256 * 4


needs_rss = pytest.mark.skipif(not peak_rss_supported(), reason="peak RSS needs Linux clear_refs and glibc")


@needs_rss
def test_peak_rss_delta_sees_a_planted_allocation() -> None:
    size = 32 * 2**20

    def allocate() -> None:
        torch.ones(size // 4)  # 32 MiB, every page written

    deltas = [peak_rss_delta(allocate) for _ in range(3)]
    # Page tables and allocator headers may add a little; nothing may be missing.
    assert all(size * 0.98 <= d <= size + 4 * 2**20 for d in deltas), deltas


@needs_rss
def test_peak_rss_delta_is_not_fooled_by_reused_heap_pages() -> None:
    # 256 tensors of 16 KiB live at once: small allocations come from the malloc heap, whose freed
    # pages glibc keeps mapped. Without malloc_trim the second measurement would read about zero.
    def allocate() -> None:
        keep = [torch.ones(4096) for _ in range(256)]
        del keep

    deltas = [peak_rss_delta(allocate) for _ in range(3)]
    assert all(d >= 3 * 2**20 for d in deltas), deltas  # 4 MiB planted


def test_macs_of_an_attention_pooling_head_whose_query_is_a_parameter() -> None:
    """timm's attention pooling (``global_pool="map"``: SigLIP ViTs, the Perception Encoder) feeds its
    learned latent query, a parameter, to a Linear; FlopCounterMode's module tracker used to fail on
    it under inference mode. Counted in closed form, and every parameter's requires_grad restored."""
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=DIM,
                               num_heads=HEADS, num_classes=CLASSES, global_pool="map")
    patches = vit_tokens(pooled) - 1  # the pool reads the patch tokens, not the class token
    # q (the one latent), k and v (every patch), QKᵀ and AV for one query, proj, then the pool's 4× MLP
    pool = DIM * DIM + patches * DIM * 2 * DIM + 2 * patches * DIM + DIM * DIM + 2 * 4 * DIM * DIM
    head_and_blocks = count_macs(tiny_vit(), (3, IMG, IMG))  # the class token's pool adds no MACs
    assert count_macs(pooled, (3, IMG, IMG)) == head_and_blocks + pool
    assert all(p.requires_grad for p in pooled.parameters())
