"""A real TensorRT ONNX parser's verdict on a graph, on any machine.

TensorRT for RTX (`pip install tensorrt-rtx-cu13`, module `tensorrt_rtx`) ships the same ONNX parser as
TensorRT and runs without a GPU, so export/ checks every graph it writes with it, and engines/ every
Q/DQ graph it builds from. Where only the full TensorRT is installed, its parser is used; where neither
is, there is no verdict (None) and the op-table lint (export/trt_lint.py) is all there is.
Networks are parsed strongly typed, as sprintrt builds them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# The parsers, in the order they are tried: TensorRT-RTX first, because it installs everywhere.
PARSER_MODULES = ("tensorrt_rtx", "tensorrt")


def parser_module():
    """The first importable TensorRT module with an ONNX parser, or None."""
    for name in PARSER_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # ImportError, or TensorRT's pip stub, which raises on import where it cannot install
            continue
        if hasattr(module, "OnnxParser"):
            return module
    return None


def parser_name() -> str | None:
    """'tensorrt_rtx 1.7.1.116' (the parser that gives verdicts here), or None."""
    trt = parser_module()
    return f"{trt.__name__} {trt.__version__}" if trt is not None else None


def parse_problems(path: str | Path) -> list[str] | None:
    """Why the parser rejects the ONNX file at `path`, one line per error ("node 119 'node_mean' (ReduceMean):
    ..."); [] when it parses; None when no parser is installed. External weights beside the file are read."""
    trt = parser_module()
    if trt is None:
        return None
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)  # the errors are returned, not printed
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return []
    problems = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node()} {e.node_name()!r} ({e.node_operator()})" if e.node() >= 0 else "the model"
        problems.append(f"{where}: {e.desc()}")
    return problems or ["the parser failed without saying why"]
