"""Bad input gets a typed error naming the value, the allowed range and the fix, before any engine runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sprintrt.errors import EngineDirError, InvalidInputError, SprintError
from sprintrt.runtime.pipeline import SprintPipeline

OK = dict(prompt="a cat", num_inference_steps=1, intermediate_timesteps=None, height=128, width=128,
          use_resolution_binning=False, output_type="np")


@pytest.mark.parametrize("override,match", [
    (dict(prompt=""), "prompt"),
    (dict(prompt=["a", 7]), "prompt\\[1\\]"),
    (dict(prompt=None), "prompt=None"),
    (dict(height=100), "height=100.*multiple of 32"),
    (dict(width=129), "width=129.*multiple of 32"),
    (dict(height=4128), "height=4128.*\\[32, 4096\\] pixels \\(latent_height 1..128"),
    (dict(num_inference_steps=0), "num_inference_steps=0.*\\[1, 1000\\]"),
    (dict(num_inference_steps=4, intermediate_timesteps=1.3), "intermediate_timesteps=1.3.*num_inference_steps == 2"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan.*finite"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
    (dict(num_images_per_prompt=9), "num_images_per_prompt=9.*\\[1, 8\\]"),
    (dict(output_type="jpeg"), "output_type='jpeg'"),
    (dict(max_sequence_length=0), "max_sequence_length=0"),
    (dict(generator="seed"), "generator='seed'"),
    (dict(generator=[0, 1]), "list of 2"),
    (dict(latents=np.zeros((1, 32, 3, 3), np.float32)), "latents=.*shape \\(1, 32, 4, 4\\)"),
    (dict(clean_caption=True), "clean_caption"),
])
def test_bad_call_arguments(sprint_pipe, override, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        sprint_pipe(**{**OK, **override})
    assert "Fix" in str(info.value) or "expected" in str(info.value)


def test_binning_accepts_any_positive_size(sprint_pipe):
    """With binning on, 100x129 is fine: it is binned, then resized back to 100x129."""
    out = sprint_pipe(**{**OK, "use_resolution_binning": True, "height": 100, "width": 129}).images
    assert out.shape == (1, 100, 129, 3)


def test_missing_engine_dir(tmp_path):
    with pytest.raises(EngineDirError, match="does not exist.*sprintrt build"):
        SprintPipeline.from_engines(tmp_path / "nope")


def test_missing_manifest(copy_engine_dir):
    (copy_engine_dir / "manifest.json").unlink()
    with pytest.raises(EngineDirError, match="no manifest.json"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_corrupt_manifest(copy_engine_dir):
    (copy_engine_dir / "manifest.json").write_text("{not json")
    with pytest.raises(EngineDirError, match="not valid JSON"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_manifest_from_another_model(copy_engine_dir):
    path = copy_engine_dir / "manifest.json"
    m = json.loads(path.read_text())
    m["components"]["transformer"]["model_identity"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="different models"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_expected_model_mismatch(engine_dir):
    with pytest.raises(EngineDirError, match="not the expected"):
        SprintPipeline.from_engines(engine_dir, expect_model="f" * 64)


def test_truncated_engine_file(copy_engine_dir):
    m = json.loads((copy_engine_dir / "manifest.json").read_text())
    path = copy_engine_dir / m["components"]["vae_decoder"]["file"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EngineDirError, match="truncated"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_engine_built_for_another_cpu_or_library(copy_engine_dir):
    path = copy_engine_dir / "manifest.json"
    m = json.loads(path.read_text())
    m["components"]["text_encoder"]["target"]["isa"] = ["sse2"]
    path.write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="built for"):
        SprintPipeline.from_engines(copy_engine_dir)
    m["components"]["text_encoder"]["target"] = json.loads((copy_engine_dir / "manifest.json").read_text()
                                                           )["components"]["transformer"]["target"]
    m["components"]["text_encoder"]["libraries"]["onnxruntime"] = "0.0.1"
    path.write_text(json.dumps(m))
    with pytest.raises(EngineDirError, match="onnxruntime 0.0.1"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_sha256_verification_catches_same_size_edits(copy_engine_dir):
    m = json.loads((copy_engine_dir / "manifest.json").read_text())
    path = copy_engine_dir / m["components"]["transformer"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineDirError, match="sha256"):
        SprintPipeline.from_engines(copy_engine_dir, verify_sha256=True)


def test_all_errors_share_a_base_class():
    assert issubclass(InvalidInputError, SprintError) and issubclass(EngineDirError, SprintError)


def test_runtime_imports_without_torch_or_diffusers():
    code = ("import sys; import sprintrt.runtime.pipeline, sprintrt.runtime.scheduler; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
