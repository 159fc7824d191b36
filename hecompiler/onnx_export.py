"""ONNX exporter: any graph IR (rewritten or not) back to an ``onnx.ModelProto``.

Used to check a rewritten graph against onnxruntime and to hand a rewritten
network back to a user for fine-tuning.  The export opset is fixed
(:data:`EXPORT_OPSET`); static attributes that ONNX takes as inputs (Reshape
shape, Pad amounts, Clip bounds, ReduceSum axes) become int64/float
initializers, and ``Poly`` becomes Horner Mul/Add nodes.
"""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import HecError
from .ir import Graph, Node

EXPORT_OPSET = 17

_DTYPE_TO_ONNX = {
    "f32": onnx.TensorProto.FLOAT, "f64": onnx.TensorProto.DOUBLE, "f16": onnx.TensorProto.FLOAT16,
    "i64": onnx.TensorProto.INT64, "i32": onnx.TensorProto.INT32, "i16": onnx.TensorProto.INT16,
    "i8": onnx.TensorProto.INT8, "u8": onnx.TensorProto.UINT8, "bool": onnx.TensorProto.BOOL,
}

# ops whose IR attributes are exactly their ONNX attributes
_SAME = {"Conv", "BatchNormalization", "Relu", "Identity", "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm",
         "Flatten", "Transpose", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat"}


class _Exporter:
    def __init__(self, graph: Graph):
        self.g = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names = {v.name for v in graph.values()}
        self.node_names: set[str] = set()

    def fresh(self, hint: str) -> str:
        i = 0
        while f"{hint}_{i}" in self.names:
            i += 1
        self.names.add(f"{hint}_{i}")
        return f"{hint}_{i}"

    def init(self, hint: str, arr: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, ins: list[str], outs: list[str], name: str = "", **attrs) -> None:
        name = name or outs[0]
        if name in self.node_names:  # ONNX wants unique node names; IR nodes may share a source name
            name = f"{name}_{len(self.node_names)}"
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))

    def export_node(self, n: Node) -> None:
        ins = [v.name for v in n.inputs]
        outs = [v.name for v in n.outputs]
        a = dict(n.attrs)
        nm = n.name or outs[0]
        if n.op in _SAME:
            self.node(n.op, ins, outs, nm, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in a.items()})
        elif n.op == "Dropout":
            self.node("Identity", ins, outs, nm)
        elif n.op == "Clip":
            dt = n.inputs[0].type.np_dtype
            lo = self.init(outs[0] + "_min", np.array(a["min"], dt)) if not math.isinf(a["min"]) else ""
            hi = self.init(outs[0] + "_max", np.array(a["max"], dt)) if not math.isinf(a["max"]) else ""
            self.node("Clip", ins + [lo, hi], outs, nm)
        elif n.op == "Reshape":
            self.node("Reshape", ins + [self.init(outs[0] + "_shape", np.array(a["shape"], np.int64))], outs, nm)
        elif n.op == "Pad":
            dt = n.inputs[0].type.np_dtype
            p = self.init(outs[0] + "_pads", np.array(a["pads"], np.int64))
            c = self.init(outs[0] + "_value", np.array(a["value"], dt))
            self.node("Pad", ins + [p, c], outs, nm, mode="constant")
        elif n.op == "ReduceSum":
            ax = self.init(outs[0] + "_axes", np.array(a["axes"], np.int64))
            self.node("ReduceSum", ins + [ax], outs, nm, keepdims=a["keepdims"])
        elif n.op == "Poly":
            dt = n.inputs[0].type.np_dtype
            coeffs = list(a["coeffs"])
            x = ins[0]
            if len(coeffs) == 1:
                self.node("Mul", [x, self.init(outs[0] + "_zero", np.array(0, dt))], [self.fresh(outs[0] + "_z")])
                self.node("Add", [self.nodes[-1].output[0], self.init(outs[0] + "_c0", np.array(coeffs[0], dt))],
                          outs, nm)
                return
            acc = self.init(outs[0] + f"_c{len(coeffs) - 1}", np.array(coeffs[-1], dt))
            for i in range(len(coeffs) - 2, -1, -1):
                prod = self.fresh(outs[0] + "_h")
                self.node("Mul", [acc, x], [prod])
                dst = outs[0] if i == 0 else self.fresh(outs[0] + "_h")
                self.node("Add", [prod, self.init(outs[0] + f"_c{i}", np.array(coeffs[i], dt))], [dst],
                          nm if i == 0 else "")
                acc = dst
        else:
            raise HecError(f"{n.label}: the ONNX exporter has no rule for op {n.op}")

    def run(self) -> onnx.ModelProto:
        g = self.g
        for v in g.constants.values():
            self.inits.append(numpy_helper.from_array(np.asarray(v.data), v.name))
        for n in g.nodes:
            self.export_node(n)
        ins = [helper.make_tensor_value_info(v.name, _DTYPE_TO_ONNX[v.type.dtype], list(v.type.shape))
               for v in g.inputs]
        outs = [helper.make_tensor_value_info(v.name, _DTYPE_TO_ONNX[v.type.dtype], list(v.type.shape))
                for v in g.outputs]
        graph = helper.make_graph(self.nodes, g.name, ins, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", EXPORT_OPSET)],
                                  producer_name="hecompiler")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """Export a graph IR as a checked ONNX model (opset :data:`EXPORT_OPSET`)."""
    # an output that is also an input cannot be expressed in ONNX without a node
    return _Exporter(graph).run()


def save_onnx(graph: Graph, path: str | os.PathLike) -> None:
    from .fileio import atomic_write_bytes

    atomic_write_bytes(path, to_onnx(graph).SerializeToString())
