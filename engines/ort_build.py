"""ONNX Runtime "engines": the source graph optimised by ORT for this CPU and saved.

ORT's full optimisation level (ORT_ENABLE_ALL) fuses attention/LayerNorm/GELU and rewrites
convolutions into the blocked NCHWc layout of this CPU's vector width, so the saved graph is tied to
the CPU's ISA and to the ORT version, which the manifest records and the loader checks. Loading a
saved graph then skips optimisation, which is most of ORT's session start-up time on big graphs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from sprintrt import machine
from sprintrt.engines.backend import BuildResult
from sprintrt.engines.precision import Precision
from sprintrt.engines.profiles import full_profile
from sprintrt.errors import MissingDependencyError
from sprintrt.export.specs import COMPONENTS
from sprintrt.files import EXTERNAL_DATA_BYTES

NAME = "onnxruntime"
LIBRARY = "onnxruntime"
SUFFIX = ".ort.onnx"
PROVIDER = "CPUExecutionProvider"
# fp16 engines run the export's typed fp16 variant (ORT's CPU provider runs fp16 graphs; it has no bf16 Conv).
TYPED_PRECISIONS = frozenset({Precision.FP16})
VARIANT_OPTIONAL: frozenset = frozenset()  # fp16 needs the typed graph
PRECISION_LIBRARIES: dict = {}


def target() -> dict:
    return machine.cpu_target()


def versions() -> dict:
    version = machine.library_version("onnxruntime")
    if version is None:
        raise MissingDependencyError("the onnxruntime backend needs the 'onnxruntime' package. Fix: pip install "
                                     "onnxruntime (never together with onnxruntime-gpu)")
    return {LIBRARY: version}


def default_precisions(versions: Mapping | None = None, target: Mapping | None = None) -> dict:
    return {c: Precision.FP32 for c in COMPONENTS}  # the CPU provider has no bf16 kernels


def quantized_base(component: str, target: Mapping, precision: Precision):
    """None: int8 layers run ORT's int8 kernels and the rest fp32 (its CPU provider has no bf16)."""
    return None


def check_buildable(component: str, precision: Precision, export_record: Mapping, versions: Mapping,
                    target: Mapping) -> None:
    """Everything ONNX Runtime cannot build is already refused by the precision table."""


def profile(spec, model, options) -> dict:
    return full_profile(spec)  # ORT sessions take any shape in the spec's ranges


def build_component(source: Path, out: Path, component: str, precision: Precision, shapes: dict,
                    target_info: Mapping, library_versions: Mapping) -> BuildResult:
    """Optimise `source` for this CPU into `out` (written under a temporary name, then renamed).

    ORT sessions take any shape in the spec's ranges, so `shapes` only goes into the manifest."""
    import onnxruntime as ort

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    weights = out.with_name(out.name + ".data")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3  # ORT warns that an ENABLE_ALL graph is hardware-specific: the manifest says so
    # A source with external weights always gets its own weights file: otherwise ORT's saved graph keeps
    # pointing into the source's .data file (a temporary one, for int8 Q/DQ graphs).
    # A 16-bit source can double: the CPU provider computes fp16 in fp32 and its optimiser folds the weights'
    # Casts into fp32 copies (measured: the real fp16 transformer, 1.19 GB, optimised to 2.37 GB > protobuf's 2 GB).
    growth = 2 if precision in (Precision.FP16, Precision.BF16) else 1
    external = (source.with_name(source.name + ".data").exists()
                or source.stat().st_size * growth > EXTERNAL_DATA_BYTES)
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        # External weights go straight to their final name (the model file refers to it by that
        # name); the model file itself appears only by the rename, so it is never seen half-written.
        ort.InferenceSession(str(source), opts, providers=[PROVIDER])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        if not out.exists():  # failed (e.g. disk full): drop the half-written weights file too
            weights.unlink(missing_ok=True)
    return BuildResult(
        info={"execution_provider": PROVIDER,
              "graph_optimization": "ORT_ENABLE_ALL (saved); loaded with optimisation off"},
        extra_files=(weights,) if weights.exists() else ())
