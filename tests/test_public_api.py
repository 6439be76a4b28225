"""The names users import, the contracts backends satisfy, and what importing costs."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "openvino", "tensorrt")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_sprintrt_loads_no_heavy_library():
    r = _run(f"import sys, sprintrt; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("statement", ["from sprintrt import SprintPipeline",
                                       "from sprintrt.runtime import SprintPipeline",
                                       "from sprintrt.runtime.pipeline import SprintPipeline"])
def test_every_import_path_gives_the_same_pipeline_without_torch(statement):
    r = _run(f"import sys\n{statement}\nfrom sprintrt.runtime.pipeline import SprintPipeline as P\n"
             f"assert SprintPipeline is P and callable(SprintPipeline.from_engines)\n"
             f"print([m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules])")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_unknown_public_name_is_an_attribute_error():
    import sprintrt

    with pytest.raises(AttributeError, match="NoSuchThing"):
        sprintrt.NoSuchThing  # noqa: B018
    assert "SprintPipeline" in dir(sprintrt)


def test_engines_share_one_base_with_a_lifecycle(engine_dir):
    import numpy as np

    from sprintrt.manifest import read_manifest
    from sprintrt.errors import EngineDirError, InvalidInputError
    from sprintrt.runtime.ort_engine import OrtEngine
    from sprintrt.runtime.ov_engine import OvEngine
    from sprintrt.runtime.registry import load_engine
    from sprintrt.runtime.engine import Engine
    from sprintrt.runtime.trt_engine import TrtEngine

    assert all(issubclass(cls, Engine) for cls in (OrtEngine, OvEngine, TrtEngine))
    manifest = read_manifest(engine_dir)
    with load_engine(manifest, "vae_decoder") as engine:
        assert isinstance(engine, Engine) and engine.backend == "onnxruntime"
        feeds = engine.spec.sample_inputs(engine.spec.sizes("sample", batch=1, latent_height=1, latent_width=1))
        assert engine(**feeds)["sample"].shape == (1, 3, 32, 32)  # one latent pixel: no artificial minimum
        with pytest.raises(InvalidInputError, match="latent_height.*allowed range is \\[1, 128\\]"):
            engine(latent=np.zeros((1, 32, 129, 2), np.float32))
    with pytest.raises(EngineDirError, match="released"):
        engine(**feeds)
    engine.release()  # a second release does nothing


def test_pipeline_constants_live_next_to_model_dims(engine_dir):
    from sprintrt import specs as S
    from sprintrt.runtime.pipeline import SprintPipeline

    pipe = SprintPipeline.from_engines(engine_dir, components=("transformer",))
    assert isinstance(pipe.constants, S.PipelineConstants) and isinstance(pipe.model_dims, S.ModelDims)
    assert pipe.constants.sigma_data == 0.5 and pipe.model_dims.vae_scale_factor == 32
