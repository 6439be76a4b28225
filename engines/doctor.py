"""`sprintrt doctor`: what this machine has and which engines it can build."""

from __future__ import annotations

import platform


def facts() -> dict:
    from sprintrt.engines import trt_build
    from sprintrt.engines.manifest import cpu_target

    out = {"cpu": cpu_target(), "python": platform.python_version(), "gpus": trt_build._gpus()}
    try:
        out["tensorrt"] = trt_build.versions()[trt_build.LIBRARY]
    except Exception as e:  # MissingDependencyError, or a TensorRT stub that fails to import
        out["tensorrt"] = None
        out["tensorrt_error"] = str(e).split(". Fix:")[0]
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime"] = None
    try:
        import openvino

        out["openvino"] = openvino.__version__
    except ImportError:
        out["openvino"] = None
    return out


def report() -> str:
    f = facts()
    cpu = f["cpu"]
    lines = [f"CPU          {cpu['name']} ({cpu['arch']}; {', '.join(cpu['isa']) or 'baseline ISA'})"]
    if f["gpus"]:
        for g in f["gpus"]:
            lines.append(f"GPU          {g['name']}, compute capability {g['compute_capability']}, driver {g['driver']}")
    else:
        lines.append("GPU          none visible (no nvidia-smi, or it lists no GPU)")
    lines.append(f"TensorRT     {f['tensorrt'] or 'not installed: ' + f.get('tensorrt_error', '')}")
    providers = ", ".join(f.get("onnxruntime_providers", []))
    lines.append(f"ONNX Runtime {f['onnxruntime'] or 'not installed'}{f' ({providers})' if providers else ''}")
    lines.append(f"OpenVINO     {f['openvino'] or 'not installed'}")
    can = []
    if f["onnxruntime"]:
        can.append("onnxruntime fp32 (CPU)")
    if f["gpus"] and f["tensorrt"]:
        cc = float(f["gpus"][0]["compute_capability"])
        precisions = ["fp32", "tf32", "fp16"] + (["bf16"] if cc >= 8.0 else []) + (["fp8"] if cc >= 8.9 else [])
        can.append(f"tensorrt {', '.join(precisions)} ({f['gpus'][0]['name']})")
    lines.append(f"can build    {'; '.join(can) or 'nothing: install onnxruntime'}")
    return "\n".join(lines)
