"""What transformers' common model and generation tests expect of any model, checked the same way for Transfusion.

`TransfusionModelTester` builds the tiniest config and inputs that reach every code path (a 2-layer backbone, 8x8
grey images of 4 slots, prompts with and without an image), as the testers of transformers' own models do; the tests
below each take one expectation of `ModelTesterMixin` / `GenerationTesterMixin` and assert it with numbers.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

import modeling_transfusion as mt
from modeling_transfusion.recipes.cli import DEFAULT_MODEL

from test_distributed import free_port
from test_generation import OpenImageAt, RecordingStreamer, processors

BOI, EOI, IMAGE = 61, 62, 63


class TransfusionModelTester:
    """Tiny configs and inputs: text-only rows, and rows with one image (`<boi>`, 4 slots, `<eoi>`)."""

    batch_size, seq_length, vocab_size = 2, 10, 64

    def __init__(self, backbone: str = "llama", tie_word_embeddings: bool = False, **overrides):
        self.backbone, self.tie_word_embeddings, self.overrides = backbone, tie_word_embeddings, overrides

    def get_config(self) -> mt.TransfusionConfig:
        text_config = {
            "model_type": self.backbone,
            "vocab_size": self.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        return mt.TransfusionConfig(
            text_config=text_config,
            image_size=8,
            num_channels=1,
            patch_size=4,
            boi_token_id=BOI,
            eoi_token_id=EOI,
            image_token_id=IMAGE,
            **self.overrides,
        )

    def get_model(self, seed: int = 0, **config_overrides) -> mt.TransfusionForConditionalGeneration:
        torch.manual_seed(seed)
        config = self.get_config()
        for name, value in config_overrides.items():
            setattr(config, name, value)
        model = mt.TransfusionForConditionalGeneration(config).eval()
        torch.nn.init.normal_(model.model.patch_decoder.proj.weight, std=0.2)  # the DiT init is zero
        return model

    def text_inputs(self) -> dict:
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(3, 60, (self.batch_size, self.seq_length), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def image_inputs(self) -> dict:
        """Each row: 3 text tokens, an image, 2 text tokens."""
        row = [5, 6, 7, BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI, 8]
        input_ids = torch.tensor([row, [9, *row[1:]]])
        pixel_values = torch.rand(self.batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}

    # What `GenerationTesterMixin` does for every generative model

    max_new_tokens = 3  # fewer than an image needs (<boi>, 4 slots, <eoi>): no image opens

    def get_generation_model(self, seed: int = 0) -> mt.TransfusionForConditionalGeneration:
        """As `prepare_config_and_inputs_for_generate`: no end-of-sequence id (lengths stay exact), the pad id set to
        the former EOS id, and eager attention, which returns attention weights."""
        model = self.get_model(seed)
        model.set_attn_implementation("eager")
        model.generation_config.pad_token_id = model.config.text_config.eos_token_id
        model.generation_config.eos_token_id = None
        return model

    @staticmethod
    def logits_processor_kwargs(do_sample: bool = False) -> dict:
        """`_get_logits_processor_kwargs`, the `<image>` id banned as transformers bans a VLM's image token."""
        kwargs = {"bad_words_ids": [[1, 0], [IMAGE]], "repetition_penalty": 1.2, "remove_invalid_values": True}
        if do_sample:
            kwargs.update(top_k=10, top_p=0.7, temperature=0.7)
        return kwargs

    def check_generate_outputs(self, output, config, use_cache=False, num_return_sequences=1, num_beams=1):
        """`_check_generate_outputs`: one score and logit tensor per new token, per-step attentions and hidden states
        (the whole sequence at each step without a cache, the new token with one), and the cache's shape."""
        text_config = config.text_config
        internal_batch = output.sequences.shape[0] // num_return_sequences * max(num_beams, num_return_sequences)
        generated = output.sequences.shape[1] - self.seq_length
        assert isinstance(output.scores, tuple) and len(output.scores) == generated
        assert all(s.shape == (internal_batch, text_config.vocab_size) for s in output.scores)
        assert isinstance(output.logits, tuple) and all(
            s.shape == (internal_batch, text_config.vocab_size) for s in output.logits
        )
        head_dim = text_config.hidden_size // text_config.num_attention_heads
        for step, (attentions, hidden_states) in enumerate(zip(output.attentions, output.hidden_states, strict=True)):
            inputs = 1 if use_cache and step else self.seq_length + step
            shape = (internal_batch, text_config.num_attention_heads, inputs, self.seq_length + step)
            assert [a.shape for a in attentions] == [shape] * text_config.num_hidden_layers
            shape = (internal_batch, inputs, text_config.hidden_size)
            assert [h.shape for h in hidden_states] == [shape] * (text_config.num_hidden_layers + 1)
        assert len(output.attentions) == generated
        if not use_cache:
            assert output.cache is None
            return
        shape = (internal_batch, text_config.num_key_value_heads, output.sequences.shape[1] - 1, head_dim)
        assert isinstance(output.cache, Cache)
        assert [(layer.keys.shape, layer.values.shape) for layer in output.cache.layers] == [(shape, shape)] * 2


