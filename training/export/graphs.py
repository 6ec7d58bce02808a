"""Every graph a model package can hold, listed once: its name, inputs and outputs, builder, the
check against its reference and what that reference is.

The exporter builds the graphs of this table and runs each one's check; the manifest records their
signatures (``graphs``) and references (``verification.reference``) from it, and the engine calls
the graphs by these names and signatures, as the manifest gives them. Adding a graph is one
:class:`GraphSpec` here: its builder lives beside the others in ``onnx_graphs.py`` (or
``lrp_rules.py``, ``incremental_graphs.py``), its check in ``graph_checks.py``, and the methods that
run it name it (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from ecgx.core.errors import InvalidArgument
from ecgx.training.export.graph_checks import (
    Check,
    check_deeplift,
    check_forward,
    check_gradcam,
    check_gradient,
    check_incremental,
    check_lrp,
    check_lrp_composite,
    check_modified_backward,
)
from ecgx.training.export.incremental_graphs import incremental_activations_graph, incremental_forward_graph
from ecgx.training.export.ir import ModelIR
from ecgx.training.export.lrp_rules import (
    COMPOSITE_GRAPH_NAMES,
    LRP_COMPOSITE_GRAPHS,
    LRP_COMPOSITE_SIGNATURES,
)
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


# What the modified-backward checks compare with (Captum is recorded beside, not binding).
_BESIDE_CAPTUM = "(Captum recorded, informative)"
_INCREMENTAL_REFERENCE = "the forward graph on the same window-perturbed inputs"


@dataclass(frozen=True)
class GraphSpec:
    """One package graph: what the engine feeds it, what it returns, how it is built, and how the
    export checks it before publishing it (a graph that fails its check is left out).

    ``reference`` says what ``check`` compares the graph with, as the manifest records it, under
    ``reference_key`` (default: the name; graphs checked alike share one key). ``also_original``
    is added to it when the model was given as a PyTorch module and the check compares with that
    too. ``reads_layer``: the graph reads the package's GradCAM layer (none without one).
    ``serves``: what is refused without the graph when that is a setting of a method, not the
    methods that name the graph (an LRP composite).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    build: Builder
    check: Check
    reference: str
    also_original: str = ""
    reference_key: str = ""
    reads_layer: bool = False
    serves: str = ""


GRAPHS: dict[str, GraphSpec] = {
    spec.name: spec
    for spec in (
        GraphSpec(
            "forward",
            ("x",),
            ("logits",),
            lambda ir, s, n, _: forward_graph(ir, s, n),
            check_forward,
            "the model as given",
        ),
        GraphSpec(
            "gradient",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, Rule()),
            check_gradient,
            "autograd on the IR module",
            also_original=" and on the original PyTorch module",
        ),
        GraphSpec(
            "guided_backprop",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, GuidedRule()),
            check_modified_backward,
            f"plain-autograd rule {_BESIDE_CAPTUM}",
        ),
        GraphSpec(
            "deconvolution",
            ("x", "seed"),
            ("logits", "gradient"),
            lambda ir, s, n, _: backward_graph(ir, s, n, DeconvRule()),
            check_modified_backward,
            f"plain-autograd rule {_BESIDE_CAPTUM}",
        ),
        GraphSpec(
            "deeplift",
            ("x", "baseline", "seed", "maxpool_rescale"),
            ("logits", "attribution"),
            lambda ir, s, n, _: deeplift_graph(ir, s, n),
            check_deeplift,
            f"plain-autograd rescale rule {_BESIDE_CAPTUM}",
        ),
        GraphSpec(
            "lrp",
            ("x", "seed", "epsilon"),
            ("logits", "attribution"),
            lambda ir, s, n, _: lrp_graph(ir, s, n),
            check_lrp,
            f"plain-autograd epsilon rule per edge {_BESIDE_CAPTUM}",
        ),
        GraphSpec(
            "gradcam",
            ("x", "seed"),
            ("logits", "activations", "gradients"),
            lambda ir, s, n, layer: gradcam_graph(ir, s, n, layer),
            check_gradcam,
            "autograd (layer activations and gradients)",
            reads_layer=True,
        ),
        # Optional graphs for window perturbations (occlusion, feature ablation): the methods use them
        # when present and the plain forward graph otherwise (incremental_graphs.py).
        GraphSpec(
            "incremental_activations",
            ("x",),
            ("activations",),
            lambda ir, s, n, _: incremental_activations_graph(ir, s, n),
            check_incremental,
            _INCREMENTAL_REFERENCE,
            reference_key="incremental",
        ),
        GraphSpec(
            "incremental_forward",
            ("x", "activations", "ecg", "start"),
            ("logits",),
            lambda ir, s, n, _: incremental_forward_graph(ir, s, n),
            check_incremental,
            _INCREMENTAL_REFERENCE,
            reference_key="incremental",
        ),
    )
}
# Zennit's composites: lrp_rules.py lists their builders and signatures; one check and one
# reference for all of them.
GRAPHS.update(
    {
        graph: GraphSpec(
            graph,
            *LRP_COMPOSITE_SIGNATURES[graph],
            lambda ir, s, n, _, b=LRP_COMPOSITE_GRAPHS[graph]: b(ir, s, n),
            check_lrp_composite,
            "PyTorch rule reference (lrp_reference), each input rule",
            reference_key="lrp_<composite>",
            serves=f"lrp with composite={composite!r}",
        )
        for composite, graph in COMPOSITE_GRAPH_NAMES.items()
    }
)

# Inputs and outputs of each graph, by name, as the engine calls them (the manifest records these).
GRAPH_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (spec.inputs, spec.outputs) for name, spec in GRAPHS.items()
}


def references(module_given: bool) -> dict[str, str]:
    """What each graph's check compares it with, as the manifest's ``verification.reference``
    records it; ``module_given``: the model was given as a PyTorch module."""
    return {
        spec.reference_key or spec.name: spec.reference + (spec.also_original if module_given else "")
        for spec in GRAPHS.values()
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
