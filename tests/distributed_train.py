"""Trains a tiny Transfusion with `Trainer` on several processes, for `tests/test_distributed.py` and
docs/distributed.md. Launch it with either of

    accelerate launch --cpu --num_processes 2 tests/distributed_train.py --output-dir OUT
    torchrun --nproc_per_node 2 tests/distributed_train.py --output-dir OUT

(on CPU the processes talk through gloo). Each rank writes `OUT/rank<k>.json`: a hash of its weights before and after
training, the records it trained on and the image timesteps it drew, so that the test can check that the replicas
end with identical weights, that the data was sharded, and that the ranks drew different noise.

The records are read in order; with 2 processes and batches of 2, the second step gives rank 1 a text-only batch while
rank 0 has images: the patch layers then get gradients on one rank only, which DDP handles with
`find_unused_parameters=True` (Trainer's default without activation checkpointing).

`--fsdp` trains with FSDP2 instead (launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`, see
docs/distributed.md), on a model with a tiny frozen VAE. accelerate turns FSDP on only for GPU-like devices: on CPU it
silently keeps DDP, so `FSDPOnCPUTrainer` switches accelerate's state to FSDP with the launcher's plugin, and
accelerate's own FSDP2 code (`fully_shard` per decoder layer and embedding, then the root) runs on gloo. Reported:
the sharding, a fixed batch's loss before and after training, and how the saved checkpoint reproduces the logits.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import SequentialSampler
from transformers import AutoModel, Trainer, TrainingArguments

import modeling_transfusion as mt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the builders of the test suite
from conftest import DIGIT_NAMES, TINY_VAE, build_tiny_config, build_tiny_tokenizer, load_digit_images  # noqa: E402


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict, in name order: equal hashes mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_records(count: int, text_only: tuple[int, ...] = (6, 7)) -> list[dict]:
    """Captioned digit images (`"a handwritten seven <image>"`), except records `text_only` (mod 12), which are text
    only; each with an `id`."""
    records = []
    for index, (image, label) in enumerate(load_digit_images(count)):
        if index % 12 in text_only:
            records.append({"id": index, "text": f"the number {label} written by hand"})
        else:
            records.append({"id": index, "text": f"a handwritten {DIGIT_NAMES[label]} <image>", "images": [image]})
    return records


class InOrderTrainer(Trainer):
    """Reads the records in order (sharded across ranks by accelerate), so that the mix of batches is known."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class FSDPOnCPUTrainer(InOrderTrainer):
    """Runs accelerate's FSDP on CPU: accelerate ignores `--use_fsdp` there (its state stays MULTI_CPU, i.e. DDP), so
    switch the state to FSDP with the plugin the launcher's `FSDP_*` variables describe."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        self.accelerate_kept = state.distributed_type.value  # what accelerate chose by itself
        if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            # Both singletons, as accelerate does when it picks FSDP itself (AcceleratorState() re-reads PartialState).
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()
            self.is_fsdp_enabled = True


def sharding_report(model: torch.nn.Module) -> dict:
    """Local and full element counts of the parameters (DTensors under FSDP2), their placements and the FSDP units."""
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    local = full = 0
    placements = set()
    for param in model.parameters():
        local += param.to_local().numel() if hasattr(param, "to_local") else param.numel()
        full += param.numel()
        placements.add(str(getattr(param, "placements", "plain tensor")))
    return {"local_numel": local, "full_numel": full, "placements": sorted(placements), "units": units}


def fixed_batch_forward(model: torch.nn.Module, batch: dict) -> tuple[float, torch.Tensor]:
    """Loss and logits on `batch` in eval mode with fixed noise (seed 123), without gradients."""
    model.eval()
    torch.manual_seed(123)
    with torch.no_grad():
        output = model(**batch)
    return output.loss.item(), output.logits


class RecordingCollator:
    """The project's collator, noting the ids of the records each rank receives."""

    def __init__(self, collator: mt.TransfusionDataCollator):
        self.collator = collator
        self.seen: list[int] = []

    def __call__(self, records):
        self.seen.extend(record["id"] for record in records)
        return self.collator(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--find-unused-parameters", choices=("auto", "true", "false"), default="auto",
        help="DDP's find_unused_parameters; auto: Trainer's default (on, unless activation checkpointing)",
    )  # fmt: skip
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 by accelerate's plugin (launch with --use_fsdp)")
    parser.add_argument("--modality-experts", action="store_true", help="a model with image experts")
    parser.add_argument(
        "--text-only-batch", action="store_true",
        help="under --fsdp, keep the text-only batch of step 2 on rank 1 (fails: FSDP has no find_unused_parameters)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = build_tiny_tokenizer()
    # Under FSDP, a tiny frozen VAE (8x8 digits -> 4x4x2 latents, 4 slots per image) shares the root unit.
    vae = {"vae_config": TINY_VAE, "latent_channels": 2} if args.fsdp else {}
    config = build_tiny_config(tokenizer, **vae, modality_experts=args.modality_experts)
    torch.manual_seed(0)  # every rank builds the same initial model
    model = mt.TransfusionForConditionalGeneration(config)
    initial_hash = state_hash(model)
    processor = mt.TransfusionProcessor.from_model_config(config, tokenizer)
    collator = RecordingCollator(mt.TransfusionDataCollator(processor))

    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=1e-2,
        use_cpu=True,
        ddp_backend="gloo",
        remove_unused_columns=False,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        activation_checkpointing=args.activation_checkpointing,
        ddp_find_unused_parameters={"auto": None, "true": True, "false": False}[args.find_unused_parameters],
    )
    # FSDP reduce-scatters the gradients of a whole unit: a rank whose batch has no image (no gradient for the patch
    # layers) sends less than the other, and the collective fails. Under FSDP the text-only records are 5 and 6, so
    # that every batch of 2 mixes an image record and a text-only one.
    text_only = (5, 6) if args.fsdp and not args.text_only_batch else (6, 7)
    records = training_records(4 * args.batch_size * args.max_steps, text_only)
    fixed_batch = collator.collator([record for record in records[:12] if "images" in record][:4])
    fixed_batch["labels"] = fixed_batch["input_ids"]
    initial_loss = fixed_batch_forward(model, fixed_batch)[0] if args.fsdp else None
    vae_hash = state_hash(model.model.vae) if args.fsdp else None
    timesteps = []
    model.model.patch_encoder.register_forward_pre_hook(lambda module, inputs: timesteps.extend(inputs[1].tolist()))

    trainer = (FSDPOnCPUTrainer if args.fsdp else InOrderTrainer)(
        model=model,
        args=training_args,
        train_dataset=records,
        data_collator=collator,
    )
    # Trainer seeds every rank alike; without this, all ranks would draw the same timesteps and noise each step.
    torch.manual_seed(training_args.seed + training_args.process_index)
    result = trainer.train()

    if args.fsdp:
        fsdp = {
            "accelerate_chose": trainer.accelerate_kept,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "sharding": sharding_report(trainer.model),
            "initial_loss": initial_loss,
            "trainable_vae_parameters": sum(p.requires_grad for p in trainer.model.model.vae.parameters()),
        }
        checkpoint = os.path.join(args.output_dir, "checkpoint")
        trainer.save_model(checkpoint)  # FULL_STATE_DICT: gathered on rank 0, which writes it
        trainer.accelerator.wait_for_everyone()
        # Every rank runs the forward: each unit all-gathers its parameters.
        fsdp["final_loss"], logits = fixed_batch_forward(trainer.model, fixed_batch)
        reloaded = AutoModel.from_pretrained(checkpoint).eval()
        fsdp["reloaded_class"] = type(reloaded).__name__
        fsdp["reloaded_vae_unchanged"] = state_hash(reloaded.model.vae) == vae_hash
        reloaded_loss, reloaded_logits = fixed_batch_forward(reloaded, fixed_batch)
        fsdp["reloaded_loss"] = reloaded_loss
        fsdp["reloaded_logits_max_diff"] = (reloaded_logits - logits).abs().max().item()

    report = {
        "rank": training_args.process_index,
        "world_size": training_args.world_size,
        "initial_hash": initial_hash,
        "final_hash": None if args.fsdp else state_hash(trainer.model),
        "records": collator.seen,
        "timesteps": timesteps,
        "steps": result.global_step,
        "loss": result.training_loss,
        **({"fsdp": fsdp} if args.fsdp else {}),
    }
    Path(args.output_dir, f"rank{training_args.process_index}.json").write_text(json.dumps(report), encoding="utf-8")
    if torch.distributed.is_initialized():  # a clean exit: gloo's threads are stopped before the interpreter ends
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
