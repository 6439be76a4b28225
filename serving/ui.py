"""`sprintrt ui ENGINE_DIR`: an interactive page over the engines, a Gradio app (NVlabs' own SANA demos are).

Two tabs when the engines have a ControlNet, one otherwise:
- **Sketch to image**: a prompt, a sketch canvas (white strokes on black: the scribble format SANA's
  ControlNets are trained on) whose image is made again at every stroke, the seed, steps, ControlNet scale
  and size. The latest request wins: each stroke sends a request; one that a newer one overtakes is dropped
  while it waits, or stopped at its next stage boundary while it runs (SprintPipeline.cancel_when), so the
  engines only ever work on what the user drew last.
- **Text to image**: the plain pipeline.

Under each image: the per-stage latency of the call that made it. Images are generated at the chosen size
exactly (no resolution binning: every size offered is one the model generates). The page listens on
127.0.0.1 unless --host says otherwise; Gradio's analytics and share links are off.
"""

from __future__ import annotations

import itertools
import os
import threading

import numpy as np

from sprintrt import defaults as D
from sprintrt.errors import CallCancelled, InvalidInputError, MissingDependencyError

SIZES = ("512x512", "768x768", "1024x1024", "1024x768", "768x1024")
DEFAULT_SIZE = "1024x1024"  # the paper's interactive row: 1024² images
STAGE_NAMES = {"text_encoder": "text encoder", "vae_encoder": "VAE encoder (control image)", "controlnet": "ControlNet",
               "transformer": "transformer", "vae_decoder": "VAE decoder"}


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise MissingDependencyError("`sprintrt ui` needs Gradio. Fix: pip install 'sprintrt[ui]'") from e
    return gr


class LatestWins:
    """Runs pipeline calls one at a time; a call that a newer one overtakes is dropped while it waits and
    stopped at its next stage boundary while it runs. `run` returns None for a dropped call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self.latest = 0
        self.dropped = 0  # calls overtaken by newer ones (for tests and logs)

    def run(self, pipe, **call):
        ticket = self.latest = next(self._tickets)
        with self._lock:
            if self.latest != ticket:
                self.dropped += 1
                return None
            try:
                with pipe.cancel_when(lambda: self.latest != ticket):
                    return pipe(**call)
            except CallCancelled:
                self.dropped += 1
                return None


def latency_text(timings: dict) -> str:
    """One line of per-stage seconds: 'text encoder 12 ms · ControlNet 2 x 5 ms · ... · total 0.31 s'."""
    parts = []
    for stage, name in STAGE_NAMES.items():
        if stage not in timings:
            continue
        v = timings[stage]
        parts.append(f"{name} {len(v)} x {1000 * sum(v) / len(v):.0f} ms" if isinstance(v, list)
                     else f"{name} {1000 * v:.0f} ms")
    return " · ".join(parts + [f"**total {timings.get('total', 0.0):.2f} s**"])


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def sketch_image(value):
    """The sketch canvas's value (Gradio's ImageEditor dict, or an array) → a PIL RGB image, or None when empty."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[2] == 4:  # transparent parts of the canvas are black paper
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3].astype(np.float32) * alpha).round().astype(np.uint8)
    return Image.fromarray(arr.astype(np.uint8)).convert("RGB")


