"""The judge: a small CNN trained by the project on real training images, and a Frechet distance in its feature space.

No Inception weights ship in any registry package, so FID proper cannot be computed offline. Instead a two-layer CNN
is trained on the real training split; its test accuracy is reported; its 64-d penultimate features define a
"Frechet distance in classifier feature space" between two sets of images. These numbers are NOT comparable to
published FID values.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier_config.json"


@dataclass
class ClassifierConfig:
    """Shape of the judge: input channels and size, number of classes, feature width."""

    num_channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    feature_dim: int = 64


class JudgeCNN(nn.Module):
    """Two conv layers (32, 64 channels, each followed by 2x max-pooling), a 64-d feature layer and a linear head.
    Input: images `(n, c, image_size, image_size)` in [-1, 1]."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        config = config or ClassifierConfig()
        self.config = config
        self.convs = nn.Sequential(
            nn.Conv2d(config.num_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (config.image_size // 4) ** 2, config.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features `(n, feature_dim)`."""
        return self.features(self.convs(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `(n, num_classes)`."""
        return self.head(self.embed(images))

    def save(self, directory: str | Path) -> None:
        """Writes `classifier.safetensors` and `classifier_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / CLASSIFIER_WEIGHTS)
        (directory / CLASSIFIER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "JudgeCNN":
        """Loads a judge saved with [`JudgeCNN.save`], in eval mode."""
        directory = Path(directory)
        if not (directory / CLASSIFIER_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"No judge classifier in {directory} (expected {CLASSIFIER_WEIGHTS}): train one with "
                f"`transfusion classifier --out {directory}`."
            )
        config = ClassifierConfig(**json.loads((directory / CLASSIFIER_CONFIG).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(directory / CLASSIFIER_WEIGHTS))
        return model.eval()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 1,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> JudgeCNN:
    """Trains the judge on images `(n, c, s, s)` in [-1, 1] with integer `labels` (AdamW, cosine decay)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = ClassifierConfig(
        num_channels=images.shape[1], image_size=images.shape[-1], num_classes=int(labels.max()) + 1
    )
    model = JudgeCNN(config)
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), batch_size):
            index = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.no_grad()
def predict(model: JudgeCNN, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes `(n,)` and features `(n, feature_dim)` of images in [-1, 1]."""
    classes, features = [], []
    for i in range(0, len(images), batch_size):
        embedding = model.embed(images[i : i + batch_size].float())
        features.append(embedding)
        classes.append(model.head(embedding).argmax(-1))
    return torch.cat(classes), torch.cat(features)


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `(n, d)`:
    `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}.")
    if min(len(a), len(b)) < 2:
        raise ValueError("Each feature set needs at least two samples.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of the symmetric S_a^(1/2) S_b S_a^(1/2), so two
    # symmetric eigendecompositions give it exactly, without a general matrix square root.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_root = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


__all__ = ["ClassifierConfig", "JudgeCNN", "train_classifier", "predict", "frechet_distance"]
