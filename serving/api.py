"""The HTTP contract of `sprintrt serve`, in plain Python: request parsing, which requests share an
engine call, the pipeline call for a batch, and the mapping of the runtime's typed errors to HTTP.

Request (OpenAI Images shape, POST /v1/images/generations): `prompt` (str), `n` (default 1), `size`
("WIDTHxHEIGHT", default "1024x1024"), `response_format` ("b64_json": PNG bytes), plus sprintrt's
`num_inference_steps`, `guidance_scale`, `seed`, `max_timesteps`, `intermediate_timesteps`, and for engines
with a ControlNet `control_image` (base64 PNG or JPEG, e.g. a scribble: white strokes on black) with
`controlnet_conditioning_scale` (a number, or one per ControlNet block; default 1). OpenAI's
`model`, `user`, `quality` and `style` are accepted and ignored (clients send them); any other field is
a 422 naming it (OpenAI answers "Unrecognized request argument"), so a typo such as `sead` never passes
silently. Sizes are generated exactly (no resolution binning), so they must be multiples of 32. The
server's cost limits (Limits: pixels per request, steps, prompt bytes) are checked here, before any
work; value ranges are the runtime's own checks (SprintPipeline.check_arguments), mapped back to the
request's field names and not restated here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import secrets
from dataclasses import dataclass, field

import numpy as np

from sprintrt import defaults as D
from sprintrt.errors import InvalidInputError

ROUTE = "/v1/images/generations"
RESPONSE_FORMATS = ("b64_json",)
DEFAULT_SIZE = f"{D.DEFAULT_WIDTH}x{D.DEFAULT_HEIGHT}"
SEED_MAX = 2**63 - 1
FIELDS = ("prompt", "n", "size", "response_format", "num_inference_steps", "guidance_scale", "seed", "max_timesteps",
          "intermediate_timesteps", "control_image", "controlnet_conditioning_scale")
# OpenAI Images fields that clients send by default; they do not change what sprintrt generates.
IGNORED_OPENAI_FIELDS = ("model", "user", "quality", "style")
# The runtime's argument names → the request's field names (for error messages that name the field).
RUNTIME_TO_FIELD = {"height": "size", "width": "size", "num_images_per_prompt": "n", "generator": "seed",
                    "prompt": "prompt", "num_inference_steps": "num_inference_steps",
                    "guidance_scale": "guidance_scale", "max_timesteps": "max_timesteps",
                    "intermediate_timesteps": "intermediate_timesteps", "timesteps": "num_inference_steps",
                    "control_image": "control_image", "controlnet_conditioning_scale": "controlnet_conditioning_scale"}


class ApiError(Exception):
    """An answer other than 200: status, the request field at fault (if any), and a message with the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after_s = status, message, param, retry_after_s

    def body(self) -> dict:
        kind = ("invalid_request_error" if self.status < 500 else "server_overloaded" if self.status == 503
                else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def headers(self) -> dict:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))} if self.retry_after_s is not None else {}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    n: int = 1
    width: int = D.DEFAULT_WIDTH
    height: int = D.DEFAULT_HEIGHT
    num_inference_steps: int = D.DEFAULT_STEPS
    guidance_scale: float = D.DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    max_timesteps: float | None = D.DEFAULT_MAX_TIMESTEPS
    intermediate_timesteps: float | None = None
    response_format: str = "b64_json"
    extra: dict = field(default_factory=dict, compare=False)  # ignored OpenAI fields, kept for logging
    control_image: object = field(default=None, compare=False)  # a PIL RGB image: ControlNet
    controlnet_conditioning_scale: float | tuple = D.DEFAULT_CONTROLNET_SCALE

    def call_arguments(self) -> dict:
        """The pipeline arguments of this request alone (the reference a batched call must equal)."""
        call = dict(prompt=self.prompt, num_images_per_prompt=self.n, height=self.height, width=self.width,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    max_timesteps=self.max_timesteps, intermediate_timesteps=self.intermediate_timesteps,
                    generator=self.seed, use_resolution_binning=False)
        if self.control_image is not None:
            scale = self.controlnet_conditioning_scale
            call.update(control_image=self.control_image,
                        controlnet_conditioning_scale=list(scale) if isinstance(scale, tuple) else scale)
        return call

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine call (same latent shape and schedule; ControlNet
        requests with ControlNet requests of the same scale)."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.max_timesteps,
                self.intermediate_timesteps, self.control_image is not None,
                self.controlnet_conditioning_scale if self.control_image is not None else None)


@dataclass(frozen=True)
class Limits:
    """What one request may cost a replica; past them → 413 (too large) or 422, naming the field."""
    max_pixels: int = D.SERVE_MAX_PIXELS_PER_REQUEST  # n x width x height
    max_steps: int = D.SERVE_MAX_STEPS
    max_prompt_bytes: int = D.SERVE_MAX_PROMPT_BYTES


