"""Modality experts (`TransfusionConfig(modality_experts=True)`): image slots run through weights of their own in every
layer, text keeps the pretrained weights and their names, attention is shared, routing is hard and never computes a
token twice; `freeze_text_path()` keeps text exactly the LLM's while the image path trains.

Llama and Qwen2 backbones, tied and untied heads; full and low-rank experts. The generation tests of
test_generation.py run again here on a model with experts (the `model` fixture below)."""

import copy
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline

import modeling_transfusion as mt
from modeling_transfusion.conversion import apply_image_path, convert_from_llm, extract_image_path
from modeling_transfusion.conversion.image_path import IMAGE_PATH_WEIGHTS, text_path_names
from modeling_transfusion.experts_transfusion import (
    TransfusionLowRankExpert,
    copy_text_weights_to_experts,
    image_expert_pairs,
)
from modeling_transfusion.recipes import data as recipe_data
from modeling_transfusion.recipes.cli import load_checkpoint
from modeling_transfusion.recipes.evaluation import compare_text, text_comparison_table
from modeling_transfusion.recipes.training import save_checkpoint

from conftest import DIGIT_NAMES, build_tiny_config, build_tiny_tokenizer, load_digit_images, tiny_text_config
from test_generation import (  # noqa: F401  (run again with the `model` fixture of this module)
    check_batch_equals_rows_run_alone,
    test_captioning_reads_the_prompt_image,
    test_denoising_step_equals_uncached_forward,
    test_logits_after_generated_image_equal_uncached_forward,
    tiny_model,
)

BACKBONES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def experts_from_llm(tmp_path, kind: str = "llama", tie: bool = False, rank: int | None = None):
    """A tiny random causal LM saved as a user's LLM folder, and a Transfusion model with experts loaded from it (the
    LLM's weights in the text path, each image expert a copy of its text module): `(llm, model, processor)`."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**tiny_text_config(tokenizer, kind, tie_word_embeddings=tie))
    ).eval()
    llm.save_pretrained(tmp_path / "llm")
    config = build_tiny_config(tokenizer, modality_experts=True, modality_experts_rank=rank)
    config.text_config = llm.config
    config.tie_word_embeddings = tie
    model = mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path / "llm", config=config).eval()
    copy_text_weights_to_experts(model.model.language_model)
    with torch.no_grad():
        for rows in (model.get_input_embeddings(), model.get_output_embeddings()):
            rows.image_tokens_weight.copy_(rows.weight[config.image_token_ids])
        model.model.patch_decoder.proj.weight.normal_(std=0.2)  # a zero head would hide the image path
    return llm, model, mt.TransfusionProcessor.from_model_config(config, tokenizer)


def dense_twin(model):
    """The same model without experts (its text weights, patch layers and VAE)."""
    settings = {**model.config.to_dict(), "modality_experts": False, "modality_experts_rank": None, "format_version": 2}
    dense = mt.TransfusionForConditionalGeneration(mt.TransfusionConfig.from_dict(settings)).eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    return dense


@torch.no_grad()
def perturb_image_experts(model, std: float = 0.1, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _, _, image in image_expert_pairs(model.model.language_model):
        for parameter in image.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def image_batch(processor, count: int = 2):
    texts = ["a handwritten <image> seven", "<image> the number two"][:count]
    images = [image for image, _ in load_digit_images(count)]
    return processor(text=texts, images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def model():
    """The generation tests' tiny model (vocabulary 64, 16 slots per image), with experts that differ from text."""
    experts = tiny_model(modality_experts=True)
    perturb_image_experts(experts)
    return experts


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_batch_equals_rows_run_alone_with_experts(model, scheduler):
    # Gathering the tokens of each modality gives the matrix products other shapes in a batch than alone: the same
    # result to float rounding, which the stochastic sampler carries a little further than without experts.
    check_batch_equals_rows_run_alone(model, scheduler, tolerance=1e-4)


