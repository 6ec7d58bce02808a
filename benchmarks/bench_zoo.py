"""The model zoo table (issue #25): each network of ``tests/zoo_models.py`` exported through each
input form (``module:factory``, a torch.export ``.pt2``, ONNX from the TorchScript exporter, ONNX
from the dynamo exporter), with what the export made of it.

    python benchmarks/bench_zoo.py --out zoo_table.md                 # every network and form, CI width
    python benchmarks/bench_zoo.py --networks sen lstm --forms factory --out /tmp/t.md

Writes a markdown file to paste into benchmarks/RESULTS.md: networks x forms with full / partial /
refused, the methods available (of the service's methods, 17 today: the issue's 16 and one more),
the reasons for the graphs left out and the export time;
then, per network (factory form), each graph's parity check: the engine's largest relative error
against its reference on any check ECG, and whether the check passed. A form the network cannot
be written in (PyTorch's exporter fails) says so. Export times on a loaded machine are upper bounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from zoo_models import CI_WIDTH, ZOO, zoo_model  # noqa: E402

from ecgx.service.methods import METHOD_NAMES  # noqa: E402
from ecgx.training.export import export_package  # noqa: E402
from ecgx.training.export.input_forms import load_source  # noqa: E402
from ecgx.training.export.ir import ExportError  # noqa: E402

FORMS = ("factory", "pt2", "onnx_torchscript", "onnx_dynamo")
CLASSES = [f"c{i}" for i in range(5)]


def write_form(name: str, model: torch.nn.Module, form: str, folder: Path) -> tuple[object, dict]:
    """``model`` written in ``form``; returns what load_source takes, and its keyword arguments."""
    entry = ZOO[name]
    example = (torch.zeros(1, 12, entry.samples),)
    common = {"classes": CLASSES, "sampling_rate_hz": entry.rate_hz}
    if form == "factory":
        torch.save(model.state_dict(), folder / "w.pt")
        return f"zoo_models:{name}_ci", {**common, "weights": folder / "w.pt", "input_length": entry.samples}
    if form == "pt2":
        torch.export.save(torch.export.export(model, example), folder / "m.pt2")
        return folder / "m.pt2", common
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, folder / "m.onnx", dynamo=form == "onnx_dynamo", input_names=["x"], verbose=False
        )
    return folder / "m.onnx", common


def export_one(name: str, form: str, width: float, folder: Path) -> dict:
    model = zoo_model(name, width=width)
    try:
        spec, kwargs = write_form(name, model, form, folder)
    except Exception as e:  # PyTorch's own exporter failing: not the project's refusal
        return {"status": "not writable", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    t0 = time.perf_counter()
    try:
        source = load_source(spec, **kwargs)
        pkg = export_package(source, folder / "pkg", overwrite=True)
    except ExportError as e:
        return {"status": "refused", "reason": str(e)[:300], "seconds": time.perf_counter() - t0}
    except Exception as e:  # not a refusal in the project's words: a bug to report, shown as such
        reason = f"unexpected {type(e).__name__}: {str(e)[:250]}"
        return {"status": "refused", "reason": reason, "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    manifest = json.loads((pkg / "manifest.json").read_text())
    unavailable = {g: u for g, u in manifest["unavailable"].items() if u["methods"]}
    lost = sorted({m for u in unavailable.values() for m in u["methods"]})
    checks = manifest["verification"]["checks"]
    return {
        "status": "partial" if lost else "full",
        "available": len(METHOD_NAMES) - len(lost),
        "reasons": {g: f"{', '.join(u['methods'])}: {u['reason'][:200]}" for g, u in unavailable.items()},
        "seconds": seconds,
        "parity": {
            k: {"ok": v["ok"], "max_rel_error": v.get("measured", v).get("max_rel_error")}
            for k, v in checks.items()
            if "ok" in v
        },
    }


def _cell(r: dict) -> str:
    if r["status"] in ("refused", "not writable"):
        return f"{r['status']}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else "")
    return f"{r['status']} {r['available']}/{len(METHOD_NAMES)}, {r['seconds']:.0f} s"


def _graph_parity(parity: dict) -> dict[str, str]:
    """Per graph: its checks' worst measured error and whether all passed."""
    out: dict[str, tuple[bool, float]] = {}
    for check, p in parity.items():
        graph = check.split(".")[0]
        ok, worst = out.get(graph, (True, 0.0))
        err = p["max_rel_error"] if p["max_rel_error"] is not None else float("nan")
        out[graph] = (ok and p["ok"], max(worst, err))
    return {g: f"{'ok' if ok else 'FAIL'} {err:.1e}" for g, (ok, err) in out.items()}


def table(results: dict, networks: list[str], forms: list[str], header: str) -> str:
    lines = [header, "", "| network | " + " | ".join(forms) + " |", "|---" * (len(forms) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_cell(results[n, f]) for f in forms) + " |" for n in networks]
    lines += ["", "Reasons (graphs left out, refusals):", ""]
    for n in networks:
        for f in forms:
            r = results[n, f]
            if r["status"] in ("refused", "not writable"):
                lines.append(f"- {n} / {f}: {r['status']}: {r['reason']}")
            for g, why in r.get("reasons", {}).items():
                lines.append(f"- {n} / {f}: {g} ({why})")
    parity = {n: _graph_parity(results[n, forms[0]].get("parity", {})) for n in networks}
    graphs = sorted({g for p in parity.values() for g in p})
    lines += [
        "",
        f"Parity per graph ({forms[0]} form; worst relative error against the reference on any check ECG):",
        "",
        "| network | " + " | ".join(graphs) + " |",
        "|---" * (len(graphs) + 1) + "|",
    ]
    lines += [f"| {n} | " + " | ".join(parity[n].get(g, "-") for g in graphs) + " |" for n in networks]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", nargs="+", default=list(ZOO), choices=list(ZOO))
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--width", type=float, default=CI_WIDTH, help=f"channel width (default {CI_WIDTH})")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = ap.parse_args()
    forms = [f for f in args.forms if f != "onnx_dynamo" or importlib.util.find_spec("onnxscript")]
    results = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.networks:
            for f in forms:
                folder = Path(tmp) / f"{n}-{f}"
                folder.mkdir()
                results[n, f] = export_one(n, f, args.width, folder)
                print(f"{n} / {f}: {_cell(results[n, f])}", flush=True)
    header = (
        f"Zoo table, {date.today()}, {platform.machine()} {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f} at the end, width {args.width}, whole run "
        f"{time.perf_counter() - start:.0f} s (`python benchmarks/bench_zoo.py --out FILE`)"
    )
    args.out.write_text(table(results, args.networks, forms, header))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
