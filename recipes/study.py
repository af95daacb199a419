"""The equal-compute study of the paper's Table 3: Transfusion (diffusion on continuous VAE latents) against the same
transformer trained on discrete VQ image tokens (the Chameleon-style baseline of `recipes/discrete_baseline.py`).

Both models get the same data and mixture (image-caption pairs in both directions plus text-only documents), the same
backbone and text tokenizer, and the same optimiser recipe. Each is trained from scratch to each training-FLOP budget
with its best learning rate from a small sweep, then evaluated with the same judge and the same metric functions.

FLOPs are counted per training step from the batch itself, in the usual way (Kaplan et al. 2020): a training step
costs 3x its forward pass (backward = 2x forward). The forward pass costs 2 FLOPs per multiply-add of every weight
matrix a token passes through, and 2 x 2 x (attention width) FLOPs per attended query-key pair per layer (scores and
weighted sum), counting the pairs the mask allows: causal, plus both directions inside each Transfusion image. A text
token passes through the decoder layers and the LM head; a Transfusion image slot through the layers and the linear
patch encoder and decoder; a discrete image token through the layers and the (codebook-extended) LM head. Not
counted, for both: embedding look-ups, norms, activations, softmax, the timestep embedding (per image, not per
token), and the frozen autoencoders (their codes and latents are computed once, before training).

The study's state lives in one folder; every finished stage writes its result there, so a run interrupted at any
point resumes (`resume=True`) from the last finished stage, and a training run from its last `Trainer` checkpoint.
Runs are stored by model, budget and learning rate, so a resumed study may also change its budgets or learning rates
and reuses the runs it already has.
"""

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer

from modeling_transfusion import (
    TransfusionConfig,
    TransfusionForConditionalGeneration,
    TransfusionProcessor,
    TransfusionTrainer,
    train_caption_tokenizer,
)
from modeling_transfusion.recipes.classifier import JudgeCNN
from modeling_transfusion.recipes.data import CaptionMix, caption_corpus, parse_class, to_model_range
from modeling_transfusion.recipes.discrete_baseline import (
    DiscreteDataCollator,
    build_discrete_model,
    caption_images_discrete,
    encode_codes,
    generate_images_discrete,
    train_vq,
)
from modeling_transfusion.recipes.evaluation import (
    balanced_prompts,
    caption_images,
    generate_images,
    generated_image_metrics,
    text_perplexity,
)
from modeling_transfusion.recipes.figures import image_grid, plot_curves
from modeling_transfusion.recipes.training import (
    LatentCaptionDataset,
    LatentDataCollator,
    ModelSize,
    build_model,
    save_checkpoint,
    training_arguments,
)
from modeling_transfusion.recipes.vae import encode_latents, train_vae

MODELS = ("transfusion", "discrete")
# runs are stored by (model, budget, learning rate), so a resumed study may add or drop budgets and learning rates
RESUMABLE_CHANGES = ("budgets", "sweep_budget", "learning_rates")
# metric -> (label in tables and plots, True when higher is better)
METRICS = {
    "prompt_accuracy": ("prompt accuracy", True),
    "frechet_distance": ("Frechet distance", False),
    "captioning_accuracy": ("captioning accuracy", True),
    "text_perplexity": ("gloss perplexity", False),
}


# FLOP counting


@dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs of a batch (see the module docstring), for a Llama-style decoder.

    Args:
        num_layers: decoder layers.
        attention_width: `num_attention_heads * head_dim`.
        layer_weights: weights of the matrices of one decoder layer (q, k, v, o, gate, up, down).
        text_weights: weights a text token passes through after the layers (the LM head).
        image_weights: weights an image token passes through besides the layers (patch encoder and decoder, or the
            LM head).
        image_token_ids: `(first, end)`, the range of input ids that are image tokens.
        bidirectional_images: whether image tokens attend to each other in both directions (Transfusion).
    """

    num_layers: int
    attention_width: int
    layer_weights: int
    text_weights: int
    image_weights: int
    image_token_ids: tuple[int, int]
    bidirectional_images: bool

    @staticmethod
    def _layer(text_config) -> tuple[int, int]:
        hidden = text_config.hidden_size
        head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads
        width = text_config.num_attention_heads * head_dim
        kv_width = (text_config.num_key_value_heads or text_config.num_attention_heads) * head_dim
        return width, 2 * hidden * width + 2 * hidden * kv_width + 3 * hidden * text_config.intermediate_size

    @classmethod
    def for_transfusion(cls, config: TransfusionConfig) -> "FlopCounter":
        """The counter of a Transfusion model with the linear patch encoder."""
        if config.patch_encoder != "linear":
            raise ValueError(
                f"FLOP counting covers the linear patch encoder only, got patch_encoder={config.patch_encoder!r}."
            )
        text = config.text_config
        width, layer = cls._layer(text)
        return cls(
            num_layers=text.num_hidden_layers,
            attention_width=width,
            layer_weights=layer,
            text_weights=text.hidden_size * text.vocab_size,
            image_weights=2 * config.patch_dim * text.hidden_size,
            image_token_ids=(config.image_token_id, config.image_token_id + 1),
            bidirectional_images=True,
        )

    @classmethod
    def for_causal_lm(cls, text_config, first_image_token_id: int) -> "FlopCounter":
        """The counter of a causal LM whose ids from `first_image_token_id` on are image tokens."""
        width, layer = cls._layer(text_config)
        head = text_config.hidden_size * text_config.vocab_size
        return cls(
            num_layers=text_config.num_hidden_layers,
            attention_width=width,
            layer_weights=layer,
            text_weights=head,
            image_weights=head,
            image_token_ids=(first_image_token_id, text_config.vocab_size),
            bidirectional_images=False,
        )

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of one step on `batch` (`input_ids` and `attention_mask`, padding not counted)."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        image = (input_ids >= self.image_token_ids[0]) & (input_ids < self.image_token_ids[1]) & mask
        lengths = mask.sum(1).double()
        pairs = float((lengths * (lengths + 1) / 2).sum())
        if self.bidirectional_images:
            # each run of n image slots adds the n (n - 1) / 2 pairs that look forward inside it
            starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0))
            ends = image & ~torch.nn.functional.pad(image[:, 1:], (0, 1))
            runs = (ends.nonzero()[:, 1] - starts.nonzero()[:, 1] + 1).double()
            pairs += float((runs * (runs - 1) / 2).sum())
        tokens, images = float(lengths.sum()), float(image.sum())
        weights = tokens * self.layer_weights + (tokens - images) * self.text_weights + images * self.image_weights
        forward = 2 * weights + 4 * self.attention_width * self.num_layers * pairs
        return 3 * forward


class FlopCountingTrainer(Trainer):
    """`Trainer` whose `total_flos` (saved in `trainer_state.json`, restored on resume) is counted by a
    [`FlopCounter`] instead of transformers' 6 x parameters x tokens estimate."""

    def __init__(self, *args, flop_counter: FlopCounter, **kwargs):
        super().__init__(*args, **kwargs)
        self.flop_counter = flop_counter

    def floating_point_ops(self, inputs: dict) -> float:
        return self.flop_counter(inputs)


class FlopCountingTransfusionTrainer(FlopCountingTrainer, TransfusionTrainer):
    """[`TransfusionTrainer`] (logs `lm_loss` and `diffusion_loss`) counting FLOPs as [`FlopCountingTrainer`]."""


def parity_flop_ratio(
    transfusion: list[tuple[float, float]], discrete: list[tuple[float, float]], higher_is_better: bool
) -> dict:
    """The paper's parity FLOP ratio: the training FLOPs Transfusion needs to match the discrete model's value at its
    largest budget, over that budget. Points are `(flops, value)`; Transfusion's curve is interpolated linearly in
    log10 FLOPs.

    Returns `{"ratio": r, "kind": k}`: `"interpolated"` (read off the curve); `"at most"` (Transfusion's smallest
    budget already matches it, so the ratio is at most r); `"above"` (no budget matches it: the ratio exceeds r).
    """
    transfusion, discrete = sorted(transfusion), sorted(discrete)
    reference_flops, target = discrete[-1]

    def matches(value: float) -> bool:
        return value >= target if higher_is_better else value <= target

    if matches(transfusion[0][1]):
        return {"ratio": transfusion[0][0] / reference_flops, "kind": "at most"}
    for (flops_a, value_a), (flops_b, value_b) in zip(transfusion, transfusion[1:]):
        if matches(value_b):
            fraction = (target - value_a) / (value_b - value_a)
            log_flops = math.log10(flops_a) + fraction * (math.log10(flops_b) - math.log10(flops_a))
            return {"ratio": 10**log_flops / reference_flops, "kind": "interpolated"}
    return {"ratio": transfusion[-1][0] / reference_flops, "kind": "above"}


