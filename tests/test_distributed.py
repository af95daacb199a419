"""Training on several processes: `accelerate launch` starts 2 CPU processes (gloo) running Trainer on a tiny model
(tests/distributed_train.py); afterwards the replicas must hold bit-identical, updated weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "distributed_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_identical_replicas(tmp_path):
    # `accelerate launch --multi_gpu` starts the processes with torchrun; without GPUs they use gloo on the CPU.
    # (`--cpu --num_processes 2` would start a single process: accelerate expects mpirun for several CPU processes.)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(SCRIPT), "--output-dir", str(tmp_path), "--max-steps", "3", "--batch-size", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [report["world_size"] for report in ranks] == [2, 2]
    assert all(report["steps"] == 3 for report in ranks)
    # Same start, same end, and the end is not the start: the gradients were all-reduced and applied.
    assert ranks[0]["initial_hash"] == ranks[1]["initial_hash"]
    assert ranks[0]["final_hash"] == ranks[1]["final_hash"] != ranks[0]["initial_hash"]
    # The data was sharded: in each step the ranks trained on different records (2 each).
    first, second = (report["records"][:6] for report in ranks)
    assert not set(first) & set(second) and len(set(first) | set(second)) == 12
    # Step 2 gave rank 1 a text-only batch (records 6, 7) while rank 0 had images: the patch layers had gradients on
    # one rank only, and training still went through (DDP's find_unused_parameters).
    assert ranks[1]["records"][2:4] == [6, 7]
    # Each rank drew its own noise levels (Trainer seeds all ranks alike; the script reseeds per rank).
    assert ranks[0]["timesteps"][:2] != ranks[1]["timesteps"][:2]
