"""The one-process server (`sprintrt serve` with one replica, no --address) as a hostile client and an
operator see it, on the tiny engines: only loopback listens, SIGINT and SIGTERM drain, a timed-out request
frees the replica at the next stage, one bad request never fails its batch-mates, and a fuzzer's requests
all get an answer in the API's shape. Each server is a subprocess of its own; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from sprintrt.errors import invalid  # noqa: E402
from sprintrt.serving import api  # noqa: E402
from sprintrt.serving.app import Job, ServeOptions  # noqa: E402

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`run_local` in a subprocess of its own session (so a signal to its group reaches it alone)."""

    def __init__(self, options: ServeOptions):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = ("import json, sys; from sprintrt.serving.app import ServeOptions, run; "
                f"run(ServeOptions(**json.loads(sys.argv[1])), host='127.0.0.1', port={self.port})")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(options))],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stdout.read()}")
            if get(self.url, "/ready")[0] == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not become ready")

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        out, _ = self.proc.communicate(timeout=30)
        return out


@pytest.fixture
def local_server(engine_dir):
    servers = []

    def start(**overrides):
        servers.append(LocalServer(ServeOptions(engine_dir=str(engine_dir), **overrides)))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def post(url: str, body, timeout: float = 60.0, content_type: str = "application/json") -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + api.ROUTE, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        # A non-JSON error body fails the test here.
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"no_answer": str(e)}, {}


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def is_api_error(status: int, body: dict) -> bool:
    err = body.get("error", {})
    return set(err) == {"message", "type", "param", "code"} and err["code"] == status and "Fix" in err["message"]


def in_background(fn, *args) -> dict:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(answer=fn(*args)))
    thread.start()
    out["thread"] = thread
    return out


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stats(url: str) -> dict:
    return json.loads(get(url, "/v1/stats")[1])


# A request that runs for seconds on the tiny engines: 200 steps at 2048² (0.015 s each) and a 2048² decode
# (1.2 s), ~4.5 s on an idle 2-vCPU EPYC. Servers that take it are started with max_steps=LONG_STEPS.
LONG_STEPS = 200
LONG = {"prompt": "a long request", "size": "2048x2048", "num_inference_steps": LONG_STEPS, "seed": 1}


