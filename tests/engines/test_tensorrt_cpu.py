"""The TensorRT layer, checked on a CPU: what can be checked without TensorRT or a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sprintrt import machine
from sprintrt import manifest as M
from sprintrt.engines import trt_build
from sprintrt.engines.build import build_engines, cache_key
from sprintrt.engines.precision import Precision
from sprintrt.errors import EngineDirError, MissingDependencyError

pytestmark = pytest.mark.skipif(machine.gpus() != [], reason="these check the behaviour on a machine without a GPU")


def test_tensorrt_build_on_cpu_is_a_typed_error_and_writes_nothing(onnx_dir, tmp_path):
    out = tmp_path / "trt"
    with pytest.raises(MissingDependencyError, match="(no NVIDIA GPU|TensorRT is not installed).*--backend onnxruntime"):
        build_engines(onnx_dir, out, backend="tensorrt")
    assert not out.exists()


def test_tensorrt_build_cli_has_no_traceback(onnx_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "build", str(onnx_dir), "-o", str(tmp_path / "trt"),
                        "--backend", "tensorrt"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sprintrt build: error:" in r.stderr and "sprintrt doctor" in r.stderr
    assert not (tmp_path / "trt").exists()


def test_loader_composition_is_built_without_tensorrt(onnx_dir, tmp_path):
    """Constructing the chain imports no TensorRT module: the loaders import it when they run."""
    code = f"""
import sys
from pathlib import Path
from sprintrt.engines.trt_build import build_loaders
from sprintrt.engines.precision import Precision
build_loaders(Path({str(onnx_dir / 'transformer.fp16.onnx')!r}), Path('/tmp/x.plan'), Precision.FP16,
    {{'hidden_states': {{'min': (1, 32, 8, 8), 'opt': (1, 32, 32, 32), 'max': (4, 32, 64, 64)}}}},
    Path({str(tmp_path / 't.cache')!r}))
assert not {{'tensorrt', 'tensorrt_rtx'}} & set(sys.modules), sorted(m for m in sys.modules if 'tensorrt' in m)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "ok", r.stdout + r.stderr


@pytest.fixture(scope="module")
def qdq_graphs(typed_onnx_dir, tmp_path_factory):
    """The Q/DQ graphs TensorRT gets for an H100, calibrated on two sample inputs: int8 (W8A8) and fp8 for the
    transformer family, int8 for the VAE encoder (its blocks chosen by measured sensitivity). Each calibrated
    fp32 graph ({component}.{precision}.qdq.onnx) is also carried onto the bf16 variant as the tensorrt backend
    builds it on Ampere and later ({component}.{precision}.qdq-bf16.onnx, engines/typed_qdq.py), and the
    transformer's int8 onto the fp16 variant as before Ampere (transformer.int8.qdq-fp16.onnx)."""
    from sprintrt.engines.quantize import quantize_qdq
    from sprintrt.engines.typed_qdq import qdq_on_variant
    from sprintrt.export_info import read_export_info
    from sprintrt.specs import SPEC_BUILDERS, ModelDims

    out = tmp_path_factory.mktemp("qdq")
    for component, precisions in QDQ_GRAPHS.items():
        spec = SPEC_BUILDERS[component](ModelDims.from_json(read_export_info(typed_onnx_dir)["model_dims"]))
        feeds = [spec.sample_inputs(spec.sizes("sample"), seed=s) for s in (0, 1)]
        for precision in precisions:  # "int8-uniform": every allowed layer, no measurement (the tuner's probe)
            qdq = out / f"{component}.{precision}.qdq.onnx"
            fp32 = typed_onnx_dir / f"{component}.onnx"
            quantize_qdq(fp32, qdq, feeds, precision.split("-")[0], target=H100, component=component,
                         uniform="uniform" in precision)
            for base in ("bf16", "fp16") if (component, precision) == ("transformer", "int8") else ("bf16",):
                qdq_on_variant(qdq, fp32, typed_onnx_dir / f"{component}.{base}.onnx",
                               out / f"{component}.{precision}.qdq-{base}.onnx", base)
    return out


QDQ_GRAPHS = {"transformer": ("int8", "fp8"), "controlnet": ("int8", "fp8"), "controlled_transformer": ("int8", "fp8"),
              "vae_encoder": ("int8", "int8-uniform"), "vae_decoder": ("int8-uniform",)}


