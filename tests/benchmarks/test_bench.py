"""sprintrt bench: the JSON schema, report and plot from a stored JSON, stage sums, refusal of nonsense.

No timing assertions: speed goals live in the benchmark's own output, not in tests.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sprintrt.benchmarks import config as C
from sprintrt.benchmarks import prepare as P
from sprintrt.benchmarks import report as R
from sprintrt.benchmarks.bench import run_bench
from sprintrt.benchmarks.measure import ENGINE_STAGES
from sprintrt.engines.precision import EngineChoice, Precision
from sprintrt.errors import InvalidInputError
from sprintrt.metrics import PARITY_MAX_ABS


def seeded_workdir(work, tiny_checkpoint, export):
    """A benchmark work directory holding the session's export of the same checkpoint where the benchmark looks
    for it (by the model's identity), so the benchmark reuses it instead of exporting for minutes again."""
    import shutil

    from sprintrt.files import model_identity

    shutil.copytree(export, work / f"onnx-{model_identity(tiny_checkpoint)[:12]}")
    return work


@pytest.fixture(scope="module")
def tiny_results(tiny_checkpoint, onnx_dir, tmp_path_factory):
    """A real (tiny, fast) benchmark run: two sizes, 1 and 2 steps, fp32 and bf16 baselines."""
    work = seeded_workdir(tmp_path_factory.mktemp("bench"), tiny_checkpoint, onnx_dir)
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 128), (160, 224)], steps=[1, 2],
                           warmup=0, runs=2, workdir=work, baselines=["torch-fp32", "torch-bf16"], prompt_cache=True)
    doc = run_bench(config, say=lambda *a: None)
    return doc, work


def test_results_follow_the_schema(tiny_results):
    doc, _ = tiny_results
    R.validate(doc)
    assert len(doc["results"]) == 4
    names = [s["name"] for s in doc["results"][0]["systems"]]
    assert names == ["torch-fp32", "torch-bf16", "sprintrt onnxruntime fp32"]
    json.dumps(doc)  # serialisable


def test_cached_prompt_numbers_are_reported_apart(tiny_results):
    doc, _ = tiny_results
    for r in doc["results"]:
        by = {s["name"]: s for s in r["systems"]}
        assert "cached_prompt" not in by["torch-fp32"]  # diffusers has no such cache
        cached = by["sprintrt onnxruntime fp32"]["cached_prompt"]
        assert set(cached["end_to_end"]) == set(cached["text_encoder"]) == {"min", "median", "p90"}
    md = R.report(doc)
    assert md.count("Repeated prompt, with the prompt-embedding cache") == 4


def test_stage_times_sum_to_at_most_end_to_end(tiny_results):
    doc, _ = tiny_results
    for r in doc["results"]:
        for s in r["systems"]:
            stages = sum(v["median"] for k, v in s["stages"].items() if k in ENGINE_STAGES)
            assert stages <= s["end_to_end"]["median"] * 1.001
            assert s["end_to_end"]["min"] <= s["end_to_end"]["median"] <= s["end_to_end"]["p90"]
            assert len(s["transformer_steps"]) == r["steps"]


def test_agreement_with_the_reference(tiny_results):
    doc, _ = tiny_results
    for r in doc["results"]:
        by = {s["name"]: s for s in r["systems"]}
        assert by["torch-fp32"]["image_vs_reference"]["max_abs"] == 0
        assert by["sprintrt onnxruntime fp32"]["image_vs_reference"]["max_abs"] <= PARITY_MAX_ABS
        assert 0 < by["torch-bf16"]["image_vs_reference"]["max_abs"] < 0.5  # bf16 drifts, but stays an image
        assert by["sprintrt onnxruntime fp32"]["engine_keys"]["transformer"]


def test_report_and_plot_from_stored_json(tiny_results, tmp_path):
    doc, _ = tiny_results
    stored = tmp_path / "results.json"
    stored.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "sprintrt.cli", "bench", "--report", str(stored)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "results.md").read_text()
    assert md.count("| sprintrt onnxruntime fp32 |") == 8 and "## 160x224, batch 1, 2 steps" in md  # + cached rows
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_schema_violations_are_named(tiny_results):
    doc, _ = tiny_results
    broken = copy.deepcopy(doc)
    broken["results"][0]["systems"][0]["engine_sum"]["median"] = 1e9
    with pytest.raises(ValueError, match="stages exceed end to end"):
        R.validate(broken)
    broken = copy.deepcopy(doc)
    del broken["results"][0]["systems"][2]["peak_rss_gb"]
    with pytest.raises(ValueError, match="lacks 'peak_rss_gb'"):
        R.validate(broken)