def test_only_loopback_listens(local_server):
    """Found: the local Ray opened a worker port on *:44397 for a server asked for 127.0.0.1."""
    import psutil

    server = local_server()
    proc = psutil.Process(server.proc.pid)
    listening = [c.laddr for p in [proc, *proc.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    assert {addr.port for addr in listening} == {server.port}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_drains_in_flight_requests_then_exits_0(local_server, sig):
    """Found: SIGINT dropped the in-flight request; SIGTERM to the process group aborted with a stack dump."""
    server = local_server(max_steps=LONG_STEPS)
    running = in_background(post, server.url, LONG)
    assert wait_for(lambda: stats(server.url)["admitted"] == 1)
    if sig == "SIGTERM":
        os.killpg(server.proc.pid, signal.SIGTERM)  # what systemd and Kubernetes send: the whole group
    else:
        os.kill(server.proc.pid, signal.SIGINT)
    time.sleep(0.3)
    status, body, headers = post(server.url, {"prompt": "too late", "size": "64x64"})
    assert status == 503 and "shutting down" in body["error"]["message"] and int(headers["retry-after"]) >= 1
    assert get(server.url, "/ready")[0] == 503
    running["thread"].join(60)
    assert running["answer"][0] == 200 and len(running["answer"][1]["data"]) == 1
    assert server.proc.wait(timeout=30) == 0
    out = server.stop()
    assert f"{sig}: draining (1 request(s) in flight" in out and "Traceback" not in out


def test_a_timed_out_request_frees_the_replica_at_the_next_stage(local_server):
    """Found: with --timeout-s 5 a 4096² request got its 503 but kept computing, and the small requests behind
    it timed out too. Now its work stops at the next stage boundary (here: before the next of 1000 transformer
    steps, 0.015 s each at 2048² on an idle 2-vCPU EPYC, long before its decode), and the small request behind
    it is served within its own timeout. Without the stop it would wait for the other steps and the decode
    (~15 s idle, more under load)."""
    server = local_server(timeout_s=2.0, max_steps=1000)
    t0 = time.monotonic()
    status, body, _ = post(server.url, {**LONG, "num_inference_steps": 1000, "seed": 2})
    assert status == 503 and "timeout_s=2.0" in body["error"]["message"]
    assert time.monotonic() - t0 < 5.0
    status, body, _ = post(server.url, {"prompt": "small", "size": "64x64", "num_inference_steps": 1})
    assert status == 200, body
    assert stats(server.url)["engine_calls"] == [1]  # the long request never reached its decode
    assert wait_for(lambda: stats(server.url)["admitted"] == 0, 10)


def test_a_bad_request_never_fails_its_batch_mates(local_server):
    """Found: {"prompt": null} sent with 4 good requests: 3-4 of the 5 got 500."""
    server = local_server(max_batch=4, max_wait_ms=300)
    bodies = [{"prompt": None}] + [{"prompt": f"a good request {i}", "size": "64x64", "num_inference_steps": 1,
                                    "seed": i} for i in range(4)]
    runs = [in_background(post, server.url, b) for b in bodies]
    for r in runs:
        r["thread"].join(60)
    answers = [r["answer"] for r in runs]
    assert answers[0][0] == 422 and answers[0][1]["error"]["param"] == "prompt"
    assert [a[0] for a in answers[1:]] == [200] * 4


class _FailsOnPoison:
    """A pipeline that fails any call whose prompts include `poison` (an engine failure a check cannot see)."""

    def __init__(self, pipe, error: Exception):
        self.pipe, self.error = pipe, error

    def __call__(self, **kwargs):
        if "poison" in kwargs["prompt"]:
            raise self.error
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


@pytest.mark.parametrize("error,status", [(RuntimeError("engine exploded"), 500),
                                          (invalid("prompt", "poison", "a prompt the engines take", "send another"), 422)])
def test_a_failed_batch_is_split_so_only_the_guilty_request_fails(engine_dir, error, status):
    from sprintrt.serving.app import Server

    server = Server(ServeOptions(engine_dir=str(engine_dir), max_batch=4))
    server.pipe = _FailsOnPoison(server.pipe, error)
    prompts = ["a fox", "poison", "an owl", "a boat"]
    jobs = [Job(api.parse_request(json.dumps({"prompt": p, "size": "64x64", "num_inference_steps": 1,
                                              "seed": i}).encode()), time.monotonic() + 60)
            for i, p in enumerate(prompts)]
    results = server.run_batch(jobs)
    assert isinstance(results[1], api.ApiError) and results[1].status == status
    assert is_api_error(status, results[1].body())
    assert all(isinstance(results[i], dict) and len(results[i]["data"]) == 1 for i in (0, 2, 3))
    assert server.engine_calls == [1, 1, 1]  # the batch of 4 failed, then each alone


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "size": "4096x4096", "n": 8}, 413, "size"),
    ({"prompt": "x", "size": "1024x1024", "n": 8}, 413, "n"),
    ({"prompt": "x" * (10 * 1024 * 1024)}, 413, "prompt"),
    ({"prompt": "x", "num_inference_steps": 100}, 422, "num_inference_steps"),
    ({"prompt": "x", "sead": 3}, 422, "sead"),
    ({"prompt": None}, 422, "prompt"),
    ({"prompt": "\ud800"}, 422, "prompt"),
])
def test_cost_limits_and_strict_fields_answer_before_any_work(body, status, param):
    """Found: 4096² x n=2 took the replica from 4.2 to 9.0 GB; a 10 MB prompt cost 24 s; `sead` was ignored."""
    with pytest.raises(api.ApiError) as info:
        api.parse_request(json.dumps(body).encode())
    assert info.value.status == status and info.value.param == param
    assert is_api_error(status, info.value.body())


