"""The `sprintrt` command: a thin layer over the library, one subcommand per stage.

Each subcommand imports its stage inside the handler, so `sprintrt generate` on a production box
loads neither torch nor diffusers. Typed errors print as one line (what, expected, fix) and exit 2.
Every default comes from the library (the option dataclasses, the pipeline's call signature,
sprintrt/defaults.py); none is written here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import sys
import time
from pathlib import Path

from sprintrt import defaults as D
from sprintrt.errors import InvalidInputError, Notice, SprintError
from sprintrt.quiet import stdout_to_stderr
from sprintrt.quiet import quiet_libraries as _quiet_libraries


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, soft_wrap=True)  # a path is not broken across lines in a log


class _ProgressLines:
    """A long stage's progress where no spinner can be drawn (stdout is a file or a pipe: CI, `> log`): one
    line on stderr per new step, with the seconds since the stage began, so a log shows where the time went.
    Nothing before the first step: a stage that fails at once leaves its one-line error alone on stderr."""

    def __init__(self, text: str):
        self.text, self.t0, self.last = text, time.perf_counter(), text

    def update(self, text: str) -> None:
        if text != self.last:
            self.last = text
            self.say(text)

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stage(text: str):
    """Run a long stage: a spinner on a terminal, else progress lines (both on stderr, both with `.update`).
    What libraries print meanwhile (Polygraphy's [W] lines, NNCF's tables, C++ logs) goes to stderr too, so
    stdout holds only sprintrt's own lines: where outputs went, and their tables."""
    with stdout_to_stderr() as real_stdout:
        if real_stdout.isatty() and sys.stderr.isatty():
            from rich.console import Console

            with Console(stderr=True, highlight=False).status(text) as status:
                yield status
        else:
            lines = _ProgressLines(text)
            yield lines
            lines.say(f"{text}: done")


def default(owner, name: str):
    """The default of a dataclass field or a function parameter `name` of `owner`."""
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(owner, inspect.Signature):
        return owner.parameters[name].default
    return inspect.signature(owner).parameters[name].default


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _int_list_item(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"{flag} item {value!r} is not an integer. Fix: e.g. {flag} 1,2") from None


# ---- make-checkpoint ---------------------------------------------------------------------------------

def add_make_checkpoint(sub) -> None:
    from sprintrt.export.checkpoint import make_checkpoint

    s = sub.add_parser("make-checkpoint", help="write a seeded random checkpoint in the diffusers layout")
    s.add_argument("out")
    s.add_argument("--arch", default=default(make_checkpoint, "arch"), choices=D.ARCHS)
    s.add_argument("--seed", type=int, default=default(make_checkpoint, "seed"))
    s.add_argument("--controlnet", action="store_true",
                   help="also write a seeded random SanaControlNetModel with the transformer's dims in controlnet/")
    s.set_defaults(fn=cmd_make_checkpoint)


def cmd_make_checkpoint(args) -> None:
    _quiet_libraries(args.verbose)
    from sprintrt.export.checkpoint import make_checkpoint

    with _stage(f"writing a seeded random {args.arch} checkpoint"):
        out = make_checkpoint(args.out, args.arch, args.seed, controlnet=args.controlnet)
    print(f"checkpoint ({args.arch}{', with a ControlNet' if args.controlnet else ''}, seed {args.seed}) written to {out}")


# ---- export ---------------------------------------------------------------------------------------

def add_export(sub) -> None:
    from sprintrt.specs import COMPONENTS

    s = sub.add_parser("export", help="export the text encoder, transformer, VAE decoder and VAE encoder to "
                                      "validated ONNX")
    s.add_argument("model", help="checkpoint directory or hub id")
    s.add_argument("-o", "--output", required=True, help="ONNX directory to write")
    s.add_argument("--components", help=f"comma-separated subset of {','.join(COMPONENTS)} (default: every "
                                        "component the model has; the last two need a ControlNet)")
    s.add_argument("--controlnet", default=None, metavar="PATH_OR_ID",
                   help="a SanaControlNetModel (directory or hub id) to export with the model (default: the "
                        "checkpoint's controlnet/ folder, if any); adds the controlnet and controlled_transformer")
    s.add_argument("--no-validate", action="store_true", help="skip the ONNX-vs-PyTorch check (not recommended)")
    s.add_argument("--dtypes", default=_csv(D.DEFAULT_EXPORT_DTYPES),
                   help=f"graphs to export per component, of {_csv(D.EXPORT_DTYPES)}: fp32 (always) and strongly typed "
                        "bf16/fp16 variants with fp32 islands, for TensorRT bf16/fp16, ONNX Runtime fp16 and OpenVINO "
                        "bf16 engines (default %(default)s)")
    s.add_argument("--vae", default=None, metavar="PATH_OR_ID",
                   help="a drop-in AutoencoderDC to export instead of the checkpoint's VAE decoder, e.g. "
                        "mit-han-lab/dc-ae-lite-f32c32-sana-1.1-diffusers (a lighter decoder)")
    s.set_defaults(fn=cmd_export)


