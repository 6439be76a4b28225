"""Export the three SANA-Sprint networks of a checkpoint to ONNX, each validated against PyTorch.

`export_model(model, out_dir)` writes text_encoder.onnx, transformer.onnx, vae_decoder.onnx (with
`<name>.onnx.data` external data when a graph's weights pass 2 GB), the tokenizer, and
export_info.json: the model's identity, the numbers that fix its I/O shapes (ModelDims), the
pipeline constants the runtime needs, and the validation records.

Exporter choices, each guarded by a regression test in tests/export/test_exporter_traps.py:
- the dynamo exporter (the legacy TorchScript exporter writes negative Transpose perms in the
  DC-AE decoder, which ONNX Runtime rejects);
- cross-attention runs BroadcastMaskSanaAttnProcessor (the dynamo exporter fails on diffusers'
  per-head mask `.view`);
- `optimize=False`, then Polygraphy's constant folding (`optimize=True` deletes the `+1e-15` of the
  linear attention's normaliser and the graph silently yields NaN where a column of keys is all zero).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

from dataclasses import asdict

from sprintrt import files
from sprintrt import specs as S
from sprintrt.defaults import DEFAULT_COMPLEX_HUMAN_INSTRUCTION, MAX_SEQUENCE_LENGTH_LIMIT, tokenized_length
from sprintrt.errors import ExportValidationError, InvalidInputError, ModelLoadError
from sprintrt.export_info import EXPORT_INFO
from sprintrt.export_info import FORMAT as EXPORT_INFO_FORMAT
from sprintrt.files import model_identity, sha256_file, write_text_atomic
from sprintrt.export.graph_passes import (SMALL_TENSOR_ELEMENTS, cancel_transpose_pairs, cast_expanded_constants,
                                          castlike_constants, fold_constants_onnxscript, fold_weight_transposes,
                                          prune_unused, sequences_to_split, typed_list_constants)
from sprintrt.onnx_scopes import module_scopes, restore_module_scopes

OPSET = 18


def onnx_filename(component: str) -> str:
    return f"{component}.onnx"


def resolve_model(model: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded into the Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{str(path)!r} has no model_index.json. Fix: pass the root of a diffusers "
                                 "SanaSprintPipeline checkpoint, or make one with `sprintrt make-checkpoint`")
        return path
    return download_from_hub("model", model, "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
                             ["*.json", "*.safetensors", "*.txt", "*.model"])


def download_from_hub(name: str, repo_id: str | Path, example: str, allow_patterns: list[str]) -> Path:
    """A hub snapshot (huggingface_hub, into its cache; safetensors and configs only, nothing pickled)."""
    missing = _missing_local_path(str(repo_id))
    if missing:
        raise ModelLoadError(f"{name}={str(repo_id)!r} does not exist ({missing}). Fix: check the path, or pass a hub "
                             f"id like {example!r}")
    if Path(repo_id).exists() or str(repo_id).count("/") != 1:
        raise ModelLoadError(f"{name}={str(repo_id)!r} is neither a directory nor a hub id like {example!r}. "
                             "Fix: check the path")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(repo_id), allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo: all mean the same to the user
        raise ModelLoadError(f"cannot download {str(repo_id)!r} from the hub: {e}. Fix: download it where the hub is "
                             "reachable and pass the local directory") from e


# A hub repository id: owner/name, letters, digits, "-", "_", "." (huggingface_hub's rule, without its length
# and "--" / ".." details, which a download then reports).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _missing_local_path(text: str) -> str | None:
    """Why `text`, which names no existing directory, is a local path that is missing rather than a hub id (None
    when it may be a hub id): it is absolute, starts with ./ ../ or ~, is no valid hub id, or its first folder
    exists here. The user then hears "does not exist", not that the hub could not be reached."""
    path = Path(text)
    if path.exists():  # a file: the caller says it is neither a checkpoint directory nor a hub id
        return None
    looks_local = (path.is_absolute() or text.startswith(("./", "../", ".\\", "..\\", "~"))
                   or not HUB_ID.fullmatch(text) or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
    if not looks_local:
        return None
    found = path.expanduser()
    while not found.exists() and found != found.parent:
        found = found.parent
    return f"the nearest folder that exists is {str(found)!r}" if found.exists() else "no part of it exists"


def exporter_fingerprint() -> str:
    """sha256 over the export code (this package's .py files and the specs its graphs are traced to: the
    files that decide what the graphs contain): an ONNX directory written by another version of them may
    hold different graphs."""
    h = hashlib.sha256()
    for f in [*sorted(Path(__file__).parent.glob("*.py")), Path(S.__file__)]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def resolve_vae(vae: str | Path) -> Path:
    """The directory of a drop-in AutoencoderDC (its config.json + weights): a local directory, the
    root of a pipeline checkpoint (its vae/ folder is used), or a hub id such as
    'mit-han-lab/dc-ae-lite-f32c32-sana-1.1-diffusers'."""
    path = Path(vae)
    if path.is_dir():
        for candidate in (path, path / "vae"):
            if (candidate / "config.json").is_file():
                return candidate
        raise ModelLoadError(f"vae={str(vae)!r} has no config.json (nor vae/config.json). Fix: pass a directory saved "
                             "by AutoencoderDC.save_pretrained, or a hub id")
    return download_from_hub("vae", vae, "mit-han-lab/dc-ae-lite-f32c32-sana-1.1-diffusers", ["*.json", "*.safetensors"])


def _check_drop_in_vae(own: dict, other: dict, where: Path) -> None:
    """A replacement decoder must read the transformer's latents and upsample them as much."""
    def shape(c: dict) -> tuple:
        return (c.get("latent_channels"), len(c.get("encoder_block_out_channels", [])),
                len(c.get("decoder_block_out_channels", [])))

    if shape(own) != shape(other):
        raise InvalidInputError(
            f"vae={str(where)!r} has (latent channels, encoder stages, decoder stages) = {shape(other)}, the model's "
            f"own VAE {shape(own)}: the transformer's latents would not fit it. Fix: pass a drop-in decoder for this "
            "model (same latent channels and 32x compression), e.g. DC-AE-Lite for SANA 1.1 / Sprint")


