"""What transformers' common model and generation tests expect of any model, checked the same way for Transfusion.

`TransfusionModelTester` builds the tiniest config and inputs that reach every code path (a 2-layer backbone, 8x8
grey images of 4 slots, prompts with and without an image), as the testers of transformers' own models do; the tests
below each take one expectation of `ModelTesterMixin` / `GenerationTesterMixin` and assert it with numbers.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaForCausalLM

import modeling_transfusion as mt
from modeling_transfusion.recipes.cli import DEFAULT_MODEL

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


def test_beam_search_is_refused_for_images_with_a_reason(model, tester):
    with pytest.raises(ValueError, match="runs in generation_mode='text' only"):
        model.generate(**tester.text_inputs(), generation_mode="image", num_beams=2, progress_bar=False)
    with pytest.raises(ValueError, match="pass image_guidance_scale=3"):
        model.generate(**tester.text_inputs(), generation_mode="image", guidance_scale=3)


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