def cmd_export(args) -> None:
    _quiet_libraries(args.verbose)
    from sprintrt.export.onnx_export import export_model
    from sprintrt.export_info import read_export_info

    console = _console()
    components = args.components.split(",") if args.components else None
    with _stage("exporting") as status:
        out = export_model(args.model, args.output, **({"components": components} if components else {}),
                           validate=not args.no_validate, vae=args.vae, dtypes=args.dtypes,
                           controlnet=args.controlnet,
                           progress=lambda c: status.update(f"exporting and validating {c}"))
    info = read_export_info(out)
    for name, rec in info["components"].items():
        worst = max((r["max_abs"] for r in rec["validation"]), default=float("nan"))
        console.print(f"  {name}: {out / rec['file']}  ({rec['export_seconds']} s; max |onnx - torch| "
                      f"{worst:.2e} over {len(rec['validation'])} validation shapes)")
        for finding in rec.get("trt_lint", []):
            console.print(f"    TensorRT lint: {finding}")
        for dtype, v in rec.get("variants", {}).items():
            cos = min((r["cosine"] for r in v["validation"]), default=float("nan"))
            console.print(f"    {dtype}: {out / v['file']}  (cosine to PyTorch fp32 >= {cos:.6f}; fp32 islands: "
                          f"{v['fp32']['islands']})")
    print(f"ONNX files written to {out}")


# ---- build ----------------------------------------------------------------------------------------

def add_build(sub) -> None:
    from sprintrt.engines.build import build_engines
    from sprintrt.engines.profiles import ProfileOptions
    from sprintrt.engines.registry import ALIASES, AUTO, BUILD_BACKENDS

    s = sub.add_parser("build", help="build engines from an ONNX directory")
    s.add_argument("onnx_dir")
    s.add_argument("-o", "--output", required=True, help="engine directory to write")
    s.add_argument("--backend", default=default(build_engines, "backend"),
                   help=f"{' or '.join(BUILD_BACKENDS)} (or {', '.join(ALIASES)}), or {AUTO}: a GPU backend where its "
                        "GPU is present; on a CPU, every installed backend and precision timed per component, the "
                        "fastest that passes the quality gate kept (see --no-tune). Default %(default)s")
    s.add_argument("--no-tune", action="store_true",
                   help="with --backend auto: pick by rule of thumb instead of timing candidates")
    s.add_argument("--candidates", help="with --backend auto: the CPU candidates to time, e.g. ort:fp32,ov:fp32,ort:int8 "
                                        "(default: every one this machine can build)")
    s.add_argument("--tune-size", type=int, default=D.DEFAULT_CALIBRATION_SIZE,
                   help="with --backend auto: time candidates on the inputs of one SIZExSIZE call (default %(default)s)")
    s.add_argument("--exhaustive", action="store_true",
                   help="with --backend auto: calibrate and time every candidate at --tune-size (default: screen "
                        "them at half the side first, int8 ones as uncalibrated probes, and calibrate and time only "
                        "the leaders; slower, for checking the screened choice)")
    s.add_argument("--precision", default=None,
                   help="one precision for all (fp32, tf32, bf16, fp16; int8/fp8 quantize every component with a "
                        "recipe) or per component, e.g. transformer=fp16,vae_decoder=int8 (OpenVINO also "
                        "text_encoder=int8w: int8 weights, no calibration); default: the backend's "
                        "safe per-component choice")
    s.add_argument("--compute-capability", default=default(build_engines, "target"), metavar="CC[,CC...]",
                   help="tensorrt-rtx: the GPUs to build for, e.g. 8.6,8.9,12.0 (RTX 30xx, 40xx, 50xx; 7.5 only when "
                        "named); default: TensorRT-RTX's portable set. The other backends build for this machine")
    s.add_argument("--rebuild", action="store_true", help="rebuild even if an up-to-date engine exists")
    s.add_argument("--max-batch", type=int, default=default(ProfileOptions, "max_batch"),
                   help="TensorRT profile: largest batch (default %(default)s)")
    s.add_argument("--max-sequence-length", type=int, default=default(ProfileOptions, "max_sequence_length"),
                   help="TensorRT profile: prompt tokens (default %(default)s)")
    s.add_argument("--no-chi", action="store_true", help="TensorRT profile: prompts without the complex human instruction")
    s.add_argument("--static", help="TensorRT profile: one shape BATCHxHEIGHTxWIDTH, e.g. 1x1024x1024 (CUDA graphs)")
    s.add_argument("--calibration-prompts", help="int8/fp8: prompt file, one per line (default: the shipped prompts)")
    s.add_argument("--calibration-count", type=int, default=D.DEFAULT_CALIBRATION_COUNT,
                   help="int8/fp8: how many prompts (default %(default)s)")
    s.add_argument("--calibration-size", type=int, default=D.DEFAULT_CALIBRATION_SIZE,
                   help="int8/fp8: image size to calibrate at (default %(default)s)")
    s.set_defaults(fn=cmd_build)


