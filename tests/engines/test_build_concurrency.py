"""Builds of one engine directory: concurrent builds wait on a lock; an interrupted build leaves no debris."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from sprintrt.engines import ort_build
from sprintrt.engines.build import build_engines


def _build(onnx_dir, out, queue):
    events = []
    build_engines(onnx_dir, out, components=("transformer", "vae_decoder"),
                  progress=lambda c, what: events.append(what))
    queue.put(events)


def test_two_processes_build_the_same_directory(onnx_dir, tmp_path):
    out = tmp_path / "e"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(onnx_dir, out, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get(timeout=5) for _ in procs)
    # One process built both engines; the other waited for the lock and then reused them.
    assert results == [["building", "building"], ["reused", "reused"]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"transformer", "vae_decoder"}
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(c["file"] for c in manifest["components"].values())


def test_interrupted_build_leaves_previous_directory_intact(onnx_dir, tmp_path, monkeypatch):
    out = tmp_path / "e"
    build_engines(onnx_dir, out, components=("transformer",))
    before = (out / "manifest.json").read_text()
    files_before = sorted(p.name for p in out.iterdir())
    real = ort_build.build_component

    def interrupted(source, path, *args, **kwargs):
        tmp = path.with_name(f".{path.name}.partial.tmp")
        tmp.write_bytes(b"half an engine")  # what a crash mid-write leaves, if the builder is careless
        try:
            raise KeyboardInterrupt
        finally:
            tmp.unlink()  # the real builder removes its temp file in a finally; check it does

    monkeypatch.setattr(ort_build, "build_component", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_engines(onnx_dir, out, components=("transformer",), rebuild=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == files_before
    monkeypatch.setattr(ort_build, "build_component", real)


def test_real_builder_cleans_its_temp_file_on_failure(onnx_dir, tmp_path, monkeypatch):
    import onnxruntime as ort

    out = tmp_path / "e"
    out.mkdir()

    def crash(*a, **k):  # ORT writes external weights under their final name before it fails (disk full)
        (out / "t.ort.onnx.data").write_bytes(b"half of the weights")
        raise KeyboardInterrupt

    monkeypatch.setattr(ort, "InferenceSession", crash)
    from sprintrt.engines.precision import Precision

    with pytest.raises(KeyboardInterrupt):
        ort_build.build_component(onnx_dir / "transformer.onnx", out / "t.ort.onnx", "transformer", Precision.FP32,
                                  {}, {}, {})
    assert list(out.iterdir()) == []