def test_config_is_off_by_default_and_validated():
    tokenizer = build_tiny_tokenizer()
    plain = build_tiny_config(tokenizer)
    assert plain.modality_experts is False and plain.format_version == 2  # older releases still read it
    experts = build_tiny_config(tokenizer, modality_experts=True)
    assert experts.format_version == 3
    reloaded = mt.TransfusionConfig.from_dict(experts.to_dict())
    assert reloaded.modality_experts and reloaded.modality_experts_rank is None
    with pytest.raises(ValueError, match="modality_experts_rank is the rank of modality experts"):
        build_tiny_config(tokenizer, modality_experts_rank=4)
    with pytest.raises(ValueError, match="modality_experts_rank must be positive"):
        build_tiny_config(tokenizer, modality_experts=True, modality_experts_rank=0)
    with pytest.raises(ValueError, match="needs a model with modality_experts=True"):
        mt.TransfusionForConditionalGeneration(plain).freeze_text_path()


@pytest.mark.parametrize("kind, tie", BACKBONES)
def test_a_plain_causal_lm_loads_into_the_text_path_with_its_names(tmp_path, kind, tie):
    llm, model, processor = experts_from_llm(tmp_path, kind, tie)
    names = dict(model.named_parameters())
    for name, parameter in llm.named_parameters():
        ours = "lm_head.weight" if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)
        assert torch.equal(names[ours], parameter), name
    llm_names = {
        "lm_head.weight" if n == "lm_head.weight" else n.replace("model.", "model.language_model.", 1)
        for n, _ in llm.named_parameters()
    }
    new = set(names) - llm_names
    image_path = {name for name in new if ".image_" in name or name.endswith(".image_tokens_weight")}
    assert image_path and new - image_path == {name for name in new if name.startswith("model.patch_")}
    # One twin per per-token module: 4 projections + 3 MLP linears + 2 norms per layer (Llama, Qwen2), the final norm.
    pairs = image_expert_pairs(model.model.language_model)
    per_token = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
                 "post_attention_layernorm", "norm"}  # fmt: skip
    assert len(pairs) == 9 * 2 + 1 and {name.rsplit(".", 1)[-1] for name, _, _ in pairs} == per_token
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embeddings.weight) == tie
    assert (head.image_tokens_weight is embeddings.image_tokens_weight) == tie  # the image tokens' rows tie alike
    # Text-only inputs get exactly the LLM's logits (but for the image tokens' own): no expert is called for them.
    text = processor(text=["a handwritten seven", "the number"], return_tensors="pt", padding=True)
    vocab = min(model.config.image_token_ids)
    with torch.no_grad():
        assert torch.equal(model(**text).logits[..., :vocab], llm(**text).logits[..., :vocab])


