"""The ONNX directory's export_info.json: the contract between export/ (which writes it) and engines/
and benchmarks/ (which read it).

Per component: the fp32 graph's file, bytes and sha256 (and its external weights'), its validation
records, its spec, and its typed variants (`variants[dtype]`, each with its own file record); and for
the model: its identity (sprintrt.files.model_identity), ModelDims, the pipeline constants, the exporter
fingerprint and library versions.
"""

from __future__ import annotations

import json
from pathlib import Path

from sprintrt.errors import ModelLoadError
from sprintrt.files import file_mismatch, missing_key

EXPORT_INFO = "export_info.json"
FORMAT = 1
# What the build and the CLI read of an export record (files.missing_key's format): one missing is named.
RECORD_KEYS = {"file": None, "bytes": None, "sha256": None, "validation": None, "spec": None}
KEYS = {"model": {"identity": None, "source": None}, "model_dims": None, "pipeline": None,
        "components": {"*": RECORD_KEYS}}


def read_export_info(onnx_dir: str | Path) -> dict:
    """The export record of an ONNX directory, or a typed error saying how to make one."""
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / EXPORT_INFO
    fix = f"Fix: create it with `sprintrt export MODEL -o {onnx_dir}`"
    if not onnx_dir.is_dir() or not path.is_file():
        raise ModelLoadError(f"{str(onnx_dir)!r} is not an sprintrt ONNX directory (no {EXPORT_INFO}). {fix}")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} cannot be read ({e}). {fix}") from None
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(info).__name__}, not an export record (an object with "
                             f"{', '.join(KEYS)}). {fix}")
    missing = missing_key(info, KEYS)
    if missing:
        raise ModelLoadError(f"{path} has no valid {missing!r}: it was edited or written by something else. {fix}")
    return info


def check_onnx_file(onnx_dir: Path, component: str, record: dict) -> Path:
    """The ONNX file (and its external weights) must be exactly what the export wrote: catches truncation."""
    for entry in (record, record.get("external_data")):
        if entry:
            problem = file_mismatch(onnx_dir / entry["file"], entry["bytes"], entry["sha256"])
            if problem:
                raise ModelLoadError(f"{problem} (the export wrote {entry['bytes']} bytes): {component} cannot be "
                                     f"built from it. Fix: re-run `sprintrt export` into {onnx_dir}")
    return onnx_dir / record["file"]


def weights_bytes(record: dict) -> int:
    """Bytes of one exported graph with its external weights."""
    return record["bytes"] + (record.get("external_data") or {}).get("bytes", 0)