def resolve_controlnet(src: Path, controlnet: str | Path | None) -> Path | None:
    """The SanaControlNetModel directory to export: `controlnet` (a directory or a hub id such as a community
    diffusers conversion of NVlabs' SANA ControlNets), else the checkpoint's controlnet/ folder, else None."""
    from sprintrt.export.checkpoint import CONTROLNET_FOLDER

    if controlnet is None:
        own = src / CONTROLNET_FOLDER
        return own if (own / "config.json").is_file() else None
    path = Path(controlnet)
    if path.is_dir():
        for candidate in (path, path / CONTROLNET_FOLDER):
            if (candidate / "config.json").is_file():
                return candidate
        raise ModelLoadError(f"controlnet={str(controlnet)!r} has no config.json (nor controlnet/config.json). Fix: "
                             "pass a directory saved by SanaControlNetModel.save_pretrained, or a hub id")
    return download_from_hub("controlnet", controlnet, "ishan24/Sana_600M_1024px_ControlNet_diffusers",
                             ["*.json", "*.safetensors"])


def check_controlnet(transformer: dict, controlnet: dict, where: Path) -> None:
    """A ControlNet must produce residuals the transformer can add: the same hidden size, latent channels,
    text width and patch size, and fewer blocks than the transformer has (residual k is added after
    transformer block k + 1). Checked before any work."""
    def hidden(c: dict) -> int:
        return int(c.get("num_attention_heads", 0)) * int(c.get("attention_head_dim", 0))

    problems = []
    if hidden(controlnet) != hidden(transformer):
        problems.append(f"hidden size {hidden(controlnet)} (heads x head dim), the transformer's is {hidden(transformer)}")
    for key in ("in_channels", "caption_channels", "patch_size"):
        if controlnet.get(key) != transformer.get(key):
            problems.append(f"{key} {controlnet.get(key)}, the transformer's is {transformer.get(key)}")
    blocks, layers = int(controlnet.get("num_layers", 0)), int(transformer.get("num_layers", 0))
    if not 1 <= blocks < layers:
        problems.append(f"{blocks} blocks, expected 1..{layers - 1} (a residual is added after each transformer "
                        f"block 1..blocks; this transformer has {layers})")
    if transformer.get("patch_size", 1) != 1:
        problems.append(f"patch size {transformer.get('patch_size')}: sprintrt's ControlNet residuals assume 1 "
                        "(every SANA-Sprint model)")
    if problems:
        raise InvalidInputError(f"controlnet={str(where)!r} does not fit this model's transformer: "
                                f"{'; '.join(problems)}. Fix: pass a ControlNet trained for this model (same "
                                "architecture: 0.6B or 1.6B)")


