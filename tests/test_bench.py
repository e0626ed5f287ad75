"""Benchmarks: the size benchmark measures the real files; the speed benchmark's bookkeeping."""

import torch

from pege_hf import bench
from pege_hf.hf.cifar import cifar_resnet


def test_size_benchmark_reports_real_bytes(tmp_path):
    result = bench.bench_size(lambda: cifar_resnet(20), bits_list=(2, 4), work_dir=tmp_path)
    assert result["float_bytes"] > 1_000_000
    w2, w4 = result["packed"]["W2A2"], result["packed"]["W4A4"]
    assert w2["ratio_vs_float"] == w2["bytes"] / result["float_bytes"] <= 0.1
    assert w2["bytes"] < w4["bytes"] and w4["ratio_vs_float"] <= 1 / 6
    assert "| W2A2 |" in bench.size_table(result)


def test_saved_activation_bytes_counts_distinct_storages():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU())
    x = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    # activations: the Linear's input (4x10), the ReLU's output (4x20), the loss's log-softmax (4x20);
    # the parameters (20x10 + 20 floats) are not activations and must not be counted
    got = bench.saved_activation_bytes(model, (x, y))
    activations = (4 * 10 + 4 * 20 + 4 * 20) * 4
    assert activations <= got < activations + 220 * 4


def test_speed_benchmark_structure():
    result = bench.bench_speed(lambda: cifar_resnet(20), batch_size=4, steps=2, warmup=1)
    variants = result["variants"]
    assert set(variants) == {"fp", "ste", "pege", "pege_r1"}
    assert variants["fp"]["ratio_vs_fp"] == 1.0
    for v in variants.values():
        assert len(v["step_times_s"]) == 2 and v["median_step_s"] > 0
    assert variants["ste"]["memory_ratio_vs_fp"] > 1.0  # quantizers add saved tensors