def cmd_build(args) -> None:
    from sprintrt.engines.build import build_engines
    from sprintrt.engines.doctor import tuning_table
    from sprintrt.engines.precision import PrecisionRequest
    from sprintrt.engines.profiles import ProfileOptions
    from sprintrt.engines.registry import AUTO, auto_backend, tunes_here
    from sprintrt.manifest import read_manifest

    _quiet_libraries(args.verbose)
    console = _console()
    profile = ProfileOptions(max_batch=args.max_batch, max_sequence_length=args.max_sequence_length,
                             complex_human_instruction=not args.no_chi, static=_parse_static(args.static))
    request = PrecisionRequest.parse(args.precision)  # a bad --precision fails here, before any work
    backend = auto_backend() if args.backend == AUTO else args.backend
    tune = args.backend == AUTO and not args.no_tune and not request and tunes_here(backend)
    before = _engine_files(args.output)
    with _stage("building engines") as status:
        if tune:
            from sprintrt.tuning.tune import tune_engines

            out = tune_engines(args.onnx_dir, args.output, candidate_names=_list(args.candidates),
                               prompts_file=args.calibration_prompts, count=args.calibration_count,
                               size=args.tune_size, rebuild=args.rebuild, exhaustive=args.exhaustive,
                               progress=status.update)
        elif request.calibrates:
            from sprintrt.tuning.calibration import build_quantized_engines

            out = build_quantized_engines(args.onnx_dir, args.output, args.calibration_prompts, args.calibration_count,
                                          args.calibration_size, profile, progress=status.update,
                                          backend=backend, precision=request, target=args.compute_capability)
        else:
            out = build_engines(args.onnx_dir, args.output, backend=backend, precision=request,
                                rebuild=args.rebuild, profile=profile, target=args.compute_capability,
                                progress=lambda c, what: status.update(f"{c}: {what}"))
    manifest = read_manifest(out).data
    if tune:
        console.print(f"  tuned on this CPU ({args.tune_size}x{args.tune_size} pipeline inputs; median seconds per call):")
        for line in tuning_table(manifest):
            console.print(f"    {line}", soft_wrap=True)
    elif args.backend == AUTO:
        why = "--no-tune" if args.no_tune else "--precision given"
        console.print(f"  --backend auto chose {backend} "
                      f"({'rule of thumb, ' + why if tunes_here(backend) else 'a GPU backend whose GPU is here'})")
    after = _engine_files(out)
    reused = [name for name in manifest["components"] if before.get(name) is not None and before[name] == after.get(name)]
    for name, entry in manifest["components"].items():
        how = "reused" if name in reused else "built"
        console.print(f"  {name}: {out / entry['file']}  ({entry['backend']} {entry['precision']}, {how})")
    if len(reused) == len(manifest["components"]):
        print(f"engines in {out} reused: all up to date, none built (--rebuild builds them again)")
    else:
        print(f"engines and manifest written to {out} ({len(manifest['components']) - len(reused)} built, "
              f"{len(reused)} reused)")


def _engine_files(engine_dir) -> dict:
    """{component: (engine file, inode, mtime)} of an engine directory's manifest ({} if it has none). A rebuilt
    engine may keep its file name (it is derived from the engine's key), never its inode and mtime, so comparing
    before and after says what the build reused."""
    from sprintrt.manifest import read_manifest

    try:
        manifest = read_manifest(engine_dir)
    except SprintError:
        return {}
    files = {}
    for name in manifest.components:
        path = manifest.component_file(name)
        st = path.stat() if path.is_file() else None
        files[name] = (path.name, st.st_ino, st.st_mtime_ns) if st else None
    return files


def _parse_static(value):
    if not value:
        return None
    try:
        batch, height, width = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise InvalidInputError(f"--static {value!r} is not BATCHxHEIGHTxWIDTH. Fix: e.g. --static 1x1024x1024") from None
    return batch, height, width