def model_facts(src: Path, vae_dir: Path | None = None,
                controlnet_dir: Path | None = None) -> tuple[S.ModelDims, S.PipelineConstants]:
    """(ModelDims, pipeline constants) of a checkpoint directory (and a replacement VAE, and a ControlNet), from
    their configs and tokenizer only."""
    from sprintrt.export.checkpoint import load_tokenizer, read_config

    te, tr, vae = read_config(src, "text_encoder"), read_config(src, "transformer"), read_config(src, "vae")
    cn = None
    if controlnet_dir is not None:
        cn = read_config(controlnet_dir, ".")
        check_controlnet(tr, cn, controlnet_dir)
    if vae_dir is not None:
        replacement = json.loads((vae_dir / "config.json").read_text())
        _check_drop_in_vae(vae, replacement, vae_dir)
        vae = replacement
    sched = read_config(src, "scheduler", "scheduler_config.json")
    n_chi = len(load_tokenizer(src).encode("\n".join(DEFAULT_COMPLEX_HUMAN_INSTRUCTION)))
    vae_scale_factor = 2 ** (len(vae["encoder_block_out_channels"]) - 1)  # as SanaSprintPipeline computes it
    dims = S.ModelDims(
        vocab_size=int(te["vocab_size"]), text_hidden=int(te["hidden_size"]),
        latent_channels=int(tr.get("in_channels", 32)), vae_scale_factor=vae_scale_factor,
        text_len_max=max(tokenized_length(MAX_SEQUENCE_LENGTH_LIMIT, n_chi), MAX_SEQUENCE_LENGTH_LIMIT),
        text_layers=int(te["num_hidden_layers"]), text_kv_heads=int(te["num_key_value_heads"]),
        text_head_dim=int(te.get("head_dim") or te["hidden_size"] // te["num_attention_heads"]),
        chi_tokens=n_chi,
        controlnet_blocks=int(cn["num_layers"]) if cn else 0,
        transformer_hidden=int(tr["num_attention_heads"]) * int(tr["attention_head_dim"]) if cn else 0)
    constants = S.PipelineConstants(
        sigma_data=float(sched.get("sigma_data", 0.5)),
        guidance_embeds_scale=float(tr.get("guidance_embeds_scale", 0.1)),
        sample_size=int(tr.get("sample_size", 32)),
        vae_scaling_factor=float(vae.get("scaling_factor", 1.0)))
    return dims, constants


def wrapper_for(component: str, module):
    """The export wrapper of one loaded network (see export/wrappers.py)."""
    from sprintrt.export.wrappers import (ControlledTransformerWrapper, ControlNetWrapper, TextEncoderWrapper,
                                          TransformerWrapper, VaeDecoderWrapper, VaeEncoderWrapper)

    cls = {S.TEXT_ENCODER: TextEncoderWrapper, S.TRANSFORMER: TransformerWrapper, S.VAE_DECODER: VaeDecoderWrapper,
           S.VAE_ENCODER: VaeEncoderWrapper, S.CONTROLNET: ControlNetWrapper,
           S.CONTROLLED_TRANSFORMER: ControlledTransformerWrapper}
    return cls[component](module).eval()


def _trace(module, spec: S.ComponentSpec):
    """torch module → torch.onnx.ONNXProgram with the spec's names and dynamic axes (not yet folded)."""
    import torch
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    _quiet_exporter_logs()
    feeds = spec.sample_inputs(spec.sizes("sample"))
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    dims = {n: torch.export.Dim(n, min=d.min, max=d.max) for n, d in spec.dims().items()}
    def axis(d):  # a latent axis is a Dim; the encoder's pixel axes are derived dims (latent x factor)
        return dims[d.name] if isinstance(d, S.Dim) else dims[d.dim.name] * d.factor

    dynamic = tuple({i: axis(d) for i, d in enumerate(t.dims) if isinstance(d, (S.Dim, S.Scaled))} for t in spec.inputs)
    # The exporter prints its progress to stdout; keep it for the error message if it fails.
    log = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(log):
        return torch.onnx.export(
            module, args, dynamic_shapes=dynamic, dynamo=True, optimize=False, opset_version=OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs], verbose=False)


