"""The image path of a model with modality experts, on its own: everything a frozen LLM lacks to become that model.

With `freeze_text_path()`, training changes only the image path: the image experts, the rows of the image tokens, the
patch encoder and decoder (the VAE rides along). `extract_image_path` saves those weights alone, with the config,
processor and generation config, a few megabytes for low-rank experts; `apply_image_path` puts them on top of the LLM
they were trained on (loaded from its own folder or GGUF file) and saves the whole model. A fingerprint of the text
path, stored with the image path, makes sure the LLM is the same one, bit for bit.
"""

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationConfig

from ..configuration_transfusion import TransfusionConfig
from ..experts_transfusion import image_path_parameters
from ..modeling_transfusion import TransfusionForConditionalGeneration
from .checkpoint import load_checkpoint, prepare_output_dir, quiet_loading, save_checkpoint
from .convert_llm import _check_text_logits
from .report import ConversionReport

IMAGE_PATH_WEIGHTS = "image_path.safetensors"


def text_path_names(model: TransfusionForConditionalGeneration) -> list[str]:
    """The names of the parameters text uses (those `freeze_text_path` freezes): the backbone but its image path, and
    the LM head."""
    if not model.config.modality_experts:
        raise ValueError("Only a model with modality_experts=True has an image path of its own.")
    image = {id(parameter) for parameter in image_path_parameters(model)}
    text_modules = {"model.language_model": model.model.language_model, "lm_head": model.lm_head}
    return [
        f"{prefix}.{name}"
        for prefix, module in text_modules.items()
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if id(parameter) not in image
    ]


