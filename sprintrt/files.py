"""Helpers shared by export/, engines/, runtime/ and the CLI: content hashes (files, the model's identity),
atomic replacement, output paths, the keys of the JSON file contracts, versions."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path

from sprintrt.errors import invalid


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


# Inside `hashes_remembered()`: {(path, device, inode, size, mtime_ns): sha256} of the files checked so far.
_REMEMBERED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sprintrt_remembered_hashes", default=None)


@contextlib.contextmanager
def hashes_remembered():
    """Within this block `file_mismatch` hashes a file once while its inode, size and modification time stay the
    same (sprintrt's writers replace a file by renaming a new one over it: a new inode). The tuner builds dozens of candidates
    from the same multi-GB ONNX files, and each build checks its source: measured at real size (2-vCPU Intel Xeon
    with AMX), re-hashing them took 125 s of a 27 min `--backend auto` run. Outside it every check hashes."""
    token = _REMEMBERED.set(_REMEMBERED.get() if _REMEMBERED.get() is not None else {})
    try:
        yield
    finally:
        _REMEMBERED.reset(token)


def _checked_sha256(path: Path) -> str:
    remembered = _REMEMBERED.get()
    if remembered is None:
        return sha256_file(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in remembered:
        remembered[key] = sha256_file(path)
    return remembered[key]


def model_identity(checkpoint: str | Path, vae_dir: str | Path | None = None,
                   controlnet_dir: str | Path | None = None) -> str:
    """sha256 over every config and weight file of a checkpoint (and of a drop-in VAE that replaces its own, and
    of a ControlNet kept outside it): equal iff the model that generates the images is the same. Export
    records it; engines carry it; benchmarks and drift name their work directories by it."""
    h = hashlib.sha256()
    roots = [(Path(checkpoint), ""), *(((Path(vae_dir), "vae:"),) if vae_dir is not None else ())]
    if controlnet_dir is not None and not Path(controlnet_dir).resolve().is_relative_to(Path(checkpoint).resolve()):
        roots.append((Path(controlnet_dir), "controlnet:"))
    for root, tag in roots:
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
    with replacing(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def replacing(path: str | Path):
    """Yield a temporary path beside `path` to write; when the block succeeds the file is synced to disk and
    renamed over `path` in one step, when it fails (a full disk, an interrupt) it is removed. Either way a
    reader of `path` sees the old file or the complete new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the rename must not reach the disk before the bytes do
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: str | Path, name: str = "output") -> Path:
    """Where a command will write a file, checked before any work is done: not a directory, in a folder that
    exists or can be created, and that this process may write (the file is replaced by a rename in it)."""
    path = Path(path)
    if path.is_dir():
        raise invalid(name, str(path), "a file path, not a directory", f"name a file in it, e.g. {path / 'image.png'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists: the rest is created
        folder = folder.parent
    if not folder.is_dir():
        raise invalid(name, str(path), f"a path whose folders can be created, but {folder} is a file",
                      "pick another folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise invalid(name, str(path), f"a path in a folder this process may write; {folder} is not writable",
                      "pick another folder, or fix its permissions")
    return path


def file_mismatch(path: str | Path, size: int, sha256: str | None = None) -> str | None:
    """Why `path` is not the file a manifest or export record describes (missing, another size, or,
    when `sha256` is given, other bytes), or None when it is. The one size + hash check of sprintrt."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    have = path.stat().st_size
    if have != size:
        return f"{path} has {have} bytes, the record says {size}: it is truncated or was replaced"
    if sha256 is not None and _checked_sha256(path) != sha256:
        return f"{path} does not match its sha256 in the record: it was modified"
    return None


def missing_key(data, keys: dict, prefix: str = "") -> str | None:
    """The first key of `keys` ({key: nested keys dict, or None for a leaf}) that `data` lacks, dotted
    (e.g. "components.transformer.io.dims"), or None when every key is there. `keys` may hold "*": every
    item of a dict. Readers of manifest.json and export_info.json name it in their error instead of a KeyError."""
    if not isinstance(data, dict):
        return prefix.rstrip(".") or "(the top level)"
    for key, sub in keys.items():
        items = data.items() if key == "*" else [(key, data.get(key))] if key in data else None
        if items is None:
            return f"{prefix}{key}"
        for name, value in items:
            found = missing_key(value, sub, f"{prefix}{name}.") if sub is not None else None
            if found:
                return found
    return None
