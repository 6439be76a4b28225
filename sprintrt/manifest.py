"""The engine directory's manifest.json: what each engine file is, what built it, and for what.

The contract between engines/ (which writes it) and runtime/ (which reads it). One manifest describes
every backend: per component the engine file and its sha256 (and those of the files it needs beside
it), backend, precision, the I/O spec with its dim ranges (the shape profile), the sha256 of the
source ONNX, the library versions, the model's identity, the target machine and a readable cache key
made of all of them. Loading refuses, with the reason and the fix, any engine whose manifest does not
match the files, the model or the machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sprintrt.errors import EngineDirError
from sprintrt.files import file_mismatch, missing_key, write_text_atomic

MANIFEST = "manifest.json"
# 2: every file an engine needs is listed under "extra_files" (format 1 listed OpenVINO's only, as "sidecars").
# 3: the text encoder takes a key/value past (sprintrt/specs.py text_encoder_spec).
# 4: a backend records how its engines are opened at run time (OpenVINO: "compile_config", "cache_dir"), so the
#    run side never asks a build module.
FORMAT = 4
REBUILD = "Fix: rebuild with `sprintrt build ONNX_DIR -o ENGINE_DIR --rebuild` on this machine"
# What the run side reads of a manifest (files.missing_key's format): one missing is named, not a KeyError.
ENTRY_KEYS = {"file": None, "bytes": None, "sha256": None, "backend": None, "precision": None, "key": None,
              "model_identity": None, "target": {"kind": None}, "io": {"dims": None}}
KEYS = {"format": None, "model": {"identity": None, "source": None}, "model_dims": None, "pipeline": None,
        "tokenizer": None, "components": {"*": ENTRY_KEYS}}


def engine_files(entry: dict) -> list[dict]:
    """The engine file's record and those of the files it needs beside it (IR weights, external data)."""
    return [entry, *entry.get("extra_files", [])]


@dataclass
class Manifest:
    path: Path
    data: dict

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def components(self) -> dict:
        return self.data["components"]

    def component_file(self, name: str) -> Path:
        return self.root / self.components[name]["file"]

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1))


def read_manifest(engine_dir: str | Path) -> Manifest:
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineDirError(f"engine directory {str(engine_dir)!r} does not exist. Fix: build it with "
                             f"`sprintrt build ONNX_DIR -o {engine_dir}`")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineDirError(f"{str(engine_dir)!r} has no {MANIFEST}, so it is not an sprintrt engine directory "
                             f"(or its build did not finish). Fix: `sprintrt build ONNX_DIR -o {engine_dir}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineDirError(f"{path} is not valid JSON ({e}). Fix: rebuild with `sprintrt build ... --rebuild`") from e
    if not isinstance(data, dict):
        raise EngineDirError(f"{path} holds a JSON {type(data).__name__}, not a manifest (an object with "
                             f"{', '.join(KEYS)}). {REBUILD}")
    if data.get("format") != FORMAT:
        raise EngineDirError(f"{path} has format {data.get('format')!r}, this sprintrt reads format {FORMAT}. "
                             "Fix: rebuild the engines with this version of sprintrt")
    missing = missing_key(data, KEYS)
    if missing:
        raise EngineDirError(f"{path} has no valid {missing!r}: it was edited or written by something else. {REBUILD}")
    return Manifest(path, data)


def check_loadable(manifest: Manifest, components, *, expect_model: str | None = None, verify_sha256: bool = False,
                   machine: Callable[[dict], str | None] | None = None) -> None:
    """Raise EngineDirError if any engine may not be loaded here, naming the field, both values and the fix.

    `machine(entry)` says why the engine of a manifest entry cannot run on this machine (None: it can);
    None skips those checks."""
    identities = {c["model_identity"] for c in manifest.components.values()}
    model = manifest.data["model"]["identity"]
    if identities != {model}:
        raise EngineDirError(f"{manifest.path}: components come from different models ({sorted(identities)}); "
                             f"the manifest names model {model}. {REBUILD}")
    if expect_model is not None and expect_model != model:
        raise EngineDirError(f"{manifest.path} was built from model {model[:16]}… ({manifest.data['model']['source']}), "
                             f"not the expected {expect_model[:16]}…. Fix: point at the engines of this model, or build them")
    for name in components:
        if name not in manifest.components:
            raise EngineDirError(f"{manifest.path} has no '{name}' engine (it has {sorted(manifest.components)}). {REBUILD}")
        comp = manifest.components[name]
        for entry in engine_files(comp):
            problem = file_mismatch(manifest.root / entry["file"], entry["bytes"],
                                    entry["sha256"] if verify_sha256 else None)
            if problem:
                raise EngineDirError(f"engine file {problem} (listed in {manifest.path}). {REBUILD}")
        problem = machine(comp) if machine is not None else None
        if problem:
            raise EngineDirError(f"'{name}' {problem}. {REBUILD}")