def text_path_fingerprint(model: TransfusionForConditionalGeneration) -> str:
    """SHA-256 of the text path in bfloat16 (whatever dtype the model is in), without the rows of the image tokens,
    which a model with experts never reads."""
    state = model.state_dict()
    image_tokens = torch.tensor(model.config.image_token_ids)
    digest = hashlib.sha256()
    for name in sorted(set(text_path_names(model))):
        tensor = state[name].detach()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[image_tokens[image_tokens < tensor.shape[0]]] = False
            tensor = tensor[keep]
        digest.update(name.encode() + tensor.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def extract_image_path(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_llm: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Saves the image path of a checkpoint with modality experts (weights in bfloat16, the VAE in float32) with its
    config, processor and generation config, and the fingerprint of the text path it was trained on. `base_llm`
    names that LLM for `transfusion generate --model`: `"smollm2"` is the SmolLM2-135M of the asset installer; the
    image path of another LLM is put on top of it with [`apply_image_path`]."""
    output_dir = prepare_output_dir(output_dir, overwrite, sources=(checkpoint_dir,))
    model, processor = load_checkpoint(checkpoint_dir, dtype=torch.float32)
    text = set(text_path_names(model))
    state = model.state_dict()
    tensors = {
        name: tensor.detach().to(torch.float32 if name.startswith("model.vae.") else torch.bfloat16).contiguous()
        for name, tensor in state.items()
        if name not in text
    }
    fingerprint = text_path_fingerprint(model)
    metadata = {"text_path_fingerprint": fingerprint, **({"base_llm": base_llm} if base_llm else {})}
    save_file(tensors, output_dir / IMAGE_PATH_WEIGHTS, metadata=metadata)
    model.config.save_pretrained(output_dir)
    model.generation_config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    report = ConversionReport(title=f"extract-image-path: {checkpoint_dir} -> {output_dir}", output_dir=str(output_dir))
    report.kept = sorted(tensors)
    size = (output_dir / IMAGE_PATH_WEIGHTS).stat().st_size

    def numel(names) -> int:  # a tied weight once
        return sum({state[name].data_ptr(): state[name].numel() for name in names}.values())

    report.notes.append(
        f"image path: {numel(tensors):,} parameters, {size / 2**20:.1f} MiB; text path left out: {numel(text):,} "
        f"parameters (fingerprint {fingerprint[:12]})"
    )
    return report


def image_path_base_llm(image_path_dir: str | os.PathLike) -> str | None:
    """The name of the LLM an image path folder was saved for (`extract_image_path(base_llm=...)`), or `None`;
    raises `FileNotFoundError` for a folder that holds no image path."""
    weights = Path(image_path_dir) / IMAGE_PATH_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{image_path_dir} holds no image path: {IMAGE_PATH_WEIGHTS} is missing.")
    with safe_open(weights, framework="pt") as stored:
        return (stored.metadata() or {}).get("base_llm")


@torch.no_grad()
def load_with_image_path(
    llm_path: str | os.PathLike, image_path_dir: str | os.PathLike, gguf_file: str | None = None
) -> tuple[TransfusionForConditionalGeneration, object, list[str]]:
    """The whole model, in memory: the LLM in `llm_path` (its own folder, or `gguf_file` inside it) with the image
    path of `image_path_dir` on top. Refuses an LLM whose text path differs from the one the image path was trained
    on, and checks that text gives the LLM's logits. Returns `(model, processor, checks)`."""
    image_path_dir = Path(image_path_dir)
    image_path_base_llm(image_path_dir)  # a folder without an image path is refused here
    config = TransfusionConfig.from_pretrained(image_path_dir)
    load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32, **load_kwargs).eval()
    # The LLM's own tokens (a tokenizer with room to spare may hold the image tokens already: their rows are not its).
    vocab = min(llm.get_input_embeddings().num_embeddings, *config.image_token_ids)
    model = TransfusionForConditionalGeneration(config).eval()
    own = model.state_dict()  # shares the parameters' storage: copying into it loads them
    for name, tensor in llm.state_dict().items():
        ours = "lm_head.weight" if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)
        if ours not in own or tensor.shape[1:] != own[ours].shape[1:] or tensor.shape[0] > own[ours].shape[0]:
            raise ValueError(
                f"The LLM in {llm_path} does not fit this image path: its {name} {tuple(tensor.shape)} has no place "
                "in the image path's model."
            )
        own[ours][: tensor.shape[0]] = tensor
    weights = image_path_dir / IMAGE_PATH_WEIGHTS
    with safe_open(weights, framework="pt") as stored:
        expected = (stored.metadata() or {}).get("text_path_fingerprint")
        missing = set(own) - set(text_path_names(model)) - set(stored.keys())
        if missing or set(stored.keys()) - set(own):
            raise ValueError(
                f"{weights} does not fit its config: missing {sorted(missing)[:3]}, unknown "
                f"{sorted(set(stored.keys()) - set(own))[:3]}."
            )
        for name in stored.keys():
            own[name].copy_(stored.get_tensor(name))
    fingerprint = text_path_fingerprint(model)
    if fingerprint != expected:
        raise ValueError(
            f"The LLM in {llm_path} is not the one the image path in {image_path_dir} was trained on (text path "
            f"fingerprint {fingerprint[:12]}, expected {str(expected)[:12]}): its text would not be the model's."
        )
    processor = AutoProcessor.from_pretrained(image_path_dir)
    model.generation_config = GenerationConfig.from_pretrained(image_path_dir)
    checks = [f"text path fingerprint {fingerprint[:12]} matches the image path's"]
    with quiet_loading():
        checks.append(_check_text_logits(llm, model, processor.tokenizer, vocab))
    return model, processor, checks


def apply_image_path(
    llm_path: str | os.PathLike,
    image_path_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    gguf_file: str | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Puts the image path saved by [`extract_image_path`] on top of the LLM in `llm_path` (see
    [`load_with_image_path`]) and saves the whole model."""
    output_dir = prepare_output_dir(output_dir, overwrite, sources=(llm_path, image_path_dir))
    model, processor, checks = load_with_image_path(llm_path, image_path_dir, gguf_file)
    report = ConversionReport(
        title=f"apply-image-path: {llm_path} + {image_path_dir} -> {output_dir}", output_dir=str(output_dir)
    )
    report.checks += checks
    save_checkpoint(model, processor, output_dir, model.generation_config)
    return report


__all__ = [
    "IMAGE_PATH_WEIGHTS",
    "text_path_names",
    "text_path_fingerprint",
    "extract_image_path",
    "image_path_base_llm",
    "load_with_image_path",
    "apply_image_path",
]
