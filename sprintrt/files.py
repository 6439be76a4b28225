"""Helpers shared by export/, engines/ and benchmarks/: content hashes (files, the model's identity), atomic
replacement, versions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


# protobuf cannot serialise a model over 2 GB; past this much weight, models keep it in a .data file
EXTERNAL_DATA_BYTES = 1_800_000_000


def installed_versions(packages) -> dict:
    """{package: version} for those of `packages` that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def sha256_file(path: str | Path, h=None) -> str:
    """Hex sha256 of a file's bytes (streamed: engine files can be several GB)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(checkpoint: str | Path, vae_dir: str | Path | None = None) -> str:
    """sha256 over every config and weight file of a checkpoint (and of a drop-in VAE that replaces its own):
    equal iff the model that generates the images is the same. Export records it; engines carry it;
    benchmarks and drift name their work directories by it."""
    h = hashlib.sha256()
    for root, tag in ((Path(checkpoint), ""), *(((Path(vae_dir), "vae:"),) if vae_dir is not None else ())):
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".model",
                                                                                   ".txt")):
            h.update((tag + str(f.relative_to(root))).encode())
            sha256_file(f, h)
    return h.hexdigest()


def write_json_and_markdown(doc: dict, json_path: str | Path, render) -> tuple[Path, Path]:
    """A results document as JSON at `json_path` and its Markdown (`render(doc)`) beside it, as .md."""
    import json

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1))
    md = json_path.with_suffix(".md")
    md.write_text(render(doc))
    return json_path, md


def write_text_atomic(path: str | Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_mismatch(path: str | Path, size: int, sha256: str | None = None) -> str | None:
    """Why `path` is not the file a manifest or export record describes (missing, another size, or,
    when `sha256` is given, other bytes), or None when it is. The one size + hash check of sprintrt."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    have = path.stat().st_size
    if have != size:
        return f"{path} has {have} bytes, the record says {size}: it is truncated or was replaced"
    if sha256 is not None and sha256_file(path) != sha256:
        return f"{path} does not match its sha256 in the record: it was modified"
    return None
