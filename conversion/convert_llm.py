"""Building a Transfusion checkpoint from a pretrained causal LM (and, optionally, a pretrained VAE).

The LM's decoder becomes the backbone (`model.*`) and its head the LM head (`lm_head.*`), unchanged; `<boi>`, `<image>`
and `<eoi>` are added to the tokenizer (growing the embeddings where needed); the image layers (patch encoder and
decoder) start fresh; a diffusers `AutoencoderKL`, if given, is copied in as the frozen `vae`. Text-only behaviour is
unchanged, which the conversion checks by comparing the LM's logits before and after on a probe sentence.
"""

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..configuration_transfusion import TransfusionConfig
from ..experts_transfusion import copy_text_weights_to_experts
from ..modeling_transfusion import TransfusionForConditionalGeneration
from ..processing import TransfusionProcessor, add_image_tokens
from .checkpoint import load_vae, prepare_output_dir, quiet_loading, save_checkpoint, vae_config_dict
from .report import ConversionReport

# Prefixes of the parameters that Transfusion adds to a causal LM.
IMAGE_LAYER_PREFIXES = ("model.patch_encoder.", "model.patch_decoder.", "model.vae.")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Transfusion reads and writes text and images."
# Largest logit difference (relative to the logits' scale) the text check accepts: the backbone computes the same
# thing, but through a prebuilt attention mask, which may change the order of floating point operations.
TEXT_CHECK_TOLERANCE = 1e-4