def build_ui(pipe, controlnet_pipe=None, title: str = "sprintrt: SANA-Sprint"):
    """The Gradio Blocks over loaded pipelines: SprintPipeline, and SprintControlNetPipeline (or None) for the
    sketch tab (serving.app.load_pipelines gives both, sharing their engines)."""
    gr = _gradio()

    runner = LatestWins()  # one for the page: a request of either tab overtakes the other's

    def call(target, prompt, seed, steps, size, **extra):
        width, height = _size(size)
        steps = int(steps)
        try:
            out = runner.run(target, prompt=prompt, num_inference_steps=steps,
                             intermediate_timesteps=D.intermediate_timesteps_for(steps), height=height, width=width,
                             generator=int(seed), use_resolution_binning=False, output_type="pil", **extra)
        except InvalidInputError as e:
            raise gr.Error(str(e)) from None
        if out is None:  # overtaken by a newer request: leave the page as the newer one will set it
            return gr.skip(), gr.skip()
        return out.images[0], latency_text(out.timings)

    def text_to_image(prompt, seed, steps, size):
        return call(pipe, prompt, seed, steps, size)

    def sketch_to_image(prompt, sketch, seed, steps, scale, size):
        control = sketch_image(sketch)
        if control is None:
            width, height = _size(size)
            from PIL import Image

            control = Image.new("RGB", (width, height))
        return call(controlnet_pipe, prompt, seed, steps, size, control_image=control,
                    controlnet_conditioning_scale=float(scale))

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\nOne-step text-to-image on {'/'.join(sorted(_backends(pipe)))} engines.")
        if controlnet_pipe is not None:
            with gr.Tab("Sketch to image"):
                with gr.Row():
                    with gr.Column():
                        c_prompt = gr.Textbox(label="Prompt", value="a cozy cabin in a snowy forest", elem_id="cn-prompt")
                        black = np.zeros((512, 512, 3), dtype=np.uint8)
                        sketch = gr.Sketchpad(value=black, label="Sketch (white strokes on black)", type="numpy",
                                              image_mode="RGB", canvas_size=(512, 512), fixed_canvas=True,
                                              brush=gr.Brush(colors=["#ffffff"], default_size=8, color_mode="fixed"),
                                              layers=False, elem_id="cn-sketch")
                        with gr.Row():
                            c_seed = gr.Number(label="Seed", value=D.DEFAULT_SEED, precision=0, elem_id="cn-seed")
                            c_steps = gr.Slider(1, 4, value=D.DEFAULT_STEPS, step=1, label="Steps", elem_id="cn-steps")
                            c_scale = gr.Slider(0.0, 2.0, value=D.DEFAULT_CONTROLNET_SCALE, step=0.05,
                                                label="ControlNet scale", elem_id="cn-scale")
                            c_size = gr.Dropdown(list(SIZES), value=DEFAULT_SIZE, label="Size (W x H)",
                                                 elem_id="cn-size")
                    with gr.Column():
                        c_image = gr.Image(label="Image", type="pil", format="png", interactive=False,
                                           elem_id="cn-image")
                        c_latency = gr.Markdown(elem_id="cn-latency")
                inputs = [c_prompt, sketch, c_seed, c_steps, c_scale, c_size]
                # Every stroke sends a request (the canvas fires `input` as it is drawn on; "multiple": none is
                # held back by the page); LatestWins drops the overtaken ones.
                for event in (sketch.input, c_prompt.submit, c_seed.change, c_steps.release, c_scale.release,
                              c_size.change):
                    event(sketch_to_image, inputs, [c_image, c_latency], trigger_mode="multiple",
                          concurrency_limit=4, show_progress="minimal")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    t_prompt = gr.Textbox(label="Prompt", value="a red fox standing in fresh snow", elem_id="t2i-prompt")
                    with gr.Row():
                        t_seed = gr.Number(label="Seed", value=D.DEFAULT_SEED, precision=0, elem_id="t2i-seed")
                        t_steps = gr.Slider(1, 4, value=D.DEFAULT_STEPS, step=1, label="Steps", elem_id="t2i-steps")
                        t_size = gr.Dropdown(list(SIZES), value=DEFAULT_SIZE, label="Size (W x H)", elem_id="t2i-size")
                    t_go = gr.Button("Generate", variant="primary", elem_id="t2i-go")
                with gr.Column():
                    t_image = gr.Image(label="Image", type="pil", format="png", interactive=False, elem_id="t2i-image")
                    t_latency = gr.Markdown(elem_id="t2i-latency")
            for event in (t_go.click, t_prompt.submit):
                event(text_to_image, [t_prompt, t_seed, t_steps, t_size], [t_image, t_latency], concurrency_limit=4)
    demo.runner = runner  # for tests: how many requests were overtaken
    return demo


def _backends(pipe) -> set:
    return {pipe.manifest.components[c]["backend"] for c in pipe.limits}


def run_ui(engine_dir, host: str = D.SERVE_HOST, port: int = D.UI_PORT, threads: int | None = None,
           verify_sha256: bool = True, say=print) -> None:
    """Serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from sprintrt.serving.app import load_pipelines

    pipes = load_pipelines(engine_dir, threads=threads, verify_sha256=verify_sha256)
    for pipe in pipes:
        if pipe is not None:
            pipe.cache_instruction()
    demo = build_ui(*pipes)
    say(f"sprintrt ui: http://{host}:{port} (Ctrl-C stops it)")
    demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, share=False, show_error=True,
                                                   quiet=True)