def finish_graph(proto, fold: bool = True, base_dir: Path | None = None):
    """The graph passes every export gets (export/graph_passes.py), with Polygraphy's constant folding, then
    onnxscript's for what ONNX Runtime cannot evaluate. With fold=False (graphs over 2 GB, weights in external
    data under `base_dir`) only small tensors are folded."""
    from polygraphy.backend.onnx import fold_constants

    typed_list_constants(proto)
    if fold:
        from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
        from polygraphy.logger import G_LOGGER

        scopes = module_scopes(proto)
        # Both loggers print to stdout; their warnings (a bf16 constant ONNX Runtime cannot evaluate: the onnxscript
        # fold below takes it) are not the user's to act on.
        G_LOGGER.module_severity, GS_LOGGER.severity = G_LOGGER.ERROR, GS_LOGGER.ERROR
        proto = fold_constants(proto, num_passes=None, fold_shapes=True, error_ok=False)
        restore_module_scopes(proto, scopes)
    sequences_to_split(proto)
    castlike_constants(proto)
    cast_expanded_constants(proto)
    cancel_transpose_pairs(proto)
    # After the rewrites above: onnxscript's folder rewrites sequence ops its own way, leaving some behind.
    fold_constants_onnxscript(proto, *((None, None) if fold else (base_dir, SMALL_TENSOR_ELEMENTS)))
    prune_unused(proto)
    return proto


def trace_to_onnx(module, spec: S.ComponentSpec):
    """torch module → folded onnx.ModelProto, in memory (models whose weights fit in protobuf's 2 GB)."""
    program = _trace(module, spec)
    proto = program.model_proto
    del program
    return finish_graph(proto)


def trace_to_onnx_file(module, spec: S.ComponentSpec, path: Path) -> None:
    """Large models: the exporter streams the weights straight from the torch tensors into
    `<path>.data`; the graph passes then run on the graph alone. No protobuf copy of the weights is
    ever made, and no general constant folding (it would load every weight again): small constants
    (shape arithmetic) are folded, the weights' Transposes one tensor at a time (fold_weight_transposes)."""
    import onnx

    program = _trace(module, spec)
    program.save(str(path), external_data=True)
    del program
    gc.collect()
    proto = onnx.load(str(path), load_external_data=False)
    finish_graph(proto, fold=False, base_dir=path.parent)
    fold_weight_transposes(proto, path.parent)  # rewrites those weights inside <path>.data
    onnx.save_model(proto, str(path))  # the initializers still point into <path>.data


def _quiet_exporter_logs() -> None:
    """The exporter logs a warning per missing torchvision op and ORT (used by the folding) one per
    node it cannot simplify; neither is actionable, and they bury the validation report."""
    import logging

    import onnxruntime as ort

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)


def save_onnx(proto, path: Path) -> None:
    """Save, with external data `<name>.onnx.data` when the weights would overflow protobuf."""
    import onnx

    weight_bytes = sum(len(init.raw_data) for init in proto.graph.initializer)
    if weight_bytes > files.EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def onnx_variant_filename(component: str, dtype: str) -> str:
    return f"{component}.{dtype}.onnx"


def _file_record(path: Path) -> dict:
    data = path.with_name(path.name + ".data")
    sidecar = {"file": data.name, "bytes": data.stat().st_size, "sha256": sha256_file(data)} if data.exists() else None
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), "external_data": sidecar}