def assert_same_generate_outputs(output, reference):
    """Two `generate` outputs are the same: sequences, scores, logits, attentions, hidden states and cache."""
    assert isinstance(output, type(reference))
    assert torch.equal(output.sequences, reference.sequences)
    for name in ("scores", "logits", "sequences_scores", "beam_indices"):
        if name in reference:
            torch.testing.assert_close(output[name], reference[name], rtol=0, atol=0)
    for name in ("attentions", "hidden_states"):
        torch.testing.assert_close(output[name], reference[name], rtol=0, atol=0)
    if reference.cache is None:
        assert output.cache is None
        return
    for layer, reference_layer in zip(output.cache.layers, reference.cache.layers, strict=True):
        torch.testing.assert_close((layer.keys, layer.values), (reference_layer.keys, reference_layer.values))


@pytest.fixture(scope="module")
def tester():
    return TransfusionModelTester()


@pytest.fixture(scope="module")
def model(tester):
    return tester.get_model()


def test_default_config_is_valid_and_auto_config_builds_it():
    config = AutoConfig.for_model("transfusion")
    assert isinstance(config, mt.TransfusionConfig) and config.text_config.model_type == "llama"
    assert config.latent_channels == config.num_channels == 3 and config.num_image_tokens == 256


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_tied_and_untied_backbones_build_save_and_reload(backbone, tied, tmp_path):
    model = TransfusionModelTester(backbone, tie_word_embeddings=tied).get_model()
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) is tied
    inputs = TransfusionModelTester().image_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_base_model_is_the_headless_transfusion_model(model, tmp_path):
    assert type(model.base_model) is mt.TransfusionModel and model.base_model is model.model
    assert type(model.get_decoder()).__name__ == "LlamaModel"
    model.base_model.save_pretrained(tmp_path)
    headless = AutoConfig.from_pretrained(tmp_path)
    assert headless.model_type == "transfusion"
    loaded = mt.TransfusionModel.from_pretrained(tmp_path).eval()
    inputs = TransfusionModelTester().image_inputs()
    with torch.no_grad():
        assert torch.equal(model.model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)


def test_extra_config_attributes_survive_save_and_load(tester, tmp_path):
    model = tester.get_model(my_experiment="lr-sweep-3")
    model.config.text_config.rms_norm_eps = 1e-5
    model.save_pretrained(tmp_path)
    reloaded = mt.TransfusionConfig.from_pretrained(tmp_path)
    assert reloaded.my_experiment == "lr-sweep-3" and reloaded.text_config.rms_norm_eps == 1e-5


def test_inputs_embeds_equal_input_ids_with_and_without_images(model, tester):
    for inputs in (tester.text_inputs(), tester.image_inputs()):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = {key: value for key, value in inputs.items() if key != "input_ids"}
        with torch.no_grad():
            expected = model(**inputs).logits
            actual = model(inputs_embeds=embeds, **from_embeds).logits
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_generate_from_inputs_embeds_matches_input_ids_in_every_mode(model, tester):
    inputs = tester.text_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    text = model.generate(**inputs, generation_mode="text", max_new_tokens=4, do_sample=False)
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], generation_mode="text", max_new_tokens=4
    )
    assert torch.equal(from_embeds, text[:, inputs["input_ids"].shape[1] :])
    image = model.generate(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        generation_mode="image",
        num_inference_steps=2,
        progress_bar=False,
        return_dict_in_generate=True,
    )
    assert [len(row) for row in image.images] == [1, 1]
    assert image.sequences[0].tolist() == [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI]


