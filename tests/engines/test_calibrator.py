"""engines/calibrator.py: the in-memory augmentation (min/max: in linear time; histograms, for fp8) gives exactly
ONNX Runtime's own ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import DistributionCalibrater, MinMaxCalibrater
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from sprintrt.engines.calibrator import _Feeds, _LinearMinMaxCalibrater, _OnlyDistributionCalibrater
from sprintrt.engines.quantize import external_weights_copy
from sprintrt.export_info import read_export_info
from sprintrt.specs import SPEC_BUILDERS, ModelDims


def _ranges(cls, source, feeds, work):
    work.mkdir()
    histograms = {"num_bins": 2048, "scenario": "same"} if issubclass(cls, DistributionCalibrater) else {}  # fp8's
    calibrator = cls(source, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), str(work / "augmented.onnx"),
                     **histograms)
    calibrator.augment_graph()
    if cls in (_LinearMinMaxCalibrater, _OnlyDistributionCalibrater):  # augmented in memory only
        assert not any(work.iterdir())
        augmented = calibrator.model
    else:
        augmented = onnx.load(str(work / "augmented.onnx"))
    calibrator.create_inference_session()
    calibrator.collect_data(_Feeds(feeds))
    data = calibrator.compute_data()
    return {name: tuple(np.asarray(v) for v in data[name].range_value) for name in data}, augmented


def _stock_and_ours(stock_cls, our_cls, onnx_dir, tmp_path, component, weights_in_a_file):
    """Both calibrators on two sample inputs of `component`'s graph, holding its weights or with them in a file:
    the same ranges, and nothing written beside a source with its weights in a file. Returns (source, the stock
    augmented graph, ours)."""
    dims = ModelDims.from_json(read_export_info(onnx_dir)["model_dims"])
    spec = SPEC_BUILDERS[component](dims)
    feeds = [spec.sample_inputs(spec.sizes("sample"), seed=i) for i in range(2)]
    source = onnx_dir / f"{component}.onnx"
    if weights_in_a_file:
        (tmp_path / "source").mkdir()
        source = external_weights_copy(source, tmp_path / "source")
        before = sorted(p.name for p in source.parent.iterdir())
    stock, stock_graph = _ranges(stock_cls, source, feeds, tmp_path / "stock")
    ours, our_graph = _ranges(our_cls, source, feeds, tmp_path / "ours")
    assert len(stock) > 20 and stock.keys() == ours.keys()
    for name, (low, high) in stock.items():
        assert np.array_equal(low, ours[name][0]) and np.array_equal(high, ours[name][1]), name
    if weights_in_a_file:
        assert sorted(p.name for p in source.parent.iterdir()) == before  # no copy, no leftover beside it
        assert sum(i.data_location == onnx.TensorProto.EXTERNAL for i in our_graph.graph.initializer) > 10
    return source, stock_graph, our_graph


@pytest.mark.parametrize("component,weights_in_a_file", [("transformer", True), ("vae_decoder", False)])
def test_the_histogram_calibrator_in_memory_gives_onnx_runtimes_ranges(onnx_dir, tmp_path, component,
                                                                      weights_in_a_file):
    """fp8's calibrator (histograms): the same ranges as ORT's own, which saves an augmented copy with every weight
    (the real text encoder's 10 GB); this one writes nothing and reads the weights from the source's file."""
    _, stock_graph, our_graph = _stock_and_ours(DistributionCalibrater, _OnlyDistributionCalibrater, onnx_dir,
                                                tmp_path, component, weights_in_a_file)
    assert [o.name for o in stock_graph.graph.output] == [o.name for o in our_graph.graph.output]


@pytest.mark.parametrize("component,weights_in_a_file", [
    ("text_encoder", False), ("transformer", False), ("vae_decoder", False), ("vae_decoder", True),
    ("transformer", True)])
def test_linear_augmentation_gives_onnx_runtimes_ranges(onnx_dir, tmp_path, component, weights_in_a_file):
    """The same ranges as ORT's own calibrator, from a graph holding its weights or with them in a file (the
    form quantize_qdq hands over; then the augmented graph is never written and names the source's file)."""
    source, stock_graph, linear_graph = _stock_and_ours(MinMaxCalibrater, _LinearMinMaxCalibrater, onnx_dir,
                                                        tmp_path, component, weights_in_a_file)
    # the same nodes and outputs (names and order of the outputs: compute_data pairs them by position per tensor)
    assert sorted(n.name for n in stock_graph.graph.node) == sorted(n.name for n in linear_graph.graph.node)
    assert {o.name for o in stock_graph.graph.output} == {o.name for o in linear_graph.graph.output}
    model = onnx.load(str(source), load_external_data=False)
    added = [o.name for o in linear_graph.graph.output][len(model.graph.output):]
    assert all(a.endswith("_ReduceMin") and b == a[:-3] + "Max" for a, b in zip(added[::2], added[1::2]))
    # every new node sits before its tensor's first reader
    order = {n.name: i for i, n in enumerate(linear_graph.graph.node)}
    for node in model.graph.node:
        for tensor in node.input:
            if f"{tensor}_ReduceMin" in order:
                assert order[f"{tensor}_ReduceMin"] < order[node.name]