@pytest.mark.rtx
@pytest.mark.parametrize("component", ["controlnet", "controlled_transformer", "vae_encoder", "vae_decoder"])
def test_the_newer_qdq_graphs_parse_in_tensorrt(component, qdq_graphs):
    """The ControlNet's int8 and fp8 and the VAE encoder's int8 Q/DQ graphs for a GPU, and the VAEs' uniform int8
    ones, are taken by a real TensorRT parser (TensorRT-RTX's; the transformer's build real engines below), both
    as calibrated on the fp32 graph and as carried onto the bf16 variant TensorRT builds them from."""
    from sprintrt.trt_parser import parse_problems

    for precision in QDQ_GRAPHS[component]:
        for graph in (f"{component}.{precision}.qdq.onnx", f"{component}.{precision}.qdq-bf16.onnx"):
            assert parse_problems(qdq_graphs / graph) == [], graph


@pytest.mark.rtx
@pytest.mark.parametrize("source", ["fp32", "tf32", "bf16", "fp16", "int8", "int8-on-bf16", "int8-on-fp16",
                                    "fp8-on-bf16"])
def test_the_tensorrt_chain_builds_real_engines(source, typed_onnx_dir, qdq_graphs, tmp_path):
    """The tensorrt backend's own Polygraphy chain (engines/trt_build.py), run by a real TensorRT builder:
    TensorRT-RTX's, which has TensorRT's API and builds without a GPU (POLYGRAPHY_USE_TENSORRT_RTX=1). Every
    network is strongly typed; the builder config carries the profile, the optimisation level and the workspace
    limit, and tf32 (a math mode) is the only flag; the chain writes serialized engine bytes. int8 and fp8 are
    built from the graphs the backend builds them from: the Q/DQ pairs on the bf16 variant (fp16 before Ampere;
    the fp32 graph where the base stays fp32, as Gemma2's before Ampere)."""
    precision = source.split("-")[0]
    graphs = {"fp32": typed_onnx_dir / "transformer.onnx", "tf32": typed_onnx_dir / "transformer.onnx",
              "bf16": typed_onnx_dir / "transformer.bf16.onnx", "fp16": typed_onnx_dir / "transformer.fp16.onnx",
              "int8": qdq_graphs / "transformer.int8.qdq.onnx",
              "int8-on-bf16": qdq_graphs / "transformer.int8.qdq-bf16.onnx",
              "int8-on-fp16": qdq_graphs / "transformer.int8.qdq-fp16.onnx",
              "fp8-on-bf16": qdq_graphs / "transformer.fp8.qdq-bf16.onnx"}
    code = f"""
from pathlib import Path
import tensorrt_rtx as trt
from sprintrt.engines import trt_build
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import ProfileOptions, input_shapes, tensorrt_profile
from sprintrt.export_info import read_export_info
from sprintrt.specs import SPEC_BUILDERS, ModelDims

model = ModelDims.from_json(read_export_info({str(typed_onnx_dir)!r})["model_dims"])
spec = SPEC_BUILDERS["transformer"](model)
shapes = input_shapes(spec, tensorrt_profile(spec, model, ProfileOptions()))
source, precision, out = Path({str(graphs[source])!r}), Precision({precision!r}), Path({str(tmp_path / "x.plan")!r})
builder, network, parser = trt_build.network_loader(source)()
assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
config = trt_build.config_loader(precision, shapes, None)(builder, network)
assert config.get_flag(trt.BuilderFlag.TF32) == ({precision!r} == "tf32")
assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == trt_build.WORKSPACE_BYTES
assert config.builder_optimization_level == trt_build.BUILDER_OPTIMIZATION_LEVEL
assert config.num_optimization_profiles == 1
trt_build.build_loaders(source, out, precision, shapes, None)()
assert out.stat().st_size > 10000, out.stat().st_size
print("ok", out.stat().st_size)
"""
    env = dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100 = {"kind": "gpu", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
T4 = {"kind": "gpu", "name": "Tesla T4", "compute_capability": "7.5"}


def test_what_each_gpu_can_build():
    from sprintrt.errors import InvalidInputError

    for p in (Precision.BF16, Precision.FP16, Precision.TF32, Precision.FP32, Precision.INT8, Precision.FP8):
        trt_build.check_precision(p, H100)
    with pytest.raises(InvalidInputError, match="compute capability >= 8.9.*A100"):
        trt_build.check_precision(Precision.FP8, A100)
    trt_build.check_precision(Precision.BF16, A100)
    with pytest.raises(InvalidInputError, match="bf16.*compute capability >= 8.0.*T4.*fp16"):
        trt_build.check_precision(Precision.BF16, T4)
    trt_build.check_precision(Precision.FP16, T4)
    assert set(trt_build.default_precisions({"tensorrt": "11.1.0"}, H100).values()) == {Precision.BF16}
    t4 = trt_build.default_precisions({"tensorrt": "11.1.0"}, T4)
    assert t4["text_encoder"] == Precision.FP32 and t4["transformer"] == t4["vae_decoder"] == Precision.FP16


def test_fp8_is_refused_off_tensorrt():
    from sprintrt.engines.precision import resolve_precisions
    from sprintrt.errors import InvalidInputError

    assert resolve_precisions("transformer=fp8", "tensorrt")["transformer"] == Precision.FP8
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(InvalidInputError, match="fp8 runs on TensorRT only"):
            resolve_precisions("transformer=fp8", backend)


def test_gpu_cache_key_names_gpu_capability_version_precision_profile_and_onnx():
    gpu = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    dims = {"batch": {"min": 1, "opt": 1, "max": 4}}
    key = cache_key(gpu, "tensorrt", "10.13.0", "bf16", dims, "ab" * 32)
    assert key.startswith("NVIDIA-H100-80GB-HBM3-sm9.0__tensorrt10.13.0__bf16__batch1-1-4__abababab")
    others = [cache_key({**gpu, "name": "NVIDIA A100"}, "tensorrt", "10.13.0", "bf16", dims, "ab" * 32),
              cache_key({**gpu, "compute_capability": "8.0"}, "tensorrt", "10.13.0", "bf16", dims, "ab" * 32),
              cache_key(gpu, "tensorrt", "10.12.0", "bf16", dims, "ab" * 32),
              cache_key(gpu, "tensorrt", "10.13.0", "fp16", dims, "ab" * 32),
              cache_key(gpu, "tensorrt", "10.13.0", "bf16", {"batch": {"min": 1, "opt": 1, "max": 8}}, "ab" * 32),
              cache_key(gpu, "tensorrt", "10.13.0", "bf16", dims, "cd" * 32)]
    assert len({key, *others}) == 7
    # canonical: dim order does not matter
    two = {"b": {"min": 1, "opt": 1, "max": 2}, "a": {"min": 1, "opt": 2, "max": 3}}
    assert cache_key(gpu, "tensorrt", "1", "bf16", two, "0" * 64) == \
        cache_key(gpu, "tensorrt", "1", "bf16", dict(reversed(two.items())), "0" * 64)


def _fake_tensorrt_manifest(engine_dir):
    """The ORT engine dir relabelled as TensorRT engines built on an H100 (for the load checks)."""
    path = engine_dir / "manifest.json"
    m = json.loads(path.read_text())
    for c in m["components"].values():
        c.update(backend="tensorrt", target={"kind": "gpu", "name": "NVIDIA H100", "compute_capability": "9.0"},
                 libraries={"tensorrt": "10.13.0"})
    path.write_text(json.dumps(m))
    return M.read_manifest(engine_dir)


@pytest.mark.parametrize("here,match", [
    (({"name": "NVIDIA A100", "compute_capability": "8.0"}, "10.13.0"), "built for"),
    (({"name": "NVIDIA H100", "compute_capability": "9.0"}, "10.12.0"), "tensorrt 10.13.0"),
])
def test_stale_tensorrt_engines_are_refused(copy_engine_dir, monkeypatch, here, match):
    """The run side's own check (runtime/engine.py Engine.machine_problem) against a machine that differs in its
    GPU or its TensorRT version from the one the engines were built on."""
    from sprintrt.runtime.registry import check_engines

    gpu, version = here
    manifest = _fake_tensorrt_manifest(copy_engine_dir)
    real_version = machine.library_version
    monkeypatch.setattr(machine, "gpus", lambda: [{"kind": "gpu", **gpu, "driver": "580"}])
    monkeypatch.setattr(machine, "library_version", lambda lib: version if lib == "tensorrt" else real_version(lib))
    with pytest.raises(EngineDirError, match=match + ".*--rebuild"):
        check_engines(manifest, ["transformer"])
    monkeypatch.setattr(machine, "gpus", lambda: [{"kind": "gpu", "name": "NVIDIA H100", "compute_capability": "9.0",
                                                   "driver": "580"}])
    monkeypatch.setattr(machine, "library_version", lambda lib: "10.13.0" if lib == "tensorrt" else real_version(lib))
    check_engines(manifest, ["transformer"])  # the matching machine loads


def test_loading_tensorrt_engines_on_a_cpu_is_a_typed_error(copy_engine_dir):
    from sprintrt.runtime.pipeline import SprintPipeline

    _fake_tensorrt_manifest(copy_engine_dir)
    with pytest.raises(MissingDependencyError, match="no NVIDIA GPU|TensorRT is not installed"):
        SprintPipeline.from_engines(copy_engine_dir)


def test_doctor_reports_this_machine():
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "CPU" in r.stdout and "GPU          none visible" in r.stdout and "can build    onnxruntime fp32" in r.stdout
    if machine.library_version("openvino"):  # int8w: what NNCF's presence allows
        assert ("int8w (int8 weights, NNCF" if machine.library_version("nncf") else "int8w needs nncf") in r.stdout
