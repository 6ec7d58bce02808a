"""The model repository's events (loaded, refused with a reason category, removed, reloads) and
the refusal categories, on real gated packages made unfit in each way a version can be."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from repo_helpers import make_package

from ecgx.service.repository import (
    EVENT_LOADED,
    EVENT_REFUSED,
    EVENT_RELOAD_FAILED,
    EVENT_RELOADED,
    EVENT_REMOVED,
    REFUSAL_CATEGORIES,
    ModelRepository,
    RepositoryEvent,
    refusal_category,
)

MODEL = "ecg"
# version -> the category its refusal must fall in ("" serves)
EXPECTED = {
    "1": "",
    "2": "gate_failed",
    "3": "revoked",
    "4": "signature",
    "5": "integrity",
    "6": "research_report",
    "7": "expired",
    "8": "report_missing",
    "9": "report_invalid",
}


def flip_weight_byte(folder: Path) -> None:
    data = bytearray((folder / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "weights.bin").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def root(gated: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("events") / "repo"
    m = root / MODEL
    make_package(gated, m / "1")
    make_package(gated, m / "2", verdict="fail")
    (make_package(gated, m / "3") / "REVOKED").write_text("wrong labels in the training data\n")
    make_package(gated, m / "4", key=gated["other_private"])
    flip_weight_byte(make_package(gated, m / "5"))
    make_package(gated, m / "6", research=True)
    make_package(gated, m / "7", expires="2001-01-01T00:00:00Z")
    (make_package(gated, m / "8") / "gate.json").unlink()
    (make_package(gated, m / "9") / "gate.json").write_text("{ not json")
    return root


class Recorder:
    def __init__(self) -> None:
        self.events: list[RepositoryEvent] = []

    def __call__(self, event: RepositoryEvent) -> None:
        self.events.append(event)

    def take(self) -> list[tuple[str, str, str]]:
        out = [(e.kind, e.version, e.category) for e in self.events]
        self.events.clear()
        return out


def open_repository(gated: dict, root: Path, **kw) -> ModelRepository:
    return ModelRepository(root, [gated["public"]], engine_options={"threads": 1}, **kw)


def test_replay_tells_what_serves_and_why_the_others_do_not(gated, root) -> None:
    repo = open_repository(gated, root)
    rec = Recorder()
    repo.add_listener(rec)
    got = {version: (kind, category) for kind, version, category in rec.take()}
    want = {v: (EVENT_LOADED, "") if not c else (EVENT_REFUSED, c) for v, c in EXPECTED.items()}
    assert got == want, {v: repo.versions(MODEL)[int(v) - 1].refusal for v in got if got[v] != want[v]}
    assert all(e.model == MODEL for e in rec.events)
    repo.add_listener(Recorder(), replay=False)  # nothing replayed to it


def test_an_allow_list_refusal_is_policy(gated, root) -> None:
    repo = open_repository(gated, root, allowed_policies=["0" * 64])
    assert refusal_category(repo.versions(MODEL)[0].refusal) == "policy"


def test_reloads_tell_loads_removals_new_refusals_and_failures(gated, tmp_path) -> None:
    root = tmp_path / "repo"
    make_package(gated, root / MODEL / "1")
    make_package(gated, root / MODEL / "2")
    repo = open_repository(gated, root)
    rec = Recorder()
    repo.add_listener(rec, replay=False)
    repo.reload()
    assert rec.take() == [(EVENT_RELOADED, "", "")]  # nothing changed: no version events
    make_package(gated, root / MODEL / "3")
    shutil.rmtree(root / MODEL / "2")
    (root / MODEL / "1" / "REVOKED").write_text("")
    repo.reload()
    assert sorted(rec.take()) == sorted(
        [
            (EVENT_REFUSED, "1", "revoked"),
            (EVENT_LOADED, "3", ""),
            (EVENT_REMOVED, "2", ""),
            (EVENT_RELOADED, "", ""),
        ]
    )
    (root / MODEL / "1" / "REVOKED").unlink()
    repo.reload()
    assert rec.take() == [(EVENT_LOADED, "1", ""), (EVENT_RELOADED, "", "")]
    root.rename(tmp_path / "elsewhere")
    repo.reload()
    (event,) = rec.events
    assert event.kind == EVENT_RELOAD_FAILED and "is not a folder" in event.reason
    assert [v.version for v in repo.versions(MODEL)] == ["1", "3"]  # the serving versions stay


def test_a_failing_listener_does_not_stop_a_reload(gated, tmp_path) -> None:
    root = tmp_path / "repo"
    make_package(gated, root / MODEL / "1")
    repo = open_repository(gated, root)
    rec = Recorder()

    def broken(event: RepositoryEvent) -> None:
        raise RuntimeError("listener bug")

    repo.add_listener(broken)
    repo.add_listener(rec, replay=False)
    make_package(gated, root / MODEL / "2")
    repo.reload()
    assert rec.take() == [(EVENT_LOADED, "2", ""), (EVENT_RELOADED, "", "")]
    assert repo.generation == 2
    repo.remove_listener(rec)
    repo.reload()
    assert rec.take() == []


def test_refusal_categories_are_few_and_fixed() -> None:
    names = [c for c, _, _ in REFUSAL_CATEGORIES]
    assert len(names) == len(set(names)) <= 12
    assert refusal_category(None) == refusal_category("something new") == "other"
    # The fixed start decides before a phrase anywhere in the text (a gate's headline is free).
    assert refusal_category("the gate failed: weights changed after gating") == "gate_failed"
    assert refusal_category("weights.bin changed after gating (SHA-256 ...)") == "integrity"
