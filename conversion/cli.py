"""The `transfusion-convert` command line (also `python -m modeling_transfusion.conversion`)."""

import argparse
import sys

import torch

from .convert_llm import convert_from_llm
from .convert_vae import convert_from_vae
from .export_hub import export_to_hub
from .image_path import apply_image_path, extract_image_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `transfusion-convert`, with one sub-command per conversion."""
    parser = argparse.ArgumentParser(
        prog="transfusion-convert",
        description="Build, modify and export Transfusion checkpoints. Output folders must be empty unless "
        "--overwrite is given.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    llm = commands.add_parser(
        "from-llm",
        help="build a Transfusion checkpoint from a local causal LM (and optionally a diffusers AutoencoderKL)",
        description="Loads the LM's decoder and head unchanged, adds <boi>/<image>/<eoi> to the tokenizer (growing "
        "the embeddings where needed), initialises the image layers, and saves model, tokenizer, processor and "
        "generation config. Checks that text logits are unchanged (--no-verify skips it).",
    )
    llm.add_argument("llm_dir", help="folder of a Hugging Face causal LM with its tokenizer")
    llm.add_argument("output_dir", help="where to save the Transfusion checkpoint")
    llm.add_argument(
        "--vae",
        dest="vae_dir",
        help="folder of a diffusers AutoencoderKL, or a Transfusion checkpoint whose VAE to take (default: none: "
        "pixels)",
    )
    llm.add_argument("--gguf-file", help="a GGUF file inside llm_dir to load instead of safetensors")
    llm.add_argument("--image-size", type=int, help="image side in pixels (default: 32 x the VAE's downsampling)")
    llm.add_argument("--num-channels", type=int, help="image channels (default: the VAE's, or 3)")
    llm.add_argument("--patch-size", type=int, default=2, help="latent pixels per patch side (default: 2)")
    llm.add_argument("--patch-encoder", choices=("linear", "unet"), default="linear")
    llm.add_argument("--objective", choices=("ddpm", "flow"), default="ddpm")
    llm.add_argument(
        "--modality-experts",
        action="store_true",
        help="give image slots their own weights in every layer, each image expert a copy of its text layer",
    )
    llm.add_argument("--experts-rank", type=int, help="with --modality-experts: low-rank experts of this rank")
    llm.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    llm.add_argument("--no-verify", dest="verify", action="store_false", help="skip the text-logits check")
    llm.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    vae = commands.add_parser(
        "from-vae",
        help="swap a diffusers AutoencoderKL into a Transfusion checkpoint (or attach one)",
        description="Replaces the checkpoint's VAE ('none' removes it: the model then works on pixels), keeps every "
        "layer whose shape still fits and re-initialises the others, and reports which is which.",
    )
    vae.add_argument("checkpoint_dir", help="a Transfusion checkpoint")
    vae.add_argument("vae_dir", help="folder of a diffusers AutoencoderKL, or 'none'")
    vae.add_argument("output_dir", help="where to save the result")
    vae.add_argument("--image-size", type=int, help="new image side in pixels (default: the checkpoint's)")
    vae.add_argument("--patch-size", type=int, help="new patch size (default: the checkpoint's)")
    vae.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    hub = commands.add_parser(
        "export-hub",
        help="write a self-contained folder that loads with trust_remote_code=True, without this package",
    )
    hub.add_argument("checkpoint_dir", help="a Transfusion checkpoint")
    hub.add_argument("output_dir", help="where to write the Hub folder")
    hub.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    extract = commands.add_parser(
        "extract-image-path",
        help="save the image path of a model with modality experts alone (to apply on top of its LLM)",
    )
    extract.add_argument("checkpoint_dir", help="a Transfusion checkpoint with modality experts")
    extract.add_argument("output_dir", help="where to write the image path")
    extract.add_argument(
        "--base-llm",
        choices=["smollm2"],
        help="record the LLM it applies to, so that `transfusion generate --model OUTPUT_DIR` puts it on top by itself "
        "(smollm2: the SmolLM2-135M of `transfusion data install --only smollm2`)",
    )
    extract.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")

    apply = commands.add_parser(
        "apply-image-path",
        help="put an image path on top of the LLM it was trained on and save the whole model",
    )
    apply.add_argument("llm_dir", help="folder of the causal LM the image path was trained on")
    apply.add_argument("image_path_dir", help="a folder written by extract-image-path")
    apply.add_argument("output_dir", help="where to save the Transfusion checkpoint")
    apply.add_argument("--gguf-file", help="a GGUF file inside llm_dir to load instead of safetensors")
    apply.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `transfusion-convert` with `argv` (default: `sys.argv[1:]`), prints the conversion report and returns
    the exit status (0 on success; 1, with a one-line error, when the inputs are wrong)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "from-llm":
            report = convert_from_llm(
                args.llm_dir,
                args.output_dir,
                vae_path=args.vae_dir,
                gguf_file=args.gguf_file,
                image_size=args.image_size,
                num_channels=args.num_channels,
                patch_size=args.patch_size,
                patch_encoder=args.patch_encoder,
                objective=args.objective,
                modality_experts=args.modality_experts,
                modality_experts_rank=args.experts_rank,
                dtype=DTYPES[args.dtype],
                overwrite=args.overwrite,
                verify=args.verify,
            )
        elif args.command == "from-vae":
            report = convert_from_vae(
                args.checkpoint_dir,
                None if args.vae_dir.lower() == "none" else args.vae_dir,
                args.output_dir,
                image_size=args.image_size,
                patch_size=args.patch_size,
                overwrite=args.overwrite,
            )
        elif args.command == "export-hub":
            report = export_to_hub(args.checkpoint_dir, args.output_dir, overwrite=args.overwrite)
        elif args.command == "extract-image-path":
            report = extract_image_path(
                args.checkpoint_dir, args.output_dir, base_llm=args.base_llm, overwrite=args.overwrite
            )
        else:
            report = apply_image_path(
                args.llm_dir, args.image_path_dir, args.output_dir, gguf_file=args.gguf_file, overwrite=args.overwrite
            )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError, RuntimeError) as error:
        print(f"transfusion-convert {args.command}: error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


__all__ = ["build_parser", "main"]