def convert_from_llm(
    llm_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    vae_path: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    image_size: int | None = None,
    num_channels: int | None = None,
    patch_size: int = 2,
    patch_encoder: str = "linear",
    objective: str = "ddpm",
    modality_experts: bool = False,
    modality_experts_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    verify: bool = True,
    **config_kwargs,
) -> ConversionReport:
    """
    Builds a Transfusion checkpoint from a local Hugging Face causal LM and saves it with its tokenizer, processor and
    generation config.

    Args:
        llm_path (`str` or `os.PathLike`):
            Folder of a causal LM whose `*ForCausalLM` is a decoder under `model.` plus an `lm_head` (Llama, Qwen2,
            Mistral, SmolLM, ...), with its tokenizer.
        output_dir (`str` or `os.PathLike`): where to save the checkpoint; must be empty unless `overwrite`.
        vae_path (`str` or `os.PathLike`, *optional*):
            Folder of a diffusers `AutoencoderKL` (`config.json` + weights), or of a Transfusion checkpoint whose VAE to
            take (e.g. `checkpoints/transfusion-mnist-compose`). Without it, the model works on pixels (the
            identity autoencoder).
        gguf_file (`str`, *optional*): a GGUF file inside `llm_path` to load (de-quantised to `dtype`).
        image_size (`int`, *optional*):
            Side of the images in pixels; defaults to 32 times the VAE's downsampling factor (256 slots per image with
            `patch_size=2`).
        num_channels (`int`, *optional*): image channels; the VAE's `in_channels`, or 3 without a VAE.
        patch_size, patch_encoder, objective: as in [`TransfusionConfig`].
        modality_experts (`bool`, *optional*, defaults to `False`):
            Give image slots weights of their own in every layer, each image expert starting as a copy of its text
            module (LMFusion's initialisation); see [`TransfusionConfig`].
        modality_experts_rank (`int`, *optional*): low-rank experts of this rank instead of full copies.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the saved weights (the VAE stays
            float32).
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty `output_dir`.
        verify (`bool`, *optional*, defaults to `True`): check that the converted model gives the LM's logits on a
            probe sentence (raises `RuntimeError` otherwise).
        config_kwargs: further [`TransfusionConfig`] fields (`diffusion_loss_weight`, `unet_block_out_channels`, ...).

    Returns:
        [`ConversionReport`]: what was loaded, what was initialised and the result of the check.
    """
    llm_path = Path(llm_path)
    if not llm_path.is_dir():
        raise FileNotFoundError(f"The LLM folder {llm_path} does not exist.")
    output_dir = prepare_output_dir(output_dir, overwrite, sources=(llm_path, vae_path))
    report = ConversionReport(title=f"from-llm: {llm_path} -> {output_dir}", output_dir=str(output_dir))

    load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(llm_path, **load_kwargs)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, **load_kwargs).eval()
    text_config = llm.config
    if llm.base_model_prefix != "model" or not hasattr(llm, "lm_head"):
        raise ValueError(
            f"{type(llm).__name__} keeps its decoder under {llm.base_model_prefix!r}, but Transfusion's backbone takes "
            "the layout of Llama-style causal LMs: a decoder under `model.` and an `lm_head` (Llama, Qwen2, Mistral, "
            "SmolLM, ...)."
        )

    vae = None
    if vae_path is not None:
        vae = load_vae(vae_path)
        if num_channels is not None and num_channels != vae.config.in_channels:
            raise ValueError(f"num_channels={num_channels} but the VAE reads {vae.config.in_channels} channels.")
        num_channels = vae.config.in_channels
    num_channels = 3 if num_channels is None else num_channels
    downsample = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    image_size = 32 * downsample if image_size is None else image_size

    # The image token ids are placeholders until the tokens exist (add_image_tokens below sets the real ones).
    text_config_dict = text_config.to_dict()
    # A GGUF file is de-quantised on loading: the saved weights are plain `dtype` tensors, not quantised ones.
    if text_config_dict.pop("quantization_config", None) is not None:
        report.notes.append(f"de-quantised {gguf_file or 'the quantised weights'} to {dtype}")
    config = TransfusionConfig(
        text_config=text_config_dict,
        vae_config=vae_config_dict(vae) if vae is not None else None,
        image_size=image_size,
        num_channels=num_channels,
        latent_channels=vae.config.latent_channels if vae is not None else num_channels,
        patch_size=patch_size,
        patch_encoder=patch_encoder,
        objective=objective,
        boi_token_id=0,
        eoi_token_id=1,
        image_token_id=2,
        **config_kwargs,
    )

    llm_state = llm.state_dict()
    with quiet_loading():  # the image layers are "missing" from the LM; the report lists them
        model, info = TransfusionForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=llm_state, dtype=dtype, output_loading_info=True
        )
    missing = sorted(info["missing_keys"])
    not_image = [name for name in missing if not name.startswith(IMAGE_LAYER_PREFIXES)]
    if not_image or info["mismatched_keys"]:
        raise ValueError(
            f"The weights of {llm_path} ({type(llm).__name__}) do not fit the Transfusion backbone: missing "
            f"{not_image[:5]}{' ...' if len(not_image) > 5 else ''}, mismatched {sorted(info['mismatched_keys'])[:5]}. "
            "The converter supports causal LMs made of a decoder under `model.` and an `lm_head` (Llama, Qwen2, "
            "Mistral, SmolLM, ...)."
        )
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
        report.replaced = sorted(f"model.vae.{name}" for name in vae.state_dict())
    report.kept = sorted(set(model.state_dict()) - set(missing))
    report.initialised = [f"{name} (new image layer)" for name in missing if not name.startswith("model.vae.")]
    report.dropped = sorted(info["unexpected_keys"])

    old_vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        report.notes.append(f"the tokenizer had no pad token: it pads with its EOS token {tokenizer.eos_token!r}")
    with quiet_loading():
        ids = add_image_tokens(tokenizer, model)
    new_vocab = model.get_input_embeddings().num_embeddings
    report.notes.append(
        "special tokens <boi>, <image>, <eoi> have ids "
        f"{ids['boi_token_id']}, {ids['image_token_id']}, {ids['eoi_token_id']}"
    )
    if new_vocab != old_vocab:
        report.notes.append(
            f"embeddings{' and LM head' if not model.config.tie_word_embeddings else ' (tied to the LM head)'} resized "
            f"from {old_vocab} to {new_vocab} rows; the new rows start at the mean of the old ones"
        )
    if vae is not None:
        report.notes.append(
            f"VAE from {vae_path}: {num_channels} image channels -> {vae.config.latent_channels} latent channels, "
            f"downsampling x{downsample}"
        )
    report.notes.append(
        f"images: {image_size}x{image_size} px, {num_channels} channel{'s' if num_channels > 1 else ''}, latent "
        f"{config.latent_size}x{config.latent_size}x{config.latent_channels}, patch {patch_size} -> "
        f"{config.num_image_tokens} slots each"
    )

    if modality_experts:
        model = _with_image_experts(model, modality_experts_rank, report)
    if verify:
        report.checks.append(_check_text_logits(llm, model, tokenizer, old_vocab))
    generation_config = _generation_config(llm.generation_config, tokenizer)
    del llm

    # An instruct LM's chat template is kept, so that chats are formatted as the LM was trained (the processor's
    # default template would replace it: both are saved as the folder's chat template).
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if chat_template is not None:
        report.notes.append("chat template: the LM's, kept (images go in as <image> markers in the message text)")
    processor = TransfusionProcessor.from_model_config(model.config, tokenizer, chat_template=chat_template)
    save_checkpoint(model, processor, output_dir, generation_config)
    return report