def _field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(422, f"{name}={value!r} is not allowed: expected {what}. Fix: send {name} as {what}", name)
    return value


def parse_request(raw: bytes, limits: Limits = Limits()) -> GenerationRequest:
    """JSON body → GenerationRequest: JSON types, known fields and the cost limits (value ranges are the
    runtime's)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}). Fix: send a JSON object such as "
                            '{"prompt": "a cat", "size": "1024x1024"}') from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, expected an object with a 'prompt'. "
                            'Fix: send {"prompt": "a cat"}')
    unknown = sorted(k for k in body if k not in FIELDS and k not in IGNORED_OPENAI_FIELDS)
    if unknown:
        raise ApiError(422, f"unrecognized request field(s) {unknown}: expected only {list(FIELDS)} (and OpenAI's "
                            f"{list(IGNORED_OPENAI_FIELDS)}, ignored). Fix: check the spelling or drop them", unknown[0])
    if "prompt" not in body:
        raise ApiError(422, "prompt is missing: expected a non-empty string. Fix: add \"prompt\": \"...\"", "prompt")
    prompt = _prompt(body["prompt"], limits)
    size = _field(body, "size", (str,), DEFAULT_SIZE, "a string 'WIDTHxHEIGHT', e.g. '1024x1024'")
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", size)
    if not m:
        raise ApiError(422, f"size={size!r} is not allowed: expected 'WIDTHxHEIGHT' in pixels, e.g. '1024x1024'. "
                            "Fix: send size as e.g. '768x1344'", "size")
    fmt = _field(body, "response_format", (str,), "b64_json", f"one of {list(RESPONSE_FORMATS)}")
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(422, f"response_format={fmt!r} is not allowed: expected one of {list(RESPONSE_FORMATS)} "
                            "(PNG bytes, base64). Fix: send response_format='b64_json'", "response_format")
    steps = _field(body, "num_inference_steps", (int,), D.DEFAULT_STEPS, "an integer, e.g. 1 or 2")
    if steps > limits.max_steps:
        raise ApiError(422, f"num_inference_steps={steps} is not allowed: this server runs at most {limits.max_steps} "
                            "steps (SANA-Sprint is distilled for 1-4). Fix: send 1, 2 or 4", "num_inference_steps")
    n = _field(body, "n", (int,), 1, "an integer, e.g. 1")
    width, height = int(m.group(1)), int(m.group(2))
    pixels = max(n, 1) * width * height
    if pixels > limits.max_pixels:
        param = "n" if n > 1 and width * height <= limits.max_pixels else "size"
        raise ApiError(413, f"n x size = {n} x {width}x{height} = {pixels} pixels is more than this server generates "
                            f"per request ({limits.max_pixels} pixels, --max-pixels-per-request). Fix: ask for fewer "
                            "or smaller images, or split the request", param)
    seed = _field(body, "seed", (int,), None, f"an integer in [0, {SEED_MAX}] or null")
    if seed is None:
        seed = secrets.randbelow(2**31)  # returned in the response, so the image can be made again
    if not 0 <= seed <= SEED_MAX:
        raise ApiError(422, f"seed={seed} is not allowed: expected [0, {SEED_MAX}] or null. Fix: send a non-negative "
                            "integer", "seed")
    return GenerationRequest(
        prompt=prompt, n=n, width=width, height=height, num_inference_steps=steps,
        guidance_scale=float(_field(body, "guidance_scale", (int, float), D.DEFAULT_GUIDANCE_SCALE, "a number")),
        seed=seed,
        max_timesteps=_number_or_none(body, "max_timesteps", D.DEFAULT_MAX_TIMESTEPS),
        # Default: 1.3 for 2 steps, none otherwise (diffusers refuses an intermediate angle elsewhere).
        intermediate_timesteps=_number_or_none(body, "intermediate_timesteps", D.intermediate_timesteps_for(steps)),
        response_format=fmt, extra={k: v for k, v in body.items() if k in IGNORED_OPENAI_FIELDS},
        **_control(body, limits))


def _control(body: dict, limits: Limits) -> dict:
    """control_image (base64 PNG/JPEG → PIL RGB) and controlnet_conditioning_scale, or {} without a control image."""
    if body.get("control_image") is None:
        if body.get("controlnet_conditioning_scale") is not None:
            raise ApiError(422, "controlnet_conditioning_scale needs a control_image. Fix: send control_image (base64 "
                                "PNG), or drop controlnet_conditioning_scale", "controlnet_conditioning_scale")
        return {}
    data = body["control_image"]
    if not isinstance(data, str):
        raise ApiError(422, f"control_image={_short(data)} is not allowed: expected a base64 PNG or JPEG string. Fix: "
                            "send base64.b64encode(open('scribble.png', 'rb').read()).decode()", "control_image")
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > limits.max_pixels:  # before decoding the pixels: no decompression bomb
                raise ApiError(413, f"control_image is {img.width}x{img.height} = {img.width * img.height} pixels, more "
                                    f"than this server takes ({limits.max_pixels}). Fix: send it at the size you "
                                    "generate (it is resized to it anyway)", "control_image")
            image = img.convert("RGB")
    except ApiError:
        raise
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"control_image is not a base64 PNG or JPEG image ({type(e).__name__}: {e}). Fix: send "
                            "the file's bytes base64-encoded (a data: URL prefix is accepted)", "control_image") from None
    scale = body.get("controlnet_conditioning_scale", D.DEFAULT_CONTROLNET_SCALE)
    values = scale if isinstance(scale, list) else [scale]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise ApiError(422, f"controlnet_conditioning_scale={_short(scale)} is not allowed: expected a finite number or "
                            "a list of them (one per ControlNet block). Fix: send e.g. 1.0",
                       "controlnet_conditioning_scale")
    return dict(control_image=image,
                controlnet_conditioning_scale=tuple(float(v) for v in scale) if isinstance(scale, list) else float(scale))


def _prompt(value, limits: Limits) -> str:
    """A prompt the text encoder can take: a non-empty string of valid Unicode, at most max_prompt_bytes."""
    if not isinstance(value, str):
        raise ApiError(422, f"prompt={_short(value)} is not allowed: expected a non-empty string. Fix: send "
                            "\"prompt\": \"a cat\"", "prompt")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise ApiError(422, f"prompt is not valid Unicode: {e.reason} at character {e.start}. Fix: send the "
                            "prompt as UTF-8 text (escape pairs \\ud83d\\ude00 together, never half a pair)",
                       "prompt") from None
    if size > limits.max_prompt_bytes:
        raise ApiError(413, f"prompt is {size} bytes, more than this server takes ({limits.max_prompt_bytes} bytes, "
                            f"--max-prompt-bytes; the text encoder reads at most {D.DEFAULT_MAX_SEQUENCE_LENGTH} "
                            "tokens anyway). Fix: shorten it", "prompt")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number_or_none(body: dict, name: str, default):
    if name not in body:
        return default
    value = body[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(422, f"{name}={value!r} is not allowed: expected a number or null. Fix: send e.g. "
                            f"{name}={default}", name)
    return float(value)


def pipeline_for(call: dict, pipe, controlnet_pipe):
    """The pipeline a call runs on: the ControlNet one with a control_image (a 422 when the engines have no
    ControlNet), text to image's without."""
    if "control_image" not in call:
        return pipe
    if controlnet_pipe is None:
        raise ApiError(422, "control_image needs engines with a ControlNet, and this server's have none. Fix: drop "
                            "control_image, or serve engines of a model exported with --controlnet", "control_image")
    return controlnet_pipe


