"""The call signature of the SANA-Sprint pipelines, declared once.

diffusers' SanaSprintPipeline, SanaSprintImg2ImgPipeline (and, for ControlNet, SanaControlNetPipeline)
take the same arguments in the same order with the same defaults, the image-to-image pipeline adding
`image` and `strength` after `guidance_scale`. sprintrt's pipelines mirror them: each `__call__` is
declared with `pipeline_call(SIGNATURE)`, which gives it those explicit keyword parameters (what
`inspect.signature`, `help()` and IDEs show, and what a call is bound against: an unknown or doubled
argument is a TypeError, as with any Python function) and hands the method one `CallArguments` with
every argument bound and defaulted. tests/runtime/test_call_signature.py compares each declared
signature with diffusers' own `__call__` (names, order, defaults), so drift fails the suite.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Callable

from sprintrt import defaults as D

_KW = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _param(name: str, default, annotation=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, _KW, default=default, annotation=annotation)


# SanaSprintPipeline.__call__, in diffusers' order and with its defaults (the one declaration).
TEXT_TO_IMAGE = inspect.Signature([
    _param("prompt", None, "str | list[str] | None"),
    _param("num_inference_steps", D.DEFAULT_STEPS, "int"),
    _param("timesteps", None, "list[float] | None"),
    _param("max_timesteps", D.DEFAULT_MAX_TIMESTEPS, "float | None"),
    _param("intermediate_timesteps", D.DEFAULT_INTERMEDIATE_TIMESTEPS, "float | None"),
    _param("guidance_scale", D.DEFAULT_GUIDANCE_SCALE, "float"),
    _param("num_images_per_prompt", 1, "int"),
    _param("height", D.DEFAULT_HEIGHT, "int"),
    _param("width", D.DEFAULT_WIDTH, "int"),
    _param("eta", 0.0, "float"),  # ignored, as in diffusers
    _param("generator", None),
    _param("latents", None),
    _param("prompt_embeds", None),
    _param("prompt_attention_mask", None),
    _param("output_type", "pil", "str"),
    _param("return_dict", True, "bool"),
    _param("clean_caption", False, "bool"),
    _param("use_resolution_binning", True, "bool"),
    _param("attention_kwargs", None, "dict | None"),
    _param("callback_on_step_end", None, "Callable | None"),
    _param("callback_on_step_end_tensor_inputs", ["latents"], "list[str]"),
    _param("max_sequence_length", D.DEFAULT_MAX_SEQUENCE_LENGTH, "int"),
    # A list, as diffusers' default is: the same object is handed to every call and never modified.
    _param("complex_human_instruction", list(D.DEFAULT_COMPLEX_HUMAN_INSTRUCTION), "list[str] | None"),
])


def extended(base: inspect.Signature, after: str, *params: inspect.Parameter) -> inspect.Signature:
    """`base` with `params` inserted after the parameter named `after` (how the image-to-image and
    ControlNet pipelines extend the text-to-image call in diffusers)."""
    names = list(base.parameters)
    at = names.index(after) + 1
    existing = list(base.parameters.values())
    return base.replace(parameters=existing[:at] + list(params) + existing[at:])


# SanaSprintImg2ImgPipeline.__call__: the text-to-image call with the input image and its strength.
IMAGE_TO_IMAGE = extended(TEXT_TO_IMAGE, "guidance_scale", _param("image", None),
                          _param("strength", D.DEFAULT_STRENGTH, "float"))

# SANA-Sprint with a ControlNet: the text-to-image call with SanaControlNetPipeline.__call__'s two ControlNet
# arguments, where that pipeline has them (right after guidance_scale) and with its default scale.
CONTROLNET = extended(TEXT_TO_IMAGE, "guidance_scale", _param("control_image", None),
                      _param("controlnet_conditioning_scale", D.DEFAULT_CONTROLNET_SCALE, "float | list[float]"))


class CallArguments(SimpleNamespace):
    """Every argument of one pipeline call, bound and defaulted: `args.prompt`, `args.height`, ..."""

    def without(self, *names: str) -> dict:
        """The arguments as keywords, less `names` (those a pipeline consumes itself)."""
        return {k: v for k, v in vars(self).items() if k not in names}


def pipeline_call(signature: inspect.Signature) -> Callable:
    """Give a pipeline method `signature`'s keyword parameters; the method receives one CallArguments."""
    with_self = signature.replace(parameters=[inspect.Parameter("self", _KW), *signature.parameters.values()])

    def decorate(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError for an unknown or doubled argument
            bound.apply_defaults()
            return method(self, CallArguments(**bound.arguments))

        call.__signature__ = with_self
        return call

    return decorate
