"""Training on several processes: `accelerate launch` starts 2 CPU processes (gloo) running Trainer on a tiny model
(tests/distributed_train.py). Under DDP the replicas must end with bit-identical, updated weights; under FSDP2 each
rank must hold half the parameters, and the gathered checkpoint must reproduce the trained model."""

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


def launch(output_dir: Path, *launcher_args: str, script_args: tuple[str, ...] = ()) -> list[dict]:
    """Runs tests/distributed_train.py on 2 CPU processes with `accelerate launch` and returns the ranks' reports."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(SCRIPT), "--output-dir", str(output_dir), "--max-steps", "3", "--batch-size", "2", *script_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_processes_train_identical_replicas(tmp_path):
    # `accelerate launch --multi_gpu` starts the processes with torchrun; without GPUs they use gloo on the CPU.
    # (`--cpu --num_processes 2` would start a single process: accelerate expects mpirun for several CPU processes.)
    ranks = launch(tmp_path, "--multi_gpu")
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


def test_two_processes_fsdp2_shard_train_and_save_a_full_checkpoint(tmp_path):
    # The same flags as docs/distributed.md: FSDP2, one unit per decoder layer, full state dict on save.
    ranks = launch(
        tmp_path,
        "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT",
        script_args=("--fsdp",),
    )  # fmt: skip
    fsdp = [report["fsdp"] for report in ranks]
    assert all(report["steps"] == 3 for report in ranks)
    # accelerate alone keeps DDP on CPU (MULTI_CPU); the script's Trainer switches it to FSDP.
    assert [rank["accelerate_chose"] for rank in fsdp] == ["MULTI_CPU"] * 2
    assert [rank["distributed_type"] for rank in fsdp] == ["FSDP"] * 2
    # Sharded: each rank holds about half of every parameter (dim 0), the two halves make the whole model.
    shards = [rank["sharding"] for rank in fsdp]
    full = shards[0]["full_numel"]
    assert shards[0]["local_numel"] + shards[1]["local_numel"] == full == shards[1]["full_numel"] > 60_000
    assert all(abs(shard["local_numel"] - full / 2) < 0.01 * full for shard in shards)
    assert all(shard["placements"] == ["(Shard(dim=0),)"] for shard in shards)
    # Units: each decoder layer, the (tied) embeddings and LM head, which accelerate adds, and the root, which holds
    # the rest: the final norm, the patch layers and the frozen VAE.
    layers = ["model.language_model.layers.0", "model.language_model.layers.1"]
    units = ["", "model.language_model.embed_tokens", *layers, "lm_head"]
    assert all(shard["units"] == units for shard in shards)
    assert [rank["trainable_vae_parameters"] for rank in fsdp] == [0, 0]
    # The same data sharding as under DDP, and every batch mixes an image record and a text-only one.
    assert ranks[0]["records"][:6] == [0, 1, 4, 5, 8, 9] and ranks[1]["records"][:6] == [2, 3, 6, 7, 10, 11]
    # Both ranks see the same model: the same loss on a fixed batch (fixed noise), lower after 3 steps.
    assert fsdp[0]["initial_loss"] == fsdp[1]["initial_loss"]
    assert fsdp[0]["final_loss"] == fsdp[1]["final_loss"] < fsdp[0]["initial_loss"] - 0.5
    # The checkpoint gathered on save reloads with AutoModel and gives the trained model's logits; the VAE is intact.
    for rank in fsdp:
        assert rank["reloaded_class"] == "TransfusionForConditionalGeneration" and rank["reloaded_vae_unchanged"]
        assert rank["reloaded_logits_max_diff"] < 1e-5 and abs(rank["reloaded_loss"] - rank["final_loss"]) < 1e-5


def test_fsdp2_trains_a_model_with_modality_experts(tmp_path):
    # The routed decoder layers keep their class name, so accelerate's wrap policy finds them; each unit holds a layer's
    # text modules and their image twins.
    ranks = launch(
        tmp_path,
        "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT",
        script_args=("--fsdp", "--modality-experts"),
    )  # fmt: skip
    fsdp = [report["fsdp"] for report in ranks]
    assert [rank["distributed_type"] for rank in fsdp] == ["FSDP"] * 2
    shards = [rank["sharding"] for rank in fsdp]
    assert shards[0]["local_numel"] + shards[1]["local_numel"] == shards[0]["full_numel"]
    assert all(
        shard["units"][2:4] == ["model.language_model.layers.0", "model.language_model.layers.1"] for shard in shards
    )
    assert fsdp[0]["final_loss"] == fsdp[1]["final_loss"] < fsdp[0]["initial_loss"] - 0.5
    for rank in fsdp:
        assert rank["reloaded_class"] == "TransfusionForConditionalGeneration"
        assert rank["reloaded_logits_max_diff"] < 1e-5 and abs(rank["reloaded_loss"] - rank["final_loss"]) < 1e-5
