"""Benchmark: specs, FLOPs against an analytic count, timing protocol, ratios, reports and bad inputs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from skindistil.bench.models import BenchSettings, run_benchmark
from skindistil.bench.report import choose_pairs, paper_ratios
from skindistil.bench.specs import load_bench_model, parse_arch_spec, parse_model_ref
from skindistil.bench.summary import count_flops, find_bma
from skindistil.cli import main
from skindistil.config import PreprocessConfig
from skindistil.errors import BackendUnavailable, ConfigError, ModelError
from skindistil.evaluation.early_exit import measure_throughput
from skindistil.inference.backends import (
    LinearPatchEmbed,
    TorchRunner,
    build_backend,
    linear_patch_embed,
    warmup_batch_sizes,
)
from skindistil.measure import PeakMemory, measure_rate, summarize_times, time_calls, time_interleaved
from skindistil.models import create_teacher, save_artifact

TINY = "embed_dim=32,num_heads=2,img_size=32,patch_size=8"
DEEP = f"vit_base_patch16_224@4:{TINY}"
SHALLOW = f"vit_base_patch16_224@2:{TINY}"
FAST = ["--warmup", "1", "--repeats", "5", "--min-repeats", "2", "--seconds", "0.2"]


def vit_flops(depth: int, width: int = 32, image: int = 32, patch: int = 8, mlp_ratio: int = 4, classes: int = 8) -> int:
    """Analytic FLOPs (multiply-add = 2) of a timm ViT's matmuls and patch convolution, one image."""
    patches = (image // patch) ** 2
    tokens = patches + 1  # class token
    stem = 2 * patches * width * 3 * patch * patch
    block = (
        2 * tokens * width * 3 * width  # qkv projection
        + 2 * 2 * tokens * tokens * width  # q @ k^T and attention @ v, all heads together
        + 2 * tokens * width * width  # output projection
        + 2 * 2 * tokens * width * mlp_ratio * width  # MLP fc1 and fc2
    )
    return stem + depth * block + 2 * width * classes


def test_parse_arch_spec_types_and_depth():
    spec = parse_arch_spec("vit_base_patch16_224@2:embed_dim=32,mlp_ratio=2.5,qkv_bias=false,global_pool=avg")
    assert spec.name == "vit_base_patch16_224" and spec.depth == 2
    assert spec.kwargs == {"embed_dim": 32, "mlp_ratio": 2.5, "qkv_bias": False, "global_pool": "avg"}
    assert spec.timm_kwargs()["num_classes"] == 8 and spec.timm_kwargs()["depth"] == 2
    assert parse_arch_spec("vit_base_patch16_224").depth is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("vit_base_patch16_224@six", "ARCH[@DEPTH]"),
        ("vit_base_patch16_224@0", "depth must be at least 1"),
        ("vit_base_patch16_224@2:embed_dim", "is not KEY=VALUE"),
        ("vit_base_patch16_224:depth=3", "@DEPTH"),
        ("vit_base_patch16_224.augreg_in21k", "ARCH[@DEPTH]"),
    ],
)
def test_malformed_specs_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_arch_spec(text)


def test_unknown_architecture_and_missing_dir_name_the_input(tmp_path):
    with pytest.raises(ConfigError, match="'no_such_vit@2'.*not a timm architecture"):
        parse_model_ref("no_such_vit@2")
    with pytest.raises(ModelError, match="no such model directory"):
        parse_model_ref(str(tmp_path / "missing" / "model"))
    with pytest.raises(ConfigError, match="timm cannot build"):
        load_bench_model(parse_model_ref("vit_base_patch16_224@2:embed_dim=30,num_heads=4,img_size=32,patch_size=8"))


@pytest.mark.parametrize("depth", [4, 2])
def test_flops_match_the_analytic_count(depth):
    model = load_bench_model(parse_model_ref(f"vit_base_patch16_224@{depth}:{TINY}")).model
    fused = count_flops(model, (32, 32))
    assert fused == pytest.approx(vit_flops(depth), rel=0.01)
    # the explicit-matmul attention path must count the same as the fused kernel
    for block in model.blocks:
        block.attn.fused_attn = False
    assert count_flops(model, (32, 32)) == fused