def test_resize_token_embeddings_keeps_the_image_tokens_usable(tester):
    model = tester.get_model()
    inputs = tester.image_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    model.resize_token_embeddings(80)
    assert model.config.text_config.vocab_size == 80 and model.lm_head.weight.shape[0] == 80
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after[..., :64], before, atol=1e-6, rtol=1e-6)  # old rows untouched
    grown = torch.cat([inputs["input_ids"], torch.tensor([[79], [78]])], dim=-1)
    out = model(input_ids=grown, pixel_values=inputs["pixel_values"], labels=grown)
    assert torch.isfinite(out.loss)


def test_beam_search_and_no_cache_in_text_mode_equal_the_greedy_reference(model, tester):
    inputs = tester.image_inputs()
    greedy = model.generate(**inputs, generation_mode="text", max_new_tokens=5, do_sample=False)
    uncached = model.generate(**inputs, generation_mode="text", max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(greedy, uncached)
    one_beam = model.generate(**inputs, generation_mode="text", max_new_tokens=5, num_beams=1)
    assert torch.equal(one_beam, greedy)
    beams = model.generate(
        **inputs,
        generation_mode="text",
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=3,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert beams.sequences.shape == (6, inputs["input_ids"].shape[1] + 5)
    assert not torch.isin(beams.sequences[:, inputs["input_ids"].shape[1] :], torch.tensor([BOI, EOI, IMAGE])).any()
    # The best beam's score is the sum of its token log-probabilities under a full, uncached forward.
    best = beams.sequences[0:1]
    with torch.no_grad():
        logits = model(input_ids=best, pixel_values=inputs["pixel_values"][:1]).logits[0, :-1].log_softmax(-1)
    new = range(inputs["input_ids"].shape[1] - 1, best.shape[1] - 1)
    log_prob = sum(logits[position, best[0, position + 1]] for position in new)
    torch.testing.assert_close(beams.sequences_scores[0], log_prob / 5, atol=1e-4, rtol=1e-4)


def test_image_mode_refuses_what_decodes_text_with_a_reason(model, tester):
    # Image mode opens its image right after the prompt: there is no text to search over or to draft.
    inputs = tester.text_inputs()
    with pytest.raises(ValueError, match="decodes no text, so beam search has nothing to do"):
        model.generate(**inputs, generation_mode="image", num_beams=2, progress_bar=False)
    one_row = {key: value[:1] for key, value in inputs.items()}
    with pytest.raises(ValueError, match="decodes no text, so assisted generation has nothing to do"):
        model.generate(**one_row, generation_mode="image", prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="pass image_guidance_scale=3"):
        model.generate(**inputs, generation_mode="image", guidance_scale=3)
    for mode in ("image", "interleaved"):  # each row opens its images on its own
        with pytest.raises(ValueError, match="cannot keep processes in step"):
            model.generate(**inputs, generation_mode=mode, synced_gpus=True)


def test_image_mode_without_a_cache(model, tester):
    """use_cache=False in image mode: the image is denoised as always (against a cache built for it), and no cache
    is returned."""
    settings = {"generation_mode": "image", "num_inference_steps": 2, "progress_bar": False}
    outputs = [
        model.generate(
            **tester.text_inputs(),
            use_cache=use_cache,
            return_dict_in_generate=True,
            generator=torch.Generator().manual_seed(0),
            **settings,
        )
        for use_cache in (True, False)
    ]
    assert outputs[1].cache is None and outputs[0].cache is not None
    assert torch.equal(outputs[1].sequences, outputs[0].sequences)
    torch.testing.assert_close(outputs[1].image_latents, outputs[0].image_latents, rtol=0, atol=0)


def test_shift_labels_give_the_same_loss_as_labels(model, tester):
    inputs = tester.image_inputs()
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        reference = model(**inputs, labels=labels, image_timesteps=torch.tensor([0, 0]))
        shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        shifted = model(**inputs, shift_labels=shift_labels, image_timesteps=torch.tensor([0, 0]))
    torch.testing.assert_close(shifted.lm_loss, reference.lm_loss, atol=1e-6, rtol=1e-6)
    # A shard's last position keeps its target (sequence parallelism), which labels of the shard alone cannot give.
    shard = {key: value[:, :3] for key, value in inputs.items() if key != "pixel_values"}
    with torch.no_grad():
        logits = model(**shard).logits
        last_target = model(**shard, shift_labels=torch.tensor([[-100, -100, 20], [-100, -100, 20]])).loss
    expected = torch.nn.functional.cross_entropy(logits[:, 2].float(), torch.full((2,), 20))
    torch.testing.assert_close(last_target, expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    inputs = tester.image_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tester.get_model().train()
        model.config.condition_dropout_prob = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        torch.manual_seed(3)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_eager_and_sdpa_agree(tester):
    inputs = tester.image_inputs()
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = tester.get_model()
        model.set_attn_implementation(implementation)
        assert model.config.text_config._attn_implementation == implementation
        with torch.no_grad():
            outputs.append(model(**inputs, image_timesteps=torch.tensor([300, 700])))
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, atol=1e-5, rtol=1e-5)


def test_a_plain_llm_and_a_pre_composition_checkpoint_load_without_a_step(tmp_path):
    tester = TransfusionModelTester()
    config = tester.get_config()
    llm = LlamaForCausalLM(config.text_config).eval()
    llm.save_pretrained(tmp_path / "llm")
    model = mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path / "llm", config=config).eval()
    ids = tester.text_inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, llm(input_ids=ids).logits)
    # The first bundled checkpoint was written before the composition (`model.layers.*`, `patch_encoder.*`, `vae.*`).
    bundled, info = AutoModel.from_pretrained(DEFAULT_MODEL.parent / "transfusion-mnist", output_loading_info=True)
    assert not any(info.values()), info
    assert type(bundled.model.language_model).__name__ == "LlamaModel" and bundled.vae is not None


