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
patch encoder and decoder; a discrete image token through the layers and the (codebook-extended) LM head. With the
U-Net patch encoder, each image instead costs the U-Net's down and up blocks: 2 FLOPs per multiply-add of every
convolution (per output element: input channels per group x kernel area) and linear layer in them, counted on one
image of the study's size. Not counted, for all: embedding look-ups, norms, activations, softmax, resampling, the
timestep embedding (per image, not per token), and the frozen autoencoders (their codes and latents are computed once,
before training).

The study's state lives in one folder; every finished stage writes its result there, so a run interrupted at any
point resumes (`resume=True`) from the last finished stage, and a training run from its last `Trainer` checkpoint.
Runs are stored by model, budget, learning rate and seed, so a resumed study may also change its budgets, learning
rates, sweep budgets and seeds and reuses the runs it already has. Every run and the results record the package
version and git commit that produced them, and the CPU time they took.

Uncertainty: an accuracy over n images has the binomial standard error sqrt(p (1 - p) / n) (pooled over the seeds of
a point); the Frechet distance and the perplexity have the standard error of the mean over the seeds (none for a
point with one seed). A parity ratio's interval is the range of the ratios of every pairing of one Transfusion seed's
curve with one discrete seed's value at the largest budget.

The paper reads its parity ratios at the discrete model's largest budget only. Where both models saturate there, the
ratio at each of the discrete model's budgets (Transfusion's FLOPs to match its value at that budget, over the FLOPs
it took) shows where, along the budgets, Transfusion falls behind, draws level or overtakes.
"""

import importlib.metadata
import itertools
import json
import math
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
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
from modeling_transfusion.modeling_transfusion import PATCH_DECODERS, PATCH_ENCODERS
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
# runs are stored by (model, budget, learning rate, seed), so a resumed study may add or drop any of them
RESUMABLE_CHANGES = (
    "budgets", "sweep_budgets", "learning_rates", "num_seeds", "seeded_budgets", "variants", "variant_budgets",
    "variant_seeds",
)  # fmt: skip
# the layout of the study's folder; a folder of another layout is refused on resume
STUDY_LAYOUT = 2
# what a record of the study's folder (kept where the folder itself is not, e.g. between machines) may leave out, and
# the study still resumes from it: the runs' weights and checkpoints (a run is finished once it is evaluated) and the
# caches of latents and codes (encoded again from the stored autoencoders)
WEIGHTS_NOT_RECORDED = ("final", "checkpoint-*", "encoded.safetensors", "*-codes.safetensors")
# metric -> (label in tables and plots, True when higher is better)
METRICS = {
    "prompt_accuracy": ("prompt accuracy", True),
    "frechet_distance": ("Frechet distance", False),
    "captioning_accuracy": ("captioning accuracy", True),
    "text_perplexity": ("gloss perplexity", False),
}
# metrics whose standard error is binomial over the images measured (the others': the spread over seeds)
ACCURACIES = ("prompt_accuracy", "captioning_accuracy")


def provenance() -> dict:
    """The package version and the git commit (with `dirty` when the tree has uncommitted changes) of this code."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"version": importlib.metadata.version("modeling-transfusion"), "commit": commit, "dirty": dirty}


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
        image_flops: forward FLOPs per image besides the per-token ones (the U-Net patch encoder and decoder); each
            run of image tokens is one image.
    """

    num_layers: int
    attention_width: int
    layer_weights: int
    text_weights: int
    image_weights: int
    image_token_ids: tuple[int, int]
    bidirectional_images: bool
    image_flops: float = 0.0

    @staticmethod
    def _layer(text_config) -> tuple[int, int]:
        hidden = text_config.hidden_size
        head_dim = getattr(text_config, "head_dim", None) or hidden // text_config.num_attention_heads
        width = text_config.num_attention_heads * head_dim
        kv_width = (text_config.num_key_value_heads or text_config.num_attention_heads) * head_dim
        return width, 2 * hidden * width + 2 * hidden * kv_width + 3 * hidden * text_config.intermediate_size

    @classmethod
    def for_transfusion(cls, config: TransfusionConfig) -> "FlopCounter":
        """The counter of a Transfusion model (linear or U-Net patch encoder)."""
        text = config.text_config
        width, layer = cls._layer(text)
        linear = config.patch_encoder == "linear"
        return cls(
            num_layers=text.num_hidden_layers,
            attention_width=width,
            layer_weights=layer,
            text_weights=text.hidden_size * text.vocab_size,
            image_weights=2 * config.patch_dim * text.hidden_size if linear else 0,
            image_token_ids=(config.image_token_id, config.image_token_id + 1),
            bidirectional_images=True,
            image_flops=0.0 if linear else unet_flops(config),
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
        starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0))
        if self.bidirectional_images:
            # each run of n image slots adds the n (n - 1) / 2 pairs that look forward inside it
            ends = image & ~torch.nn.functional.pad(image[:, 1:], (0, 1))
            runs = (ends.nonzero()[:, 1] - starts.nonzero()[:, 1] + 1).double()
            pairs += float((runs * (runs - 1) / 2).sum())
        tokens, images = float(lengths.sum()), float(image.sum())
        weights = tokens * self.layer_weights + (tokens - images) * self.text_weights + images * self.image_weights
        forward = 2 * weights + 4 * self.attention_width * self.num_layers * pairs
        return 3 * (forward + float(starts.sum()) * self.image_flops)


def unet_flops(config: TransfusionConfig) -> float:
    """Forward FLOPs of the U-Net patch encoder and decoder of `config` on one image of `config.image_size`: 2 per
    multiply-add of every convolution and linear layer, the shared timestep embedding left out."""
    encoder, decoder = PATCH_ENCODERS["unet"](config), PATCH_DECODERS["unet"](config)
    flops = []

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * math.prod(module.kernel_size)
            flops.append(2 * output.numel() * kernel)
        else:
            flops.append(2 * output.numel() * module.in_features)

    for name, module in [*encoder.named_modules(), *decoder.named_modules()]:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not name.startswith("time_embedding"):
            module.register_forward_hook(count)
    size = config.image_size // config.vae_downsample_factor
    with torch.no_grad():
        slots, state, _ = encoder(torch.zeros(1, config.latent_channels, size, size), torch.zeros(1))
        decoder(slots, state)
    return float(sum(flops))


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


def parity_interval(
    transfusion_seeds: list[list[tuple[float, float]]],
    discrete_seeds: list[list[tuple[float, float]]],
    higher_is_better: bool,
) -> tuple[float, float]:
    """The range of [`parity_flop_ratio`] over every pairing of one Transfusion curve with one discrete curve (one
    curve per seed, each a list of `(flops, value)`)."""
    ratios = [
        parity_flop_ratio(curve, reference, higher_is_better)["ratio"]
        for curve, reference in itertools.product(transfusion_seeds, discrete_seeds)
    ]
    return min(ratios), max(ratios)


def summarise_seeds(runs: list[dict], num_images: dict[str, int]) -> dict:
    """One point of the curves from the runs of its seeds: the mean of every metric and its standard error
    (`{metric}_se`, see the module docstring; `None` for a seed-spread error of one seed). `num_images` maps each
    accuracy to the images it was measured on, per run."""
    point = {"seeds": [run["seed"] for run in runs], "flops": float(np.mean([run["flops"] for run in runs]))}
    for metric in METRICS:
        values = np.array([run[metric] for run in runs], dtype=np.float64)
        point[metric] = float(values.mean())
        if metric in ACCURACIES:
            p = point[metric]
            point[f"{metric}_se"] = math.sqrt(p * (1 - p) / (num_images[metric] * len(runs)))
        else:
            point[f"{metric}_se"] = float(values.std(ddof=1) / math.sqrt(len(runs))) if len(runs) > 1 else None
    return point


# configuration and data


@dataclass
class StudyConfig:
    """What the study trains and measures.

    Args:
        budgets: training FLOPs per run (each model is trained to each, from scratch).
        learning_rates: the peak learning rates swept, for each model, at each of `budgets[i]` for `i` in
            `sweep_budgets`; the one with the lowest validation loss (the model's own training loss on held-out
            records) at the sweep budget nearest in log FLOPs (the smaller on a tie) is used at every budget.
        sweep_budgets: indices into `budgets` of the budgets the learning rates are swept at.
        num_seeds: seeds (`seed`, `seed + 1`, ...) of every run at the `seeded_budgets` largest budgets; the other
            budgets, and the sweep, use `seed` alone. A run's seed sets its initialisation, data order and sampling.
        seeded_budgets: how many of the largest budgets get `num_seeds` seeds.
        variants: further models, trained at the `variant_budgets` largest budgets (`variant_seeds` seeds) at the
            learning rate chosen for their base model: `"transfusion-unet"` (Transfusion with the U-Net patch encoder
            of `size.unet_block_out_channels`, its FLOPs counted too) and `"discrete-N"` (the discrete baseline on a
            VQ autoencoder with a codebook of N codes, e.g. `"discrete-16"`).
        variant_budgets: how many of the largest budgets the variants are trained at.
        variant_seeds: seeds of a variant at the seeded budgets, at most `num_seeds` (`None`: `num_seeds`, as the
            two models); fewer seeds give the variant no interval but cost a fraction of the variants' runs.
        size: the backbone, shared by both models (the patch encoder must be `"linear"`). Its
            `unet_block_out_channels` are the `"transfusion-unet"` variant's: the default [16, 32] costs about as many
            FLOPs per 32x32 image (6.7e6 forward) as the linear model's 16 slots do in the decoder layers.
        text_share: fraction of training records that are text-only documents; the rest are image-caption pairs.
        caption_mix: how image-caption pairs are drawn (caption then image, image then caption).
        max_text_chars: documents longer than this are left out (keeps rows short).
        autoencoder_channels, latent_channels: the VAE's and the VQ autoencoder's shared architecture.
        codebook_size: the VQ codebook.
        num_validation: held-out training images (and as many documents) for the validation loss.
        num_generated, num_captioned: images per run for the text-to-image metrics and for captioning accuracy.
        seed: the seed of the shared parts (tokenizer, autoencoders, data mixture) and of each run's first seed.
    """

    budgets: list[float]
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    sweep_budgets: list[int] = field(default_factory=lambda: [1, -1])
    num_seeds: int = 3
    seeded_budgets: int = 2
    variants: list[str] = field(default_factory=lambda: ["transfusion-unet", "discrete-16"])
    variant_budgets: int = 2
    variant_seeds: int | None = None
    image_size: int = 32
    size: ModelSize = field(
        default_factory=lambda: ModelSize(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=344,
            patch_encoder="linear",
            unet_block_out_channels=[16, 32],
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
    num_generated: int = 500
    num_captioned: int = 500
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
        if self.budgets != sorted(self.budgets):
            raise ValueError(f"budgets must be in increasing order, got {self.budgets}.")
        if not self.sweep_budgets or any(not -len(self.budgets) <= i < len(self.budgets) for i in self.sweep_budgets):
            raise ValueError(f"sweep_budgets {self.sweep_budgets} are not indices of the {len(self.budgets)} budgets.")
        if self.num_seeds < 1 or self.seeded_budgets < 0:
            raise ValueError(
                f"num_seeds must be at least 1 and seeded_budgets at least 0, got {self.num_seeds} and "
                f"{self.seeded_budgets}."
            )
        if self.variants and not 1 <= self.variant_budgets <= len(self.budgets):
            raise ValueError(f"variant_budgets must lie in [1, {len(self.budgets)}], got {self.variant_budgets}.")
        if self.variant_seeds is not None and not 1 <= self.variant_seeds <= self.num_seeds:
            raise ValueError(f"variant_seeds must lie in [1, num_seeds={self.num_seeds}], got {self.variant_seeds}.")
        for variant in self.variants:
            base, _, option = variant.partition("-")
            if not (variant == "transfusion-unet" or (base == "discrete" and option.isdigit() and int(option) >= 2)):
                raise ValueError(f"Unknown variant {variant!r}: use 'transfusion-unet' or 'discrete-N' (N codes).")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning_rates must be positive, got {self.learning_rates}.")
        if not 0 <= self.text_share < 1:
            raise ValueError(f"text_share must lie in [0, 1), got {self.text_share}.")
        if self.size.patch_encoder != "linear":
            raise ValueError("The study counts FLOPs for the linear patch encoder: set size.patch_encoder='linear'.")

    @property
    def models(self) -> list[str]:
        """The two models, then the variants."""
        return [*MODELS, *self.variants]

    def budgets_of(self, kind: str) -> list[float]:
        """The budgets `kind` is trained at."""
        return self.budgets if kind in MODELS else self.budgets[len(self.budgets) - self.variant_budgets :]

    def codebook_size_of(self, kind: str) -> int:
        """The VQ codebook of a discrete model."""
        return int(kind.partition("-")[2]) if "-" in kind else self.codebook_size

    def seeds(self, budget: float, kind: str = MODELS[0]) -> list[int]:
        """The seeds of `kind`'s runs at `budget`."""
        if budget not in self.budgets[len(self.budgets) - self.seeded_budgets :]:
            return [self.seed]
        count = self.num_seeds if kind in MODELS or self.variant_seeds is None else self.variant_seeds
        return [self.seed + i for i in range(count)]

    def sweep_budget_for(self, budget: float) -> float:
        """The sweep budget whose chosen rate is used at `budget` (the nearest in log FLOPs, the smaller on a tie)."""
        swept = sorted({self.budgets[i] for i in self.sweep_budgets})
        return min(swept, key=lambda b: (abs(math.log(budget / b)), b))


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
            if previous.get("layout") != STUDY_LAYOUT:
                raise ValueError(
                    f"{state_file} was written by an older version of the study (runs without seeds, one sweep "
                    f"budget; layout {previous.get('layout', 1)}, this code reads layout {STUDY_LAYOUT}): its runs "
                    "cannot be reused; use a new output folder."
                )
            changed = sorted(
                key for key in current if key not in RESUMABLE_CHANGES and previous.get(key) != current[key]
            )
            if changed:
                raise ValueError(
                    f"{state_file} was written for another configuration ({', '.join(changed)} differ): resume with "
                    "the same settings (budgets, sweep budgets, learning rates and seeds may change) or use a new "
                    "output folder."
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
        return json.dumps({"layout": STUDY_LAYOUT, **asdict(self.config)}, indent=2, default=float) + "\n"

    def _read(self, name: str) -> dict | None:
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, name: str, value: dict) -> None:
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")

    def _timed(self, stage: str, started: tuple[float, float]) -> dict:
        """Records (in `stage_times.json`) and returns the wall and CPU seconds of `stage` since `started`."""
        wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
        self._stage_times[stage] = {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2)}
        self._write("stage_times.json", self._stage_times)
        return self._stage_times[stage]

    # stages

    def sweep_runs(self) -> list[tuple[str, float, float, int]]:
        """The sweep's training runs `(model, budget, learning_rate, seed)`, smallest sweep budget first."""
        config = self.config
        swept = sorted({config.budgets[i] for i in config.sweep_budgets})
        return [
            (kind, budget, rate, config.seed) for budget in swept for kind in MODELS for rate in config.learning_rates
        ]

    def point_runs(self) -> list[tuple[str, float, float | None, int]]:
        """The runs `(model, budget, learning_rate, seed)` that are evaluated: every seed of every budget of every
        model, with the learning rate chosen for it and its base model (known once the sweep is done: `None` until
        then)."""
        config, chosen = self.config, self._read("sweep.json") or {}
        return [
            (kind, budget, chosen.get(f"{config.sweep_budget_for(budget):.3g}", {}).get(kind.partition("-")[0]), seed)
            for kind in config.models
            for budget in config.budgets_of(kind)
            for seed in config.seeds(budget, kind)
        ]

    def plan(self) -> list[tuple[str, float, float | None, int]]:
        """Every run `(model, budget, learning_rate, seed)`, each trained and then evaluated: the sweep, then the point
        runs it has not made. A sweep run is evaluated as soon as it is trained too, so that a finished run needs only
        its records (`result.json`, `eval.json`), never its weights again: a study folder without them resumes."""
        runs = self.sweep_runs()
        swept = {(kind, budget, seed) for kind, budget, _, seed in runs}
        return runs + [
            (kind, budget, rate, seed)
            for kind, budget, rate, seed in self.point_runs()
            if (kind, budget, rate, seed) not in runs and (rate is not None or (kind, budget, seed) not in swept)
        ]

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
        self.vae = AutoencoderKL.from_pretrained(str(self.out / "vae")).eval()
        cache = self.out / "encoded.safetensors"
        if not cache.is_file():
            started = (time.perf_counter(), time.process_time())
            shift = self.vae.config.shift_factor or 0.0
            latents = (encode_latents(self.vae, pixels) - shift) * self.vae.config.scaling_factor
            save_file({"latents": latents.contiguous()}, cache)
            self._timed("encode", started)
        images = {"transfusion": load_file(cache)["latents"]}
        self.test_pixels, self.vqs, self.test_codes = test_pixels, {}, {}
        for kind in config.models:
            if not kind.startswith("discrete"):
                images[kind] = images["transfusion"]
                continue
            codebook = config.codebook_size_of(kind)
            name = "vq" if codebook == config.codebook_size else f"vq-{codebook}"
            if not (self.out / name / "config.json").is_file():
                started = (time.perf_counter(), time.process_time())
                result = train_vq(
                    pixels, test_pixels, steps=config.autoencoder_steps, codebook_size=codebook,
                    latent_channels=config.latent_channels, block_out_channels=channels, seed=config.seed,
                )  # fmt: skip
                result.vq.save_pretrained(self.out / name)
                self._write(f"{name}/metrics.json", {k: v for k, v in vars(result).items() if k != "vq"})
                self._timed(name, started)
            self.vqs[kind] = VQModel.from_pretrained(str(self.out / name)).eval()
            codes_cache = self.out / f"{name}-codes.safetensors"
            if not codes_cache.is_file():
                started = (time.perf_counter(), time.process_time())
                test = test_pixels[: 2 * config.num_generated + config.num_captioned]
                codes = {
                    "codes": encode_codes(self.vqs[kind], pixels),
                    "test_codes": encode_codes(self.vqs[kind], test),
                }
                save_file(codes, codes_cache)
                self._timed(f"encode {name}", started)
            codes = load_file(codes_cache)
            images[kind], self.test_codes[kind] = codes["codes"], codes["test_codes"]

        # one processor for both models: the text tokenizer and the `<image>` expansion of Transfusion's layout
        reference = self.new_model("transfusion")
        self.processor = TransfusionProcessor.from_model_config(reference.config, self.tokenizer)
        self.transfusion_config = reference.config
        self.counters, self.collators = {}, {}
        for kind in config.models:
            if kind.startswith("transfusion"):
                self.counters[kind] = FlopCounter.for_transfusion(self.new_model(kind).config)
                self.collators[kind] = (LatentDataCollator(self.processor),) * 2
            else:
                model_config = self.new_model(kind).config
                self.counters[kind] = FlopCounter.for_causal_lm(model_config, first_image_token_id=len(self.tokenizer))
                self.collators[kind] = (
                    DiscreteDataCollator(self.processor, reference.config.condition_dropout_prob),
                    DiscreteDataCollator(self.processor, condition_dropout_prob=0.0),
                )
        cut, labels = len(pixels) - config.num_validation, data.train_labels
        num_texts = round(config.text_share / (1 - config.text_share) * cut)
        if num_texts + config.num_validation > len(train_texts):
            raise ValueError(
                f"text_share {config.text_share} needs {num_texts + config.num_validation} documents of at most "
                f"{config.max_text_chars} characters, but only {len(train_texts)} are given."
            )
        texts, validation_texts = train_texts[:num_texts], train_texts[-config.num_validation :]
        self.datasets = {}
        for kind in config.models:
            train = LatentCaptionDataset(
                images[kind][:cut], labels[:cut], data.dataset, config.caption_mix, config.seed
            )
            held_out = LatentCaptionDataset(
                images[kind][cut:], labels[cut:], data.dataset, config.caption_mix, config.seed + 1
            )
            self.datasets[kind] = (
                torch.utils.data.ConcatDataset([train, TextDataset(texts)]),
                torch.utils.data.ConcatDataset([held_out, TextDataset(validation_texts)]),
            )

    def new_model(self, kind: str, seed: int | None = None):
        """A freshly initialised model (one of `config.models`), seeded by `seed` (default: the config's)."""
        config = self.config
        seed = config.seed if seed is None else seed
        transfusion = build_model(
            self.tokenizer,
            self.vae,
            config.image_size,
            self.data.train_images.shape[-1] if self.data.train_images.ndim == 4 else 1,
            replace(config.size, patch_encoder="unet") if kind == "transfusion-unet" else config.size,
            patch_size=config.patch_size,
            seed=seed,
        )
        if kind.startswith("transfusion"):
            return transfusion
        return build_discrete_model(transfusion.config, config.codebook_size_of(kind), seed=seed)

    def mean_step_flops(self, kind: str, num_batches: int = 64) -> float:
        """Counted training FLOPs of an average batch of the training mixture (a fixed sample of `num_batches`)."""
        dataset, collator = self.datasets[kind][0], self.collators[kind][1]
        rng = random.Random(self.config.seed)
        total = 0.0
        for _ in range(num_batches):
            records = [dataset[rng.randrange(len(dataset))] for _ in range(self.config.batch_size)]
            total += self.counters[kind](collator(records))
        return total / num_batches

    def run_dir(self, kind: str, budget: float, learning_rate: float, seed: int) -> Path:
        return self.out / "runs" / f"{kind}-{budget:.3g}-lr{learning_rate:g}-seed{seed}"

    def train(self, kind: str, budget: float, learning_rate: float, seed: int) -> dict:
        """Trains one model from scratch to `budget` counted FLOPs, saves it to `RUN/final` and returns the result."""
        folder = self.run_dir(kind, budget, learning_rate, seed)
        done = folder / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        started = (time.perf_counter(), time.process_time())
        config = self.config
        step_flops = self.mean_step_flops(kind)
        max_steps = max(2, round(budget / step_flops))
        args = training_arguments(
            folder, max_steps, batch_size=config.batch_size, learning_rate=learning_rate,
            save_steps=max(1, max_steps // 4), logging_steps=max(1, max_steps // 25), seed=seed,
        )  # fmt: skip
        args.per_device_eval_batch_size = config.batch_size
        args.prediction_loss_only = True
        args.disable_tqdm = not self.progress
        transfusion = kind.startswith("transfusion")
        trainer_class = FlopCountingTransfusionTrainer if transfusion else FlopCountingTrainer
        train_collator, eval_collator = self.collators[kind]
        trainer = trainer_class(
            model=self.new_model(kind, seed),
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
        if transfusion:
            save_checkpoint(trainer.model, self.processor, final)
        else:
            trainer.model.save_pretrained(final)
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        times = self._timed(f"train {folder.name}", started)
        result = {
            "model": kind,
            "budget": budget,
            "learning_rate": learning_rate,
            "seed": seed,
            "code": provenance(),
            "train_cpu_seconds": times["cpu_seconds"],
            "steps": trainer.state.global_step,
            "estimated_step_flops": step_flops,
            "flops": trainer.state.total_flos,
            "validation_loss": validation_loss,
            "log_history": trainer.state.log_history,
        }
        self._write(str(done.relative_to(self.out)), result)
        return result

    @torch.no_grad()
    def evaluate(self, kind: str, budget: float, learning_rate: float, seed: int) -> dict:
        """Prompt accuracy, Frechet distance and seconds per image (text-to-image), captioning accuracy
        (image-to-text) and perplexity on held-out documents (text-only) of a trained run."""
        folder = self.run_dir(kind, budget, learning_rate, seed)
        done = folder / "eval.json"
        if done.is_file():
            return json.loads(done.read_text())
        started = (time.perf_counter(), time.process_time())
        config, processor = self.config, self.processor
        targets, prompts = balanced_prompts(self.data.dataset, config.num_generated)
        held_out = slice(2 * config.num_generated, 2 * config.num_generated + config.num_captioned)
        if kind.startswith("transfusion"):
            model = TransfusionForConditionalGeneration.from_pretrained(folder / "final").eval()
            sampling = time.perf_counter()
            generated = generate_images(
                model, processor, prompts, seeds=[seed * 100_003 + i for i in range(len(prompts))],
                scheduler=config.scheduler, num_inference_steps=config.num_inference_steps,
                image_guidance_scale=config.guidance_scale,
            )  # fmt: skip
            sampling = time.perf_counter() - sampling
            captions = caption_images(model, processor, self.test_pixels[held_out])
        else:
            model = AutoModelForCausalLM.from_pretrained(folder / "final").eval()
            sampling = time.perf_counter()
            generated = generate_images_discrete(
                model, processor, self.vqs[kind], prompts, num_codes=self.test_codes[kind].shape[1],
                guidance_scale=config.guidance_scale, seed=seed,
            )  # fmt: skip
            sampling = time.perf_counter() - sampling
            captions = caption_images_discrete(model, processor, self.test_codes[kind][held_out])
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
            "eval_code": provenance(),
        }
        result["eval_cpu_seconds"] = self._timed(f"eval {folder.name}", started)["cpu_seconds"]
        self._write(str(done.relative_to(self.out)), result)
        return result

    def choose_learning_rates(self) -> dict[str, dict[str, float]]:
        """The learning rate of each model with the lowest validation loss at each sweep budget (`sweep.json`:
        `{"budget": {model: rate}}`, budgets written as `f"{budget:.3g}"`)."""
        chosen = {}
        for kind, budget, rate, seed in self.sweep_runs():
            loss = self.train(kind, budget, rate, seed)["validation_loss"]
            best = chosen.setdefault(f"{budget:.3g}", {})
            if kind not in best or loss < best[kind][1]:
                best[kind] = (rate, loss)
        chosen = {budget: {kind: rate for kind, (rate, _) in best.items()} for budget, best in chosen.items()}
        self._write("sweep.json", chosen)
        return chosen

    def run(self) -> dict:
        """Runs (or resumes) every stage and writes `results.json` and the figure `metrics_vs_flops.png`."""
        total = len(self.sweep_runs()) + len(self.point_runs()) + 2
        with tqdm(total=total, desc="study", disable=not self.progress) as bar:
            bar.set_postfix_str("tokenizer, autoencoders, encoding")
            self._prepare()
            bar.update(1)
            for kind, budget, rate, seed in self.sweep_runs():
                bar.set_postfix_str(f"sweep {kind} {budget:.3g} FLOPs lr {rate:g}")
                self.train(kind, budget, rate, seed)
                self.evaluate(kind, budget, rate, seed)
                bar.update(1)
            self.choose_learning_rates()
            for kind, budget, rate, seed in self.point_runs():
                bar.set_postfix_str(f"train and evaluate {kind} {budget:.3g} FLOPs seed {seed}")
                self.train(kind, budget, rate, seed)
                self.evaluate(kind, budget, rate, seed)
                bar.update(1)
            bar.set_postfix_str("results and figure")
            results = self._summarise()
            bar.update(1)
        return results

    def estimate(self, num_steps: int = 3) -> dict:
        """The CPU seconds the configured study's unfinished stages will take. Training: each unfinished run's budget
        times its model's CPU seconds per counted FLOP, measured over `num_steps` training steps (after one warm-up
        step) on this machine. Evaluation: the unfinished evaluations times the mean CPU time of the finished ones
        (`None` before the first). Prepares the shared stages first (they are stored, as in [`run`])."""
        self._prepare()
        seconds_per_flop = {}
        for kind in self.config.models:
            model = self.new_model(kind).train()
            optimizer = torch.optim.AdamW(model.parameters())
            dataset, collator = self.datasets[kind][0], self.collators[kind][0]
            flops, cpu = 0.0, 0.0
            for step in range(num_steps + 1):
                indices = range(step * self.config.batch_size, (step + 1) * self.config.batch_size)
                batch = collator([dataset[i % len(dataset)] for i in indices])
                started = time.process_time()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if step:
                    cpu += time.process_time() - started
                    flops += self.counters[kind](batch)
            seconds_per_flop[kind] = cpu / flops

        def finished(run: tuple, name: str) -> bool:
            return run[2] is not None and (self.run_dir(*run) / name).is_file()

        runs = [
            {"model": run[0], "budget": run[1], "learning_rate": run[2], "seed": run[3],
             "cpu_seconds": run[1] * seconds_per_flop[run[0]]}
            for run in self.plan()
            if not finished(run, "result.json")
        ]  # fmt: skip
        unevaluated = sum(not finished(run, "eval.json") for run in self.plan())
        evaluated = [t["cpu_seconds"] for stage, t in self._stage_times.items() if stage.startswith("eval ")]
        training = sum(run["cpu_seconds"] for run in runs)
        evaluation = unevaluated * float(np.mean(evaluated)) if evaluated else None
        return {
            "cpu_seconds_per_tflop": {kind: 1e12 * value for kind, value in seconds_per_flop.items()},
            "runs": runs,
            "training_cpu_seconds": training,
            "evaluations": unevaluated,
            "evaluation_cpu_seconds": evaluation,
            "total_cpu_seconds": training + (evaluation or 0.0),
        }

    def _summarise(self) -> dict:
        config = self.config
        chosen = self._read("sweep.json")
        sweep = [
            {
                "model": kind,
                "budget": budget,
                "learning_rate": rate,
                "validation_loss": self.train(kind, budget, rate, seed)["validation_loss"],
            }
            | {metric: self.evaluate(kind, budget, rate, seed)[metric] for metric in METRICS}
            for kind, budget, rate, seed in self.sweep_runs()
        ]
        num_images = {"prompt_accuracy": config.num_generated, "captioning_accuracy": config.num_captioned}
        runs, points = {kind: [] for kind in config.models}, {kind: [] for kind in config.models}
        for kind, budget, rate, seed in self.point_runs():
            runs[kind].append(
                {k: v for k, v in self.train(kind, budget, rate, seed).items() if k != "log_history"}
                | {k: v for k, v in self.evaluate(kind, budget, rate, seed).items() if k != "example_captions"}
            )
        for kind in config.models:
            for budget in config.budgets_of(kind):
                seeded = [run for run in runs[kind] if run["budget"] == budget]
                points[kind].append(
                    {"budget": budget, "learning_rate": seeded[0]["learning_rate"]}
                    | summarise_seeds(seeded, num_images)
                )

        def parity(continuous: str, discrete: str, through: int | None = None) -> dict:
            """The parity ratios against `discrete`'s value at its `through`-th budget (default: its largest)."""
            ratios = {}
            for metric, (_, higher_is_better) in METRICS.items():
                curve = [(p["flops"], p[metric]) for p in points[continuous]]
                reference = [(p["flops"], p[metric]) for p in points[discrete]][:through]
                references = [seed_curve[:through] for seed_curve in self._seed_curves(runs[discrete], metric)]
                ratios[metric] = parity_flop_ratio(curve, reference, higher_is_better) | {
                    "interval": parity_interval(
                        self._seed_curves(runs[continuous], metric), references, higher_is_better
                    )
                }
            return ratios

        pairs = [("transfusion-unet", "discrete") if kind.startswith("transfusion") else ("transfusion", kind)
                 for kind in config.variants]  # fmt: skip
        panels = {
            label: {kind: [(p["flops"], p[metric]) for p in points[kind]] for kind in config.models}
            for metric, (label, _) in METRICS.items()
        }
        plot_curves(panels, size=(1200, 320), x_label="FLOPs", log_x=True).save(self.out / "metrics_vs_flops.png")
        times = self._stage_times
        results = {
            "code": provenance(),
            "run_commits": sorted({run["code"]["commit"] or "unknown" for kind in runs for run in runs[kind]}),
            "config": json.loads(self._config_json()),
            "autoencoders": {
                name: self._read(f"{name}/metrics.json")
                for name in ["vae", *sorted(path.parent.name for path in self.out.glob("vq*/metrics.json"))]
            },
            "text_vocabulary": len(self.tokenizer),
            "image_tokens_per_image": {
                kind: int(self.test_codes[kind].shape[1])
                if kind in self.test_codes
                else self.transfusion_config.num_image_tokens
                for kind in config.models
            },  # fmt: skip
            "sweep": sweep,
            "learning_rates": chosen,
            "points": points,
            "runs": runs,
            "parity_flop_ratios": parity("transfusion", "discrete"),
            "parity_flop_ratios_by_budget": {
                f"{budget:.3g}": parity("transfusion", "discrete", through=i + 1)
                for i, budget in enumerate(config.budgets_of("discrete"))
            },
            "variant_parity_flop_ratios": {f"{a} vs {b}": parity(a, b) for a, b in pairs},
            "stage_times": times,
            "total_wall_seconds": round(sum(t["wall_seconds"] for t in times.values()), 1),
            "total_cpu_seconds": round(sum(t["cpu_seconds"] for t in times.values()), 1),
        }
        self._write("results.json", results)
        return results

    @staticmethod
    def _seed_curves(runs: list[dict], metric: str) -> list[list[tuple[float, float]]]:
        """One curve `(flops, value)` per seed of the largest budget: that seed's run where a budget has it, else the
        budget's first run."""
        by_budget = {}
        for run in runs:
            by_budget.setdefault(run["budget"], {})[run["seed"]] = run
        budgets = sorted(by_budget)
        curves = []
        for seed in by_budget[budgets[-1]]:
            picked = [by_budget[b].get(seed, next(iter(by_budget[b].values()))) for b in budgets]
            curves.append([(run["flops"], run[metric]) for run in picked])
        return curves


__all__ = [
    "FlopCounter",
    "FlopCountingTrainer",
    "FlopCountingTransfusionTrainer",
    "parity_flop_ratio",
    "parity_interval",
    "unet_flops",
    "provenance",
    "summarise_seeds",
    "StudyConfig",
    "StudyData",
    "TextDataset",
    "DiscreteVsContinuousStudy",
]
