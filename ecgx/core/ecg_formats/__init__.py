"""ECG documents as hospitals store them, read into one record (:class:`EcgDocument`).

``read_ecg_document(data, format)`` decodes one document; ``format_of_file(path)`` names the
format of a file by its extension, then by its content. The readers live one per module and are
registered once, in :data:`_READERS`; each is imported only when its format is first read (the
DICOM reader pulls in pydicom, the FHIR reader fhir.resources).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ecgx.core.ecg_formats.record import (
    STANDARD_LEADS,
    DocumentLimits,
    EcgDocument,
    EcgDocumentError,
    Waveform,
)

FORMATS: tuple[str, ...] = ("dicom", "hl7-aecg", "ge-muse", "philips-sierra", "fhir")

# The one table of readers: format name -> module whose ``read(data, limits)`` decodes it.
_READERS: dict[str, str] = {
    "dicom": "ecgx.core.ecg_formats.dicom",
    "hl7-aecg": "ecgx.core.ecg_formats.hl7_aecg",
    "ge-muse": "ecgx.core.ecg_formats.ge_muse",
    "philips-sierra": "ecgx.core.ecg_formats.philips_sierra",
    "fhir": "ecgx.core.ecg_formats.fhir",
}

# Extensions that name one format; ``.xml`` is shared by three, so its content decides.
_EXTENSIONS: dict[str, str] = {".dcm": "dicom", ".dicom": "dicom", ".json": "fhir"}
DEFAULT_LIMITS = DocumentLimits()  # frozen: one shared default is safe
_SNIFF_BYTES = 4096  # enough to see a DICOM preamble or an XML root element


def read_ecg_document(data: bytes, format: str, *, limits: DocumentLimits = DEFAULT_LIMITS) -> EcgDocument:
    """Decode one ECG document of ``format`` (one of :data:`FORMATS`).

    Raises :class:`EcgDocumentError` (an InvalidArgument) naming the field for anything that is
    not a readable 12-lead ECG within ``limits``; the size is checked before anything is parsed.
    """
    module = _READERS.get(format)
    if module is None:
        raise EcgDocumentError(f"unknown ECG document format {format!r}; known: {', '.join(FORMATS)}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EcgDocumentError(f"an ECG document is bytes, not {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise EcgDocumentError(f"document: {len(data)} bytes is over the limit of {limits.max_bytes} bytes")
    return importlib.import_module(module).read(bytes(data), limits)


def format_of_file(path: str | Path, data: bytes | None = None) -> str:
    """The format of an ECG file: by its extension, then by sniffing its first bytes.

    ``data`` is the file's content when already read (otherwise its head is read from ``path``).
    Raises :class:`EcgDocumentError` when neither tells.
    """
    path = Path(path)
    by_extension = _EXTENSIONS.get(path.suffix.lower())
    if by_extension is not None:
        return by_extension
    if data is None:
        try:
            with path.open("rb") as handle:
                data = handle.read(_SNIFF_BYTES)
        except OSError as exc:
            raise EcgDocumentError(f"cannot read ECG file {path}: {exc.strerror}") from exc
    sniffed = sniff_format(data[:_SNIFF_BYTES])
    if sniffed is None:
        raise EcgDocumentError(
            f"cannot tell the ECG format of {path.name}: neither its extension nor its content "
            f"names one of {', '.join(FORMATS)} (give the format explicitly)"
        )
    return sniffed


def read_document_file(
    path: str | Path, format: str | None = None, *, limits: DocumentLimits = DEFAULT_LIMITS
) -> tuple[bytes, str]:
    """The bytes of an ECG document file and its format (``format`` if given, else by
    :func:`format_of_file`), nothing decoded; the size is checked before the file is read."""
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise EcgDocumentError(f"the format must be one of {', '.join(FORMATS)}, got {format!r}")
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise EcgDocumentError(
                f"{path}: {size} bytes, over the {limits.max_bytes} bytes a document may have"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise EcgDocumentError(f"cannot read ECG file {path}: {exc.strerror}") from exc
    return data, format or format_of_file(path, data)


def sniff_format(head: bytes) -> str | None:
    """The format the first bytes of a document show, or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"{"):
        return "fhir" if b'"resourceType"' in text else None
    root = _xml_root_name(text)
    return {"AnnotatedECG": "hl7-aecg", "RestingECG": "ge-muse", "restingecgdata": "philips-sierra"}.get(
        root or ""
    )


def _xml_root_name(text: bytes) -> str | None:
    """The local name of the first element of an XML head (skipping declarations, comments)."""
    position = 0
    while True:
        start = text.find(b"<", position)
        if start < 0 or start + 1 >= len(text):
            return None
        if text[start + 1 : start + 2] in (b"?", b"!"):
            position = start + 2
            continue
        end = start + 1
        while end < len(text) and text[end : end + 1] not in b" \t\r\n/>":
            end += 1
        name = text[start + 1 : end].decode("ascii", "replace")
        return name.rsplit(":", 1)[-1]


__all__ = [
    "DEFAULT_LIMITS",
    "FORMATS",
    "STANDARD_LEADS",
    "DocumentLimits",
    "EcgDocument",
    "EcgDocumentError",
    "Waveform",
    "format_of_file",
    "read_document_file",
    "read_ecg_document",
    "sniff_format",
]
