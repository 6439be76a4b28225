"""`sprintrt doctor`: what this machine has and which engines it can build."""

from __future__ import annotations

import platform

from sprintrt import machine


def facts() -> dict:
    return {"cpu": machine.cpu_target(), "python": platform.python_version(), "gpus": machine.gpus(),
            "tensorrt": machine.library_version("tensorrt"), "openvino": machine.library_version("openvino"),
            "onnxruntime": machine.library_version("onnxruntime"), "onnxruntime_providers": _ort_providers(),
            "nncf": machine.library_version("nncf")}


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def can_build(f: dict) -> list[str]:
    """One line per backend this machine can build engines with, and in which precisions."""
    from sprintrt.engines import trt_build

    cpu = f["cpu"]
    lines = []
    if f["onnxruntime"]:
        int8 = "int8 (Q/DQ: text encoder, transformer, VAE decoder) with 7-bit weights (no VNNI: 8-bit int8 " \
            "kernels saturate)" if not machine.cpu_has_int8_dot(cpu) else "int8 (Q/DQ: text encoder, transformer, VAE decoder)"
        lines.append(f"onnxruntime fp32, fp16 (typed variants), {int8} (CPU)")
    if f["openvino"]:
        bf16 = "bf16 (this CPU has bf16 instructions; the default)" if machine.cpu_has_bf16(cpu) \
            else "bf16 emulated, slow (no AVX512-BF16/AMX here; fp32 is the default)"
        int8w = "int8w (int8 weights, NNCF: text encoder, transformer)" if f.get("nncf") \
            else "int8w needs nncf (pip install nncf)"
        lines.append(f"openvino fp32, {bf16}, int8 (the same Q/DQ graphs), {int8w} (CPU)")
    if f["gpus"] and f["tensorrt"]:
        gpu = f["gpus"][0]
        cc = tuple(int(x) for x in gpu["compute_capability"].split(".")[:2])
        precisions = ["fp32", "tf32", "fp16", "int8"]
        if cc >= trt_build.BF16_MIN_COMPUTE_CAPABILITY:
            precisions.append("bf16")
        if cc >= trt_build.FP8_MIN_COMPUTE_CAPABILITY:
            precisions.append("fp8")
        lines.append(f"tensorrt {', '.join(precisions)} ({gpu['name']})")
    return lines


def report() -> str:
    from sprintrt.engines import trt_build

    f = facts()
    cpu = f["cpu"]
    lines = [f"CPU          {cpu['name']} ({cpu['arch']}; {', '.join(cpu['isa']) or 'baseline ISA'})"]
    if f["gpus"]:
        for g in f["gpus"]:
            lines.append(f"GPU          {g['name']}, compute capability {g['compute_capability']}, driver {g['driver']}")
    else:
        lines.append("GPU          none visible (no nvidia-smi, or it lists no GPU)")
    missing_trt = 'not installed (pip install -e ".[tensorrt]" on a GPU machine)'
    lines.append(f"TensorRT     {f['tensorrt'] or missing_trt}")
    lines.append("             every TensorRT version: strongly typed networks (TensorRT 11 has no weak typing): fp32, "
                 "tf32, bf16/fp16 from the export's typed variants (`export --dtypes`), int8/fp8 from Q/DQ graphs; "
                 f"bf16 needs compute capability >= {'.'.join(map(str, trt_build.BF16_MIN_COMPUTE_CAPABILITY))}, fp8 "
                 f">= {'.'.join(map(str, trt_build.FP8_MIN_COMPUTE_CAPABILITY))}")
    providers = ", ".join(f["onnxruntime_providers"])
    lines.append(f"ONNX Runtime {f['onnxruntime'] or 'not installed'}{f' ({providers})' if providers else ''}")
    lines.append(f"OpenVINO     {f['openvino'] or 'not installed (pip install openvino)'}")
    can = can_build(f)
    lines.append(f"can build    {can[0] if can else 'nothing: install onnxruntime or openvino'}")
    lines += [f"             {line}" for line in can[1:]]
    from sprintrt.engines.backend import auto_backend

    if auto_backend() == "tensorrt":
        lines.append("--backend auto picks tensorrt here")
    else:
        lines.append(f"--backend auto times every CPU candidate per component here (--no-tune: {auto_backend()})")
    return "\n".join(lines)


def tuning_report(engine_dir) -> str:
    """What `--backend auto` measured and chose for an engine directory."""
    from sprintrt.engines.manifest import read_manifest
    from sprintrt.engines.tune import table

    manifest = read_manifest(engine_dir)
    return "\n".join([f"engines in {manifest.root}:", *(f"  {line}" for line in table(manifest.data))])