# ---- doctor ---------------------------------------------------------------------------------------

def add_doctor(sub) -> None:
    s = sub.add_parser("doctor", help="what this machine has (CPU ISA, GPU, engine libraries) and can build")
    s.add_argument("engine_dir", nargs="?", help="also show what `build --backend auto` measured and chose for it")
    s.set_defaults(fn=cmd_doctor)


def cmd_doctor(args) -> None:
    from sprintrt.engines.doctor import report, tuning_report

    print(report())
    if args.engine_dir:
        print(tuning_report(args.engine_dir))


# ---- generate -------------------------------------------------------------------------------------

# Measured with sprintrt.files.sha256_file on a 2-vCPU AMD EPYC (files in the page cache): 0.94-0.98 s per GiB.
VERIFY_HELP = ("skip the sha256 check of the engine files at load (their sizes are still checked). The check catches "
               "an engine file changed in place, which would otherwise run and give a wrong image; it costs about "
               "1 s per GB of engine files")


def add_generate(sub) -> None:
    from sprintrt.runtime.call import CONTROLNET, IMAGE_TO_IMAGE, TEXT_TO_IMAGE

    s = sub.add_parser("generate", help="generate an image with built engines")
    s.add_argument("engine_dir")
    s.add_argument("--prompt", required=True)
    s.add_argument("-o", "--output", required=True,
                   help="image file to write: .png, .jpg, .webp or another format PIL writes (checked before any "
                        "work; a failed write leaves the previous file whole)")
    s.add_argument("--steps", type=int, default=default(TEXT_TO_IMAGE, "num_inference_steps"))
    s.add_argument("--seed", type=int, default=D.DEFAULT_SEED)
    s.add_argument("--height", type=int, default=default(TEXT_TO_IMAGE, "height"))
    s.add_argument("--width", type=int, default=default(TEXT_TO_IMAGE, "width"))
    s.add_argument("--guidance-scale", type=float, default=default(TEXT_TO_IMAGE, "guidance_scale"))
    s.add_argument("--no-binning", action="store_true", help="use height/width as given (multiples of 32)")
    s.add_argument("--image", default=None, metavar="IN.png", help="image to image: start from this picture")
    s.add_argument("--strength", type=float, default=None,
                   help="image to image: how much of the schedule runs, in (0, 1] (default "
                        f"{default(IMAGE_TO_IMAGE, 'strength')})")
    s.add_argument("--control-image", default=None, metavar="SCRIBBLE.png",
                   help="ControlNet: follow this control image (a scribble: white strokes on black); needs engines "
                        "of a model exported with a ControlNet")
    s.add_argument("--controlnet-scale", default=None, metavar="S[,S...]",
                   help="ControlNet: how strongly the image follows the control image, one number or one per "
                        f"ControlNet block (default {default(CONTROLNET, 'controlnet_conditioning_scale')}; 0: off)")
    s.add_argument("--threads", type=int, default=None,
                   help=f"engine threads, at most {D.MAX_THREADS_PER_CPU} per CPU (default: one per core)")
    s.add_argument("--no-verify", action="store_true", help=VERIFY_HELP)
    s.set_defaults(fn=cmd_generate)


def cmd_generate(args) -> None:
    from sprintrt.runtime.call import CONTROLNET, IMAGE_TO_IMAGE
    from sprintrt.runtime.controlnet import SprintControlNetPipeline
    from sprintrt.runtime.image import image_output, save_image_file
    from sprintrt.runtime.img2img import SprintImg2ImgPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    output, fmt = image_output(args.output)  # a path that cannot be written fails now, not after the work
    extra, cls = {}, SprintPipeline
    if args.control_image is not None:
        from sprintrt.runtime.image import load_image_file

        if args.image is not None:
            raise InvalidInputError("--control-image and --image cannot be combined (there is no ControlNet image to "
                                    "image pipeline). Fix: drop one of them")
        scale = (default(CONTROLNET, "controlnet_conditioning_scale") if args.controlnet_scale is None
                 else _scales(args.controlnet_scale))
        extra, cls = dict(control_image=load_image_file(args.control_image, "control_image").convert("RGB"),
                          controlnet_conditioning_scale=scale), SprintControlNetPipeline
    elif args.controlnet_scale is not None:
        raise InvalidInputError("--controlnet-scale is for ControlNet. Fix: add --control-image SCRIBBLE.png, or drop "
                                "--controlnet-scale")
    elif args.image is not None:
        from sprintrt.runtime.image import load_image_file

        # A file's alpha channel or palette is not part of the picture: generate from its RGB.
        strength = default(IMAGE_TO_IMAGE, "strength") if args.strength is None else args.strength
        extra, cls = dict(image=load_image_file(args.image).convert("RGB"), strength=strength), SprintImg2ImgPipeline
    if args.strength is not None and args.image is None:
        raise InvalidInputError("--strength is for image to image. Fix: add --image IN.png, or drop --strength")
    pipe = cls.from_engines(args.engine_dir, threads=args.threads, verify_sha256=not args.no_verify)
    out = pipe(prompt=args.prompt, num_inference_steps=args.steps, **extra,
               intermediate_timesteps=D.intermediate_timesteps_for(args.steps),
               guidance_scale=args.guidance_scale, height=args.height, width=args.width, generator=args.seed,
               use_resolution_binning=not args.no_binning, output_type="pil")
    save_image_file(out.images[0], output, fmt)
    print(f"image written to {output} ({out.timings['total']:.2f} s end to end)")
    multiple = max(32, pipe.vae_scale_factor)
    note = "" if args.no_binning else binning_note(args.height, args.width, multiple,
                                                   _fits_unbinned(pipe, args.height, args.width))
    if note:
        print(note)


