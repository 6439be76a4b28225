"""`build --backend auto` on a CPU: candidates timed per component, the quality gate, the recorded and
reused choice, and engine directories that mix backends per component."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sprintrt.tuning.tune as T
from sprintrt import machine
from sprintrt.defaults import IMAGE_MIN_PSNR_DB, TUNE_MIN_COSINE
from sprintrt.engines.doctor import tuning_table
from sprintrt.engines.build import build_engines
from sprintrt.errors import InvalidInputError
from sprintrt.manifest import read_manifest
from sprintrt import specs as S
from sprintrt.specs import COMPONENTS, TEXT_ENCODER, TRANSFORMER, VAE_DECODER, VAE_ENCODER
from sprintrt.metrics import PARITY_MAX_ABS
from sprintrt.runtime.pipeline import SprintPipeline

pytest.importorskip("openvino")

SIZE = 128  # timing inputs: one 128x128 call of the tiny checkpoint
FLOAT = ["ort:fp32", "ov:fp32"]


def _manifest(engine_dir) -> dict:
    return json.loads((engine_dir / "manifest.json").read_text())


def _naming_loads(monkeypatch) -> dict:
    """Make the tuner's engine loads remember each engine's candidate: {id(engine): "backend:precision"}."""
    names, real_load = {}, T.load_engine

    def load(manifest, comp, *a, **k):
        engine = real_load(manifest, comp, *a, **k)
        entry = manifest.components[comp]
        names[id(engine)] = f"{entry['backend']}:{entry['precision']}"
        return engine

    monkeypatch.setattr(T, "load_engine", load)
    return names


def _tuned_transformer(onnx_dir, tmp_path, candidate_names: list[str], exhaustive: bool, **kwargs):
    """(the engine directory, the transformer's tuning entry) of a tuner run over `candidate_names` at SIZE, into a
    directory of its own per mode."""
    out = T.tune_engines(onnx_dir, tmp_path / f"e{exhaustive}", components=[TRANSFORMER], size=SIZE,
                         candidate_names=candidate_names, exhaustive=exhaustive, **kwargs)
    return out, _manifest(out)["components"][TRANSFORMER]["tuning"]


def _off_by_up_to_20_percent(outputs: dict) -> dict:
    """Outputs scaled from 0.8x to 1.2x along their elements: a cosine well below the gate."""
    return {k: v * np.linspace(0.8, 1.2, v.size, dtype=v.dtype).reshape(v.shape) for k, v in outputs.items()}


@pytest.fixture(scope="module")
def tuned(onnx_dir, tmp_path_factory):
    """Tuned over ORT fp32, OpenVINO fp32 and ORT int8 (calibrated on 2 prompts)."""
    out = tmp_path_factory.mktemp("tuned") / "engines"
    return T.tune_engines(onnx_dir, out, candidate_names=[*FLOAT, "ort:int8"], count=2, size=SIZE, exhaustive=True)


def test_every_candidate_is_timed_gated_and_the_fastest_passing_one_chosen(tuned):
    manifest = _manifest(tuned)
    assert set(manifest["components"]) == set(COMPONENTS)  # the ControlNet's two too: the tiny checkpoint has one
    for comp, entry in manifest["components"].items():
        tuning = entry["tuning"]
        rows = {r["candidate"]: r for r in tuning["candidates"]}
        # int8 for every component (the ControlNet's two calibrated in ControlNet calls)
        expected = {"onnxruntime:fp32", "openvino:fp32", "onnxruntime:int8"}
        assert set(rows) == expected, comp
        assert rows["onnxruntime:fp32"]["cosine"] == 1.0  # the reference, against itself
        for r in rows.values():
            image_ok = r["psnr_db"] >= IMAGE_MIN_PSNR_DB if comp in S.PICTURE_OUTPUT_RANGE else "psnr_db" not in r
            assert r["seconds"] > 0 and r["passed"] == (r["cosine"] >= TUNE_MIN_COSINE and image_ok)
        fastest = min((r for r in rows.values() if r["passed"]), key=lambda r: r["seconds"])
        assert tuning["chosen"] == fastest["candidate"] == f"{entry['backend']}:{entry['precision']}"
        assert tuning["size"] == SIZE and tuning["min_cosine"] == TUNE_MIN_COSINE
        assert (tuned / entry["file"]).is_file()
    int8 = {c: e["tuning"]["candidates"] for c, e in manifest["components"].items()}
    assert all(r["cosine"] < 1.0 for c in COMPONENTS for r in int8[c]
               if r["candidate"] == "onnxruntime:int8")  # the int8 engines really are quantized
    assert not list(tuned.parent.glob(".*.tune"))  # the scratch candidates are gone


def test_a_second_build_reuses_the_choice_without_timing(tuned, onnx_dir, monkeypatch):
    before = _manifest(tuned)

    def no_timing(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(T, "measure", no_timing)
    monkeypatch.setattr(T, "build_engines", no_timing)
    T.tune_engines(onnx_dir, tuned, candidate_names=[*FLOAT, "ort:int8"], count=2, size=SIZE, exhaustive=True)
    assert _manifest(tuned) == before


def test_losing_candidates_are_deleted_as_they_lose_and_the_reference_is_built_once(onnx_dir, tmp_path,
                                                                                     monkeypatch):
    """At real size every engine is 1-16 GB: keeping every candidate until the end filled a 50 GB disk."""
    out = tmp_path / "e"
    scratch = out.with_name(".e.tune")
    real_measure, real_build = T.measure, T.build_engines
    seen, builds, blobs = [], [], []

    def measure(engine, feeds, **kw):  # what is on disk while each candidate is timed
        seen.append({c: sorted(d.parent.name for d in scratch.glob(f"*/{c}")) for c in (TRANSFORMER, VAE_DECODER)})
        blobs.extend(scratch.rglob("*.blob"))
        return real_measure(engine, feeds, **kw)

    def build(onnx, engine_dir, **kw):
        builds.append((kw["backend"], kw["precision"], tuple(kw.get("components") or ())))
        return real_build(onnx, engine_dir, **kw)

    monkeypatch.setattr(T, "measure", measure)
    monkeypatch.setattr(T, "build_engines", build)
    T.tune_engines(onnx_dir, out, components=[TRANSFORMER, VAE_DECODER], candidate_names=[*FLOAT, "ov:bf16"]
                   if T.machine.cpu_has_bf16() else FLOAT, size=SIZE)
    assert all(len(dirs) <= 2 for call in seen for dirs in call.values()), seen  # the best so far + the one timed
    assert any("openvino" in d for call in seen for dirs in call.values() for d in dirs)  # OpenVINO ones were timed
    assert not blobs  # candidates are compiled in memory: none writes a blob that would be deleted (CANDIDATE_LOAD)
    assert [b for b in builds if b[:2] == ("onnxruntime", "fp32")] == [("onnxruntime", "fp32", builds[0][2])]
    entries = _manifest(out)["components"].values()
    assert all((out / e["file"]).is_file() for e in entries)
    chosen_ov = sum(e["backend"] == "openvino" for e in entries)
    blobs = list((out / "ov_cache").glob("*.blob")) if chosen_ov else []
    assert len(blobs) == chosen_ov, blobs  # only the chosen engines' compiled blobs, compiled here
    assert not scratch.exists()


def test_a_chosen_openvino_engine_loads_from_a_blob_compiled_where_it_lies(mixed):
    """OpenVINO keys a compiled blob by the IR's path, so a blob compiled in the candidate's scratch directory would
    never be found in the engine directory (compiled again at the first load, a whole second blob written beside
    it: the real text encoder's is 7.5 GB in OpenVINO's default cache mode): the tuner compiles each chosen
    OpenVINO engine where it lies."""

    manifest = read_manifest(mixed)
    for comp in (TEXT_ENCODER, VAE_DECODER):  # the two OpenVINO engines of the mixed directory
        assert manifest.components[comp]["backend"] == "openvino"
        engine = T.load_engine(manifest, comp)
        try:
            assert engine.compiled.get_property("LOADED_FROM_CACHE"), comp
        finally:
            engine.release()


def test_a_candidate_failing_the_gate_is_never_chosen_even_when_fastest(onnx_dir, tmp_path, monkeypatch):
    """OpenVINO's engines are replaced by a broken one that answers instantly with zeros."""
    real_load = T.load_engine

    class Broken:
        def __init__(self, engine):
            self.engine = engine

        def __call__(self, **feeds):
            out = self.engine(**feeds)
            return {k: np.zeros_like(v) + 1e-3 for k, v in out.items()}

        def release(self):
            self.engine.release()

    def load(manifest, comp, *a, **k):
        engine = real_load(manifest, comp, *a, **k)
        return Broken(engine) if engine.backend == "openvino" else engine

    def measure(engine, feeds, **kw):
        seconds, outputs = real_measure(engine, feeds, **kw)
        return (0.0 if isinstance(engine, Broken) else seconds), outputs

    real_measure = T.measure
    monkeypatch.setattr(T, "load_engine", load)
    monkeypatch.setattr(T, "measure", measure)
    out = T.tune_engines(onnx_dir, tmp_path / "e", components=[TRANSFORMER, VAE_DECODER], candidate_names=FLOAT,
                         size=SIZE)
    for comp, entry in _manifest(out)["components"].items():
        rows = {r["candidate"]: r for r in entry["tuning"]["candidates"]}
        assert rows["openvino:fp32"]["seconds"] == 0.0 and not rows["openvino:fp32"]["passed"]
        assert entry["tuning"]["chosen"] == "onnxruntime:fp32" and entry["backend"] == "onnxruntime"


@pytest.fixture(scope="module")
def mixed(onnx_dir, tmp_path_factory):
    """One engine directory with OpenVINO text encoder and VAE, ONNX Runtime transformer."""
    out = tmp_path_factory.mktemp("mixed") / "engines"
    only = {TEXT_ENCODER: ["ov:fp32"], TRANSFORMER: ["ort:fp32"], VAE_DECODER: ["ov:fp32"]}
    real = T.measure

    def prefer_named(engine, feeds, **kw):  # the named candidate wins whatever the clock says
        seconds, outputs = real(engine, feeds, **kw)
        return (seconds if engine.backend == "onnxruntime" and engine.name != TRANSFORMER else 0.0), outputs

    mp = pytest.MonkeyPatch()
    mp.setattr(T, "measure", prefer_named)
    try:
        return T.tune_engines(onnx_dir, out, components=list(only), candidate_names=only, size=SIZE)
    finally:
        mp.undo()


def test_mixed_backend_directory_loads_and_matches_diffusers(mixed, reference_pipe):
    backends = {c: e["backend"] for c, e in _manifest(mixed)["components"].items()}
    assert backends == {TEXT_ENCODER: "openvino", TRANSFORMER: "onnxruntime", VAE_DECODER: "openvino"}
    kw = dict(prompt="a lighthouse at dusk", num_inference_steps=2, height=192, width=256,
              use_resolution_binning=False)
    ref = reference_pipe(**kw, generator=torch.Generator().manual_seed(3), output_type="np").images
    ours = SprintPipeline.from_engines(mixed)(**kw, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(ours - ref).max() <= PARITY_MAX_ABS


def test_tuning_table_and_bad_candidates(mixed, onnx_dir, tmp_path):
    lines = tuning_table(_manifest(mixed))
    assert any(l.startswith(TEXT_ENCODER) and "openvino:fp32" in l and "chosen" in l for l in lines)
    with pytest.raises(InvalidInputError, match="BACKEND:PRECISION"):
        T.tune_engines(onnx_dir, tmp_path / "x", candidate_names=["ort"])
    with pytest.raises(InvalidInputError, match="CPU backends only"):
        T.tune_engines(onnx_dir, tmp_path / "x", candidate_names=["trt:bf16"])
    with pytest.raises(InvalidInputError, match="cannot be built for any of"):
        T.tune_engines(onnx_dir, tmp_path / "x", components=[VAE_ENCODER], candidate_names=["ov:int8w"])
    with pytest.raises(InvalidInputError, match="cannot be built for vae_encoder"):
        T.tune_engines(onnx_dir, tmp_path / "x", candidate_names={VAE_ENCODER: ["ov:int8w"]})
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_candidates_follow_the_cpu(onnx_dir):
    record = json.loads((onnx_dir / "export_info.json").read_text())["components"][TRANSFORMER]
    epyc = {"kind": "cpu", "arch": "x86_64", "name": "EPYC", "isa": ["avx2", "fma"]}
    xeon = {"kind": "cpu", "arch": "x86_64", "name": "Xeon", "isa": ["avx2", "avx512_bf16", "avx512_fp16"]}
    names = lambda target, cal: [c.name for c in T.candidates(TRANSFORMER, record, target, cal)]  # noqa: E731
    int8w = ["openvino:int8w"] if machine.library_version("nncf") else []  # needs no calibration
    assert names(epyc, True) == ["onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:int8", *int8w]
    assert names(epyc, False) == ["onnxruntime:fp32", "openvino:fp32", *int8w]
    assert names(xeon, False) == ["onnxruntime:fp32", "onnxruntime:fp16", "openvino:fp32", "openvino:bf16", *int8w]
    controlnet = json.loads((onnx_dir / "export_info.json").read_text())["components"][S.CONTROLNET]
    assert [c.name for c in T.candidates(S.CONTROLNET, controlnet, epyc, True)] == [
        "onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:int8", *int8w]


def test_int8w_is_a_candidate_only_where_nncf_is_installed(onnx_dir, monkeypatch):
    info = json.loads((onnx_dir / "export_info.json").read_text())["components"]
    epyc = {"kind": "cpu", "arch": "x86_64", "name": "EPYC", "isa": ["avx2", "fma"]}
    real = machine.library_version
    monkeypatch.setattr(machine, "library_version", lambda lib: real(lib) if lib != "nncf" else "3.4.0")
    assert "openvino:int8w" in [c.name for c in T.candidates(TRANSFORMER, info[TRANSFORMER], epyc, False)]
    assert "openvino:int8w" not in [c.name for c in T.candidates(VAE_DECODER, info[VAE_DECODER], epyc, False)]
    monkeypatch.setattr(machine, "library_version", lambda lib: real(lib) if lib != "nncf" else None)
    assert "openvino:int8w" not in [c.name for c in T.candidates(TRANSFORMER, info[TRANSFORMER], epyc, False)]


def test_int8_is_left_out_where_calibration_would_not_fit_in_memory(onnx_dir):
    record = json.loads((onnx_dir / "export_info.json").read_text())["components"][TRANSFORMER]
    epyc = {"kind": "cpu", "arch": "x86_64", "name": "EPYC", "isa": ["avx2", "fma"]}
    size = record["bytes"] + (record.get("external_data") or {}).get("bytes", 0)
    roomy = [c.name for c in T.candidates(TRANSFORMER, record, epyc, True, memory_bytes=100 * size)]
    tight = [c.name for c in T.candidates(TRANSFORMER, record, epyc, True, memory_bytes=size)]
    assert "onnxruntime:int8" in roomy and not any(n.endswith(":int8") for n in tight)


def test_int8_is_calibrated_and_quantized_once_for_both_backends(onnx_dir, tmp_path, monkeypatch):
    import sprintrt.engines.quantize as Q

    calls, real = [], Q.quantize_qdq

    def counting(*a, **k):
        calls.append(k["component"])
        return real(*a, **k)

    monkeypatch.setattr(Q, "quantize_qdq", counting)
    out = T.tune_engines(onnx_dir, tmp_path / "e", components=[TRANSFORMER], candidate_names=["ort:int8", "ov:int8"],
                         count=2, size=SIZE, exhaustive=True)
    assert calls == [TRANSFORMER]
    rows = {r["candidate"]: r for r in _manifest(out)["components"][TRANSFORMER]["tuning"]["candidates"]}
    assert set(rows) == {"onnxruntime:fp32", "onnxruntime:int8", "openvino:int8"}
    assert 0.999 <= rows["openvino:int8"]["cosine"] < 1.0  # OpenVINO ran the shared Q/DQ graph as int8


def test_the_image_gate_refuses_a_decoder_whose_cosine_passes():
    """A picture 0.9995 cosine-close to the reference's can still be 4 dB short of 40 dB: both are asked."""
    rng = np.random.default_rng(0)
    reference = {"sample": rng.choice([-1.0, 1.0], size=(1, 3, 64, 64))}
    noisy = {"sample": reference["sample"] + rng.normal(0, 10 ** -1.5, size=(1, 3, 64, 64))}  # mse 1e-3: ~36 dB
    row = T.gate(VAE_DECODER, noisy, reference)
    assert row["cosine"] >= TUNE_MIN_COSINE and row["psnr_db"] < IMAGE_MIN_PSNR_DB and not row["passed"]
    assert T.gate(TRANSFORMER, noisy, reference) == {"cosine": row["cosine"], "passed": True}  # not a picture
    assert T.gate(VAE_DECODER, reference, reference)["passed"]


def test_an_over_quantized_decoder_is_never_chosen_even_when_fastest(onnx_dir, tmp_path, monkeypatch):
    """The uniform int8 recipe (every block quantized, no measurement: issue #29's 0.917-cosine decoder at
    real size) timed as the fastest candidate: the image gate refuses it and the tuning table says why."""
    from sprintrt.engines import quantize

    monkeypatch.setattr(quantize, "measured", lambda precision, component, uniform=False: False)
    real_measure, real_load, int8_engines = T.measure, T.load_engine, []

    def load(manifest, comp, *a, **k):
        engine = real_load(manifest, comp, *a, **k)
        if manifest.components[comp]["precision"] == "int8":
            int8_engines.append(engine)
        return engine

    def measure(engine, feeds, **kw):
        seconds, outputs = real_measure(engine, feeds, **kw)
        return (0.0 if engine in int8_engines else seconds), outputs

    monkeypatch.setattr(T, "load_engine", load)
    monkeypatch.setattr(T, "measure", measure)
    for exhaustive in (True, False):
        out = T.tune_engines(onnx_dir, tmp_path / f"e{exhaustive}", components=[VAE_DECODER], count=2, size=SIZE,
                             candidate_names=["ort:fp32", "ort:int8"], exhaustive=exhaustive)
        entry = _manifest(out)["components"][VAE_DECODER]
        rows = {r["candidate"]: r for r in entry["tuning"]["candidates"]}
        int8 = rows["onnxruntime:int8"]
        assert entry["tuning"]["chosen"] == "onnxruntime:fp32" and entry["precision"] == "fp32" and not int8["passed"]
        if exhaustive:  # calibrated, timed fastest, refused by the image gate
            assert int8["seconds"] == 0.0 and int8["psnr_db"] < IMAGE_MIN_PSNR_DB
            assert any("below the gate" in line and "dB" in line for line in tuning_table(_manifest(out)))
        else:  # this recipe is not measured, so its probe's quality counts: dropped before calibration
            assert int8["cosine"] < T.TUNE_PROBE_MIN_COSINE and "not calibrated" in int8["dropped"]


@pytest.mark.parametrize("int8_seconds, wrong, winner", [((3.0, 3.5), False, "openvino:fp32"),
                                                        ((0.9, 2.5), False, "onnxruntime:int8"),
                                                        ((0.9, 2.5), True, "openvino:fp32")],
                         ids=["int8-slow", "int8-fast", "int8-fast-but-wrong"])
def test_screening_at_a_quarter_of_the_pixels_picks_what_the_exhaustive_tuner_picks(onnx_dir, tmp_path, monkeypatch,
                                                                                   int8_seconds, wrong, winner):
    """A clock that makes OpenVINO 10% slower than the reference at the screening size but faster at the tuning
    size (a leader: confirmed). int8-slow: int8 3x slower when screened: its uncalibrated speed probe is dropped,
    so nothing is calibrated (exhaustive timing shows it would have lost). int8-fast: the probe leads, so it is
    calibrated, timed and chosen. int8-fast-but-wrong: every int8 engine's outputs are off by 10%: the probe
    misses the quality gate, so nothing is calibrated (exhaustive: calibrated, then refused by the gate). Both
    modes choose the same candidate. The transformer's int8 layers are chosen by measurement, which makes its probe
    a speed screen alone (next test): here its recipe is the uniform one, as the text encoder's is, whose probe's
    quality counts."""
    from sprintrt.engines import quantize
    from sprintrt.tuning import calibration

    monkeypatch.setattr(quantize, "measured", lambda precision, component, uniform=False: False)

    seconds = {"onnxruntime:fp32": (1.0, 4.0), "openvino:fp32": (1.1, 3.0), "onnxruntime:int8": int8_seconds}
    real_measure, real_quantize, real_record = T.measure, quantize.quantize_qdq, calibration._record
    names = _naming_loads(monkeypatch)

    def measure(engine, feeds, give_up_after=None):
        _, outputs = real_measure(engine, feeds)
        if wrong and names[id(engine)] == "onnxruntime:int8":
            outputs = _off_by_up_to_20_percent(outputs)
        side = max(v.shape[-1] for v in feeds.values() if getattr(v, "ndim", 0) == 4)
        full = side == SIZE // 32
        timed.append((names[id(engine)], full, give_up_after))
        return seconds[names[id(engine)]][full], outputs

    def quantize_qdq(*a, uniform=False, **k):
        quantized.append("uniform" if uniform else "calibrated")
        if not uniform:  # the probes' engines and graph are gone before anything is calibrated
            assert not list(tmp_path.glob(".e*.tune/probe")), list(tmp_path.glob(".e*.tune/probe/**"))
        return real_quantize(*a, uniform=uniform, **k)

    def record(*a, **k):
        recorded.append(a)
        return real_record(*a, **k)

    monkeypatch.setattr(T, "measure", measure)
    monkeypatch.setattr(quantize, "quantize_qdq", quantize_qdq)
    monkeypatch.setattr(calibration, "_record", record)
    chosen = {}
    for exhaustive in (True, False):
        timed, said, quantized, recorded = [], [], [], []
        out, tuning = _tuned_transformer(onnx_dir, tmp_path, ["ort:fp32", "ov:fp32", "ort:int8"], exhaustive, count=2,
                                         progress=said.append)
        chosen[exhaustive] = tuning["chosen"]
        rows = {r["candidate"]: r for r in tuning["candidates"]}
        timed_full = [name for name, full, _ in timed if full]
        if exhaustive:  # no probe: every candidate calibrated, timed and gated at the tuning size
            assert tuning["screen_size"] == SIZE and all(full for _, full, _ in timed)
            assert sorted(timed_full) == sorted(seconds) and rows["onnxruntime:int8"]["seconds"] == int8_seconds[1]
            assert quantized == ["calibrated"] and recorded and rows["onnxruntime:int8"]["passed"] != wrong
            # the quantizer's steps, under the step that builds the candidate
            assert any(m.startswith("  int8 activation ranges of transformer on ") for m in said), said
            assert any(m.startswith("  writing the int8 Q/DQ graph of transformer") for m in said), said
            continue
        assert tuning["screen_size"] == SIZE // 2
        assert rows["openvino:fp32"]["seconds"] == 3.0 and rows["openvino:fp32"]["passed"]
        # the float candidates first: the reference at the screening size alone (its outputs at the tuning size are
        # the recording call's), timed at the tuning size once OpenVINO, a leader within TUNE_LEADER_RATIO of it
        # there, has passed; then the int8 probe, which gives up after one call past TUNE_DROP_RATIO x the best
        # float's time at the screening size
        assert [(name, full) for name, full, _ in timed][:4] == [("onnxruntime:fp32", False), ("openvino:fp32", False),
                                                                ("openvino:fp32", True), ("onnxruntime:fp32", True)]
        assert rows["onnxruntime:fp32"]["seconds"] == 4.0
        assert timed[4] == ("onnxruntime:int8", False, T.TUNE_DROP_RATIO * 1.1)
        if winner == "openvino:fp32":
            assert quantized == ["uniform"] and not recorded  # nothing calibrated, nothing quantized for real
            assert "onnxruntime:int8" not in timed_full and "not calibrated" in rows["onnxruntime:int8"]["dropped"]
            assert rows["onnxruntime:int8"]["screen_seconds"] == int8_seconds[0]
            assert not rows["onnxruntime:int8"]["passed"]
            assert ("cosine" in rows["onnxruntime:int8"]["dropped"]) == wrong
            assert (rows["onnxruntime:int8"].get("cosine", 1.0) < TUNE_MIN_COSINE) == wrong
            assert any("dropped" in line for line in tuning_table(_manifest(out)))
            assert any(msg.startswith("[2/4, at least") and "left]" in msg for msg in said), said  # an ETA
        else:
            assert quantized == ["uniform", "calibrated"] and recorded
            assert rows["onnxruntime:int8"]["seconds"] == 2.5 and rows["onnxruntime:int8"]["passed"]
    assert chosen[True] == chosen[False] == winner


@pytest.mark.parametrize("ov_screen, ov_wrong", [(0.5, False), (0.5, True), (0.9, False)],
                         ids=["ov-far-ahead", "ov-far-ahead-but-wrong", "ov-close"])
def test_the_reference_is_timed_at_the_tuning_size_only_where_the_screen_leaves_it_a_leader(
        onnx_dir, tmp_path, monkeypatch, ov_screen, ov_wrong):
    """The fp32 reference (1.0 s screened, 4.0 s at the tuning size) against OpenVINO (2.0 s at the tuning size):
    2x faster screened, OpenVINO drops the reference once it passes at the tuning size, which never times the
    reference there; where OpenVINO misses the gate the reference is the choice, timed; within TUNE_LEADER_RATIO
    screened, the reference is timed and compared. Each mode chooses what the exhaustive tuner chooses, and the
    outputs OpenVINO is gated on at the tuning size are the reference engine's own."""
    seconds = {"onnxruntime:fp32": (1.0, 4.0), "openvino:fp32": (ov_screen, 2.0)}
    real_measure, real_gate = T.measure, T.gate
    names = _naming_loads(monkeypatch)
    gated = []

    def measure(engine, feeds, give_up_after=None):
        _, outputs = real_measure(engine, feeds)
        if ov_wrong and names[id(engine)] == "openvino:fp32":
            outputs = _off_by_up_to_20_percent(outputs)
        full = max(v.shape[-1] for v in feeds.values() if getattr(v, "ndim", 0) == 4) == SIZE // 32
        timed.append((names[id(engine)], full))
        return seconds[names[id(engine)]][full], outputs

    def gate(comp, outputs, reference):
        gated.append(reference)
        return real_gate(comp, outputs, reference)

    real_feeds, recorded = T.timing_feeds, []

    def timing_feeds(*a, **k):
        recorded.append(real_feeds(*a, **k))
        return recorded[-1]

    monkeypatch.setattr(T, "measure", measure)
    monkeypatch.setattr(T, "gate", gate)
    monkeypatch.setattr(T, "timing_feeds", timing_feeds)
    chosen = {}
    for exhaustive in (True, False):
        timed, gated = [], []
        out, tuning = _tuned_transformer(onnx_dir, tmp_path, FLOAT, exhaustive)
        chosen[exhaustive] = tuning["chosen"]
        if exhaustive:
            continue
        ref = next(r for r in tuning["candidates"] if r["candidate"] == "onnxruntime:fp32")
        leads = ov_screen * T.TUNE_LEADER_RATIO >= 1.0 or ov_wrong
        assert (("onnxruntime:fp32", True) in timed) == leads and ("seconds" in ref) == leads
        assert ref["screen_seconds"] == 1.0 and ref["passed"] == leads and ("dropped" in ref) != leads
        # what OpenVINO was gated on at the tuning size: the reference engine's outputs for those inputs
        ref_dir = build_engines(onnx_dir, tmp_path / "ref", backend="onnxruntime", precision="fp32",
                                components=(TRANSFORMER,))
        engine = T.load_engine(read_manifest(ref_dir), TRANSFORMER)
        fresh = engine(**recorded[-1][0][SIZE][TRANSFORMER])
        engine.release()
        assert fresh.keys() == gated[-1].keys() and all(np.array_equal(gated[-1][k], v) for k, v in fresh.items())
        assert any("dropped" in line for line in tuning_table(_manifest(out))) != leads
    assert chosen[True] == chosen[False] == ("onnxruntime:fp32" if ov_wrong else "openvino:fp32")


def test_a_measured_recipes_probe_is_screened_for_speed_only_and_a_failed_probe_proves_nothing(onnx_dir, tmp_path,
                                                                                              monkeypatch):
    """The decoder's calibrated recipe keeps the blocks the picture cannot afford in float, so its uniform probe's
    picture says nothing of it: a fast probe with a wrong picture is still calibrated (the mixed engine that won
    on the Zen 3 would otherwise never be built; the transformer's recipe is measured too). And a probe that fails
    to build leaves the candidate to be calibrated and timed as usual."""
    from sprintrt.engines import quantize

    real_measure, real_quantize, real_build, real_load = T.measure, quantize.quantize_qdq, T.build_engines, T.load_engine
    quantized, said, int8_engines = [], [], []

    def load(manifest, comp, *a, **k):
        engine = real_load(manifest, comp, *a, **k)
        if manifest.components[comp]["precision"] == "int8":
            int8_engines.append(engine)
        return engine

    def measure(engine, feeds, give_up_after=None):
        seconds, outputs = real_measure(engine, feeds)
        if engine in int8_engines:
            return 0.0, {k: np.zeros_like(v) for k, v in outputs.items()}  # fast and wrong
        return seconds, outputs

    def quantize_qdq(*a, uniform=False, **k):
        quantized.append((k["component"], "uniform" if uniform else "calibrated"))
        return real_quantize(*a, uniform=uniform, **k)

    def build(onnx, engine_dir, **kw):
        if kw.get("uniform_int8") and kw["components"] == (TRANSFORMER,):
            raise T.EngineBuildError("no probe today")
        return real_build(onnx, engine_dir, **kw)

    monkeypatch.setattr(T, "load_engine", load)
    monkeypatch.setattr(T, "measure", measure)
    monkeypatch.setattr(quantize, "quantize_qdq", quantize_qdq)
    monkeypatch.setattr(T, "build_engines", build)
    out = T.tune_engines(onnx_dir, tmp_path / "e", components=[TRANSFORMER, VAE_DECODER], count=2, size=SIZE,
                         candidate_names=["ort:fp32", "ort:int8"], progress=said.append)
    assert quantized == [(VAE_DECODER, "uniform"), (TRANSFORMER, "calibrated"), (VAE_DECODER, "calibrated")]
    assert any("probe of onnxruntime:int8 for transformer failed" in m and "calibrating it anyway" in m for m in said)
    tuning = {c: e["tuning"] for c, e in _manifest(out)["components"].items()}
    decoder = {r["candidate"]: r for r in tuning[VAE_DECODER]["candidates"]}["onnxruntime:int8"]
    assert "dropped" not in decoder and not decoder["passed"] and tuning[VAE_DECODER]["chosen"] == "onnxruntime:fp32"


def test_the_eta_re_plans_when_a_screen_drops_steps(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    said = []
    eta = T._Eta(["run", "probe", "run", "quantize", "run"], said.append)
    for took in (10.0, 60.0, 10.0):
        eta("step")
        clock[0] += took
        eta.step()
    eta.expect(["quantize"])  # the second int8 candidate's probe dropped it
    eta("step")
    assert said[-1].startswith("[4/4]"), said  # only an unseen kind left: no estimate
    assert [kind for kind, _ in eta.kinds] == ["run", "probe", "run", "quantize"]


def test_the_eta_drops_a_skipped_step_from_its_plan(monkeypatch):
    monkeypatch.setattr(T.time, "perf_counter", lambda: 0.0)
    said = []
    eta = T._Eta(["run", "run", "run"], said.append)
    eta("first")
    eta.step()
    eta.skip()  # the second will not run (e.g. an fp32 candidate whose bf16 one passed)
    eta("third")
    assert said[-1].startswith("[2/2") and [kind for kind, _ in eta.kinds] == ["run", "run"], said


def test_the_eta_weighs_quantizing_steps_apart(monkeypatch):
    """Real size: a quantizing step takes minutes, a timing step seconds; a plain mean over both said 47 min with
    under 10 left (measured). Each kind is estimated from its own steps; an unseen kind makes it "at least"."""
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    said = []
    eta = T._Eta(["run", "quantize", "run", "quantize", "run", "run"], said.append)
    for took in (10.0, 300.0, 20.0):
        eta("step")
        clock[0] += took
        eta.step()
    eta("step")
    assert said[1].startswith("[2/6, at least 30 s left]")  # 3 runs x 10 s; the quantizing steps not seen yet
    # left: one quantize (300 s) + 2 runs (mean 15 s) = 330 s
    assert said[3].startswith("[4/6, about 6 min left]"), said


def test_the_eta_sizes_a_quantizing_step_by_its_components_weights(monkeypatch):
    """Real size (AMX Xeon): the transformer's measured int8 and the calibration took 9.1 min for 2.4 GB of weights,
    the decoder's after it 1.9 min for 0.7 GB, where the mean per step said 9 min each. A quantizing or probing
    step's cost is estimated per GB of its component's weights (`_kinds`)."""
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    said = []
    eta = T._Eta(["run", ("quantize", 2.4), ("quantize", 0.7), ("quantize", 0.6)], said.append)
    for took in (10.0, 540.0):
        eta("step")
        clock[0] += took
        eta.step()
    eta("step")
    # 540 s / 2.4 GB x (0.7 + 0.6) GB = 292 s (a mean per step: 2 x 540 s = 18 min)
    assert said[-1].startswith("[3/4, about 5 min left]"), said


def test_the_tuners_quantizing_steps_are_sized_by_weights():
    info = {"components": {"transformer": {"bytes": 2**20, "external_data": {"bytes": 2 * 2**30 - 2**20}},
                           "vae_decoder": {"bytes": 2**29}}}  # the transformer's weights in a file beside it
    ov, ort = T.EngineChoice.parse("openvino:int8"), T.EngineChoice.parse("onnxruntime:int8")
    steps = [(ort, "transformer"), (ort, "vae_decoder"), (ov, "transformer"), (ov, "vae_decoder")]
    assert T._kinds(steps, info) == [("quantize", 2.0), ("quantize", 0.5), "run", "run"]
    assert T._kinds(steps, info, "probe")[:2] == [("probe", 2.0), ("probe", 0.5)]


@pytest.mark.parametrize("bf16_wrong", [False, True], ids=["bf16-passes", "bf16-fails-the-gate"])
def test_a_backends_fp32_candidate_is_not_built_where_its_bf16_one_passed(onnx_dir, tmp_path, monkeypatch, bf16_wrong):
    """OpenVINO bf16 is timed before OpenVINO fp32; where it passes the gate, the fp32 engine is not built (unless
    exhaustive) and its row says why; where it fails, fp32 is built and timed as usual. A clock where OpenVINO bf16
    is fastest, and fp32 second: both modes choose the same candidate."""
    monkeypatch.setattr(T, "typed_dtypes_here", lambda target=None: ["bf16"])  # any CPU: the rule, not the kernels
    seconds = {"onnxruntime:fp32": 4.0, "openvino:fp32": 3.0, "openvino:bf16": 2.0}
    real_measure, real_build = T.measure, T.build_engines
    names = _naming_loads(monkeypatch)

    def measure(engine, feeds, give_up_after=None):
        _, outputs = real_measure(engine, feeds)
        if bf16_wrong and names[id(engine)] == "openvino:bf16":
            outputs = _off_by_up_to_20_percent(outputs)
        return seconds[names[id(engine)]], outputs

    def build(onnx, engine_dir, **kw):
        built.append(f"{kw['backend']}:{next(iter(kw['precision'].values())).value}"
                     if isinstance(kw["precision"], dict) else kw["backend"])
        return real_build(onnx, engine_dir, **kw)

    monkeypatch.setattr(T, "measure", measure)
    monkeypatch.setattr(T, "build_engines", build)
    chosen = {}
    for exhaustive in (True, False):
        built, said = [], []
        out, tuning = _tuned_transformer(onnx_dir, tmp_path, ["ort:fp32", "ov:fp32", "ov:bf16"], exhaustive,
                                         progress=said.append)
        chosen[exhaustive] = tuning["chosen"]
        rows = {r["candidate"]: r for r in tuning["candidates"]}
        assert list(rows)[:2] == ["onnxruntime:fp32", "openvino:bf16"]  # the 16-bit candidate first
        assert rows["openvino:bf16"]["passed"] != bf16_wrong
        if exhaustive or bf16_wrong:
            assert "openvino:fp32" in built and rows["openvino:fp32"]["seconds"] == 3.0
        else:
            assert "openvino:fp32" not in built and not rows["openvino:fp32"]["passed"]
            assert "openvino:bf16 passed the gate" in rows["openvino:fp32"]["skipped"]
            assert any("openvino:fp32" in line and "not built" in line for line in tuning_table(_manifest(out)))
    assert chosen[True] == chosen[False] == ("openvino:fp32" if bf16_wrong else "openvino:bf16")


def test_running_out_of_disk_stops_the_tuner_with_a_typed_error_and_removes_its_scratch(onnx_dir, tmp_path,
                                                                                         monkeypatch):
    """Every later candidate would fail alike, so the first OutOfSpaceError ends the run (the reference built,
    the next candidate's build failing): nothing of the scratch directory is left, no manifest written."""
    from sprintrt.errors import OutOfSpaceError

    real_build = T.build_engines

    def build(onnx, engine_dir, **kw):
        if kw["backend"] != "onnxruntime":
            raise OutOfSpaceError("building ... ran out of disk space")
        return real_build(onnx, engine_dir, **kw)

    monkeypatch.setattr(T, "build_engines", build)
    out = tmp_path / "e"
    with pytest.raises(OutOfSpaceError, match="ran out of disk space"):
        T.tune_engines(onnx_dir, out, components=[VAE_DECODER], candidate_names=FLOAT, size=SIZE)
    assert not out.with_name(".e.tune").exists() and not (out / "manifest.json").exists()


def test_a_disk_too_small_for_the_candidates_is_refused_before_any_work(onnx_dir, tmp_path, monkeypatch):
    """The needed room (TUNE_DISK_FACTOR times the weights, the reference engines of every exported component
    counted once) against the engine directory's disk: short of it, a typed error naming both, nothing built."""
    import shutil

    from sprintrt.defaults import TUNE_DISK_FACTOR
    from sprintrt.errors import OutOfSpaceError
    from sprintrt.export_info import read_export_info, weights_bytes

    records = read_export_info(onnx_dir)["components"]
    needed = sum(weights_bytes(r) for r in records.values()) + (TUNE_DISK_FACTOR - 1) * weights_bytes(records[VAE_DECODER])
    class Built(Exception):
        pass

    def build(*a, **k):
        raise Built

    monkeypatch.setattr(T, "build_engines", build)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**15, 0, int(needed) - 1))
    out = tmp_path / "e"
    with pytest.raises(OutOfSpaceError, match=r"needs about .* GB free beside .*Fix: free space"):
        T.tune_engines(onnx_dir, out, components=[VAE_DECODER], candidate_names=FLOAT, size=SIZE)
    assert not out.with_name(".e.tune").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**15, 0, int(needed) + 1))
    with pytest.raises(Built):  # past the check: the first build starts
        T.tune_engines(onnx_dir, out, components=[VAE_DECODER], candidate_names=FLOAT, size=SIZE)
