"""Tests of the core model: config validation, the hybrid mask, the losses, training on real data, save/load and the
Hugging Face plumbing (Auto classes, gradient checkpointing, bf16, resizing, loading a pretrained LLM)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlamaConfig,
    LlamaForCausalLM,
)

import modeling_transfusion as mt

from conftest import TINY_VAE

VOCAB = 64
BOS, EOS, BOI, EOI, IMAGE = 3, 4, 61, 62, 63
TINY_TEXT = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": 0,
}


def tiny_config(**overrides) -> mt.TransfusionConfig:
    """8x8 grey images, identity autoencoder, 2x2 patches: 16 image slots."""
    kwargs = dict(
        text_config=TINY_TEXT,
        image_size=8,
        num_channels=1,
        latent_channels=1,
        patch_size=2,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
    )
    kwargs.update(overrides)
    return mt.TransfusionConfig(**kwargs)


def tiny_model(seed=0, **overrides) -> mt.TransfusionForConditionalGeneration:
    torch.manual_seed(seed)
    model = mt.TransfusionForConditionalGeneration(tiny_config(**overrides))
    # The diffusion head starts at zero; give it weights so that perturbations are visible in its output.
    for module in (model.model.patch_decoder,):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


def image_span(n=16):
    return [BOI] + [IMAGE] * n + [EOI]


def two_image_row():
    """[text x3] <boi> image 0 <eoi> [text x2] <boi> image 1 <eoi> [text x2]; returns ids and slot starts."""
    ids = [BOS, 10, 11] + image_span() + [12, 13] + image_span() + [14, EOS]
    return torch.tensor([ids]), (4, 4 + 16 + 4)


# Config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "score"}, "Unknown objective 'score'"),
        ({"patch_encoder": "mlp"}, "Unknown patch_encoder 'mlp'"),
        ({"image_size": 9}, "image_size (9) must be divisible"),
        ({"boi_token_id": VOCAB}, "boi_token_id=64 lies outside the vocabulary"),
        ({"image_token_id": -1}, "image_token_id=-1 lies outside the vocabulary"),
        ({"eoi_token_id": BOI}, "three distinct ids"),
        ({"latent_channels": 4}, "latent_channels (4) must equal num_channels (1)"),
        ({"patch_encoder": "unet", "patch_size": 3, "image_size": 9}, "must be a power of two"),
        ({"patch_encoder": "unet", "unet_block_out_channels": [8]}, "needs log2(patch_size) + 1 = 2 entries"),
        ({"max_conditioning_timestep": 2000}, "max_conditioning_timestep (2000)"),
        ({"condition_dropout_prob": 1.0}, "condition_dropout_prob must lie in [0, 1)"),
        ({"vae_config": TINY_VAE, "latent_channels": 4}, "vae_config maps 1 image channels to 2 latent channels"),
        ({"vae_config": TINY_VAE, "latent_channels": 2, "image_size": 10}, "VAE downsample factor (2)"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)


def test_config_geometry_and_round_trip(tmp_path):
    config = tiny_config(vae_config=TINY_VAE, latent_channels=2, image_size=16, patch_size=2)
    assert (config.vae_downsample_factor, config.latent_size, config.num_image_tokens, config.patch_dim) == (
        2,
        8,
        16,
        8,
    )
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, mt.TransfusionConfig)
    assert reloaded.to_diff_dict() == config.to_diff_dict()
    assert isinstance(reloaded.text_config, LlamaConfig)


def test_config_accepts_any_decoder_backbone():
    text = {**TINY_TEXT, "model_type": "qwen2"}
    model = mt.TransfusionForConditionalGeneration(tiny_config(text_config=text))
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    ids, _ = two_image_row()
    out = model(input_ids=ids, pixel_values=torch.rand(2, 1, 8, 8) * 2 - 1, labels=ids)
    assert torch.isfinite(out.loss)


# The hybrid mask: causal over the sequence, bidirectional inside each image


def _forward(model, ids, latents, **kwargs):
    with torch.no_grad():
        out = model(input_ids=ids, image_latents=latents, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1], out.diffusion_prediction


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_perturbing_a_late_patch_changes_its_image_but_nothing_before_its_boi(attn_implementation, patch_encoder):
    overrides = {"patch_encoder": "unet", "unet_block_out_channels": [8, 16]} if patch_encoder == "unet" else {}
    model = tiny_model(**overrides)
    model.set_attn_implementation(attn_implementation)
    ids, (start0, start1) = two_image_row()
    latents = torch.randn(2, 1, 8, 8)
    perturbed = latents.clone()
    perturbed[1, :, 6:, 6:] += 3.0  # the last 2x2 patch (raster order) of the second image

    hidden, _ = _forward(model, ids, latents)
    hidden_p, _ = _forward(model, ids, perturbed)
    change = (hidden - hidden_p).abs().amax(-1)[0]  # per position

    boi1 = start1 - 1
    assert change[: boi1 + 1].max() == 0, "nothing up to the image's <boi> (text, the first image) may change"
    if patch_encoder == "linear":
        # With a per-patch encoder, only attention can carry the change to the image's earlier patches.
        assert change[start1 : start1 + 15].min() > 1e-4, "every earlier patch of the same image must see the change"
    assert change[start1 + 16 :].min() > 1e-4, "text after the image must see it"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_perturbing_a_text_token_changes_nothing_before_it(attn_implementation):
    model = tiny_model()
    model.set_attn_implementation(attn_implementation)
    ids, (start0, start1) = two_image_row()
    latents = torch.randn(2, 1, 8, 8)
    position = start0 + 16 + 1  # the first text token after image 0
    perturbed = ids.clone()
    perturbed[0, position] = 30
    hidden, prediction = _forward(model, ids, latents)
    hidden_p, prediction_p = _forward(model, perturbed, latents)
    change = (hidden - hidden_p).abs().amax(-1)[0]
    assert change[:position].max() == 0
    assert change[position:].min() > 1e-4
    assert torch.equal(prediction[0], prediction_p[0]), "the earlier image's prediction may not change"
    assert (prediction[1] - prediction_p[1]).abs().max() > 1e-4, "the later image conditions on the text"


def test_linear_patches_without_bidirectional_attention_would_not_see_later_patches():
    """Control for the mask test: under a purely causal mask the same perturbation leaves earlier patches unchanged,
    so the change seen in the test above is the bidirectional block at work."""
    model = tiny_model()
    ids, (_, start1) = two_image_row()
    latents = torch.randn(2, 1, 8, 8)
    perturbed = latents.clone()
    perturbed[1, :, 6:, 6:] += 3.0
    causal_only = torch.ones_like(ids)  # a 4D causal mask bypasses the image blocks
    length = ids.shape[1]
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None]
    hidden, _ = _forward(model, ids, latents, attention_mask=mask)
    hidden_p, _ = _forward(model, ids, perturbed, attention_mask=mask)
    change = (hidden - hidden_p).abs().amax(-1)[0]
    assert change[: start1 + 15].max() == 0
    assert causal_only.sum() == length


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_and_rows_with_different_image_counts_do_not_leak(padding_side):
    model = tiny_model()
    row_two, _ = two_image_row()
    row_one = torch.tensor([[BOS, 20] + image_span() + [21, 22, EOS]])
    row_none = torch.tensor([[BOS, 23, 24, 25, EOS]])
    rows = [row_two[0], row_one[0], row_none[0]]
    length = max(len(r) for r in rows)
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[i, where] = row
        mask[i, where] = 1
    latents = torch.randn(3, 1, 8, 8)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions, image_latents=latents)
        for i, row in enumerate(rows):
            images = {0: latents[:2], 1: latents[2:], 2: latents[:0]}[i]
            alone = model(input_ids=row[None], image_latents=images if len(images) else None)
            valid = mask[i].bool()
            torch.testing.assert_close(batch.logits[i][valid], alone.logits[0], atol=1e-5, rtol=1e-5)
        # Changing the padding tokens' ids changes nothing that is not padding.
        other = ids.masked_fill(mask == 0, 17)
        repadded = model(input_ids=other, attention_mask=mask, position_ids=positions, image_latents=latents)
    assert torch.equal(batch.logits[mask.bool()], repadded.logits[mask.bool()])
    assert torch.equal(batch.diffusion_prediction, repadded.diffusion_prediction)


def test_packed_documents_do_not_attend_to_each_other():
    model = tiny_model()
    first = [BOS, 10] + image_span() + [11, EOS]
    second = [BOS, 12, 13] + image_span() + [EOS]
    ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    latents = torch.randn(2, 1, 8, 8)
    perturbed_ids = ids.clone()
    perturbed_ids[0, 1] = 30
    perturbed_latents = latents.clone()
    perturbed_latents[0] += 1.0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, image_latents=latents)
        changed = model(input_ids=perturbed_ids, position_ids=positions, image_latents=perturbed_latents)
        alone = model(input_ids=torch.tensor([second]), image_latents=latents[1:])
    later = slice(len(first), None)
    assert torch.equal(packed.logits[0, later], changed.logits[0, later])
    assert torch.equal(packed.diffusion_prediction[1], changed.diffusion_prediction[1])
    torch.testing.assert_close(packed.logits[0, later], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_unconditional_images_do_not_see_what_precedes_their_boi():
    model = tiny_model()
    ids, (_, start1) = two_image_row()
    latents = torch.randn(2, 1, 8, 8)
    other_text = ids.clone()
    other_text[0, 1:3] = torch.tensor([40, 41])
    dropped = torch.tensor([False, True])
    _, prediction = _forward(model, ids, latents, unconditional_images=dropped)
    _, prediction_other = _forward(model, other_text, latents, unconditional_images=dropped)
    moved = latents.clone()
    moved[0] *= 0.5
    _, prediction_first_moved = _forward(model, ids, moved, unconditional_images=dropped)
    assert torch.equal(prediction[1], prediction_other[1]), "the dropped image ignores the caption"
    assert torch.equal(prediction[1], prediction_first_moved[1]), "and the earlier image"
    _, prediction_kept = _forward(model, ids, latents)
    _, prediction_kept_other = _forward(model, other_text, latents)
    assert (prediction_kept[1] - prediction_kept_other[1]).abs().max() > 1e-4, "without dropout it reads the caption"
    assert (prediction[0] - prediction_other[0]).abs().max() > 1e-4, "the kept image still reads its caption"


def test_flash_attention_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="cannot express Transfusion's mask"):
        mt.TransfusionForConditionalGeneration(tiny_config(attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="cannot express Transfusion's mask"):
        tiny_model().set_attn_implementation("flash_attention_2")


# Losses


def test_lm_loss_ignores_image_slots_eoi_after_them_and_padding():
    model = tiny_model()
    ids, _ = two_image_row()
    ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = (torch.arange(ids.shape[1]) < ids.shape[1] - 3).long()[None]
    labels = model.text_labels(ids, ids.clone(), mask)
    supervised = (labels != -100)[0]
    assert not supervised[ids[0] == IMAGE].any()
    assert not supervised[ids[0] == EOI].any(), "<eoi> follows the last patch deterministically"
    assert not supervised[-3:].any()
    assert supervised[ids[0] == BOI].all(), "opening an image is a prediction the model must learn"
    assert int(supervised.sum()) == 9  # <bos> 10 11 <boi> | 12 13 <boi> | 14 <eos>

    latents = torch.randn(2, 1, 8, 8)
    timesteps, noise = torch.tensor([100, 700]), torch.randn(2, 1, 8, 8)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        image_latents=latents,
        image_timesteps=timesteps,
        image_noise=noise,
        labels=ids,
    )
    # The same loss by hand: cross-entropy over the supervised targets, mean squared error per image.
    shift_logits, shift_labels = out.logits[0, :-1], labels[0, 1:]
    keep = shift_labels != -100
    expected_lm = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
    expected_diffusion = ((out.diffusion_prediction - noise) ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(out.lm_loss, expected_lm)
    torch.testing.assert_close(out.diffusion_loss, expected_diffusion)
    torch.testing.assert_close(out.loss, expected_lm + 5.0 * expected_diffusion)
    # Different labels at image slots change nothing.
    garbage = ids.masked_fill(ids == IMAGE, 7)
    out_garbage = model(
        input_ids=ids,
        attention_mask=mask,
        image_latents=latents,
        image_timesteps=timesteps,
        image_noise=noise,
        labels=garbage,
    )
    assert torch.equal(out.loss, out_garbage.loss)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_targets_follow_the_objective(objective):
    model = tiny_model(objective=objective)
    ids = torch.tensor([[BOS, 10] + image_span()])
    latents, noise = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    out = model(input_ids=ids, image_latents=latents, image_timesteps=torch.tensor([250]), image_noise=noise)
    if objective == "ddpm":
        torch.testing.assert_close(out.diffusion_target, noise)
    else:
        torch.testing.assert_close(out.diffusion_target, noise - latents)
    clean = model(input_ids=ids, image_latents=latents)
    assert clean.diffusion_target is None and clean.image_timesteps.tolist() == [0]


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_an_image_at_timestep_0_stays_clean_beside_a_noised_one(objective):
    # The captioned image at timestep 0 (max_conditioning_timestep=0) is clean whatever its neighbour is noised to:
    # its noise changes nothing and it carries no diffusion loss (the noise at t=0 cannot be predicted).
    model = tiny_model(objective=objective)
    ids, _ = two_image_row()
    latents, timesteps = torch.randn(2, 1, 8, 8), torch.tensor([0, 400])
    noise = torch.randn(2, 1, 8, 8)
    other_noise = torch.cat([torch.randn(1, 1, 8, 8), noise[1:]])
    with torch.no_grad():
        out = model(input_ids=ids, image_latents=latents, image_timesteps=timesteps, image_noise=noise, labels=ids)
        other = model(input_ids=ids, image_latents=latents, image_timesteps=timesteps, image_noise=other_noise)
        clean = model(input_ids=ids, image_latents=latents, image_timesteps=torch.tensor([0, 0]), labels=ids)
    assert torch.equal(out.logits, other.logits)
    assert torch.equal(out.diffusion_prediction, other.diffusion_prediction)
    # Image 0's slots and everything before image 1 read exactly what the all-clean forward reads.
    torch.testing.assert_close(out.logits[:, :24], clean.logits[:, :24], rtol=0, atol=1e-6)
    noised_only = ((out.diffusion_prediction[1] - out.diffusion_target[1]) ** 2).mean()
    torch.testing.assert_close(out.diffusion_loss, noised_only)
    assert ((out.diffusion_prediction[0] - out.diffusion_target[0]) ** 2).mean() > 0.1 * noised_only
    assert clean.diffusion_loss == 0


def test_noise_cap_applies_to_images_followed_by_supervised_text():
    model = tiny_model().train()
    caption_then_image = [BOS, 10, 11] + image_span() + [EOS]
    image_then_caption = [BOS] + image_span() + [12, 13, EOS]
    ids = torch.tensor([caption_then_image, image_then_caption])
    labels = ids.clone()
    timesteps = torch.stack([model.sample_image_timesteps(ids, labels) for _ in range(300)])
    assert timesteps[:, 1].max() <= 500, "captioned images are capped"
    assert timesteps[:, 0].max() > 800, "generated images span the whole schedule"
    assert 0.4 < timesteps[:, 0].float().mean() / 1000 < 0.6
    assert timesteps[:, 1].float().mean() < 300
    # Without supervised text after it, the image is not capped.
    unsupervised = labels.clone()
    unsupervised[1, -3:] = -100
    free = torch.stack([model.sample_image_timesteps(ids, unsupervised) for _ in range(300)])
    assert free[:, 1].max() > 800


def test_condition_dropout_rate_in_training():
    model = tiny_model(condition_dropout_prob=0.3).train()
    ids, _ = two_image_row()
    latents = torch.randn(2, 1, 8, 8)
    calls = []
    original = model.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("unconditional_images"))
        return original(*args, **kwargs)

    model.model.forward = spy
    torch.manual_seed(0)
    for _ in range(200):
        model(input_ids=ids, image_latents=latents, labels=ids)
    dropped = torch.stack([c if c is not None else torch.zeros(2, dtype=torch.bool) for c in calls]).float().mean()
    assert 0.24 < dropped < 0.36
    model.eval()
    calls.clear()
    model(input_ids=ids, image_latents=latents, labels=ids)
    assert calls[-1] is None, "no dropout outside training"


# Bad input


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    ids, _ = two_image_row()
    with pytest.raises(ValueError, match="hold 2 image\\(s\\) .* but 1 image\\(s\\) were passed"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="hold 2 image\\(s\\) .* but 0 image\\(s\\)"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"pixel_values of size 16x16: this model takes images of at most 8x8"):
        model(input_ids=ids, pixel_values=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image_latents must be \(num_images, 1, height, width\); image 0 has shape"):
        model(input_ids=ids, image_latents=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="Image 0 occupies 15 <image> slots, but an image of 8x8 pixels needs 16"):
        model(input_ids=torch.tensor([[BOS, BOI] + [IMAGE] * 15 + [EOI]]), image_latents=torch.zeros(1, 1, 8, 8))
    split = torch.tensor([[BOI] + [IMAGE] * 8 + [EOI, BOI] + [IMAGE] * 8 + [EOI]])
    with pytest.raises(ValueError, match=r"hold 2 image\(s\) \(runs of <image> slots\) but 1"):
        model(input_ids=split, image_latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="Pass only one of pixel_values and image_latents"):
        model(input_ids=ids, pixel_values=torch.zeros(2, 1, 8, 8), image_latents=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="image_timesteps must have shape \\(2,\\)"):
        model(input_ids=ids, image_latents=torch.zeros(2, 1, 8, 8), image_timesteps=torch.tensor([1]))


# Training on real data: sklearn's digits


def digits_batches(num_rows, seed):
    """Rows "<bos> digit k <boi> image <eoi> <eos>" (generation) and "<bos> <boi> image <eoi> digit k <eos>"
    (captioning) of sklearn's 8x8 digits scaled to [-1, 1]; the caption tokens are 10 ("digit") and 20 + k."""
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(digits.target), generator=generator)[:num_rows]
    images = torch.tensor(digits.images[index.numpy()], dtype=torch.float32)[:, None] / 8.0 - 1.0
    classes = torch.tensor(digits.target[index.numpy()])
    rows = []
    for i, k in enumerate(classes.tolist()):
        caption = [10, 20 + k]
        rows.append([BOS] + caption + image_span() + [EOS] if i % 5 else [BOS] + image_span() + caption + [EOS])
    return torch.tensor(rows), images


