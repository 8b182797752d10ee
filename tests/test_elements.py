"""The IPFIX information element table (schemas/ipfix-elements.csv)."""

import csv
import os
import sys

import pytest

from ovs_ipfix_py import elements
from ovs_ipfix_py.elements import VARIABLE_LENGTH, Element

# Every element OVS's exporter (ofproto-dpif-ipfix.c) uses, or that our
# options templates use: name -> (id, type).
OVS_ELEMENTS = {
    "observationPointId": (138, "unsigned64"),
    "flowDirection": (61, "unsigned8"),
    "sourceMacAddress": (56, "macAddress"),
    "destinationMacAddress": (80, "macAddress"),
    "ethernetType": (256, "unsigned16"),
    "ethernetHeaderLength": (240, "unsigned8"),
    "vlanId": (58, "unsigned16"),
    "dot1qVlanId": (243, "unsigned16"),
    "dot1qPriority": (244, "unsigned8"),
    "ipVersion": (60, "unsigned8"),
    "ipTTL": (192, "unsigned8"),
    "protocolIdentifier": (4, "unsigned8"),
    "ipDiffServCodePoint": (195, "unsigned8"),
    "ipPrecedence": (196, "unsigned8"),
    "ipClassOfService": (5, "unsigned8"),
    "sourceIPv4Address": (8, "ipv4Address"),
    "destinationIPv4Address": (12, "ipv4Address"),
    "sourceIPv6Address": (27, "ipv6Address"),
    "destinationIPv6Address": (28, "ipv6Address"),
    "flowLabelIPv6": (31, "unsigned32"),
    "sourceTransportPort": (7, "unsigned16"),
    "destinationTransportPort": (11, "unsigned16"),
    "icmpTypeIPv4": (176, "unsigned8"),
    "icmpCodeIPv4": (177, "unsigned8"),
    "icmpTypeIPv6": (178, "unsigned8"),
    "icmpCodeIPv6": (179, "unsigned8"),
    "flowStartDeltaMicroseconds": (158, "unsigned32"),
    "flowEndDeltaMicroseconds": (159, "unsigned32"),
    "packetDeltaCount": (2, "unsigned64"),
    "layer2OctetDeltaCount": (352, "unsigned64"),
    "flowEndReason": (136, "unsigned8"),
    "octetDeltaCount": (1, "unsigned64"),
    "octetDeltaSumOfSquares": (198, "unsigned64"),
    "minimumIpTotalLength": (25, "unsigned64"),
    "maximumIpTotalLength": (26, "unsigned64"),
    "tcpControlBits": (6, "unsigned16"),
    "ingressInterface": (10, "unsigned32"),
    "egressInterface": (14, "unsigned32"),
    "interfaceName": (82, "string"),
    "exportingProcessId": (144, "unsigned32"),
    "notSentFlowTotalCount": (166, "unsigned64"),
    "notSentPacketTotalCount": (167, "unsigned64"),
    "notSentOctetTotalCount": (168, "unsigned64"),
    "selectorId": (302, "unsigned64"),
    "selectorAlgorithm": (304, "unsigned16"),
    "samplingPacketInterval": (305, "unsigned32"),
    "samplingPacketSpace": (306, "unsigned32"),
    "samplingSize": (309, "unsigned32"),
    "samplingPopulation": (310, "unsigned32"),
    "samplingProbability": (311, "float64"),
    "exportedMessageTotalCount": (41, "unsigned64"),
    "exportedFlowRecordTotalCount": (42, "unsigned64"),
    "exportedOctetTotalCount": (40, "unsigned64"),
    "observationDomainId": (149, "unsigned32"),
}

VMWARE_ELEMENTS = {
    "tunnelType": (891, "unsigned8", 1),
    "tunnelKey": (892, "octetArray", VARIABLE_LENGTH),
    "tunnelSourceIPv4Address": (893, "ipv4Address", 4),
    "tunnelDestinationIPv4Address": (894, "ipv4Address", 4),
    "tunnelProtocolIdentifier": (895, "unsigned8", 1),
    "tunnelSourceTransportPort": (896, "unsigned16", 2),
    "tunnelDestinationTransportPort": (897, "unsigned16", 2),
    "virtualObsID": (898, "string", VARIABLE_LENGTH),
}


