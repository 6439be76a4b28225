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


# ---- hardening: sizes, prompts, threads, file contracts, notices --------------------------------------------

def test_binned_request_size_is_bounded(sprint_pipe):
    """Binning generates at a bin and resizes back: a 99999² request would allocate 112 GiB in the resize."""
    for size in (dict(height=99999, width=99999), dict(height=1024, width=4097)):
        call = {**OK, "use_resolution_binning": True, **size}
        name = "height" if size["height"] > 4096 else "width"
        with pytest.raises(InvalidInputError, match=f"{name}={size[name]}.*\\[1, 4096\\] pixels"):
            sprint_pipe(**call)
        with pytest.raises(InvalidInputError, match=f"{name}={size[name]}"):
            sprint_pipe.check_arguments(**call)


def test_binned_size_must_fit_the_engines_profile(engine_dir):
    """A TensorRT-like narrow profile: the bin a request falls in is checked against it, as an unbinned size is."""
    from sprintrt.specs import Bounds

    pipe = SprintPipeline.from_engines(engine_dir)
    pipe.limits["transformer"]["latent_width"] = Bounds(1, 32, 32)  # up to 1024 px at 32x
    pipe.check_arguments(**{**OK, "use_resolution_binning": True, "height": 1000, "width": 1000})  # bins to 1024²
    with pytest.raises(InvalidInputError, match="width=2048.*\\[32, 1024\\].*binning generates 500x2000 at 512x2048"):
        pipe.check_arguments(**{**OK, "use_resolution_binning": True, "height": 500, "width": 2000})


@pytest.mark.parametrize("prompt,name", [("a \ud800 cat", "prompt"), ("a \udcff cat", "prompt"),
                                         (["a cat", "a \udcff dog"], "prompt\\[1\\]")])
def test_prompt_that_is_not_utf8_is_a_typed_error(sprint_pipe, prompt, name):
    """Lone surrogates (argv bytes decoded with surrogateescape) made the tokenizer raise a TypeError."""
    with pytest.raises(InvalidInputError, match=f"^{name} is not valid UTF-8"):
        sprint_pipe(**{**OK, "prompt": prompt})
    with pytest.raises(InvalidInputError, match="UTF-8"):
        sprint_pipe.check_arguments(**{**OK, "prompt": prompt})


def test_prompt_cut_to_max_sequence_length_is_noticed(sprint_pipe):
    import warnings

    from sprintrt.errors import Notice

    with pytest.warns(Notice, match="prompt\\[0\\] has \\d+ tokens, max_sequence_length=300 keeps 300"):
        sprint_pipe(**{**OK, "prompt": "a cat " * 400, "output_type": "latent"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        sprint_pipe(**{**OK, "output_type": "latent"})  # a prompt that fits: nothing to say


def test_threads_are_bounded_by_the_cpus(engine_dir, monkeypatch):
    from sprintrt.runtime.engine import RunOptions, max_threads

    assert RunOptions(threads=max_threads()).threads == max_threads()
    for bad in (0, -1, max_threads() + 1, 1000):
        with pytest.raises(InvalidInputError, match=f"threads={bad}.*\\[1, {max_threads()}\\]"):
            RunOptions(threads=bad)
    with pytest.raises(InvalidInputError, match="threads=1000"):
        SprintPipeline.from_engines(engine_dir, threads=1000)
    monkeypatch.setenv("SPRINTRT_THREADS", "1000")
    with pytest.raises(InvalidInputError, match="threads=1000"):
        RunOptions()


@pytest.mark.parametrize("edit,match", [
    (lambda m: [], "holds a JSON list, not a manifest"),
    (lambda m: {k: v for k, v in m.items() if k != "model_dims"}, "has no valid 'model_dims'"),
    (lambda m: {**m, "model": {"source": "x"}}, "has no valid 'model.identity'"),
    (lambda m: {**m, "components": {**m["components"], "transformer": {
        k: v for k, v in m["components"]["transformer"].items() if k != "io"}}},
     "has no valid 'components.transformer.io'"),
    (lambda m: {**m, "components": {**m["components"], "vae_decoder": 7}}, "has no valid 'components.vae_decoder'"),
])
def test_malformed_manifest_names_the_file_and_key(copy_engine_dir, edit, match):
    path = copy_engine_dir / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(EngineDirError, match=f"manifest.json {match}.*sprintrt build"):
        SprintPipeline.from_engines(copy_engine_dir)


@pytest.mark.parametrize("text,match", [
    ("{not json", "cannot be read"),
    ("[]", "holds a JSON list, not an export record"),
    (json.dumps({"model": {"identity": "x", "source": "y"}, "model_dims": {}, "pipeline": {}}),
     "has no valid 'components'"),
    (json.dumps({"model": {"identity": "x", "source": "y"}, "model_dims": {}, "pipeline": {},
                 "components": {"transformer": {"file": "t.onnx", "bytes": 1, "validation": [], "spec": {}}}}),
     "has no valid 'components.transformer.sha256'"),
])
def test_malformed_export_info_names_the_file_and_key(tmp_path, text, match):
    from sprintrt.errors import ModelLoadError
    from sprintrt.export_info import read_export_info

    (tmp_path / "export_info.json").write_text(text)
    with pytest.raises(ModelLoadError, match=f"export_info.json {match}.*sprintrt export"):
        read_export_info(tmp_path)


def test_image_that_is_a_directory_says_so(tmp_path):
    from sprintrt.runtime.image import load_image_file

    with pytest.raises(InvalidInputError, match="is a directory"):
        load_image_file(tmp_path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image_file(tmp_path / "missing.png")


def test_attention_kwargs_are_accepted_with_one_notice(sprint_pipe, monkeypatch):
    """diffusers code passes attention_kwargs={"scale": ...} for LoRAs: it runs, and is told once it does nothing."""
    import warnings

    import sprintrt.errors
    from sprintrt.errors import Notice

    monkeypatch.setattr(sprintrt.errors, "_NOTICED", set())
    call = {**OK, "output_type": "latent", "generator": 0}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = sprint_pipe(**call, attention_kwargs={"scale": 0.5}).images
        sprint_pipe(**call, attention_kwargs={"scale": 0.5})
    notices = [w for w in seen if issubclass(w.category, Notice)]
    assert len(notices) == 1 and "LoRA" in str(notices[0].message) and "fuse" in str(notices[0].message)
    assert np.array_equal(first, sprint_pipe(**call).images)
    with pytest.raises(InvalidInputError, match="attention_kwargs"):
        sprint_pipe(**call, attention_kwargs="scale")
