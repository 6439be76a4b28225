"""Where a network's time goes, stage by stage, against this CPU's own fp32 matrix-multiply rate.

    python -m sprintrt.benchmarks.stage_profile ONNX_DIR [--component vae_decoder] [--sizes 512,1024]
        [--threads N] [-o results.json]

Runs the component's fp32 graph in ONNX Runtime (default optimisations, as its engines run) with ONNX Runtime's
profiler on the inputs of one SIZE² image, and sums each node's time and multiply-adds (weight elements x output
positions, from the profiler's shapes; weight layers only: the attention's products of two activations are timed
but not counted, so attention stages read low) per stage (the DC-AE decoder: conv_in, each up_blocks.N, the output
norm and conv_out). Each stage's GFLOP/s is set against the rate ONNX Runtime reaches on a large fp32 MatMul on
the same threads (`gemm_gflops`): a stage near that rate is compute-bound (tiling it for the cache cannot make
it faster; only fewer or cheaper multiply-adds can), one far below is bound by memory or by its kernels.
Issue #29 asks this of the DC-AE decoder on AVX2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sprintrt import machine
from sprintrt.runtime.engine import usable_cpus
from sprintrt.export_info import read_export_info
from sprintrt.specs import VAE_DECODER

# Stage of a node: the first match in its module path (the DC-AE decoder's stages by default).
STAGE_PATTERN = r"decoder\.(?:up_blocks\.\d+|conv_in|conv_out|norm_out)"
GEMM_SIDE = 2048  # large enough that the MatMul runs at its kernel's rate, small enough to time in a second


def _session(model, threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def gemm_gflops(threads: int | None = None, runs: int = 10) -> float:
    """fp32 GFLOP/s of one GEMM_SIDE³ MatMul in ONNX Runtime on `threads` threads: the best of `runs` (on a
    shared VM the median moved 106-143 GFLOP/s between runs; noise only ever slows a run down)."""
    from onnx import TensorProto, helper

    n = GEMM_SIDE
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = _session(model.SerializeToString(), threads)
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((n, n), dtype=np.float32) for x in "ab"}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def _scope(name: str, by_node: dict, by_output: dict) -> str | None:
    """The module path of a profiled node: ONNX Runtime's optimisers rename the nodes they rewrite ("X_nchwc" for
    the output X's convolution in its blocked layout, "node/FusionName/" for fused ones)."""
    for candidate in (name, name.split("/")[0], name.removesuffix("_nchwc")):
        if by_node.get(candidate) or by_output.get(candidate):
            return by_node.get(candidate) or by_output.get(candidate)
    return None


def _macs(op: str, inputs: list[dict], outputs: list[dict]) -> float:
    """Multiply-adds of one convolution or matrix multiply from its profiled shapes (0 for other ops)."""
    if not inputs or not outputs:
        return 0.0
    out = next(iter(outputs[0].values()))
    if op in ("Conv", "FusedConv") and len(inputs) > 1:
        weight = next(iter(inputs[1].values()))
        channels = out[1] * (out[4] if len(out) == 5 else 1)  # NCHWc: channel blocks x block size
        return float(np.prod(out)) * float(np.prod(weight)) / max(channels, 1)
    if op in ("MatMul", "FusedMatMul", "Gemm") and len(inputs) == 1:  # the profiler lists no initializer: x·W
        return float(np.prod(out)) * next(iter(inputs[0].values()))[-1]
    return 0.0  # other ops, and products of two activations (attention): timed, not counted


def _stage_of(scope: str | None, pattern: re.Pattern) -> str:
    found = pattern.findall(scope or "")
    return found[-1] if found else "other"


def profile_stages(onnx_path: Path, feeds: dict, threads: int | None = None) -> dict:
    """{"seconds": one run, "stages": {stage: {"seconds", "gmacs", "gflops"}}} of the fp32 graph on `feeds`
    (the second of two profiled runs: the first allocates)."""
    import onnx

    from sprintrt.onnx_scopes import module_scopes

    model = onnx.load(str(onnx_path), load_external_data=False)
    by_output = module_scopes(model)
    by_node = {n.name: by_output.get(n.output[0]) for n in model.graph.node if n.output}
    del model
    pattern = re.compile(STAGE_PATTERN)
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(str(onnx_path), threads, str(Path(tmp) / "profile"))
        session.run(None, feeds)
        t0 = time.perf_counter()
        session.run(None, feeds)
        seconds = time.perf_counter() - t0
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"] if runs else 0
    stages: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < last:
            continue
        args = e.get("args", {})
        row = stages.setdefault(_stage_of(_scope(e["name"][: -len("_kernel_time")], by_node, by_output), pattern),
                                {"seconds": 0.0, "gmacs": 0.0})
        row["seconds"] += e["dur"] / 1e6
        row["gmacs"] += _macs(args.get("op_name", ""), args.get("input_type_shape") or [],
                              args.get("output_type_shape") or []) / 1e9
    for row in stages.values():
        row["gflops"] = round(2 * row["gmacs"] / row["seconds"], 1) if row["seconds"] else 0.0
        row["seconds"], row["gmacs"] = round(row["seconds"], 4), round(row["gmacs"], 4)
    return {"seconds": round(seconds, 3), "stages": dict(sorted(stages.items()))}


def main(argv=None) -> None:
    from sprintrt import specs as S

    p = argparse.ArgumentParser(prog="python -m sprintrt.benchmarks.stage_profile", description=__doc__.split("\n")[0])
    p.add_argument("onnx_dir")
    p.add_argument("--component", default=VAE_DECODER, choices=[VAE_DECODER])
    p.add_argument("--sizes", default="512,1024", help="image sides, comma-separated (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    p.add_argument("-o", "--output", help="write the JSON here")
    args = p.parse_args(argv)
    info = read_export_info(args.onnx_dir)
    dims = S.ModelDims.from_json(info["model_dims"])
    spec = S.vae_decoder_spec(dims)
    doc = {"cpu": machine.cpu_target(), "usable_cpus": usable_cpus(),
           "component": args.component, "gemm_gflops": round(gemm_gflops(args.threads), 1), "sizes": {}}
    print(f"fp32 MatMul {GEMM_SIDE}³ in ONNX Runtime: {doc['gemm_gflops']} GFLOP/s", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        side = size // dims.vae_scale_factor
        feeds = spec.sample_inputs(spec.sizes("opt", batch=1, latent_height=side, latent_width=side))
        result = profile_stages(Path(args.onnx_dir) / f"{args.component}.onnx", feeds, args.threads)
        doc["sizes"][str(size)] = result
        print(f"{size}x{size}: {result['seconds']} s", flush=True)
        for stage, row in result["stages"].items():
            share = row["gflops"] / doc["gemm_gflops"] if doc["gemm_gflops"] else 0
            print(f"  {stage:20s} {row['seconds']:8.3f} s {row['gmacs']:9.2f} GMAC {row['gflops']:7.1f} GFLOP/s "
                  f"({share:.0%} of the MatMul rate)", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