@pytest.mark.parametrize("kind, tie", BACKBONES)
def test_experts_that_copy_the_text_path_compute_the_dense_model(tmp_path, kind, tie):
    _, model, processor = experts_from_llm(tmp_path, kind, tie)
    dense = dense_twin(model)
    batch = image_batch(processor)
    with torch.no_grad():
        routed, plain = model(**batch), dense(**batch)
    # Routing puts every token back where it was: with twins equal to the text modules, experts change nothing (over
    # the LLM's vocabulary: the columns of <boi>, <eoi>, <image> come from their own rows).
    vocab = min(model.config.image_token_ids)
    torch.testing.assert_close(routed.logits[..., :vocab], plain.logits[..., :vocab], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed.diffusion_prediction, plain.diffusion_prediction, atol=1e-5, rtol=1e-5)

    perturb_image_experts(model)
    with torch.no_grad():
        moved = model(**batch)
    first_slot = (batch["input_ids"] == model.config.image_token_id).int().argmax(-1).tolist()
    for row, start in enumerate(first_slot):
        # Text before an image never sees the image path; the text after it (from <eoi> on) reads it.
        assert torch.equal(moved.logits[row, :start], routed.logits[row, :start])
        end = start + model.config.num_image_tokens
        assert not torch.allclose(moved.logits[row, end:], routed.logits[row, end:])
    assert (moved.diffusion_prediction - routed.diffusion_prediction).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hidden_states_and_attentions_are_returned_with_experts(tmp_path, kind):
    """`output_hidden_states` and `output_attentions` record each layer as without experts (transformers finds the
    recorders by the backbone's class, which routing replaces)."""
    _, model, processor = experts_from_llm(tmp_path, kind)
    model.set_attn_implementation("eager")
    dense = dense_twin(model)
    dense.set_attn_implementation("eager")
    batch = image_batch(processor)
    options = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        routed, plain = model(**batch, **options), dense(**batch, **options)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(routed.hidden_states) == num_layers + 1 and len(routed.attentions) == num_layers
    torch.testing.assert_close(routed.hidden_states[-1], model.model(**batch).last_hidden_state)
    for ours, theirs in zip(routed.hidden_states + routed.attentions, plain.hidden_states + plain.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # twins equal to their text modules

    perturb_image_experts(model)
    with torch.no_grad():
        moved = model(**batch, **options)
    slots = batch["input_ids"] == model.config.image_token_id
    first_slot = slots.int().argmax(-1)
    for layer in range(1, num_layers + 1):
        # The image slots' states are the image path's; the text before the first image is not.
        assert (moved.hidden_states[layer][slots] - routed.hidden_states[layer][slots]).abs().max() > 1e-3
        for row, start in enumerate(first_slot.tolist()):
            assert torch.equal(moved.hidden_states[layer][row, :start], routed.hidden_states[layer][row, :start])
    real = batch["attention_mask"].bool()
    for attention in moved.attentions:  # (batch, heads, query, key), under the Transfusion mask
        sums = attention.sum(-1).transpose(1, 2)[real]
        torch.testing.assert_close(sums, torch.ones_like(sums))
        for row, start in enumerate(first_slot.tolist()):
            end = start + model.config.num_image_tokens
            image_queries = attention[row, :, start:end]
            assert (image_queries[..., start:end] > 0).all()  # bidirectional inside the image
            assert (image_queries[..., end:] == 0).all()  # nothing after it


class TokenCounter:
    """Counts the tokens each text module and each image twin of the backbone processes."""

    def __init__(self, model):
        self.text, self.image, self.hooks = {}, {}, []
        for name, text, image in image_expert_pairs(model.model.language_model):
            for store, module in ((self.text, text), (self.image, image)):
                store[name] = 0
                self.hooks.append(module.register_forward_hook(self._count(store, name)))

    @staticmethod
    def _count(store, name):
        def hook(module, args, output):
            store[name] += args[0].shape[:-1].numel()

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def test_every_token_goes_through_its_own_modules_once(tmp_path):
    _, model, processor = experts_from_llm(tmp_path)
    batch = image_batch(processor)
    num_slots = int((batch["input_ids"] == model.config.image_token_id).sum())
    num_tokens = batch["input_ids"].numel()
    with TokenCounter(model) as counter, torch.no_grad():
        model(**batch)
    assert set(counter.image.values()) == {num_slots}  # gathered: each slot once, in each twin
    assert set(counter.text.values()) == {num_tokens - num_slots}  # and every other token once, in the text module

    prompt = processor(text=["a handwritten seven"], return_tensors="pt")
    with TokenCounter(model) as counter:
        model.generate(**prompt, generation_mode="text", max_new_tokens=3, do_sample=False)
    assert set(counter.image.values()) == {0}  # text decoding runs the text weights alone

    kwargs = {"generation_mode": "image", "num_inference_steps": 3, "progress_bar": False}
    with TokenCounter(model) as counter:
        model.generate(**prompt, **kwargs, return_dict_in_generate=True)
    prompt_length = prompt["input_ids"].numel()
    slots = model.config.num_image_tokens
    # Three denoising steps and the commit of the clean image to the returned cache run their slots through the image
    # twins only; the text modules read the prompt and <boi> (the <eoi> ends the sequence: nothing reads it).
    assert set(counter.image.values()) == {4 * slots}
    assert set(counter.text.values()) == {prompt_length + 1}
    with TokenCounter(model) as counter:
        model.generate(**prompt, **kwargs)  # no cache returned: no commit
    assert set(counter.image.values()) == {3 * slots}
    assert set(counter.text.values()) == {prompt_length + 1}


def test_freeze_text_path_keeps_the_llm_text_bit_for_bit_while_images_train(tmp_path):
    llm, model, processor = experts_from_llm(tmp_path, "llama", tie=True)
    model.train().freeze_text_path()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    image_path = {name for name, _ in model.named_parameters() if ".image_" in name or "image_tokens_weight" in name}
    patch_layers = {name for name, _ in model.named_parameters() if name.startswith("model.patch_")}
    assert image_path and trainable == image_path | patch_layers
    assert any("time_embedding" in name for name in trainable)
    frozen = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name not in trainable}
    trained = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name in trainable}

    # Every parameter goes to the optimizer, with weight decay: a frozen one has no gradient, so it does not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    images = [image for image, _ in load_digit_images(4)]
    texts = [f"a handwritten {DIGIT_NAMES[label]} <image>" for _, label in load_digit_images(4)[:2]]
    texts += [f"<image> this is a {DIGIT_NAMES[label]}" for _, label in load_digit_images(4)[2:]]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    for _ in range(3):
        out = model(**batch, labels=batch["input_ids"])
        assert out.diffusion_loss > 0 and out.lm_loss > 0
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    moved = [name for name, p in model.named_parameters() if name in trained and not torch.equal(p, trained[name])]
    assert any("image_tokens_weight" in name for name in moved)  # <boi>, <eoi>: the captioning rows trained them
    assert any(".image_q_proj" in name for name in moved) and any("patch_encoder" in name for name in moved)
    model.eval()
    text = processor(text=["a handwritten seven", "what digit is this? it is a"], return_tensors="pt", padding=True)
    vocab = min(model.config.image_token_ids)  # the tiny LLM's vocabulary has them; their rows are the image path's
    with torch.no_grad():
        assert torch.equal(model(**text).logits[..., :vocab], llm(**text).logits[..., :vocab])
    assert torch.equal(
        model.generate(**text, generation_mode="text", max_new_tokens=6, do_sample=False),
        llm.generate(**text, max_new_tokens=6, do_sample=False, suppress_tokens=model.config.image_token_ids),
    )
    # In bfloat16 the frozen text path would be rounded: refused before anything is written; float32 keeps it.
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16\) would store the frozen text path"):
        save_checkpoint(model, processor, tmp_path / "bf16", dtype=torch.bfloat16)
    assert not (tmp_path / "bf16").exists()
    save_checkpoint(model, processor, tmp_path / "saved")
    with torch.no_grad():
        saved = AutoModel.from_pretrained(tmp_path / "saved").eval()
        assert torch.equal(saved(**text).logits[..., :vocab], llm(**text).logits[..., :vocab])