def _scales(text: str) -> "float | list[float]":
    """'0.8' → 0.8; '1,0.5,0.5' → [1.0, 0.5, 0.5] (one per ControlNet block; the pipeline checks the count)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--controlnet-scale={text!r} is not a number or a comma-separated list of numbers. "
                                "Fix: e.g. --controlnet-scale 1.0") from None
    return values[0] if len(values) == 1 else values


def _fits_unbinned(pipe, height: int, width: int) -> bool:
    """Whether the engines' profile takes height x width as it is (what --no-binning would generate)."""
    f, limits = pipe.vae_scale_factor, pipe.latent_limits()
    return all(limits[f"latent_{name}"].min <= v // f <= limits[f"latent_{name}"].max
               for name, v in (("height", height), ("width", width)))


def binning_note(height: int, width: int, multiple: int, direct: bool = True) -> str:
    """Resolution binning (diffusers' default) generates at the 1024px model's nearest bin and resizes: a
    512² image costs a 1024² decode, 4x the VAE decoder's work. Say so, and what --no-binning would cost
    instead where it would accept the size (a multiple of `multiple`, and `direct`: inside the engines' profile)."""
    from sprintrt.bins import classify_height_width_bin

    bh, bw = classify_height_width_bin(height, width)
    if (bh, bw) == (height, width):
        return ""
    note = f"note: generated at {bh}x{bw} (resolution binning, as diffusers does) and resized to {height}x{width}"
    if height % multiple or width % multiple or not direct:  # --no-binning would refuse this size
        return note
    ratio = bh * bw / (height * width)
    if ratio >= 1.05:
        cost = f"{ratio:.1f}x fewer pixels to decode"
    elif ratio <= 1 / 1.05:
        cost = f"{1 / ratio:.1f}x more pixels to decode, none of them upscaled"
    else:
        cost = "about as many pixels, without the resize"
    return f"{note}; --no-binning generates {height}x{width} itself, {cost}"


# ---- drift ----------------------------------------------------------------------------------------

def add_drift(sub) -> None:
    from sprintrt.benchmarks.drift import run_drift

    s = sub.add_parser("drift", help="per-component and image drift of reduced-precision engines vs an fp32 "
                                     "engine directory, over a prompt set and seeds (JSON + Markdown)")
    s.add_argument("reference", help="the fp32 engine directory")
    s.add_argument("candidates", nargs="+", help="engine directories to compare, each DIR or NAME=DIR")
    s.add_argument("--prompts", type=int, default=D.DRIFT_PROMPTS,
                   help="how many prompts of the prompt file (default %(default)s)")
    s.add_argument("--prompts-file", help="one prompt per line (default: the shipped prompts)")
    s.add_argument("--seeds", default=_csv(D.DRIFT_SEEDS))
    s.add_argument("--size", type=int, default=default(run_drift, "size"))
    s.add_argument("--steps", type=int, default=default(run_drift, "steps"))
    s.add_argument("--strength", type=float, default=default(run_drift, "strength"),
                   help="measure image to image from a fixed picture at this strength (default: text to image)")
    s.add_argument("--threads", type=int, default=default(run_drift, "threads"))
    s.add_argument("-o", "--output", default=str(D.OUT_DIR / "drift.json"))
    s.set_defaults(fn=cmd_drift)


