"""The run-side registry: which Engine class runs the engines of each backend a manifest names.

A backend's run module defines one Engine subclass (runtime/engine.py), which knows how to open its
engine files, whether they can run on this machine (`machine_problem`) and what its engines share in
one pipeline (`open_context`, e.g. TensorRT's CUDA stream). The pipeline, the tuner, the benchmarks
and drift load engines through `load_engines` and name no backend. Adding a backend adds one line here.
"""

from __future__ import annotations

import importlib

from sprintrt.errors import EngineDirError
from sprintrt.manifest import Manifest, check_loadable
from sprintrt.runtime.engine import RunOptions

# Backend name (as build records it in the manifest) → "module:EngineClass".
RUN_BACKENDS = {
    "onnxruntime": "sprintrt.runtime.ort_engine:OrtEngine",
    "openvino": "sprintrt.runtime.ov_engine:OvEngine",
    "tensorrt": "sprintrt.runtime.trt_engine:TrtEngine",
    "tensorrt-rtx": "sprintrt.runtime.rtx_engine:RtxEngine",
}


def engine_class(backend: str):
    """The Engine subclass that runs `backend`'s engines."""
    where = RUN_BACKENDS.get(backend)
    if where is None:
        raise EngineDirError(f"backend {backend!r} is not one this sprintrt can run (it runs {list(RUN_BACKENDS)}). "
                             "Fix: upgrade sprintrt, or rebuild the engines with one of those backends")
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def machine_problem(entry: dict) -> str | None:
    """Why the engine of a manifest entry cannot run on this machine, or None."""
    return engine_class(entry["backend"]).machine_problem(entry)


def check_engines(manifest: Manifest, components, *, expect_model: str | None = None,
                  verify_sha256: bool = False) -> None:
    """Raise EngineDirError if any of `components` may not be loaded here (files, model, machine)."""
    check_loadable(manifest, components, expect_model=expect_model, verify_sha256=verify_sha256,
                   machine=machine_problem)


def load_engines(manifest: Manifest, components, options: RunOptions | None = None) -> dict:
    """{component: loaded Engine}, each by its backend's class; engines of one backend share its context."""
    options = options or RunOptions()
    contexts: dict[str, object] = {}
    engines = {}
    for comp in components:
        backend = manifest.components[comp]["backend"]
        cls = engine_class(backend)
        if backend not in contexts:
            contexts[backend] = cls.open_context()
        engines[comp] = cls(manifest, comp, options, contexts[backend])
    return engines


def load_engine(manifest: Manifest, component: str, options: RunOptions | None = None):
    """One component's engine, alone (the tuner and drift time and compare engines one at a time)."""
    return load_engines(manifest, (component,), options)[component]