# get_image_features: the image encoder, as every transformers VLM exposes it


@pytest.mark.parametrize("return_dict", [True, False, None])
def test_get_image_features_output(tester, return_dict):
    config = tester.get_config()
    if return_dict is not None:
        config.return_dict = return_dict
    model = mt.TransfusionForConditionalGeneration(config).eval()
    pixel_values = tester.image_inputs()["pixel_values"]
    with torch.no_grad():
        outputs = model.get_image_features(pixel_values=pixel_values)
    if return_dict is False:
        assert isinstance(outputs, tuple)
        return
    assert isinstance(outputs, ModelOutput) and isinstance(outputs, BaseModelOutputWithPooling)
    assert all(hasattr(outputs, name) for name in ("last_hidden_state", "pooler_output", "hidden_states"))
    assert outputs.last_hidden_state.shape[0] == pixel_values.shape[0]
    assert outputs.last_hidden_state.shape[-1] == config.text_config.hidden_size
    assert outputs.pooler_output.shape == (pixel_values.shape[0], config.text_config.hidden_size)


@pytest.mark.parametrize("patch_encoder, levels", [("linear", 2), ("unet", 4)])
def test_get_image_features_hidden_states(patch_encoder, levels):
    overrides = {"patch_encoder": patch_encoder}
    if patch_encoder == "unet":
        overrides["unet_block_out_channels"] = [8, 16, 16]  # patch size 4: two halvings, then a last level
    tester = TransfusionModelTester(**overrides)
    model = tester.get_model()
    inputs = tester.image_inputs()
    with torch.no_grad():
        outputs = model.get_image_features(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        forward = model(**inputs, output_hidden_states=True)
        latents = model.encode_images(inputs["pixel_values"])
        slot_embeddings, _ = model.model.embed_latents(latents, torch.zeros(2, dtype=torch.long))
    # The patch encoder's states (the input level included), one row per image; no encoder has attention weights.
    assert len(outputs.hidden_states) == levels and outputs.attentions is None
    assert all(state.shape[0] == 2 for state in outputs.hidden_states)
    # The clean images' embeddings as they enter the backbone (its input hidden state at the slots), one vector each.
    slots = inputs["input_ids"] == IMAGE
    torch.testing.assert_close(outputs.last_hidden_state, forward.hidden_states[0][slots].view(2, 4, -1))
    torch.testing.assert_close(outputs.last_hidden_state, slot_embeddings)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(1))


