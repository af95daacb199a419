"""Conversion: a Transfusion checkpoint from tiny local causal LMs (Llama, Qwen2), VAEs swapped in, and the Hub
export loaded with remote code in an interpreter where this package is not importable."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from diffusers import AutoencoderKL
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

import modeling_transfusion as mt
from modeling_transfusion.conversion import convert_from_llm, convert_from_vae
from modeling_transfusion.conversion import export_hub as export_hub_module
from modeling_transfusion.conversion.cli import main as convert_main

from conftest import build_tiny_tokenizer, load_digit_images, tiny_text_config

PROMPT = "a handwritten seven"


def cli() -> list[str]:
    """`transfusion-convert` as installed by `pip install -e .`, else the module form of the same command."""
    script = shutil.which("transfusion-convert")
    return [script] if script else [sys.executable, "-m", "modeling_transfusion.conversion"]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


def save_tiny_llm(directory, kind: str):
    """A tiny random causal LM with the tiny tokenizer (no image tokens): Llama with an untied head, or Qwen2 with a
    tied one and a chat template (like an instruct model)."""
    tokenizer = build_tiny_tokenizer(with_image_tokens=False)
    if kind == "qwen2":
        tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(**tiny_text_config(tokenizer, kind, tie_word_embeddings=kind == "qwen2"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_vae(directory, latent_channels: int):
    torch.manual_seed(latent_channels)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama converted with the command line: (llm_dir, checkpoint_dir, stdout)."""
    root = tmp_path_factory.mktemp("from_llm")
    llm_dir = save_tiny_llm(root / "llm", "llama")
    result = run([*cli(), "from-llm", str(llm_dir), str(root / "out"), "--image-size", "8", "--num-channels", "1"])
    assert result.returncode == 0, result.stderr
    return llm_dir, root / "out", result.stdout


