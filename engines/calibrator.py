"""Activation ranges for the Q/DQ graphs: ONNX Runtime's calibrators, run with one copy of the weights in memory and
their augmented graphs never written, on the tensors the quantizer reads only, and with the min/max calibrator's
graph augmentation in linear time (engines/quantize.py writes the graphs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.calibrate import DistributionCalibrater, MinMaxCalibrater


class _Feeds:
    """ONNX Runtime's CalibrationDataReader over a list of feed dicts, readable in strides (ORT's
    CalibStridedMinMax folds each stride into running min/max ranges, which bounds memory)."""

    def __init__(self, feeds: list[dict]):
        self._feeds, self._it = feeds, iter(feeds)

    def __len__(self):
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int):
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


class _Only:
    """A calibrator that records only the tensors in `only` (None: every tensor ORT would) of those its
    select_tensors_to_calibrate picks (the op types asked for, float tensors)."""

    only: frozenset | None = None

    def select_tensors_to_calibrate(self, model):
        tensors, value_infos = super().select_tensors_to_calibrate(model)
        if self.only is not None:
            tensors = {t for t in tensors if t in self.only}
        return tensors, value_infos


def _graph_with_shape_infer(model_path: Path) -> onnx.ModelProto:
    """ONNX Runtime's load_model_with_shape_infer without the weights: a graph whose weights are in a file keeps
    referring to that file (the inferred copy is written beside `model_path`, as ORT's is, so the references stay
    valid; under a name of this process's own, where ORT's is fixed)."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = model_path.with_name(f".{model_path.stem}-inferred.{os.getpid()}{model_path.suffix}")
    try:
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    add_infer_metadata(model)
    return model


class _InMemory:
    """A calibrator whose augmented graph is never written: the weights stay in the source's file.

    The graph is loaded without them (where they are in a file), and the augmented graph's session is created
    from its serialised bytes, reading them from the source's directory. ORT's own calibrators load every weight
    into the graph, then save the augmented copy with all of them (the real text encoder: 10 GB read, then 10 GB
    written per calibration) and load them a third time into their session. Measured on the real transformer
    (2.4 GB, 2-vCPU Intel Xeon with AMX), min/max: loading and augmenting 20-50 s that way (the disk's speed
    varied), 0.2 s this way; peak memory of 12 samples' calibration 9.5 -> 5.0 GB."""

    def __init__(self, model_path: Path, *args, **kwargs):
        from onnxruntime.quantization import calibrate

        original, calibrate.load_model_with_shape_infer = calibrate.load_model_with_shape_infer, _graph_with_shape_infer
        try:
            super().__init__(Path(model_path), *args, **kwargs)
        finally:
            calibrate.load_model_with_shape_infer = original
        self.weights_dir = Path(model_path).parent

    kept: list | None = None  # a list: each run's first graph output is appended to it (_Keeping)

    def create_inference_session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrator runs
        # As the sensitivity's sessions run (engines/sensitivity.py _session), so the kept outputs are its fp32
        # reference bit for bit; one run per sample does not pay for packing the weights first either.
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.weights_dir))
        self.infer_session = ort.InferenceSession(self.model.SerializeToString(), options,
                                                  providers=self.execution_providers)
        if self.kept is not None:
            self.infer_session = _Keeping(self.infer_session, self.kept)


class _Keeping:
    """A calibration session that also appends its first graph output of every run to `kept` (ORT's calibrators
    run every output and discard the graph's own)."""

    def __init__(self, session, kept: list):
        self._session, self._kept = session, kept

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, feed, *args, **kwargs):
        if output_names is not None:  # the calibrators ask for every output; anything else would be new
            raise ValueError("the calibration session keeps outputs only of runs of every output")
        values = self._session.run(None, feed, *args, **kwargs)
        self._kept.append(values[0])
        return values


class _OnlyDistributionCalibrater(_Only, _InMemory, DistributionCalibrater):
    """ONNX Runtime's histogram calibrator (fp8) with the same augmented graph (every calibrated tensor made an
    output), kept in memory (_InMemory) instead of saved."""

    def augment_graph(self):
        self.tensors_to_calibrate, value_infos = self.select_tensors_to_calibrate(self.model)
        for tensor in self.tensors_to_calibrate:
            if tensor not in self.model_original_outputs:
                self.model.graph.output.append(value_infos[tensor])


