"""Pictures for the docs, drawn with PIL only: image grids and training curves."""

import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw


def image_grid(images: list[PIL.Image.Image], columns: int, scale: int = 1, gap: int = 2) -> PIL.Image.Image:
    """Pastes equally sized images into rows of `columns`, each enlarged `scale` times, with `gap` pixels between."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    width, height = images[0].size[0] * scale, images[0].size[1] * scale
    rows = -(-len(images) // columns)
    sheet = PIL.Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), (128, 128, 128))
    for i, image in enumerate(images):
        tile = image.convert("RGB").resize((width, height), PIL.Image.NEAREST)
        sheet.paste(tile, (gap + (i % columns) * (width + gap), gap + (i // columns) * (height + gap)))
    return sheet


def plot_training_curves(
    log_history: list[dict], keys: tuple[str, ...] = ("lm_loss", "diffusion_loss"), size: tuple[int, int] = (640, 360)
) -> PIL.Image.Image:
    """Line plot of the logged `keys` against the step (one panel per key), from `Trainer`'s `log_history`."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    panel_width = size[0] // len(keys)
    canvas = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for index, key in enumerate(keys):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        left, top = index * panel_width + 50, 25
        right, bottom = (index + 1) * panel_width - 15, size[1] - 35
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 6), key, fill="black")
        if len(points) < 2:
            continue
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        low, high = min(values), max(values)
        high = high if high > low else low + 1.0

        span = max(steps[-1] - steps[0], 1)
        line = [
            (left + (s - steps[0]) / span * (right - left), bottom - (v - low) / (high - low) * (bottom - top))
            for s, v in points
        ]
        draw.line(line, fill=colours[index % len(colours)], width=2)
        for fraction in (0.0, 0.5, 1.0):
            value = low + fraction * (high - low)
            draw.text((left - 45, bottom - fraction * (bottom - top) - 6), f"{value:.3f}", fill="black")
        draw.text((left, bottom + 5), str(steps[0]), fill="black")
        draw.text((right - 40, bottom + 5), f"step {steps[-1]}", fill="black")
    return canvas


def training_curves_from_checkpoint(checkpoint_dir: str | Path) -> PIL.Image.Image:
    """Reads `trainer_state.json` of a `Trainer` checkpoint folder and plots its loss terms."""
    state = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())
    return plot_training_curves(state["log_history"])


__all__ = ["image_grid", "plot_training_curves", "training_curves_from_checkpoint"]
