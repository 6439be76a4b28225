"""`sprintrt drift`: what a reduced precision costs, per component and per image.

For a fixed prompt set and seeds, the reference engine directory (fp32) generates every image while
each component's inputs and outputs are recorded. Then each candidate engine directory (int8, bf16,
...) is measured two ways:
- per component: its engine fed the reference's recorded inputs, output compared with the reference
  output (cosine, max |diff|), so each network's own drift is seen apart from what it inherits;
- end to end: the candidate pipeline generates the same images, compared by PSNR with the reference.
Systems are loaded one at a time (real-size engine directories are ~11-21 GB each).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np

from sprintrt import defaults as D
from sprintrt import specs as S
from sprintrt.benchmarks.measure import input_picture
from sprintrt.errors import InvalidInputError
from sprintrt.files import write_json_and_markdown
from sprintrt.manifest import read_manifest
from sprintrt.metrics import cosine, max_abs, psnr
from sprintrt.runtime.recording import recording

SCHEMA = "sprintrt-drift/1"
# The output of each component that the next stage reads.
OUTPUTS = {S.TEXT_ENCODER: "last_hidden_state", S.TRANSFORMER: "noise_pred", S.VAE_DECODER: "sample",
           S.VAE_ENCODER: "latent"}


def _generate(pipe, prompt: str, seed: int, size: int, steps: int, strength: float | None) -> np.ndarray:
    import torch

    extra = {} if strength is None else dict(image=input_picture(size, size), strength=strength)
    return pipe(prompt, num_inference_steps=steps, intermediate_timesteps=D.intermediate_timesteps_for(steps), height=size,
                width=size, use_resolution_binning=False, output_type="np",
                generator=torch.Generator().manual_seed(seed), **extra).images


def run_drift(reference: str | Path, candidates: dict[str, str | Path], prompts: list[str], seeds: list[int],
              size: int = D.DRIFT_SIZE, steps: int = D.DRIFT_STEPS, threads: int | None = None, say=print,
              strength: float | None = None) -> dict:
    """The drift document (schema SCHEMA) of each candidate engine directory against `reference`; with
    `strength`, of image to image from a fixed picture (the VAE encoder's drift included)."""
    from sprintrt.runtime.img2img import SprintImg2ImgPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    pipeline = SprintPipeline if strength is None else SprintImg2ImgPipeline

    if not prompts or not seeds:
        raise InvalidInputError(f"drift needs prompts and seeds (got {len(prompts)} prompts, {len(seeds)} seeds). "
                                "Fix: pass --prompts N >= 1 and --seeds 0,1")
    if not candidates:
        raise InvalidInputError("drift needs at least one candidate engine directory. Fix: name one after the reference")
    cases = [(p, s) for p in prompts for s in seeds]
    say(f"reference {reference}: {len(cases)} images")
    ref_pipe = pipeline.from_engines(reference, threads=threads)
    ref_pipe.trim_padding = False  # record the padded text the candidates' engines are compared on
    ref_pipe.reuse_instruction_prefix = False  # ... every token of it, the instruction's too
    with recording(ref_pipe, pipeline.COMPONENTS, outputs=True) as taps:
        ref_images = [_generate(ref_pipe, p, s, size, steps, strength) for p, s in cases]
    recorded = {c: tap.calls for c, tap in taps.items()}
    ref_precisions = {c: e["precision"] for c, e in read_manifest(reference).components.items()}
    del ref_pipe, taps
    gc.collect()

    systems = []
    for name, engine_dir in candidates.items():
        say(f"candidate {name} ({engine_dir})")
        pipe = pipeline.from_engines(engine_dir, threads=threads)
        manifest = read_manifest(engine_dir)
        components = {}
        for c in pipeline.COMPONENTS:
            engine, cos, err = pipe.engine(c), [], []
            for feeds, out in recorded[c]:
                got = engine(**feeds)[OUTPUTS[c]]
                ref = out[OUTPUTS[c]]
                if c == S.TEXT_ENCODER:  # only the real tokens are ever read downstream
                    real = feeds["attention_mask"].astype(bool)
                    got, ref = got[real], ref[real]
                cos.append(cosine(got, ref))
                err.append(max_abs(got, ref))
            components[c] = {"precision": manifest.components[c]["precision"], "backend": manifest.components[c]["backend"],
                             "cosine_min": min(cos), "cosine_mean": float(np.mean(cos)), "max_abs": max(err),
                             "samples": len(cos)}
        t0 = time.perf_counter()
        ps = [psnr(_generate(pipe, p, s, size, steps, strength), ref) for (p, s), ref in zip(cases, ref_images)]
        systems.append({"name": name, "engine_dir": str(engine_dir), "components": components,
                        "image_psnr_db": {"min": min(ps), "mean": float(np.mean(ps)), "per_image": ps},
                        "seconds": round(time.perf_counter() - t0, 1)})
        del pipe
        gc.collect()
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reference": {"engine_dir": str(reference), "precisions": ref_precisions},
            "settings": {"prompts": prompts, "seeds": seeds, "size": size, "steps": steps, "strength": strength},
            "systems": systems}


def _db(x: float) -> str:
    return "identical" if x == float("inf") else f"{x:.1f}"


def report(doc: dict) -> str:
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not a drift document ({SCHEMA}): schema is {doc.get('schema')!r}")
    st = doc["settings"]
    lines = [f"# Precision drift against {doc['reference']['engine_dir']} "
             f"({', '.join(f'{c} {p}' for c, p in doc['reference']['precisions'].items())})", "",
             f"{'Image to image at strength ' + str(st['strength']) + ' from a fixed picture; ' if st.get('strength') else ''}"
             f"{len(st['prompts'])} prompts x {len(st['seeds'])} seeds, {st['size']}x{st['size']}, {st['steps']} "
             f"step{'s' if st['steps'] > 1 else ''}. Per component: the engine fed the reference's own inputs "
             "(cosine min / mean, max |diff|; text encoder over real tokens only). Image: PSNR of the final image "
             f"against the reference pipeline's (min / mean). Created {doc['created']}.", "",
             "| system | component | precision | cosine min | cosine mean | max abs | image PSNR dB (min / mean) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in doc["systems"]:
        ps = s["image_psnr_db"]
        for i, (c, r) in enumerate(s["components"].items()):
            image = f"{_db(ps['min'])} / {_db(ps['mean'])}" if i == 0 else ""
            lines.append(f"| {s['name'] if i == 0 else ''} | {c} | {r['backend']} {r['precision']} | "
                         f"{r['cosine_min']:.6f} | {r['cosine_mean']:.6f} | {r['max_abs']:.3g} | {image} |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, json_path: str | Path) -> tuple[Path, Path]:
    return write_json_and_markdown(doc, json_path, report)
