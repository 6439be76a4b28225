"""The OpenVINO CPU backend: parity with diffusers (fp32), stated drift (bf16), and the engine rules."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sprintrt.metrics import PARITY_MAX_ABS, psnr
from sprintrt.errors import EngineDirError
from sprintrt.runtime.pipeline import SprintPipeline

pytest.importorskip("openvino")

# bf16 kernels round activations to 8 mantissa bits; measured 50-51 dB on the tiny checkpoint against
# diffusers fp32 (PyTorch's own bf16 pipeline lands in the same range), so 35 dB leaves margin and
# still catches a wrong graph (which gives < 15 dB).
BF16_PSNR_DB = 35.0

CASES = [dict(prompt="a cat on a windowsill", num_inference_steps=2, height=256, width=192, use_resolution_binning=False),
         dict(prompt=["a red fox", "a koi pond"], num_inference_steps=1, intermediate_timesteps=None, height=300,
              width=200)]


@pytest.fixture(scope="module")
def ov_engines(onnx_dir, tmp_path_factory):
    from sprintrt.engines.build import build_engines

    root = tmp_path_factory.mktemp("ov")
    return {p: build_engines(onnx_dir, root / p, backend="openvino", precision=p) for p in ("fp32", "bf16")}


def _images(engine_dir, reference_pipe, kw):
    ref = reference_pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = SprintPipeline.from_engines(engine_dir)(**kw, generator=torch.Generator().manual_seed(1),
                                                   output_type="np").images
    return ref, ours


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp32_matches_diffusers(ov_engines, reference_pipe, case):
    ref, ours = _images(ov_engines["fp32"], reference_pipe, CASES[case])
    assert np.abs(ours - ref).max() <= PARITY_MAX_ABS


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bf16_drift_is_bounded(ov_engines, reference_pipe, case):
    ref, ours = _images(ov_engines["bf16"], reference_pipe, CASES[case])
    assert np.abs(ours - ref).max() > 0  # bf16 really ran
    assert psnr(ours, ref) >= BF16_PSNR_DB


def test_manifest_records_ir_weights_and_rejects_a_truncated_bin(ov_engines, tmp_path):
    import shutil

    copy = tmp_path / "ov"
    shutil.copytree(ov_engines["bf16"], copy)
    m = json.loads((copy / "manifest.json").read_text())
    entry = m["components"]["transformer"]
    assert entry["backend"] == "openvino" and entry["inference_precision"] == "bf16"
    (side,) = entry["extra_files"]
    assert side["file"].endswith(".bin")
    path = copy / side["file"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EngineDirError, match="truncated"):
        SprintPipeline.from_engines(copy)


def test_every_engine_loads_from_its_own_blob(ov_engines):
    """The build compiles each IR into the blob cache beside it with the configuration the manifest records, so the
    run side opens every engine from its blob (OpenVINO keys a blob by the IR's path and configuration): one blob
    per engine, none of them recompiled."""
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.registry import load_engine

    for precision, engine_dir in ov_engines.items():
        manifest = read_manifest(engine_dir)
        for comp in manifest.components:
            engine = load_engine(manifest, comp)
            try:
                assert engine.compiled.get_property("LOADED_FROM_CACHE"), (precision, comp)
            finally:
                engine.release()
        assert len(list((engine_dir / "ov_cache").iterdir())) == len(manifest.components), precision


def test_an_engine_built_without_its_blob_is_compiled_in_memory_until_a_load_asks_for_the_cache(onnx_dir, ov_engines,
                                                                                                   tmp_path):
    """build_engines(compiled_cache=False) (the tuner's candidates) writes the IR alone; a load with
    RunOptions(compiled_cache=False) compiles it in memory and writes nothing; a default load compiles it into the
    cache, from which the next load reads it. The outputs are the blob-built engine's."""
    from sprintrt.engines.build import build_engines
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.engine import RunOptions
    from sprintrt.runtime.registry import load_engine
    from sprintrt.specs import SPEC_BUILDERS, ModelDims

    engine_dir = build_engines(onnx_dir, tmp_path / "e", backend="openvino", precision="fp32",
                               components=["transformer"], compiled_cache=False)
    manifest = read_manifest(engine_dir)
    cache = engine_dir / manifest.components["transformer"]["cache_dir"]
    assert not cache.exists()
    spec = SPEC_BUILDERS["transformer"](ModelDims.from_json(manifest.data["model_dims"]))
    feeds = spec.sample_inputs(spec.sizes("opt"), seed=0)
    built = read_manifest(ov_engines["fp32"])
    assert built.components["transformer"]["key"] == manifest.components["transformer"]["key"]  # the same engine
    engine = load_engine(built, "transformer")
    try:
        reference = engine(**feeds)
    finally:
        engine.release()
    for options, from_cache in ((RunOptions(compiled_cache=False), False), (RunOptions(), False), (RunOptions(), True)):
        engine = load_engine(manifest, "transformer", options)
        try:
            assert engine.compiled.get_property("LOADED_FROM_CACHE") == from_cache, options
            outputs = engine(**feeds)
        finally:
            engine.release()
        assert all(np.array_equal(outputs[k], reference[k]) for k in reference)
        assert len(list(cache.glob("*.blob"))) == (0 if options == RunOptions(compiled_cache=False) else 1)


def test_missing_openvino_is_a_typed_error(ov_engines):
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from sprintrt.runtime.pipeline import SprintPipeline\n"
            "from sprintrt.errors import MissingDependencyError\n"
            f"try:\n    SprintPipeline.from_engines({str(ov_engines['fp32'])!r})\n"
            "except MissingDependencyError as e:\n    print('typed:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "typed:" in r.stdout and "pip install openvino" in r.stdout, r.stdout + r.stderr


# int8w (int8 weights, NNCF): per-channel int8 of the text encoder's and transformer's matmul weights. Measured
# 49.4 dB on the tiny checkpoint against diffusers fp32 (this Zen 5 EPYC, bf16 compute); a wrong graph gives
# < 15 dB, and the test also checks that int8 weights are really in the IR.
INT8W_PSNR_DB = 35.0


@pytest.fixture(scope="module")
def int8w_engines(onnx_dir, tmp_path_factory):
    from sprintrt.engines.build import build_engines

    pytest.importorskip("nncf")  # here, not in the test: the fixture builds before the test body runs

    return build_engines(onnx_dir, tmp_path_factory.mktemp("ov-int8w") / "e", backend="openvino",
                         precision="text_encoder=int8w,transformer=int8w,vae_decoder=fp32")


def _int8_weights(ir_path) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(ir_path))
    return sum(1 for op in model.get_ops() if op.get_type_name() == "Constant"
               and op.get_output_element_type(0).get_type_name() in ("u8", "i8"))


def test_int8w_compresses_the_matmul_weights_and_stays_close_to_diffusers(int8w_engines, ov_engines, reference_pipe):
    m = json.loads((int8w_engines / "manifest.json").read_text())
    fp32 = json.loads((ov_engines["fp32"] / "manifest.json").read_text())
    for comp in ("text_encoder", "transformer"):
        entry = m["components"][comp]
        assert entry["precision"] == "int8w" and "nncf" in entry["key"] and "int8_asym" in entry["weight_compression"]
        assert _int8_weights(int8w_engines / entry["file"]) > 0
        assert _int8_weights(ov_engines["fp32"] / fp32["components"][comp]["file"]) == 0
        # int8 weights: the IR's weights file is well under the fp32 one (not all of it is matmul weights)
        ours = entry["extra_files"][0]["bytes"]
        assert ours < 0.6 * fp32["components"][comp]["extra_files"][0]["bytes"]
    ref, ours = _images(int8w_engines, reference_pipe, CASES[1])
    assert np.abs(ours - ref).max() > 0
    assert psnr(ours, ref) >= INT8W_PSNR_DB


def test_int8w_without_nncf_or_off_openvino_is_a_typed_error_before_any_work(onnx_dir, tmp_path, monkeypatch):
    import sys as _sys

    from sprintrt.engines.build import build_engines
    from sprintrt.errors import InvalidInputError, MissingDependencyError

    with pytest.raises(InvalidInputError, match="int8w.*not available for transformer on backend 'onnxruntime'"):
        build_engines(onnx_dir, tmp_path / "ort", backend="onnxruntime", precision="transformer=int8w")
    with pytest.raises(InvalidInputError, match="not available for vae_decoder"):
        build_engines(onnx_dir, tmp_path / "vae", backend="openvino", precision="vae_decoder=int8w")
    monkeypatch.setitem(_sys.modules, "nncf", None)
    with pytest.raises(MissingDependencyError, match="pip install nncf"):
        build_engines(onnx_dir, tmp_path / "ov", backend="openvino", precision="transformer=int8w")
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_cli_builds_int8w_without_calibrating(onnx_dir, tmp_path):
    """`--precision text_encoder=int8w` must not take the calibration path (which "int8" in the text once did):
    an empty calibration prompt file is never read."""
    pytest.importorskip("nncf")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "build", str(onnx_dir), "-o", str(tmp_path / "e"),
                        "--backend", "openvino", "--precision", "text_encoder=int8w",
                        "--calibration-prompts", str(empty)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m["components"]["text_encoder"]["precision"] == "int8w"
