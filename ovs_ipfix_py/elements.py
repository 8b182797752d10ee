"""The IPFIX information element table, loaded from schemas/.

``schemas/ipfix-elements.csv`` holds one row per information element with
the columns ``element_id,name,data_type,semantics,units,status,pen``
(``pen`` 0 for IANA elements).  This module reads it once, lazily, and
answers look-ups by name or by (id, PEN).

Source and date (converted November 2026 from public copies):

- IANA "IPFIX Information Elements" sub-registry of the "IP Flow
  Information Export (IPFIX) Entities" registry: elements 1-529 with
  type, semantics, units and status from a republished copy of
  ``ipfix-information-elements.csv`` (revisions through 2024-10-23); ids,
  names and types of 1-533 cross-checked against a second copy (registry
  as updated 2026-09-11).  Every element carries its *current*
  definition (for example observationPointId is unsigned64 and
  tcpControlBits unsigned16, per RFC 9565); deprecated ones are kept,
  marked ``deprecated``.  Rows that are reserved or merely "assigned for
  NetFlow v9 compatibility" (65-69, 97, 105-127) and unassigned ids
  (416, 419) are left out.  ``unsigned256`` is the type RFC 9740 added.
- Elements 530-533 (pathDelay*DeltaMicroseconds, On-Path Telemetry
  delay) are only in the newer copy, which gives id, name and type;
  their semantics and units (quantity, or deltaCounter for the sum;
  microseconds) follow draft-ietf-opsawg-ipfix-on-path-telemetry.
- VMware enterprise elements (PEN 6876) that Open vSwitch sends, as
  declared in OVS's ``ofproto/ipfix-enterprise-entities.def``:
  tunnelType 891 ... tunnelDestinationTransportPort 897 and
  virtualObsID 898 (variable length).

Lengths: ``Element.length`` is the natural encoded length in octets of the
element's abstract data type (RFC 7011 Section 6.1), or
``VARIABLE_LENGTH`` (65535) for types that have none.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Dict, NamedTuple, Optional, Tuple

VARIABLE_LENGTH = 65535

#: Private Enterprise Number of VMware, whose elements OVS exports.
PEN_VMWARE = 6876

# Natural encoded length (octets) of each abstract data type; RFC 7011
# Section 6.1 and RFC 7012 Section 3.1 (unsigned256: RFC 9740).
_TYPE_LENGTHS = {
    "unsigned8": 1,
    "signed8": 1,
    "boolean": 1,
    "unsigned16": 2,
    "signed16": 2,
    "unsigned32": 4,
    "signed32": 4,
    "float32": 4,
    "dateTimeSeconds": 4,
    "ipv4Address": 4,
    "unsigned64": 8,
    "signed64": 8,
    "float64": 8,
    "dateTimeMilliseconds": 8,
    "dateTimeMicroseconds": 8,
    "dateTimeNanoseconds": 8,
    "macAddress": 6,
    "ipv6Address": 16,
    "unsigned256": 32,
    "octetArray": VARIABLE_LENGTH,
    "string": VARIABLE_LENGTH,
    "basicList": VARIABLE_LENGTH,
    "subTemplateList": VARIABLE_LENGTH,
    "subTemplateMultiList": VARIABLE_LENGTH,
}

_COLUMNS = ("element_id", "name", "data_type", "semantics", "units",
            "status", "pen")

_SCHEMA_NAME = "ipfix-elements.csv"


class Element(NamedTuple):
    """One information element.

    ``length`` is the default encoded length in octets (the natural size
    of ``data_type``), ``VARIABLE_LENGTH`` when the type has none.
    """

    id: int
    name: str
    data_type: str
    semantics: str
    units: str
    status: str
    pen: int
    length: int


class _Table(NamedTuple):
    path: str
    elements: Tuple[Element, ...]
    by_name: Dict[str, Element]
    by_key: Dict[Tuple[int, int], Element]


_table: Optional[_Table] = None


def _candidate_paths() -> Tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    return (
        # Source checkout or editable install.
        os.path.join(os.path.dirname(here), "schemas", _SCHEMA_NAME),
        # setup.cfg installs the schema as data_files under the prefix.
        os.path.join(sys.prefix, "share", "ovs-ipfix-py", "schemas",
                     _SCHEMA_NAME),
    )


def _find_schema() -> str:
    candidates = _candidate_paths()
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"IPFIX element table {_SCHEMA_NAME} not found; looked in: "
        + ", ".join(candidates))


def _parse_row(path: str, lineno: int, row: Dict[str, str]) -> Element:
    def fail(why: str) -> ValueError:
        return ValueError(f"{path}:{lineno}: {why}")

    if None in row or any(row.get(c) is None for c in _COLUMNS):
        raise fail(f"expected {len(_COLUMNS)} columns")
    try:
        element_id = int(row["element_id"])
        pen = int(row["pen"])
    except ValueError:
        raise fail("element_id and pen must be integers") from None
    if not 0 < element_id < 0x8000:
        # The enterprise bit takes the top bit of the 16-bit IE id.
        raise fail(f"element_id {element_id} out of range 1..32767")
    if not 0 <= pen <= 0xFFFFFFFF:
        raise fail(f"pen {pen} out of range")
    name = row["name"].strip()
    if not name:
        raise fail("empty name")
    data_type = row["data_type"].strip()
    if data_type not in _TYPE_LENGTHS:
        raise fail(f"unknown data type {data_type!r}")
    return Element(element_id, name, data_type, row["semantics"].strip(),
                   row["units"].strip(), row["status"].strip(), pen,
                   _TYPE_LENGTHS[data_type])


def _load(path: str) -> _Table:
    elements = []
    by_name: Dict[str, Element] = {}
    by_key: Dict[Tuple[int, int], Element] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != _COLUMNS:
            raise ValueError(
                f"{path}: header must be {','.join(_COLUMNS)}")
        for row in reader:
            element = _parse_row(path, reader.line_num, row)
            key = (element.id, element.pen)
            if key in by_key:
                raise ValueError(
                    f"{path}:{reader.line_num}: duplicate element id "
                    f"{element.id} (pen {element.pen})")
            if element.name in by_name:
                raise ValueError(
                    f"{path}:{reader.line_num}: duplicate element name "
                    f"{element.name!r}")
            elements.append(element)
            by_key[key] = element
            by_name[element.name] = element
    return _Table(path, tuple(elements), by_name, by_key)


def _get_table() -> _Table:
    global _table
    if _table is None:
        _table = _load(_find_schema())
    return _table


def schema_path() -> str:
    """Path of the CSV file the table is (or will be) loaded from."""
    return _get_table().path


def all_elements() -> Tuple[Element, ...]:
    """Every element of the table, in file order (IANA first, by id)."""
    return _get_table().elements


def lookup(name: str) -> Element:
    """The element called ``name`` (case-sensitive, as IANA spells it).

    Raises KeyError("unknown IPFIX information element 'x'") if unknown.
    """
    try:
        return _get_table().by_name[name]
    except KeyError:
        raise KeyError(
            f"unknown IPFIX information element {name!r}") from None


def by_id(element_id: int, pen: int = 0) -> Element:
    """The element with ``element_id`` in enterprise ``pen`` (0: IANA).

    Raises KeyError if the table has no such element.
    """
    try:
        return _get_table().by_key[(element_id, pen)]
    except KeyError:
        raise KeyError(f"unknown IPFIX information element id "
                       f"{element_id} (pen {pen})") from None


def reduced_size_ok(element: Element, length: int) -> bool:
    """Whether a template may give ``element`` the field length ``length``.

    RFC 7011 Section 6.2 allows reduced-size encoding for the integral
    types: "The reduction in size can be to any number of octets smaller
    than the original type if the data value still fits", and it "MAY be
    used to reduce float64 to float32"; RFC 9740 extends it to
    unsigned256.  So integers (unsigned*/signed*) may take 1..natural
    octets, float64 4 or 8, and every other fixed-size type (boolean,
    addresses, timestamps, float32) exactly its natural length.
    Variable-length types (octetArray, string, lists) take
    ``VARIABLE_LENGTH`` or any fixed length 0..65534 that the template
    chooses (RFC 7011 Section 7).
    """
    natural = element.length
    if natural == VARIABLE_LENGTH:
        return 0 <= length <= VARIABLE_LENGTH
    data_type = element.data_type
    if data_type.startswith(("unsigned", "signed")):
        return 1 <= length <= natural
    if data_type == "float64":
        return length in (4, 8)
    return length == natural