# configuration and data


@dataclass
class StudyConfig:
    """What the study trains and measures.

    Args:
        budgets: training FLOPs per run (each model is trained to each, from scratch).
        learning_rates: the peak learning rates swept, for each model, at `budgets[sweep_budget]`; the one with the
            lowest validation loss (the model's own training loss on held-out records) is used at every budget.
        size: the backbone, shared by both models (the patch encoder must be `"linear"`).
        text_share: fraction of training records that are text-only documents; the rest are image-caption pairs.
        caption_mix: how image-caption pairs are drawn (caption then image, image then caption).
        max_text_chars: documents longer than this are left out (keeps rows short).
        autoencoder_channels, latent_channels: the VAE's and the VQ autoencoder's shared architecture.
        codebook_size: the VQ codebook.
        num_validation: held-out training images (and as many documents) for the validation loss.
    """

    budgets: list[float]
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    sweep_budget: int = 1
    image_size: int = 32
    size: ModelSize = field(
        default_factory=lambda: ModelSize(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344, patch_encoder="linear"
        )
    )
    patch_size: int = 2
    batch_size: int = 32
    vocab_size: int = 1024
    text_share: float = 0.25
    caption_mix: CaptionMix = field(default_factory=lambda: CaptionMix(generation=0.7, captioning=0.3, text_only=0.0))
    max_text_chars: int = 160
    autoencoder_steps: int = 400
    autoencoder_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    latent_channels: int = 4
    codebook_size: int = 512
    num_validation: int = 256
    num_generated: int = 200
    num_captioned: int = 200
    num_perplexity: int = 1000
    guidance_scale: float = 3.0
    scheduler: str = "dpmsolver++"
    num_inference_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.size, dict):
            self.size = ModelSize(**self.size)
        if isinstance(self.caption_mix, dict):
            self.caption_mix = CaptionMix(**self.caption_mix)
        if len(self.budgets) < 1 or min(self.budgets) <= 0:
            raise ValueError(f"budgets must be positive training FLOPs, got {self.budgets}.")
        if not 0 <= self.sweep_budget < len(self.budgets):
            raise ValueError(f"sweep_budget {self.sweep_budget} is not an index of the {len(self.budgets)} budgets.")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates must be positive, got {self.learning_rates}.")
        if not 0 <= self.text_share < 1:
            raise ValueError(f"text_share must lie in [0, 1), got {self.text_share}.")
        if self.size.patch_encoder != "linear":
            raise ValueError("The study counts FLOPs for the linear patch encoder: set size.patch_encoder='linear'.")


@dataclass
class StudyData:
    """The study's real data: images `uint8 (n, size, size)` with class labels (a dataset of `recipes.data`, for the
    caption templates), and text-only documents. Test images feed the image metrics, test texts the perplexity."""

    dataset: str
    train_images: np.ndarray
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    train_texts: list[str]
    test_texts: list[str]


