"""The fixed vocabulary of the product: lead order, beat geometry and the nine classes.

Everything that reads or writes ECG arrays (generator, WFDB import, training,
export, engine, service) takes these from here, so a class index or lead index
means the same thing everywhere. NumPy-free and torch-free on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecgx.core.errors import NotFound

LEADS: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)
N_LEADS = len(LEADS)
SAMPLING_RATE_HZ = 500
BEAT_SAMPLES = 600  # 1.2 s at 500 Hz
R_PEAK_SAMPLE = 250  # every median beat has its R peak here (0.5 s into the window)


@dataclass(frozen=True)
class DiagnosticClass:
    """One output of the classifier: a SNOMED CT concept (or family of concepts)."""

    key: str  # short stable identifier used in code, CLIs and file names
    code: str  # primary SNOMED CT code, as in PTB-XL / PhysioNet 2021
    name: str
    aliases: tuple[str, ...] = ()  # further SNOMED codes mapped onto this class


CLASSES: tuple[DiagnosticClass, ...] = (
    DiagnosticClass("SR", "426783006", "sinus rhythm"),
    DiagnosticClass("STach", "427084000", "sinus tachycardia"),
    DiagnosticClass("SBrad", "426177001", "sinus bradycardia"),
    DiagnosticClass("AF", "164889003", "atrial fibrillation"),
    DiagnosticClass("IAVB", "270492004", "first-degree AV block"),
    DiagnosticClass("LBBB", "164909002", "left bundle branch block", ("733534002",)),
    DiagnosticClass("RBBB", "59118001", "right bundle branch block", ("713427006",)),
    DiagnosticClass("LVH", "164873001", "left ventricular hypertrophy"),
    DiagnosticClass(
        "STT",
        "164861001",
        "ischaemic ST-T change",
        # ST-T family as grouped by the PhysioNet 2021 challenge scoring.
        ("164934002", "55930002", "429622005", "164931005", "59931005", "428750005"),
    ),
)
N_CLASSES = len(CLASSES)
CLASS_KEYS: tuple[str, ...] = tuple(c.key for c in CLASSES)


def class_index(key_or_code: str) -> int:
    """Index of a class given its key (``"LBBB"``), primary code or an alias code."""
    for i, c in enumerate(CLASSES):
        if key_or_code in (c.key, c.code, *c.aliases):
            return i
    known = ", ".join(CLASS_KEYS)
    raise NotFound(f"unknown class {key_or_code!r}; known classes: {known}")


def snomed_to_class() -> dict[str, int]:
    """Map every SNOMED code this product understands to its class index."""
    table: dict[str, int] = {}
    for i, c in enumerate(CLASSES):
        for code in (c.code, *c.aliases):
            table[code] = i
    return table
