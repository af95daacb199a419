"""Loads a saved Transfusion checkpoint with transformers' tensor parallelism (`tp_plan="auto"`) on the processes of
`torchrun` (gloo on CPU works) and writes, per rank, how the LM head and the input embedding are sharded and how far
the sharded model's logits are from the whole model's. Run by tests/test_modeling_common.py:

    torchrun --nproc_per_node 2 tests/tensor_parallel_forward.py CHECKPOINT OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import DistributedConfig

import modeling_transfusion as mt

from test_modeling_common import TransfusionModelTester


def main(checkpoint: str, out_dir: str):
    inputs = TransfusionModelTester().image_inputs()
    whole = mt.TransfusionForConditionalGeneration.from_pretrained(checkpoint).eval()
    sharded = mt.TransfusionForConditionalGeneration.from_pretrained(
        checkpoint, distributed_config=DistributedConfig(tp_plan="auto")
    ).eval()
    with torch.no_grad():
        difference = (sharded(**inputs).logits - whole(**inputs).logits).abs().max().item()
    head, embedding = sharded.lm_head.weight, sharded.get_input_embeddings().weight
    report = {
        "placements": [str(getattr(weight, "placements", None)) for weight in (head, embedding)],
        "local_rows": [weight.to_local().shape[0] for weight in (head, embedding)],
        "tied": head is embedding,
        "logits_max_difference": difference,
    }
    (Path(out_dir) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
