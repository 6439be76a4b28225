"""`sprintrt ui`: the Gradio page in a real browser (Debian's headless Chromium driven by Playwright, on
127.0.0.1), and the pieces behind it.

The browser test draws a stroke on the sketch canvas and waits for the image element to become a PNG of the
requested size, draws again and waits for it to change, then makes an image on the text-to-image tab. A
screenshot of the page is kept in out/test-artifacts/ (not committed)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sprintrt.errors import CallCancelled

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path("out/test-artifacts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the pieces, without a browser ------------------------------------------------------------------

class _SlowPipe:
    """Stands in for a pipeline: each call passes a few stage boundaries, checking the cancellation as
    SprintPipeline does."""

    def __init__(self):
        self.cancelled = None
        self.finished = []

    def cancel_when(self, cancelled):
        import contextlib

        @contextlib.contextmanager
        def block():
            self.cancelled = cancelled
            yield

        return block()

    def __call__(self, name):  # called by LatestWins.run(pipe, name=...)
        for _ in range(20):
            if self.cancelled():
                raise CallCancelled("cancelled")
            time.sleep(0.01)
        self.finished.append(name)
        return name


def test_the_latest_request_wins_and_overtaken_ones_stop():
    from sprintrt.serving.ui import LatestWins

    pipe = _SlowPipe()
    runner = LatestWins()
    results = {}

    def send(name):
        results[name] = runner.run(pipe, name=name)

    threads = []
    for name in ("first", "second", "third"):  # a stroke every 30 ms while each call takes 200 ms
        threads.append(threading.Thread(target=send, args=(name,)))
        threads[-1].start()
        time.sleep(0.03)
    for t in threads:
        t.join(timeout=10)
    assert results == {"first": None, "second": None, "third": "third"}
    assert pipe.finished == ["third"] and runner.dropped == 2


def test_the_pipeline_stops_a_cancelled_call_at_a_stage_boundary(sprint_pipe):
    with sprint_pipe.cancel_when(lambda: True), pytest.raises(CallCancelled, match="before text_encoder"):
        sprint_pipe("a cat", height=64, width=64, use_resolution_binning=False)


def test_latency_line_and_sketch_conversion():
    from sprintrt.serving.ui import latency_text, sketch_image

    line = latency_text({"text_encoder": 0.012, "controlnet": [0.005, 0.007], "transformer": [0.01, 0.01],
                         "vae_decoder": 0.2, "total": 0.31})
    assert line == ("text encoder 12 ms · ControlNet 2 x 6 ms · transformer 2 x 10 ms · VAE decoder 200 ms · "
                    "**total 0.31 s**")
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # a white stroke; the rest is transparent canvas: black paper
    rgba[1, 1] = (255, 255, 255, 0)
    img = np.asarray(sketch_image({"composite": rgba}))
    assert img.shape == (4, 4, 3) and img[0, 0].tolist() == [255, 255, 255] and img[1, 1].tolist() == [0, 0, 0]
    assert sketch_image({"composite": None}) is None


# ---- the page in a browser --------------------------------------------------------------------------

@pytest.fixture
def ui_server(engine_dir):
    pytest.importorskip("gradio")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    code = ("import sys; from sprintrt.serving.ui import run_ui; "
            f"run_ui(sys.argv[1], host='127.0.0.1', port={port}, verify_sha256=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(engine_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the page's server exited: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the page did not come up in 120 s")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 9)
        proc.communicate(timeout=30)


def _png_of(page, selector: str, previous: str | None = None, timeout_s: float = 90) -> tuple[str, Image.Image]:
    """Wait until the img in `selector` has a source other than `previous`; return it and its decoded image."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        src = page.evaluate(f"() => {{ const i = document.querySelector('{selector} img'); return i ? i.src : null; }}")
        if src and src != previous:
            body = page.request.get(src).body()
            assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:16]
            return src, Image.open(io.BytesIO(body))
        time.sleep(0.2)
    raise AssertionError(f"no new image in {selector} after {timeout_s} s")


def _stroke(page, selector: str, points) -> None:
    """Draw through `points` (fractions of the square canvas, shown centred in the editor's canvas element)."""
    canvas = page.locator(f"{selector} canvas").first
    box = canvas.bounding_box()
    assert box and box["width"] > 100, box
    side = 0.7 * min(box["width"], box["height"])  # inside the drawing, whatever the editor's zoom
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    xs = [left + side * x for x, _ in points]
    ys = [top + side * y for _, y in points]
    page.mouse.move(xs[0], ys[0])
    page.mouse.down()
    for x, y in zip(xs[1:], ys[1:]):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (`make test` installs it)")
def test_drawing_on_the_page_makes_an_image_of_the_requested_size(ui_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(ui_server, wait_until="networkidle")
            page.locator("#cn-sketch canvas").first.wait_for(timeout=30_000)
            _stroke(page, "#cn-sketch", [(0.2, 0.2), (0.5, 0.6), (0.8, 0.3)])
            first, image = _png_of(page, "#cn-image")
            assert image.size == (1024, 1024)  # the default size, generated exactly
            assert "total" in page.locator("#cn-latency").inner_text()
            _stroke(page, "#cn-sketch", [(0.1, 0.9), (0.9, 0.9)])
            second, image = _png_of(page, "#cn-image", previous=first)
            assert image.size == (1024, 1024)
            page.screenshot(path=str(ARTIFACTS / "ui-sketch-to-image.png"), full_page=True)
            page.get_by_role("tab", name="Text to image").click()
            page.locator("#t2i-go").click()
            _, image = _png_of(page, "#t2i-image")
            assert image.size == (1024, 1024)
            page.screenshot(path=str(ARTIFACTS / "ui-text-to-image.png"), full_page=True)
        finally:
            browser.close()
