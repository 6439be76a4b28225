"""In-place clean-ups of an exported ONNX graph, each fixing one measured problem.

- typed_list_constants: onnx-graphsurgeon reads `Constant(value_ints=[])` as float64, so constant
  folding feeds a double shape to Expand and ONNX Runtime refuses the graph.
- castlike_constants: `F.pad(..., value=1.0)` in the linear attention exports as
  CastLike(double 1.0, x); TensorRT has no DOUBLE CastLike, and the cast of a constant is a constant.
- restore_module_scopes (sprintrt/onnx_scopes.py): the exporter tags each node with the PyTorch module
  it came from; constant folding drops node metadata, and quantization needs it to keep whole modules
  (time embedding, caption projection, ...) in higher precision.
- cancel_transpose_pairs: DC-AE normalises channels-last views of NCHW tensors, so each RMSNorm
  sits between two Transposes; OpenVINO ran them as slow layout copies (1.3 s of 5.2 s in the real
  decoder at 512², bf16). With the norm computed on axis 1 (export/wrappers.py) the transposes
  meet their inverses and this pass removes both.
- prune_unused: the rewrites above leave constants nobody reads (ORT warns about each one).
- fold_weight_transposes: models over 2 GB are exported without constant folding (it would load every
  weight at once), so each nn.Linear stays `Transpose(weight) -> MatMul`. The int8 recipes only see
  weight layers whose second input is a weight (measured at the real 0.6B size: none of Gemma2's 182
  projections and none of the transformer's linear layers were quantized), and ONNX Runtime's
  calibration session transposed every weight again per call (23 GB for the 8 GB text encoder). The
  pass transposes each such weight in its external-data file, one tensor in memory at a time.
- fold_constants_onnxscript: what Polygraphy's fold leaves (a typed variant's bf16 constants, which ONNX
  Runtime cannot evaluate) or is never given (graphs over 2 GB: small tensors only), e.g. ReduceMean axes
  that TensorRT's parser needs as build-time constants.
- sequences_to_split: the dynamo exporter with optimize=False writes torch.chunk/split as
  SplitToSequence + SequenceAt, which TensorRT's ONNX parser does not support; a plain Split with
  the same sizes is the same computation.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sprintrt.onnx_scopes import module_scopes, restore_module_scopes


def typed_list_constants(proto: onnx.ModelProto) -> int:
    """Rewrite `Constant(value_ints=[...])` / `value_floats` as typed tensors. Returns the count."""
    kinds = {"value_ints": np.int64, "value_floats": np.float32}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name not in kinds:
            continue
        attr = node.attribute[0]
        values = np.array(helper.get_attribute_value(attr), dtype=kinds[attr.name])
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(values)))
        count += 1
    return count


def constant_values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    # Weights left in an external file (large models) are never split sizes or pad values: skip them.
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def inferred_skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shape/type inference on the graph without its weights.

    onnx's inference serialises the model, which protobuf cannot do past 2 GB (the real Gemma2 and
    1.6B transformer are bigger); it needs only the weights' types and shapes, so the skeleton has
    the nodes and declares every initializer as a typed graph input instead of carrying its bytes.
    """
    weights = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in proto.graph.initializer]
    graph = helper.make_graph(list(proto.graph.node), proto.graph.name, list(proto.graph.input) + weights,
                              list(proto.graph.output), value_info=list(proto.graph.value_info))
    skeleton = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    return onnx.shape_inference.infer_shapes(skeleton)


def _static_dim(inferred: onnx.ModelProto, tensor: str, axis: int) -> int | None:
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            if axis < 0:
                axis += len(dims)
            return dims[axis].dim_value if 0 <= axis < len(dims) and dims[axis].HasField("dim_value") else None
    return None


