"""Validation of an exported ONNX graph against the PyTorch module it came from.

Runs both at every validation size of the component spec (never the trace size) and fails loudly:
exceeding a tolerance raises ExportValidationError, it is never a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sprintrt.errors import ExportValidationError
from sprintrt.specs import ComponentSpec
from sprintrt.metrics import compare


@dataclass(frozen=True)
class Tolerance:
    """max|onnx - torch| <= atol + rtol * max|torch|, and cosine >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


# fp32 graphs: ORT reorders reductions (fused LayerNorm/attention), so allow a few ulps of the output's
# scale, relative to the largest reference value; the cosine catches structural errors that stay small.
FP32 = Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999)


def validate_onnx(onnx_path: str | Path, module, spec: ComponentSpec, tol: Tolerance = FP32) -> list[dict]:
    """Compare ONNX Runtime against `module` at each of spec.validation_sizes(). Returns the records."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    records = []
    for k, sizes in enumerate(spec.validation_sizes()):
        feeds = spec.sample_inputs(sizes, seed=100 + k)
        with torch.no_grad():
            refs = module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs])
        outs = sess.run([t.name for t in spec.outputs], feeds)
        for t, out, ref in zip(spec.outputs, outs, refs):
            ref = ref.float().numpy()
            rec = {"component": spec.name, "output": t.name, "sizes": sizes, **compare(out, ref), "tolerance": asdict(tol)}
            records.append(rec)
            bound = tol.atol + tol.rtol * rec["ref_max_abs"]
            if out.shape != ref.shape or not rec["finite"] or rec["max_abs"] > bound or rec["cosine"] < tol.min_cosine:
                raise ExportValidationError(
                    f"{spec.name}: ONNX output '{t.name}' disagrees with PyTorch at sizes {sizes}: shape "
                    f"{out.shape} vs {ref.shape}, max|diff| {rec['max_abs']:.3g} (allowed {bound:.3g}), cosine "
                    f"{rec['cosine']:.7f} (allowed >= {tol.min_cosine}), finite={rec['finite']}. The export is wrong: "
                    "do not ship it; report the sizes above with the exporter versions.")
    return records


def run_variant(onnx_path: str | Path, dtype: str):
    """A callable feeds → outputs for a 16-bit variant on this CPU: fp16 in ONNX Runtime, bf16 in
    OpenVINO (ONNX Runtime's CPU provider has no bf16 Conv), or onnx.reference without OpenVINO."""
    if dtype == "fp16":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)
    try:
        import openvino as ov
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(onnx_path))
        return lambda feeds: ref.run(None, feeds)
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feeds: [compiled(feeds)[o] for o in compiled.outputs]


def reference_outputs(module, spec: ComponentSpec) -> list[tuple[dict, list[np.ndarray]]]:
    """The fp32 PyTorch `module`'s (feeds, outputs) at spec.validation_sizes(): what every 16-bit variant is
    compared with. Computed once, so the fp32 network is freed before the variants are traced and run (at the
    real 0.6B size, holding Gemma2's 8 GB fp32 module while OpenVINO ran the bf16 variant peaked at 23.1 GiB)."""
    import torch

    refs = []
    for k, sizes in enumerate(spec.validation_sizes()):
        feeds = spec.sample_inputs(sizes, seed=100 + k)
        with torch.no_grad():
            outs = module(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs])
        refs.append((feeds, [o.float().numpy() for o in outs]))
    return refs


def validate_variant(onnx_path: str | Path, references: list, spec: ComponentSpec, dtype: str,
                     min_cosine: float) -> list[dict]:
    """Compare a 16-bit variant against the fp32 PyTorch outputs (reference_outputs) at spec.validation_sizes():
    every output finite, of the right shape, with cosine >= min_cosine. Raises ExportValidationError otherwise."""
    run = run_variant(onnx_path, dtype)
    records = []
    for sizes, (feeds, refs) in zip(spec.validation_sizes(), references):
        outs = run(feeds)
        for t, out, ref in zip(spec.outputs, outs, refs):
            out = np.asarray(out)
            rec = {"component": spec.name, "dtype": dtype, "output": t.name, "sizes": sizes, **compare(out, ref),
                   "min_cosine": min_cosine}
            records.append(rec)
            if out.shape != ref.shape or out.dtype != np.float32 or not rec["finite"] or rec["cosine"] < min_cosine:
                raise ExportValidationError(
                    f"{spec.name} {dtype}: output '{t.name}' disagrees with PyTorch fp32 at sizes {sizes}: shape "
                    f"{out.shape} vs {ref.shape}, dtype {out.dtype}, cosine {rec['cosine']:.6f} (allowed >= "
                    f"{min_cosine}), finite={rec['finite']}. The variant is wrong: do not ship it.")
    return records
