"""rmtp bench on tiny CPU models: figures, ratios against the first model, errors, JSON schema, plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe, write_recipe
from torch import nn
from typer.testing import CliRunner

from rmtp.bench import (
    SCHEMA,
    BenchError,
    Candidate,
    EvalData,
    benchmark,
    benchmark_models,
    load_candidates,
    parse_batches,
)
from rmtp.cli import build_app
from rmtp.data import DataSpec
from rmtp.errors import DeviceError
from rmtp.measure import count_macs, count_params
from rmtp.storage.weights import write_safetensors_atomic

runner = CliRunner()
#: Fast settings for tests: no warm-up time floor, ~5 ms blocks, the minimum of 3 rounds.
FAST = {"rounds": 3, "warmup_s": 0.0, "block_s": 0.005}


def tiny_vit(**overrides) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, **overrides}).eval()


def invoke(*args: str):
    return runner.invoke(build_app(), list(args))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """The tiny ViT saved as a checkpoint with its card (timm name, kwargs, data), like models/digits_vit."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    write_safetensors_atomic(tiny_vit().state_dict(), path)
    card = {"timm_name": "vit_tiny_patch16_224", "kwargs": TINY_VIT,
            "data": {"name": "digits", "eval_limit": 64, "split_seed": 0, "val_images": 64}}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An rmtp output folder: the tiny ViT pruned 50% by magnitude (its dense baseline is recorded)."""
    from rmtp.run.pipeline import run_recipe
    from rmtp.run.recipe import load_recipe

    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    dense = root / "dense.safetensors"
    write_safetensors_atomic(tiny_vit().state_dict(), dense)
    recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}}], output=root / "pruned")
    recipe["model"]["checkpoint"] = str(dense)
    recipe["data"]["eval_limit"] = 64
    run_recipe(load_recipe(write_recipe(root / "r.yaml", recipe)))
    return root / "pruned"


# --------------------------------------------------------------------------- figures and ratios


def test_figures_present_and_positive() -> None:
    report = benchmark([Candidate("a", tiny_vit()), Candidate("b", tiny_vit(depth=1))], batches=[1, 64], **FAST)
    assert [m.label for m in report.models] == ["a", "b"] and [r.batch for r in report.batches] == [1, 64]
    for m in report.models:
        assert m.params > 0 and m.nonzeros > 0 and m.macs > m.attention_macs > 0 and m.weights_bytes > 0
        assert m.input_shape == (1, 16, 16) and m.kernel == "dense" and m.top1 is None
    for run in report.batches:
        assert run.recompiles is None  # eager
        for r in run.results:
            assert r.latency_ms.n == 3 and len(r.samples_ms) == 3
            assert 0 < r.latency_ms.min <= r.latency_ms.q1 <= r.latency_ms.median <= r.latency_ms.q3 <= r.latency_ms.max
            assert r.throughput.median == pytest.approx(run.batch / (r.latency_ms.median / 1e3))  # 3 rounds: odd
            assert r.iters >= 1 and r.warmup_calls >= 3 and r.first_call_s > 0
            assert r.peak_mem_bytes > 0 and (r.peak_rss_bytes is None or r.peak_rss_bytes >= 0)
    small, big = (run.results[0] for run in report.batches)
    # the MLP hidden activation alone is 64 images × 17 tokens × 128 floats; activations grow with the batch
    assert big.peak_mem_bytes >= 64 * 17 * 128 * 4 and big.peak_mem_bytes > 30 * small.peak_mem_bytes
    assert report.settings.threads == torch.get_num_threads() and report.settings.timer == "time.perf_counter"


def test_ratios_are_against_the_first_model() -> None:
    deep, shallow = tiny_vit(), tiny_vit(depth=1)
    expected_macs = count_macs(shallow, (1, 16, 16)) / count_macs(deep, (1, 16, 16))
    expected_params = count_params(shallow) / count_params(deep)
    report = benchmark([Candidate("deep", deep), Candidate("shallow", shallow)], batches=[2], **FAST)
    base, other = report.models
    assert base.ratios == {"params": 1.0, "nonzeros": 1.0, "macs": 1.0, "attention_macs": 1.0, "weights_bytes": 1.0}
    assert other.ratios["macs"] == pytest.approx(expected_macs, rel=1e-12)
    assert other.ratios["params"] == pytest.approx(expected_params, rel=1e-12)
    assert other.ratios["attention_macs"] == pytest.approx(0.5)  # one block of two
    first, second = report.batches[0].results
    assert first.latency_ratio.to_dict() == {"median": 1.0, "q1": 1.0, "q3": 1.0, "min": 1.0, "max": 1.0, "n": 3}
    # paired: each round's ratio is that round's latency over the baseline's in the same round
    per_round = [b / a for a, b in zip(first.samples_ms, second.samples_ms)]
    assert second.latency_ratio.median == pytest.approx(sorted(per_round)[1])
    assert second.throughput_ratio.median == pytest.approx(sorted(1 / r for r in per_round)[1])


def test_same_model_twice_gives_ratios_of_one(checkpoint: Path) -> None:
    report = benchmark_models([str(checkpoint), str(checkpoint)], batches=[8], rounds=5, warmup_s=0.05, block_s=0.02)
    a, b = report.models
    assert b.label == f"{checkpoint} #2" and a.kind == b.kind == "checkpoint"
    assert b.ratios == {"params": 1.0, "nonzeros": 1.0, "macs": 1.0, "attention_macs": 1.0, "weights_bytes": 1.0}
    assert report.batches[0].results[1].peak_mem_ratio == 1.0  # tensor peaks are exact, not sampled
    speed = report.batches[0].results[1].throughput_ratio.median
    # Identical work: only machine noise separates them. The bound is loose on purpose (CI
    # machines are shared); the README's dense-vs-dense run gives this machine's real noise floor.
    assert 0.5 < speed < 2.0


def test_a_folder_alone_is_compared_with_its_dense_baseline(pruned_folder: Path) -> None:
    candidates = load_candidates([str(pruned_folder)])
    assert [c.kind for c in candidates] == ["baseline", "folder"]
    assert candidates[0].label == f"{pruned_folder} (dense)"
    report = benchmark_models([str(pruned_folder)], batches=[1], evaluate=True, **FAST)
    dense, pruned = report.models
    assert dense.kind == "baseline" and pruned.kind == "folder"
    # half of the prunable weights (the bulk of the model) are zeros; shapes and MACs are unchanged
    assert 0.45 < pruned.ratios["nonzeros"] < 0.6
    assert pruned.ratios["params"] == 1.0 and pruned.ratios["macs"] == 1.0
    assert any("exact zeros run by dense kernels" in note for note in pruned.notes)
    assert not any("dense kernels" in note for note in dense.notes)  # a few zero biases are no pruning
    assert 0 <= dense.top1 <= 100 and 0 <= pruned.top1 <= 100 and dense.eval_images == 64
    assert pruned.top1_delta == pytest.approx(pruned.top1 - dense.top1)
    assert report.settings.eval.source == str(pruned_folder / "recipe.yaml")


def test_checkpoint_card_and_explicit_model(checkpoint: Path, tmp_path: Path) -> None:
    report = benchmark_models([str(checkpoint)], batches=[1], evaluate=True, **FAST)
    assert report.models[0].timm_name == "vit_tiny_patch16_224" and report.models[0].eval_images == 64
    assert "one model: nothing to compare it with (ratios are 1)" in report.notes
    bare = tmp_path / "bare.safetensors"
    shutil.copy(checkpoint, bare)
    with pytest.raises(BenchError, match=r"which timm model is it\? pass --model NAME"):
        load_candidates([str(bare)])
    [c] = load_candidates([str(bare)], model_name="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    assert c.kind == "checkpoint" and c.eval_data is None
    [t] = load_candidates(["timm:vit_tiny_patch16_224"], model_kwargs=TINY_VIT)
    assert t.kind == "timm" and t.arch == "vit"


def test_kernel_hook_names_the_kernels() -> None:
    class TwoFour(nn.Linear):
        seen: list = []

        def rmtp_kernel(self, device: torch.device, dtype: torch.dtype) -> str | None:
            self.seen.append((device, dtype))
            return "2:4 semi-structured" if device.type == "cuda" else None

    class Labelled(nn.Linear):
        rmtp_kernel = "custom gemm"

    net = nn.Sequential(nn.Flatten(), TwoFour(16, 8), Labelled(8, 4))
    with torch.no_grad():
        net[1].weight[:, ::2] = 0  # half zeros: no "run by dense kernels" note once a kernel is named
    report = benchmark([Candidate("net", net, input_shape=(16,))], batches=[1], **FAST)
    assert report.models[0].kernel == "custom gemm"
    assert TwoFour.seen == [(torch.device("cpu"), torch.float32)]
    assert not any("dense kernels" in n for n in report.models[0].notes)


def test_plugin_kernel_providers_label_modules_without_a_hook() -> None:
    import rmtp.plugins
    from rmtp import hookimpl
    from rmtp_plugins.nm import semi_structured_kernel

    offered: list[type] = []

    def provider(module: nn.Module, *, device: torch.device, dtype: torch.dtype) -> str | None:
        offered.append(type(module))
        return "fake sparse gemm" if isinstance(module, nn.Linear) and bool((module.weight == 0).any()) else None

    class FakeKernels:
        @hookimpl
        def register_kernels(self, register) -> None:
            register(provider)

    plugins = rmtp.plugins.load_plugins()
    assert semi_structured_kernel in plugins.kernels  # the n:m plugin registers its 2:4 provider
    plugins.manager.register(FakeKernels())
    plugins.kernels.clear()
    plugins.manager.hook.register_kernels(register=plugins.kernels.append)

    class Labelled(nn.Linear):
        rmtp_kernel = "custom gemm"

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), Labelled(8, 4))
    with torch.no_grad():
        net[1].weight[:, ::2] = 0
    with rmtp.plugins.use_plugins(plugins):
        report = benchmark([Candidate("net", net, input_shape=(16,))], batches=[1], **FAST)
    assert report.models[0].kernel == "fake sparse gemm, custom gemm"
    assert Labelled not in offered and nn.Linear in offered  # a module's own hook wins


def test_bf16_channels_last_and_threads_on_cpu() -> None:
    before = torch.get_num_threads()
    report = benchmark([Candidate("a", tiny_vit())], batches=[2], dtype="bf16", channels_last=True, threads=1, **FAST)
    assert torch.get_num_threads() == before  # restored
    assert report.settings.threads == 1 and report.settings.dtype == "bf16" and report.settings.channels_last
    assert report.models[0].weights_bytes * 2 == sum(p.numel() * 4 for p in tiny_vit().parameters())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compile_reports_compile_time_and_no_recompiles() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    report = benchmark([Candidate("mlp", mlp, input_shape=(8,))], batches=[1, 4], compile=True, **FAST)
    assert report.settings.compile
    for run in report.batches:
        assert run.recompiles == 0  # one static graph per batch size, built by the first call
        result = run.results[0]
        assert result.first_call_s > result.latency_ms.median / 1e3


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, problem", [
    ("0", "batch sizes must be at least 1, got 0"),
    ("a,b", "'a' is not an integer"),
    ("", "empty"),
    ("1,,32", "'' is not an integer"),
    ("-4", "at least 1, got -4"),
])
def test_bad_batch_list_is_one_clear_line(text: str, problem: str) -> None:
    with pytest.raises(BenchError, match=r"^--batch") as excinfo:
        parse_batches(text)
    assert problem in str(excinfo.value) and "e.g. --batch 1,32,256" in str(excinfo.value)
    result = invoke("bench", "timm:vit_tiny_patch16_224", "--batch", text)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --batch {text!r}: ") and problem in lines[0]


def test_parse_batches_sorts_and_dedupes() -> None:
    assert parse_batches(" 32, 1,32 ,256") == [1, 32, 256]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_exit_1(checkpoint: Path) -> None:
    result = invoke("bench", str(checkpoint), "--device", "cuda")
    assert result.exit_code == 1
    assert result.output.strip() == ("error: device 'cuda' requested but CUDA is not available on this machine; "
                                     "run with --device cpu")
    with pytest.raises(DeviceError):
        benchmark([Candidate("a", tiny_vit())], device="cuda:0", **FAST)


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "error: device 'tpu': allowed: cpu, cuda, cuda:N"),
    (["--dtype", "fp8"], "error: dtype 'fp8': allowed: fp32, fp16, bf16"),
    (["--dtype", "fp16"], "error: dtype fp16 is refused on cpu"),
    (["--rounds", "2"], "error: rounds must be at least 3"),
    (["--threads", "0"], "error: threads must be at least 1, got 0"),
    (["--kwargs", "[1]"], "error: --kwargs: expected a JSON object or key=value, got [1]"),
])
def test_bad_options_are_one_line_exit_1(checkpoint: Path, args: list[str], message: str) -> None:
    result = invoke("bench", str(checkpoint), *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output


def test_bad_models_are_one_line_exit_1(tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path / "missing")], "no such file or folder"),
        ([str(tmp_path)], "not an rmtp output folder"),
        (["timm:no_such_net"], "timm has no model 'no_such_net'"),
        (["timm:vit_tiny_patch16_224", "--kwargs", '{"img_size": 16}', "--eval"],
         "none of the models names its val data"),
    ]
    for args, message in cases:
        result = invoke("bench", *args, "--batch", "1")
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and message in result.output and len(result.output.splitlines()) == 1


# --------------------------------------------------------------------------- JSON, tables, plots

TOP_KEYS = {"schema", "created", "seconds", "environment", "settings", "baseline", "models", "batches", "notes"}
SETTINGS_KEYS = {"device", "device_name", "dtype", "compile", "channels_last", "batches", "rounds", "order",
                 "warmup_s", "block_s", "threads", "interop_threads", "timer", "memory_method", "rss_method", "eval",
                 "cudnn_benchmark", "matmul_tf32"}
MODEL_KEYS = {"index", "label", "source", "kind", "timm_name", "arch", "input_shape", "params", "nonzeros", "macs",
              "attention_macs", "weights_bytes", "kernel", "top1", "eval_images", "top1_delta", "ratios", "notes"}
RATIO_KEYS = {"params", "nonzeros", "macs", "attention_macs", "weights_bytes"}
BATCH_KEYS = {"batch", "recompiles", "results"}
RESULT_KEYS = {"model", "label", "latency_ms", "throughput", "latency_ratio", "throughput_ratio", "peak_mem_bytes",
               "peak_mem_ratio", "peak_rss_bytes", "first_call_s", "iters", "warmup_calls", "samples_ms"}
SPREAD_KEYS = {"median", "q1", "q3", "min", "max", "n"}
EVAL_KEYS = {"source", "seed", "data"}


def test_cli_json_schema_is_stable_and_plots_are_written(pruned_folder: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    result = invoke("bench", str(pruned_folder), "--batch", "1,4", "--rounds", "3", "--threads", "1", "--eval",
                    "--json", str(out), "--plot", str(plots))
    assert result.exit_code == 0, result.output
    for text in ("bench · cpu", "ratios (×) against #0", f"{pruned_folder} (dense)", "batch 1", "batch 4",
                 "speed-up", "baseline", "top-1", "exact zeros run by dense kernels", "peak mem"):
        assert text in result.output, text
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA == "rmtp-bench/1"
    assert set(data) == TOP_KEYS and data["baseline"] == 0
    assert set(data["settings"]) == SETTINGS_KEYS and set(data["settings"]["eval"]) == EVAL_KEYS
    assert data["settings"]["batches"] == [1, 4] and data["settings"]["threads"] == 1
    for model in data["models"]:
        assert set(model) == MODEL_KEYS and set(model["ratios"]) == RATIO_KEYS
    assert [m["kind"] for m in data["models"]] == ["baseline", "folder"]
    for run in data["batches"]:
        assert set(run) == BATCH_KEYS
        for r in run["results"]:
            assert set(r) == RESULT_KEYS
            for key in ("latency_ms", "throughput", "latency_ratio", "throughput_ratio"):
                assert set(r[key]) == SPREAD_KEYS
    for name in ("throughput.png", "accuracy_vs_macs.png", "accuracy_vs_latency.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_eval_skips_the_accuracy_plot(checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("bench", str(checkpoint), "--batch", "1", "--rounds", "3", "--plot", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "throughput.png").is_file() and not (tmp_path / "p" / "accuracy_vs_macs.png").exists()
    assert not (tmp_path / "p" / "accuracy_vs_latency.png").exists()
    assert "accuracy_vs_macs.png and accuracy_vs_latency.png not written: accuracy needs --eval" in result.output


def test_pareto_front_keeps_the_models_no_other_beats_on_both() -> None:
    from rmtp.bench import pareto_front

    # (latency, top-1): 0 dense; 1 faster and as accurate; 2 faster, worse; 3 slower and worse than 1;
    # 4 the fastest; 5 a tie with 2
    points = [(10.0, 98.0), (8.0, 98.0), (5.0, 96.0), (9.0, 97.0), (4.0, 90.0), (5.0, 96.0)]
    assert pareto_front(points) == [4, 2, 5, 1]
    assert pareto_front([]) == [] and pareto_front([(1.0, 50.0)]) == [0]


def test_bench_is_a_command_with_help() -> None:
    result = invoke("bench", "--help")
    assert result.exit_code == 0
    for option in ("--device", "--batch", "--dtype", "--compile", "--channels-last", "--json", "--plot", "--eval",
                   "--rounds", "--threads", "--model", "--kwargs"):
        assert option in result.output


def test_a_conv_folder_is_timed_on_the_images_its_recipe_used(tmp_path: Path) -> None:
    """A ResNet accepts any size and its timm config says 224 px: a folder whose recipe fed it 16 px
    digits is benchmarked (latency, MACs) on 16 px images, as it was evaluated, not on 224 px ones."""
    from rmtp.run.pipeline import run_recipe
    from rmtp.run.recipe import load_recipe

    recipe = {"model": {"name": "resnet18", "kwargs": {"channels": [8, 8, 8, 8], "in_chans": 1, "num_classes": 10}},
              "data": {"name": "digits", "img_size": 16, "eval_limit": 32},
              "steps": [{"prune": "magnitude", "params": {"sparsity": 0.3}}],
              "output": {"dir": str(tmp_path / "out")}}
    run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    report = benchmark(load_candidates([str(tmp_path / "out")]), batches=[1], **FAST)
    assert [m.input_shape for m in report.models] == [(1, 16, 16), (1, 16, 16)]  # dense baseline and pruned


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("order", [("digits_vit", "digits_resnet"), ("digits_resnet", "digits_vit")])
def test_eval_gives_each_model_its_own_preprocessing(tmp_path: Path, order: tuple[str, str]) -> None:
    """The ViT's card says img_size null (its own 32 px), the ResNet's 32: whichever comes first, the
    other is not scored on the first one's preprocessing (the ResNet at timm's 224 px scored ~11%)."""
    sources = []
    for stem in order:  # the committed models, their cards limited to 96 val images to keep this cheap
        shutil.copy(REPO / "models" / f"{stem}.safetensors", tmp_path / f"{stem}.safetensors")
        card = json.loads((REPO / "models" / f"{stem}.json").read_text())
        card["data"]["eval_limit"] = 96
        (tmp_path / f"{stem}.json").write_text(json.dumps(card))
        sources.append(str(tmp_path / f"{stem}.safetensors"))
    report = benchmark_models(sources, batches=[1], evaluate=True, threads=1, **FAST)
    assert [m.eval_images for m in report.models] == [96, 96]
    assert all(m.top1 > 90 for m in report.models), [(m.label, m.top1) for m in report.models]
    assert any("preprocessed as" in note for note in report.models[1].notes)


def test_eval_refuses_models_whose_val_data_differ() -> None:
    first = EvalData(DataSpec(name="digits", split_seed=0), seed=0, source="a.json")
    other = EvalData(DataSpec(name="digits", split_seed=1), seed=1, source="b.json")
    with pytest.raises(BenchError, match=r"--eval: b names other val data \(b\.json\) than a\.json: split_seed 1 vs 0"):
        benchmark([Candidate("a", tiny_vit(), eval_data=first), Candidate("b", tiny_vit(), eval_data=other)],
                  batches=[1], eval_data=first, **FAST)


class _Greedy(torch.nn.Module):
    """Above batch 1 its forward asks the real CPU allocator for 16 TiB per image: an out-of-memory
    error at once (batch 1, where bench counts MACs, fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            torch.empty(x.shape[0] * 2**44, dtype=torch.uint8)
        return self.fc(x)


def test_a_batch_that_does_not_fit_is_one_clear_error() -> None:
    with pytest.raises(BenchError, match=r"--batch 8 with model 'greedy' does not fit in CPU memory \(tried to "
                                         r"allocate \d+ bytes\); try a smaller --batch"):
        benchmark([Candidate("small", torch.nn.Linear(4, 4), input_shape=(4,)),
                   Candidate("greedy", _Greedy(), input_shape=(4,))], batches=[8], **FAST)

