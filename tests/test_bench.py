"""The benchmark scripts run end to end (without the peer, which CI does not install) and report consistent numbers.

Timings are not asserted (the machines are noisy); what is asserted is what must hold on any machine: the cached and
uncached samplers produce the same image, every phase has a time and a peak memory, and the ratios are computed from
the medians they claim to come from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "TRANSFUSION_PEER_PYTHON": "/nonexistent/python"}  # never the peer, even where installed
    command = [sys.executable, str(BENCH / script), "--threads", "1", "--no-peer", "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_training_bench(tmp_path):
    report = run_bench("bench_training.py", tmp_path / "training.json", "--repeats", "1")
    median = report["summary"]["median_wall"]
    assert set(median) == {"transfusion", "lm_only"}
    assert report["overhead_vs_lm_only"] == pytest.approx(median["transfusion"] / median["lm_only"])
    # Same backbone: the multimodal model only adds the patch layers and the timestep embedding.
    extra = report["parameters"]["transfusion"] - report["parameters"]["lm_only"]
    assert 0 < extra < 0.05 * report["parameters"]["lm_only"]
    for name in ("transfusion", "lm_only"):
        memory = report["memory_mb"][name]
        assert 100 < memory["before_mb"] < memory["peak_rss_mb"] < 4000  # a training step allocates
    assert report["speedup_vs_peer"] is None


def test_sampling_bench(tmp_path):
    report = run_bench(
        "bench_sampling.py", tmp_path / "sampling.json", "--repeats", "1", "--steps", "4", "--prompt-lengths", "16"
    )
    (row,) = report["results"]
    assert row["max_abs_difference_cached_vs_uncached"] < 1e-3  # the prefix cache changes nothing
    median = row["median_wall"]
    assert set(median) == {
        *("cached", "floor", "cached_cfg3", "floor_cfg3", "denoising_steps", "backbone_steps", "uncached")
    }
    ratios = row["ratios_of_median_wall"]
    assert ratios["cached_over_floor"] == pytest.approx(median["cached"] / median["floor"])
    assert ratios["cached_cfg3_over_floor_cfg3"] == pytest.approx(median["cached_cfg3"] / median["floor_cfg3"])
    assert set(report["memory_mb"]) == {"cached", "cached_cfg3"}
    assert all(m["peak_rss_mb"] >= m["before_mb"] for m in report["memory_mb"].values())


def test_text_decoding_bench(tmp_path):
    report = run_bench("bench_text_decoding.py", tmp_path / "text.json", "--repeats", "1")
    median = report["summary"]["median_wall"]
    for name in ("transfusion", "lm_only"):
        assert report["tokens_per_second"][name] == pytest.approx(report["new_tokens"] / median[name])


def test_scaling_bench(tmp_path):
    report = run_bench(
        "bench_scaling.py",
        tmp_path / "scaling.json",
        *("--slots", "16", "256", "--batch", "2", "--steps", "2", "--repeats", "3"),
    )
    rows = report["results"]
    assert [(row["slots"], row["image_size"], row["training_sequence_length"]) for row in rows] == [
        (16, 8, 50),  # 32 text tokens + <boi> + 16 slots + <eoi>
        (256, 32, 290),
    ]
    for row in rows:
        median, ratios = row["median_wall"], row["ratios_of_median_wall"]
        assert set(median) == {"transfusion_step", "lm_only_step", "sample", "backbone_floor"}
        assert ratios["training_over_lm_only"] == pytest.approx(median["transfusion_step"] / median["lm_only_step"])
        assert ratios["sampling_over_floor"] == pytest.approx(median["sample"] / median["backbone_floor"])
        extra = row["parameters"]["transfusion"] - row["parameters"]["lm_only"]
        assert 0 < extra < 0.05 * row["parameters"]["lm_only"]
        assert set(row["memory_mb"]) == {"transfusion_step", "lm_only_step", "sample"}
        for memory in row["memory_mb"].values():
            assert 100 < memory["before_mb"] <= memory["peak_rss_mb"] < 4000
    # 5.8 times the training tokens, 16 times the slots denoised: several times the work of every variant, beyond
    # what the noise of a shared machine does to a median of 3 interleaved repeats.
    small, large = rows
    for name, seconds in small["median_wall"].items():
        assert large["median_wall"][name] > seconds, name
    assert large["memory_mb"]["transfusion_step"]["peak_rss_mb"] > small["memory_mb"]["transfusion_step"]["peak_rss_mb"]


def test_experts_bench(tmp_path):
    out = tmp_path / "experts.json"
    command = [sys.executable, str(BENCH / "bench_experts.py"), "--shape", "small", "--threads", "1", "--repeats", "1"]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    variants = {name: set(result["summary"]["median_wall"]) for name, result in results.items()}
    assert variants == {
        "training step": {"dense", "experts", "experts_frozen_text"},
        "forward+backward": {"dense", "experts"},
        "text decoding": {"lm_only", "dense", "experts"},
        "denoising step": {"dense", "experts"},
    }
    for result in results.values():
        median = result["summary"]["median_wall"]
        for variant, ratio in result["ratios_of_median_wall"].items():
            assert ratio == pytest.approx(median[variant] / median[result["baseline"]])