def test_get_image_features_of_several_sizes():
    model = TransfusionModelTester(max_image_size=16).get_model()
    images = [torch.rand(1, 8, 16) * 2 - 1, torch.rand(1, 8, 8) * 2 - 1]
    padded = torch.zeros(2, 1, 8, 16)
    padded[0], padded[1, :, :, :8] = images
    with torch.no_grad():
        outputs = model.get_image_features(pixel_values=padded, image_sizes=torch.tensor([[8, 16], [8, 8]]))
        alone = [model.get_image_features(pixel_values=image[None]) for image in images]
    # Each image as it is alone; the smaller one (4 slots of 8) padded with zeros.
    assert outputs.last_hidden_state.shape == (2, 8, 32)
    torch.testing.assert_close(outputs.last_hidden_state[0], alone[0].last_hidden_state[0])
    torch.testing.assert_close(outputs.last_hidden_state[1, :4], alone[1].last_hidden_state[0])
    assert not outputs.last_hidden_state[1, 4:].any()
    torch.testing.assert_close(outputs.pooler_output[1], alone[1].pooler_output[0])


# Generation: every GenerationMixin feature in the default (interleaved) mode, with transformers' own results


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("greedy", {"do_sample": False, "num_beams": 1}),
        ("sample", {"do_sample": True, "num_beams": 1, "num_return_sequences": 2}),
        ("beam search", {"do_sample": False, "num_beams": 2, "early_stopping": False, "length_penalty": 2.0}),
        ("beam sample", {"do_sample": True, "num_beams": 2, "early_stopping": False, "length_penalty": 2.0}),
    ],
)
def test_default_mode_generate_dict_outputs_equal_text_mode(tester, method, kwargs, use_cache):
    """test_greedy/sample/beam_search/beam_sample_generate_dict_output(s_use_cache): the default mode gives what text
    mode (transformers' decoding) gives, wherever no image opens."""
    model = tester.get_generation_model()
    do_sample = kwargs["do_sample"]
    settings = {
        "max_new_tokens": tester.max_new_tokens,
        "output_scores": True,
        "output_logits": True,
        "output_hidden_states": True,
        "output_attentions": True,
        "return_dict_in_generate": True,
        "use_cache": use_cache,
        **tester.logits_processor_kwargs(do_sample),
        **kwargs,
    }
    outputs = {}
    for mode in ("text", None):
        torch.manual_seed(0)
        outputs[mode] = model.generate(**tester.image_inputs(), generation_mode=mode, **settings)
    output = outputs[None]
    beams = kwargs["num_beams"] > 1
    assert isinstance(output, GenerateBeamDecoderOnlyOutput if beams else GenerateDecoderOnlyOutput)
    assert isinstance(output, mt.TransfusionGenerateBeamOutput if beams else mt.TransfusionGenerateOutput)
    assert output.images == [[]] * output.sequences.shape[0]
    assert output.sequences.shape[-1] == tester.max_new_tokens + tester.seq_length
    num_return_sequences = kwargs.get("num_return_sequences", 1)
    tester.check_generate_outputs(output, model.config, use_cache, num_return_sequences, kwargs["num_beams"])
    assert_same_generate_outputs(output, outputs["text"])


