"""Every graph a model package can hold, listed once: its name, builder, inputs and outputs.

The exporter builds and checks the graphs of this table, the manifest records their signatures,
and the engine calls them by these names. Adding a graph is one :class:`GraphSpec` here (its
builder lives beside the others in ``onnx_graphs.py`` or ``lrp_rules.py``), a check against a
reference in ``package.py``, and the methods that run it naming it (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from ecgx.core.errors import InvalidArgument
from ecgx.training.export.ir import ModelIR
from ecgx.training.export.lrp_rules import LRP_COMPOSITE_GRAPHS, LRP_COMPOSITE_SIGNATURES
from ecgx.training.export.onnx_graphs import (
    BATCH,
    DeconvRule,
    GuidedRule,
    Rule,
    backward_graph,
    deeplift_graph,
    forward_graph,
    gradcam_graph,
    lrp_graph,
)

# (ir, x_shape, n_classes, gradcam_layer) -> the graph
Builder = Callable[[ModelIR, list, int, str], onnx.ModelProto]


@dataclass(frozen=True)
class GraphSpec:
    """One package graph: what the engine feeds it, what it returns, and how it is built."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    build: Builder


GRAPHS: dict[str, GraphSpec] = {
    spec.name: spec
    for spec in (
        GraphSpec("forward", ("x",), ("logits",), lambda ir, s, n, _: forward_graph(ir, s, n)),
        GraphSpec(
            "gradient",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, Rule()),
        ),
        GraphSpec(
            "guided_backprop",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, GuidedRule()),
        ),
        GraphSpec(
            "deconvolution",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, DeconvRule()),
        ),
        GraphSpec(
            "deeplift",
            ("x", "baseline", "seed", "maxpool_rescale"),
            ("logits", "attribution"),
            lambda ir, s, n, _: deeplift_graph(ir, s, n),
        ),
        GraphSpec(
            "lrp",
            ("x", "seed", "epsilon"),
            ("logits", "attribution"),
            lambda ir, s, n, _: lrp_graph(ir, s, n),
        ),
        GraphSpec(
            "gradcam",
            ("x", "seed"),
            ("logits", "activations", "gradients"),
            lambda ir, s, n, layer: gradcam_graph(ir, s, n, layer),
        ),
    )
}
# Zennit's composites: lrp_rules.py lists their builders and signatures.
GRAPHS.update(
    {
        name: GraphSpec(name, *LRP_COMPOSITE_SIGNATURES[name], lambda ir, s, n, _, b=build: b(ir, s, n))
        for name, build in LRP_COMPOSITE_GRAPHS.items()
    }
)

# Inputs and outputs of each graph, by name, as the engine calls them (the manifest records these).
GRAPH_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (spec.inputs, spec.outputs) for name, spec in GRAPHS.items()
}


def build_graph(ir: ModelIR, name: str, gradcam_layer: str) -> onnx.ModelProto:
    """One graph of a package, or ExportError when the model's layers cannot be expressed in it."""
    spec = GRAPHS.get(name)
    if spec is None:
        raise InvalidArgument(f"no graph named {name!r}; graphs: {sorted(GRAPHS)}")
    return spec.build(ir, [BATCH, *ir.input_shape], ir.n_outputs, gradcam_layer)


def build_graphs(ir: ModelIR, gradcam_layer: str) -> dict[str, onnx.ModelProto]:
    """Every graph of a package, by graph name."""
    return {name: build_graph(ir, name, gradcam_layer) for name in GRAPHS}
