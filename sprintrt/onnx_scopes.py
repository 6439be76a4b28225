"""Which PyTorch module each node of an exported graph came from.

The exporter records the module path of every node in its metadata (SCOPE_KEY). export/ keeps it
through its graph passes; engines/ chooses layers by it (which to quantize, which typed layer pairs
with which fp32 one). Pure Python: reads the proto's fields, imports no onnx.
"""

from __future__ import annotations

import ast

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def module_scopes(proto) -> dict[str, str]:
    """First output name → the module path of the node that computes it, e.g. 'transformer.time_embed'."""
    scopes = {}
    for n in proto.graph.node:
        for prop in n.metadata_props:
            if prop.key == SCOPE_KEY and n.output:
                parts = [p for p in ast.literal_eval(prop.value) if p]
                scopes[n.output[0]] = ".".join(parts)
    return scopes


def restore_module_scopes(proto, scopes: dict[str, str]) -> int:
    """Put the module paths back on the nodes that survived folding (matched by output name)."""
    count = 0
    for n in proto.graph.node:
        if n.output and n.output[0] in scopes and not any(p.key == SCOPE_KEY for p in n.metadata_props):
            n.metadata_props.add(key=SCOPE_KEY, value=repr([""] + scopes[n.output[0]].split(".")))
            count += 1
    return count
