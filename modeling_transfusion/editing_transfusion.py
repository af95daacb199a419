"""Editing guidance for Transfusion: the branches an edit's target image is denoised against.

An edit is the sequence `<source image> instruction <target image>`: the source is in the KV cache as clean latents
(timestep 0), the instruction is text, and the target is denoised after its `<boi>` (a model that writes sizes writes
the target's size text just before it). Guidance on the instruction and on the source image, as InstructPix2Pix and
BAGEL do it, needs three predictions per step: the full one, one without the instruction and one without the source.
The branch without the instruction is the history up to the source's `<eoi>`, reused from the cache (nothing before
the instruction depends on it), followed by the size text and `<boi>`; the branch without the source is the
instruction alone (`<bos> instruction size <boi>`), a prefix of its own, because every cached instruction key has
read the source. Both match the two condition drops the model is trained with (`recipes/editing.py`).
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

EDIT_BRANCHES = ("no_instruction", "no_source")


@dataclass
class EditBranches:
    """The prefixes one group of rows denoises against under editing guidance: `len(rows)` full rows first, then as
    many for each branch in `names` (`"no_instruction"`, `"no_source"`), right-padded to one length.

    cache (`DynamicCache`): the prefixes, `(num_branches * len(rows), ..., length, head_dim)` per layer.
    attention_mask (`torch.LongTensor` of shape `(num_branches * len(rows), length)`): 1 on each prefix's tokens.
    positions (`torch.LongTensor` of shape `(num_branches * len(rows),)`): the position of each branch's first slot.
    """

    cache: DynamicCache
    attention_mask: torch.LongTensor
    positions: torch.LongTensor
    names: tuple[str, ...]


def edit_source_guidance_scale(generation_config) -> float:
    """The source-image guidance of an edit when the caller gives none: the generation config's
    `source_image_guidance_scale` (a checkpoint trained on edits saves one), else 1 (the branch skipped)."""
    scale = getattr(generation_config, "source_image_guidance_scale", None)
    return 1.0 if scale is None else scale


def source_image_end(config, tokens: torch.LongTensor) -> int | None:
    """In the `tokens` of one row, which end with the `<boi>` of the image being opened, the index of the last `<eoi>`
    before it (the end of an edit's source image), or `None` where the row holds no image before it."""
    eois = (tokens[:-1] == config.eoi_token_id).nonzero().flatten()
    return int(eois[-1]) if len(eois) else None


def instruction_span(config, tokens: torch.LongTensor, size_text_length: int, row: int) -> tuple[int, int]:
    """In the `tokens` of one row, which end with the `<boi>` of the image being edited into, `(eoi, start)`: the
    index of the source image's `<eoi>` ([`source_image_end`]) and where the size text begins (`size_text_length`
    tokens before `<boi>`); the instruction lies between them."""
    eoi = source_image_end(config, tokens)
    if eoi is None:
        raise ValueError(
            f"source_image_guidance_scale guides an edit on its source image, but row {row} holds no image before its "
            "instruction: pass the source image in the prompt (`<image> instruction`)."
        )
    start = len(tokens) - 1 - size_text_length
    if start <= eoi + 1:
        raise ValueError(
            f"Row {row} has no instruction between its source image and the image it opens: write the edit "
            "instruction after the source image (`<image> instruction`)."
        )
    return eoi, start


def _prefill(model, input_ids, attention_mask, position_ids, cache=None) -> Cache:
    """Runs text `input_ids` (one row) through the model into `cache` (a new one by default) and returns it."""
    cache = cache if cache is not None else DynamicCache(config=model.config.text_config)
    model(
        input_ids=input_ids[None],
        attention_mask=attention_mask[None],
        position_ids=position_ids[None],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache


def edit_branches(
    model,
    cache: Cache,
    input_ids: torch.LongTensor,
    keep: torch.BoolTensor,
    attention_mask: torch.Tensor | None,
    positions: torch.LongTensor,
    rows: list[int],
    size_text_lengths: list[int],
    names: tuple[str, ...],
) -> EditBranches:
    """Builds the prefixes of the editing branches `names` for `rows`, whose last cached token is the `<boi>` of the
    image they edit into (see the module docstring). `input_ids` `(batch_size, cache_length)` are the cached tokens,
    `keep` which of them belong to their row, `attention_mask` their 2D mask (`None`: all ones), `positions` each
    row's next position and `size_text_lengths` the tokens of each row's size text before `<boi>`."""
    unknown = sorted(set(names) - set(EDIT_BRANCHES))
    if unknown:
        raise ValueError(f"Unknown editing branches {unknown}: choose among {list(EDIT_BRANCHES)}.")
    config = model.config
    device = input_ids.device
    length = input_ids.shape[1]
    masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    prefixes = [[(keys[row], values[row]) for keys, values in layers] for row in rows]  # the full branch
    prefix_masks = [masks[row] for row in rows]
    first_positions = [positions[row] for row in rows]
    for name in names:
        for row, size_text_length in zip(rows, size_text_lengths):
            columns = (keep[row] & masks[row].bool()).nonzero().flatten()  # the row's own tokens, padding left out
            tokens = input_ids[row, columns]
            eoi, start = instruction_span(config, tokens, size_text_length, row)
            tail = tokens[start:]  # the size text and <boi>
            if name == "no_instruction":
                # Everything up to the source's <eoi> is the cache's own: no copy of compute, only of its keys.
                end = int(columns[eoi]) + 1
                kept = DynamicCache(
                    ddp_cache_data=[(k[row : row + 1, :, :end], v[row : row + 1, :, :end]) for k, v in layers]
                )
                eoi_position = masks[row, :end].long().sum() - 1
                tail_positions = eoi_position + 1 + torch.arange(len(tail), device=device)
                mask = torch.cat([masks[row, :end], masks.new_ones(len(tail))])
                branch = _prefill(model, tail, mask, tail_positions, kept)
                next_position = tail_positions[-1] + 1
            else:
                bos = tokens[:1] if tokens[0] == config.text_config.bos_token_id else tokens[:0]
                text = torch.cat([bos, tokens[eoi + 1 :]])
                mask = masks.new_ones(len(text))
                branch = _prefill(model, text, mask, torch.arange(len(text), device=device))
                next_position = torch.tensor(len(text), device=device)
            prefixes.append([(layer.keys[0], layer.values[0]) for layer in branch.layers])
            prefix_masks.append(mask)
            first_positions.append(next_position)
    longest = max(length, *(len(mask) for mask in prefix_masks))

    def padded(tensor, dim):
        pad = [0, 0] * (tensor.dim() - 1 - dim) + [0, longest - tensor.shape[dim]]
        return torch.nn.functional.pad(tensor, pad)

    stacked = [
        (
            torch.stack([padded(prefix[index][0], 1) for prefix in prefixes]),
            torch.stack([padded(prefix[index][1], 1) for prefix in prefixes]),
        )
        for index in range(len(layers))
    ]
    return EditBranches(
        cache=DynamicCache(ddp_cache_data=stacked),
        attention_mask=torch.stack([padded(mask, 0) for mask in prefix_masks]),
        positions=torch.stack([torch.as_tensor(p, device=device) for p in first_positions]).long(),
        names=tuple(names),
    )


__all__ = [
    "EDIT_BRANCHES",
    "EditBranches",
    "edit_source_guidance_scale",
    "source_image_end",
    "instruction_span",
    "edit_branches",
]
