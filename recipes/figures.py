"""Pictures for the docs, drawn with PIL only: image grids, training curves and metric curves."""

import json
import math
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


def image_row(images: list[PIL.Image.Image], scale: int = 1, gap: int = 2) -> PIL.Image.Image:
    """Pastes images of any sizes side by side, top-aligned, each enlarged `scale` times, with `gap` pixels between
    (e.g. a source image and its edits)."""
    if not images:
        raise ValueError("image_row needs at least one image.")
    sizes = [(image.size[0] * scale, image.size[1] * scale) for image in images]
    width = sum(w for w, _ in sizes) + gap * (len(images) + 1)
    sheet = PIL.Image.new("RGB", (width, max(h for _, h in sizes) + 2 * gap), (128, 128, 128))
    left = gap
    for image, size in zip(images, sizes):
        sheet.paste(image.convert("RGB").resize(size, PIL.Image.NEAREST), (left, gap))
        left += size[0] + gap
    return sheet


def stack_sheets(sheets: list[PIL.Image.Image], gap: int = 2) -> PIL.Image.Image:
    """Stacks sheets (e.g. [`image_grid`]s of images of different sizes) top to bottom, left-aligned."""
    width = max(sheet.size[0] for sheet in sheets)
    height = sum(sheet.size[1] for sheet in sheets) + gap * (len(sheets) - 1)
    canvas = PIL.Image.new("RGB", (width, height), (128, 128, 128))
    top = 0
    for sheet in sheets:
        canvas.paste(sheet, (0, top))
        top += sheet.size[1] + gap
    return canvas


def plot_curves(
    panels: dict[str, dict[str, list[tuple[float, float]]]],
    size: tuple[int, int] = (640, 360),
    x_label: str = "step",
    log_x: bool = False,
) -> PIL.Image.Image:
    """Line plots side by side: `panels` maps a panel title to its series (name -> `(x, y)` points). A series keeps
    its colour in every panel; with several series per panel a legend names them. `log_x` spaces x by log10."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    panel_width = size[0] // len(panels)
    canvas = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(canvas)
    scale_x = math.log10 if log_x else float
    for index, (title, series) in enumerate(panels.items()):
        left, top = index * panel_width + 50, 25
        right, bottom = (index + 1) * panel_width - 15, size[1] - 35
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 6), title, fill="black")
        points = [point for line in series.values() for point in line]
        if len(points) < 2:
            continue
        xs, values = [scale_x(x) for x, _ in points], [v for _, v in points]
        first, span = min(xs), max(max(xs) - min(xs), 1e-12)
        low, high = min(values), max(values)
        high = high if high > low else low + 1.0
        for name, line in series.items():
            colour = colours[names.index(name) % len(colours)]
            pixels = [
                (
                    left + (scale_x(x) - first) / span * (right - left),
                    bottom - (v - low) / (high - low) * (bottom - top),
                )
                for x, v in line
            ]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=2)
            if log_x:
                for x, y in pixels:
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if len(names) > 1:
            for rank, name in enumerate(series):
                draw.text((left + 5, top + 4 + 12 * rank), name, fill=colours[names.index(name) % len(colours)])
        for fraction in (0.0, 0.5, 1.0):
            value = low + fraction * (high - low)
            draw.text((left - 45, bottom - fraction * (bottom - top) - 6), f"{value:.3g}", fill="black")
        low_x, high_x = min(x for x, _ in points), max(x for x, _ in points)
        draw.text((left, bottom + 5), f"{low_x:.3g}", fill="black")
        draw.text((right - 70, bottom + 5), f"{x_label} {high_x:.3g}", fill="black")
    return canvas


def plot_training_curves(
    log_history: list[dict], keys: tuple[str, ...] = ("lm_loss", "diffusion_loss"), size: tuple[int, int] = (640, 360)
) -> PIL.Image.Image:
    """Line plot of the logged `keys` against the step (one panel per key), from `Trainer`'s `log_history`."""
    panels = {key: {key: [(entry["step"], entry[key]) for entry in log_history if key in entry]} for key in keys}
    return plot_curves(panels, size)


def training_curves_from_checkpoint(checkpoint_dir: str | Path) -> PIL.Image.Image:
    """Reads `trainer_state.json` of a `Trainer` checkpoint folder and plots its loss terms."""
    state = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())
    return plot_training_curves(state["log_history"])


__all__ = ["image_grid", "stack_sheets", "plot_curves", "plot_training_curves", "training_curves_from_checkpoint"]
