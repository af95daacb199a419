"""Tests of the recipes: data loaders and captions, the latent collator, the judge and its Frechet distance, the
evaluation metrics on small data, and the figures."""

import random
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_transfusion import TransfusionImageProcessor, TransfusionProcessor
from modeling_transfusion.recipes import data
from modeling_transfusion.recipes.classifier import JudgeCNN, frechet_distance, predict, train_classifier
from modeling_transfusion.recipes.cli import DEFAULT_JUDGE, DEFAULT_MODEL, load_checkpoint
from modeling_transfusion.recipes.evaluation import (
    balanced_composition_prompts,
    balanced_prompts,
    caption_images,
    composition_accuracy,
    evaluate,
    evaluate_compositions,
    generate_images,
    generated_image_metrics,
    prompt_reliance,
    split_composition,
    text_perplexity,
)
from modeling_transfusion.recipes.figures import image_grid, plot_training_curves
from modeling_transfusion.recipes.training import (
    LatentCaptionDataset,
    LatentDataCollator,
    ModelSize,
    build_model,
    build_tokenizer,
)
from modeling_transfusion.recipes.vae import build_vae, encode_latents, reconstruction_mse


def _installed(loader, *args):
    # The README's test command installs the data (`transfusion data install`); missing data is a failure, not a skip.
    try:
        return loader(*args)
    except data.DataNotInstalledError as error:
        pytest.fail(str(error))


# Data