def check_with_pipeline(pipe, req: GenerationRequest) -> None:
    """The runtime's own checks of this request (no engine runs); its typed errors become 422s."""
    try:
        pipe.check_arguments(**req.call_arguments(), output_type="pil")
    except InvalidInputError as e:
        raise as_api_error(e) from None


def as_api_error(e: InvalidInputError) -> ApiError:
    """422 naming the request field: the runtime's message starts with its own argument name."""
    message = str(e)
    name = re.match(r"\s*([a-z_]+)", message)
    runtime_name = name.group(1) if name else ""
    param = RUNTIME_TO_FIELD.get(runtime_name)
    if param and param != runtime_name:
        message = f"{param}: {message}"
    return ApiError(422, message, param)


def batch_call(requests: list[GenerationRequest]) -> dict:
    """One pipeline call for requests that share a batch key: every request's images in order, each
    drawing its noise from its own seed's stream, so each image equals the one its request alone would
    give (SprintPipeline draws per row from a list of generators, as diffusers does)."""
    first = requests[0]
    prompts, generators, controls = [], [], []
    for req in requests:
        rng = np.random.default_rng(req.seed)  # shared by the request's n rows: draws continue its one stream
        prompts += [req.prompt] * req.n
        generators += [rng] * req.n
        controls += [req.control_image] * req.n
    call = first.call_arguments()
    call.update(prompt=prompts, num_images_per_prompt=1, generator=generators)
    if first.control_image is not None:
        call.update(control_image=controls)  # one per prompt row
    return call


def png_b64(image) -> str:
    """A PIL image as base64 PNG (lossless: the served bytes are the pipeline's image)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response_body(req: GenerationRequest, images: list, created: int, timings: dict, batch_images: int) -> dict:
    return {"created": created, "data": [{"b64_json": png_b64(img)} for img in images],
            "sprintrt": {"seed": req.seed, "size": f"{req.width}x{req.height}", "batch_images": batch_images,
                         "timings": timings}}