def test_time_calls_respects_warmup_repeats_and_time_budget():
    calls = []
    times = time_calls(lambda x: calls.append(x), 0, warmup=3, repeats=7, min_repeats=2, max_seconds=60)
    assert len(calls) == 10 and len(times) == 7

    times = time_calls(lambda x: time.sleep(0.03), 0, warmup=0, repeats=1000, min_repeats=3, max_seconds=0.05)
    assert 3 <= len(times) <= 4
    assert min(times) >= 0.03


def test_time_interleaved_alternates_and_shares_the_budget():
    order = []
    times = time_interleaved([order.append, order.append], ["a", "b"], repeats=3, min_repeats=1, max_seconds=60)
    assert order == ["a", "b"] * 3 and [len(t) for t in times] == [3, 3]

    # budget 2 x 0.03 s: round one ends at ~0.04 s, round two at ~0.08 s, past the budget
    nap = lambda x: time.sleep(0.02)  # noqa: E731
    times = time_interleaved([nap, nap], [0, 0], repeats=100, min_repeats=2, max_seconds=0.03)
    assert [len(t) for t in times] == [2, 2]


def test_measure_rate_counts_items_over_the_span_and_syncs_inside_it():
    events = []

    def step() -> int:
        time.sleep(0.01)
        events.append("step")
        return 2

    rate = measure_rate(step, 0.2, sync=lambda: events.append("sync"))
    assert events[0] == "sync" and events[-1] == "sync" and events.count("sync") == 2
    assert rate.cpu is None  # device work is not this process's CPU time
    assert 100 < rate.wall <= 200  # 2 items per >= 10 ms
    assert measure_rate(lambda: 1, 0.05).cpu > 0


class _SleepyExits(nn.Module):
    """Early exit takes 2 ms per batch, the full forward 6 ms: a speed-up of 3."""

    def early_exit(self, x, threshold):
        time.sleep(0.002)
        return torch.zeros(len(x), 2), torch.ones(len(x), dtype=torch.long)

    def forward(self, x):
        time.sleep(0.006)
        return torch.zeros(len(x), 2)


def test_early_exit_throughput_is_timed_by_the_shared_timer():
    batches = [torch.zeros(4, 3, 8, 8) for _ in range(3)]
    timed = measure_throughput(_SleepyExits(), batches, 0.5, repeats=4)
    assert timed["repeats"] == 4 and timed["timed_images"] == 12
    assert timed["speedup"] == pytest.approx(3.0, rel=0.35)
    assert timed["early_exit_images_per_s"] == pytest.approx(12 / 0.006, rel=0.35)
    assert timed["full_depth_images_per_s"] == pytest.approx(12 / 0.018, rel=0.35)


def test_summarize_times_definitions():
    stats = summarize_times([0.4, 0.1, 0.3, 0.2], batch_size=2)
    assert stats["median_s"] == pytest.approx(0.25)
    assert stats["p90_s"] == pytest.approx(0.37)
    assert stats["ms_per_image"] == pytest.approx(125.0)
    assert stats["images_per_s"] == pytest.approx(8.0)
    assert stats["repeats"] == 4