@pytest.mark.parametrize("kw,match", [
    (dict(runs=0), "runs=0"),
    (dict(warmup=-1), "warmup=-1"),
    (dict(baselines=["torch-fp64"]), "baseline 'torch-fp64'"),
    (dict(baselines=["torch-bf16"]), "lack 'torch-fp32'"),
    (dict(resolutions=[(500, 512)]), "resolution 500x512"),
    (dict(batches=[0]), "batch 0"),
    (dict(torch_device="tpu"), "torch_device='tpu'"),
    (dict(baselines=["torch-fp32", "optimum-intel"]), "needs --optimum-python"),
    (dict(baselines=["torch-fp32", "optimum-intel"], optimum_python=__file__, strength=0.5), "text to image"),
])
def test_nonsense_options_are_refused(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        C.BenchConfig(**kw).check()


def test_unknown_backend_and_bad_resolution_text():
    with pytest.raises(InvalidInputError, match="backend 'cuda'"):
        C.parse_candidate("cuda:fp16")
    with pytest.raises(InvalidInputError, match="HEIGHTxWIDTH"):
        C.parse_resolution("big")


def test_resolution_outside_the_engine_profile_is_refused_before_timing(tiny_results, tiny_checkpoint):
    _, work = tiny_results  # the same workdir: the export and engines are reused, only the check runs
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(8192, 512)], workdir=work)
    with pytest.raises(InvalidInputError, match="8192x512 is outside.*profile"):
        P.prepare(config, say=lambda *a: None)


def test_an_onnx_cache_from_other_export_code_is_exported_again(tiny_results, tiny_checkpoint, tmp_path, monkeypatch):
    """The workdir's ONNX is keyed by the model; export code that changed (a new graph pass, say) must
    not be benchmarked through graphs the old code wrote."""
    import shutil

    from sprintrt.export.onnx_export import exporter_fingerprint

    _, work = tiny_results
    onnx_dir = next(work.glob("onnx-*"))
    mine = tmp_path / "work"
    mine.mkdir()
    shutil.copytree(onnx_dir, mine / onnx_dir.name)
    info_path = mine / onnx_dir.name / "export_info.json"
    info = json.loads(info_path.read_text())
    assert info["exporter"] == exporter_fingerprint()
    said = []
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, workdir=mine, candidates=[EngineChoice("onnxruntime", Precision.FP32)])
    P.prepare(config, say=said.append)
    assert not any("other export code" in m for m in said)  # up to date: reused
    info_path.write_text(json.dumps(dict(info, exporter="0" * 64)))
    import sprintrt.export.onnx_export as E

    exported = []

    def export_again(ckpt, out, **kw):  # what an export writes is tested in tests/export; here, that it is asked for
        exported.append(Path(out))
        shutil.rmtree(out)
        return shutil.copytree(onnx_dir, out)

    monkeypatch.setattr(E, "export_model", export_again)
    P.prepare(config, say=said.append)
    assert any("other export code" in m for m in said) and exported == [mine / onnx_dir.name]
    assert json.loads(info_path.read_text())["exporter"] == exporter_fingerprint()


def test_image_to_image_benchmark(tiny_checkpoint, tiny_results):
    """--strength benchmarks diffusers' SanaSprintImg2ImgPipeline against SprintImg2ImgPipeline from the same
    picture: the VAE encoder is timed, fewer steps run, the images agree."""
    _, work = tiny_results  # the export and engines are reused
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 160)], steps=[2], warmup=0,
                           runs=1, workdir=work, baselines=["torch-fp32"], strength=0.3)
    doc = run_bench(config, say=lambda *a: None)
    (r,) = doc["results"]
    assert r["steps_run"] == 1 and doc["settings"]["strength"] == 0.3
    by = {s["name"]: s for s in r["systems"]}
    ours = by["sprintrt onnxruntime fp32"]
    assert "vae_encoder" in ours["stages"] and len(ours["transformer_steps"]) == 1
    assert ours["image_vs_reference"]["max_abs"] <= PARITY_MAX_ABS
    assert "image to image, strength 0.3" in R.report(doc)
    with pytest.raises(InvalidInputError, match="strength=1.5"):
        C.BenchConfig(strength=1.5).check()