class _LinearMinMaxCalibrater(_Only, _InMemory, MinMaxCalibrater):
    """ONNX Runtime's min/max calibrator with the same augmented graph, written in linear time and kept in memory
    (_InMemory).

    Its augment_graph adds a ReduceMin and a ReduceMax (each followed by a Reshape to 1-D) per calibrated
    tensor, and for each of them rebuilds the name -> type map of every tensor and scans the node list for the
    tensor's first reader, then inserts into the middle of it: quadratic in the graph's size. Measured at real
    size (2-vCPU Intel Xeon with AMX, ORT 1.31.1): the augmentation took 157 s of a 27 min `--backend auto` run
    (25 s this way, most of it writing the copy). Here the map is built once and the new nodes are placed in one
    pass, each pair just before its tensor's first reader (graph outputs nobody reads: at the end), each tensor's
    outputs as ReduceMin then ReduceMax (compute_data pairs them by position). The same nodes, names and
    outputs; tests/engines/test_calibrator.py checks the ranges equal the stock calibrator's."""

    def augment_graph(self):
        graph = self.model.graph
        tensors, value_infos = self.select_tensors_to_calibrate(self.model)
        value_infos.update({o.name: o for o in graph.output})  # as ORT's per-tensor lookup does
        value_infos.update({i.name: i for i in graph.input})
        shape_name = f"sprintrt_reduce_shape_{len(graph.initializer)}"
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), shape_name))
        before: dict[int, list] = {}  # node index -> the new nodes that go just before it
        first_reader = {}
        for index, node in enumerate(graph.node):
            for name in node.input:
                first_reader.setdefault(name, index)
        outputs = []
        for tensor in sorted(tensors):
            if tensor not in value_infos:
                raise ValueError(f"Unable to guess tensor type for tensor {tensor!r}, running shape inference "
                                 "before quantization may resolve this issue.")
            elem_type = value_infos[tensor].type.tensor_type.elem_type
            for op in ("ReduceMin", "ReduceMax"):
                reduced = f"{tensor}_{op}"
                nodes = [helper.make_node(op, [tensor], [reduced + "_Reshape"], keepdims=1, name=reduced),
                         helper.make_node("Reshape", [reduced + "_Reshape", shape_name], [reduced],
                                          name=reduced + "_Reshape")]
                before.setdefault(first_reader.get(tensor, len(graph.node)), []).extend(nodes)
                outputs.append(helper.make_tensor_value_info(reduced, elem_type, [None]))
        ordered = []
        for index, node in enumerate(graph.node):
            ordered.extend(before.get(index, ()))
            ordered.append(node)
        ordered.extend(before.get(len(graph.node), ()))
        graph.ClearField("node")
        graph.node.extend(ordered)
        graph.output.extend(outputs)


def quantizer_tensors(model: onnx.ModelProto, nodes) -> frozenset:
    """The tensors whose ranges ONNX Runtime's Q/DQ quantizer reads when it quantizes `nodes` (names): their
    activation inputs and outputs (it quantizes a Conv's output too; a MatMul's where the recipe allows). Each
    tensor's min/max does not depend on which others are recorded, and the quantizer computes a scale for every
    range it is given but uses only these, so its graph is the same as from ORT's own calibration of every
    tensor of its op types (tests/engines/test_ort_weights.py). Measured at real size (0.6B architecture, 2-vCPU
    Intel Xeon with AMX, ORT 1.31.1; repeated runs on this VM varied, so ranges), every tensor vs these:
    transformer 3046 vs 505 tensors, 12 samples at 512² 83-138 s vs 23-38 s; DC-AE decoder 586 vs 181, 8 crops of
    256² 44-64 vs 26-27 s (at 512² the full set ran out of 24 GB, these peaked at 12 GB); encoder 570 vs 169,
    16 crops 61 vs 30 s; the same ranges for the tensors kept."""
    wanted = set(nodes)
    weights = {i.name for i in model.graph.initializer}
    return frozenset(name for node in model.graph.node if node.name in wanted
                     for name in (*node.input, *node.output) if name and name not in weights)


def calibrated_ranges(source: Path, feeds: list[dict], settings: dict, cache: Path, only: frozenset | None = None,
                      outputs: list | None = None):
    """ONNX Runtime's calibrator, as quantize_static runs it for `settings`, with one copy of the weights in
    memory; writes the ranges to `cache` (ORT's calibration cache format). `only`: record just these tensors
    (quantizer_tensors), None: every tensor of the op types ORT can quantize. `outputs`: a list, given the
    graph's first output on each feed, in order, as engines/sensitivity.py's sessions compute it (its fp32
    reference: the calibration has run the fp32 graph on every feed already).

    int8 (min/max) and fp8 (histograms): the graph is loaded without the weights in `source`'s file and augmented
    in memory, and its session reads them from that file (_InMemory): a graph handed over with its weights in a
    file (quantize_qdq always does) is never copied. Samples are folded into running ranges `CalibStridedMinMax`
    at a time (CALIBRATION_CHUNK)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    extra = settings.get("extra_options", {})
    # quantize_static configures its calibrator from extra_options' Calib* keys; the recipes set none but
    # the stride (applied here), so the calibrators' defaults are what quantize_static would use.
    unforwarded = [k for k in extra if k.startswith("Calib") and k != "CalibStridedMinMax"]
    if unforwarded:
        raise ValueError(f"calibrated_ranges does not forward {unforwarded} to the calibrator")
    # The tensors quantize_static calibrates by default (every op type it can quantize), narrowed to `only`.
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    if settings["calibrate_method"] == CalibrationMethod.MinMax:
        calibrator = _LinearMinMaxCalibrater(source, op_types)
    else:  # fp8; with create_calibrator's defaults for this method (the class's own differ)
        calibrator = _OnlyDistributionCalibrater(source, op_types, num_bins=2048, scenario="same")
    calibrator.only, calibrator.kept = only, outputs
    try:
        calibrator.augment_graph()
        calibrator.create_inference_session()
        reader = _Feeds(feeds)
        stride = extra.get("CalibStridedMinMax") or len(feeds)
        for start in range(0, len(feeds), stride):
            reader.set_range(start, start + stride)
            calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
    finally:
        del calibrator