@pytest.mark.parametrize("name", sorted(OVS_ELEMENTS))
def test_ovs_elements_have_current_ids_and_types(name):
    element_id, data_type = OVS_ELEMENTS[name]
    element = elements.lookup(name)
    assert (element.id, element.data_type, element.pen) == (
        element_id, data_type, 0)
    assert element.status == "current"
    assert elements.by_id(element_id) is element


@pytest.mark.parametrize("name", sorted(VMWARE_ELEMENTS))
def test_vmware_elements(name):
    element_id, data_type, length = VMWARE_ELEMENTS[name]
    element = elements.lookup(name)
    assert element == Element(element.id, name, data_type,
                              element.semantics, "", "current",
                              elements.PEN_VMWARE, length)
    assert element.id == element_id
    assert elements.by_id(element_id, pen=6876) is element
    with pytest.raises(KeyError):
        elements.by_id(element_id)  # not an IANA id


def test_default_lengths():
    expect = {
        "protocolIdentifier": 1, "vlanId": 2, "flowLabelIPv6": 4,
        "packetDeltaCount": 8, "sourceMacAddress": 6,
        "sourceIPv4Address": 4, "sourceIPv6Address": 16,
        "samplingProbability": 8, "flowStartSeconds": 4,
        "flowStartMilliseconds": 8, "flowStartMicroseconds": 8,
        "flowStartNanoseconds": 8, "dataRecordsReliability": 1,
        "mibObjectValueInteger": 4, "tcpOptionsFull": 32,
        "interfaceName": VARIABLE_LENGTH, "paddingOctets": VARIABLE_LENGTH,
        "basicList": VARIABLE_LENGTH, "subTemplateList": VARIABLE_LENGTH,
        "subTemplateMultiList": VARIABLE_LENGTH,
    }
    got = {name: elements.lookup(name).length for name in expect}
    assert got == expect


def test_deprecated_elements_are_kept_and_marked():
    assert elements.lookup("samplingInterval").status == "deprecated"
    assert elements.lookup("tcpOptions").status == "deprecated"
    assert elements.by_id(34).name == "samplingInterval"


def test_semantics_and_units_come_through():
    octets = elements.lookup("octetDeltaCount")
    assert (octets.semantics, octets.units) == ("deltaCounter", "octets")
    start = elements.lookup("flowStartDeltaMicroseconds")
    assert start.units == "microseconds"
    assert elements.lookup("ipv4IHL").units == "4-octet words"


def test_unknown_name_raises_clear_key_error():
    with pytest.raises(KeyError) as info:
        elements.lookup("noSuchElement")
    assert "unknown IPFIX information element 'noSuchElement'" in str(
        info.value)
    with pytest.raises(KeyError):
        elements.lookup("octetdeltacount")  # names are case-sensitive
    with pytest.raises(KeyError):
        elements.by_id(0)
    with pytest.raises(KeyError):
        elements.by_id(65)  # reserved for NetFlow v9 compatibility


@pytest.mark.parametrize("name,length,ok", [
    ("packetDeltaCount", 8, True),
    ("packetDeltaCount", 4, True),
    ("packetDeltaCount", 1, True),
    ("packetDeltaCount", 9, False),
    ("packetDeltaCount", 0, False),
    ("observationPointId", 4, True),  # as OVS encodes it
    ("tcpControlBits", 1, True),
    ("tcpControlBits", 3, False),
    ("protocolIdentifier", 1, True),
    ("protocolIdentifier", 2, False),
    ("mibObjectValueInteger", 2, True),  # signed32
    ("tcpOptionsFull", 8, True),  # unsigned256
    ("samplingProbability", 4, True),  # float64 -> float32
    ("samplingProbability", 8, True),
    ("samplingProbability", 2, False),
    ("samplingProbability", 6, False),
    ("sourceIPv4Address", 4, True),
    ("sourceIPv4Address", 3, False),
    ("sourceIPv6Address", 8, False),
    ("sourceMacAddress", 4, False),
    ("flowStartMilliseconds", 4, False),  # timestamps are not reducible
    ("flowStartSeconds", 4, True),
    ("dataRecordsReliability", 1, True),
    ("dataRecordsReliability", 2, False),
    ("interfaceName", VARIABLE_LENGTH, True),
    ("interfaceName", 16, True),  # fixed-length string in the template
    ("paddingOctets", 0, True),
    ("virtualObsID", VARIABLE_LENGTH, True),
    ("basicList", VARIABLE_LENGTH, True),
    ("basicList", 70000, False),
])
def test_reduced_size_ok(name, length, ok):
    assert elements.reduced_size_ok(elements.lookup(name), length) is ok