class TextDataset(torch.utils.data.Dataset):
    """Text-only training records `{"text": document}`."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.texts[index]}


# the study


class DiscreteVsContinuousStudy:
    """Runs the study in `out_dir` (see the module docstring). Every stage stores its result there; with `resume`,
    finished stages are read back instead of rerun. [`run`] returns the results dictionary (also `results.json`)."""

    def __init__(
        self,
        config: StudyConfig,
        data: StudyData,
        judge: JudgeCNN,
        out_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
    ):
        self.config, self.data, self.judge, self.progress = config, data, judge, progress
        self.out = Path(out_dir)
        state_file = self.out / "study_config.json"
        if self.out.exists() and any(self.out.iterdir()) and not resume:
            raise FileExistsError(f"{self.out} is not empty: pass resume=True (--resume) to continue the study there.")
        if resume and state_file.is_file():
            previous, current = json.loads(state_file.read_text()), json.loads(self._config_json())
            changed = sorted(
                key for key in current if key not in RESUMABLE_CHANGES and previous.get(key) != current[key]
            )
            if changed:
                raise ValueError(
                    f"{state_file} was written for another configuration ({', '.join(changed)} differ): resume with "
                    "the same settings (budgets and learning rates may change) or use a new output folder."
                )
        needed = 2 * config.num_generated + config.num_captioned
        if len(data.test_images) < needed:
            raise ValueError(
                f"Need at least {needed} test images (2 x num_generated + num_captioned), got {len(data.test_images)}."
            )
        if len(data.train_images) <= config.num_validation:
            raise ValueError(
                f"Need more than num_validation={config.num_validation} training images, got {len(data.train_images)}."
            )
        self.out.mkdir(parents=True, exist_ok=True)
        state_file.write_text(self._config_json())
        self._stage_times = self._read("stage_times.json") or {}

    def _config_json(self) -> str:
        return json.dumps(asdict(self.config), indent=2, default=float) + "\n"

    def _read(self, name: str) -> dict | None:
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, name: str, value: dict) -> None:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")

    def _timed(self, stage: str, started: tuple[float, float]) -> None:
        wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        self._stage_times[stage] = {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}
        self._write("stage_times.json", self._stage_times)

    # stages

    def plan(self) -> list[tuple[str, float, float]]:
        """The training runs `(model, budget, learning_rate)`: the sweep first, then the other budgets (with the
        chosen rate, known once the sweep is done: `None` until then)."""
        config = self.config
        sweep_budget = config.budgets[config.sweep_budget]
        runs = [(kind, sweep_budget, rate) for kind in MODELS for rate in config.learning_rates]
        chosen = self._read("sweep.json") or {}
        runs += [
            (kind, budget, chosen.get(kind)) for kind in MODELS for budget in config.budgets if budget != sweep_budget
        ]
        return runs

    def _prepare(self) -> None:
        """Tokenizer, VAE, VQ autoencoder, latents and codes (each made once and stored)."""
        config, data = self.config, self.data
        train_texts = [text for text in data.train_texts if len(text) <= config.max_text_chars]
        random.Random(config.seed).shuffle(train_texts)
        self.test_texts = [text for text in data.test_texts if len(text) <= config.max_text_chars][
            : config.num_perplexity
        ]
        tokenizer_dir = self.out / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            corpus = caption_corpus(data.dataset) * 4 + train_texts
            train_caption_tokenizer(corpus, vocab_size=config.vocab_size).save_pretrained(tokenizer_dir)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)

        pixels = to_model_range(data.train_images)
        test_pixels = to_model_range(data.test_images)
        channels = tuple(config.autoencoder_channels)
        if not (self.out / "vae" / "config.json").is_file():
            started = (time.perf_counter(), time.process_time())
            result = train_vae(
                pixels, test_pixels, steps=config.autoencoder_steps, latent_channels=config.latent_channels,
                block_out_channels=channels, seed=config.seed, log_every=0,
            )  # fmt: skip
            result.vae.save_pretrained(self.out / "vae")
            self._write("vae/metrics.json", {k: v for k, v in vars(result).items() if k != "vae"})
            self._timed("vae", started)
        if not (self.out / "vq" / "config.json").is_file():
            started = (time.perf_counter(), time.process_time())
            result = train_vq(
                pixels, test_pixels, steps=config.autoencoder_steps, codebook_size=config.codebook_size,
                latent_channels=config.latent_channels, block_out_channels=channels, seed=config.seed,
            )  # fmt: skip
            result.vq.save_pretrained(self.out / "vq")
            self._write("vq/metrics.json", {k: v for k, v in vars(result).items() if k != "vq"})
            self._timed("vq", started)
        self.vae = AutoencoderKL.from_pretrained(str(self.out / "vae")).eval()
        self.vq = VQModel.from_pretrained(str(self.out / "vq")).eval()

        cache = self.out / "encoded.safetensors"
        if not cache.is_file():
            started = (time.perf_counter(), time.process_time())
            shift = self.vae.config.shift_factor or 0.0
            latents = (encode_latents(self.vae, pixels) - shift) * self.vae.config.scaling_factor
            save_file(
                {
                    "latents": latents.contiguous(),
                    "codes": encode_codes(self.vq, pixels),
                    "test_codes": encode_codes(self.vq, test_pixels[: 2 * config.num_generated + config.num_captioned]),
                },
                cache,
            )
            self._timed("encode", started)
        encoded = load_file(cache)
        self.test_pixels, self.test_codes = test_pixels, encoded["test_codes"]

        # one processor for both models: the text tokenizer and the `<image>` expansion of Transfusion's layout
        reference = self.new_model("transfusion")
        self.processor = TransfusionProcessor.from_model_config(reference.config, self.tokenizer)
        self.transfusion_config = reference.config
        self.counters = {
            "transfusion": FlopCounter.for_transfusion(reference.config),
            "discrete": FlopCounter.for_causal_lm(
                self.new_model("discrete").config, first_image_token_id=len(self.tokenizer)
            ),
        }
        self.collators = {
            "transfusion": (LatentDataCollator(self.processor),) * 2,
            "discrete": (
                DiscreteDataCollator(self.processor, reference.config.condition_dropout_prob),
                DiscreteDataCollator(self.processor, condition_dropout_prob=0.0),
            ),
        }
        cut, labels = len(pixels) - config.num_validation, data.train_labels
        num_texts = round(config.text_share / (1 - config.text_share) * cut)
        if num_texts + config.num_validation > len(train_texts):
            raise ValueError(
                f"text_share {config.text_share} needs {num_texts + config.num_validation} documents of at most "
                f"{config.max_text_chars} characters, but only {len(train_texts)} are given."
            )
        texts, validation_texts = train_texts[:num_texts], train_texts[-config.num_validation :]
        self.datasets = {}
        for kind, images in (("transfusion", encoded["latents"]), ("discrete", encoded["codes"])):
            train = LatentCaptionDataset(images[:cut], labels[:cut], data.dataset, config.caption_mix, config.seed)
            held_out = LatentCaptionDataset(
                images[cut:], labels[cut:], data.dataset, config.caption_mix, config.seed + 1
            )
            self.datasets[kind] = (
                torch.utils.data.ConcatDataset([train, TextDataset(texts)]),
                torch.utils.data.ConcatDataset([held_out, TextDataset(validation_texts)]),
            )

    def new_model(self, kind: str):
        """A freshly initialised model (`"transfusion"` or `"discrete"`), seeded by the config."""
        config = self.config
        transfusion = build_model(
            self.tokenizer,
            self.vae,
            config.image_size,
            self.data.train_images.shape[-1] if self.data.train_images.ndim == 4 else 1,
            config.size,
            patch_size=config.patch_size,
            seed=config.seed,
        )
        if kind == "transfusion":
            return transfusion
        return build_discrete_model(transfusion.config, config.codebook_size, seed=config.seed)

    def mean_step_flops(self, kind: str, num_batches: int = 64) -> float:
        """Counted training FLOPs of an average batch of the training mixture (a fixed sample of `num_batches`)."""
        dataset, collator = self.datasets[kind][0], self.collators[kind][1]
        rng = random.Random(self.config.seed)
        total = 0.0
        for _ in range(num_batches):
            records = [dataset[rng.randrange(len(dataset))] for _ in range(self.config.batch_size)]
            total += self.counters[kind](collator(records))
        return total / num_batches

    def run_dir(self, kind: str, budget: float, learning_rate: float) -> Path:
        return self.out / "runs" / f"{kind}-{budget:.3g}-lr{learning_rate:g}"

    def train(self, kind: str, budget: float, learning_rate: float) -> dict:
        """Trains one model from scratch to `budget` counted FLOPs, saves it to `RUN/final` and returns the result."""
        folder = self.run_dir(kind, budget, learning_rate)
        done = folder / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        started = (time.perf_counter(), time.process_time())
        config = self.config
        step_flops = self.mean_step_flops(kind)
        max_steps = max(2, round(budget / step_flops))
        args = training_arguments(
            folder, max_steps, batch_size=config.batch_size, learning_rate=learning_rate,
            save_steps=max(1, max_steps // 4), logging_steps=max(1, max_steps // 25), seed=config.seed,
        )  # fmt: skip
        args.per_device_eval_batch_size = config.batch_size
        args.prediction_loss_only = True
        args.disable_tqdm = not self.progress
        trainer_class = FlopCountingTransfusionTrainer if kind == "transfusion" else FlopCountingTrainer
        train_collator, eval_collator = self.collators[kind]
        trainer = trainer_class(
            model=self.new_model(kind),
            args=args,
            train_dataset=self.datasets[kind][0],
            eval_dataset=self.datasets[kind][1],
            data_collator=train_collator,
            flop_counter=self.counters[kind],
        )
        has_checkpoint = any(folder.glob("checkpoint-*"))
        trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
        trainer.data_collator = eval_collator
        torch.manual_seed(config.seed)  # the same diffusion noise for every Transfusion run's validation loss
        validation_loss = trainer.evaluate()["eval_loss"]
        final = folder / "final"
        if kind == "transfusion":
            save_checkpoint(trainer.model, self.processor, final)
        else:
            trainer.model.save_pretrained(final)
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        self._timed(f"train {folder.name}", started)
        result = {
            "model": kind,
            "budget": budget,
            "learning_rate": learning_rate,
            "steps": trainer.state.global_step,
            "estimated_step_flops": step_flops,
            "flops": trainer.state.total_flos,
            "validation_loss": validation_loss,
            "log_history": trainer.state.log_history,
        }
        self._write(str(done.relative_to(self.out)), result)
        return result

    @torch.no_grad()
    def evaluate(self, kind: str, budget: float, learning_rate: float) -> dict:
        """Prompt accuracy, Frechet distance and seconds per image (text-to-image), captioning accuracy
        (image-to-text) and perplexity on held-out documents (text-only) of a trained run."""
        folder = self.run_dir(kind, budget, learning_rate)
        done = folder / "eval.json"
        if done.is_file():
            return json.loads(done.read_text())
        started = (time.perf_counter(), time.process_time())
        config, processor = self.config, self.processor
        targets, prompts = balanced_prompts(self.data.dataset, config.num_generated)
        held_out = slice(2 * config.num_generated, 2 * config.num_generated + config.num_captioned)
        if kind == "transfusion":
            model = TransfusionForConditionalGeneration.from_pretrained(folder / "final").eval()
            sampling = time.perf_counter()
            generated = generate_images(
                model, processor, prompts, seeds=[config.seed * 100_003 + i for i in range(len(prompts))],
                scheduler=config.scheduler, num_inference_steps=config.num_inference_steps,
                image_guidance_scale=config.guidance_scale,
            )  # fmt: skip
            sampling = time.perf_counter() - sampling
            captions = caption_images(model, processor, self.test_pixels[held_out])
        else:
            model = AutoModelForCausalLM.from_pretrained(folder / "final").eval()
            sampling = time.perf_counter()
            generated = generate_images_discrete(
                model, processor, self.vq, prompts, num_codes=self.test_codes.shape[1],
                guidance_scale=config.guidance_scale, seed=config.seed,
            )  # fmt: skip
            sampling = time.perf_counter() - sampling
            captions = caption_images_discrete(model, processor, self.test_codes[held_out])
        image_metrics = generated_image_metrics(
            self.judge, generated, targets, self.test_pixels, list(self.data.test_labels)
        )
        hits = [parse_class(c, self.data.dataset) == k for c, k in zip(captions, self.data.test_labels[held_out])]
        pictures = [row[0] for row in processor.postprocess_images(generated[:100])]
        image_grid(pictures, columns=10, scale=2).save(folder / "samples.png")
        result = {
            **image_metrics,
            "captioning_accuracy": sum(hits) / len(hits),
            "text_perplexity": text_perplexity(model, processor, self.test_texts),
            "seconds_per_image": sampling / len(prompts),
            "example_captions": captions[:5],
        }
        self._timed(f"eval {folder.name}", started)
        self._write(str(done.relative_to(self.out)), result)
        return result

    def choose_learning_rates(self) -> dict[str, float]:
        """The learning rate of each model with the lowest validation loss at the sweep budget (`sweep.json`)."""
        budget = self.config.budgets[self.config.sweep_budget]
        chosen = {}
        for kind in MODELS:
            losses = {rate: self.train(kind, budget, rate)["validation_loss"] for rate in self.config.learning_rates}
            chosen[kind] = min(losses, key=losses.get)
        self._write("sweep.json", chosen)
        return chosen

    def run(self) -> dict:
        """Runs (or resumes) every stage and writes `results.json` and the figure `metrics_vs_flops.png`."""
        config = self.config
        total = len(self.plan()) + len(MODELS) * len(config.budgets) + 2
        with tqdm(total=total, desc="study", disable=not self.progress) as bar:
            bar.set_postfix_str("tokenizer, autoencoders, encoding")
            self._prepare()
            bar.update(1)
            for kind, budget, rate in self.plan()[: len(MODELS) * len(config.learning_rates)]:
                bar.set_postfix_str(f"sweep {kind} {budget:.3g} FLOPs lr {rate:g}")
                self.train(kind, budget, rate)
                bar.update(1)
            chosen = self.choose_learning_rates()
            runs = {kind: [] for kind in MODELS}
            for kind in MODELS:
                for budget in config.budgets:
                    if budget != config.budgets[config.sweep_budget]:
                        bar.set_postfix_str(f"train {kind} {budget:.3g} FLOPs")
                        self.train(kind, budget, chosen[kind])
                        bar.update(1)
            for kind in MODELS:
                for budget in config.budgets:
                    bar.set_postfix_str(f"evaluate {kind} {budget:.3g} FLOPs")
                    trained = self.train(kind, budget, chosen[kind])
                    measured = self.evaluate(kind, budget, chosen[kind])
                    runs[kind].append(
                        {k: v for k, v in trained.items() if k != "log_history"}
                        | {k: v for k, v in measured.items() if k != "example_captions"}
                    )
                    bar.update(1)
            bar.set_postfix_str("results and figure")
            results = self._summarise(chosen, runs)
            bar.update(1)
        return results

    def _summarise(self, chosen: dict[str, float], runs: dict[str, list[dict]]) -> dict:
        sweep_budget = self.config.budgets[self.config.sweep_budget]
        sweep = [
            {
                "model": kind,
                "learning_rate": rate,
                "validation_loss": self.train(kind, sweep_budget, rate)["validation_loss"],
            }
            for kind in MODELS
            for rate in self.config.learning_rates
        ]
        parity = {
            metric: parity_flop_ratio(
                [(r["flops"], r[metric]) for r in runs["transfusion"]],
                [(r["flops"], r[metric]) for r in runs["discrete"]],
                higher_is_better,
            )
            for metric, (_, higher_is_better) in METRICS.items()
        }
        panels = {
            label: {kind: [(r["flops"], r[metric]) for r in runs[kind]] for kind in MODELS}
            for metric, (label, _) in METRICS.items()
        }
        plot_curves(panels, size=(1200, 320), x_label="FLOPs", log_x=True).save(self.out / "metrics_vs_flops.png")
        times = self._stage_times
        results = {
            "config": json.loads(self._config_json()),
            "autoencoders": {"vae": self._read("vae/metrics.json"), "vq": self._read("vq/metrics.json")},
            "text_vocabulary": len(self.tokenizer),
            "image_tokens_per_image": {
                "transfusion": self.transfusion_config.num_image_tokens,
                "discrete": int(self.test_codes.shape[1]),
            },
            "sweep": sweep,
            "learning_rates": chosen,
            "runs": runs,
            "parity_flop_ratios": parity,
            "stage_times": times,
            "total_wall_seconds": round(sum(t["wall_seconds"] for t in times.values()), 1),
            "total_cpu_seconds": round(sum(t["cpu_seconds"] for t in times.values()), 1),
        }
        self._write("results.json", results)
        return results


__all__ = [
    "FlopCounter",
    "FlopCountingTrainer",
    "FlopCountingTransfusionTrainer",
    "parity_flop_ratio",
    "StudyConfig",
    "StudyData",
    "TextDataset",
    "DiscreteVsContinuousStudy",
]
