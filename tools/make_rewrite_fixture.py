#!/usr/bin/env python3
"""Writes tests/fixtures/fast_rewrite/mixed.onnx: a small graph that mixes what the fast kernels take with what
they must leave to tract, for tests/fast_engine.rs (the rewrite's layout changes and fusions on any graph, not
only the bundled U-Net). Deterministic (seeded weights, no timestamps).

    x[1,3,16,16] -> Conv3x3 A -> a (also a graph output) -> Relu -> r -> Conv3x3 B -> b
    Concat(b, a) -> Conv3x3 C -> InstanceNormalization -> LeakyRelu(0.2) -> l
    l -> MaxPool 2x2 -> ConvTranspose 2x2/2 -> u;  Add(u, l) -> s -> Conv1x1 -> y[1,1,16,16] (first output)

    tools/.venv/bin/python tools/make_rewrite_fixture.py
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fast_rewrite" / "mixed.onnx"


def main() -> None:
    rng = np.random.default_rng(7)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("wa", 8, 3, 3, 3), init("ba", 8),
        init("wb", 16, 8, 3, 3, scale=0.15), init("bb", 16),
        init("wc", 4, 24, 3, 3, scale=0.1), init("bc", 4), init("gc", 4, scale=1.0), init("hc", 4),
        init("wu", 4, 4, 2, 2), init("bu", 4),
        init("wd", 1, 4, 1, 1), init("bd", 1),
    ]
    conv3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", **conv3),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="B", **conv3),
        helper.make_node("Concat", ["b", "a"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wc", "bc"], ["c"], name="C", **conv3),
        helper.make_node("InstanceNormalization", ["c", "gc", "hc"], ["n"], name="norm", epsilon=1e-5),
        helper.make_node("LeakyRelu", ["n"], ["l"], name="act", alpha=0.2),
        helper.make_node("MaxPool", ["l"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["m", "wu", "bu"], ["u"], name="up", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["u", "l"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "wd", "bd"], ["y"], name="D", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8, 16, 16]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="deepgrow-server")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(model.SerializeToString())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