@pytest.mark.parametrize("assistant", ["random", "same", "prompt lookup"])
def test_assisted_decoding_matches_greedy_search(tester, assistant):
    """test_assisted_decoding_matches_greedy_search / test_prompt_lookup_decoding_matches_greedy_search, in the
    default mode: an assistant drafting two tokens, all or none accepted, or prompt lookup, gives greedy search's
    output (the scores of verified drafts may differ in the last bits, as in transformers)."""
    model = tester.get_generation_model()
    inputs = {key: value[:1] for key, value in tester.image_inputs().items()}
    settings = {
        "eos_token_id": -1,
        "max_new_tokens": 4,
        "num_beams": 1,
        "do_sample": False,
        "output_scores": True,
        "output_logits": True,
        "output_hidden_states": True,
        "output_attentions": True,
        "return_dict_in_generate": True,
        "use_cache": True,
        **tester.logits_processor_kwargs(),
    }
    greedy = model.generate(**inputs, **settings)
    if assistant == "prompt lookup":
        assisted = model.generate(**inputs, **settings, prompt_lookup_num_tokens=2)
    else:
        helper = tester.get_generation_model(seed=1) if assistant == "random" else model
        helper.generation_config.num_assistant_tokens = 2
        helper.generation_config.num_assistant_tokens_schedule = "constant"
        assisted = model.generate(**inputs, **settings, assistant_model=helper)
    assert torch.equal(assisted.sequences, greedy.sequences)
    for output in (greedy, assisted):
        assert isinstance(output, mt.TransfusionGenerateOutput) and output.images == [[]]
        assert len(output.scores) == len(output.logits) == len(output.hidden_states) == 4
        assert output.cache.get_seq_length() == output.sequences.shape[1] - 1
    tester.check_generate_outputs(greedy, model.config, use_cache=True)


def test_assisted_decoding_sample(tester):
    model = tester.get_generation_model()
    model.generation_config.num_assistant_tokens = 2
    model.generation_config.num_assistant_tokens_schedule = "constant"
    inputs = {key: value[:1] for key, value in tester.image_inputs().items()}
    torch.manual_seed(0)
    output = model.generate(
        **inputs,
        eos_token_id=-1,
        max_new_tokens=4,
        do_sample=True,
        assistant_model=model,
        output_scores=True,
        return_dict_in_generate=True,
        **tester.logits_processor_kwargs(do_sample=True),
    )
    assert output.sequences.shape == (1, tester.seq_length + 4) and len(output.scores) == 4
    assert not torch.isin(output.sequences[:, tester.seq_length :], torch.tensor([BOI, EOI, IMAGE])).any()


@pytest.mark.parametrize("mode", ["text", "interleaved"])
def test_generate_continue_from_past_key_values(tester, mode):
    """Generating 3 tokens, then 1 from the returned cache, gives the 4 tokens and the cache of one call."""
    model = tester.get_model()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = -1
    inputs = tester.image_inputs()
    settings = {"do_sample": False, "return_dict_in_generate": True, "generation_mode": mode}
    outputs = model.generate(**inputs, max_new_tokens=4, **settings)
    cached = model.generate(**inputs, max_new_tokens=3, **settings)
    length = cached.sequences.shape[1]
    continued = model.generate(
        input_ids=cached.sequences,
        attention_mask=torch.nn.functional.pad(inputs["attention_mask"], (0, length - tester.seq_length), value=1),
        pixel_values=inputs["pixel_values"],  # already in the cache: the continuation does not read them again
        cache=cached.cache,
        max_new_tokens=1,
        **settings,
    )
    assert continued.sequences.tolist() == outputs.sequences.tolist()
    for layer, reference in zip(continued.cache.layers, outputs.cache.layers, strict=True):
        torch.testing.assert_close((layer.keys, layer.values), (reference.keys, reference.values))


def test_image_mode_continues_from_past_key_values(tester):
    """An image generated from a returned cache is the image generated from the whole sequence without one."""
    model = tester.get_model()
    inputs = tester.image_inputs()
    text = model.generate(**inputs, generation_mode="text", max_new_tokens=2, return_dict_in_generate=True)
    mask = torch.nn.functional.pad(inputs["attention_mask"], (0, 2), value=1)
    settings = {"generation_mode": "image", "num_inference_steps": 2, "progress_bar": False}
    outputs = [
        model.generate(
            input_ids=text.sequences,
            attention_mask=mask,
            return_dict_in_generate=True,
            generator=torch.Generator().manual_seed(0),
            **settings,
            **previous,
        )
        for previous in ({"cache": text.cache}, {"pixel_values": inputs["pixel_values"]})
    ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].sequences[0, -6:].tolist() == [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI]
    for row in range(2):
        torch.testing.assert_close(outputs[0].image_latents[row][0], outputs[1].image_latents[row][0])
    assert outputs[0].cache.get_seq_length() == outputs[0].sequences.shape[1] - 1


