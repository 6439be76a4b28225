"""Where the Gaussian noise comes from: an int seed, a NumPy Generator, or torch generator(s).

With a torch.Generator (or a list of them, one per image) the noise is drawn with torch.randn exactly
as diffusers' randn_tensor draws it, so a run can be compared bit-for-bit with SanaSprintPipeline.
Only that case imports torch. Int seeds and NumPy generators are for deployments without torch;
their streams differ from torch's (MT19937 + Box-Muller cannot be matched bit-exactly, docs/SANA_SPRINT_SPEC.md §4.6).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sprintrt.errors import InvalidInputError

Draw = Callable[[tuple], np.ndarray]


def _is_torch_generator(g) -> bool:
    return type(g).__module__.startswith("torch") and type(g).__name__ == "Generator"


def _single(g) -> Draw:
    if g is None:
        rng = np.random.default_rng()
    elif isinstance(g, (int, np.integer)) and not isinstance(g, bool):
        if g < 0:
            raise InvalidInputError(f"generator={g} is negative: expected a seed >= 0. Fix: pass a non-negative int")
        rng = np.random.default_rng(int(g))
    elif isinstance(g, np.random.Generator):
        rng = g
    elif _is_torch_generator(g):
        import torch

        return lambda shape: torch.randn(shape, generator=g, dtype=torch.float32, device=g.device).cpu().numpy()
    else:
        raise InvalidInputError(f"generator={g!r} is a {type(g).__name__}: expected None, an int seed, a "
                                "numpy.random.Generator, a torch.Generator or a list of them (one per image). "
                                "Fix: pass e.g. generator=0")
    return lambda shape: rng.standard_normal(shape, dtype=np.float32)


def noise_source(generator, batch: int) -> Draw:
    """A function shape → float32 unit-normal array, drawing from `generator` as diffusers would."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise InvalidInputError(f"generator is a list of {len(generator)}, but the batch has {batch} images "
                                    "(prompts x num_images_per_prompt). Fix: pass one generator per image, or one")
        draws = [_single(g) for g in generator]
        # diffusers draws each row with shape (1, ...) from its own generator, then concatenates.
        return lambda shape: np.concatenate([d((1, *shape[1:])) for d in draws], axis=0)
    return _single(generator)
