"""Mixed-precision int8 chosen by measured sensitivity: which layer groups of a component stay in float.

A uniform int8 recipe loses the DC-AE decoder's picture (real 0.6B architecture: cosine 0.917 to fp32 with
every layer but conv_in/conv_out in int8, issue #29) and takes the transformer just below the tuner's gate, and
which layers cost it is a property of the weights, so it is measured per checkpoint, in the manner of NNCF's
accuracy-aware quantization and ModelOpt's per-layer sensitivity (the components and their grouping: GROUPS):

1. The component's quantizable layers are grouped by block (GROUPS: one group per module-path match).
2. Each group alone is quantized with the shared calibration ranges (the graph ONNX Runtime's quantizer gives
   for that group with the engine's recipe, derived from one all-groups graph: `Variants`) and run on
   calibration inputs, only the nodes its change reaches (the fp32 values they read recorded in one run), its
   weights shared by every run's session (`_Shared`): measured at real size (2-vCPU Intel Xeon with AMX), the
   decoder's 23 groups took 29 s so, 91 s run whole from serialised copies. A Q/DQ pair that several groups'
   layers read (the transformer's caption: `Variants.shared_pairs`) is measured as its own group, and left in
   float in theirs. Its error is the mean squared
   difference of the component's output from the fp32 graph's. Q/DQ run as float operators there (graph
   optimisation off), which computes the recipe's rounding exactly whatever this CPU's int8 kernels do: the
   7-bit weight recipe makes the saturating AVX2 kernels agree with it (engines/quantize.py), and GPUs do not
   saturate.
3. Each group's cost is its multiply-adds (weight size x output positions, from one fp32 run).
4. Groups are quantized in increasing error per multiply-add while the summed error (independent rounding
   errors add in the mean square; a shared pair's counted once, with the first group that reads it) stays under
   the budget the gate allows, with a margin; the chosen set is
   then verified as a whole, and while it misses the gate the chosen group with the largest error is left
   in float again (as many of the largest as the miss says: `_leave_out_largest`).

The result (which groups, each one's error and cost, the verified PSNR and cosine) is recorded in the
engine's manifest; the gate and the grouping are part of the engine key (engines/quantize.py
recipe_label), and the calibration set already is, so the same inputs give the same engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sprintrt.defaults import IMAGE_MIN_PSNR_DB, INT8_SENSITIVITY_MARGIN_DB, INT8_SENSITIVITY_SAMPLES, TUNE_MIN_COSINE
from sprintrt.errors import InvalidInputError
from sprintrt.metrics import cosine, psnr
from sprintrt.specs import (CONTROLLED_TRANSFORMER, CONTROLNET, PICTURE_OUTPUT_RANGE, TRANSFORMER, VAE_DECODER,
                             VAE_ENCODER)

# Per component whose int8 layers are chosen by measurement: the module-path pattern naming a layer's group.
# DC-AE's decoder: one group per block of each stage (the upsampling convolution is block 0), 11 groups in
# the tiny decoder, 23 in the real one; its encoder alike (the downsampling convolution is each stage's last
# block). conv_in / conv_out stay in float by KEEP_HIGH_PRECISION. The encoder's output is a latent, not a
# picture: its gate is the cosine alone (PICTURE_OUTPUT_RANGE).
# The Sana transformer family (the transformer, the controlled transformer and the ControlNet's own blocks): one
# group per part of each block, its linear self-attention (attn1), its cross-attention (attn2) and its GLUMBConv
# feed-forward (ff), 3 x 28 groups in the real 0.6B transformer: a uniform int8 one missed the tuner's gate by
# little (cosine 0.99886 to fp32 calibrated, 2-vCPU AMX Xeon), so a few parts in float can buy it back. The
# embeddings and output projections stay in float by KEEP_HIGH_PRECISION; their outputs are not pictures either.
_SANA_BLOCK_PARTS = r"transformer_blocks\.\d+\.(?:attn1|attn2|ff)\b"
GROUPS = {VAE_DECODER: r"decoder\.up_blocks\.\d+\.\d+", VAE_ENCODER: r"encoder\.down_blocks\.\d+\.\d+",
          TRANSFORMER: _SANA_BLOCK_PARTS, CONTROLLED_TRANSFORMER: _SANA_BLOCK_PARTS, CONTROLNET: _SANA_BLOCK_PARTS}
# The calibration inputs each group is measured on, spread over them (`per_group_samples`): INT8_SENSITIVITY_SAMPLES,
# but for the VAE encoder, whose inputs are two kinds in two halves (img2img's pictures, then ControlNet's
# scribbles: tuning/calibration.py), one of each. Measured at real size (0.6B, 2-vCPU Intel Xeon with AMX, 16
# inputs): on the first picture alone the groups' summed errors were 1.8-3.9x below the chosen sets' joint error
# on all 16 (the scribbles cost more), so the verification took 4 rounds to a set of 7 groups (173 s in all, 55% of
# the multiply-adds in int8); on a picture and a scribble it passed in one (103 s, 66%).
SAMPLES = {VAE_ENCODER: 2}
# Verification rounds before giving up (each runs the chosen set on every calibration input).
MAX_VERIFY_ROUNDS = 6
# What a failed verification leaves in float (in the engine key through `rules`): as many as the miss says.
VERIFY_RULE = "leave out the largest errors, as many as the miss says"


@dataclass(frozen=True)
class Gate:
    """What the mixed-precision output must keep against fp32 on the calibration inputs."""

    min_psnr_db: float = IMAGE_MIN_PSNR_DB + INT8_SENSITIVITY_MARGIN_DB
    min_cosine: float = 1 - (1 - TUNE_MIN_COSINE) / 2

    def passes(self, psnr_db: float, cos: float) -> bool:
        return psnr_db >= self.min_psnr_db and cos >= self.min_cosine


# How a Q/DQ pair that several groups read is counted (in the engine key through `rules`).
SHARED_PAIR_RULE = "measured alone, counted once"


def rules(component: str) -> tuple:
    """What decides the measured choice besides the graph and calibration (part of the engine key)."""
    return (GROUPS[component], Gate(), SAMPLES.get(component, INT8_SENSITIVITY_SAMPLES),
            PICTURE_OUTPUT_RANGE.get(component), VERIFY_RULE, SHARED_PAIR_RULE)


def per_group_samples(component: str, count: int) -> list[int]:
    """Which of `count` calibration inputs each group is measured on: SAMPLES' number, spread evenly from the
    first (the VAE encoder's 16: the first picture and the first scribble)."""
    wanted = min(SAMPLES.get(component, INT8_SENSITIVITY_SAMPLES), count)
    return sorted({int(k * count // wanted) for k in range(wanted)})


def layer_groups(nodes: list[str], scopes_of: dict[str, str], component: str) -> dict[str, list[str]]:
    """{group: its nodes}, in graph order; a node outside every group is its own group."""
    pattern = re.compile(GROUPS[component])
    groups: dict[str, list[str]] = {}
    for node in nodes:
        found = pattern.findall(scopes_of[node])
        groups.setdefault(found[-1] if found else node, []).append(node)
    return groups


@dataclass(frozen=True)
class _Shared:
    """A graph whose large weights are ONNX Runtime values kept across sessions: `proto` names them as external
    data, `values` are them. Measured on the real DC-AE decoder (690 MB of weights, 2-vCPU Intel Xeon with AMX):
    a session took 0.38 s to create so against 1.04 s from the whole serialised graph, which also took ~0.5 s
    to build per variant; the sensitivity creates ~25 sessions per VAE."""

    proto: bytes
    names: list[str]
    values: list


def _session(model: Path | bytes | _Shared):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Q/DQ as float operators: the recipe's rounding, not this CPU's kernels (see the module docstring).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # No weight prepacking: a session copies each fp32 MatMul weight into MLAS's packed layout first, for runs
    # the sensitivity has one or a few of. Measured on the real 0.6B transformer's graph (2-vCPU Intel Xeon with
    # AMX): a session 1.4-4.8 s -> 0.6 s, a 512² run 1.4 -> 1.5 s. Every session here is made this way, so the
    # fp32 reference and the groups' runs still compute unchanged nodes bit for bit alike.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    if isinstance(model, _Shared):
        options.add_external_initializers(model.names, model.values)
        model = model.proto
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def _arrays(model, base: Path) -> dict[str, np.ndarray]:
    """{initializer: its values} of `model`, loaded without its weights: those in a weights file (under `base`) are
    mapped from it (np.memmap), not read into protobuf and copied out. Measured on the real 0.6B transformer (2-vCPU
    Intel Xeon with AMX): Variants took 15.7-17.8 s to load its 3 GB of weights the other way, 8.2 s of it converting
    them to arrays and 4.6 s adding the fp32 ones to the Q/DQ graph; 2.8 s this way, its weights' dequantization
    (Variants._dequantize_weights) included."""
    import onnx
    from onnx import helper, numpy_helper

    arrays = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            arrays[init.name] = numpy_helper.to_array(init)
            continue
        where = {e.key: e.value for e in init.external_data}
        location = Path(where["location"])
        if location.is_absolute() or ".." in location.parts:  # as onnx's own loader: only files beside the graph
            raise ValueError(f"{init.name}: its weights file {where['location']!r} is not beside the graph")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).newbyteorder("<")
        shape, offset = tuple(init.dims), int(where.get("offset", 0))
        size = int(np.prod(shape)) * dtype.itemsize
        if int(where.get("length", size)) != size:
            raise ValueError(f"{init.name}: {where.get('length')} bytes in {where['location']}, its shape needs {size}")
        array = (np.memmap(base / location, dtype=dtype, mode="r", offset=offset, shape=shape) if size
                 else np.zeros(shape, dtype))
        arrays[init.name] = array if array.flags.aligned else np.array(array)
    return arrays


def _stub(name: str, dims, data_type: int):
    """An initializer whose values ONNX Runtime takes from a shared value (see _Shared): the file it names is never
    read."""
    import onnx

    stub = onnx.TensorProto(name=name, dims=dims, data_type=data_type, data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="sprintrt-shared-weights.bin")
    return stub


def _shared_weights(model, arrays: dict[str, np.ndarray]) -> tuple[list[str], list]:
    """Move `model`'s large initializers (their values: `arrays`) out into ONNX Runtime values (see _Shared); its
    initializers become external-data stubs ONNX Runtime fills from those values (the file they name is never
    read), the small ones values in the graph."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    names, values = [], []
    for k, init in enumerate(model.graph.initializer):
        array = arrays[init.name]
        if array.nbytes < 1024:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.asarray(array), init.name))
            continue
        model.graph.initializer[k].CopyFrom(_stub(init.name, init.dims, init.data_type))
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))  # keeps the array alive
    return names, values


def _run(model: Path | bytes | _Shared, feeds: list[dict]) -> list[np.ndarray]:
    """The graph's first output on each feed."""
    session = _session(model)
    first = session.get_outputs()[0].name
    return [session.run([first], feed)[0] for feed in feeds]


class Variants:
    """The Q/DQ graph that quantizing exactly some of the layers gives, derived from one graph quantizing all
    of them (`full`, ONNX Runtime's QDQ output) instead of running the quantizer per group: at the real
    decoder's size one quantize_static call took ~15 s, a derived variant a fraction of that.

    ONNX Runtime's QDQ quantizer, given nodes_to_quantize, puts a QuantizeLinear/DequantizeLinear pair on each
    activation input of those nodes and on their outputs (op types in `unquantized_outputs` aside), and a
    DequantizeLinear on their weights and biases; every consumer of a quantized tensor reads its dequantized
    copy. So the variant for `chosen` keeps a weight's dequantized values if its consumer is chosen (computed
    once for every variant: `_dequantize_weights`), an activation pair if its producer or one of its consumers
    is chosen, and reconnects the other consumers to the float tensor (the fp32 graph's weights are added back).
    tests/engines/test_int8.py checks the outputs equal quantize_static's for the same nodes.

    Each variant is serialised as the graph without nodes (once, its weights as stubs for values shared by
    every session: _Shared) followed by its nodes: protobuf merges a message field that appears twice, so the
    bytes parse as one model."""

    def __init__(self, full: Path, source: Path, unquantized_outputs: tuple[str, ...]):
        import onnx

        model = onnx.load(str(full), load_external_data=False)
        fp32 = onnx.load(str(source), load_external_data=False)
        arrays = _arrays(model, full.parent)
        self.source_inputs = {n.name: list(n.input) for n in fp32.graph.node}
        have = {i.name for i in model.graph.initializer}
        made = {o for n in model.graph.node for o in n.output}  # a bias's DequantizeLinear keeps the bias's name
        self.float_name: dict[str, str] = {}
        fp32_arrays = _arrays(fp32, source.parent)
        for init in fp32.graph.initializer:
            array = fp32_arrays[init.name]
            if init.name in made:
                self.float_name[init.name] = init.name = init.name + ".fp32"
            if init.name not in have:
                model.graph.initializer.append(init)
                arrays[init.name] = array
        del fp32_arrays
        del fp32
        self.outputs = [o.name for o in model.graph.output]
        self.inputs = [i.name for i in model.graph.input]
        self.unquantized_outputs = unquantized_outputs
        self.elements = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
        nodes = list(model.graph.node)
        model.graph.ClearField("node")
        self.names, self.values = _shared_weights(model, arrays)
        del arrays
        self.dequantized = self._dequantize_weights(model, nodes)
        self.constants = {i.name for i in model.graph.initializer}
        self.nodes = [n for n in nodes if n.output[0] not in self.dequantized]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.stub = model.SerializeToString()

    def _dequantize_weights(self, model, nodes: list) -> dict:
        """{output: the layer reading it} of each weight's and bias's DequantizeLinear among `nodes`, whose outputs
        are computed here once, by ONNX Runtime's own kernel (the same values), and become shared values under
        their names in `model` and in (names, values), in place of the quantized ones: every variant's layers then
        read them, instead of dequantizing every weight on every run. Measured on the real 0.6B transformer
        (2-vCPU Intel Xeon with AMX, 512²): a run of 65 of its 84 groups 2.12 s that way, 1.72 s this way, its
        verification on 32 inputs 66 -> 53 s (the same choice and errors, bit for bit)."""
        import onnx
        import onnxruntime as ort

        constants = {i.name for i in model.graph.initializer}
        weights = [d for d in nodes if d.op_type == "DequantizeLinear" and d.input[0] in constants]
        if not weights:
            return {}
        layer = {}
        for n in nodes:
            for i in n.input:
                layer.setdefault(i, n)
        dequantizing = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
        read = {i for d in weights for i in d.input}
        dequantizing.graph.initializer.extend(i for i in model.graph.initializer if i.name in read)
        dequantizing.graph.node.extend(weights)
        dequantizing.graph.output.extend(onnx.ValueInfoProto(name=d.output[0]) for d in weights)
        at = [k for k, name in enumerate(self.names) if name in read]
        session = _session(_Shared(dequantizing.SerializeToString(), [self.names[k] for k in at],
                                   [self.values[k] for k in at]))
        outputs = [d.output[0] for d in weights]
        values = session.run(outputs, {})
        del session
        quantized = {d.input[0] for d in weights}
        kept = [k for k, name in enumerate(self.names) if name not in quantized]  # nothing reads them any more
        self.names, self.values = [self.names[k] for k in kept], [self.values[k] for k in kept]
        for name, value in zip(outputs, values):
            model.graph.initializer.append(_stub(name, value.shape, onnx.helper.np_dtype_to_tensor_dtype(value.dtype)))
            self.names.append(name)
            self.values.append(ort.OrtValue.ortvalue_from_numpy(value))
        return {d.output[0]: layer[d.output[0]] for d in weights}

    def _pair(self, d):
        """The activation QuantizeLinear that DequantizeLinear `d` dequantizes, or None (a weight's, a bias's)."""
        if d.op_type != "DequantizeLinear" or d.input[0] in self.constants:
            return None
        q = self.producer.get(d.input[0])
        return q if q is not None and q.op_type == "QuantizeLinear" else None

    def shared_pairs(self, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        """{activation tensor: the groups whose layers read or make it}, for each tensor whose one Q/DQ pair more
        than one group's layers read or make. ONNX Runtime's quantizer gives a tensor one pair, which every reader
        reads once any of its layers is quantized: the caption, which all 28 cross-attentions of the real
        transformer read."""
        group_of = {n: g for g, members in groups.items() for n in members}
        order = {g: k for k, g in enumerate(groups)}
        shared = {}
        for d in self.nodes:
            q = self._pair(d)
            if q is None:
                continue
            owners = {group_of[r.name] for r in self.consumers.get(d.output[0], []) if r.name in group_of}
            made_by = self.producer.get(q.input[0])
            if made_by is not None and made_by.name in group_of and made_by.op_type not in self.unquantized_outputs:
                owners.add(group_of[made_by.name])
            if len(owners) > 1:
                shared[q.input[0]] = sorted(owners, key=order.get)
        return shared

    def _nodes(self, chosen, pairs: dict[str, bool] | None = None) -> list:
        """The variant's nodes; `pairs` ({activation tensor: whether its Q/DQ pair is kept}) overrides the rule
        for those tensors (the measurement's shared pairs)."""
        import onnx

        chosen, producer, consumers, pairs = set(chosen), self.producer, self.consumers, pairs or {}
        rename = {}  # a dropped DequantizeLinear's output -> the float tensor its consumers read instead
        for name, layer in self.dequantized.items():  # a weight or bias: dequantized where its layer is chosen
            if layer.name not in chosen:
                original = self.source_inputs[layer.name][list(layer.input).index(name)]
                rename[name] = self.float_name.get(original, original)
        for d in self.nodes:
            readers = consumers.get(d.output[0], [])
            q = self._pair(d)
            if q is None:
                continue
            tensor = q.input[0]
            made_by = producer.get(tensor)
            kept = pairs[tensor] if tensor in pairs else \
                (made_by is not None and made_by.name in chosen and made_by.op_type not in self.unquantized_outputs) \
                or any(r.name in chosen for r in readers)
            if not kept:
                rename[d.output[0]] = tensor
        nodes = []
        for n in self.nodes:
            n = onnx.NodeProto.FromString(n.SerializeToString()) if any(i in rename for i in n.input) else n
            for k, i in enumerate(n.input):
                n.input[k] = rename.get(i, i)
            nodes.append(n)
        return _needed(nodes, self.outputs)

    def __call__(self, chosen, pairs: dict[str, bool] | None = None) -> _Shared:
        return self._shared(self._nodes(chosen, pairs))

    def _shared(self, nodes: list, inputs: list | None = None, outputs: list[str] = ()) -> _Shared:
        import onnx

        variant = onnx.ModelProto()
        variant.graph.input.extend(inputs or [])
        variant.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)  # after the graph's own
        variant.graph.node.extend(nodes)
        read = {i for n in nodes for i in n.input}  # ONNX Runtime drops the others and refuses values for them
        names = [k for k, name in enumerate(self.names) if name in read]
        return _Shared(self.stub + variant.SerializeToString(), [self.names[k] for k in names],
                       [self.values[k] for k in names])

    def _split(self, chosen, pairs: dict[str, bool] | None = None) -> tuple[list, list[str]]:
        """(the nodes whose values quantizing `chosen` changes, the tensors they read from the other nodes)."""
        nodes = self._nodes(chosen, pairs)
        changed = set(self.dequantized)  # a chosen layer's weights; an unchosen one reads its float weights instead
        reached = set()  # nodes come in an order that computes each input first: one pass follows every change
        for n in nodes:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") or changed.intersection(n.input):
                reached.add(id(n))
                changed.update(n.output)
        suffix = [n for n in nodes if id(n) in reached]
        made = {o for n in suffix for o in n.output}
        outside = made | self.constants | set(self.inputs)
        cut = sorted({i for n in suffix for i in n.input if i and i not in outside})
        return suffix, cut

    def fp32(self, outputs: list[str]) -> _Shared:
        """The fp32 graph (no layer chosen: every pair dropped, each reader back on its float tensor), its nodes
        and weights the variants' own, with `outputs` added after the graph's own."""
        known = set(self.outputs)
        return self._shared(self._nodes(()), outputs=[o for o in dict.fromkeys(outputs) if o not in known])

    def cut(self, chosen, pairs: dict[str, bool] | None = None) -> list[str]:
        """The float tensors the nodes that quantizing `chosen` (and `pairs`, as in _nodes) changes read from the
        others (unquantized layers: the fp32 graph's values)."""
        return self._split(chosen, pairs)[1]

    def suffix(self, chosen, types: dict[str, int], pairs: dict[str, bool] | None = None) -> _Shared:
        """The graph for `chosen`, only the nodes its change reaches: its inputs are the original ones and
        `cut(chosen)` (`types`: each one's ONNX element type), fed with the fp32 graph's values of those tensors.
        The same operators on the same values as the whole variant, without recomputing what quantizing `chosen`
        cannot change: the DC-AE encoder's high-resolution blocks come first, the decoder's last, and the
        transformer's export computes every cross-attention's keys and values from the caption at its start."""
        from onnx import helper

        nodes, cut = self._split(chosen, pairs)
        return self._shared(nodes, [helper.make_tensor_value_info(c, types[c], None) for c in cut])


def _needed(nodes: list, outputs: list[str]) -> list:
    """The nodes the graph outputs depend on, in their order (dropped Q/DQ pairs would still run otherwise:
    graph optimisation is off)."""
    producer = {o: n for n in nodes for o in n.output}
    needed, todo = set(), list(outputs)
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo.extend(n.input)
    return [n for n in nodes if id(n) in needed]


def _fp32_pass(variants: Variants, nodes: list[str], cut: list[str], feeds: list[dict], few: int):
    """What the measurement needs of the fp32 graph, from one session (run as _run runs it: the same values):
    (its output on every feed: the reference; each weight layer's multiply-adds on the first feed, weight
    elements x output positions; the values of the tensors `cut` on the first `few` feeds, which the groups'
    runs read). One load and one run per feed, where three loads and runs were: measured on the real 0.6B VAEs
    (2-vCPU Intel Xeon with AMX, 8 latent crops / 16 pictures of 256²), decoder 28-29 -> 21 s, encoder 34-35 -> 28 s.
    The graph is `variants`' fp32 one, on the weights they already hold as shared values: loading the source's
    again took ~15 s of a 21 s pass on the real transformer (2.4 GB) and held a second copy of them."""
    layers = {n.name: (n.op_type, variants.source_inputs[n.name][1], n.output[0])
              for n in variants.nodes if n.name in set(nodes)}
    first = variants.outputs[0]
    session = _session(variants.fp32(sorted({out for _, _, out in layers.values()} | set(cut))))
    reference, macs, at_cut = [], {}, []
    for i, feed in enumerate(feeds):
        names = list(dict.fromkeys([first, *(cut if i < few else ()),
                                    *(out for _, _, out in layers.values() if i == 0)]))
        values = dict(zip(names, session.run(names, feed)))
        reference.append(values[first])
        if i < few:
            at_cut.append({c: values[c] for c in cut})
        if i == 0:
            for n in nodes:
                op_type, weight, out = layers[n]
                shape = values[out].shape
                channels = shape[1] if op_type == "Conv" else shape[-1]
                macs[n] = variants.elements.get(variants.float_name.get(weight, weight), 0) * int(np.prod(shape)) \
                    // max(int(channels), 1)
    return reference, macs, at_cut


def _leave_out_largest(chosen: list[str], table: dict, gate: Gate, psnr_db: float, cos: float, picture: bool) -> None:
    """After a failed verification, leave the groups with the largest errors in float: as many as the miss says.

    The set missed the gate by a factor `over` (its 1 - cosine, or its mean squared error, against what the gate
    allows); if the joint error scales with the sum of the groups' own errors, leaving out the largest ones until
    that sum shrinks by `over` passes. So the rounds that would fail on the way are skipped: measured at real size
    (0.6B, 2-vCPU Intel Xeon with AMX), the VAE encoder's set went from 11 to 7 groups one group per round, 5
    rounds of 25 s on its 16 calibration inputs (4 rounds this way, the same set). At least one group is left out
    per round, in the same order as one at a time, so the set is the one-at-a-time set, or a subset of it where
    leaving the largest out helps more than their own errors say."""
    over = (1 - cos) / (1 - gate.min_cosine)
    if picture:
        over = max(over, 10 ** ((gate.min_psnr_db - psnr_db) / 10))
    target = sum(table[g]["mse"] for g in chosen) / max(over, 1.0)
    while chosen:
        chosen.remove(max(chosen, key=lambda g: table[g]["mse"]))
        if sum(table[g]["mse"] for g in chosen) <= target:
            break


def choose_quantized(component: str, source: Path, nodes: list[str], scopes_of: dict[str, str], feeds: list[dict],
                     quantize: Callable[[list[str], Path], None], work: Path, unquantized_outputs: tuple[str, ...],
                     say: Callable[[str], None] = lambda msg: None,
                     reference: list[np.ndarray] | None = None) -> tuple[list[str], dict]:
    """(the nodes to quantize, the report) for `component`'s graph `source`: see the module docstring.

    `quantize(nodes, out)` writes the Q/DQ graph quantizing exactly `nodes` (the recipe, with the calibrated
    ranges), `unquantized_outputs` the op types whose outputs it leaves in float; `feeds` are calibration
    inputs: each group is measured on a few (`per_group_samples`), the chosen set verified on all.
    `reference`: the fp32 graph's output on each feed, run as here (the calibration's, engines/calibrator.py),
    so the fp32 pass runs on the per-group samples alone: measured on the real 0.6B transformer
    (32 inputs at 512², 2-vCPU Intel Xeon with AMX), a run of ~1.9 s per input saved."""
    from onnx.helper import np_dtype_to_tensor_dtype

    gate, peak = Gate(), PICTURE_OUTPUT_RANGE.get(component)  # None: not a picture, no PSNR gate
    groups = layer_groups(nodes, scopes_of, component)
    full = work / "all-groups.onnx"
    quantize(nodes, full)
    try:
        variants = Variants(full, source, unquantized_outputs)
    finally:
        full.unlink(missing_ok=True)
    # What is measured alone: each group, its layers quantized but the Q/DQ pairs it shares with other groups left
    # in float (`shared`), and each shared pair, its readers' layers in float: a shared pair rounds every reader's
    # input once, so its error counts once, and a group's own run is only what its own change reaches (at real
    # size every cross-attention's reached the whole transformer through the caption).
    shared = variants.shared_pairs(groups)
    alone = measured_alone(groups, shared)
    # Each runs the nodes its change reaches, fed the fp32 values they read (recorded in the fp32 pass).
    cuts = {k: variants.cut(members, pairs) for k, (members, pairs) in alone.items()}
    if reference is not None and len(reference) != len(feeds):
        raise ValueError(f"{len(reference)} fp32 outputs given for {len(feeds)} calibration inputs")
    # The per-group samples first (the verification's measures do not depend on the inputs' order).
    picked = per_group_samples(component, len(feeds))
    order = picked + [i for i in range(len(feeds)) if i not in picked]
    feeds = [feeds[i] for i in order]
    reference = None if reference is None else [reference[i] for i in order]
    few = slice(0, len(picked))
    computed, macs, at_cuts = _fp32_pass(variants, nodes, sorted({c for cut in cuts.values() for c in cut}),
                                         feeds if reference is None else feeds[few], len(picked))
    reference = computed if reference is None else reference
    scale = float(np.mean([np.mean(np.square(r, dtype=np.float64)) for r in reference[few]]))
    # Budget in mean squared error: the PSNR gate's, and the cosine gate's (1 - cos ~ mse / (2 mean(y^2))).
    budget = min(peak ** 2 * 10 ** (-gate.min_psnr_db / 10) if peak else np.inf, 2 * (1 - gate.min_cosine) * scale)

    def score(outputs: list[np.ndarray]) -> tuple[float, float, float]:
        """(mse, psnr, cosine) of `outputs` against fp32 on the first len(outputs) feeds."""
        both = (np.concatenate([o.ravel() for o in outputs]),
                np.concatenate([r.ravel() for r in reference[:len(outputs)]]))
        p = psnr(*both, peak=peak) if peak else float("inf")
        return float(np.mean(np.square(both[0] - both[1], dtype=np.float64))), p, cosine(*both)

    errors = {}
    for i, (name, (members, pairs)) in enumerate(alone.items()):
        say(f"int8 sensitivity of {component}: group {i + 1}/{len(alone)} ({name})")
        cut_values = [{c: values[c] for c in cuts[name]} for values in at_cuts]
        types = {k: np_dtype_to_tensor_dtype(v.dtype) for k, v in cut_values[0].items()}
        errors[name], _, _ = score(_run(variants.suffix(members, types, pairs),
                                        [{**f, **c} for f, c in zip(feeds[few], cut_values)]))
    table = {g: {"nodes": len(members), "macs": sum(macs[n] for n in members), "mse": errors[g]}
             for g, members in groups.items()}
    order = sorted(groups, key=lambda g: table[g]["mse"] / max(table[g]["macs"], 1))
    chosen, total, paid = [], 0.0, set()
    for g in order:  # the first group chosen that reads a shared pair pays for the pair's error too
        pairs = {t for t, owners in shared.items() if g in owners} - paid
        cost = table[g]["mse"] + sum(errors[_pair_name(t)] for t in pairs)
        if total + cost <= budget:
            chosen.append(g)
            total += cost
            paid |= pairs
    verified, rounds = None, 0
    for rounds in range(1, MAX_VERIFY_ROUNDS + 1):
        if not chosen:
            break
        say(f"int8 sensitivity of {component}: verifying {len(chosen)} of {len(groups)} groups together")
        mse, p, c = score(_run(variants([n for g in chosen for n in groups[g]]), feeds))
        if gate.passes(p, c):
            verified = {"psnr_db": round(p, 2) if peak else None, "cosine": round(c, 6), "mse": mse}
            break
        _leave_out_largest(chosen, table, gate, p, c, peak is not None)
    if not chosen or verified is None:
        raise InvalidInputError(
            f"no int8 layer set of the {component} keeps {f'{gate.min_psnr_db:.0f} dB and ' if peak else ''}"
            f"cosine {gate.min_cosine} "
            f"against fp32 on the calibration inputs (measured per group: the least lossy alone has "
            f"{min(t['mse'] for t in table.values()):.3g} mean squared error, budget {budget:.3g}). "
            f"Fix: keep the {component} in a float precision (fp32/bf16), or build the int8 engine on the real checkpoint")
    total_macs = sum(macs.values()) or 1
    for g, row in table.items():
        row["quantized"] = g in chosen
    pairs_report = {t: {"groups": len(owners), "mse": errors[_pair_name(t)],
                        "quantized": any(g in chosen for g in owners)} for t, owners in shared.items()}
    report = {"method": "per-group sensitivity, greedy by error per multiply-add, verified",
              "gate": {"min_psnr_db": gate.min_psnr_db if peak else None, "min_cosine": gate.min_cosine},
              "budget_mse": budget,
              "samples": {"per_group": len(picked), "per_group_inputs": picked, "verified": len(feeds)},
              "verified": verified,
              "verify_rounds": rounds,
              "quantized_macs_share": round(sum(table[g]["macs"] for g in chosen) / total_macs, 4),
              "groups": table, "shared_pairs": pairs_report}
    return [n for g in chosen for n in groups[g]], report


def measured_alone(groups: dict[str, list[str]], shared: dict[str, list[str]]) -> dict[str, tuple[list, dict]]:
    """{name: (the layers, the pairs as Variants._nodes takes them)} of each thing the sensitivity measures alone:
    each group with the shared pairs it reads left in float, and each shared pair with no layer quantized."""
    alone = {g: (members, {t: False for t, owners in shared.items() if g in owners}) for g, members in groups.items()}
    alone.update({_pair_name(t): ([], {t: True}) for t in shared})
    return alone


def _pair_name(tensor: str) -> str:
    """A shared Q/DQ pair's name among the groups measured (see choose_quantized)."""
    return f"the Q/DQ pair of {tensor}"
