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
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

import modeling_transfusion as mt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the builders of the test suite
from conftest import DIGIT_NAMES, build_tiny_config, build_tiny_tokenizer, load_digit_images  # noqa: E402


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict, in name order: equal hashes mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_records(count: int) -> list[dict]:
    """Captioned digit images (`"a handwritten seven <image>"`), except records 6 and 7 (mod 12), which are text only;
    each with an `id`."""
    records = []
    for index, (image, label) in enumerate(load_digit_images(count)):
        if index % 12 in (6, 7):
            records.append({"id": index, "text": f"the number {label} written by hand"})
        else:
            records.append({"id": index, "text": f"a handwritten {DIGIT_NAMES[label]} <image>", "images": [image]})
    return records


class InOrderTrainer(Trainer):
    """Reads the records in order (sharded across ranks by accelerate), so that the mix of batches is known."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


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
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = build_tiny_tokenizer()
    config = build_tiny_config(tokenizer)
    torch.manual_seed(0)  # every rank builds the same initial model
    model = mt.TransfusionForConditionalGeneration(config)
    initial_hash = state_hash(model)
    processor = mt.TransfusionProcessor.from_model_config(config, tokenizer)
    collator = RecordingCollator(mt.TransfusionDataCollator(processor))

    timesteps = []
    model.model.patch_encoder.register_forward_pre_hook(lambda module, inputs: timesteps.extend(inputs[1].tolist()))

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
    trainer = InOrderTrainer(
        model=model,
        args=training_args,
        train_dataset=training_records(4 * args.batch_size * args.max_steps),
        data_collator=collator,
    )
    # Trainer seeds every rank alike; without this, all ranks would draw the same timesteps and noise each step.
    torch.manual_seed(training_args.seed + training_args.process_index)
    result = trainer.train()

    report = {
        "rank": training_args.process_index,
        "world_size": training_args.world_size,
        "initial_hash": initial_hash,
        "final_hash": state_hash(trainer.model),
        "records": collator.seen,
        "timesteps": timesteps,
        "steps": result.global_step,
        "loss": result.training_loss,
    }
    Path(args.output_dir, f"rank{training_args.process_index}.json").write_text(json.dumps(report), encoding="utf-8")
    if torch.distributed.is_initialized():  # a clean exit: gloo's threads are stopped before the interpreter ends
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