def export_variant(src: Path, component: str, dtype: str, out_dir: Path, dims: S.ModelDims, references,
                   validate: bool = True, vae_dir: Path | None = None, controlnet_dir: Path | None = None) -> dict:
    """Export the `dtype` variant of one component (typed torch export, fp32 I/O), check its fp32 islands
    and validate it against the fp32 PyTorch outputs `references` (validate.reference_outputs). Returns its
    variant record."""
    import onnx

    from sprintrt.export import typed
    from sprintrt.export.checkpoint import load_component
    from sprintrt.export.trt_lint import lint
    from sprintrt.export.validate import validate_variant

    spec = S.SPEC_BUILDERS[component](dims)
    inner = wrapper_for(component, load_component(src, component, torch_dtype=typed.torch_dtype(dtype), vae_dir=vae_dir,
                                                  controlnet_dir=controlnet_dir))
    module = typed.typed_wrapper(inner, component, dtype, spec)
    path = out_dir / onnx_variant_filename(component, dtype)
    t0 = time.perf_counter()
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if weight_bytes > files.EXTERNAL_DATA_BYTES:
        trace_to_onnx_file(module, spec, path)
    else:
        save_onnx(trace_to_onnx(module, spec), path)
    del module, inner
    gc.collect()
    seconds = time.perf_counter() - t0
    graph = onnx.load(str(path), load_external_data=False)  # weights over 2 GB stay where they are
    if typed.enforce_islands(graph, component):
        onnx.save_model(graph, str(path))
    islands = typed.check_islands(graph, component, dtype)
    records = validate_variant(path, references, spec, dtype, typed.RULES[component].min_cosine[dtype]) if validate else []
    return {**_file_record(path), "dtype": dtype, "export_seconds": round(seconds, 2), "validation": records,
            "fp32": islands, "trt_lint": [str(f) for f in lint(path)]}


def export_component(src: Path, component: str, out_dir: Path, dims: S.ModelDims, validate: bool = True,
                     vae_dir: Path | None = None, dtypes=("fp32",), controlnet_dir: Path | None = None) -> dict:
    """Export one component to out_dir/<component>.onnx (and its 16-bit `dtypes` variants) and validate it.
    Returns its export record."""
    from sprintrt.export.checkpoint import load_component
    from sprintrt.export.validate import reference_outputs, validate_onnx

    spec = S.SPEC_BUILDERS[component](dims)
    module = wrapper_for(component, load_component(src, component, vae_dir=vae_dir, controlnet_dir=controlnet_dir))
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    t0 = time.perf_counter()
    path = out_dir / onnx_filename(component)
    if weight_bytes > files.EXTERNAL_DATA_BYTES:
        trace_to_onnx_file(module, spec, path)
    else:
        save_onnx(trace_to_onnx(module, spec), path)
    gc.collect()
    seconds = time.perf_counter() - t0
    records = validate_onnx(path, module, spec) if validate else []
    from sprintrt.export.trt_lint import lint

    findings = [str(f) for f in lint(path)]
    from sprintrt.export.typed import variant_dtypes

    wanted = variant_dtypes(component, dtypes)
    references = reference_outputs(module, spec) if validate and wanted else None
    del module
    gc.collect()  # free this network before its variants are traced and run, and before the next one is loaded
    variants = {d: export_variant(src, component, d, out_dir, dims, references, validate, vae_dir, controlnet_dir)
                for d in wanted}
    parser = check_with_trt_parser([path, *(out_dir / v["file"] for v in variants.values())])
    return {**_file_record(path), "export_seconds": round(seconds, 2), "validation": records,
            "trt_lint": findings, "trt_parser": parser, "spec": spec.to_json(), "variants": variants}