def test_openai_fields_are_accepted_and_limits_are_per_server():
    req = api.parse_request(b'{"prompt": "x", "model": "dall-e-3", "user": "u1", "size": "2048x2048"}')
    assert req.extra == {"model": "dall-e-3", "user": "u1"}
    with pytest.raises(api.ApiError, match="--max-pixels-per-request"):
        api.parse_request(b'{"prompt": "x", "size": "2048x2048"}', api.Limits(max_pixels=1024 * 1024))


def test_wrong_method_type_and_route_answer_in_the_api_shape(local_server):
    server = local_server()
    status, body, _ = post(server.url, b'{"prompt": "x"}', content_type="text/plain")
    assert status == 415 and is_api_error(415, body)
    for path, want in ((api.ROUTE, 405), ("/nope", 404)):
        status, raw = get(server.url, path)
        assert status == want and is_api_error(want, json.loads(raw))


def test_fuzzed_requests_all_get_an_answer_and_the_server_lives(local_server):
    """Property-based requests (hypothesis): every answer is 200, a 4xx or a 503 in the API's JSON error
    shape, and the server still answers after. Small limits keep each generated image cheap."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server = local_server(max_pixels_per_request=128 * 128, max_steps=2, max_queued=4)
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                               inner, max_size=3),
                          max_leaves=5)
    sizes = st.sampled_from(["64x64", "96x64", "128x128", "13x7", "0x0", "99999x99999", "64X64", ""])
    fields = st.fixed_dictionaries({}, optional={
        "prompt": st.text(max_size=40) | values, "n": st.integers(-1, 5) | values, "size": sizes | values,
        "num_inference_steps": st.integers(-1, 3) | values, "seed": st.integers(-5, 2**64) | values,
        "guidance_scale": st.floats(allow_nan=False, allow_infinity=False) | values,
        "max_timesteps": st.floats(-2, 3) | values, "intermediate_timesteps": st.floats(-2, 3) | values,
        "response_format": st.sampled_from(["b64_json", "url"]) | values, "model": values})
    bodies = fields | values.map(lambda v: v if isinstance(v, dict) else {"prompt": v})
    answers = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies)
    def one_request(body):
        raw = json.dumps(body).encode()
        status, answer, _ = post(server.url, raw, timeout=30)
        answers.append(status)
        assert status == 200 or (status in (400, 413, 415, 422, 503) and is_api_error(status, answer)), (body, answer)

    one_request()
    assert get(server.url, "/health")[0] == 200 and server.proc.poll() is None
    assert len(answers) >= 60



def _png_b64(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_controlnet_request_gets_the_pipelines_image_and_a_bad_control_image_a_422(local_server, engine_dir):
    """Over engines with a ControlNet the server answers both kinds of request: a ControlNet one with the image
    SprintControlNetPipeline gives for the same seed, a plain one with text to image's, a malformed control_image
    with a 422 naming it."""
    import base64
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from sprintrt import SprintControlNetPipeline

    scribble = Image.new("RGB", (96, 128))
    ImageDraw.Draw(scribble).line((10, 10, 80, 110), fill=(255, 255, 255), width=5)
    body = dict(prompt="a cat", size="96x128", num_inference_steps=1, seed=5, control_image=_png_b64(scribble),
                controlnet_conditioning_scale=0.75)
    server = local_server()
    status, answer, _ = post(server.url, body)
    assert status == 200, answer
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))))
    pipe = SprintControlNetPipeline.from_engines(engine_dir)
    req = api.parse_request(json.dumps(body).encode())
    expected = np.asarray(pipe(**req.call_arguments()).images[0])
    assert np.array_equal(served, expected)
    status, plain, _ = post(server.url, {k: v for k, v in body.items() if "control" not in k})
    assert status == 200 and plain["data"][0]["b64_json"] != answer["data"][0]["b64_json"]
    for bad in ("not base64!", base64.b64encode(b"not an image").decode(), 7):
        status, err, _ = post(server.url, {**body, "control_image": bad})
        assert status == 422 and err["error"]["param"] == "control_image", err
