"""The method registry: what ``@register`` refuses, the pinned order of METHOD_NAMES, and settings
declared once (``parameters()``, the checks and the values ``attribute`` receives all come from
the class's ``params``)."""

from __future__ import annotations

import numpy as np
import pytest

from ecgx.core.errors import InvalidArgument, NotFound
from ecgx.service.methods import METHOD_NAMES, get_method, methods_needing, required_graphs
from ecgx.service.methods.base import AttributionMethod, Param, count, flag, one_of, seed
from ecgx.service.methods.lrp import COMPOSITE_GRAPHS
from ecgx.service.methods.registry import RegistrationError, Registry
from ecgx.validation.policy import declared_may_differ, default_policy

X = np.zeros((2, 12, 600), np.float32)

# Reports, the CLI's choices, tie-breaks and the gate's method order follow this order.
PINNED = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradient_shap",
    "deeplift",
    "deeplift_shap",
    "guided_backprop",
    "deconvolution",
    "gradcam",
    "guided_gradcam",
    "lrp",
    "occlusion",
    "feature_ablation",
    "kernel_shap",
    "lime",
    "random",
)


def test_method_names_keep_their_order() -> None:
    assert METHOD_NAMES == PINNED


class _Doubling(AttributionMethod):
    """A small well-formed method: twice the input."""

    name, kind, graphs = "doubling", "control", ()
    params = (Param("factor", 2, count(10, "test cap")), Param("mode", "plain", one_of(("plain", "abs"))))

    def attribute(self, engine, x, target, s):
        return s.factor * (np.abs(x) if s.mode == "abs" else x)


def test_a_well_formed_class_registers_and_is_found_by_name() -> None:
    registry = Registry()
    assert registry.register(_Doubling) is _Doubling
    assert registry.names() == ("doubling",)
    assert isinstance(registry.get("doubling"), _Doubling)
    with pytest.raises(NotFound, match="unknown attribution method 'nope'; known: doubling"):
        registry.get("nope")


def test_a_duplicate_name_is_refused_naming_both_classes() -> None:
    registry = Registry()
    registry.register(_Doubling)

    class Again(_Doubling):
        pass

    with pytest.raises(
        RegistrationError, match=r"'doubling' of .*Again is already registered by .*_Doubling"
    ):
        registry.register(Again)


@pytest.mark.parametrize("missing", ["name", "kind", "graphs"])
def test_a_class_without_name_kind_or_graphs_is_refused(missing: str) -> None:
    attrs = {"name": "m", "kind": "control", "graphs": (), "attribute": lambda self, e, x, t, s: x}
    del attrs[missing]
    cls = type("Incomplete", (AttributionMethod,), attrs)
    with pytest.raises(RegistrationError, match=rf"Incomplete must set {missing} \(class attributes"):
        Registry().register(cls)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"kind": "magic"}, "kind must be one of"),
        ({"name": "Bad Name"}, "name must be lower_snake_case"),
        ({"graphs": "gradient"}, "graphs must be a tuple of graph names"),
        (
            {"params": (Param("a", 1, flag), Param("a", 2, flag))},
            r"parameter\(s\) \['a'\] declared more than once",
        ),
        ({"params": [Param("a", 1, flag)]}, "params must be a tuple of Param"),
        ({"stochastic": True}, "a stochastic method takes a seed setting"),
        ({"params": (Param("seed", None, seed),)}, "a stochastic method takes a seed setting"),
        ({"may_differ": {"n_steps": "at_least"}}, "may_differ names 'n_steps', not one of its settings"),
        (
            {"params": (Param("a", 1, flag),), "may_differ": {"a": "more"}},
            r"may_differ\['a'\] must be one of",
        ),
        ({"attribute": AttributionMethod.attribute}, "does not implement attribute"),
    ],
)
def test_an_inconsistent_declaration_is_refused_with_the_reason(attrs: dict, message: str) -> None:
    base = {"name": "m", "kind": "control", "graphs": (), "attribute": lambda self, e, x, t, s: x}
    with pytest.raises(RegistrationError, match=message):
        Registry().register(type("Bad", (AttributionMethod,), {**base, **attrs}))


def test_a_plain_class_is_refused() -> None:
    with pytest.raises(RegistrationError, match="is not an AttributionMethod subclass"):
        Registry().register(dict)


def test_parameters_are_the_declaration_and_attribute_gets_the_checked_values() -> None:
    impl = _Doubling()
    assert impl.parameters() == {"factor": 2, "mode": "plain"}
    s = impl.settings(X, {"factor": np.int64(3)})
    assert vars(s) == {"factor": 3, "mode": "plain"} and type(s.factor) is int  # checked, defaults filled
    assert impl.check(X, mode="abs") == 1  # the default cost: one pass per ECG
    with pytest.raises(InvalidArgument, match=r"method 'doubling' has no parameter\(s\) \['scale'\]"):
        impl.check(X, scale=2)
    with pytest.raises(InvalidArgument, match="factor must be a positive integer, got 0"):
        impl.settings(X, {"factor": 0})


@pytest.mark.parametrize("name", PINNED)
def test_every_method_s_parameters_are_its_declaration(name: str) -> None:
    impl = get_method(name)
    assert impl.parameters() == {p.name: p.default for p in impl.params}
    assert set(vars(impl.settings(X, {}))) == set(impl.parameters())
    with pytest.raises(InvalidArgument, match=rf"method '{name}' has no parameter\(s\) \['undeclared'\]"):
        impl.check(X, undeclared=1)


def test_graphs_are_class_attributes_and_settings_select_lrp_s_composite_graph() -> None:
    assert required_graphs("guided_gradcam") == ("gradcam", "guided_backprop")
    assert required_graphs("random") == ()
    lrp = get_method("lrp")
    assert set(lrp.graphs + lrp.setting_graphs) == set(COMPOSITE_GRAPHS.values())
    for composite, graph in COMPOSITE_GRAPHS.items():
        assert required_graphs("lrp", {"composite": composite}) == (graph,)
        assert methods_needing(graph) == ["lrp"]
    assert methods_needing("forward") == ["occlusion", "feature_ablation", "kernel_shap", "lime"]


def test_the_default_policy_s_may_differ_is_what_the_classes_declare() -> None:
    declared = declared_may_differ()
    assert declared == {
        m: {"n_samples": "at_least"} for m in ("smoothgrad", "gradient_shap", "kernel_shap", "lime")
    } | {"integrated_gradients": {"n_steps": "at_least"}}
    assert default_policy().content["serving"]["may_differ"] == declared
