"""Tests of the `transfusion` command: generate and caption with the bundled checkpoint, and a tiny training run that
saves a loadable checkpoint and resumes from its Trainer checkpoint."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_transfusion.recipes import cli

BUNDLED = cli.DEFAULT_MODEL


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def test_generate_with_the_bundled_checkpoint_writes_a_grid_and_a_caption(tmp_path, capsys):
    out = tmp_path / "samples.png"
    cli.main(["generate", "--out", str(out), "--steps", "10"])
    grid = PIL.Image.open(out)
    assert grid.size[0] > 10 * 32 and grid.size[1] > 32
    printed = capsys.readouterr().out
    assert "caption of the real test image" in printed
    # The prompts are printed in the order the grid shows them, left to right.
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    in_order = ", ".join(f"'a handwritten digit {name}'" for name in names)
    assert f"10 images of 32x32, left to right: {in_order}" in printed


def test_generate_a_prompt_and_caption_files(tmp_path, capsys):
    out = tmp_path / "sevens.png"
    cli.main(["generate", "a handwritten digit seven", "--num-images", "3", "--out", str(out), "--no-caption"])
    assert PIL.Image.open(out).size[0] > 3 * 32
    examples = sorted((BUNDLED / cli.EXAMPLES_DIR).glob("*.png"))
    assert examples, "the bundled checkpoint ships real test images"
    capsys.readouterr()
    cli.main(["caption", *map(str, examples[:2])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(": " in line for line in lines)


def test_the_edit_checkpoint_also_draws_from_a_text_prompt(tmp_path, capsys):
    # Its generation config guides edits on their source image; a prompt without one gets ordinary guidance.
    model, _ = cli.load_checkpoint(cli.DEFAULT_EDIT_MODEL)
    assert model.generation_config.source_image_guidance_scale == 2.0
    out = tmp_path / "sevens.png"
    cli.main(["generate", "a handwritten digit seven", "--model", str(cli.DEFAULT_EDIT_MODEL), "--num-images", "2",
              "--steps", "4", "--out", str(out), "--no-caption"])  # fmt: skip
    assert PIL.Image.open(out).size[0] > 2 * 32 and "wrote" in capsys.readouterr().out


def test_caption_rejects_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No image file"):
        cli.main(["caption", str(tmp_path / "nope.png")])
    with pytest.raises(FileNotFoundError, match="No Transfusion checkpoint"):
        cli.main(["generate", "--model", str(tmp_path)])


def test_tiny_train_run_saves_a_checkpoint_and_resumes(tmp_path):
    pytest.importorskip("mnist")
    out = tmp_path / "run"
    common = [
        "train",
        "--out",
        str(out),
        "--limit",
        "128",
        "--batch-size",
        "8",
        "--hidden-size",
        "32",
        "--intermediate-size",
        "64",
        "--layers",
        "1",
        "--patch-encoder",
        "linear",
        "--patch-size",
        "8",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--max-conditioning-timestep",
        "100",
    ]
    cli.main([*common, "--max-steps", "2"])
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("lm_loss" in entry and "diffusion_loss" in entry for entry in state["log_history"])
    cli.main([*common, "--max-steps", "4", "--resume"])
    resumed = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert resumed["global_step"] == 4
    steps = [entry["step"] for entry in resumed["log_history"] if "lm_loss" in entry]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from the first run, 3-4 from the resumed one
    model, processor = cli.load_checkpoint(out / "final")
    assert model.config.image_size == 32 and processor.num_image_tokens == 16
    # each Trainer checkpoint loads on its own, processor included, with the weights the run had at that step
    step_model, step_processor = cli.load_checkpoint(out / "checkpoint-4")
    assert step_processor.to_dict() == processor.to_dict()
    for (name, final), (_, step) in zip(model.state_dict().items(), step_model.state_dict().items(), strict=True):
        assert torch.equal(final, step), name
    assert model.config.max_conditioning_timestep == 100
    assert Path(out / "final" / "generation_config.json").is_file()
    # the recipe's sampling defaults, guidance limited to the 80% least noisy timesteps of the ddpm objective
    assert model.generation_config.image_guidance_scale == 3.0
    assert list(model.generation_config.image_guidance_interval) == [0, 800]
    assert not hasattr(model.generation_config, "source_image_guidance_scale")  # no edits trained


def test_tiny_edit_run_end_to_end_trains_edits_and_evaluates(tmp_path, capsys):
    pytest.importorskip("mnist")
    from modeling_transfusion.recipes.editing import EDIT_KINDS

    out = tmp_path / "run"
    tiny = "--hidden-size 32 --intermediate-size 64 --layers 1 --patch-encoder linear --patch-size 8".split()
    cli.main(
        ["train", "--out", str(out), "--limit", "64", "--edits", "24", "--batch-size", "8", *tiny, "--max-steps", "2"]
    )
    assert "edits: 24, chained: " in capsys.readouterr().out
    model, processor = cli.load_checkpoint(out / "final")
    # Two-digit pairs, their sizes written, and positions for a chain of two edits of pairs.
    assert model.config.max_image_size == 64 and processor.write_image_size
    assert model.config.text_config.max_position_embeddings == cli.EDIT_CONTEXT_LENGTH
    # the two guidance scales of editing (docs/editing.md): instruction 3, source image 2
    assert model.generation_config.image_guidance_scale == 3.0
    assert model.generation_config.source_image_guidance_scale == 2.0
    seven = BUNDLED / cli.EXAMPLES_DIR / "mnist_test_09990_label_7.png"
    png = tmp_path / "edit.png"
    edit = ["edit", "--model", str(out / "final"), str(seven), "add a 3 on the right", "swap them", "--steps", "2"]
    cli.main([*edit, "--size", "32x64", "32x64", "--scale", "1", "--out", str(png), "--image-guidance", "1.5"])
    assert PIL.Image.open(png).size == (2 + 32 + 2 + 64 + 2 + 64 + 2, 2 + 32 + 2)  # source, then each edit
    assert "'swap them': 32x64" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Got 1 --size for 2 instruction"):
        cli.main([*edit, "--size", "32x64"])
    report = tmp_path / "report.json"
    evaluation = ["eval", "--model", str(out / "final"), "--edits", "--num-edits", "2", "--steps", "2"]
    cli.main([*evaluation, "--num-generated", "10", "--num-captioned", "2", "--json", str(report)])
    edits = json.loads(report.read_text())["edits"]
    assert [metrics["kind"] for metrics in edits["kinds"]] == list(EDIT_KINDS)
    assert all(metrics["num_examples"] == 2 for metrics in edits["kinds"])
    exact = [metrics for metrics in edits["kinds"] if "mse_ratio" in metrics]
    assert len(exact) == 6 and all(metrics["mse_vae_round_trip"] < metrics["mse_unedited_source"] for metrics in exact)
    assert sum(metrics["num_examples"] for metrics in edits["chains"]) == 2
    assert "chained (second edit of two, by its kind):" in capsys.readouterr().out


def test_the_latent_cache_is_only_read_for_the_images_and_vae_it_was_made_from(tmp_path, capsys):
    from safetensors.torch import load_file

    from modeling_transfusion.recipes.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(1, 4, (8, 16, 16)).eval()
    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32), dtype=np.uint8)
    cache = tmp_path / "latents.safetensors"
    first = cli._cached_latents(cache, images, vae)
    assert first.shape == (6, 4, 8, 8)
    assert torch.equal(cli._cached_latents(cache, images, vae), first)  # read back, not encoded again
    assert "encoding again" not in capsys.readouterr().out

    fewer = cli._cached_latents(cache, images[:4], vae)  # e.g. another --compositions N with the same --out
    assert fewer.shape[0] == 4 and torch.allclose(fewer, first[:4], atol=1e-6)
    assert "encoding again" in capsys.readouterr().out
    assert load_file(cache)["latents"].shape[0] == 4

    other = build_vae(1, 4, (8, 16, 16)).eval()  # same config, other weights
    assert not torch.equal(cli._cached_latents(cache, images[:4], other), fewer)
    assert "encoding again" in capsys.readouterr().out
    assert torch.equal(cli._cached_latents(cache, images[:4], None), cli._cached_latents(cache, images[:4], None))


def test_the_bundled_checkpoint_writes_the_size_of_the_image_it_opens():
    """Interleaved generation from a caption alone: the bundled checkpoint writes `HxW` before `<boi>` and opens an
    image of that size (the counts `transfusion eval --compositions` reports over 20 prompts each; here 4)."""
    from modeling_transfusion.recipes.data import COMPOSITION_LAYOUTS
    from modeling_transfusion.recipes.evaluation import written_size_prompts, written_size_table, written_sizes

    model, processor = cli.load_checkpoint(str(BUNDLED))
    results = {}
    for layout, size in [(None, (32, 32)), *COMPOSITION_LAYOUTS.items()]:
        prompts = written_size_prompts(layout)
        assert len(prompts) == 20 and len(set(prompts)) == 20
        counts = written_sizes(model, processor, prompts[::5], size, num_inference_steps=2)
        assert counts["rows"] == 4 and counts["opened"] == counts["wrote"]
        assert counts["wrote_expected"] == 4 if layout else counts["wrote_expected"] >= 3
        results[layout or "single"] = counts
    table = written_size_table(results)
    assert "| stacked | 64x32 | 4 / 4 | 4 / 4 |" in table and len(table.splitlines()) == 5


def test_caption_takes_images_of_different_sizes(capsys):
    seven = BUNDLED / cli.EXAMPLES_DIR / "mnist_test_09990_label_7.png"  # 32x32
    stacked = BUNDLED / cli.EXAMPLES_DIR / "mnist_test_09996_09997_stacked_label_34.png"  # 64x32
    alone = []
    for image in (seven, stacked):
        cli.main(["caption", str(image)])
        alone += capsys.readouterr().out.splitlines()
    assert alone == [f"{seven}: the digit seven", f"{stacked}: the digit three on top of the digit four"]
    cli.main(["caption", str(seven), str(stacked), str(seven)])
    assert capsys.readouterr().out.splitlines() == [*alone, alone[0]]


NOT_AN_IMAGE = "which names no image format PIL writes: end it with .png (or .jpg, .webp, ...)"
NOT_POSITIVE = "must be a positive integer, got"
EMPTY_PROMPT = (
    "the prompt is empty: describe the image to generate (e.g. 'a handwritten digit seven'), or leave the prompt out "
    "for one image per digit"
)
# Each command's arguments, and the error that ends it ({tmp}: the test's folder).
BAD_ARGUMENTS = {
    "out-without-extension": (
        "generate a7 --out {tmp}/samples",
        f"--out: {{tmp}}/samples has no extension, {NOT_AN_IMAGE}",
    ),
    "out-not-an-image": (
        "generate a7 --out {tmp}/a.txt",
        f"--out: {{tmp}}/a.txt has its extension '.txt', {NOT_AN_IMAGE}",
    ),
    "out-a-folder": ("generate a7 --out {tmp}", "--out: {tmp} is a folder: give the name of a file to write"),
    "out-missing-folder": (
        "generate a7 --out {tmp}/no/a.png",
        "--out: the folder {tmp}/no does not exist: create it first",
    ),
    "json-missing-folder": (
        "eval --json {tmp}/no/a.json",
        "--json: the folder {tmp}/no does not exist: create it first",
    ),
    "json-a-folder": ("eval --json {tmp}", "--json: {tmp} is a folder: give the name of a file to write"),
    "grid-without-extension": ("eval --grid {tmp}/grid", f"--grid: {{tmp}}/grid has no extension, {NOT_AN_IMAGE}"),
    "no-images": ("generate a7 --num-images 0", f"--num-images: {NOT_POSITIVE} 0"),
    "negative-images": ("generate a7 --num-images -3", f"--num-images: {NOT_POSITIVE} -3"),
    "zero-size": ("generate a7 --height 0 --width 0", f"--height: {NOT_POSITIVE} 0"),
    "zero-width": ("generate a7 --width 0", f"--width: {NOT_POSITIVE} 0"),
    "edit-size": (
        "edit a.png mirror --size 32by64",
        "--size: must be a size HxW in pixels such as 32x64, got '32by64'",
    ),
    "edit-out": (
        "edit a.png mirror --out {tmp}/a.txt",
        f"--out: {{tmp}}/a.txt has its extension '.txt', {NOT_AN_IMAGE}",
    ),
}


@pytest.mark.parametrize("case", [*BAD_ARGUMENTS, "empty-prompt", "empty-instruction"])
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, capsys, case):
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before checking its arguments")

    monkeypatch.setattr(cli, "load_checkpoint", work)  # every command's work starts by loading the checkpoint
    if case == "empty-prompt":
        arguments, error = ["generate", ""], f"argument prompt: {EMPTY_PROMPT}"
    elif case == "empty-instruction":
        arguments = ["edit", "a.png", "mirror it", " "]
        error = "argument instructions: the instruction is empty: say how to edit the image, e.g. 'mirror it'"
    else:
        command, message = BAD_ARGUMENTS[case]
        arguments, error = command.format(tmp=tmp_path).split(), f"argument {message.format(tmp=tmp_path)}"
    with pytest.raises(SystemExit) as exit:
        cli.main(arguments)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"transfusion {arguments[0]}: error: {error}"


def test_generate_images_refuses_a_zero_size_instead_of_taking_the_default():
    from modeling_transfusion.recipes.evaluation import generate_images

    model, processor = cli.load_checkpoint(BUNDLED)
    with pytest.raises(ValueError, match=r"^height x width 0x32: height and width must be positive integers\.$"):
        generate_images(model, processor, ["a handwritten digit seven"], seeds=[0], height=0)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--freeze-text-path"], r"^--freeze-text-path keeps a pretrained text path: pass --init-from"),
        (
            ["--init-from", "converted", "--freeze-text-path", "--bf16"],
            r"^--bf16 with --freeze-text-path would store the frozen text path in bfloat16 too, so the saved model's "
            r"text would no longer be the LLM's",
        ),
    ],
)
def test_train_refuses_a_text_path_it_could_not_keep_before_any_work(tmp_path, monkeypatch, flags, error):
    from modeling_transfusion.recipes import data

    def work(*args, **kwargs):
        raise AssertionError("the command started its work before checking its arguments")

    monkeypatch.setattr(data, "load_dataset_images", work)  # training's work starts by loading the images
    with pytest.raises(ValueError, match=error):
        cli.main(["train", *flags, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