def cmd_drift(args) -> None:
    _quiet_libraries(args.verbose)
    from sprintrt.benchmarks import drift
    from sprintrt.prompts import read_prompts

    candidates = {}
    for item in args.candidates:
        name, sep, path = item.partition("=")
        candidates[name if sep else Path(item).name] = path if sep else item
    prompts = read_prompts(args.prompts_file)[:args.prompts]
    seeds = [_int_list_item(v, "--seeds") for v in args.seeds.split(",")]
    console = _console()
    doc = drift.run_drift(args.reference, candidates, prompts, seeds, size=args.size, steps=args.steps,
                          threads=args.threads, say=console.print, strength=args.strength)
    paths = drift.write_outputs(doc, args.output)
    print(drift.report(doc))
    print(f"results written to {', '.join(str(p) for p in paths)}")


# ---- bench ----------------------------------------------------------------------------------------

def add_bench(sub) -> None:
    from sprintrt.benchmarks.config import BASELINES, TORCH_DEVICES, BenchConfig

    def resolutions(values) -> str:
        return _csv(h if h == w else f"{h}x{w}" for h, w in values)

    s = sub.add_parser("bench", help="latency, memory and image agreement vs diffusers (JSON + Markdown + PNG)")
    s.add_argument("--model", help="checkpoint directory or hub id (default: a seeded random --arch checkpoint)")
    s.add_argument("--arch", default=default(BenchConfig, "arch"), choices=D.ARCHS)
    s.add_argument("--seed", type=int, default=default(BenchConfig, "seed"))
    s.add_argument("--resolutions", default=resolutions(default(BenchConfig, "resolutions")),
                   help="comma-separated HEIGHT or HEIGHTxWIDTH, e.g. 512,768x1280 (default %(default)s)")
    s.add_argument("--batches", default=_csv(default(BenchConfig, "batches")))
    s.add_argument("--steps", default=_csv(default(BenchConfig, "steps")),
                   help="comma-separated step counts, e.g. 1,2 (default %(default)s)")
    s.add_argument("--candidates", default=_csv(c.name for c in default(BenchConfig, "candidates")),
                   help="comma-separated backend:precision, e.g. ort:fp32,ov:bf16,trt:bf16; `auto`: the "
                        "engines `build --backend auto` tunes on this CPU; `none`: the baselines only "
                        "(default %(default)s)")
    s.add_argument("--baselines", default=_csv(default(BenchConfig, "baselines")),
                   help=f"some of {_csv(BASELINES)} (optimum-intel needs --optimum-python; default %(default)s)")
    s.add_argument("--torch-device", default=default(BenchConfig, "torch_device"), choices=TORCH_DEVICES,
                   help="where the diffusers baselines run (cuda: the PyTorch GPU row, e.g. bf16 at 1024; needs "
                        "a CUDA build of torch, not TensorRT)")
    s.add_argument("--optimum-python", help="the python of an environment with optimum-intel, for the optimum-intel "
                                            "baseline (see benchmarks/optimum_intel.py)")
    s.add_argument("--warmup", type=int, default=default(BenchConfig, "warmup"))
    s.add_argument("--runs", type=int, default=default(BenchConfig, "runs"))
    s.add_argument("--prompt", default=default(BenchConfig, "prompt"))
    s.add_argument("--no-chi", action="store_true", help="prompts without the complex human instruction")
    s.add_argument("--threads", type=int, default=default(BenchConfig, "threads"))
    s.add_argument("--calibration-count", type=int, default=default(BenchConfig, "calibration_count"),
                   help="int8 candidates: calibration prompts (default %(default)s)")
    s.add_argument("--vae", default=None, metavar="PATH_OR_ID", help="a drop-in AutoencoderDC for every system")
    s.add_argument("--prompt-cache", action="store_true",
                   help="also time sprintrt systems on a repeated prompt with the prompt-embedding cache")
    s.add_argument("--strength", type=float, default=default(BenchConfig, "strength"),
                   help="benchmark image to image from a fixed picture at this strength (default: text to image)")
    s.add_argument("--controlnet", action="store_true",
                   help="benchmark SANA-Sprint with the checkpoint's ControlNet following a fixed scribble (sprintrt: "
                        "SprintControlNetPipeline; PyTorch: diffusers' modules, benchmarks/controlnet_reference.py)")
    s.add_argument("--workdir", default=str(default(BenchConfig, "workdir")),
                   help="where checkpoints, ONNX and engines are cached (default %(default)s)")
    s.add_argument("-o", "--output", default=str(default(BenchConfig, "workdir") / "results.json"))
    s.add_argument("--report", help="only turn a stored results JSON into Markdown + PNG beside it")
    s.set_defaults(fn=cmd_bench)


