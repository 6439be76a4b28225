"""`sprintrt doctor`: what this machine has and which engines it can build, backend by backend."""

from __future__ import annotations

import platform

from sprintrt import machine
from sprintrt.engines.registry import BUILD_BACKENDS, auto_backend, backend_module, tunes_here
from sprintrt.errors import MissingDependencyError


def backend_lines() -> tuple[list[str], list[str]]:
    """(one line per backend this machine can build with: its precisions; one per backend it cannot: why)."""
    can, cannot = [], []
    for name in BUILD_BACKENDS:
        mod = backend_module(name)
        try:
            target = mod.build_target()
            versions = mod.library_versions()
        except MissingDependencyError as e:
            cannot.append(f"{name}: {e}")
            continue
        can.append(f"{name} {mod.capabilities(target)} [{', '.join(f'{k} {v}' for k, v in versions.items())}]")
    return can, cannot


def report() -> str:
    cpu = machine.cpu_target()
    lines = [f"CPU          {cpu['name']} ({cpu['arch']}; {', '.join(cpu['isa']) or 'baseline ISA'})",
             f"Python       {platform.python_version()}"]
    gpus = machine.gpus()
    for g in gpus:
        lines.append(f"GPU          {g['name']}, compute capability {g['compute_capability']}, driver {g['driver']}")
    if not gpus:
        lines.append("GPU          none visible (no nvidia-smi, or it lists no GPU)")
    can, cannot = backend_lines()
    lines.append(f"can build    {can[0] if can else 'nothing: install onnxruntime or openvino'}")
    lines += [f"             {line}" for line in can[1:]]
    lines += [f"cannot build {cannot[0]}", *(f"             {line}" for line in cannot[1:])] if cannot else []
    try:
        auto = auto_backend()
    except MissingDependencyError:
        return "\n".join(lines)
    if tunes_here(auto):
        lines.append(f"--backend auto times every CPU candidate per component here (--no-tune: {auto})")
    else:
        lines.append(f"--backend auto picks {auto} here")
    return "\n".join(lines)


def tuning_report(engine_dir) -> str:
    """What `--backend auto` measured and chose for an engine directory."""
    from sprintrt.manifest import read_manifest

    manifest = read_manifest(engine_dir)
    return "\n".join([f"engines in {manifest.root}:", *(f"  {line}" for line in tuning_table(manifest.data))])


def tuning_table(manifest: dict) -> list[str]:
    """The tuning record (sprintrt/tuning/tune.py) of an engine directory's manifest, one line per candidate."""
    lines = []
    for comp, entry in manifest["components"].items():
        tuning = entry.get("tuning")
        if not tuning:
            lines.append(f"{comp:13s} {entry['backend']}:{entry['precision']} (not tuned)")
            continue
        if tuning.get("skipped"):
            lines.append(f"{comp:13s} {tuning['skipped']}")
        for row in tuning["candidates"]:
            mark = "chosen" if row["candidate"] == tuning["chosen"] else ""
            if "error" in row:
                lines.append(f"{comp:13s} {row['candidate']:18s} {row['error']}")
                continue
            if "skipped" in row:  # not built: a rule made it unnecessary
                lines.append(f"{comp:13s} {row['candidate']:18s} not built ({row['skipped']})")
                continue
            if "dropped" in row:  # screened out at the smaller size, never timed at the tuning size
                lines.append(f"{comp:13s} {row['candidate']:18s} {row['screen_seconds']:9.3f} s at "
                             f"{tuning.get('screen_size')}x{tuning.get('screen_size')}: dropped ({row['dropped']})")
                continue
            psnr = f"  PSNR {row['psnr_db']:.1f} dB" if "psnr_db" in row else ""
            floor = f"cosine {tuning['min_cosine']}" + (f", {tuning['min_psnr_db']} dB" if "min_psnr_db" in tuning else "")
            gate = "ok" if row["passed"] else f"below the gate ({floor})"
            lines.append(f"{comp:13s} {row['candidate']:18s} {row['seconds']:9.3f} s  cosine {row['cosine']:.6f}{psnr}  "
                         f"{gate} {mark}".rstrip())
    return lines
