"""Exporting a Transfusion checkpoint as a self-contained Hub folder: weights, configs, processor, and the package's
code as remote code, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` work where this package is not installed.

The model's and the processor's `save_pretrained` write their code and `auto_map` themselves (they are registered
for the Auto classes); the export runs them on any checkpoint folder, also one saved before they did, checks that the
code can be copied flat, and adds what a plain save leaves out: the `text-to-image` pipeline as remote code
(`custom_pipelines`) and a model card.
"""

import ast
import json
import os
import shutil
from pathlib import Path

from .. import (
    configuration_transfusion,
    diffusion_transfusion,
    editing_transfusion,
    experts_transfusion,
    generation_transfusion,
    pipeline_transfusion,
    saving_transfusion,
)
from .. import modeling_transfusion as modeling_module
from ..pipeline_transfusion import CUSTOM_PIPELINES
from ..processing import image_processing_transfusion, processing_transfusion
from .checkpoint import load_checkpoint, prepare_output_dir, save_checkpoint
from .report import ConversionReport

# The code of an exported folder, flat next to the weights: what `save_pretrained` copies (the model's and the
# processor's modules and those they import), and the pipeline. The files import each other only as `from .x import`,
# so the flat copy works as it is (checked below).
REMOTE_CODE_FILES = {
    Path(module.__file__).name: Path(module.__file__)
    for module in (
        configuration_transfusion,
        modeling_module,
        diffusion_transfusion,
        editing_transfusion,
        experts_transfusion,
        generation_transfusion,
        pipeline_transfusion,
        saving_transfusion,
        processing_transfusion,
        image_processing_transfusion,
    )
}
MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-to-image
tags:
- transfusion
- custom_code
---

# Transfusion

A [Transfusion](https://arxiv.org/abs/2408.11039) model: one transformer trained with next-token prediction on text
and with diffusion on continuous image latents. The model code ships with the weights, so loading needs
`trust_remote_code=True` (and `diffusers`, `torch`, `transformers`, `pillow`):

```python
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
inputs = processor(text=["a handwritten seven"], return_tensors="pt")
out = model.generate(**inputs, generation_mode="image", image_guidance_scale=3.0, return_dict_in_generate=True)
image = processor.postprocess_images(out.images)[0][0]

image = pipeline("text-to-image", model="{name}", trust_remote_code=True)("a handwritten seven")["image"]
```
"""


def export_to_hub(
    checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False
) -> ConversionReport:
    """
    Writes `checkpoint_dir` (a Transfusion checkpoint) to `output_dir` as a self-contained Hub folder: what the model's
    and the processor's `save_pretrained` write (weights, generation config, processor and tokenizer, the model and
    processor code as remote code with `auto_map` entries for `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
    `AutoModelForImageTextToText`, `AutoModelForMultimodalLM`, `AutoProcessor` and `AutoImageProcessor`), plus the
    `text-to-image` pipeline (its code and `custom_pipelines`) and a model card. It works on any checkpoint folder,
    also one saved before `save_pretrained` wrote the code.

    The folder loads with `trust_remote_code=True` in an environment that does not have this package (the Hub's
    remote-code mechanism: `push_to_hub` it, or load it from disk).

    Args:
        checkpoint_dir (`str` or `os.PathLike`): a Transfusion checkpoint (model and processor).
        output_dir (`str` or `os.PathLike`): where to write; must be empty unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty `output_dir`.

    Returns:
        [`ConversionReport`]: the files written and the `auto_map` entries.
    """
    checkpoint_dir = Path(checkpoint_dir)
    check_flat_imports()
    output_dir = prepare_output_dir(output_dir, overwrite, sources=(checkpoint_dir,))
    report = ConversionReport(title=f"export-hub: {checkpoint_dir} -> {output_dir}", output_dir=str(output_dir))
    model, processor = load_checkpoint(checkpoint_dir)
    save_checkpoint(model, processor, output_dir)
    shutil.copyfile(REMOTE_CODE_FILES["pipeline_transfusion.py"], output_dir / "pipeline_transfusion.py")
    config_file = output_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (output_dir / "README.md").write_text(MODEL_CARD.replace("{name}", output_dir.name), encoding="utf-8")

    report.notes.append(f"weights: {len(model.state_dict())} tensors, as in {checkpoint_dir}")
    report.notes.append(f"remote code: {', '.join(sorted(path.name for path in output_dir.glob('*.py')))}")
    report.notes.append(f"auto_map: {', '.join(model.config.auto_map)}; custom pipeline: text-to-image")
    report.notes.append(f"files: {', '.join(sorted(path.name for path in output_dir.iterdir()))}")
    report.notes.append("load with trust_remote_code=True; the package itself is not needed")
    return report


def check_flat_imports() -> None:
    """Checks that the remote-code files import nothing from the package but each other, as `from .module import`
    (what a flat copy next to the weights can resolve). Raises `ImportError` naming the offending import."""
    modules = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}
    for source in REMOTE_CODE_FILES.values():
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level != 1 or node.module not in modules:
                    raise ImportError(
                        f"{source} imports {'.' * node.level}{node.module or ''}, which a flat copy of the remote code "
                        f"cannot resolve: its files may import only each other, as `from .<module> import` with "
                        f"<module> in {sorted(modules)}."
                    )
                continue
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            if any(module.split(".")[0] == "modeling_transfusion" for module in imported):
                raise ImportError(f"{source} imports the modeling_transfusion package, which remote code cannot do.")


__all__ = ["export_to_hub", "check_flat_imports", "REMOTE_CODE_FILES"]
