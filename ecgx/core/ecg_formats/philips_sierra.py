"""Philips Sierra ECG XML (``restingecgdata``, TraceMaster / IntelliSpace ECG), safe XML parser.

``dataacquisition/signalcharacteristics`` gives the sampling rate and the resolution (microvolts
per count, ``signalresolution`` or ``resolution``); ``parsedwaveforms`` holds base64 little-endian
int16 samples, lead after lead, labelled by ``leadlabels``, ``durationperchannel`` milliseconds
each; ``repbeats`` the representative beats, one ``repbeat`` per lead. Uncompressed
and XLI-compressed waveforms are read (see :mod:`sierra_xli`; XLI stores the limb leads III,
aVR, aVL, aVF as residuals from I and II, restored here).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ecgx.core.ecg_formats.leads import (
    assemble_leads,
    check_counts,
    derivation_note,
    make_waveform,
    map_leads,
)
from ecgx.core.ecg_formats.payload import decode_base64, int16_samples
from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocument, EcgDocumentError, Waveform
from ecgx.core.ecg_formats.sierra_xli import restore_limb_leads, xli_decode
from ecgx.core.ecg_formats.units import parse_number, parse_rate
from ecgx.core.ecg_formats.xml_safety import attribute, child, parse_xml, text_of

_WHAT = "Philips Sierra"
_MV_PER_UV = 1e-3  # Sierra's resolutions are microvolts per count
XLI_LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")


def read(data: bytes, limits: DocumentLimits) -> EcgDocument:
    """Read a Philips Sierra ECG XML document (see the module's docstring)."""
    root = parse_xml(data, limits, _WHAT)
    if root.tag != "restingecgdata":
        raise EcgDocumentError(f"{_WHAT}: the root element is <{root.tag}>, not <restingecgdata>")
    signal = child(root, "dataacquisition/signalcharacteristics", _WHAT)
    rate = parse_rate(
        parse_number(text_of(signal, "samplingrate", _WHAT), f"{_WHAT}: samplingrate"),
        f"{_WHAT}: samplingrate",
    )
    resolution_text = signal.findtext("signalresolution") or signal.findtext("resolution")
    resolution = parse_number(resolution_text, f"{_WHAT}: signalcharacteristics/signalresolution")
    metadata = {"document_version": (root.findtext("documentinfo/documentversion") or "").strip()}
    metadata.update(_filters(root))
    rhythm, labels, notes = _parsed_waveforms(child(root, "parsedwaveforms", _WHAT), rate, resolution, limits)
    metadata.update({f"rhythm.{k}": v for k, v in notes.items()})
    median = None
    repbeats = root.find("repbeats")
    if repbeats is not None and repbeats.findall("repbeat"):
        median, notes = _repbeats(repbeats, rate, resolution, limits)
        metadata.update({f"median_beat.{k}": v for k, v in notes.items()})
    return EcgDocument("philips-sierra", rhythm, median, labels, metadata)


def _parsed_waveforms(
    element: ET.Element, rate: float, resolution: float, limits: DocumentLimits
) -> tuple[Waveform, tuple[str, ...], dict[str, str]]:
    field = f"{_WHAT}: parsedwaveforms"
    _check_encoding(element, field)
    labels = tuple(attribute(element, "leadlabels", field).split())
    count = int(parse_number(element.get("numberofleads", str(len(labels))), f"{field} numberofleads"))
    labels = labels[:count]
    duration_ms = parse_number(attribute(element, "durationperchannel", field), f"{field} durationperchannel")
    samples = round(duration_ms * rate / 1000.0)
    check_counts(len(labels), samples, limits, field)
    mapped = map_leads(labels, field)
    if _compression(element) == "xli":
        raw = decode_base64(element.text or "", len(element.text or ""), field)
        counts = xli_decode(raw, len(labels), samples, field)
        by_lead = {lead: counts[i] for lead, i in mapped.items()}
        if any(lead not in by_lead for lead in XLI_LIMB_LEADS):
            raise EcgDocumentError(
                f"{field}: XLI needs leads {', '.join(XLI_LIMB_LEADS)}; the source has {list(labels)}"
            )
        restore_limb_leads(by_lead)
    else:
        raw = decode_base64(element.text or "", 2 * samples * len(labels), field)
        counts = int16_samples(raw, samples * len(labels), field).reshape(len(labels), samples)
        by_lead = {lead: counts[i] for lead, i in mapped.items()}
    signals = {lead: values * resolution * _MV_PER_UV for lead, values in by_lead.items()}
    mv, derived = assemble_leads(signals, labels, field)
    return make_waveform(mv, rate, field), labels, derivation_note(derived)


def _repbeats(
    element: ET.Element, rate: float, resolution: float, limits: DocumentLimits
) -> tuple[Waveform, dict[str, str]]:
    field = f"{_WHAT}: repbeats"
    _check_encoding(element, field)
    if _compression(element) != "uncompressed":
        raise EcgDocumentError(f"{field}: compressed representative beats are not supported")
    rate = parse_rate(
        parse_number(element.get("samplespersec") or str(rate), field), f"{field} samplespersec"
    )
    resolution = parse_number(element.get("resolution") or str(resolution), f"{field} resolution")
    beats = element.findall("repbeat")
    check_counts(len(beats), 1, limits, field)
    labels = tuple(attribute(beat, "leadname", field) for beat in beats)
    signals = {}
    for lead, index in map_leads(labels, field).items():
        beat = beats[index]
        waveform = beat.find("waveform")
        holder = waveform if waveform is not None else beat  # 1.03 puts the data in <repbeat>
        lead_field = f"{field} {labels[index]}"
        duration_ms = parse_number(attribute(holder, "duration", lead_field), f"{lead_field} duration")
        samples = round(duration_ms * rate / 1000.0)
        check_counts(1, samples, limits, lead_field)
        raw = decode_base64(holder.text or "", 2 * samples, lead_field)
        signals[lead] = int16_samples(raw, samples, lead_field) * resolution * _MV_PER_UV
    mv, derived = assemble_leads(signals, labels, field)
    notes = {"method": element.get("repbeatmethod", ""), **derivation_note(derived)}
    return make_waveform(mv, rate, field), notes


def _check_encoding(element: ET.Element, field: str) -> None:
    encoding = element.get("dataencoding", "Base64")
    if encoding != "Base64":
        raise EcgDocumentError(f"{field}: dataencoding {encoding!r} is not supported (only Base64)")
    if _compression(element) not in ("uncompressed", "xli"):
        raise EcgDocumentError(
            f"{field}: compression {element.get('compressmethod') or element.get('compression')!r} is "
            "not supported (only uncompressed and XLI)"
        )


def _compression(element: ET.Element) -> str:
    compression = (element.get("compressmethod") or element.get("compression") or "Uncompressed").lower()
    return "uncompressed" if compression in ("uncompressed", "none", "false") else compression


def _filters(root: ET.Element) -> dict[str, str]:
    """Filter settings as Sierra writes them (reportinfo/reportbandwidth and filtersetting)."""
    notes = {}
    for path in ("reportinfo/reportbandwidth", "dataacquisition/acquirer/filtersetting"):
        element = root.find(path)
        if element is not None:
            for item in element:
                if (item.text or "").strip():
                    notes[f"filter.{item.tag}"] = item.text.strip()
    return notes