def sequences_to_split(proto: onnx.ModelProto) -> int:
    """Replace SplitToSequence(+SequenceAt with constant indices) by Split. Returns how many were replaced.

    Left alone (and reported by the TensorRT lint) when the split sizes or the split axis are not
    static, or a sequence is used by anything but SequenceAt.
    """
    consts = constant_values(proto)
    users: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    replaced, drop, rename = 0, set(), {}
    new_nodes, inferred = {}, None
    for node in proto.graph.node:
        if node.op_type != "SplitToSequence" or len(node.input) < 2 or node.input[1] not in consts:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis, seq = int(attrs.get("axis", 0)), node.output[0]
        readers = users.get(seq, [])
        if not readers or any(r.op_type != "SequenceAt" or r.input[1] not in consts for r in readers):
            continue
        split = consts[node.input[1]].astype(np.int64)
        if split.ndim == 0:
            inferred = inferred or inferred_skeleton(proto)  # once per pass: inference of a big graph is slow
            total = _static_dim(inferred, node.input[0], axis)
            if total is None:
                continue
            chunk = int(split)
            sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
        else:
            sizes = split.tolist()
        outputs = [f"{node.name}_part{i}" for i in range(len(sizes))]
        sizes_name = f"{node.name}_sizes"
        new_nodes[node.name] = [
            helper.make_node("Constant", [], [sizes_name], value=numpy_helper.from_array(np.array(sizes, np.int64))),
            helper.make_node("Split", [node.input[0], sizes_name], outputs, name=node.name, axis=axis),
        ]
        for r in readers:
            index = int(consts[r.input[1]])
            rename[r.output[0]] = outputs[index]
            drop.add(id(r))
        replaced += 1
    if not replaced:
        return 0
    nodes = []
    for n in proto.graph.node:
        if id(n) in drop:
            continue
        if n.name in new_nodes and n.op_type == "SplitToSequence":
            nodes.extend(new_nodes[n.name])
            continue
        nodes.append(n)
    for n in nodes:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    for out in proto.graph.output:
        if out.name in rename:  # a graph output fed straight by SequenceAt: keep its name with an Identity
            nodes.append(helper.make_node("Identity", [rename[out.name]], [out.name]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return replaced


def castlike_constants(proto: onnx.ModelProto) -> int:
    """Replace CastLike(constant, x) by a constant of x's type, when that type is known. Returns the count."""
    from onnx import helper as h
    from onnx.helper import tensor_dtype_to_np_dtype

    consts = constant_values(proto)
    inferred = inferred_skeleton(proto)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info)
             + list(inferred.graph.input) if vi.type.HasField("tensor_type")}
    count = 0
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "CastLike" or node.input[0] not in consts or not types.get(node.input[1]):
            continue
        value = consts[node.input[0]].astype(tensor_dtype_to_np_dtype(types[node.input[1]]))
        proto.graph.node[i].CopyFrom(h.make_node("Constant", [], [node.output[0]], name=node.name,
                                                 value=numpy_helper.from_array(value)))
        count += 1
    return count


