"""Safe XML for the XML formats (HL7 aECG, GE MUSE, Philips Sierra): one parser, one set of limits.

``defusedxml`` refuses DTDs, entity declarations and external references (billion laughs, XXE);
the depth and element count are checked on each start event of an incremental parse, so a
document that nests too deep or holds too many elements is refused while it is read, before the
tree is big. Namespaces are stripped from tags and attribute names so readers match local names.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import defusedxml
import defusedxml.ElementTree as DET

from ecgx.core.ecg_formats.record import DocumentLimits, EcgDocumentError


def parse_xml(data: bytes, limits: DocumentLimits, what: str) -> ET.Element:
    """The root of ``data`` parsed safely within ``limits``; ``what`` names the format in errors."""
    depth = 0
    elements = 0
    root: ET.Element | None = None
    try:
        for event, element in DET.iterparse(io.BytesIO(data), events=("start", "end"), forbid_dtd=True):
            if event == "end":
                depth -= 1
                continue
            depth += 1
            elements += 1
            if root is None:
                root = element
            if depth > limits.max_xml_depth:
                raise EcgDocumentError(
                    f"{what}: XML nesting deeper than the limit of {limits.max_xml_depth} "
                    f"at <{_local(element.tag)}>"
                )
            if elements > limits.max_xml_elements:
                raise EcgDocumentError(
                    f"{what}: more XML elements than the limit of {limits.max_xml_elements}"
                )
    except EcgDocumentError:
        raise
    except defusedxml.DTDForbidden:
        raise EcgDocumentError(f"{what}: XML with a DTD is refused (entity expansion)") from None
    except defusedxml.EntitiesForbidden:
        raise EcgDocumentError(f"{what}: XML entity declarations are refused") from None
    except defusedxml.ExternalReferenceForbidden:
        raise EcgDocumentError(f"{what}: XML external references are refused") from None
    except ET.ParseError as exc:
        raise EcgDocumentError(f"{what}: not well-formed XML ({exc})") from None
    except (LookupError, ValueError) as exc:  # an unknown or unsupported declared encoding
        raise EcgDocumentError(f"{what}: cannot decode the XML ({exc})") from None
    if root is None:
        raise EcgDocumentError(f"{what}: the document holds no XML element")
    for element in root.iter():
        _strip_namespaces(element)
    return root


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _strip_namespaces(element: ET.Element) -> None:
    if isinstance(element.tag, str):
        element.tag = _local(element.tag)
    if any(key.startswith("{") for key in element.attrib):
        element.attrib = {_local(key): value for key, value in element.attrib.items()}


def child(element: ET.Element, path: str, what: str) -> ET.Element:
    """The element at ``path`` below ``element``, or an error naming it."""
    found = element.find(path)
    if found is None:
        raise EcgDocumentError(f"{what}: <{path}> is missing")
    return found


def text_of(element: ET.Element, path: str, what: str) -> str:
    """The stripped text of the element at ``path``, or an error naming it."""
    text = (child(element, path, what).text or "").strip()
    if not text:
        raise EcgDocumentError(f"{what}: <{path}> is empty")
    return text


def attribute(element: ET.Element, name: str, what: str) -> str:
    """The attribute ``name`` of ``element``, or an error naming it."""
    value = element.get(name)
    if value is None:
        raise EcgDocumentError(f"{what}: <{element.tag}> has no attribute {name!r}")
    return value
