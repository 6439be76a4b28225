"""engines/calibrator.py: the linear-time min/max augmentation gives exactly ONNX Runtime's own ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import MinMaxCalibrater
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from sprintrt.engines.calibrator import _Feeds, _LinearMinMaxCalibrater
from sprintrt.export_info import read_export_info
from sprintrt.specs import SPEC_BUILDERS, ModelDims


def _ranges(cls, source, feeds, work):
    work.mkdir()
    calibrator = cls(source, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), str(work / "augmented.onnx"))
    calibrator.augment_graph()
    augmented = onnx.load(str(work / "augmented.onnx"))
    calibrator.create_inference_session()
    calibrator.collect_data(_Feeds(feeds))
    data = calibrator.compute_data()
    return {name: tuple(np.asarray(v) for v in data[name].range_value) for name in data}, augmented


@pytest.mark.parametrize("component", ["text_encoder", "transformer", "vae_decoder"])
def test_linear_augmentation_gives_onnx_runtimes_ranges(onnx_dir, tmp_path, component):
    dims = ModelDims.from_json(read_export_info(onnx_dir)["model_dims"])
    spec = SPEC_BUILDERS[component](dims)
    feeds = [spec.sample_inputs(spec.sizes("sample"), seed=i) for i in range(2)]
    source = onnx_dir / f"{component}.onnx"
    stock, stock_graph = _ranges(MinMaxCalibrater, source, feeds, tmp_path / "stock")
    linear, linear_graph = _ranges(_LinearMinMaxCalibrater, source, feeds, tmp_path / "linear")
    assert len(stock) > 20 and stock.keys() == linear.keys()
    for name, (low, high) in stock.items():
        assert np.array_equal(low, linear[name][0]) and np.array_equal(high, linear[name][1]), name
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


def test_a_graph_with_its_weights_in_a_file_is_calibrated_without_copying_them(onnx_dir, tmp_path, monkeypatch):
    """The augmented graph of a source with external weights points at the source's own file (hard-linked): the
    same ranges as from the graph with its weights inside, nothing the size of the weights written, the source's
    file unchanged."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    from sprintrt.engines import calibrator
    from sprintrt.engines.calibrator import calibrated_ranges
    from sprintrt.engines.quantize import _settings, quantize_qdq
    from sprintrt.files import sha256_file

    dims = ModelDims.from_json(read_export_info(onnx_dir)["model_dims"])
    spec = SPEC_BUILDERS["transformer"](dims)
    feeds = [spec.sample_inputs(spec.sizes("sample"), seed=i) for i in range(2)]
    inside = onnx_dir / "transformer.onnx"
    outside = tmp_path / "src" / "transformer.onnx"
    outside.parent.mkdir()
    onnx.save_model(onnx.load(str(inside)), str(outside), save_as_external_data=True, location="transformer.onnx.data")
    weights = outside.with_name("transformer.onnx.data")
    before = sha256_file(weights)
    settings = _settings("int8", len(feeds), None, "transformer")
    links = []
    session = calibrator._LinearMinMaxCalibrater.create_inference_session
    monkeypatch.setattr(calibrator._LinearMinMaxCalibrater, "create_inference_session",
                        lambda self: links.append(weights.stat().st_nlink) or session(self))
    ranges = {}
    for name, source, external in (("inside", inside, False), ("outside", outside, True)):
        (tmp_path / name).mkdir()
        calibrated_ranges(source, feeds, settings, external, tmp_path / name, tmp_path / name / "ranges.json")
        data = load_tensors_data(tmp_path / name / "ranges.json")
        ranges[name] = {k: [np.asarray(v) for v in data[k].range_value] for k in data}
    assert ranges["inside"].keys() == ranges["outside"].keys() and len(ranges["inside"]) > 20
    for k, (low, high) in ranges["inside"].items():
        assert np.array_equal(low, ranges["outside"][k][0]) and np.array_equal(high, ranges["outside"][k][1]), k
    work = tmp_path / "outside"
    assert links == [1, 2]  # the second session (external weights) read the source's own file through the link
    assert weights.stat().st_nlink == 1  # and it is gone: onnx refuses hard-linked weights (the quantizer loads next)
    assert not list(work.glob("*.data"))  # no copy of the weights
    stored = [i.name for i in onnx.load(str(outside), load_external_data=False).graph.initializer if i.external_data]
    augmented = {i.name: i for i in onnx.load(str(work / "augmented.onnx"), load_external_data=False).graph.initializer}
    assert stored and all(augmented[n].external_data and not augmented[n].raw_data for n in stored)
    assert sha256_file(weights) == before
    # and the quantizer, which loads the source after the calibration, takes it (onnx refuses linked weights)
    info = quantize_qdq(outside, tmp_path / "q.onnx", feeds, "int8", component="transformer")
    assert info["quantized_nodes"] > 0 and weights.stat().st_nlink == 1 and sha256_file(weights) == before