def cmd_bench(args) -> None:
    if args.report:
        from sprintrt.benchmarks import report as R

        try:
            doc = json.loads(Path(args.report).read_text())
            R.validate(doc)
        except (OSError, ValueError) as e:  # a missing file, bad JSON, or a document of another schema
            raise InvalidInputError(f"{args.report}: {e}. Fix: pass a JSON written by `sprintrt bench`") from None
        md, png = Path(args.report).with_suffix(".md"), Path(args.report).with_suffix(".png")
        md.write_text(R.report(doc))
        R.plot(doc, png)
        print(f"report written to {md} and {png}")
        return
    _quiet_libraries(args.verbose)
    from sprintrt.benchmarks import report as R
    from sprintrt.benchmarks.bench import run_bench
    from sprintrt.benchmarks.config import BenchConfig, parse_candidate, parse_resolution

    config = BenchConfig(
        model=args.model, arch=None if args.model else args.arch, seed=args.seed,
        resolutions=[parse_resolution(r) for r in args.resolutions.split(",")],
        batches=[_int_list_item(v, "--batches") for v in args.batches.split(",")],
        steps=[_int_list_item(v, "--steps") for v in args.steps.split(",")],
        candidates=[] if args.candidates == "none" else [parse_candidate(c) for c in args.candidates.split(",")],
        baselines=args.baselines.split(","), warmup=args.warmup, runs=args.runs, workdir=Path(args.workdir),
        prompt=args.prompt, complex_human_instruction=not args.no_chi, threads=args.threads,
        calibration_count=args.calibration_count, vae=args.vae, prompt_cache=args.prompt_cache,
        strength=args.strength, optimum_python=args.optimum_python, torch_device=args.torch_device,
        controlnet=args.controlnet)
    config.check()
    console = _console()
    doc = run_bench(config, say=console.print)
    paths = R.write_outputs(doc, args.output)
    print(R.report(doc))
    print(f"results written to {', '.join(str(p) for p in paths)}")


# ---- serve ----------------------------------------------------------------------------------------

# ServeOptions fields set by the flag of the same name (max_batch: --max-batch); defaults from ServeOptions.
SERVE_FLAGS = (
    ("replicas", int, "pipeline replicas, each loading the engines once; more than 1 serves through a local Ray"),
    ("max_batch", int, "images per engine call (capped by the engines' batch profile)"),
    ("max_wait_ms", float, "how long to wait to fill a batch"),
    ("max_queued", int, "requests per replica before answering 503"),
    ("timeout_s", float, "per-request limit: then 503, and its work stops at the next stage"),
    ("num_gpus", float, "GPUs per replica (1: one replica per GPU)"),
    ("threads", int, "engine threads per replica"),
    ("max_pixels_per_request", int, "n x width x height per request; more get 413 (default %(default)s)"),
    ("max_steps", int, "num_inference_steps per request; more get 422 (default %(default)s)"),
    ("max_prompt_bytes", int, "UTF-8 bytes of a prompt; more get 413 (default %(default)s)"),
    ("drain_timeout_s", float, "on SIGINT/SIGTERM, how long in-flight requests may still run (default %(default)s)"),
)


def add_serve(sub) -> None:
    from sprintrt.serving.app import ServeOptions, run

    s = sub.add_parser("serve", help="serve engines over HTTP (POST /v1/images/generations): dynamic batching, "
                                     "backpressure, cost limits, health and Prometheus metrics; one process, or Ray "
                                     "Serve for several replicas or a cluster")
    s.add_argument("engine_dir")
    s.add_argument("--host", default=default(run, "host"), help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=default(run, "port"))
    for name, kind, text in SERVE_FLAGS:
        s.add_argument("--" + name.replace("_", "-"), type=kind, default=default(ServeOptions, name), help=text)
    s.add_argument("--no-verify", action="store_true", help=VERIFY_HELP + ", once per replica")
    s.add_argument("--address", default=default(run, "address"),
                   help="join a running Ray cluster (e.g. auto) instead of serving in this process")
    s.add_argument("--write-config", default=None, metavar="FILE",
                   help="write a Ray Serve config for `serve deploy` instead of serving")
    s.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> None:
    from sprintrt.serving.app import ServeOptions, run, write_config

    options = ServeOptions(engine_dir=str(args.engine_dir), verify_sha256=not args.no_verify,
                           **{name: getattr(args, name) for name, _, _ in SERVE_FLAGS})
    if args.write_config:
        path = write_config(options, args.write_config, host=args.host, port=args.port)
        print(f"Ray Serve config written to {path} (deploy it with `serve deploy {path}` on the cluster's head node)")
        return
    _quiet_libraries(args.verbose)
    run(options, host=args.host, port=args.port, address=args.address)


# ---- ui ---------------------------------------------------------------------------------------------

