"""rmtp.fidelity.layerwise: layer input statistics against brute force (Linear and Conv2d), and the
sequential driver (forward order, inputs taken from the already-compressed model, unreached layers,
the model's mode and hooks left as they were)."""

from __future__ import annotations

import torch
from torch import nn

from rmtp.fidelity.layerwise import LayerInputs, collect_input_stats, compress_sequentially, input_columns
from rmtp.gemm import gemm_view

CPU = torch.device("cpu")


class _Chain(nn.Module):
    """first → ReLU → second, plus a layer the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def _batches(shape: tuple[int, ...], count: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.zeros(shape[0])) for _ in range(count)]


def test_linear_inputs_match_brute_force() -> None:
    torch.manual_seed(0)
    model = _Chain().double()
    batches = _batches((5, 7, 6))  # 5 images of 7 tokens
    stats = collect_input_stats(model, {"second": model.second}, batches, CPU, squares=True, gram=True)["second"]
    rows = torch.cat([torch.relu(model.first(x)).reshape(-1, 8) for x, _ in batches]).detach()
    assert stats.count == 3 * 5 * 7 and stats.images == 15 and stats.positions == 7
    torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sq_norms, rows.pow(2).sum(0), rtol=1e-12, atol=1e-12)
    assert stats.gram.dtype == stats.sq_norms.dtype == torch.float64


def test_conv_columns_give_the_conv_output_and_its_gram() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, kernel_size=3, stride=2, padding=1, bias=False).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    cols = input_columns(conv, x)
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(cols @ gemm_view(conv.weight).T, out)
    inputs = LayerInputs()
    inputs.add(cols, images=2)
    torch.testing.assert_close(inputs.gram, cols.T @ cols)
    assert inputs.positions == 4 * 3  # output pixels per image


def test_low_precision_inputs_are_summed_in_float64() -> None:
    inputs = LayerInputs()
    inputs.add(torch.ones(4, 3, dtype=torch.bfloat16), images=1)
    assert inputs.gram.dtype == torch.float64 and float(inputs.gram[0, 0]) == 4.0


def test_the_gram_is_float32_under_autocast_not_the_autocast_dtype() -> None:
    """Calibration passes run under the step's precision; autocast ran the Gram's float32 matmul in
    bf16/fp16 (an fp16 Gram overflowed to inf over a ResNet layer's rows, and n:m, svd-mp whitening
    and spp obs then failed on CUDA). Checked with bf16 on the CPU, the autocast rmtp uses there."""
    torch.manual_seed(0)
    columns = torch.randn(4096, 48) * 6.0
    plain, autocast = LayerInputs(), LayerInputs()
    plain.add(columns, images=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast.add(columns, images=8)
    torch.testing.assert_close(autocast.gram, plain.gram, rtol=0, atol=0)
    exact = columns.double().T @ columns.double()
    # A float32 GEMM over 4096 rows of products ~36 is off the float64 sum by 1e-3 to 3e-2 depending
    # on the BLAS kernel's summation order (both seen on x86 CPUs); a bf16 Gram is off by ~500.
    torch.testing.assert_close(plain.gram, exact, rtol=1e-5, atol=0.1)


def test_the_calibration_loader_is_read_once_not_once_per_layer() -> None:
    """Each layer's pass reused the loader, decoding an image folder again for every layer (49
    times for ViT-B's blocks); the batches are read once and reused, with the same statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = [(torch.randn(7, 6), torch.zeros(7)) for _ in range(3)]

    class Counting:
        reads = 0

        def __iter__(self):
            Counting.reads += 1
            return iter(batches)

    seen: dict[str, torch.Tensor] = {}
    compress_sequentially(model, ["0", "2", "4"], Counting(), torch.device("cpu"),
                          compress=lambda name, module, inputs: seen.update({name: inputs.gram}))
    assert Counting.reads == 1 and list(seen) == ["0", "2", "4"]
    hidden = torch.cat([model[1](model[0](images)) for images, _ in batches])
    torch.testing.assert_close(seen["2"], (hidden.T @ hidden).double())


def test_each_layer_sees_the_inputs_of_the_already_compressed_model() -> None:
    """Compressing ``first`` (zeroing half its rows) changes what ``second`` receives: its Gram is
    the one of the compressed model, not of the dense one."""
    torch.manual_seed(0)
    model = _Chain().double()
    dense = _Chain().double()
    dense.load_state_dict(model.state_dict())
    batches = _batches((4, 6))
    seen: dict[str, LayerInputs] = {}

    def compress(name: str, module: nn.Module, inputs: LayerInputs) -> None:
        seen[name] = inputs
        if name == "first":
            module.weight[::2] = 0.0
            module.bias[::2] = 0.0

    compress_sequentially(model, ["second", "first"], batches, CPU, compress=compress)
    assert list(seen) == ["first", "second"]  # forward order, whatever order they were named in
    expected = torch.cat([torch.relu(model.first(x)) for x, _ in batches]).detach()
    torch.testing.assert_close(seen["second"].gram, expected.T @ expected, rtol=1e-12, atol=1e-12)
    assert torch.all(seen["second"].gram[::2] == 0)
    dense_rows = torch.cat([torch.relu(dense.first(x)) for x, _ in batches]).detach()
    assert not torch.allclose(seen["second"].gram, dense_rows.T @ dense_rows)
    raw = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(seen["first"].gram, raw.T @ raw, rtol=1e-12, atol=1e-12)


def test_a_replaced_layer_is_used_by_the_layers_after_it() -> None:
    """``compress`` may swap the module (``model.set_submodule``): later layers see its outputs."""
    torch.manual_seed(0)
    model = _Chain().double()
    batches = _batches((4, 6))
    seen: dict[str, LayerInputs] = {}

    def compress(name: str, module: nn.Module, inputs: LayerInputs) -> None:
        seen[name] = inputs
        if name == "first":
            replacement = nn.Linear(6, 8).double()
            nn.init.zeros_(replacement.weight)
            nn.init.constant_(replacement.bias, 2.0)
            model.set_submodule("first", replacement)

    compress_sequentially(model, ["first", "second"], batches, CPU, compress=compress)
    assert float(model.first.bias.detach()[0]) == 2.0  # the replacement is in the model
    torch.testing.assert_close(seen["second"].gram, torch.full((8, 8), 4.0 * 12, dtype=torch.float64))


def test_unreached_layers_come_last_with_empty_inputs_and_the_model_is_left_as_found() -> None:
    model = _Chain().double().train()
    batches = _batches((4, 6))
    order: list[tuple[str, int]] = []
    compress_sequentially(model, ["unused", "second"], batches, CPU,
                          compress=lambda name, module, inputs: order.append((name, inputs.count)))
    assert order == [("second", 12), ("unused", 0)]
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model(batches[0][0]).requires_grad  # no_grad did not leak out


def test_nothing_to_compress_runs_no_pass() -> None:
    class _Refuses(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no forward pass expected")

    compress_sequentially(_Refuses(), [], _batches((2, 3)), CPU, compress=lambda *args: None)