def assert_same_text_behaviour(llm_dir, checkpoint_dir):
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    model = AutoModel.from_pretrained(checkpoint_dir).eval()
    processor = AutoProcessor.from_pretrained(checkpoint_dir)
    inputs = processor(text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        expected = llm(**inputs).logits
        actual = model(**inputs).logits
    # At least <boi>, <image>, <eoi> were added (Qwen2's tokenizer also brings its own <|endoftext|>).
    assert actual.shape[-1] == len(processor.tokenizer) >= expected.shape[-1] + 3
    assert torch.equal(actual[..., : expected.shape[-1]], expected)
    before = llm.generate(**inputs, max_new_tokens=8, do_sample=False)
    after = model.generate(**inputs, max_new_tokens=8, do_sample=False, generation_mode="text")
    assert torch.equal(before, after)
    return model, processor


def test_from_llm_command_line(converted):
    llm_dir, checkpoint_dir, stdout = converted
    assert "initialised" in stdout and "patch_encoder.proj.weight" in stdout
    assert "text logits on a" in stdout and "match the LM's" in stdout
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (checkpoint_dir / name).is_file(), name
    model, processor = assert_same_text_behaviour(llm_dir, checkpoint_dir)
    tokenizer = processor.tokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<boi>", "<eoi>", "<image>")] == [
        model.config.boi_token_id,
        model.config.eoi_token_id,
        model.config.image_token_id,
    ]
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == model.config.text_config.vocab_size
    assert json.loads((checkpoint_dir / "generation_config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id
    out = model.generate(
        **processor(text=[PROMPT], return_tensors="pt"),
        generation_mode="image",
        num_inference_steps=2,
        return_dict_in_generate=True,
        progress_bar=False,
    )
    assert processor.postprocess_images(out.images)[0][0].size == (8, 8)


def test_from_llm_qwen2_with_tied_head(tmp_path):
    llm_dir = save_tiny_llm(tmp_path / "qwen2", "qwen2")
    report = convert_from_llm(llm_dir, tmp_path / "out", image_size=8, num_channels=1)
    assert any("tied to the LM head" in note for note in report.notes)
    assert {name.split(" ")[0] for name in report.initialised} == {
        name
        for name in mt.TransfusionForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
        if name.startswith(("model.patch_encoder.", "model.patch_decoder."))
    }
    model, processor = assert_same_text_behaviour(llm_dir, tmp_path / "out")
    assert model.config.text_config.model_type == "qwen2"
    assert model.lm_head.weight is model.get_input_embeddings().weight
    # The instruct LM's chat template is kept: chats are formatted exactly as before the conversion.
    chat = [{"role": "user", "content": "draw a seven"}]
    expected = AutoTokenizer.from_pretrained(llm_dir).apply_chat_template(chat, tokenize=False)
    assert processor.tokenizer.apply_chat_template(chat, tokenize=False) == expected
    assert processor.apply_chat_template(chat, tokenize=False) == expected


def test_from_llm_with_vae(tmp_path, converted):
    llm_dir, _, _ = converted
    vae_dir = save_tiny_vae(tmp_path / "vae", latent_channels=4)
    # The default image size, 32 x the VAE's downsampling, makes 256 slots: too many for this LM's 256 positions.
    too_many = (
        r"takes 256 <image> slots, plus <boi> and <eoi>, more than the backbone's max_position_embeddings \(256\)"
    )
    with pytest.raises(ValueError, match=too_many):
        convert_from_llm(llm_dir, tmp_path / "too_big", vae_path=vae_dir)
    report = convert_from_llm(llm_dir, tmp_path / "out", vae_path=vae_dir, image_size=16)
    model = AutoModel.from_pretrained(tmp_path / "out")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert model.config.num_channels == 3 and model.config.latent_channels == 4 and model.config.latent_size == 8
    for name, tensor in vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[name], tensor), name
    assert len(report.replaced) == len(vae.state_dict())


def test_output_folder_is_never_overwritten_silently(tmp_path, converted, capsys):
    llm_dir, _, _ = converted
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_from_llm(llm_dir, target, image_size=8, num_channels=1)
    assert convert_main(["from-llm", str(llm_dir), str(target), "--image-size", "8", "--num-channels", "1"]) == 1
    assert "not empty: refusing to overwrite it" in capsys.readouterr().err
    assert sorted(path.name for path in target.iterdir()) == ["notes.txt"]
    convert_from_llm(llm_dir, target, image_size=8, num_channels=1, overwrite=True, verify=False)
    assert (target / "model.safetensors").is_file() and (target / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="also an input"):
        convert_from_llm(llm_dir, llm_dir, overwrite=True)


def test_from_vae_attaches_and_swaps(tmp_path, converted, capsys):
    _, checkpoint_dir, _ = converted
    old = mt.TransfusionForConditionalGeneration.from_pretrained(checkpoint_dir)

    vae4 = save_tiny_vae(tmp_path / "vae4", latent_channels=4)
    report = convert_from_vae(checkpoint_dir, vae4, tmp_path / "with_vae4")
    reinitialised = {entry.split(" ")[0] for entry in report.initialised}
    assert reinitialised == {
        "model.patch_encoder.proj.weight",
        "model.patch_decoder.proj.weight",
        "model.patch_decoder.proj.bias",
    }
    assert "model.patch_encoder.proj.bias" in report.kept
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in report.kept
    model = AutoModel.from_pretrained(tmp_path / "with_vae4")
    processor = AutoProcessor.from_pretrained(tmp_path / "with_vae4")
    for name, tensor in old.state_dict().items():
        if name.startswith(("model.language_model.", "lm_head.", "model.patch_encoder.time_embedding.")):
            assert torch.equal(model.state_dict()[name], tensor), name
    assert model.config.num_channels == 3 and model.config.latent_channels == 4
    assert processor.num_image_tokens == model.config.num_image_tokens == 4  # 8 px -> 4x4 latent -> 2x2 patches
    image = load_digit_images(1)[0][0]
    batch = processor(text=["<image> a handwritten seven"], images=[image], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 8, 8)
    assert model(**batch, labels=batch["input_ids"]).loss.isfinite()

    # A 16-channel VAE (the SD3 / FLUX latent width) on bigger images, through the command line.
    vae16 = save_tiny_vae(tmp_path / "vae16", latent_channels=16)
    status = convert_main(
        ["from-vae", str(tmp_path / "with_vae4"), str(vae16), str(tmp_path / "with_vae16"), "--image-size", "16"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "patch_encoder.proj.weight (32, 16) -> (32, 64) (shape changed)" in printed
    assert "an image now takes 16 slots instead of 4" in printed
    model = AutoModel.from_pretrained(tmp_path / "with_vae16")
    assert model.config.latent_channels == 16 and model.vae.config.latent_channels == 16

    # Removing the VAE again: back to pixels, the latent layers re-initialised once more.
    report = convert_from_vae(tmp_path / "with_vae16", None, tmp_path / "pixels", image_size=8)
    assert AutoModel.from_pretrained(tmp_path / "pixels").vae is None
    assert any("no VAE (pixels)" in note for note in report.notes)


def test_from_vae_explains_a_geometry_that_does_not_fit(tmp_path, converted):
    _, checkpoint_dir, _ = converted
    vae = save_tiny_vae(tmp_path / "vae", latent_channels=4)
    with pytest.raises(ValueError, match="--image-size / --patch-size"):
        convert_from_vae(checkpoint_dir, vae, tmp_path / "out", image_size=6)


CLEAN_LOAD = """
import sys, torch
try:
    import modeling_transfusion
except ModuleNotFoundError:
    print("package not importable")
else:
    raise SystemExit("modeling_transfusion is importable here: the environment is not clean")
from transformers import AutoModel, AutoProcessor, pipeline
folder, output = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
batch = processor(text=["a handwritten seven"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
out = model.generate(**batch, generation_mode="image", num_inference_steps=2, return_dict_in_generate=True,
                     generator=torch.Generator().manual_seed(0), progress_bar=False)
saved = {"logits": logits, "images": out.images[0][0], "module": type(model).__module__,
         "processor": type(processor).__name__}
if "custom_pipelines" in model.config:  # exported with the text-to-image pipeline
    image = pipeline("text-to-image", model=folder, trust_remote_code=True)(
        "a handwritten seven", num_inference_steps=2, seed=0, output_type="pt", progress_bar=False)["image"]
    saved["pipeline_image"] = image
torch.save(saved, output)
"""


def load_without_the_package(folder, tmp_path) -> dict:
    """Runs `CLEAN_LOAD` on `folder` in a fresh interpreter without site-packages' .pth files (so no editable install)
    and without the repository on its path: only the installed libraries. Returns what it computed."""
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    bootstrap = f"import sys; sys.path.extend({site_packages!r}); exec(sys.argv.pop(1))"
    result = run(
        [sys.executable, "-I", "-S", "-c", bootstrap, CLEAN_LOAD, str(folder), str(tmp_path / "remote.pt")],
        cwd=tmp_path,
        env={"HF_HOME": str(tmp_path / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "package not importable" in result.stdout
    remote = torch.load(tmp_path / "remote.pt")
    assert remote["module"].startswith("transformers_modules.") and remote["processor"] == "TransfusionProcessor"
    return remote


def assert_same_outputs(folder, remote: dict):
    """The package computes, from `folder`, the logits and the image the remote code computed (and its pipeline's)."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    batch = processor(text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, remote["logits"])  # the remote code computes the same
    out = model.generate(
        **batch,
        generation_mode="image",
        num_inference_steps=2,
        return_dict_in_generate=True,
        generator=torch.Generator().manual_seed(0),
        progress_bar=False,
    )
    assert torch.equal(out.images[0][0], remote["images"])
    if "pipeline_image" in remote:  # the same image, in [0, 1] (diffusers' "pt")
        torch.testing.assert_close(remote["pipeline_image"], (out.images[0][0] / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("modality_experts", [False, True])
def test_export_hub_loads_without_the_package(tmp_path, converted, modality_experts):
    llm_dir, checkpoint_dir, _ = converted
    if modality_experts:  # the experts' module travels with the remote code
        checkpoint_dir = tmp_path / "experts"
        convert_from_llm(llm_dir, checkpoint_dir, image_size=8, num_channels=1, modality_experts=True)
    assert convert_main(["export-hub", str(checkpoint_dir), str(tmp_path / "hub")]) == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_transfusion.TransfusionForConditionalGeneration"
    for name in export_hub_module.REMOTE_CODE_FILES:
        assert (tmp_path / "hub" / name).is_file(), name
    assert (tmp_path / "hub" / "README.md").is_file()
    assert config["custom_pipelines"]["text-to-image"]["impl"] == "pipeline_transfusion.TransfusionTextToImagePipeline"
    remote = load_without_the_package(tmp_path / "hub", tmp_path)
    assert remote["pipeline_image"].shape == (1, 8, 8)
    assert_same_outputs(checkpoint_dir, remote)


def test_save_pretrained_after_a_lora_merge_loads_without_the_package(tmp_path, converted):
    _, checkpoint_dir, _ = converted
    model = AutoModel.from_pretrained(checkpoint_dir)
    processor = AutoProcessor.from_pretrained(checkpoint_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["patch_encoder", "patch_decoder"],
                      init_lora_weights=False)  # fmt: skip
    torch.manual_seed(0)
    merged = get_peft_model(model, lora).merge_and_unload()  # random adapters: the merge changes the weights
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")

    # The folder holds the code (every remote-code file but the pipeline's, the modality experts' included), names it,
    # and leaves the text-to-image pipeline to export-hub.
    written = {path.name for path in (tmp_path / "merged").glob("*.py")}
    assert written == set(export_hub_module.REMOTE_CODE_FILES) - {"pipeline_transfusion.py"}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    model_class = "modeling_transfusion.TransfusionForConditionalGeneration"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_transfusion.TransfusionConfig",
        **dict.fromkeys(
            ["AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM"],
            model_class,
        ),
    }
    assert "custom_pipelines" not in config
    processor_config = json.loads((tmp_path / "merged" / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_transfusion.TransfusionProcessor"}

    remote = load_without_the_package(tmp_path / "merged", tmp_path)
    assert "pipeline_image" not in remote
    assert_same_outputs(tmp_path / "merged", remote)
    with torch.no_grad():  # and the merge did change the model
        batch = processor(text=[PROMPT], return_tensors="pt")
        assert not torch.equal(AutoModel.from_pretrained(checkpoint_dir).eval()(**batch).logits, remote["logits"])


def test_export_refuses_code_that_a_flat_copy_cannot_import(tmp_path, monkeypatch):
    bad = tmp_path / "modeling_bad.py"
    bad.write_text("from ..processing import TransfusionProcessor\n")
    monkeypatch.setitem(export_hub_module.REMOTE_CODE_FILES, "modeling_bad.py", bad)
    with pytest.raises(ImportError, match="flat copy"):
        export_hub_module.check_flat_imports()
    export_hub_module.REMOTE_CODE_FILES.pop("modeling_bad.py")
    export_hub_module.check_flat_imports()  # the package's own files pass