def add_ui(sub) -> None:
    from sprintrt.serving.ui import run_ui

    s = sub.add_parser("ui", help="an interactive page (Gradio): sketch to image with a ControlNet, redrawn at every "
                                  "stroke, and text to image, with per-stage latency")
    s.add_argument("engine_dir")
    s.add_argument("--host", default=default(run_ui, "host"), help="address to listen on (default %(default)s)")
    s.add_argument("--port", type=int, default=default(run_ui, "port"), help="(default %(default)s)")
    s.add_argument("--threads", type=int, default=None,
                   help=f"engine threads, at most {D.MAX_THREADS_PER_CPU} per CPU (default: one per core)")
    s.add_argument("--no-verify", action="store_true", help=VERIFY_HELP)
    s.set_defaults(fn=cmd_ui)


def cmd_ui(args) -> None:
    from sprintrt.serving.ui import run_ui

    _quiet_libraries(args.verbose)
    run_ui(args.engine_dir, host=args.host, port=args.port, threads=args.threads, verify_sha256=not args.no_verify)


# ---- loadtest -------------------------------------------------------------------------------------

def add_loadtest(sub) -> None:
    from sprintrt.serving.loadtest import LoadConfig

    s = sub.add_parser("loadtest", help="send a bounded load to a `sprintrt serve` URL: latency percentiles, "
                                        "throughput, answers by status (JSON + Markdown)")
    s.add_argument("url", help="e.g. http://127.0.0.1:8000 (only servers you run)")
    s.add_argument("--concurrency", type=int, default=default(LoadConfig, "concurrency"))
    s.add_argument("--requests", type=int, default=default(LoadConfig, "requests"))
    s.add_argument("--size", default=default(LoadConfig, "size"), help="WIDTHxHEIGHT (default %(default)s)")
    s.add_argument("--steps", type=int, default=default(LoadConfig, "steps"))
    s.add_argument("--n", type=int, default=default(LoadConfig, "n"), help="images per request")
    s.add_argument("--duration-s", type=float, default=default(LoadConfig, "duration_s"),
                   help="stop sending after this long")
    s.add_argument("--timeout-s", type=float, default=default(LoadConfig, "timeout_s"), help="per request")
    s.add_argument("-o", "--output", default=str(D.OUT_DIR / "loadtest.json"))
    s.set_defaults(fn=cmd_loadtest)


def cmd_loadtest(args) -> None:
    from sprintrt.serving import loadtest

    config = loadtest.LoadConfig(url=args.url, concurrency=args.concurrency, requests=args.requests, size=args.size,
                                 steps=args.steps, n=args.n, duration_s=args.duration_s, timeout_s=args.timeout_s)
    doc = loadtest.run_load(config)
    paths = loadtest.write_outputs(doc, args.output)
    print(loadtest.report(doc))
    print(f"results written to {', '.join(str(p) for p in paths)}")


# ---- demo -----------------------------------------------------------------------------------------

def add_demo(sub) -> None:
    from sprintrt.benchmarks.demo import run_demo

    s = sub.add_parser("demo", help="tiny checkpoint → export → build → generate, timed against diffusers")
    s.add_argument("--workdir", default=str(default(run_demo, "workdir")))
    s.add_argument("--prompt", default=default(run_demo, "prompt"))
    s.add_argument("--steps", type=int, default=default(run_demo, "steps"))
    s.add_argument("--size", type=int, default=default(run_demo, "size"))
    s.add_argument("--runs", type=int, default=default(run_demo, "runs"))
    s.set_defaults(fn=cmd_demo)


def cmd_demo(args) -> None:
    _quiet_libraries(args.verbose)
    from sprintrt.benchmarks.demo import run_demo

    run_demo(Path(args.workdir), prompt=args.prompt, steps=args.steps, size=args.size, runs=args.runs,
             console=_console())


# ---- parser ----------------------------------------------------------------------------------------

SUBCOMMANDS = (add_make_checkpoint, add_export, add_build, add_doctor, add_generate, add_drift, add_bench, add_serve,
               add_ui, add_loadtest, add_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sprintrt", description="Deployment compiler for SANA-Sprint: "
                                "checkpoint → ONNX → engines → images.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="show the libraries' warnings and logs (on stderr); default: only sprintrt's own")
    return p


def _show_notices(command: str) -> None:
    """sprintrt's Notices (e.g. a prompt cut to max_sequence_length) as one `note:` line on stderr; other
    warnings as Python shows them."""
    import warnings

    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, Notice):
            print(f"sprintrt {command}: note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    _show_notices(args.command)
    try:
        args.fn(args)
    except SprintError as e:
        print(f"sprintrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sprintrt {args.command}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    if args.command == "demo":
        print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
