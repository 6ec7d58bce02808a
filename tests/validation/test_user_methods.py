"""Gating a user-supplied method: loading errors, the end-to-end CLI path and bad results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_ecgx

from ecgx.validation.user_methods import MethodError, checked_attributor, load_method, parse_method_option

METHODS = """
import numpy as np

def input_x_gradient(engine, x, target):
    return engine.attribute("saliency", x, target) * x

def short(engine, x, target):
    return np.zeros(x.shape[:-1] + (x.shape[-1] - 1,), np.float32)

def two_args(engine, x):
    return x

not_a_function = 3
"""
SMALL = "[gate]\necgs = 8\nallow_incomplete_data = true\n[checks.randomisation]\necgs = 2\n"


@pytest.fixture
def module_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_methods.py"
    path.write_text(METHODS)
    return path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' cannot be imported"),
        ("json", "expected module:function"),
        ("json:no_such_function", "module 'json' has no attribute 'no_such_function'"),
        ("FILE:not_a_function", "'not_a_function' is a int, not a function"),
        ("FILE:two_args", "cannot be called as fn(engine, x, target)"),
        ("missing/file.py:f", "file missing/file.py does not exist"),
    ],
)
def test_loading_errors_say_what_is_wrong(spec: str, message: str, module_file: Path) -> None:
    with pytest.raises(MethodError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_method(spec.replace("FILE", str(module_file)))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("mine", "expected NAME=module:function"),
        ("saliency=json:dumps", "'saliency' is a built-in method's name"),
        ("random=json:dumps", "'random' is a built-in method's name"),
        ("1x=json:dumps", "must start with a letter"),
    ],
)
def test_method_options_are_checked(option: str, message: str) -> None:
    with pytest.raises(MethodError, match=message):
        parse_method_option(option)


def test_results_are_checked_at_every_call() -> None:
    x, target = np.zeros((2, 12, 600), np.float32), np.zeros(2, np.int64)
    cases = [
        (lambda e, x, t: x[..., :-1], r"method m returned shape \(2, 12, 599\) for input \(2, 12, 600\)"),
        (lambda e, x, t: x + np.nan, r"method m returned 14400 NaN or infinite value\(s\)"),
        (lambda e, x, t: x.astype(complex), "returned dtype complex128"),
        (lambda e, x, t: "map", r"returned shape \(\) for input"),
    ]
    for fn, message in cases:
        with pytest.raises(MethodError, match=message):
            checked_attributor("m", fn)(None, x, target)
    out = checked_attributor("m", lambda e, x, t: np.ones(x.shape, np.float64))(None, x, target)
    assert out.dtype == np.float32


def test_a_user_method_is_gated_end_to_end_and_never_served(
    trained_family, module_file: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "small.toml"
    policy.write_text(SMALL)
    out = tmp_path / "gate.json"
    result = run_ecgx(
        "validate",
        str(trained_family["seed-0"]),
        "--data",
        str(trained_family["data"]),
        "--policy",
        str(policy),
        "--research",
        "--methods",
        "saliency",
        "--method",
        f"ixg={module_file}:input_x_gradient",
        "--workers",
        "1",
        "--unsigned",
        "--out",
        str(out),
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(out.read_text())
    # Apart from the built-in methods: in user_methods, never in methods, passed, failed or serve.
    assert "ixg" not in report["methods"]
    entry = report["user_methods"]["ixg"]
    assert entry["user_supplied"] is True and entry["spec"] == f"{module_file}:input_x_gradient"
    assert set(entry["checks"]) >= {"randomisation", "perturbation", "changed_model"}
    assert "ixg" not in report["serve"] + report["passed"] + report["failed"]
    assert "User-supplied method(s) ixg" in report["headline"]
    assert "ixg" not in report["inter_method"]["methods"]
    assert "ixg" in result.stdout  # a row of the printed table


def test_a_method_with_the_wrong_shape_fails_cleanly(
    trained_family, module_file: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "small.toml"
    policy.write_text(SMALL)
    args = [
        "validate",
        str(trained_family["seed-0"]),
        "--data",
        str(trained_family["data"]),
        "--policy",
        str(policy),
    ]
    result = run_ecgx(
        *args,
        "--research",
        "--methods",
        "saliency",
        "--method",
        f"bad={module_file}:short",
        "--unsigned",
        "--out",
        str(tmp_path / "g.json"),
    )
    assert_clean_failure(result, "method bad returned shape (", ", 12, 599) for input (")
    assert not (tmp_path / "g.json").exists()
    clash = run_ecgx(*args, "--method", "saliency=json:dumps", "--unsigned")
    assert_clean_failure(clash, "'saliency' is a built-in method's name")
