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
    assert set(median) == {"cached", "cached_cfg3", "uncached", "denoising_steps", "backbone_floor"}
    assert row["ratios_of_median_wall"]["cached_over_floor"] == pytest.approx(
        median["cached"] / median["backbone_floor"]
    )
    assert set(report["memory_mb"]) == {"cached", "cached_cfg3"}
    assert all(m["peak_rss_mb"] >= m["before_mb"] for m in report["memory_mb"].values())


def test_text_decoding_bench(tmp_path):
    report = run_bench("bench_text_decoding.py", tmp_path / "text.json", "--repeats", "1")
    median = report["summary"]["median_wall"]
    for name in ("transfusion", "lm_only"):
        assert report["tokens_per_second"][name] == pytest.approx(report["new_tokens"] / median[name])
