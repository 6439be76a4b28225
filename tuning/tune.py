"""`sprintrt build --backend auto` on a CPU: per component, build every installed backend x precision
candidate, time it on the inputs of a real pipeline call, keep the fastest that passes the quality gate.

Which CPU backend wins is not a rule of thumb: measured, OpenVINO bf16 won on an AVX512-BF16/AMX Xeon
while ONNX Runtime fp32 won on an AVX2-only EPYC (19.9 s vs OpenVINO fp32 24.9 s end to end), and the
winner can differ per network. So:

1. An fp32 ONNX Runtime reference is built (the quality reference and the calibration engines) and
   one pipeline call at `size`² records every component's inputs (the VAE encoder, which a text-to-image
   call does not run, gets that call's picture, prepared as img2img prepares it).
2. Each candidate is built (engines/build.py, so the usual keys, checks and atomic writes apply; the
   int8 Q/DQ graph is calibrated once and shared by ONNX Runtime and OpenVINO), loaded alone, run once
   to warm up, then timed (median of TUNE_MIN_RUNS or more calls), and its outputs are compared with
   the reference's: cosine >= TUNE_MIN_COSINE (sprintrt/defaults.py), and for the VAE decoder, whose output is
   the picture, PSNR >= IMAGE_MIN_PSNR_DB too, or it is never chosen (`gate`).
   Unless exhaustive, float candidates go first and each int8 candidate is first screened as an uncalibrated
   uniform-int8 probe (`_Trials.probe`, a heuristic like the reduced-size screen: `--exhaustive` checks it);
   only the components whose int8 could lead are calibrated, so where every int8 candidate is dropped no
   calibration runs (the probes still write one uniform Q/DQ graph per component). A backend's 16-bit
   candidate goes before its fp32 one, which is then not built where the 16-bit one passed (`_Trials.dominated`).
   The reference, whose outputs the recording call gave, is timed at the tuning size only where the screen leaves
   it a leader (`_Trials.settle`).
3. The fastest passing candidate's files are moved into the engine directory; its manifest entry carries
   the whole table under "tuning" (candidates, seconds, cosine, pass/fail, the choice) and a tuning key
   (machine, library versions, source graphs, candidates, calibration, size, gate). A later build with
   the same key reuses the choice without timing anything.

Candidates: ONNX Runtime fp32 / fp16 (typed variant; only on CPUs with fp16 arithmetic) / int8, and
OpenVINO fp32 / bf16 (only on CPUs with bf16 instructions: elsewhere it is emulated) / int8 / int8w
(int8 weights, no calibration; where NNCF is installed), for what
each backend builds per component (engines/precision.py) and is installed here. int8 candidates need
calibration (`calibrate=False` leaves them out) and are left out where calibrating would not fit in
memory (CALIBRATION_MEMORY_FACTOR times the weights; the real 8 GB text encoder fits 24 GB).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sprintrt import machine
from sprintrt.defaults import (CALIBRATION_MEMORY_FACTOR, DEFAULT_BACKEND, DEFAULT_CALIBRATION_COUNT,
                               DEFAULT_CALIBRATION_SIZE, DEFAULT_PROMPT, IMAGE_MIN_PSNR_DB, TUNE_MAX_RUNS,
                               TUNE_DISK_FACTOR, TUNE_DROP_RATIO, TUNE_LEADER_RATIO, TUNE_MIN_COSINE, TUNE_MIN_RUNS,
                               TUNE_MIN_SECONDS, TUNE_PROBE_MIN_COSINE, TUNE_SCREEN_RULES, TUNE_SCREEN_DIVISOR)
from sprintrt.engines.build import build_engines, intact, read_existing, write_manifest
from sprintrt.engines.precision import QUANTIZED, EngineChoice, Precision
from sprintrt.engines.registry import backend_module, cpu_backends
from sprintrt.errors import EngineBuildError, InvalidInputError, OutOfSpaceError, SprintError
from sprintrt.export_info import read_export_info, weights_bytes
from sprintrt.files import hashes_remembered
from sprintrt.manifest import engine_files, read_manifest
from sprintrt.metrics import cosine, psnr
from sprintrt.runtime.engine import RunOptions
from sprintrt.runtime.recording import recording
from sprintrt.runtime.registry import load_engine
from sprintrt import specs as S

# What every candidate's outputs are compared with (and the engines that record the calibration inputs).
QUALITY_REFERENCE = EngineChoice(DEFAULT_BACKEND, Precision.FP32)
# The calibration description of the int8 speed probes' Q/DQ graphs (a separate engine key; never shipped).
PROBE_CALIBRATION = "speed probe: ranges of the screening call's own inputs"
# Candidates are built and loaded without a compiled-model cache (build_engines' compiled_cache): OpenVINO keys its
# blob by the engine's path, so even the chosen candidate's blob is not found where the engine moves (it is compiled
# again there, at the end), and the others are deleted. Measured on the real 0.6B text encoder's bf16 IR (2-vCPU
# Intel Xeon with AMX, OpenVINO 2026.4): compiling into the cache 3.1-55 s (a 4.1 GB blob written; this VM's disk
# varied), then loading from it 0.2 s, against 1.3 s compiled in memory; the first call took 4.1-4.5 s either way.
# Built, loaded and run as the tuner does, five OpenVINO candidates (the text encoder's bf16 and int8w, the other
# networks' bf16) took 265-353 s with blobs and 175-192 s without; the whole tuner wrote 11.6 GB less.
CANDIDATE_LOAD = RunOptions(compiled_cache=False)


def parse_candidate(text: str) -> EngineChoice:
    """'ort:int8' / 'openvino:fp32' → a CPU EngineChoice; a typed error names the bad part."""
    choice = EngineChoice.parse(text)  # no default precision: a tuner candidate names one
    if choice.backend not in cpu_backends():
        raise InvalidInputError(f"candidate {text!r}: tuning times CPU backends only ({cpu_backends()}). "
                                "Fix: build GPU engines with their --backend")
    return choice


def typed_dtypes_here(target: dict | None = None) -> list[str]:
    """The 16-bit types this CPU computes in (the tuner's bf16/fp16 candidates). Elsewhere they are slower than
    fp32: bf16 is emulated without AVX512-BF16/AMX, and ONNX Runtime converts fp16 to fp32 around every op
    without fp16 arithmetic."""
    return [dtype for dtype, has in (("bf16", machine.cpu_has_bf16(target)), ("fp16", machine.cpu_has_fp16(target)))
            if has]


def calibration_fits(record: dict, memory_bytes: int | None) -> bool:
    """Whether calibrating this graph for int8 fits in this machine's memory (see CALIBRATION_MEMORY_FACTOR)."""
    return memory_bytes is None or weights_bytes(record) * CALIBRATION_MEMORY_FACTOR <= memory_bytes


def candidates(component: str, record: dict, target: dict, calibrate: bool,
               memory_bytes: int | None = None) -> list[EngineChoice]:
    """Every candidate this machine can build for `component`, the fp32 ONNX Runtime reference first.
    int8 only with `calibrate` and where calibration fits in `memory_bytes` (None: do not check)."""
    calibrate = calibrate and calibration_fits(record, memory_bytes)
    found = []
    for backend in cpu_backends():
        mod = backend_module(backend)
        for p in mod.ALLOWED[component]:
            if p in QUANTIZED and (p != Precision.INT8 or not calibrate):
                continue
            if p in (Precision.BF16, Precision.FP16) and p.value not in typed_dtypes_here(target):
                continue
            if any(machine.library_version(lib) is None for lib in mod.PRECISION_LIBRARIES.get(p, ())):
                continue  # e.g. int8w without NNCF
            needs_variant = p in mod.TYPED_PRECISIONS and p not in mod.VARIANT_OPTIONAL
            if needs_variant and p.value not in record.get("variants", {}):
                continue  # not exported (`sprintrt export --dtypes`)
            found.append(EngineChoice(backend, p))
    found.sort(key=lambda c: c != QUALITY_REFERENCE)
    return found


def tuning_key(component: str, record: dict, cands: list[EngineChoice], target: dict, calibration: str | None,
               size: int, exhaustive: bool = False) -> str:
    """Everything that changes the measurement: machine, libraries, source graphs, candidates, calibration, int8 recipe,
    size, gate and screening."""
    libraries = {}
    for backend in cpu_backends():  # each backend's library and those that decide some of its engines (int8w: NNCF)
        mod = backend_module(backend)
        for lib in (mod.LIBRARY, *(lib for libs in mod.PRECISION_LIBRARIES.values() for lib in libs)):
            libraries[lib] = machine.library_version(lib)
    from sprintrt.engines.quantize import QUANTIZABLE, recipe_label

    sources = {"fp32": record["sha256"], **{d: v["sha256"] for d, v in record.get("variants", {}).items()}}
    # the int8 recipe (its rules are hashed into its label) and each backend's build revisions (e.g. ONNX Runtime's
    # int8 activations made uint8 at its build): both change what a candidate measures
    recipe = recipe_label("int8", target, component, calibration) if calibration and component in QUANTIZABLE else None
    revisions = {b: sorted((p.value, r) for p, r in backend_module(b).KEY_REVISIONS.items()) for b in cpu_backends()}
    text = json.dumps([component, target, libraries, sources, [c.name for c in cands], calibration, recipe, revisions,
                       size, TUNE_MIN_COSINE, IMAGE_MIN_PSNR_DB if component in S.PICTURE_OUTPUT_RANGE else None,
                       None if exhaustive else [TUNE_SCREEN_DIVISOR, TUNE_LEADER_RATIO, TUNE_DROP_RATIO,
                                                TUNE_PROBE_MIN_COSINE, TUNE_SCREEN_RULES]],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def timing_feeds(engine_dir: Path, components, sizes: list[int]) -> tuple[dict, dict]:
    """({size: {component: the inputs it gets in one {size}² call of the default prompt (1 step)}}, {size:
    {component: what the engine gave back for them}}); the ControlNet's two components in one ControlNet call of
    the same size (control_picture). The VAE encoder, which a text-to-image call does not run, has no outputs
    here. The engines are loaded once for every size (at real size the text encoder's alone is 8 GB)."""
    from sprintrt.runtime.controlnet import SprintControlNetPipeline
    from sprintrt.runtime.image import control_picture, preprocess_image
    from sprintrt.runtime.pipeline import SprintPipeline

    built = read_manifest(engine_dir).components
    controlled = [c for c in (S.CONTROLNET, S.CONTROLLED_TRANSFORMER) if c in components]
    if controlled and not all(c in built for c in S.CONTROLNET_TO_IMAGE):
        raise InvalidInputError(f"tuning {controlled} needs engines of {list(S.CONTROLNET_TO_IMAGE)} to run a ControlNet "
                                "call. Fix: export the VAE encoder too (the default), or leave the ControlNet out")
    if controlled:
        cn = SprintControlNetPipeline.from_engines(engine_dir, components=[
            c for c in S.COMPONENTS if c in (*S.TEXT_TO_IMAGE, *S.CONTROLNET_TO_IMAGE)])
        pipe = cn.text_to_image()
    else:
        pipe = SprintPipeline.from_engines(engine_dir)
    by_size, outputs_by_size = {}, {}
    for size in dict.fromkeys(sizes):
        call = dict(num_inference_steps=1, intermediate_timesteps=None, height=size, width=size,
                    use_resolution_binning=False, generator=0)
        with recording(pipe, S.TEXT_TO_IMAGE, outputs=True) as recorders:
            picture = pipe(DEFAULT_PROMPT, **call, output_type="np").images
        # The last call of each: the text encoder's first call runs the instruction alone (computed once, then
        # reused), its last the prompt's own tokens after it, as every later image does.
        calls = {c: r.calls[-1] for c, r in recorders.items()}
        if controlled:
            with recording(cn, controlled, outputs=True) as recorders:
                cn(DEFAULT_PROMPT, control_image=control_picture(size, size), **call, output_type="latent")
            calls.update({c: r.calls[-1] for c, r in recorders.items()})
        by_size[size] = {c: feeds for c, (feeds, _) in calls.items()}
        outputs_by_size[size] = {c: outputs for c, (_, outputs) in calls.items()}
        if S.VAE_ENCODER in components:  # what img2img would encode: that call's picture, prepared as img2img does
            by_size[size][S.VAE_ENCODER] = {"sample": preprocess_image("array", picture.transpose(0, 3, 1, 2), size,
                                                                       size)}
    for c in {*S.TEXT_TO_IMAGE, *(S.CONTROLNET_TO_IMAGE if controlled else ())}:
        (cn if controlled else pipe).engine(c).release()
    return by_size, outputs_by_size


def measure(engine, feeds: dict, give_up_after: float | None = None) -> tuple[float, dict]:
    """(median seconds per call after one warm-up call, the outputs of the warm-up call). A first timed call
    longer than `give_up_after` seconds is the answer alone: that candidate has lost (TUNE_DROP_RATIO)."""
    outputs = engine(**feeds)
    times: list[float] = []
    while len(times) < TUNE_MIN_RUNS or (len(times) < TUNE_MAX_RUNS and sum(times) < TUNE_MIN_SECONDS):
        t0 = time.perf_counter()
        engine(**feeds)
        times.append(time.perf_counter() - t0)
        if give_up_after is not None and times[0] > give_up_after:
            break
    return statistics.median(times), outputs


def screening_size(size: int, vae_scale_factor: int) -> int:
    """The side of the screening call: TUNE_SCREEN_DIVISOR times smaller, on the latent grid."""
    return max(vae_scale_factor, size // TUNE_SCREEN_DIVISOR // vae_scale_factor * vae_scale_factor)


def _same_shapes(a: dict, b: dict) -> bool:
    return all(getattr(a[k], "shape", None) == getattr(b[k], "shape", None) for k in a)


def _same_inputs(a: dict, b: dict) -> bool:
    return a is b or all(np.array_equal(a[k], b[k]) for k in a)


class _Eta:
    """Progress with an estimate of the time left. Steps are of kinds with very different costs: those that
    quantize a component (the first int8 candidate of each: calibration and the Q/DQ graph, minutes at real size),
    those that write its uniform speed-probe graph (one sample's ranges, no measurement), and the others (a build
    and a timing). A step is a kind, or (kind, size) where its cost grows with a size: a quantization's and a
    probe's with the component's weights (`_kinds`). Each kind's expected cost per unit of size is that of its own
    steps done so far (a kind with none done yet is left out: the estimate says "at least"). Measured at real size
    (AMX Xeon): the transformer's measured int8 with the calibration took 9 min for 2.4 GB of weights, the decoder's
    1.9 min for 0.7 GB, which a mean per step had put at 9 min as well."""

    def __init__(self, kinds: list, say):
        self.kinds, self.say, self.t0 = [self._sized(k) for k in kinds], say, time.perf_counter()
        self.took: dict[str, list[tuple[float, float]]] = {}  # kind -> (seconds, size) of each step done

    @staticmethod
    def _sized(kind) -> tuple[str, float]:
        return kind if isinstance(kind, tuple) else (kind, 1.0)

    def expect(self, kinds: list) -> None:
        """The steps still to come are now these (a screen dropped some)."""
        self.kinds = self.kinds[:self.done] + [self._sized(k) for k in kinds]

    @property
    def done(self) -> int:
        return sum(len(t) for t in self.took.values())

    def __call__(self, msg: str) -> None:
        left, unknown = 0.0, False
        for kind, size in self.kinds[self.done:]:
            seen = self.took.get(kind)
            left += size * sum(s for s, _ in seen) / max(sum(z for _, z in seen), 1e-9) if seen else 0.0
            unknown = unknown or not seen
        text = ""
        if self.done and left:
            about = "at least" if unknown else "about"
            text = f", {about} {left / 60:.0f} min left" if left >= 60 else f", {about} {left:.0f} s left"
        self.say(f"[{self.done + 1}/{len(self.kinds)}{text}] {msg}")

    def skip(self) -> None:
        """The next step will not run (a rule made it unnecessary)."""
        del self.kinds[self.done]

    def step(self) -> None:
        now = time.perf_counter()
        kind, size = self.kinds[self.done]
        self.took.setdefault(kind, []).append((now - self.t0, size))
        self.t0 = now


def gate(component: str, outputs: dict, reference: dict) -> dict:
    """The quality gate's measurements of a candidate's outputs against the reference's and its verdict: the
    lowest cosine over the outputs (>= TUNE_MIN_COSINE), and for a component whose output is the picture its
    PSNR too (>= IMAGE_MIN_PSNR_DB)."""
    row = {"cosine": round(min(cosine(outputs[name], ref) for name, ref in reference.items()), 6)}
    passed = row["cosine"] >= TUNE_MIN_COSINE
    peak = S.PICTURE_OUTPUT_RANGE.get(component)
    if peak:
        row["psnr_db"] = round(min(psnr(outputs[name], ref, peak=peak) for name, ref in reference.items()), 2)
        passed = passed and row["psnr_db"] >= IMAGE_MIN_PSNR_DB
    return {**row, "passed": bool(passed)}


def tune_engines(onnx_dir: str | Path, engine_dir: str | Path, components=None, candidate_names=None,
                 calibrate: bool = True, prompts_file: str | Path | None = None,
                 count: int = DEFAULT_CALIBRATION_COUNT, size: int = DEFAULT_CALIBRATION_SIZE, rebuild: bool = False,
                 exhaustive: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Build engine_dir with the fastest candidate per component that passes the quality gate.

    Args:
        components: which to tune (default: every component the export holds).
        candidate_names: e.g. ["ort:fp32", "ov:int8"] for every component, or {component: [...]};
            default: every candidate this machine can build (see `candidates`).
        calibrate: include int8 candidates (calibrated on `count` prompts of `prompts_file`, as
            `sprintrt build --precision int8` does).
        size: the square image size whose pipeline inputs the candidates are timed on.
        exhaustive: time and gate every candidate at `size` and calibrate every int8 one (default: screen them
            at a quarter of the pixels first and time only the leaders at `size`, and screen int8 candidates
            as uncalibrated probes before calibrating; see TUNE_LEADER_RATIO, TUNE_PROBE_MIN_COSINE).
    """
    from filelock import FileLock

    from sprintrt.prompts import read_prompts
    from sprintrt.tuning.calibration import calibration_description

    say = progress or (lambda msg: None)
    onnx_dir, engine_dir = Path(onnx_dir), Path(engine_dir)
    info = read_export_info(onnx_dir)
    components = tuple(c for c in S.COMPONENTS if c in info["components"]) if components is None else tuple(components)
    missing = [c for c in components if c not in info["components"]]
    if missing:
        raise InvalidInputError(f"{onnx_dir} has no export of {missing}. Fix: `sprintrt export MODEL -o {onnx_dir}`")
    target = machine.cpu_target()
    prompts = read_prompts(prompts_file)[:count]
    description = calibration_description(prompts_file, prompts, DEFAULT_CALIBRATION_SIZE, "int8")
    plan, skipped = _plan(info, components, candidate_names, calibrate, target, description, size, exhaustive)

    engine_dir.mkdir(parents=True, exist_ok=True)
    scratch = engine_dir.with_name(f".{engine_dir.name}.tune")
    with FileLock(str(engine_dir / ".build.lock")):
        old = read_existing(engine_dir, info)
        todo = [c for c in components if rebuild or not _reusable(engine_dir, old.get(c), plan[c][1])]
        for comp in components:
            if comp not in todo:
                say(f"{comp}: reusing the tuned {old[comp]['backend']} {old[comp]['precision']} engine")
        if not todo:
            return engine_dir
        shutil.rmtree(scratch, ignore_errors=True)
        _check_disk(engine_dir, info, todo)
        try:
            with hashes_remembered():  # every candidate's build checks the same sources
                entries = _tune(onnx_dir, scratch, info, todo, plan, prompts, description, size, exhaustive, say)
            for comp, note in skipped.items():
                if comp in entries:
                    entries[comp]["tuning"]["skipped"] = note
            for comp, entry in entries.items():  # the chosen engine's files move into the engine directory
                src = entry.pop("_dir")
                for f in engine_files(entry):
                    shutil.move(str(src / f["file"]), engine_dir / f["file"])
            write_manifest(onnx_dir, engine_dir, info, {**old, **entries})
            shutil.rmtree(scratch, ignore_errors=True)  # first: at real size it holds tens of GB
            # The chosen engines fill their compiled-model cache (OpenVINO's blobs) where they will be loaded from:
            # the candidates had none (CANDIDATE_LOAD).
            manifest = read_manifest(engine_dir)
            for comp, entry in entries.items():
                if entry.get("cache_dir"):
                    say(f"{comp}: compiling the {entry['backend']} engine into its blob cache")
                    load_engine(manifest, comp).release()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return engine_dir


def _check_disk(engine_dir: Path, info: dict, todo: list[str]) -> None:
    """Refuse, before any work, a run whose scratch directory would not fit on the engine directory's disk
    (TUNE_DISK_FACTOR): the reference engines of every exported component, and the candidates of those tuned."""
    every = sum(weights_bytes(record) for record in info["components"].values())
    needed = every + (TUNE_DISK_FACTOR - 1) * sum(weights_bytes(info["components"][c]) for c in todo)
    free = shutil.disk_usage(engine_dir).free
    if free < needed:
        raise OutOfSpaceError(f"tuning {', '.join(todo)} needs about {needed / 2**30:.1f} GB free beside "
                              f"{engine_dir} (the candidates' engines while they are timed; {every / 2**30:.1f} GB of "
                              f"fp32 weights exported), and its disk has {free / 2**30:.1f} GB. Fix: free space there, "
                              "build into a directory on a larger disk (-o), or tune fewer components at a time")


def _plan(info: dict, components, candidate_names, calibrate: bool, target: dict, description: str,
          size: int, exhaustive: bool = False) -> tuple[dict, dict]:
    """({component: (candidates, tuning key)}, {component: why int8 was left out}); refuses, before any
    work, candidate names this machine cannot build."""
    plan, used, skipped = {}, set(), {}
    per_component = isinstance(candidate_names, dict)
    memory = machine.memory_bytes()
    for comp in components:
        record = info["components"][comp]
        available = candidates(comp, record, target, calibrate, memory)
        wanted = candidate_names.get(comp) if per_component else candidate_names
        if wanted is not None:
            chosen = [parse_candidate(n) for n in wanted]
            unknown = [c.name for c in chosen if c not in available]
            if unknown and per_component:
                raise InvalidInputError(f"candidates {unknown} cannot be built for {comp} here: expected some of "
                                        f"{[c.name for c in available]}. Fix: name only those")
            available = [a for a in available if a in chosen or a == QUALITY_REFERENCE]
        used |= set(available)
        uses_int8 = any(c.precision in QUANTIZED for c in available)
        plan[comp] = (available, tuning_key(comp, record, available, target, description if uses_int8 else None, size,
                                            exhaustive))
        if calibrate and not calibration_fits(record, memory) and \
                any(Precision.INT8 in backend_module(b).ALLOWED[comp] for b in cpu_backends()):
            gb = weights_bytes(record) / 2**30
            skipped[comp] = (f"int8 skipped: calibrating {gb:.1f} GB of weights needs about "
                             f"{CALIBRATION_MEMORY_FACTOR * gb:.0f} GB, this machine has {memory / 2**30:.0f} GB")
    if candidate_names is not None and not per_component:  # a candidate no component can use is a mistake
        unusable = [n for n in candidate_names if parse_candidate(n) not in used]
        if unusable:
            raise InvalidInputError(f"candidates {unusable} cannot be built for any of {list(components)} here. "
                                    "Fix: name candidates this machine has (`sprintrt doctor` lists them)")
    return plan, skipped


def _reusable(engine_dir: Path, entry: dict | None, key: str) -> bool:
    return entry is not None and entry.get("tuning", {}).get("key") == key and intact(engine_dir, entry)


def _tune(onnx_dir: Path, scratch: Path, info: dict, todo: list[str], plan: dict, prompts: list[str],
          description: str, size: int, exhaustive: bool, say) -> dict:
    """Float candidates first (the best of them is what int8 must beat), then, unless `exhaustive`, one
    uncalibrated speed probe per int8 candidate (`_Trials.probe`), then calibration, for the components whose
    int8 survived, and the int8 candidates."""
    from sprintrt.tuning.calibration import lazy_calibration

    ref_dir = _candidate_dir(scratch, QUALITY_REFERENCE)
    reference = tuple(c for c in S.COMPONENTS if c in info["components"])
    say("fp32 ONNX Runtime reference engines")
    build_engines(onnx_dir, ref_dir, backend=QUALITY_REFERENCE.backend, precision=QUALITY_REFERENCE.precision,
                  components=reference, compiled_cache=CANDIDATE_LOAD.compiled_cache)
    screen = size if exhaustive else screening_size(size, info["model_dims"]["vae_scale_factor"])
    say(f"recording each component's inputs in one {size}x{size} call"
        + (f" and one {screen}x{screen} call" if screen < size else ""))
    by_size, recorded = timing_feeds(ref_dir, todo, [size, screen])
    feeds, screen_feeds = by_size[size], by_size[screen]
    by_candidate: dict[EngineChoice, list[str]] = {}  # the reference first: the others are compared with it
    for comp in todo:
        for cand in sorted(plan[comp][0], key=lambda c: (c != QUALITY_REFERENCE, c.precision in QUANTIZED)):
            by_candidate.setdefault(cand, []).append(comp)
    steps = [(cand, comp) for cand, comps in by_candidate.items() for comp in comps]
    # A backend's 16-bit candidates before its fp32 one, which they can make unnecessary (`_Trials.dominated`).
    floats = sorted([(cand, comp) for cand, comp in steps if cand.precision not in QUANTIZED],
                    key=lambda step: (step[0] != QUALITY_REFERENCE, step[0].precision == Precision.FP32))
    quantized = [(cand, comp) for cand, comp in steps if cand.precision in QUANTIZED]
    probing = not exhaustive
    eta = _Eta([*_kinds(floats, info), *(_kinds(quantized, info, "probe") if probing else ()),
                *_kinds(quantized, info)], say)
    trials = _Trials(onnx_dir, scratch, ref_dir, feeds, screen_feeds, screen, size, eta, todo,
                     info["model_dims"]["vae_scale_factor"], recorded[size])
    for cand, comp in floats:
        if probing and trials.dominated(cand, comp):
            eta.skip()
            continue
        trials.run(cand, comp)
    if probing and quantized:
        quantized = [(cand, comp) for cand, comp in quantized if trials.probe(cand, comp)]
        shutil.rmtree(scratch / "probe", ignore_errors=True)
        eta.expect(_kinds(quantized, info))
    feeds_of = lazy_calibration(onnx_dir, ref_dir, sorted({comp for _, comp in quantized}), prompts,
                                DEFAULT_CALIBRATION_SIZE, say=say, reuse=True)
    for cand, comp in quantized:
        trials.run(cand, comp, {comp: (description, feeds_of(comp))})
    entries = {}
    for comp in todo:
        trials.settle(comp)  # the reference, if it is still the best untimed
        choice = trials.best[comp]  # the reference always passes against itself
        entry = dict(choice["_entry"], _dir=choice["_dir"])
        entry["tuning"] = {"key": plan[comp][1], "size": size, "screen_size": screen, "min_cosine": TUNE_MIN_COSINE,
                           **({"min_psnr_db": IMAGE_MIN_PSNR_DB} if comp in S.PICTURE_OUTPUT_RANGE else {}),
                           "chosen": choice["candidate"], "candidates": trials.tables[comp]}
        say(f"{comp}: {choice['candidate']} ({choice['seconds']:.3f} s)")
        entries[comp] = entry
    return entries


def _kinds(steps: list[tuple[EngineChoice, str]], info: dict, first: str = "quantize") -> list:
    """Each step's kind for the ETA (_Eta): a quantized candidate's first step for its component writes its Q/DQ
    graph (`first`: "quantize" calibrated, "probe" uniform), minutes at real size, sized by the component's weights
    in GB; every other step is a run (a build and a timing, whose cost the activations share with the weights)."""
    seen: set[str] = set()
    kinds = []
    for cand, comp in steps:
        writes = cand.precision in QUANTIZED and comp not in seen
        seen |= {comp} if writes else set()
        kinds.append((first, weights_bytes(info["components"][comp]) / 2**30) if writes else "run")
    return kinds


class _Trials:
    """The candidates tried so far: a table of rows per component, the fastest passing one (`best`: its files
    are the only ones kept) and the reference's outputs every other candidate is gated on."""

    def __init__(self, onnx_dir: Path, scratch: Path, ref_dir: Path, feeds: dict, screen_feeds: dict, screen: int,
                 size: int, eta: "_Eta", components, vae_scale_factor: int, recorded: dict | None = None):
        self.onnx_dir, self.scratch, self.ref_dir, self.eta = onnx_dir, scratch, ref_dir, eta
        self.feeds, self.screen_feeds, self.screen, self.size = feeds, screen_feeds, screen, size
        self.vae_scale_factor = vae_scale_factor
        self.tables: dict[str, list[dict]] = {c: [] for c in components}
        # The reference's outputs on `feeds`: those the recording call gave (`recorded`), the others its first run's.
        self.references: dict[str, dict] = {c: o for c, o in (recorded or {}).items() if c in self.tables}
        self.screen_references: dict[str, dict] = {}  # the reference's outputs at the screening size
        self.best: dict[str, dict] = {}
        self.probes: dict[tuple[EngineChoice, str], dict] = {}  # the int8 probes that kept their candidate

    def run(self, cand: EngineChoice, comp: str, calibration: dict | None = None) -> None:
        """Build `cand` for `comp`, time and gate it, keep it if it is the fastest passing one so far."""
        # One directory per candidate and component, deleted as soon as it loses: at real size every
        # engine is 1-16 GB, and keeping them all until the end filled a 50 GB disk (measured).
        is_reference = cand == QUALITY_REFERENCE
        cand_dir = self.ref_dir if is_reference else _candidate_dir(self.scratch, cand) / comp
        row = {"candidate": cand.name, **({"probe": self.probes[cand, comp]} if (cand, comp) in self.probes else {})}
        try:
            if not is_reference:
                self.eta(f"building {cand.name} for {comp}")
                build_engines(self.onnx_dir, cand_dir, backend=cand.backend, precision={comp: cand.precision},
                              components=(comp,), calibration=calibration, qdq_cache=self.scratch / "qdq",
                              progress=self._quantizer_steps, compiled_cache=CANDIDATE_LOAD.compiled_cache)
            manifest = read_manifest(cand_dir)
        except OutOfSpaceError:  # every later candidate would fail alike: stop (the scratch directory is removed)
            raise
        except (SprintError, RuntimeError, OSError) as e:  # a candidate that cannot be built is recorded
            self.tables[comp].append({**row, "error": f"build failed: {e}"[:300], "passed": False})
            shutil.rmtree(cand_dir, ignore_errors=True)
            self.eta.step()
            return
        try:
            engine = load_engine(manifest, comp, CANDIDATE_LOAD)
            row.update(_time_and_gate(engine, comp, self.feeds[comp], self.screen_feeds[comp], self.screen,
                                      self.size, self.best.get(comp), self.references, self.screen_references,
                                      self.eta))
        except (SprintError, RuntimeError, ValueError) as e:
            if is_reference:  # every other candidate is gated on its outputs
                raise EngineBuildError(f"the fp32 ONNX Runtime reference engine of {comp} failed to run ({e}), so no "
                                       "candidate can be gated. Fix: check the export with `sprintrt doctor`, or "
                                       "re-export the component") from e
            row.update(error=f"run failed: {e}"[:300], passed=False)
        self.eta.step()
        self.tables[comp].append(row)
        if row["passed"] and not is_reference:
            self.settle(comp, rival=row)
        best = self.best.get(comp)
        if row["passed"] and (best is None or row["seconds"] < best["seconds"]):
            loser, self.best[comp] = best, dict(row, _entry=dict(manifest.components[comp]), _dir=cand_dir)
        else:
            loser = dict(row, _dir=cand_dir)
        if loser is not None and loser["_dir"] != self.ref_dir:  # the reference serves calibration until the end
            shutil.rmtree(loser["_dir"], ignore_errors=True)

    def settle(self, comp: str, rival: dict | None = None) -> None:
        """Time the reference at the tuning size where it is the best so far but was only timed at the screening
        size (`_time_and_gate`): against `rival`, a candidate that passed at the tuning size, only where the screen
        leaves the reference a leader (within TUNE_LEADER_RATIO of the rival there), or else it is dropped as any
        candidate would be; without one, because it is the choice. Measured at real size (0.6B, 2-vCPU Intel Xeon
        with AMX), timing the reference at 512² and 256² took 8.5 s for the transformer and 33.6 s for the VAE
        decoder, which OpenVINO bf16 then beat by 3.2x and 5.5x at 256²."""
        best = self.best.get(comp)
        if best is None or "seconds" in best:
            return
        row = next(r for r in self.tables[comp] if r["candidate"] == QUALITY_REFERENCE.name)
        if rival is not None and best["screen_seconds"] > TUNE_LEADER_RATIO * rival["screen_seconds"]:
            ratio = best["screen_seconds"] / rival["screen_seconds"] if rival["screen_seconds"] else float("inf")
            row.update(passed=False, dropped=f"{ratio:.2f}x the best at {self.screen}x{self.screen}")
            del self.best[comp]  # its directory stays: the reference serves calibration until the end
            return
        self.eta.say(f"timing the reference {QUALITY_REFERENCE.name} for {comp} at {self.size}x{self.size}")
        engine = load_engine(read_manifest(self.ref_dir), comp, CANDIDATE_LOAD)
        try:
            seconds, _ = measure(engine, self.feeds[comp])
        finally:
            engine.release()
        row["seconds"] = best["seconds"] = round(seconds, 4)

    def _quantizer_steps(self, comp: str, what: str) -> None:
        """The quantizer's steps under the step that builds the candidate (its own line says "building")."""
        if what not in ("building", "reused"):
            self.eta.say(f"  {what}")

    def dominated(self, cand: EngineChoice, comp: str) -> bool:
        """Whether `cand`, an fp32 engine, need not be built because a 16-bit engine of the same backend passed
        the gate for `comp` (recorded as a row that says so). In practice OpenVINO fp32 after OpenVINO bf16 (ONNX
        Runtime's fp32 is the reference, always built). The tuner offers a 16-bit candidate only on a CPU that
        computes in that type (`typed_dtypes_here`), and there, at the real sizes, OpenVINO's bf16 engine has been
        faster than its fp32 one in every measurement: at 512², 1.6-2.6x on a Zen 5 EPYC (text encoder,
        transformer, decoder) and 2.8-3.6x on an AMX Xeon (VAE encoder, ControlNet, controlled transformer),
        seconds in the README. A heuristic like the screens (`--exhaustive` checks it);
        the fp32 reference is always built."""
        if cand.precision != Precision.FP32 or cand == QUALITY_REFERENCE:
            return False
        typed_names = {EngineChoice(cand.backend, p).name for p in (Precision.BF16, Precision.FP16)}
        typed = next((row["candidate"] for row in self.tables[comp] if row["passed"] and row["candidate"] in typed_names),
                     None)
        if typed is None:
            return False
        self.tables[comp].append({"candidate": cand.name, "passed": False,
                                  "skipped": f"{typed} passed the gate, and on this CPU a backend's 16-bit engine "
                                             "is faster than its fp32 one"})
        return True

    def probe(self, cand: EngineChoice, comp: str) -> bool:
        """Whether `cand`'s int8 engine of `comp` can be a leader, asked before calibrating anything.

        Speed: an int8 engine's speed does not depend on its ranges, and the calibrated graph quantizes at most
        the layers the uniform recipe does (a measured recipe keeps some in float), so the uniform Q/DQ graph
        with ranges from the screening call's own inputs is as fast as the calibrated one can be. It is
        screened like any candidate; more than TUNE_LEADER_RATIO slower than the best float one, the candidate
        is dropped without the calibration and quantization that cost minutes at real size (measured on the
        AMX Xeon: 4 int8 quantizations were 16 of a 32 min run, and all four lost).

        Both are heuristics, as the reduced-size screen is (`--exhaustive` checks them). Speed: the probe is a
        lower bound where a measured recipe's float blocks are no faster than their int8 versions. Quality,
        where the recipe is not measured (the text encoder's; the VAEs' and the transformer family's calibrated
        recipes keep their sensitive blocks in float): the probe is then the calibrated recipe itself, its weights
        quantized the same way, its activation ranges the smallest that cover this very input, so its steps are as
        fine as a min/max calibration that covers this input can give (calibrated ranges may clip it instead, and
        the probe is gated at the screening size): a probe below TUNE_PROBE_MIN_COSINE is dropped (at real size
        the text encoder's probe scored 0.99845, its calibrated engine 0.99670; see sprintrt/defaults.py). A probe
        that fails to build or run proves nothing: the candidate is then built and timed as usual."""
        from sprintrt.engines.quantize import measured
        from sprintrt.tuning.calibration import cropped_like_calibration

        best = self.best.get(comp)
        if best is None:  # no float candidate passed: nothing to screen against
            return True
        probe_dir = _candidate_dir(self.scratch / "probe", cand) / comp
        self.eta(f"probing {cand.name} for {comp} (uniform int8, not calibrated)")
        feed = cropped_like_calibration(comp, self.screen_feeds[comp], self.vae_scale_factor)
        try:
            build_engines(self.onnx_dir, probe_dir, backend=cand.backend, precision={comp: cand.precision},
                          components=(comp,), calibration={comp: (PROBE_CALIBRATION, [feed])},
                          qdq_cache=self.scratch / "probe" / "qdq", uniform_int8=True,
                          compiled_cache=CANDIDATE_LOAD.compiled_cache)
            engine = load_engine(read_manifest(probe_dir), comp, CANDIDATE_LOAD)
            try:
                seconds, outputs = measure(engine, self.screen_feeds[comp],
                                           give_up_after=TUNE_DROP_RATIO * best["screen_seconds"])
            finally:
                engine.release()
            cos = None if measured(cand.precision.value, comp) else \
                gate(comp, outputs, self.screen_references[comp])["cosine"]
        except OutOfSpaceError:
            raise
        except (SprintError, RuntimeError, OSError, ValueError) as e:
            self.eta.say(f"the probe of {cand.name} for {comp} failed ({str(e)[:200]}): calibrating it anyway")
            return True
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
            self.eta.step()
        row = {"candidate": cand.name, "screen_seconds": round(seconds, 4), "passed": False}
        ratio = seconds / best["screen_seconds"]
        if ratio > TUNE_LEADER_RATIO:
            row["dropped"] = (f"its uncalibrated uniform-int8 probe was {ratio:.2f}x the best at "
                              f"{self.screen}x{self.screen}; not calibrated")
        elif cos is not None and cos < TUNE_PROBE_MIN_COSINE:
            row.update(cosine=cos, dropped=f"its uniform-int8 probe, its ranges taken from this very input, had "
                                           f"cosine {cos:.6f} < {TUNE_PROBE_MIN_COSINE:g}; not calibrated")
        else:  # kept with the candidate's row: how the probe compared with the calibrated engine
            self.probes[(cand, comp)] = {"screen_seconds": round(seconds, 4), **({"cosine": cos} if cos is not None else {})}
            return True
        self.tables[comp].append(row)
        return False


def _time_and_gate(engine, comp: str, feeds: dict, screen_feeds: dict, screen: int, size: int, best: dict | None,
                   references: dict, screen_references: dict, say) -> dict:
    """One candidate's row: screened at `screen`² first where that changes the inputs' shapes (a candidate
    more than TUNE_LEADER_RATIO slower there than the best passing one is dropped), then timed and gated on
    the `size`² inputs. The first candidate of each component is the reference the others are gated on: where
    its outputs on the `size`² inputs are known already (`references`) and the screen changes the shapes, it is
    timed at `screen`² alone (no "seconds" in its row), its time at `size`² left to `_Trials.settle`."""
    row: dict = {}
    try:
        if best is None and comp in references and not _same_shapes(feeds, screen_feeds):
            say(f"timing {comp} at {screen}x{screen}")
            screen_seconds, screen_outputs = measure(engine, screen_feeds)
            screen_references.setdefault(comp, screen_outputs)
            return {"screen_seconds": round(screen_seconds, 4), **gate(comp, references[comp], references[comp])}
        if best is not None and not _same_shapes(feeds, screen_feeds):
            say(f"screening {comp} at {screen}x{screen}")
            give_up = TUNE_DROP_RATIO * best["screen_seconds"]
            row["screen_seconds"] = round(measure(engine, screen_feeds, give_up_after=give_up)[0], 4)
            if row["screen_seconds"] > TUNE_LEADER_RATIO * best["screen_seconds"]:
                ratio = row["screen_seconds"] / best["screen_seconds"]
                return {**row, "passed": False, "dropped": f"{ratio:.2f}x the best at {screen}x{screen}"}
        say(f"timing {comp} at {size}x{size}")
        # not when exhaustive, nor against a reference not timed at this size yet
        give_up = TUNE_DROP_RATIO * best["seconds"] if best and "seconds" in best and screen < size else None
        seconds, outputs = measure(engine, feeds, give_up_after=give_up)
        if best is None and not _same_shapes(feeds, screen_feeds):  # the first passing row sets the screen's pace
            screen_seconds, screen_outputs = measure(engine, screen_feeds)
            row["screen_seconds"] = round(screen_seconds, 4)
            screen_references.setdefault(comp, screen_outputs)
        elif best is None and not _same_inputs(feeds, screen_feeds):
            screen_references.setdefault(comp, engine(**screen_feeds))
        row.setdefault("screen_seconds", round(seconds, 4))  # the inputs do not depend on the size
    finally:
        engine.release()
    references.setdefault(comp, outputs)  # the reference candidate comes first
    screen_references.setdefault(comp, outputs)  # (where the screening inputs are these same inputs)
    return {**row, "seconds": round(seconds, 4), **gate(comp, outputs, references[comp])}


def _candidate_dir(scratch: Path, cand: EngineChoice) -> Path:
    return scratch / f"{cand.backend}-{cand.precision.value}"
