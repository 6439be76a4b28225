"""The image API's contract without Ray: request parsing, error mapping, batching that keeps each
request's images."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from sprintrt.serving import api


def _parse(**body):
    # No cost limit here: these tests are about the runtime's own ranges.
    return api.parse_request(json.dumps(body).encode(), api.Limits(max_pixels=2**40))


def test_defaults_and_openai_fields():
    req = _parse(prompt="a cat", model="sana-sprint", seed=3)
    assert (req.width, req.height, req.n, req.num_inference_steps, req.intermediate_timesteps) == (1024, 1024, 1, 2, 1.3)
    assert req.extra == {"model": "sana-sprint"} and req.seed == 3
    assert _parse(prompt="a cat", num_inference_steps=1).intermediate_timesteps is None
    assert 0 <= _parse(prompt="x").seed < 2**31  # drawn by the server, returned in the response


@pytest.mark.parametrize("raw,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"{}", 422, "prompt"),
    (b'{"prompt": 7}', 422, "prompt"),
    (b'{"prompt": "x", "size": "big"}', 422, "size"),
    (b'{"prompt": "x", "n": "2"}', 422, "n"),
    (b'{"prompt": "x", "response_format": "url"}', 422, "response_format"),
    (b'{"prompt": "x", "seed": -1}', 422, "seed"),
    (b'{"prompt": "x", "guidance_scale": "high"}', 422, "guidance_scale"),
])
def test_malformed_requests(raw, status, param):
    with pytest.raises(api.ApiError) as info:
        api.parse_request(raw)
    e = info.value
    assert e.status == status and e.param == param and "Fix" in e.message
    assert e.body()["error"]["param"] == param


@pytest.mark.parametrize("body,param,match", [
    (dict(prompt=""), "prompt", "empty"),
    (dict(prompt="x", size="13x7"), "size", "size: height=7.*multiple of 32"),
    (dict(prompt="x", n=0), "n", "n: num_images_per_prompt=0"),
    (dict(prompt="x", num_inference_steps=0), "num_inference_steps", "num_inference_steps=0"),
    (dict(prompt="x", size="8192x8192"), "size", "size: height=8192"),
])
def test_value_ranges_are_the_runtimes_checks(sprint_pipe, body, param, match):
    with pytest.raises(api.ApiError) as info:
        api.check_with_pipeline(sprint_pipe, _parse(**body))
    assert info.value.status == 422 and info.value.param == param
    assert __import__("re").search(match, info.value.message), info.value.message


def test_nan_guidance_is_refused(sprint_pipe):
    req = api.parse_request(b'{"prompt": "x", "guidance_scale": NaN}')
    with pytest.raises(api.ApiError, match="guidance_scale=nan") as info:
        api.check_with_pipeline(sprint_pipe, req)
    assert info.value.param == "guidance_scale"


def test_overload_error_says_when_to_retry():
    e = api.ApiError(503, "busy", retry_after_s=0.2)
    assert e.headers() == {"Retry-After": "1"} and e.body()["error"]["type"] == "server_overloaded"


def test_a_batched_call_gives_each_request_its_own_images(sprint_pipe):
    """Two requests (different prompts, seeds and n) run as one engine call; each request's images equal
    the call it would make alone (its seed's noise stream, continued over its n images)."""
    reqs = [_parse(prompt="a koi pond", n=2, size="128x96", num_inference_steps=2, seed=11),
            _parse(prompt="an owl at night", n=1, size="128x96", num_inference_steps=2, seed=12)]
    assert reqs[0].batch_key() == reqs[1].batch_key()
    batched = sprint_pipe(**api.batch_call(reqs), output_type="np").images
    assert batched.shape == (3, 96, 128, 3)
    k = 0
    for req in reqs:
        alone = sprint_pipe(**req.call_arguments(), output_type="np").images
        assert np.abs(batched[k:k + req.n] - alone).max() <= 1e-5
        k += req.n


def test_png_round_trip_is_lossless():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8))
    back = Image.open(io.BytesIO(base64.b64decode(api.png_b64(img))))
    assert np.array_equal(np.asarray(back), np.asarray(img))


def _scribble_b64(size=(64, 64), stroke=None) -> str:
    from PIL import ImageDraw

    img = Image.new("RGB", size)
    if stroke:
        ImageDraw.Draw(img).line(stroke, fill=(255, 255, 255), width=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("body,status,param", [
    (dict(control_image="%%%"), 422, "control_image"),
    (dict(control_image=base64.b64encode(b"GIF? no").decode()), 422, "control_image"),
    (dict(control_image=[1, 2]), 422, "control_image"),
    (dict(controlnet_conditioning_scale=0.5), 422, "controlnet_conditioning_scale"),  # without a control image
    (dict(control_image="CTRL", controlnet_conditioning_scale="high"), 422, "controlnet_conditioning_scale"),
    (dict(control_image="CTRL", controlnet_conditioning_scale=[]), 422, "controlnet_conditioning_scale"),
])
def test_malformed_controlnet_fields_are_422s_naming_them(body, status, param):
    body = {k: (_scribble_b64() if v == "CTRL" else v) for k, v in body.items()}
    with pytest.raises(api.ApiError) as info:
        api.parse_request(json.dumps(dict(prompt="x", **body)).encode())
    assert info.value.status == status and info.value.param == param, info.value.message


def test_a_huge_control_image_is_refused_before_its_pixels_are_decoded():
    with pytest.raises(api.ApiError) as info:
        api.parse_request(json.dumps(dict(prompt="x", size="64x64", control_image=_scribble_b64((3000, 2000)))).encode(),
                          api.Limits(max_pixels=4_000_000))
    assert info.value.status == 413 and info.value.param == "control_image"


def test_controlnet_requests_batch_together_and_each_keeps_its_image(engine_dir):
    from sprintrt import SprintControlNetPipeline

    pipe = SprintControlNetPipeline.from_engines(engine_dir)
    reqs = [_parse(prompt="a koi pond", n=2, size="128x96", num_inference_steps=1, seed=11,
                   control_image=_scribble_b64(stroke=(5, 5, 60, 40))),
            _parse(prompt="an owl", n=1, size="128x96", num_inference_steps=1, seed=12,
                   control_image=_scribble_b64(stroke=(60, 5, 5, 60)))]
    plain = _parse(prompt="an owl", size="128x96", num_inference_steps=1, seed=12)
    assert reqs[0].batch_key() == reqs[1].batch_key() != plain.batch_key()
    call = api.batch_call(reqs)
    batched = api.pipeline_for(call, None, pipe)(**call, output_type="np").images
    k = 0
    for req in reqs:
        alone = pipe(**req.call_arguments(), output_type="np").images
        assert np.abs(batched[k:k + req.n] - alone).max() <= 1e-5
        k += req.n