@pytest.mark.parametrize(
    "feature, kwargs",
    [
        ("beam search", {"num_beams": 2}),
        ("no cache", {"use_cache": False}),
        ("prompt lookup", {"prompt_lookup_num_tokens": 2}),
        ("assistant", {"assistant_model": "self"}),
    ],
)
def test_an_image_under_a_feature_that_cannot_carry_it_ends_generation(tester, feature, kwargs):
    """Beams, assistants and uncached decoding decode text with transformers' own method, in which <boi> ends a
    sequence; the image of each sequence that ended so is written, and generation ends with its <eoi>."""
    model = tester.get_model()
    inputs = tester.image_inputs()
    if feature in ("prompt lookup", "assistant"):
        inputs = {key: value[:1] for key, value in inputs.items()}  # transformers' assisted decoding: one row
    if kwargs.get("assistant_model") == "self":
        kwargs = {"assistant_model": model}
    streamer = RecordingStreamer() if inputs["input_ids"].shape[0] == 1 else None  # streamers take one prompt
    output = model.generate(
        **inputs,
        max_new_tokens=12,
        logits_processor=processors(OpenImageAt({12})),  # <boi> after two new tokens
        num_inference_steps=2,
        progress_bar=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        streamer=streamer,
        **kwargs,
    )
    rows = inputs["input_ids"].shape[0]
    new = output.sequences[:, tester.seq_length :]
    assert new.shape == (rows, 2 + 6) and (new[:, 2:] == torch.tensor([BOI] + [IMAGE] * 4 + [EOI])).all()
    if streamer is not None:  # the text as transformers streams it, then the image as one event, then the end
        assert streamer.ended and streamer.events[-1] == [IMAGE] * 4 + [EOI]
        assert sum(streamer.events[1:], []) == new[0].tolist()
    assert [len(images) for images in output.images] == [1] * rows and output.images[0][0].shape == (1, 8, 8)
    assert len(output.scores) == 3  # the text steps, <boi> included; image slots are not sampled
    if feature == "no cache":
        assert output.cache is None
        return
    # The returned cache holds all but the last token (<eoi>): continuing from it gives the uncached forward's logits.
    generated = torch.stack([images[0] for images in output.image_latents])
    prompt_images = model.encode_images(inputs["pixel_values"])
    latents = torch.stack([prompt_images, generated], dim=1).flatten(0, 1)  # per row: the prompt's, then the new one
    with torch.no_grad():
        full = model(input_ids=output.sequences, image_latents=latents).logits[:, -1]
        step = model(input_ids=output.sequences[:, -1:], cache=output.cache).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


# Special token ids as transformers takes them


@pytest.mark.parametrize("mode", ["text", "interleaved", "image"])
def test_negative_pad_and_eos_ids_disable_stopping(tester, mode):
    """transformers' own tests pass pad_token_id=eos_token_id=-1 so that generation never stops."""
    model = tester.get_model()
    length = 6 if mode == "image" else 5
    output = model.generate(
        **tester.text_inputs(),
        generation_mode=mode,
        pad_token_id=-1,
        eos_token_id=-1,
        max_new_tokens=length,
        num_inference_steps=2,
        progress_bar=False,
    )
    assert output.shape == (2, tester.seq_length + length) and (output >= 0).all()


