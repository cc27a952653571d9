"""Section 7: the floating-point work per image of an ONNX graph, counted from the file.

The batch dimension of every graph input is fixed to 1, ONNX shape inference gives every tensor's shape,
and each multiply–accumulate (MAC) of the compute-heavy operators counts as 2 FLOPs:

* ``Conv`` (and ``QLinearConv``, ``ConvInteger``): output elements × (input channels / group) × kernel
  elements;
* ``ConvTranspose``: input elements × (output channels / group) × kernel elements;
* ``MatMul`` (``MatMulInteger``, ``QLinearMatMul``), ``Gemm``: output elements × the inner dimension.

Element-wise work (bias, batch normalization folded or not, activations, resizes) is not counted: it is
a few FLOPs per activation against hundreds per MAC-heavy output. Nodes whose shapes stay unknown are
listed, never guessed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Operator → (index of the data input, index of the weight input).
CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


@dataclass
class FlopCount:
    """MACs per operator type at batch 1, and the nodes that could not be counted."""

    macs_by_op: dict[str, int] = field(default_factory=dict)
    nodes_by_op: dict[str, int] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(self.macs_by_op.values())

    @property
    def flops(self) -> int:
        """FLOPs per image: 2 per MAC."""
        return 2 * self.macs


def _shape(value: Any) -> list[int] | None:
    """A ValueInfoProto's / TensorProto's dims, or None when any is unknown."""
    if hasattr(value, "dims"):
        return [int(d) for d in value.dims]
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        dims.append(int(dim.dim_value))
    return dims


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _fix_batch(proto: Any, batch: int) -> None:
    initializers = {init.name for init in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch


def count_flops(model: str | Path | Any, batch: int = 1) -> FlopCount:
    """Counts the MACs of ``model`` (a path or a ModelProto) with its batch fixed to ``batch``.

    Returns:
        The counts at that batch (divide by ``batch`` for per image; the default 1 is per image).
    """
    import onnx
    from onnx import shape_inference

    proto = (
        onnx.load(str(model))
        if isinstance(model, str | Path)
        else onnx.ModelProto.FromString(model.SerializeToString())
    )
    _fix_batch(proto, batch)
    inferred = shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    graph = inferred.graph
    shapes: dict[str, list[int] | None] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes[value.name] = _shape(value)
    for initializer in graph.initializer:
        shapes[initializer.name] = _shape(initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = [int(d) for d in attribute.t.dims]

    count = FlopCount()
    macs: Counter[str] = Counter()
    nodes: Counter[str] = Counter()

    def shape_of(name: str) -> list[int] | None:
        return shapes.get(name) if name else None

    for node in graph.node:
        op = node.op_type
        if op not in CONV_OPS and op not in MATMUL_OPS and op not in ("ConvTranspose", "Gemm"):
            continue
        output = shape_of(node.output[0])
        node_macs: int | None = None
        if op in CONV_OPS:
            weight = shape_of(node.input[CONV_OPS[op][1]])
            if output is not None and weight is not None and len(weight) >= 3:
                node_macs = _product(output) * weight[1] * _product(weight[2:])
        elif op == "ConvTranspose":
            data, weight = shape_of(node.input[0]), shape_of(node.input[1])
            if data is not None and weight is not None and len(weight) >= 3:
                node_macs = _product(data) * weight[1] * _product(weight[2:])
        elif op in MATMUL_OPS:
            left = shape_of(node.input[MATMUL_OPS[op][0]])
            if output is not None and left is not None and left:
                node_macs = _product(output) * left[-1]
        else:  # Gemm: Y = alpha · A' · B' + beta · C, A' = A or Aᵀ
            left = shape_of(node.input[0])
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            if output is not None and left is not None and len(left) == 2:
                node_macs = _product(output) * (left[0] if trans_a else left[1])
        if node_macs is None:
            count.unresolved.append(f"{op} {node.name or node.output[0]}")
            continue
        macs[op] += node_macs
        nodes[op] += 1
    count.macs_by_op, count.nodes_by_op = dict(macs), dict(nodes)
    return count