def test_routing_backward_splits_the_dense_gradient_between_text_and_image_weights(tmp_path):
    # Experts that are copies of their text modules compute the dense model's function, so each dense weight's
    # gradient is the sum of its text module's and its twin's: the routing's backward puts every token's gradient
    # back where it came from, once.
    _, model, processor = experts_from_llm(tmp_path)
    dense = dense_twin(model)
    batch = image_batch(processor)
    fixed = {
        "image_timesteps": torch.tensor([300, 0]),
        "image_noise": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        "unconditional_images": torch.tensor([False, False]),
        "labels": batch["input_ids"],
    }
    for network in (model, dense):
        network.train()(**batch, **fixed).loss.backward()
    dense_grads = dict(dense.named_parameters())
    prefix = "model.language_model."
    pairs = image_expert_pairs(model.model.language_model)
    assert len(pairs) == 9 * 2 + 1  # q, k, v, o, gate, up, down and the two norms per layer; the final norm
    for name, text, image in pairs:
        for key, weight in text.named_parameters():
            summed = weight.grad + dict(image.named_parameters())[key].grad
            torch.testing.assert_close(summed, dense_grads[f"{prefix}{name}.{key}"].grad, atol=1e-5, rtol=1e-4)
            assert weight.grad.abs().sum() > 0 and dict(image.named_parameters())[key].grad.abs().sum() > 0


