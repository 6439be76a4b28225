"""Shared fixtures: one seeded tiny checkpoint, exported and built once per test session.

Tests that need an NVIDIA GPU with TensorRT are marked `gpu` and skip here with the reason.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    reasons = {"gpu": _gpu_missing_reason(), "cuda": _cuda_missing_reason(), "rtx": _rtx_missing_reason(),
               "rtx_gpu": _rtx_missing_reason() or _nvidia_gpu_missing_reason()}
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _cuda_missing_reason():
    try:
        import torch
    except ImportError:
        return "needs PyTorch with CUDA; torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA build of PyTorch and an NVIDIA GPU; this torch sees none"
    return None


def _rtx_missing_reason():
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception:
        return "needs TensorRT for RTX (pip install tensorrt-rtx-cu13; `make test` installs it)"
    return None


def _nvidia_gpu_missing_reason():
    return "needs an NVIDIA RTX GPU; nvidia-smi is not on this machine" if shutil.which("nvidia-smi") is None else None


def _gpu_missing_reason():
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return "needs TensorRT and an NVIDIA GPU; neither is on this machine"
    if shutil.which("nvidia-smi") is None:
        return "needs an NVIDIA GPU; nvidia-smi is not on this machine"
    return None


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from sprintrt.export.checkpoint import make_checkpoint

    # With a ControlNet: every component, the ControlNet's too, goes through the same export, builds and tests.
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, controlnet=True)


@pytest.fixture(scope="session")
def typed_onnx_dir(tiny_checkpoint, tmp_path_factory):
    """Every component with all three graphs (fp32, bf16, fp16): what TensorRT and TensorRT-RTX build from. The
    suite's one full export (a tiny export takes minutes on 2 cores)."""
    from sprintrt.export.onnx_export import export_model

    return export_model(tiny_checkpoint, tmp_path_factory.mktemp("typed") / "onnx", dtypes=("fp32", "bf16", "fp16"))


@pytest.fixture(scope="session")
def onnx_dir(typed_onnx_dir, tmp_path_factory):
    """The same export as `export --dtypes fp32,fp16` writes it: the bf16 variants taken out of a copy (fp16
    variants let ONNX Runtime run typed engines; most tests want no bf16 graph to be picked up)."""
    import json

    from sprintrt.export_info import EXPORT_INFO

    out = tmp_path_factory.mktemp("export") / "onnx"
    shutil.copytree(typed_onnx_dir, out)
    info = json.loads((out / EXPORT_INFO).read_text())
    for record in info["components"].values():
        variant = record["variants"].pop("bf16")
        for f in (variant, variant.get("external_data")):
            if f:
                (out / f["file"]).unlink()
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=1))
    return out


@pytest.fixture(scope="session")
def engine_dir(onnx_dir, tmp_path_factory):
    from sprintrt.engines.build import build_engines

    return build_engines(onnx_dir, tmp_path_factory.mktemp("engines") / "ort")


@pytest.fixture(scope="session")
def reference_pipe(tiny_checkpoint):
    """diffusers' own SanaSprintPipeline on the tiny checkpoint (fp32, CPU)."""
    from sprintrt.export.checkpoint import load_pipeline

    return load_pipeline(tiny_checkpoint)


@pytest.fixture(scope="session")
def sprint_pipe(engine_dir):
    from sprintrt.runtime.pipeline import SprintPipeline

    return SprintPipeline.from_engines(engine_dir)


@pytest.fixture
def copy_engine_dir(engine_dir, tmp_path):
    """A private copy of the built engine directory, for tests that damage it."""
    dst = tmp_path / "engines"
    shutil.copytree(engine_dir, dst)
    return dst


class EngineSpy:
    """A stand-in engine that records the shape of one input on every call, then runs the real engine."""

    def __init__(self, engine, input_name: str):
        self.engine, self.input_name, self.shapes = engine, input_name, []

    def __call__(self, **feeds):
        self.shapes.append(feeds[self.input_name].shape)
        return self.engine(**feeds)


@pytest.fixture
def engine_spy():
    return EngineSpy