def test_controlnet_benchmark(tiny_checkpoint, tiny_results):
    """--controlnet times SprintControlNetPipeline against the diffusers-module reference on the same scribble:
    the ControlNet and the control image's encoding are timed per stage, the images agree."""
    _, work = tiny_results  # the export (with the ControlNet) and engines are reused
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 96)], steps=[2], warmup=0,
                           runs=1, workdir=work, baselines=["torch-fp32"], controlnet=True)
    doc = run_bench(config, say=lambda *a: None)
    (r,) = doc["results"]
    assert doc["settings"]["controlnet"] is True
    by = {s["name"]: s for s in r["systems"]}
    ours, ref = by["sprintrt onnxruntime fp32"], by["torch-fp32"]
    for system in (ours, ref):
        assert {"controlnet", "vae_encoder", "transformer"} <= set(system["stages"])
    assert ours["image_vs_reference"]["max_abs"] <= PARITY_MAX_ABS
    assert "ControlNet s" in R.report(doc)
    with pytest.raises(InvalidInputError, match="no ControlNet image to image"):
        C.BenchConfig(controlnet=True, strength=0.5).check()


def test_auto_candidate_benchmarks_the_tuned_engines(tiny_checkpoint, typed_onnx_dir, tmp_path):
    """`--candidates auto`: the engines `build --backend auto` tunes on this CPU, with the choice reported."""
    pytest.importorskip("openvino")
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 128)], warmup=0, runs=1,
                           workdir=seeded_workdir(tmp_path, tiny_checkpoint, typed_onnx_dir), baselines=["torch-fp32"], candidates=[C.parse_candidate("auto")],
                           calibration_count=2)
    doc = run_bench(config, say=lambda *a: None)
    (auto,) = [s for s in doc["results"][0]["systems"] if s["kind"] == "candidate"]
    assert auto["name"] == "sprintrt auto tuned"
    assert set(auto["tuned"]) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder", "controlnet",
                                  "controlled_transformer"}
    assert all(choice.split(":")[0] in ("onnxruntime", "openvino") for choice in auto["tuned"].values())
    assert auto["image_vs_reference"]["psnr_db"] >= 35.0  # every choice passed the quality gate


_FAKE_OPTIMUM = '''
import argparse, json, sys
import numpy as np
p = argparse.ArgumentParser()
for a in ("--model", "--ov-dir", "--call", "--seed", "--warmup", "--runs", "--image", "--threads"):
    p.add_argument(a)
args = p.parse_args(sys.argv[2:])  # argv[1] is benchmarks/optimum_intel.py
call = json.loads(args.call)
if "{mode}" == "killed":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
np.save(args.image, np.zeros((len(call["prompt"]), call["height"], call["width"], 3), np.float32))
runs = [dict(total=0.5, text_encoder=0.1, transformer=[0.1] * call["num_inference_steps"], vae_decoder=0.1)
        for _ in range(int(args.runs))]
print(json.dumps(dict(runs=runs, load_seconds=1.0, export_seconds=0.0, peak_rss_gb=1.5, image=args.image,
                      versions={{"optimum-intel": "fake"}})))
'''