def test_activation_checkpointing_routes_the_recomputation(tmp_path):
    _, model, processor = experts_from_llm(tmp_path)
    perturb_image_experts(model)
    batch = image_batch(processor)
    fixed = {  # the same noise in both runs
        "image_timesteps": torch.tensor([300, 0]),
        "image_noise": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        "unconditional_images": torch.tensor([False, False]),
    }

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            copy_.activation_checkpointing_enable()
        copy_(**batch, **fixed, labels=batch["input_ids"]).loss.backward()
        return {name: p.grad for name, p in copy_.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and any(".image_" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_low_rank_experts(tmp_path):
    _, model, processor = experts_from_llm(tmp_path, rank=2)
    pairs = image_expert_pairs(model.model.language_model)
    low_rank = [(name, text, image) for name, text, image in pairs if isinstance(image, TransfusionLowRankExpert)]
    assert len(low_rank) == 7 * 2  # the linear layers; the norms are full copies
    for _, text, image in low_rank:
        assert image.weight_a.shape == (2, text.in_features) and image.weight_b.shape == (text.out_features, 2)
    size = sum(p.numel() for _, _, image in pairs for p in image.parameters())
    assert size == sum(2 * (t.in_features + t.out_features) for _, t, _ in low_rank) + 32 * 5

    dense = dense_twin(model)
    batch = image_batch(processor)
    with torch.no_grad():
        start, plain = model(**batch), dense(**batch)
    # A zero delta: the image path starts as the text path.
    torch.testing.assert_close(start.diffusion_prediction, plain.diffusion_prediction, atol=1e-5, rtol=1e-5)
    vocab = min(model.config.image_token_ids)
    text = processor(text=["a handwritten seven"], return_tensors="pt")
    with torch.no_grad():
        for _, _, image in low_rank:
            image.weight_b.normal_(std=0.1)
        moved = model(**batch)
        assert torch.equal(model(**text).logits[..., :vocab], dense(**text).logits[..., :vocab])
    assert (moved.diffusion_prediction - start.diffusion_prediction).abs().max() > 1e-3


def test_save_load_bit_for_bit_automodel_and_pipelines(tmp_path):
    _, model, processor = experts_from_llm(tmp_path, "qwen2", tie=True)
    perturb_image_experts(model)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is mt.TransfusionForConditionalGeneration and reloaded.config.modality_experts
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    batch = image_batch(processor)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
        assert torch.equal(reloaded(**batch).diffusion_prediction, model(**batch).diffusion_prediction)

    prompt = processor(text=["a handwritten seven"], return_tensors="pt")
    out = model.generate(
        **prompt,
        generation_mode="image",
        num_inference_steps=3,
        image_guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        return_dict_in_generate=True,
        progress_bar=False,
    )
    image = pipeline("text-to-image", model=str(tmp_path / "saved"))(
        "a handwritten seven", guidance_scale=3.0, num_inference_steps=3, seed=0, progress_bar=False
    )["image"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(processor.postprocess_images(out.images)[0][0]))
    captioner = pipeline("image-text-to-text", model=str(tmp_path / "saved"))
    caption = captioner(images=load_digit_images(1)[0][0], text="<image>", max_new_tokens=4)
    assert isinstance(caption[0]["generated_text"], str)


def test_lora_on_either_path(tmp_path):
    _, model, processor = experts_from_llm(tmp_path)
    text = processor(text=["a handwritten seven"], return_tensors="pt")

    def outputs(m):
        with torch.no_grad():
            logits = m(**text).logits
            out = m.generate(
                **text,
                generation_mode="image",
                num_inference_steps=2,
                progress_bar=False,
                generator=torch.Generator().manual_seed(0),
                return_dict_in_generate=True,
            )
        return logits, out.image_latents[0][0]

    base_logits, base_image = outputs(model)
    for targets, changes_text in ((["q_proj", "v_proj"], True), (["image_q_proj", "image_v_proj"], False)):
        tuned = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
        wrapped = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in tuned.named_parameters() if "lora_A" in n}
        assert wrapped == set(targets)  # `q_proj` reaches the text modules only, `image_q_proj` the twins only
        logits, image = outputs(tuned)
        assert torch.equal(logits, base_logits) != changes_text
        # An image drawn after a text prompt reads the prompt through the text path, so a text LoRA changes it too;
        # an image LoRA changes images and leaves text alone.
        assert not torch.equal(image, base_image)
        merged = tuned.merge_and_unload()
        merged_logits, merged_image = outputs(merged)
        torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_image, image, atol=1e-4, rtol=1e-4)


def test_conversion_starts_each_expert_as_a_copy_of_its_text_module(tmp_path):
    from test_conversion import save_tiny_llm

    llm_dir = save_tiny_llm(tmp_path / "llm", "qwen2")
    for rank in (None, 2):
        out = tmp_path / f"converted-{rank}"
        report = convert_from_llm(
            llm_dir, out, image_size=8, num_channels=1, modality_experts=True, modality_experts_rank=rank
        )
        assert any("modality experts: 19 image experts" in note for note in report.notes)
        model = AutoModel.from_pretrained(out).eval()
        assert model.config.modality_experts and model.config.modality_experts_rank == rank
        for name, text, image in image_expert_pairs(model.model.language_model):
            if isinstance(image, TransfusionLowRankExpert):
                assert not image.weight_b.any(), name  # a zero delta
            else:
                assert all(torch.equal(a, b) for a, b in zip(text.state_dict().values(), image.state_dict().values()))
        for rows in (model.get_input_embeddings(), model.get_output_embeddings()):
            assert torch.equal(rows.image_tokens_weight, rows.weight[model.config.image_token_ids])
        assert any("text logits on a" in check for check in report.checks)  # the LLM's text, checked


