"""What a conversion did to the weights, as a short report users can read."""

import re
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ConversionReport:
    r"""
    The outcome of a conversion: which weights were taken over, which were (re-)initialised, what else changed, and
    the checks that were run. `str(report)` is the human-readable summary the CLI prints.

    Args:
        title (`str`): what was converted, e.g. `"from-llm: /models/SmolLM2 -> /out"`.
        output_dir (`str`): where the result was saved.
        kept (`list[str]`): parameter names loaded unchanged from the source.
        initialised (`list[str]`): parameter names that start fresh, each with the reason in parentheses.
        replaced (`list[str]`): parameter names replaced from another source (e.g. a new VAE).
        dropped (`list[str]`): source parameter names that were not used.
        notes (`list[str]`): other changes (tokens added, embeddings resized, config fields changed).
        checks (`list[str]`): checks run on the result, with their outcome.
    """

    title: str
    output_dir: str
    kept: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [self.title, f"  saved to: {self.output_dir}"]
        sections = (
            ("kept", self.kept, summarize_names),
            ("replaced", self.replaced, summarize_names),
            ("initialised", self.initialised, list),
            ("dropped", self.dropped, summarize_names),
        )
        for name, entries, render in sections:
            if entries:
                lines.append(f"  {name} ({len(entries)} tensors):")
                lines.extend(f"    {line}" for line in render(entries))
        for name, entries in (("notes", self.notes), ("checks", self.checks)):
            if entries:
                lines.append(f"  {name}:")
                lines.extend(f"    {line}" for line in entries)
        return "\n".join(lines)


def summarize_names(names: list[str]) -> list[str]:
    """Counts parameter names per module, folding layer numbers: the 270 tensors of 30 decoder layers become the one
    line `model.layers.* (270)`, so a report stays a few lines long for any model size."""
    groups = Counter()
    for name in names:
        parts = name.split(".")
        # Group at the first numbered component (a layer index), else at the module that holds the tensor.
        for index, part in enumerate(parts):
            if part.isdigit():
                key = ".".join(parts[:index]) + ".*"
                break
        else:
            key = ".".join(parts[:-1]) or parts[0]
        groups[key] += 1
    return [f"{key} ({count})" for key, count in sorted(groups.items(), key=lambda item: _natural(item[0]))]


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


__all__ = ["ConversionReport", "summarize_names"]