def test_peak_memory_sees_a_large_cpu_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = np.ones(50 * 2**20 // 8)  # 50 MiB, written so the pages are resident
    del block
    if memory.kind == "unavailable":
        pytest.skip("no /proc/self/clear_refs on this system")
    assert memory.peak_bytes >= 40 * 2**20


_PINS = []


def _eight_blocks_of_8_mib():
    blocks = [torch.ones(2 * 2**20) for _ in range(8)]
    _PINS.append(torch.ones(1024))  # kept above the blocks, so their freed memory is not the heap's top
    return sum(float(b[0]) for b in blocks)


def test_peak_memory_counts_memory_the_allocator_reuses():
    """A warmed-up call (the C allocator reuses the memory it kept from the last one) still reads as
    the 64 MiB it allocates; without handing freed memory back first this read 8-16 MiB, and a
    warmed-up ViT-B/16@6 call 0 MB."""
    torch.ones(5 * 2**20)  # a freed 20 MiB mapping raises glibc's mmap threshold above 8 MiB
    for _ in range(3):
        _eight_blocks_of_8_mib()
    readings = []
    for _ in range(3):
        with PeakMemory("cpu") as memory:
            _eight_blocks_of_8_mib()
        if memory.kind == "unavailable":
            pytest.skip("no /proc/self/clear_refs on this system")
        readings.append(memory.peak_bytes)
    assert "malloc_trim" in memory.kind
    assert all(60 * 2**20 <= r <= 80 * 2**20 for r in readings), [r / 2**20 for r in readings]


def test_benchmark_memory_holds_the_weights_input_and_call(tmp_path):
    """A model whose weights are N MB reports a peak of at least N MB: the weights the backend holds
    (exactly its tensor bytes; the ONNX file for onnxruntime), plus the input batch, plus one call."""
    spec = "vit_base_patch16_224@1:img_size=32"  # 7.7 M parameters: 30.8 MB of float32 weights
    settings = BenchSettings(batch_sizes=(1, 8), backends=("eager", "onnx"), warmup=1, repeats=2, min_repeats=1, seconds=0.1)
    result = run_benchmark([spec], settings)
    (summary,) = result["models"]
    weights_mb = summary["file_bytes"] / 1e6
    assert weights_mb > 30
    for cell in result["results"]:
        input_mb = cell["batch_size"] * 3 * 32 * 32 * 4 / 1e6
        assert cell["input_memory_mb"] == pytest.approx(input_mb)
        assert cell["call_memory_mb"] > 0
        assert cell["peak_memory_mb"] == pytest.approx(cell["weights_memory_mb"] + input_mb + cell["call_memory_mb"])
        assert cell["peak_memory_mb"] >= weights_mb
        assert cell["memory_kind"].startswith("peak memory = weights held by the backend")
        if cell["backend"] == "eager":
            assert cell["weights_memory_mb"] == pytest.approx(weights_mb)  # fp32, no buffers
        else:  # the ONNX file: the same weights, give or take the graph and folded constants
            assert cell["weights_memory_mb"] == pytest.approx(weights_mb, rel=0.05)


def test_pairs_and_ratios_follow_the_paper_definitions():
    summaries = [
        {"label": "t", "width": 768, "depth": 12, "params": 1000},
        {"label": "s", "width": 768, "depth": 6, "params": 504},
        {"label": "other", "width": 384, "depth": 12, "params": 300},
    ]
    assert choose_pairs(summaries) == [("t", "s")]
    results = [
        {"model": "t", "device": "cpu", "backend": "eager", "batch_size": 4, "ms_per_image": 3.0},
        {"model": "s", "device": "cpu", "backend": "eager", "batch_size": 4, "ms_per_image": 1.5},
        {"model": "s", "device": "cpu", "backend": "onnx", "batch_size": 4, "ms_per_image": 1.0},
    ]
    (ratio,) = paper_ratios(summaries, results, [("t", "s")])
    assert ratio["smaller"] == pytest.approx(0.496)
    assert ratio["faster"] == pytest.approx(1.0)
    assert (ratio["backend"], ratio["batch_size"]) == ("eager", 4)
    # no shared width: the first model against the second
    assert choose_pairs(summaries[2:] + summaries[:1]) == [("other", "t")]


def test_find_bma_prefers_test_then_val():
    assert find_bma({"val": {"balanced_accuracy": 0.7}, "test": {"balanced_accuracy": 0.6}}) == (0.6, "test")
    assert find_bma({"val": {"headline": {"balanced_accuracy": 0.7}}}) == (0.7, "val")
    assert find_bma({"val": {"balanced_accuracy": None}}) == (None, None)


def test_eager_backend_is_the_plain_model():
    model = create_teacher("vit_base_patch16_224", 8, depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    assert torch.equal(build_backend("eager", model)(x), expected)
    assert torch.allclose(build_backend("bf16", model)(x).float(), expected, atol=0.1)
    with pytest.raises(ConfigError, match="unknown backend.*tensorrt.*choose from eager"):
        build_backend("tensorrt", model)


def test_linear_patch_embed_is_the_convolution():
    model = create_teacher("vit_base_patch16_224", 8, depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected_tokens = model.patch_embed(x)
        expected = model(x)
        assert linear_patch_embed(model)
        assert isinstance(model.patch_embed, LinearPatchEmbed)
        assert model.patch_embed.img_size == (32, 32) and model.patch_embed.num_patches == 16
        assert torch.allclose(model.patch_embed(x), expected_tokens, atol=1e-5)
        assert torch.allclose(model(x), expected, atol=1e-5)
        with pytest.raises(ModelError, match="expected images of 32x32 px, got 40x40"):
            model.patch_embed(torch.zeros(1, 3, 40, 40))
    # a padding patch embedding is left alone: the plain matmul would not be exact there
    padded = create_teacher(
        "vit_base_patch16_224", 8, depth=1, embed_dim=32, num_heads=2, img_size=30, patch_size=8, dynamic_img_pad=True
    )
    assert not linear_patch_embed(padded)
    assert isinstance(padded.patch_embed.proj, nn.Conv2d)


def test_fast_backend_matches_eager_and_leaves_the_model_alone():
    model = create_teacher("vit_base_patch16_224", 8, depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    logits = build_backend("fast", model)(x)  # 3 images: padded to 4 for the compiled graph, cut back to 3
    assert logits.dtype == torch.float32 and logits.shape == (3, 8)
    assert torch.allclose(logits, expected, atol=0.1)
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 2 / 3
    # the caller's model is untouched: still fp32, still the convolution
    assert next(model.parameters()).dtype == torch.float32
    assert isinstance(model.patch_embed.proj, nn.Conv2d)


def test_warmup_batch_sizes_cover_every_padded_size():
    assert warmup_batch_sizes("fast", 24) == [1, 2, 4, 8, 16, 32]
    assert warmup_batch_sizes("compile", 1) == [1]
    assert warmup_batch_sizes("eager", 32) == [1, 32]
    assert warmup_batch_sizes("onnx", 1) == [1]
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        warmup_batch_sizes("eager", 0)


def test_runner_pads_batches_to_a_power_of_two():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.flatten(1)[:, :2] * 2

    x = torch.randn(5, 3, 2, 2)
    padded = TorchRunner(Recorder(), torch.device("cpu"), pad_batches=True)
    plain = TorchRunner(Recorder(), torch.device("cpu"))
    assert torch.equal(padded(x), plain(x))
    assert padded(x[:4]).shape == (4, 2)
    assert seen == [8, 5, 4]


def test_onnx_on_cuda_without_provider_is_unavailable():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    model = create_teacher("vit_base_patch16_224", 8, depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        build_backend("onnx", model, "cuda")


def test_benchmark_cli_on_two_specs(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["benchmark", "--models", DEEP, SHALLOW, "--backends", "eager,onnx", "--batch-sizes", "1,4", *FAST, "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    deep, shallow = result["models"]
    assert (deep["depth"], shallow["depth"]) == (4, 2)
    assert deep["params"] == sum(p.numel() for p in load_bench_model(parse_model_ref(DEEP)).model.parameters())
    assert deep["gflops"] == pytest.approx(vit_flops(4) / 1e9, rel=0.01)
    assert shallow["gflops"] < deep["gflops"]
    assert deep["file_bytes"] == 4 * deep["params"]  # float32 tensors, no buffers
    cells = {(r["model"], r["backend"], r["batch_size"]): r for r in result["results"]}
    assert len(cells) == 8 and all(r["repeats"] >= 2 for r in cells.values())
    assert result["machine"]["threads"] == torch.get_num_threads()

    assert (deep["label"], shallow["label"]) == ("vit_base_patch16_224@4", "vit_base_patch16_224@2")
    assert deep["ref"] == DEEP and shallow["ref"] == SHALLOW
    assert result["pairs"] == [[deep["label"], shallow["label"]]]
    assert len(result["ratios"]) == 4
    smaller = 1 - shallow["params"] / deep["params"]
    for ratio in result["ratios"]:
        assert ratio["smaller"] == smaller
        key = ratio["backend"], ratio["batch_size"]
        expected = cells[(deep["label"], *key)]["ms_per_image"] / cells[(shallow["label"], *key)]["ms_per_image"] - 1
        assert ratio["faster"] == pytest.approx(expected)
    markdown = (out / "bench.md").read_text()
    assert f"{smaller:.2%} smaller" in markdown
    assert f"{deep['params']:,}" in markdown
    assert (out / "bench.png").stat().st_size > 0
    assert f"{smaller:.2%} smaller" in capsys.readouterr().out


def test_benchmark_artifact_dir_writes_reports_with_bma(tmp_path):
    model = create_teacher("vit_base_patch16_224", 8, depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    model_dir = save_artifact(
        model, tmp_path / "run" / "model", classes=classes, preprocess=PreprocessConfig(image_size=32), metrics={"test": {"balanced_accuracy": 0.5}}
    )
    out = tmp_path / "bench"
    settings = BenchSettings(batch_sizes=(1, 2), backends=("eager",), warmup=1, repeats=3, min_repeats=2, seconds=0.1)
    result = run_benchmark([str(tmp_path / "run")], settings)
    (summary,) = result["models"]
    assert summary["label"] == "run" and summary["source"] == "artifact"
    assert (summary["balanced_accuracy"], summary["balanced_accuracy_split"]) == (0.5, "test")
    assert summary["file_bytes"] == (model_dir / "model.safetensors").stat().st_size
    assert result["ratios"] == [] and result["pairs"] == []

    rc = main(["benchmark", "--models", str(model_dir), "--batch-sizes", "2", *FAST, "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"bench.md", "bench.json", "bench.png"}
    assert "0.5000 (test)" in (out / "bench.md").read_text()


def test_benchmark_cli_bad_inputs_fail_clearly(tmp_path, capsys):
    cases = [
        (["--models", str(tmp_path / "nope")], "no such model directory"),
        (["--models", SHALLOW, "--backends", "eager,tensorrt"], "unknown backend(s) tensorrt"),
        (["--models", "vit_base_patch16_224@2:embed_dim"], "is not KEY=VALUE"),
        (["--models", SHALLOW, "--pair", SHALLOW, "vit_small"], "--pair 'vit_small': not one of"),
        (["--models", SHALLOW, "--warmup", "0"], "warmup >= 1"),
    ]
    for args, message in cases:
        assert main(["benchmark", *args, "--out", str(tmp_path / "out")]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_cpu_needs_no_sync_and_keeps_its_cpu_time_rate():
    """device_sync is None on the CPU, so a rate measured with it still reports the per-CPU-second rate
    (a no-op function in its place read as "device work" and dropped it)."""
    from skindistil.measure import device_sync

    assert device_sync("cpu") is None
    rate = measure_rate(lambda: sum(range(2000)) and 1, 0.05, device_sync("cpu"))
    assert rate.wall > 0 and rate.cpu is not None and rate.cpu > 0


def test_artifact_labels_and_pairs_are_never_empty_or_self(tmp_path, monkeypatch):
    """A model given as `model` or `.` from inside its run is still named after the run, and --pair refuses a
    model paired with itself or a name that fits several models (a 0% smaller, 0% faster 'result')."""
    from skindistil.bench.models import _choose_pairs_by_name
    from skindistil.bench.specs import ModelRef
    from skindistil.config import PreprocessConfig
    from skindistil.models import create_teacher, save_artifact

    model = create_teacher("vit_base_patch16_224", num_classes=2, embed_dim=16, depth=1, num_heads=2, img_size=32,
                           patch_size=16)
    save_artifact(model, tmp_path / "lesions" / "model", classes=["a", "b"], preprocess=PreprocessConfig(image_size=32))
    monkeypatch.chdir(tmp_path / "lesions")
    assert parse_model_ref("model").label == "lesions"
    monkeypatch.chdir(tmp_path / "lesions" / "model")
    assert parse_model_ref(".").label == "lesions"
    refs = [ModelRef("runs/a/model", "a"), ModelRef("runs/b/model", "b"), ModelRef("x", "shared"),
            ModelRef("y", "shared")]
    assert _choose_pairs_by_name(refs, ["a", "runs/b/model"]) == [("a", "b")]
    with pytest.raises(ConfigError, match=r"teacher and student are the same model \(a\)"):
        _choose_pairs_by_name(refs, ["a", "runs/a/model"])
    with pytest.raises(ConfigError, match=r"'shared': names 2 benchmarked models"):
        _choose_pairs_by_name(refs, ["a", "shared"])
