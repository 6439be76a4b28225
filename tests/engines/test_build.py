"""ONNX Runtime engine builds: manifest contents, reuse by cache key, refusal of bad sources."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sprintrt import machine
from sprintrt.engines.build import build_engines, cache_key
from sprintrt.errors import InvalidInputError, ModelLoadError
from sprintrt.specs import COMPONENTS
from sprintrt.files import sha256_file


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_manifest_describes_every_engine(engine_dir, onnx_dir):
    m = _manifest(engine_dir)
    info = json.loads((onnx_dir / "export_info.json").read_text())
    assert set(m["components"]) == set(COMPONENTS)
    for name, c in m["components"].items():
        assert (engine_dir / c["file"]).stat().st_size == c["bytes"]
        assert sha256_file(engine_dir / c["file"]) == c["sha256"]
        assert c["backend"] == "onnxruntime" and c["precision"] == "fp32"
        assert c["execution_provider"] == "CPUExecutionProvider"
        assert c["source_onnx"]["sha256"] == sha256_file(onnx_dir / f"{name}.onnx")
        assert c["model_identity"] == info["model"]["identity"] == m["model"]["identity"]
        assert c["libraries"]["onnxruntime"]
        assert c["target"] == machine.cpu_target()
        assert [t["name"] for t in c["io"]["inputs"]] == [t["name"] for t in info["components"][name]["spec"]["inputs"]]
        assert c["key"].endswith(c["source_onnx"]["sha256"][:16])
    assert (engine_dir / "tokenizer" / "tokenizer.json").is_file()


def test_rebuild_reuses_up_to_date_engines(onnx_dir, tmp_path):
    out = tmp_path / "e"
    build_engines(onnx_dir, out, components=("transformer",))
    first = _manifest(out)["components"]["transformer"]
    mtime = os.stat(out / first["file"]).st_mtime_ns
    events = []
    build_engines(onnx_dir, out, components=("transformer",), progress=lambda c, what: events.append(what))
    assert events == ["reused"]
    assert os.stat(out / first["file"]).st_mtime_ns == mtime
    build_engines(onnx_dir, out, components=("transformer",), rebuild=True, progress=lambda c, what: events.append(what))
    assert events[-1] == "building"


def test_damaged_engine_is_rebuilt_not_reused(onnx_dir, tmp_path):
    out = tmp_path / "e"
    build_engines(onnx_dir, out, components=("vae_decoder",))
    entry = _manifest(out)["components"]["vae_decoder"]
    (out / entry["file"]).write_bytes(b"junk")
    events = []
    build_engines(onnx_dir, out, components=("vae_decoder",), progress=lambda c, what: events.append(what))
    assert events == ["building"]
    rebuilt = _manifest(out)["components"]["vae_decoder"]
    assert (out / rebuilt["file"]).read_bytes() != b"junk"
    assert sha256_file(out / rebuilt["file"]) == rebuilt["sha256"]


def test_truncated_onnx_is_refused_and_nothing_written(onnx_dir, tmp_path):
    src = tmp_path / "onnx"
    shutil.copytree(onnx_dir, src)
    data = (src / "transformer.onnx").read_bytes()
    (src / "transformer.onnx").write_bytes(data[: len(data) // 2])
    out = tmp_path / "e"
    with pytest.raises(ModelLoadError, match="transformer.onnx.*truncated"):
        build_engines(src, out)
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not list(out.glob("*.onnx"))


def test_not_an_onnx_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="not an sprintrt ONNX directory"):
        build_engines(tmp_path, tmp_path / "e")


@pytest.mark.parametrize("kw,match", [
    (dict(backend="tvm"), "backend='tvm'"),
    (dict(precision="int4"), "precision='int4'"),
    (dict(precision="fp8"), "precision='fp8' is not available for text_encoder on backend 'onnxruntime'"),
    (dict(backend="tensorrt", precision="text_encoder=fp16"), "Gemma2 overflows fp16"),
])
def test_bad_build_options(onnx_dir, tmp_path, kw, match):
    with pytest.raises(InvalidInputError, match=match):
        build_engines(onnx_dir, tmp_path / "e", **kw)
    assert not (tmp_path / "e").exists()


def test_cache_key_changes_with_every_field():
    target = machine.cpu_target()
    dims = {"batch": {"min": 1, "opt": 1, "max": 8}}
    base = cache_key(target, "onnxruntime", "1.0", "fp32", dims, "a" * 64)
    variants = [
        cache_key({**target, "isa": ["avx2"]}, "onnxruntime", "1.0", "fp32", dims, "a" * 64),
        cache_key(target, "onnxruntime", "1.1", "fp32", dims, "a" * 64),
        cache_key(target, "onnxruntime", "1.0", "int8", dims, "a" * 64),
        cache_key(target, "onnxruntime", "1.0", "fp32", {"batch": {"min": 1, "opt": 2, "max": 8}}, "a" * 64),
        cache_key(target, "onnxruntime", "1.0", "fp32", dims, "b" * 64),
    ]
    assert len({base, *variants}) == 6


def test_auto_backend_picks_what_wins_here(onnx_dir, tmp_path):
    from sprintrt.engines.registry import auto_backend

    expected = "openvino" if machine.cpu_has_bf16() else "onnxruntime"
    assert auto_backend() == expected  # this CPU box has no GPU; OpenVINO is installed by the Makefile
    out = build_engines(onnx_dir, tmp_path / "auto", backend="auto", components=("transformer",))
    assert _manifest(out)["components"]["transformer"]["backend"] == expected


FULL_DISK = "Failed to write external initializers to file"  # ONNX Runtime's words on a full disk


@pytest.mark.parametrize("free_bytes,said,error,match", [
    (1024, FULL_DISK, "OutOfSpaceError", r"ran out of disk space in .*: 0\.0 GB free now.*Fix: free space"),
    (10**15, FULL_DISK, "EngineBuildError", r"onnxruntime failed to build the onnxruntime fp32 engine of vae_decoder"),
    (1024, "Unsupported operator Foo", "EngineBuildError", r"onnxruntime failed to build .*: Unsupported operator"),
])
def test_a_library_failure_is_a_typed_error_and_leaves_nothing(onnx_dir, tmp_path, monkeypatch, capsys, free_bytes,
                                                               said, error, match):
    """ONNX Runtime's own exception (its Fail is no RuntimeError) from a build: a failed write with less room left
    than the source is an OutOfSpaceError (the tuner stops on it), anything else an EngineBuildError naming the
    library (the tuner records the candidate and goes on); no engine file, no manifest; the CLI says it in a line."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from sprintrt import cli, errors
    from sprintrt.engines import ort_build

    def fails(source, out, *a, **k):
        out.write_bytes(b"half")  # a library's half-written file: ORT's builder removes its own on the way out
        out.unlink()
        raise Fail(said)

    monkeypatch.setattr(ort_build, "build_component", fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**15, 10**15 - free_bytes,
                                                                                   free_bytes))
    out = tmp_path / "e"
    with pytest.raises(getattr(errors, error), match=match) as caught:
        build_engines(onnx_dir, out, components=("vae_decoder",))
    assert (error == "OutOfSpaceError") == isinstance(caught.value, errors.OutOfSpaceError)
    assert not (out / "manifest.json").exists() and not list(out.glob("vae_decoder-*"))
    assert cli.main(["build", str(onnx_dir), "-o", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # its progress lines, then the error in one line
    assert err[-1].startswith("sprintrt build: error:") and not any("Traceback" in line for line in err), err