def test_the_image_path_alone_applies_on_top_of_its_llm(tmp_path):
    _, model, processor = experts_from_llm(tmp_path, tie=True, rank=2)  # tied, as SmolLM2
    perturb_image_experts(model)
    model.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    report = extract_image_path(tmp_path / "full", tmp_path / "image-path")
    stored = safetensors.torch.load_file(tmp_path / "image-path" / IMAGE_PATH_WEIGHTS)
    assert stored and not set(stored) & set(text_path_names(model))
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert (tmp_path / "image-path" / IMAGE_PATH_WEIGHTS).stat().st_size < full_size / 3
    image_count, text_count = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) parameters", report.notes[0]))
    assert image_count + text_count == sum(p.numel() for p in model.parameters())  # tied weights counted once

    apply_image_path(tmp_path / "llm", tmp_path / "image-path", tmp_path / "applied")
    applied = AutoModel.from_pretrained(tmp_path / "applied").eval()
    batch = image_batch(processor)
    with torch.no_grad():
        # The image path went through bfloat16; the text path is the LLM's, exactly.
        torch.testing.assert_close(
            applied(**batch).diffusion_prediction, model(**batch).diffusion_prediction, atol=0.05, rtol=0.05
        )
        text = processor(text=["a handwritten seven"], return_tensors="pt")
        vocab = min(model.config.image_token_ids)
        assert torch.equal(applied(**text).logits[..., :vocab], model(**text).logits[..., :vocab])

    other = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other-llm")
    with pytest.raises(ValueError, match="is not the one the image path .* was trained on"):
        apply_image_path(tmp_path / "other-llm", tmp_path / "image-path", tmp_path / "refused")


def test_text_comparison_with_the_reference_llm(tmp_path):
    llm, model, processor = experts_from_llm(tmp_path)
    texts = ["a handwritten seven", "the number three written by hand", "what digit is this? it is a one."]
    same = compare_text(model, processor, llm, texts, prompts=("a handwritten", "the number"), max_new_tokens=5)
    assert same["identical_answers"] == 2 and same["perplexity"] == same["reference_perplexity"]
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(3.0)  # a fine-tune that drifted the text
    drifted = compare_text(model, processor, llm, texts, prompts=("a handwritten", "the number"), max_new_tokens=5)
    assert drifted["perplexity"] != drifted["reference_perplexity"]
    table = text_comparison_table(drifted)
    assert "| held-out perplexity (3 texts) |" in table and table.count("\n") == 5


def test_the_cli_puts_a_shipped_image_path_on_top_of_its_llm(tmp_path, monkeypatch):
    _, model, processor = experts_from_llm(tmp_path)
    perturb_image_experts(model)
    model.save_pretrained(tmp_path / "full")
    processor.save_pretrained(tmp_path / "full")
    extract_image_path(tmp_path / "full", tmp_path / "shipped", base_llm="smollm2")
    # The tiny LLM stands in for the SmolLM2 that `transfusion data install --only smollm2` puts in site-packages.
    monkeypatch.setattr(recipe_data, "smollm2_path", lambda: (tmp_path / "llm", None))
    loaded, _ = load_checkpoint(tmp_path / "shipped")
    text = processor(text=["a handwritten seven"], return_tensors="pt")
    vocab = min(model.config.image_token_ids)
    with torch.no_grad():
        assert torch.equal(loaded(**text).logits[..., :vocab], model(**text).logits[..., :vocab])
        batch = image_batch(processor)
        torch.testing.assert_close(
            loaded(**batch).diffusion_prediction, model(**batch).diffusion_prediction, atol=0.05, rtol=0.05
        )
    extract_image_path(tmp_path / "full", tmp_path / "anonymous")
    with pytest.raises(ValueError, match="saved without naming its LLM: put it on top of its LLM with"):
        load_checkpoint(tmp_path / "anonymous")