def test_table_is_whole_and_unique():
    table = elements.all_elements()
    keys = [(e.id, e.pen) for e in table]
    names = [e.name for e in table]
    assert len(set(keys)) == len(keys)
    assert len(set(names)) == len(names)
    iana = [e for e in table if e.pen == 0]
    # The whole registry: 1..529 less the reserved/NetFlow-v9 rows.
    assert len(iana) >= 490
    assert max(e.id for e in iana) >= 529
    assert all(1 <= e.id < 0x8000 for e in table)
    assert all(e.status in ("current", "deprecated") for e in table)
    assert {e.pen for e in table} == {0, elements.PEN_VMWARE}


def test_csv_parses_fully_and_matches_table():
    path = elements.schema_path()
    assert os.path.basename(path) == "ipfix-elements.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["element_id", "name", "data_type", "semantics",
                       "units", "status", "pen"]
    assert all(len(row) == 7 for row in rows)
    assert len(rows) - 1 == len(elements.all_elements())
    for row, element in zip(rows[1:], elements.all_elements()):
        assert (int(row[0]), row[1], int(row[6])) == (
            element.id, element.name, element.pen)


def test_schema_is_found_in_the_checkout():
    here = os.path.dirname(os.path.abspath(__file__))
    expect = os.path.join(os.path.dirname(here), "schemas",
                          "ipfix-elements.csv")
    assert os.path.samefile(elements.schema_path(), expect)


def test_bad_tables_are_rejected_with_line_numbers(tmp_path):
    header = "element_id,name,data_type,semantics,units,status,pen\n"
    cases = {
        "dup-id": "1,a,unsigned8,,,current,0\n1,b,unsigned8,,,current,0\n",
        "dup-name": "1,a,unsigned8,,,current,0\n2,a,unsigned8,,,current,0\n",
        "bad-type": "1,a,unsigned7,,,current,0\n",
        "bad-id": "x,a,unsigned8,,,current,0\n",
        "short": "1,a,unsigned8\n",
        "big-id": "40000,a,unsigned8,,,current,0\n",
    }
    for label, body in cases.items():
        path = tmp_path / (label + ".csv")
        path.write_text(header + body)
        with pytest.raises(ValueError, match=r"\.csv(:\d+)?: "):
            elements._load(str(path))
    path = tmp_path / "header.csv"
    path.write_text("id,name\n1,a\n")
    with pytest.raises(ValueError, match="header"):
        elements._load(str(path))
    # Same ids under different PENs are distinct elements.
    path = tmp_path / "pens.csv"
    path.write_text(header + "1,a,unsigned8,,,current,0\n"
                    "1,b,unsigned8,,,current,6876\n")
    table = elements._load(str(path))
    assert table.by_key[(1, 6876)].name == "b"


def test_missing_schema_names_the_places_searched(monkeypatch, tmp_path):
    paths = elements._candidate_paths()
    assert paths[1] == os.path.join(sys.prefix, "share", "ovs-ipfix-py",
                                    "schemas", "ipfix-elements.csv")
    missing = (str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    monkeypatch.setattr(elements, "_candidate_paths", lambda: missing)
    with pytest.raises(FileNotFoundError, match="a.csv, .*b.csv"):
        elements._find_schema()