def train_on_digits(model, steps, max_grad_norm=None):
    """AdamW steps on batches of 32 of `digits_batches(512, seed=0)`; returns the model in eval mode."""
    train_ids, train_images = digits_batches(512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = slice(32 * (step % 16), 32 * (step % 16 + 1))
        model(input_ids=train_ids[rows], pixel_values=train_images[rows], labels=train_ids[rows]).loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_training_on_digits_lowers_both_losses(objective, patch_encoder):
    overrides = {"patch_encoder": "unet", "unet_block_out_channels": [16, 32]} if patch_encoder == "unet" else {}
    torch.manual_seed(0)
    model = mt.TransfusionForConditionalGeneration(tiny_config(objective=objective, **overrides))
    eval_ids, eval_images = digits_batches(128, seed=1)
    generator = torch.Generator().manual_seed(2)
    eval_timesteps = torch.randint(1, 1000, (128,), generator=generator)
    eval_noise = torch.randn(eval_images.shape, generator=generator)

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = model(
                input_ids=eval_ids,
                pixel_values=eval_images,
                image_timesteps=eval_timesteps,
                image_noise=eval_noise,
                labels=eval_ids,
            )
        return out.lm_loss.item(), out.diffusion_loss.item()

    lm_before, diffusion_before = evaluate()
    train_on_digits(model, steps=40, max_grad_norm=1.0)
    lm_after, diffusion_after = evaluate()
    assert lm_after < 0.5 * lm_before, (lm_before, lm_after)
    assert diffusion_after < 0.8 * diffusion_before, (diffusion_before, diffusion_after)


def test_unet_predicts_high_noise_as_well_as_the_linear_encoder():
    """At high noise the noise is nearly the noisy latent itself, each image's per-channel mean and scale included.
    A U-Net with a GroupNorm before its output (`unet_output_norm`) lost them over small latents and drew poorly;
    the default U-Net predicts the noise at t=900 no worse than the linear model after the same training."""
    eval_ids, eval_images = digits_batches(128, seed=1)
    losses = {}
    for name, overrides in [("linear", {}), ("unet", {"patch_encoder": "unet", "unet_block_out_channels": [16, 32]})]:
        torch.manual_seed(0)
        model = train_on_digits(mt.TransfusionForConditionalGeneration(tiny_config(**overrides)), steps=600)
        noise = torch.randn(eval_images.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = model(
                input_ids=eval_ids,
                pixel_values=eval_images,
                image_timesteps=torch.full((128,), 900),
                image_noise=noise,
                labels=eval_ids,
            )
        losses[name] = out.diffusion_loss.item()
    # Measured: linear 0.0245, U-Net 0.0176; with the output norm the U-Net was at 0.0302.
    assert losses["unet"] <= losses["linear"], losses


@pytest.mark.parametrize("output_norm", [False, True])
def test_unet_decoder_output_follows_each_images_channel_means(output_norm):
    """The mechanism of the test above: a per-image, per-channel offset of the decoder's last features reaches the
    output without the norm; with it (one channel per group here) the output does not change at all."""
    config = tiny_config(patch_encoder="unet", unet_block_out_channels=[16, 32], unet_output_norm=output_norm)
    torch.manual_seed(0)
    encoder = mt.modeling_transfusion.TransfusionUNetPatchEncoder(config)
    decoder = mt.modeling_transfusion.TransfusionUNetPatchDecoder(config).eval()
    slots, state, _ = encoder(torch.randn(3, 1, 8, 8), torch.tensor([100, 500, 900]))
    offsets = torch.randn(3, 16, 1, 1)
    with torch.no_grad():
        plain = decoder(slots, state)
        hook = decoder.up_blocks[-1].register_forward_hook(lambda module, inputs, output: output + offsets)
        shifted = decoder(slots, state)
        hook.remove()
    change = (shifted - plain).abs().max().item()
    assert (change < 1e-5) if output_norm else (change > 0.1), change


# Save / load and the Hugging Face plumbing


def test_unet_model_saved_before_unet_output_norm_loads_with_the_norm(tmp_path):
    tiny_model(patch_encoder="unet", unet_block_out_channels=[8, 16], unet_output_norm=True).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["unet_output_norm"]  # the config as written before the option existed
    config["format_version"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert reloaded.config.unet_output_norm is True and reloaded.config.format_version == 2
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = reloaded.state_dict()
    for name, value in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(state[name], value), name
    # Without the norm a U-Net model is format 4, which older releases (that would add the norm) refuse to load.
    new = tiny_config(patch_encoder="unet", unet_block_out_channels=[8, 16])
    assert new.unet_output_norm is False and new.format_version == 4


def test_save_and_reload_through_automodel_is_bit_identical(tmp_path):
    model = tiny_model(vae_config=TINY_VAE, latent_channels=2, image_size=16)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert any(key.startswith("model.vae.") for key in load_file(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "transfusion"

    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is mt.TransfusionForConditionalGeneration
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, _ = two_image_row()
    pixels = torch.rand(2, 1, 16, 16) * 2 - 1
    kwargs = dict(
        input_ids=ids,
        pixel_values=pixels,
        image_timesteps=torch.tensor([0, 400]),
        image_noise=torch.randn(2, 2, 8, 8),
        labels=ids,
    )
    with torch.no_grad():
        a, b = model(**kwargs), reloaded(**kwargs)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.diffusion_prediction, b.diffusion_prediction)
    assert torch.equal(a.loss, b.loss)


def test_auto_classes_resolve_to_transfusion(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is mt.TransfusionConfig
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        assert type(auto_class.from_pretrained(tmp_path)) is mt.TransfusionForConditionalGeneration
    headless = mt.TransfusionModel.from_pretrained(tmp_path)
    assert not hasattr(headless, "lm_head")
    ids, _ = two_image_row()
    out = headless(input_ids=ids, image_latents=torch.randn(2, 1, 8, 8))
    assert out.last_hidden_state.shape == (1, ids.shape[1], 32) and out.diffusion_prediction.shape == (2, 1, 8, 8)


def test_vae_is_frozen_and_stays_fp32_in_bf16(tmp_path):
    model = tiny_model(vae_config=TINY_VAE, latent_channels=2, image_size=16)
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.train()
    assert not model.vae.training
    model.save_pretrained(tmp_path)
    bf16 = mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.vae.dtype == torch.float32 and bf16.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in bf16.vae.parameters()), "still frozen after loading"
    assert all(p.requires_grad for p in bf16.model.language_model.parameters())


def test_bf16_forward_and_backward():
    model = tiny_model(vae_config=TINY_VAE, latent_channels=2, image_size=16).to(torch.bfloat16).train()
    ids, _ = two_image_row()
    out = model(input_ids=ids, pixel_values=torch.rand(2, 1, 16, 16) * 2 - 1, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, _ = two_image_row()
    kwargs = dict(
        input_ids=ids,
        image_latents=torch.randn(2, 1, 8, 8),
        image_timesteps=torch.tensor([10, 900]),
        image_noise=torch.randn(2, 1, 8, 8),
        unconditional_images=torch.tensor([False, False]),
        labels=ids,
    )
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        model(**kwargs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_resize_token_embeddings_keeps_working():
    model = tiny_model()
    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.text_config.vocab_size == VOCAB + 8
    assert model.lm_head.weight.shape[0] == VOCAB + 8
    ids = torch.tensor([[BOS, VOCAB + 7] + image_span() + [EOS]])
    out = model(input_ids=ids, image_latents=torch.randn(1, 1, 8, 8), labels=ids)
    assert out.logits.shape[-1] == VOCAB + 8 and torch.isfinite(out.loss)


def test_a_pretrained_llm_loads_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).eval()
    llm.save_pretrained(tmp_path)
    config = tiny_config(text_config=llm.config.to_dict())
    model = mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path, config=config).eval()
    for name, tensor in llm.state_dict().items():
        name = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([[BOS, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits, atol=0, rtol=0)


def test_sliding_window_backbones_get_a_mask_per_layer_type():
    text = {**TINY_TEXT, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    model = mt.TransfusionForConditionalGeneration(tiny_config(text_config=text)).eval()
    assert model.model.language_model.config.layer_types == ["full_attention", "sliding_attention"]
    ids, (start0, _) = two_image_row()
    mask = model.model.get_attention_mask(model.get_input_embeddings()(ids), ids == IMAGE, None, None, None)
    full, sliding = mask["full_attention"][0, 0], mask["sliding_attention"][0, 0]
    image0 = slice(start0, start0 + 16)
    assert full[image0, image0].all() and sliding[image0, image0].all(), "images stay bidirectional in both"
    last = ids.shape[1] - 1
    assert full[last, : last + 1].all() and sliding[last].sum() == 4, "text sees its window only in sliding layers"
    out = model(input_ids=ids, image_latents=torch.randn(2, 1, 8, 8), labels=ids)
    assert torch.isfinite(out.loss)


def test_config_round_trips_through_to_dict_and_keeps_unknown_keys():
    config = tiny_config(objective="flow")
    assert mt.TransfusionConfig.from_dict(config.to_dict()).to_diff_dict() == config.to_diff_dict()
    extended = mt.TransfusionConfig.from_dict({**config.to_dict(), "my_note": "kept"})
    assert extended.my_note == "kept" and extended.to_dict()["my_note"] == "kept"