def check_with_trt_parser(paths) -> str | None:
    """Parse each graph with a real TensorRT ONNX parser (sprintrt/trt_parser.py: TensorRT-RTX's runs on any
    machine): a rejection is an ExportValidationError naming the node, its op and the parser's reason, and the
    export writes nothing. Returns the parser's name, or None where none is installed (then the op-table lint,
    trt_lint, is the only TensorRT check)."""
    from sprintrt.trt_parser import parse_problems, parser_name

    name = parser_name()
    if name is None:
        return None
    for path in paths:
        problems = parse_problems(path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ExportValidationError(
                f"{path.name} is rejected by TensorRT's ONNX parser ({name}): {problems[0]}{more}. Nothing was "
                "written. Fix: this is a gap in sprintrt's export for this model: report it with the checkpoint's "
                "config.json files; meanwhile `--dtypes fp32` or a CPU backend avoid the graph that fails")
    return name


def export_model(model: str | Path, out_dir: str | Path, components=None, validate: bool = True,
                 progress=None, vae: str | Path | None = None, dtypes=None,
                 controlnet: str | Path | None = None) -> Path:
    """Export `components` of a checkpoint (dir or hub id) into out_dir. Returns out_dir.

    `dtypes` ("fp32,bf16,fp16" or a sequence; default fp32 and bf16) adds a strongly typed 16-bit
    variant per component beside each fp32 graph (export/typed.py), recorded under
    components[c]["variants"][dtype].

    `vae` replaces the checkpoint's VAE decoder with a drop-in AutoencoderDC (e.g. DC-AE-Lite), as
    `SanaSprintPipeline.from_pretrained(model, vae=AutoencoderDC.from_pretrained(vae))` would.

    `controlnet` (a SanaControlNetModel directory or hub id; default: the checkpoint's controlnet/ folder if
    it has one) adds the `controlnet` and `controlled_transformer` components. `components` defaults to
    every component the model has.

    The files are written into a temporary sibling directory and moved in place only when every
    export passed validation, so a failure never leaves a half-written ONNX directory behind.
    """
    from sprintrt.defaults import DEFAULT_EXPORT_DTYPES
    from sprintrt.export.typed import parse_dtypes

    dtypes = parse_dtypes(DEFAULT_EXPORT_DTYPES if dtypes is None else dtypes)
    unknown = [c for c in components or () if c not in S.COMPONENTS]
    if unknown or (components is not None and not components):
        raise InvalidInputError(f"components={list(components)!r} is not allowed: expected a non-empty subset of "
                                f"{list(S.COMPONENTS)}. Fix: name components from that list")
    from sprintrt.export.checkpoint import load_tokenizer

    src = resolve_model(model)
    vae_dir = resolve_vae(vae) if vae is not None else None
    controlnet_dir = resolve_controlnet(src, controlnet)
    if components is None:
        components = tuple(c for c in S.COMPONENTS if controlnet_dir or c not in S.OPTIONAL_COMPONENTS)
    elif controlnet_dir is None and any(c in S.OPTIONAL_COMPONENTS for c in components):
        raise InvalidInputError(f"components={list(components)!r} asks for the ControlNet, and {str(model)!r} has no "
                                "controlnet/ folder. Fix: pass --controlnet PATH_OR_HUB_ID, or drop "
                                f"{[c for c in components if c in S.OPTIONAL_COMPONENTS]}")
    dims, constants = model_facts(src, vae_dir, controlnet_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / EXPORT_INFO).is_file():
        raise InvalidInputError(f"out_dir={str(out_dir)!r} exists and is not an sprintrt ONNX directory. "
                                "Fix: choose a new or empty directory (nothing there was touched)")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = {
            "format": EXPORT_INFO_FORMAT,
            # The identity covers a replacement VAE too: engines of another decoder are another model's.
            "model": {"source": str(model), "identity": model_identity(src, vae_dir, controlnet_dir),
                      **({"vae": {"source": str(vae), "identity": model_identity(vae_dir)}} if vae_dir else {}),
                      **({"controlnet": {"source": str(controlnet or controlnet_dir),
                                         "identity": model_identity(controlnet_dir)}} if controlnet_dir else {})},
            "model_dims": asdict(dims),
            "pipeline": asdict(constants),
            "opset": OPSET,
            "exporter": exporter_fingerprint(),
            "versions": files.installed_versions(("torch", "diffusers", "transformers", "onnx", "onnxscript",
                                                  "polygraphy", "onnxruntime")),
            "components": {},
        }
        load_tokenizer(src).save_pretrained(tmp / "tokenizer")
        for component in components:
            if progress:
                progress(component)
            info["components"][component] = export_component(src, component, tmp, dims, validate, vae_dir, dtypes,
                                                             controlnet_dir)
        write_text_atomic(tmp / EXPORT_INFO, json.dumps(info, indent=1))
        if out_dir.exists():  # an earlier export of ours: replace it whole
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

