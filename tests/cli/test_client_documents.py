"""``ecgx client predict|explain --ecg DOCUMENT`` and ``ecgx data import`` on ECG documents, as real
subprocesses against a real server on loopback.

Documents are written by independent producers (tests/ecg_format_helpers.py) from a real PTB-XL
record. The client sends a document as it is and the server reads it (one place), so what the
server explains equals what it explains for the document's samples sent as a .npy strip.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from cli_helpers import assert_clean_failure, run_ecgx, snapshot
from ecg_format_helpers import real_record, write_aecg, write_dicom, write_fhir
from repo_helpers import make_package

from ecgx.core.dataset import load_dataset
from ecgx.core.ecg_formats import read_ecg_document
from ecgx.service.repository import ModelRepository
from ecgx.service.security import ServerSecurity
from ecgx.service.server import build_server

PASSED = "gradcam"


@pytest.fixture(scope="module")
def server(gated, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client_documents") / "repo"
    make_package(gated, root / "ecg" / "1", 0)
    repository = ModelRepository(root, [gated["public"]], engine_options={"threads": 1})
    server, port, _, _ = build_server(
        repository, security=ServerSecurity.plaintext_unauthenticated(), host="127.0.0.1", port=0, max_batch=8
    )
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def documents(shared_data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    mv, fs = real_record(shared_data)
    folder = tmp_path_factory.mktemp("documents")
    paths = {
        "dicom": folder / "ecg.dcm",
        "fhir": folder / "ecg.json",
        "hl7-aecg": folder / "ecg.xml",
        "unnamed": folder / "ecg.bin",  # aECG content behind an extension that names nothing
        "junk": folder / "junk.dat",  # neither extension nor content names a format
    }
    paths["dicom"].write_bytes(write_dicom(mv, fs))
    paths["fhir"].write_bytes(write_fhir(mv, fs))
    paths["hl7-aecg"].write_bytes(write_aecg(mv, fs))
    paths["unnamed"].write_bytes(write_aecg(mv, fs))
    paths["junk"].write_bytes(b"\0\0 no ECG here")
    return {"paths": paths, "fs": fs, "folder": folder}


def client(server: str, action: str, *args: str) -> subprocess.CompletedProcess:
    return run_ecgx("client", action, "--server", server, *args)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("fmt", ["dicom", "fhir", "hl7-aecg"])
def test_explain_a_document_equals_its_samples_sent_raw(server, documents, fmt, tmp_path) -> None:
    path = documents["paths"][fmt]
    held = read_ecg_document(path.read_bytes(), fmt).rhythm
    strip = tmp_path / "strip.npy"
    np.save(strip, held.mv)
    args = ("--method", PASSED, "--json")
    ok(client(server, "explain", "--ecg", str(path), *args, str(tmp_path / "doc.json")))
    ok(
        client(
            server,
            "explain",
            "--ecg",
            str(strip),
            "--fs",
            str(held.sampling_rate_hz),
            *args,
            str(tmp_path / "raw.json"),
        )
    )
    doc, raw = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("doc", "raw"))
    assert doc["beats_mv"] == raw["beats_mv"]
    assert doc["attributions"] == raw["attributions"] or [a["attribution"] for a in doc["attributions"]] == [
        a["attribution"] for a in raw["attributions"]
    ]


def test_predict_takes_the_format_from_the_content_or_from_format(server, documents) -> None:
    unnamed, xml = str(documents["paths"]["unnamed"]), str(documents["paths"]["hl7-aecg"])
    by_content = ok(client(server, "predict", "--ecg", unnamed))
    by_flag = ok(client(server, "predict", "--ecg", unnamed, "--format", "hl7-aecg"))
    assert by_content == by_flag == ok(client(server, "predict", "--ecg", xml))
    junk = str(documents["paths"]["junk"])
    refused = client(server, "predict", "--ecg", junk)
    assert refused.returncode == 2 and "give --format" in refused.stderr and "not a NumPy" in refused.stderr
    # told it is aECG, the client sends it; the server refuses it, naming the field
    bad = client(server, "predict", "--ecg", junk, "--format", "hl7-aecg")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "ecgs[0].document.data" in bad.stderr


def test_document_flags_that_do_not_fit_fail_before_any_call(
    server, documents, shared_data, tmp_path
) -> None:
    dcm = str(documents["paths"]["dicom"])
    cases = [
        (("predict", "--ecg", dcm, "--fs", "500"), ("--fs is for .npy",)),
        (
            ("predict", "--record", str(shared_data / "ptbxl-sample" / "HR06000"), "--format", "dicom"),
            ("--format",),
        ),
        (("explain", "--ecg", dcm, "--method", PASSED, "--fhir-out", str(tmp_path / "o.txt")), (".json",)),
    ]
    for args, fragments in cases:
        before = snapshot(tmp_path)
        assert_clean_failure(client(server, *args), *fragments, before=before, roots=[tmp_path])


def test_data_import_turns_documents_into_the_servers_median_beats(server, documents, tmp_path) -> None:
    paths = [str(documents["paths"][f]) for f in ("dicom", "fhir", "hl7-aecg")]
    out = tmp_path / "imported"
    result = run_ecgx("data", "import", *paths, str(documents["paths"]["junk"]), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped junk.dat" in result.stderr
    ds = load_dataset(out)
    assert len(ds) == 3 and ds.meta["source"] == "documents"
    assert ds.meta["input_waveforms"] == ["rhythm_strip"] * 3
    ok(client(server, "predict", "--ecg", paths[0], "--json", str(tmp_path / "p.json")))
    served = np.asarray(json.loads((tmp_path / "p.json").read_text())["beats_mv"], np.float32)[0]
    assert np.array_equal(np.asarray(ds.signals[0]), served)


def test_data_import_with_nothing_usable_writes_nothing(documents, tmp_path) -> None:
    out = tmp_path / "none"
    result = run_ecgx(
        "data", "import", str(documents["paths"]["dicom"]), "--format", "fhir", "--out", str(out)
    )
    assert result.returncode == 2 and "no usable ECG document" in result.stderr
    assert not out.exists()
