"""What this machine is: CPU ISA, NVIDIA GPUs, which engine libraries are installed.

The one place that probes the machine (/proc/cpuinfo, nvidia-smi, imports of optional libraries).
Nothing here runs at import time: every probe is a function, called when a decision needs it.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from pathlib import Path

# The ISA features that change which kernels and layouts ONNX Runtime / OpenVINO pick, so they are
# part of a CPU engine's target (and key).
KERNEL_ISA = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                        "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve", "avx512_fp16", "asimdhp"})
# bf16 arithmetic in hardware (OpenVINO's bf16 kernels; PyTorch bf16 is ~500x slower without it).
BF16_ISA = frozenset({"avx512_bf16", "amx_bf16"})
# fp16 arithmetic in hardware (ONNX Runtime's fp16 kernels; without it fp16 graphs run slower than fp32).
FP16_ISA = frozenset({"avx512_fp16", "asimdhp"})
# int8 dot products that accumulate u8 x s8 straight into int32. Without them x86 int8 kernels use
# VPMADDUBSW, whose pairwise int16 sums saturate (see engines/quantize.py).
INT8_DOT_ISA = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_target() -> dict:
    """The CPU this process runs on: what a CPU engine was specialised for (name, arch, kernel ISA)."""
    name, arch, isa = _probe_cpu()
    return {"kind": "cpu", "arch": arch, "name": name, "isa": list(isa)}


@functools.lru_cache(maxsize=1)
def _probe_cpu() -> tuple[str, str, tuple[str, ...]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, platform.machine(), tuple(sorted(flags & KERNEL_ISA))


def cpu_has_bf16(target: dict | None = None) -> bool:
    return bool(BF16_ISA & set((target or cpu_target())["isa"]))


def cpu_has_fp16(target: dict | None = None) -> bool:
    return bool(FP16_ISA & set((target or cpu_target())["isa"]))


def cpu_has_int8_dot(target: dict | None = None) -> bool:
    """VNNI / AMX-INT8 (x86), or any non-x86 CPU (ARM's int8 dot products do not saturate)."""
    target = target or cpu_target()
    if target.get("arch") not in ("x86_64", "AMD64", "i686", "i386"):
        return True
    return bool(INT8_DOT_ISA & set(target["isa"]))


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[dict]:
    """NVIDIA GPUs nvidia-smi lists (name, compute capability, driver); [] when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        name, cc, driver = (p.strip() for p in line.split(","))
        found.append({"kind": "gpu", "name": name, "compute_capability": cc, "driver": driver})
    return found


def library_version(module: str) -> str | None:
    """The version of an installed engine library (onnxruntime, openvino, tensorrt), or None."""
    try:
        mod = __import__(module)
    except Exception:  # ImportError, or a broken stub (TensorRT's pip stub raises on import)
        return None
    return getattr(mod, "__version__", None)


NO_GPU = "no NVIDIA GPU is visible (nvidia-smi is missing or lists none)"


def gpu_target() -> dict:
    """The GPU engines are built for and run on (device 0, or $CUDA_VISIBLE_DEVICES' first): name and compute
    capability. Raises MissingDependencyError when there is none."""
    from sprintrt.errors import MissingDependencyError

    found = gpus()
    if not found:
        raise MissingDependencyError(NO_GPU)
    return {"kind": "gpu", "name": found[0]["name"], "compute_capability": found[0]["compute_capability"]}


def compute_capability(text: str) -> tuple[int, int]:
    """"8.9" → (8, 9): a GPU's compute capability as a comparable pair."""
    major, _, minor = str(text).strip().partition(".")
    return int(major), int(minor or 0)


def current_target(kind: str) -> dict:
    """This machine as a target of `kind` ("cpu" or "gpu"), to compare with the target an engine was built for."""
    return cpu_target() if kind == "cpu" else gpu_target()