def test_a_missing_pad_id_falls_back_to_the_eos_id(tester):
    """As transformers pads finished rows with the first EOS id when no pad id is set, so does the default mode."""
    model = tester.get_model()
    inputs = tester.text_inputs()
    free = model.generate(**inputs, max_new_tokens=4, generation_mode="text", pad_token_id=-1, eos_token_id=-1)
    stop = int(free[0, tester.seq_length])  # row 0 ends at its first new token
    assert stop not in free[1, tester.seq_length :].tolist()
    settings = {"max_new_tokens": 4, "eos_token_id": [stop, 60], "pad_token_id": None}
    outputs = [model.generate(**inputs, generation_mode=mode, **settings) for mode in ("text", "interleaved")]
    assert outputs[1].tolist() == outputs[0].tolist()
    assert outputs[1][0, tester.seq_length :].tolist() == [stop] * 4  # padded with the first EOS id


# generate(inputs_embeds=...)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam search"])
def test_generate_from_inputs_embeds(tester, num_beams):
    """test_generate_from_inputs_embeds, in the default mode: the embeddings of the prompt's ids give the ids' output,
    random embeddings give other scores at every step, and without ids the same new tokens."""
    model = tester.get_generation_model()
    for inputs in (tester.text_inputs(), tester.image_inputs()):
        input_ids = inputs.pop("input_ids")
        settings = {
            "return_dict_in_generate": True,
            "output_scores": True,
            "num_beams": num_beams,
            "do_sample": False,
            "max_new_tokens": 5,
            "min_new_tokens": 5,
        }
        from_ids = model.generate(input_ids, **settings, **inputs)
        assert from_ids.sequences.shape == (2, tester.seq_length + 5)
        inputs_embeds = model.get_input_embeddings()(input_ids)
        from_embeds = model.generate(input_ids, inputs_embeds=inputs_embeds, **settings, **inputs)
        assert torch.equal(from_embeds.sequences, from_ids.sequences)
        # Random embeddings hold no <image> placeholder: the images go, as transformers' test pops them for VLMs.
        text_only = {key: value for key, value in inputs.items() if key != "pixel_values"}
        random_embeds = torch.rand_like(inputs_embeds)
        from_random = model.generate(input_ids, inputs_embeds=random_embeds, **settings, **text_only)
        for scores, random_scores in zip(from_embeds.scores, from_random.scores, strict=True):
            assert not torch.allclose(scores, random_scores)
        without_ids = model.generate(inputs_embeds=inputs_embeds, **settings, **inputs)
        assert torch.equal(without_ids.sequences, from_embeds.sequences[:, tester.seq_length :])


# Tensor parallelism


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp_plan_shards_tied_weights_together(tied):
    """Every rule of the tensor-parallel plan names modules of the model, and the LM head and the input embedding
    are sharded alike (along the vocabulary, as transformers' causal LMs shard them), so tied weights stay one
    tensor."""
    model = TransfusionModelTester(tie_word_embeddings=tied).get_model()
    plan = model.tp_plan
    names = [name for name, _ in model.named_modules()]
    for rule in plan:
        pattern = re.compile(re.escape(rule).replace(r"\*", r"\d+") + "$")
        assert any(pattern.match(name) for name in names), rule
    embedding = "model.language_model.embed_tokens"
    reference = LlamaForCausalLM(model.config.text_config).tp_plan
    assert (plan["lm_head"], plan[embedding]) == (reference["lm_head"], reference["model.embed_tokens"])
    assert bool(model.all_tied_weights_keys) is tied
    for target, source in model.all_tied_weights_keys.items():
        modules = [name.rsplit(".", 1)[0] for name in (target, source)]
        assert (modules[0] in plan) == (modules[1] in plan), modules


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tensor_parallel_forward_on_two_processes(tied, tmp_path):
    """transformers' tensor parallelism (`tp_plan="auto"`, 2 CPU processes): the head and the embedding are sharded
    alike along the vocabulary, tied weights stay one tensor, and the logits are the whole model's."""
    TransfusionModelTester(tie_word_embeddings=tied).get_model().save_pretrained(tmp_path / "model")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(Path(__file__).with_name("tensor_parallel_forward.py")), str(tmp_path / "model"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["placements"] == ["(Shard(dim=0),)"] * 2
        assert report["local_rows"] == [TransfusionModelTester.vocab_size // 2] * 2
        assert report["tied"] is tied
        assert report["logits_max_difference"] < 1e-5
