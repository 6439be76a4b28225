"""Shared fixtures: one seeded tiny checkpoint, exported and built once per test session.

Tests that need an NVIDIA GPU with TensorRT are marked `gpu` and skip here with the reason.
"""

from __future__ import annotations

import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    reasons = {"gpu": _gpu_missing_reason(), "cuda": _cuda_missing_reason()}
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

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    from sprintrt.export.onnx_export import export_model

    # fp16 variants (not the bf16 default) keep the suite short and let ONNX Runtime run the typed engines.
    return export_model(tiny_checkpoint, tmp_path_factory.mktemp("export") / "onnx", dtypes=("fp32", "fp16"))


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
