"""Per-stage timing of diffusers' SanaSprintPipeline, by forward hooks on its three networks.

Used for the PyTorch baseline column of `sprintrt demo` and `sprintrt bench`: the pipeline runs
unmodified; hooks only read the clock around the text encoder, each transformer call, the VAE
decoder (and, image to image, the VAE encoder), so the stage names line up with
SprintPipelineOutput.timings.

On a GPU, PyTorch returns from a forward call once its kernels are queued: the hooks then synchronise
the device before reading the clock (`sync`, e.g. torch.cuda.synchronize), so each stage is charged
with its own GPU work and not with the queue it inherited.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def stage_hooks(pipe, timings: dict, sync=None):
    # The encoder runs in image to image and for a ControlNet's control image only. With a ControlNet
    # (benchmarks/controlnet_reference.py) the transformer slot holds both networks: each is timed on its own.
    transformer = getattr(pipe.transformer, "transformer", pipe.transformer)
    modules = {"text_encoder": pipe.text_encoder, "transformer": transformer, "vae_decoder": pipe.vae.decoder,
               "vae_encoder": pipe.vae.encoder}
    if getattr(pipe.transformer, "controlnet", None) is not None:
        modules["controlnet"] = pipe.transformer.controlnet
    handles, starts = [], {}
    for stage, module in modules.items():
        def pre(_m, _args, stage=stage):
            if sync is not None:
                sync()
            starts[stage] = time.perf_counter()

        def post(_m, _args, _out, stage=stage):
            if sync is not None:
                sync()
            seconds = time.perf_counter() - starts.pop(stage)
            if stage in ("transformer", "controlnet"):
                timings.setdefault(stage, []).append(seconds)
            else:
                timings[stage] = timings.get(stage, 0.0) + seconds

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield timings
    finally:
        for h in handles:
            h.remove()


def device_sync(pipe):
    """The synchronisation the hooks need for the pipeline's device: None on a CPU."""
    import torch

    device = pipe.transformer.device
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def run_timed(pipe, **kwargs):
    """Call the diffusers pipeline once; returns (output, timings) with 'total' and per-stage seconds."""
    import torch

    timings: dict = {}
    sync = device_sync(pipe)
    with stage_hooks(pipe, timings, sync), torch.inference_mode():
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        out = pipe(**kwargs)
        if sync is not None:  # output_type="latent" would leave work queued
            sync()
        timings["total"] = time.perf_counter() - t0
    return out, timings
