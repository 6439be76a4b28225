"""Prompt files: one prompt per line; the shipped file (68 varied prompts) when none is named.
Used by calibration, drift and the benchmarks."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sprintrt.errors import InvalidInputError


def read_prompts(path: str | Path | None = None) -> list[str]:
    """The non-empty, stripped lines of `path`, or of the shipped prompt file when `path` is None."""
    if path is None:
        text = resources.files("sprintrt").joinpath("data/prompts.txt").read_text()
    else:
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"prompt file {str(path)!r} does not exist. Fix: pass a text file "
                                    "with one prompt per line, or omit it to use the shipped prompts")
        text = path.read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError(f"prompt file {str(path)!r} has no prompts. Fix: one prompt per line")
    return prompts