def test_mnist_loader_gives_the_real_splits():
    images, labels = _installed(data.load_mnist, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert images.max() >= 250 and images[:, 0, :].max() == 0  # white digits on a black border
    padded = data.pad_images(images[:3], 32)
    assert padded.shape == (3, 32, 32) and (padded[:, 2:30, 2:30] == images[:3]).all()


def test_fashion_mnist_loader_reads_the_debian_idx_files():
    images, labels = _installed(data.load_fashion_mnist, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(data.DataNotInstalledError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(data.DataNotInstalledError, match="npm pack emoji-datasource-google@16.0.0"):
        data.load_emoji(cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown MNIST split"):
        data.load_mnist("dev")


def test_emoji_loader_gives_named_pictures():
    images, names = _installed(data.load_emoji, 16)
    assert images.shape == (len(names), 16, 16, 3) and len(names) > 1800
    assert "red apple" in names and all(name == name.lower() for name in names)


def test_pad_images_resizes_larger_images():
    rgb = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    assert data.pad_images(rgb, 32).shape == (2, 32, 32, 3)
    tensor = data.to_model_range(rgb)
    assert tensor.shape == (2, 3, 64, 64) and tensor.min() == -1.0


def test_captions_go_both_ways_and_parse_back():
    rng = random.Random(0)
    texts = [data.make_record_text("mnist", 7, rng) for _ in range(300)]
    generation = [t for t in texts if t.endswith(" <image>")]
    captioning = [t for t in texts if t.startswith("<image>")]
    text_only = [t for t in texts if "<image>" not in t]
    assert generation and captioning and text_only
    assert len({t for t in generation}) >= 4  # several phrasings per class
    for text in texts:
        assert data.parse_class(text.replace("<image>", ""), "mnist") == 7
    assert data.parse_class("a photo of a pair of trousers", "fashion_mnist") == 1
    assert data.parse_class("a t-shirt", "fashion_mnist") == 0
    assert data.parse_class("nothing to see", "mnist") is None
    assert data.generation_prompt("mnist", 3) == "a handwritten digit three"
    with pytest.raises(ValueError, match="sum to 1"):
        data.CaptionMix(0.5, 0.5, 0.5)


def test_captions_agree_their_articles():
    corpus = " | ".join(
        [*data.caption_corpus("mnist"), *data.caption_corpus("fashion_mnist"), *data.composition_corpus()]
    )
    for wrong in ("a eight", "a ankle boot", "a 8 ", "an one", "an seven"):
        assert wrong not in corpus, wrong
    for right in ("an eight, written in white ink", "a product image of an ankle boot", "a one", "to the left of an 8"):
        assert right in corpus, right
    # Any name a user brings, such as the emoji's: the template's article follows it.
    emoji = ["eagle", "owl", "unicorn", "umbrella", "one-piece swimsuit", "hourglass done", "8 ball", "red apple"]
    assert [data.fill_template("a {name}", name=name).split(" ")[0] for name in emoji] == [
        "an", "an", "a", "an", "a", "an", "an", "a"]  # fmt: skip


# Compositions of two digits


@pytest.fixture(scope="module")
def test_digits():
    images, labels = _installed(data.load_dataset_images, "mnist", "test", 32)
    return images, np.asarray(labels)


def test_compose_digits_puts_each_digit_in_its_half(test_digits):
    digits, _ = test_digits
    first, second = digits[:4], digits[4:8]
    side = data.compose_digits(first, second, "side_by_side")
    assert side.shape == (4, *data.COMPOSITION_LAYOUTS["side_by_side"]) == (4, 32, 64) and side.dtype == np.uint8
    assert (side[:, :, :32] == first).all() and (side[:, :, 32:] == second).all()
    stacked = data.compose_digits(first, second, "stacked")
    assert stacked.shape == (4, *data.COMPOSITION_LAYOUTS["stacked"]) == (4, 64, 32)
    assert (stacked[:, :32] == first).all() and (stacked[:, 32:] == second).all()
    with pytest.raises(ValueError, match="Unknown layout 'diagonal'"):
        data.compose_digits(first, second, "diagonal")
    with pytest.raises(ValueError, match=r"two \(n, 32, 32\) batches"):
        data.compose_digits(first, second[:, :28], "stacked")


def test_make_compositions_is_deterministic_and_keeps_the_labels(test_digits):
    digits, labels = test_digits
    images, pairs = data.make_compositions(digits, labels, "stacked", 60, seed=3)
    again, same_pairs = data.make_compositions(digits, labels, "stacked", 60, seed=3)
    _, other_pairs = data.make_compositions(digits, labels, "stacked", 60, seed=4)
    assert images.shape == (60, 64, 32) and images.dtype == np.uint8
    assert pairs.shape == (60, 2) and pairs.dtype == np.int64 and len(set(map(tuple, pairs.tolist()))) > 30
    assert np.array_equal(images, again) and np.array_equal(pairs, same_pairs)
    assert not np.array_equal(pairs, other_pairs)
    labels_of = {}
    for digit, label in zip(digits, labels):
        labels_of.setdefault(digit.tobytes(), set()).add(int(label))
    for image, (first, second) in zip(images, pairs.tolist()):  # each half is a test digit of its pair's label
        assert first in labels_of[image[:32].tobytes()] and second in labels_of[image[32:].tobytes()]


def test_composition_texts_name_both_digits_in_order():
    wording = {"side_by_side": ("to the left of", "side by side", "next to"), "stacked": ("above", "on top of", "over")}
    num_templates = 0
    for layout, phrases in wording.items():
        templates = (
            data.COMPOSITION_GENERATION_TEMPLATES[layout]
            + data.COMPOSITION_CAPTION_TEMPLATES[layout]
            + data.COMPOSITION_TEXT_TEMPLATES[layout]
        )
        assert len(data.COMPOSITION_GENERATION_TEMPLATES[layout]) >= 4 and len(templates) >= 8
        num_templates += len(templates)
        for template in templates:
            assert template.index("{first_") < template.index("{second_")
            assert any(phrase in template for phrase in phrases)
            assert not any(word in template for word in ("below", "right of", "under", "beneath"))
    corpus = data.composition_corpus()  # per layout and template, the 100 pairs in order
    assert len(corpus) == 100 * num_templates
    assert [data.parse_digit_pair(text) for text in corpus] == [divmod(i % 100, 10) for i in range(len(corpus))]
    assert data.composition_prompt("side_by_side", (3, 7)) == "a handwritten 3 to the left of a 7"
    assert data.composition_prompt("stacked", (4, 9), variant=1) == "a handwritten four above a nine"

    rng = random.Random(0)
    texts = [data.make_composition_record_text("stacked", (4, 9), rng) for _ in range(300)]
    assert any(t.endswith(" <image>") for t in texts) and any(t.startswith("<image>") for t in texts)
    assert any("<image>" not in t for t in texts)
    assert all(data.parse_digit_pair(t.replace("<image>", "")) == (4, 9) for t in texts)


def test_parse_digit_pair_keeps_the_order_of_mention():
    assert data.parse_digit_pair("a 7 to the left of a 3") == (7, 3)
    assert data.parse_digit_pair("a three above a 3") == (3, 3)
    assert data.parse_digit_pair("a 1 over a nine, and a 5") == (1, 9)
    assert data.parse_class("a 7 to the left of a 3") == 7
    for text in ("", "nothing to see", "the digit seven", "a 7 and something"):
        assert data.parse_digit_pair(text) is None


def test_split_composition_inverts_compose_digits(test_digits):
    digits, _ = test_digits
    for layout in data.COMPOSITION_LAYOUTS:
        composed = data.to_model_range(data.compose_digits(digits[:4], digits[4:8], layout))
        first, second = split_composition(composed, layout)
        assert torch.equal(first, data.to_model_range(digits[:4]))
        assert torch.equal(second, data.to_model_range(digits[4:8]))
    with pytest.raises(ValueError, match="A stacked composition is"):
        split_composition(torch.zeros(1, 1, 32, 64), "stacked")


# Collator


@pytest.fixture(scope="module")
def tiny_recipe():
    tokenizer = build_tokenizer("mnist", vocab_size=300)
    size = ModelSize(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_encoder="linear",
        max_position_embeddings=64,
    )
    model = build_model(tokenizer, vae=None, image_size=8, num_channels=1, size=size, seed=0).eval()
    return model, TransfusionProcessor.from_model_config(model.config, tokenizer)


def test_latent_collator_matches_the_processor(tiny_recipe):
    model, processor = tiny_recipe
    latents = torch.rand(4, 1, 8, 8) * 2 - 1
    dataset = LatentCaptionDataset(latents, [0, 1, 2, 3], "mnist", data.CaptionMix(0.5, 0.5, 0.0), seed=1)
    records = [dataset[i] for i in range(4)]
    batch = LatentDataCollator(processor)(records)
    assert batch["image_latents"].shape == (4, 1, 8, 8)
    texts = [r["text"] + "</s>" for r in records]
    reference = processor(text=texts, images=[[np.zeros((8, 8), dtype=np.uint8)]] * 4, padding_side="right")
    for row, ids in zip(batch["input_ids"].tolist(), reference["input_ids"]):
        assert row[: len(ids)] == ids
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == -100).all()
    out = model(**batch)
    assert out.lm_loss is not None and out.diffusion_loss > 0


def test_latent_collator_mixes_image_sizes_as_the_processor_does():
    """Single digits and both composition layouts in one batch: each marker expands to its image's slots (after the
    size text), exactly as the processor expands it for pixels of that size, and the model takes the batch."""
    tokenizer = build_tokenizer("mnist", extra_texts=data.composition_corpus(), vocab_size=300)
    size = ModelSize(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_encoder="linear",
        max_position_embeddings=128,
    )
    model = build_model(
        tokenizer,
        vae=None,
        image_size=8,
        num_channels=1,
        size=size,
        max_image_size=16,
        image_position_embedding="learned_2d",
    ).eval()
    processor = TransfusionProcessor.from_model_config(model.config, tokenizer, write_image_size=True)
    mix = data.CaptionMix(0.5, 0.5, 0.0)
    parts = [
        LatentCaptionDataset(torch.rand(2, 1, 8, 8), [3, 4], "mnist", mix, seed=1),
        LatentCaptionDataset(torch.rand(2, 1, 8, 16), [(3, 7), (1, 2)], "mnist", mix, seed=1, layout="side_by_side"),
        LatentCaptionDataset(torch.rand(2, 1, 16, 8), [(4, 9), (0, 5)], "mnist", mix, seed=1, layout="stacked"),
    ]
    records = [part[i] for part in parts for i in range(2)]
    batch = LatentDataCollator(processor, vae_downsample_factor=1)(records)
    assert [tuple(x.shape) for x in batch["image_latents"]] == [(1, 8, 8)] * 2 + [(1, 8, 16)] * 2 + [(1, 16, 8)] * 2
    texts = [r["text"] + "</s>" for r in records]
    pictures = [[np.zeros(tuple(r["latents"].shape[2:]), dtype=np.uint8)] for r in records]
    reference = processor(text=texts, images=pictures, padding_side="right")
    for row, ids in zip(batch["input_ids"].tolist(), reference["input_ids"]):
        assert row[: len(ids)] == ids
    assert [(row == processor.image_token_id).sum().item() for row in batch["input_ids"]] == [16, 16, 32, 32, 32, 32]
    decoded = processor.batch_decode(batch["input_ids"][2:3])[0]
    assert " 8x16<boi>" in decoded
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.image_sizes.tolist() == [[8, 8]] * 2 + [[8, 16]] * 2 + [[16, 8]] * 2


# Judge and Frechet distance


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near = frechet_distance(a, rng.normal(size=(500, 8)))
    far = frechet_distance(a, rng.normal(size=(500, 8)) + 2.0)
    assert near < 1.0 and far == pytest.approx(32.0, rel=0.15)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, a[:, :4])


def test_judge_learns_real_digits_and_round_trips(tmp_path):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    images = data.to_model_range(data.pad_images((digits.images * 15.9).astype(np.uint8), 8))
    labels = torch.tensor(digits.target)
    judge = train_classifier(images[:1400], labels[:1400], epochs=3, batch_size=64, learning_rate=5e-3)
    classes, features = predict(judge, images[1400:])
    assert float((classes == labels[1400:]).float().mean()) > 0.8
    assert features.shape == (len(images) - 1400, judge.config.feature_dim)
    judge.save(tmp_path)
    again = JudgeCNN.load(tmp_path)
    assert torch.equal(again(images[:5]), judge(images[:5]))
    with pytest.raises(FileNotFoundError, match="transfusion classifier"):
        JudgeCNN.load(tmp_path / "missing")


# VAE


def test_vae_on_a_folder_of_your_own_images(tmp_path, capsys):
    """`transfusion vae --images DIR`: images of any size, RGB, RGBA or grey, to a diffusers VAE that
    `transfusion-convert from-llm --vae` takes."""
    from diffusers import AutoencoderKL
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_transfusion import TransfusionForConditionalGeneration, train_caption_tokenizer
    from modeling_transfusion.conversion import convert_from_llm
    from modeling_transfusion.recipes.cli import main

    rng = np.random.default_rng(0)
    folder = tmp_path / "my-images"
    (folder / "nested").mkdir(parents=True)
    sizes_and_modes = [((40, 20), "RGB"), ((16, 16), "RGBA"), ((30, 30), "L"), ((64, 48), "RGB"), ((17, 33), "RGB")]
    for index, ((width, height), mode) in enumerate(sizes_and_modes * 3):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        pixels = pixels[..., 0] if channels == 1 else pixels
        PIL.Image.fromarray(pixels, mode=mode).save(folder / ("nested" if index % 2 else "") / f"{index:02d}.png")
    (folder / "notes.txt").write_text("not an image")

    # As the model's processor prepares them: the shorter side resized to 16, the centre cropped, in [-1, 1].
    pixels, paths = data.load_image_folder(folder, image_size=16)
    assert pixels.shape == (15, 3, 16, 16) and len(paths) == 15 and pixels.min() >= -1 and pixels.max() <= 1
    with PIL.Image.open(folder / "nested" / "01.png") as rgba:  # 16x16 RGBA: composited onto white
        expected = TransfusionImageProcessor(size=16, num_channels=3)(rgba, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels[paths.index(folder / "nested" / "01.png")], torch.as_tensor(expected))
    grey, _ = data.load_image_folder(folder, image_size=16, num_channels=1)
    assert grey.shape == (15, 1, 16, 16)
    only_grey = tmp_path / "grey"
    only_grey.mkdir()
    PIL.Image.fromarray(np.zeros((20, 10), np.uint8)).save(only_grey / "a.png")
    assert data.load_image_folder(only_grey, image_size=8)[0].shape == (1, 1, 8, 8)  # all grey: one channel
    with pytest.raises(FileNotFoundError, match="No image files in"):
        data.load_image_folder(tmp_path / "empty-nothing", 16)

    out = tmp_path / "my-vae"
    main(["vae", "--images", str(folder), "--image-size", "16", "--steps", "3", "--batch-size", "4",
          "--channels", "8", "16", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "15 images from" in printed and "13 to train, 2 held out" in printed
    assert {"config.json", "diffusion_pytorch_model.safetensors", "vae_metrics.json"} <= {p.name for p in out.iterdir()}
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.in_channels == 3 and vae.config.latent_channels == 4

    # What from-llm takes: a model whose images are 16x16 RGB through this VAE (latent 8x8x4).
    tokenizer = train_caption_tokenizer(["a red square", "a blue circle"] * 20, with_image_tokens=False)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    convert_from_llm(tmp_path / "llm", tmp_path / "converted", vae_path=out, image_size=16)
    model = TransfusionForConditionalGeneration.from_pretrained(tmp_path / "converted")
    assert (model.config.num_channels, model.config.latent_channels, model.config.latent_size) == (3, 4, 8)


def test_vae_geometry_and_metrics():
    vae = build_vae(1, 4, (8, 16, 16))
    pixels = torch.rand(3, 1, 32, 32) * 2 - 1
    assert encode_latents(vae, pixels).shape == (3, 4, 8, 8)
    assert reconstruction_mse(vae, pixels) > 0


# Evaluation pieces on a tiny random model


def test_evaluation_metrics_run_on_small_data(tiny_recipe):
    model, processor = tiny_recipe
    images = generate_images(
        model,
        processor,
        ["a handwritten digit one"] * 2,
        seeds=[0, 1],
        num_inference_steps=2,
        image_guidance_scale=2.0,
        scheduler="dpmsolver++",
    )
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1
    again = generate_images(
        model,
        processor,
        ["a handwritten digit one"],
        seeds=[1],
        num_inference_steps=2,
        image_guidance_scale=2.0,
        scheduler="dpmsolver++",
    )
    assert torch.allclose(again[0], images[1], atol=1e-5)  # one seed per row: batch-independent
    captions = caption_images(model, processor, images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    perplexity = text_perplexity(model, processor, ["the digit one", "the digit two"])
    assert 1.0 < perplexity < 2 * len(processor.tokenizer)  # a random model: about the vocabulary size


def test_evaluate_refuses_an_empty_metric(tiny_recipe):
    model, processor = tiny_recipe
    images = torch.zeros(20, 1, 8, 8)
    with pytest.raises(ValueError, match="num_captioned must be at least 1"):
        evaluate(model, processor, judge=None, test_images=images, test_labels=[0] * 20, num_captioned=0)


def test_balanced_prompts():
    targets, prompts = balanced_prompts("mnist", 25)
    assert np.bincount(targets).tolist() == [3] * 5 + [2] * 5
    assert prompts[0] == data.generation_prompt("mnist", 0, 0) and prompts[17] == data.generation_prompt("mnist", 7, 1)


def test_generated_image_metrics_on_real_images():
    """Real test images passed off as generated: they sit exactly on the floor, and the prompt accuracy is the
    judge's accuracy, or near zero when the targets are wrong."""
    judge = JudgeCNN.load(DEFAULT_JUDGE)
    images, labels = _installed(data.load_dataset_images, "mnist", "test", 32)
    test_images, test_labels = data.to_model_range(images[:300]), [int(k) for k in labels[:300]]
    generated, targets = test_images[100:200], test_labels[100:200]
    metrics = generated_image_metrics(judge, generated, targets, test_images, test_labels)
    assert metrics["frechet_distance"] == pytest.approx(metrics["frechet_floor"])
    assert metrics["prompt_accuracy"] >= 0.95 and metrics["judge_accuracy_on_real"] >= 0.95
    wrong = [(k + 1) % 10 for k in targets]
    assert generated_image_metrics(judge, generated, wrong, test_images, test_labels)["prompt_accuracy"] < 0.05


def test_prompt_reliance_of_the_bundled_checkpoint(test_digits):
    """The bundled model denoises 100 real test digits better after their own class's prompt than after the next
    class's (measured 1.17); told the previous class instead, the 'own' prompt is the wrong one and the ratio turns
    below 1."""
    model, processor = load_checkpoint(str(DEFAULT_MODEL))
    images, labels = test_digits
    images, labels = data.to_model_range(images[:100]), [int(k) for k in labels[:100]]
    assert prompt_reliance(model, processor, images, labels) > 1.1
    assert prompt_reliance(model, processor, images, [(k - 1) % 10 for k in labels]) < 1 / 1.1


def test_judge_reads_real_compositions(test_digits):
    """The judge on 500 real test compositions of each layout, cut in halves: about its single-digit accuracy (0.98)
    squared; with the pairs swapped, right only where both digits are equal."""
    judge = JudgeCNN.load(DEFAULT_JUDGE)
    digits, labels = test_digits
    for seed, layout in enumerate(data.COMPOSITION_LAYOUTS):
        images, pairs = data.make_compositions(digits, labels, layout, 500, seed=seed)
        pixels = data.to_model_range(images)
        assert composition_accuracy(judge, pixels, pairs, layout) >= 0.95  # measured 0.968 and 0.962
        assert composition_accuracy(judge, pixels, pairs[:, ::-1], layout) < 0.15


def test_generate_and_caption_pass_the_image_size(tiny_recipe):
    """generate_images asks the model for `height` x `width` (its default size when not given); caption_images passes
    images as they are, neither resized nor cropped."""
    _, processor = tiny_recipe

    class SizeRecorder:
        config = SimpleNamespace(image_size=8)

        def __init__(self):
            self.calls = []

        def generate(self, **kwargs):
            self.calls.append(kwargs)
            if kwargs["generation_mode"] == "text":
                return kwargs["input_ids"]
            size = (kwargs.get("height", 8), kwargs.get("width", 8))
            return SimpleNamespace(images=[[torch.zeros(1, *size)] for _ in kwargs["generator"]])

    model = SizeRecorder()
    images = generate_images(model, processor, ["a 1 above a 2"] * 3, seeds=[0, 1, 2], batch_size=2, height=16, width=8)
    assert images.shape == (3, 1, 16, 8) and [(c["height"], c["width"]) for c in model.calls] == [(16, 8)] * 2
    generate_images(model, processor, ["a 1"], seeds=[0])
    assert (model.calls[-1]["height"], model.calls[-1]["width"]) == (8, 8)  # the model's default size
    assert caption_images(model, processor, images) == [""] * 3
    assert model.calls[-1]["pixel_values"].shape == (3, 1, 16, 8)


def test_composition_prompts_and_evaluation_arguments():
    pairs, prompts = balanced_composition_prompts("stacked", 250)
    assert len(set(pairs)) == 100 and pairs[37] == (3, 7) and pairs[249] == (4, 9)
    assert prompts[137] == data.composition_prompt("stacked", (3, 7), variant=1)
    digits = np.zeros((4, 32, 32), dtype=np.uint8)
    with pytest.raises(ValueError, match="num_captioned must be at least 1"):
        evaluate_compositions(None, None, None, digits, [0] * 4, "stacked", num_captioned=0)
    with pytest.raises(ValueError, match="Unknown layout"):
        evaluate_compositions(None, None, None, digits, [0] * 4, "diagonal")


def test_figures():
    pictures = [PIL.Image.new("L", (8, 8), 255) for _ in range(5)]
    sheet = image_grid(pictures, columns=3, scale=2, gap=1)
    assert sheet.size == (3 * 17 + 1, 2 * 17 + 1)
    history = [{"step": s, "lm_loss": 5 / s, "diffusion_loss": 1 / s} for s in range(1, 10)]
    assert plot_training_curves(history).size == (640, 360)


def test_the_mnist_file_is_read_without_running_arbitrary_pickled_code(tmp_path):
    import io
    import pickle

    malicious = pickle.dumps(print)  # any callable a pickle names would run on load
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not allowed"):
        data._ArraysOnlyUnpickler(io.BytesIO(malicious)).load()
    arrays = pickle.dumps(((np.zeros((2, 784), np.float32), np.arange(2)),))
    ((pixels, labels),) = data._ArraysOnlyUnpickler(io.BytesIO(arrays)).load()
    assert pixels.shape == (2, 784) and labels.tolist() == [0, 1]