@torch.no_grad()
def _with_image_experts(model, rank: int | None, report: ConversionReport) -> TransfusionForConditionalGeneration:
    """The converted model with modality experts, each image expert a copy of its text module (LMFusion's
    initialisation; a low-rank expert starts with a zero delta), and the image tokens' rows copied from the resized
    embedding."""
    config = TransfusionConfig(**{**model.config.to_dict(), "modality_experts": True, "modality_experts_rank": rank})
    experts = TransfusionForConditionalGeneration(config).to(model.dtype)
    if experts.model.vae is not None:
        experts.model.vae.float()  # the VAE stays float32
    missing, unexpected = experts.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"The model with image experts does not take the weights {unexpected[:5]}.")
    count = copy_text_weights_to_experts(experts.model.language_model)
    with torch.no_grad():
        for rows in (experts.get_input_embeddings(), experts.get_output_embeddings()):
            rows.image_tokens_weight.copy_(rows.weight[config.image_token_ids])
    kind = f"low-rank (rank {rank}) experts, each starting at a zero delta" if rank else "full copies"
    report.initialised += [f"{name} (image expert)" for name in missing if name != "lm_head.weight"]
    report.notes.append(
        f"modality experts: {count} image experts beside the text modules ({kind} of their text layers, LMFusion's "
        "initialisation); the rows of <boi>, <eoi>, <image> in the embeddings and the LM head moved to the image path "
        "(image_tokens_weight)"
    )
    return experts.eval()


@torch.no_grad()
def _check_text_logits(llm, model, tokenizer, vocab_size: int) -> str:
    """Compares the LM's and the converted model's logits (over the LM's vocabulary) on a probe sentence."""
    input_ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    expected = llm(input_ids=input_ids).logits[..., :vocab_size].float()
    actual = model.eval()(input_ids=input_ids).logits[..., :vocab_size].float()
    difference = (expected - actual).abs().max().item()
    scale = expected.abs().max().item()
    if difference > TEXT_CHECK_TOLERANCE * max(scale, 1.0):
        raise RuntimeError(
            f"The converted model does not reproduce the LM's text logits: max |difference| {difference:.3g} (logits "
            f"up to {scale:.3g}). The backbone did not load as it should."
        )
    same_argmax = bool((expected.argmax(-1) == actual.argmax(-1)).all())
    return (
        f"text logits on a {input_ids.shape[1]}-token probe match the LM's: max |difference| {difference:.3g}"
        f"{', same next-token choices' if same_argmax else ''}"
    )


def _generation_config(llm_generation_config: GenerationConfig, tokenizer) -> GenerationConfig:
    """The LM's generation settings (sampling defaults of instruct models included), with a pad token, saved as a
    standalone generation config so that custom entries survive reloading."""
    settings = llm_generation_config.to_diff_dict()
    for name in ("transformers_version", "_from_model_config"):
        settings.pop(name, None)
    settings.setdefault("bos_token_id", tokenizer.bos_token_id)
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    settings["pad_token_id"] = tokenizer.pad_token_id
    return GenerationConfig(**{name: value for name, value in settings.items() if value is not None})


__all__ = ["convert_from_llm"]