@pytest.mark.parametrize("mode", ["ok", "killed"])
def test_optimum_baseline_contract(tiny_results, tiny_checkpoint, tmp_path, mode):
    """The optimum-intel baseline runs in another environment: its JSON line becomes a baseline entry
    (stages, peak RSS, its image compared with diffusers fp32); a killed worker is reported as not measured,
    with the reason, and every other system's numbers are kept."""
    _, work = tiny_results  # reuse the export and engines
    worker = tmp_path / "worker.py"
    worker.write_text(_FAKE_OPTIMUM.format(mode=mode))
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {worker} \"$@\"\n")
    python.chmod(0o755)
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 128)], steps=[2], warmup=0,
                           runs=2, workdir=work, baselines=["torch-fp32", "optimum-intel"], optimum_python=str(python))
    doc = run_bench(config, say=lambda *a: None)
    if mode == "killed":
        assert [s["name"] for s in doc["results"][0]["systems"]] == ["torch-fp32", "sprintrt onnxruntime fp32"]
        (failed,) = doc["failed"]
        assert failed["name"] == "optimum-intel" and re.search("killed by signal 9.*out of memory", failed["error"])
        assert "Not measured: optimum-intel" in R.report(doc)
        return
    (entry,) = [s for s in doc["results"][0]["systems"] if s["name"] == "optimum-intel"]
    assert entry["kind"] == "baseline" and entry["peak_rss_gb"] == 1.5 and entry["end_to_end"]["median"] == 0.5
    assert len(entry["transformer_steps"]) == 2 and entry["stages"]["vae_decoder"]["median"] == 0.1
    assert entry["image_vs_reference"]["psnr_db"] < 20  # the fake's black image really was compared
    assert "optimum-intel" in R.report(doc)


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_the_export_has_the_variants_the_candidates_build_from(monkeypatch, bf16_cpu):
    from sprintrt import machine

    monkeypatch.setattr(machine, "cpu_has_bf16", lambda target=None: bf16_cpu)
    monkeypatch.setattr(machine, "cpu_has_fp16", lambda target=None: False)
    parse = lambda names: [C.parse_candidate(n) for n in names]  # noqa: E731
    assert P.variant_dtypes_for(parse(["ort:fp32", "ort:int8"])) == []
    assert P.variant_dtypes_for(parse(["ov:bf16", "ort:fp16"])) == ["bf16", "fp16"]  # OpenVINO bf16 reads the variant
    assert P.variant_dtypes_for(parse(["ort:fp32", "auto"])) == (["bf16"] if bf16_cpu else [])  # the tuner's candidates


def test_torch_stage_hooks_synchronise_around_every_stage(reference_pipe):
    """On a GPU the hooks must wait for the queued kernels before reading the clock, or a stage is timed
    as its launch. The sync is called before and after every hooked call (checked here with a counter;
    on CUDA it is torch.cuda.synchronize)."""
    import torch

    from sprintrt.benchmarks.torch_timing import device_sync, stage_hooks

    assert device_sync(reference_pipe) is None  # nothing to wait for on a CPU
    calls, timings = [], {}
    with stage_hooks(reference_pipe, timings, sync=lambda: calls.append(1)), torch.inference_mode():
        reference_pipe(prompt="a cat", num_inference_steps=2, intermediate_timesteps=1.3, height=64, width=64,
                       use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0))
    hooked = 1 + len(timings["transformer"]) + 1  # text encoder, each step, VAE decoder
    assert len(timings["transformer"]) == 2 and len(calls) == 2 * hooked


def test_baselines_only_bench_exports_nothing(tiny_checkpoint, tmp_path):
    """`--candidates none`: the diffusers rows alone (e.g. the GPU baseline on a machine without TensorRT)."""
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(64, 64)], warmup=0, runs=1,
                           workdir=tmp_path, baselines=["torch-fp32"], candidates=[])
    doc = run_bench(config, say=lambda *a: None)
    (entry,) = doc["results"][0]["systems"]
    assert entry["name"] == "torch-fp32" and entry["device"] == "cpu" and doc["onnx_bytes"] == {}
    assert doc["settings"]["text_length"] > 0 and not list(tmp_path.glob("onnx-*"))


def test_cuda_baselines_need_a_cuda_torch():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    with pytest.raises(InvalidInputError, match="torch_device='cuda'.*Fix"):
        C.BenchConfig(torch_device="cuda").check()
    with pytest.raises(InvalidInputError, match="torch_device='tpu'"):
        C.BenchConfig(torch_device="tpu").check()


@pytest.mark.cuda
def test_gpu_baseline_row(tiny_checkpoint, tmp_path):
    """The PyTorch GPU row: diffusers fp32 and bf16 on CUDA, per stage, with the GPU memory they held."""
    config = C.BenchConfig(model=str(tiny_checkpoint), arch=None, resolutions=[(128, 128)], warmup=1, runs=2,
                           workdir=tmp_path, baselines=["torch-fp32", "torch-bf16"], candidates=[], torch_device="cuda")
    doc = run_bench(config, say=lambda *a: None)
    fp32, bf16 = doc["results"][0]["systems"]
    assert fp32["device"] == bf16["device"] == "cuda" and fp32["gpu_memory_peak_gb"] > 0
    assert set(bf16["stages"]) >= {"text_encoder", "transformer", "vae_decoder"}
    assert bf16["image_vs_reference"]["psnr_db"] > 25
    assert "torch-bf16 (cuda)" in R.report(doc)