def cancel_transpose_pairs(proto: onnx.ModelProto) -> int:
    """Bypass Transpose(Transpose(x)) pairs whose permutations compose to the identity (the norm
    rewrite in export/wrappers.py makes them). Readers of the second get x; the first goes when no
    one reads it. Returns the count of pairs bypassed."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    graph_outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    for node in proto.graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if first is None or first.op_type != "Transpose" or node.output[0] in graph_outputs:
            continue
        p1, p2 = (list(helper.get_attribute_value(a)) for n in (first, node) for a in n.attribute if a.name == "perm")
        if len(p1) == len(p2) and all(p1[p2[j]] == j for j in range(len(p2))):
            rename[node.output[0]] = first.input[0]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    dead = [n for n in proto.graph.node if n.op_type == "Transpose" and n.output[0] in rename]
    for n in dead:
        proto.graph.node.remove(n)
    used = {i for n in proto.graph.node for i in n.input} | graph_outputs
    for n in [n for n in proto.graph.node if n.op_type == "Transpose" and n.output[0] not in used]:
        proto.graph.node.remove(n)
    return len(rename)


def fold_weight_transposes(proto: onnx.ModelProto, base_dir) -> int:
    """`Transpose(W) -> consumer` with W an initializer read only by that Transpose becomes `W' ->
    consumer`, W' = W transposed, written where W was (external data: the same bytes, rewritten in
    place; inline: in the proto). The Transpose output's name is kept, so consumers are untouched.
    Returns the count."""
    from pathlib import Path

    from onnx.helper import tensor_dtype_to_np_dtype

    inits = {i.name: i for i in proto.graph.initializer}
    readers: dict[str, int] = {}
    for n in proto.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in proto.graph.output}
    folded, keep = 0, []
    for node in proto.graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        external = init is not None and init.data_location == onnx.TensorProto.EXTERNAL
        foldable = init is not None and readers.get(init.name) == 1 and init.name not in outputs \
            and (external or init.HasField("raw_data"))
        if not foldable:
            keep.append(node)
            continue
        shape = tuple(init.dims)
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(shape)))[::-1])
        item = np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
        raw = np.dtype(f"V{item}")  # bytes only: the same code moves fp32, fp16 and bf16 weights
        if external:
            where = {e.key: e.value for e in init.external_data}
            offset, length = int(where.get("offset", 0)), int(where["length"])
            with open(Path(base_dir) / where["location"], "r+b") as f:
                f.seek(offset)
                data = np.frombuffer(f.read(length), dtype=raw).reshape(shape)
                f.seek(offset)
                f.write(np.ascontiguousarray(data.transpose(perm)).tobytes())
        else:
            data = np.frombuffer(init.raw_data, dtype=raw).reshape(shape)
            init.raw_data = np.ascontiguousarray(data.transpose(perm)).tobytes()
        del init.dims[:]
        init.dims.extend(shape[p] for p in perm)
        init.name = node.output[0]
        folded += 1
    if folded:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return folded


def prune_unused(proto: onnx.ModelProto) -> int:
    """Drop initializers and Constant nodes that no node or graph output reads. Returns the count."""
    removed = 0
    while True:
        used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
        dead = [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] not in used]
        dead_inits = [i for i in proto.graph.initializer if i.name not in used]
        if not dead and not dead_inits:
            return removed
        for n in dead:
            proto.graph.node.remove(n)
        for i in dead_inits:
            proto.graph.initializer.remove(i)
        removed += len(dead) + len(dead_inits)


def cast_expanded_constants(proto: onnx.ModelProto) -> int:
    """`Expand(DOUBLE constant) → Cast(to=T)` becomes `Expand(T constant)`: the exporter builds masks with
    `new_ones` from a float64 scalar (seen in Gemma2's bf16 export), and TensorRT has no DOUBLE. The
    value is cast once on the host; the Cast node goes. Returns the count."""
    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    removed, count = set(), 0
    for node in proto.graph.node:
        if node.op_type != "Expand" or node.input[0] not in inits:
            continue
        init = inits[node.input[0]]
        users, nexts = consumers.get(init.name, []), consumers.get(node.output[0], [])
        if init.data_type != onnx.TensorProto.DOUBLE or len(users) != 1 or len(nexts) != 1 or nexts[0].op_type != "Cast":
            continue
        cast = nexts[0]
        to = helper.get_attribute_value(cast.attribute[0])
        value = numpy_helper.to_array(init).astype(helper.tensor_dtype_to_np_dtype(to))
        init.CopyFrom(numpy_helper.from_array(value, init.name))
        node.output[0] = cast.output[0]
        removed.add(cast.name)
        count += 1
    kept = [n for n in proto.graph.node if n.name not in removed]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return count


# The folder's default limits (elements per tensor) for graphs whose weights stay in external data: shape
# arithmetic folds, weights are never read.
SMALL_TENSOR_ELEMENTS = 8192


def fold_constants_onnxscript(proto: onnx.ModelProto, base_dir=None, limit: int | None = None) -> int:
    """Fold constant subgraphs with onnxscript's folder (its own evaluator, in numpy). Polygraphy's fold runs
    the constant subgraph in ONNX Runtime, which cannot evaluate a 16-bit variant's bf16 constants, so on a
    typed variant it folds nothing, and a graph over 2 GB is never given to it: both kept e.g. ReduceMean's
    axes as `Reshape(initializer, initializer)`, which TensorRT's parser rejects ("Axis input must resolve to a
    build-time constant"). With `limit`, only tensors of at most that many elements are read or made, and small
    tensors kept in external data (`base_dir`) are read into the graph first: the weights stay where they are.
    Keeps each node's module path (sprintrt/onnx_scopes.py). Returns how many nodes went."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxscript.optimizer import fold_constants

    if base_dir is not None and limit is not None:
        for t in proto.graph.initializer:
            length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
            if uses_external_data(t) and length is not None and length <= limit * 8:
                load_external_data_for_tensor(t, str(base_dir))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
    before, scopes = len(proto.graph.node), module_scopes(proto)
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about every big external weight it leaves alone
    try:
        fold_constants(proto, input_size_limit=limit or sys.maxsize, output_size_limit=limit or sys.maxsize)
    finally:
        logger.setLevel(level)
    restore_module_scopes(proto, scopes)
    return before - len(proto.graph.node)
