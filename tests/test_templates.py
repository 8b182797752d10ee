"""Templates: one per layout, stable ids, every field checked against the
element table (schemas/) and, for a few layouts, against field lists
written here by hand from the IANA registry."""

import struct

import pytest

from ovs_ipfix_py import elements
from ovs_ipfix_py import templates as t

# IANA element ids, from the registry (not from our table).
IANA = {
    "octetDeltaCount": 1, "packetDeltaCount": 2, "protocolIdentifier": 4,
    "ipClassOfService": 5, "tcpControlBits": 6, "sourceTransportPort": 7,
    "sourceIPv4Address": 8, "ingressInterface": 10,
    "destinationTransportPort": 11, "destinationIPv4Address": 12,
    "egressInterface": 14, "minimumIpTotalLength": 25,
    "maximumIpTotalLength": 26, "sourceIPv6Address": 27,
    "destinationIPv6Address": 28, "flowLabelIPv6": 31,
    "sourceMacAddress": 56, "vlanId": 58, "ipVersion": 60,
    "flowDirection": 61, "destinationMacAddress": 80,
    "flowEndReason": 136, "observationPointId": 138,
    "exportingProcessId": 144, "flowStartMilliseconds": 152,
    "flowEndMilliseconds": 153, "notSentFlowTotalCount": 166,
    "notSentPacketTotalCount": 167, "notSentOctetTotalCount": 168,
    "icmpTypeIPv4": 176, "icmpCodeIPv4": 177, "icmpTypeIPv6": 178,
    "icmpCodeIPv6": 179, "ipTTL": 192, "ipDiffServCodePoint": 195,
    "ipPrecedence": 196, "octetDeltaSumOfSquares": 198,
    "ethernetHeaderLength": 240, "dot1qVlanId": 243, "dot1qPriority": 244,
    "ethernetType": 256, "layer2OctetDeltaCount": 352,
    "interfaceName": 82, "interfaceDescription": 83,
    "ingressInterfaceType": 368, "egressInterfaceType": 369,
}
#: VMware enterprise elements (PEN 6876), from OVS's
#: ofproto/ipfix-enterprise-entities.def (not from our table).
VMWARE = {
    "tunnelType": (891, 1), "tunnelKey": (892, 65535),
    "tunnelSourceIPv4Address": (893, 4),
    "tunnelDestinationIPv4Address": (894, 4),
    "tunnelProtocolIdentifier": (895, 1),
    "tunnelSourceTransportPort": (896, 2),
    "tunnelDestinationTransportPort": (897, 2),
}
#: The interface part of the key as OVS 3.1 defines it (id, length).
IFACE_IN = [(10, 4), (368, 4), (82, 65535), (83, 65535)]
IFACE_OUT = [(14, 4), (369, 4), (82, 65535), (83, 65535)]

ALL_LAYOUTS = [(l2, l3, l4, d, tun)
               for l2 in (t.L2_ETH, t.L2_VLAN)
               for l3 in (t.L3_NONE, t.L3_IPV4, t.L3_IPV6)
               for l4 in ((t.L4_NONE,) if l3 == t.L3_NONE else
                          (t.L4_NONE, t.L4_TCP, t.L4_UDP, t.L4_SCTP,
                           t.L4_ICMP))
               for d in (t.INGRESS, t.EGRESS)
               for tun in (False, True)]


def specifiers(record):
    """(template id, [(element id, length, pen)]) of a template record."""
    tid, count = struct.unpack_from("!HH", record)
    pos = 4
    out = []
    for _ in range(count):
        ie, length = struct.unpack_from("!HH", record, pos)
        pos += 4
        pen = 0
        if ie & 0x8000:
            (pen,) = struct.unpack_from("!I", record, pos)
            pos += 4
            ie &= 0x7FFF
        out.append((ie, length, pen))
    assert pos == len(record)
    return tid, out


def test_one_template_per_layout_88_of_them():
    """44 layouts, each untunnelled and tunnelled (OVS's tunnel
    dimension); tunnelled ids clear of every other range."""
    templates = t.all_templates()
    assert len(ALL_LAYOUTS) == 88
    assert len(templates) == 88
    got = {(x.l2, x.l3, x.l4, x.direction, x.tunnel)
           for x in templates.values()}
    assert got == set(ALL_LAYOUTS)
    vobs = set(t.virtual_obs_templates())
    for tid, tmpl in templates.items():
        assert tmpl.id == tid
        assert t.template_id(tmpl.l2, tmpl.l3, tmpl.l4,
                             tmpl.direction, tmpl.tunnel) == tid
        if tmpl.tunnel:
            assert tid - t.TUNNEL_OFFSET in templates
            assert tid not in vobs and tid != t.OPTIONS_EXPORTER_STATS_ID
        else:
            assert 256 <= tid < t.OPTIONS_EXPORTER_STATS_ID


@pytest.mark.parametrize("layout, tid", [
    ((t.L2_ETH, t.L3_NONE, t.L4_NONE, t.INGRESS), 256),
    ((t.L2_ETH, t.L3_NONE, t.L4_NONE, t.EGRESS), 257),
    ((t.L2_ETH, t.L3_IPV4, t.L4_NONE, t.INGRESS), 266),
    ((t.L2_ETH, t.L3_IPV4, t.L4_TCP, t.INGRESS), 268),
    ((t.L2_ETH, t.L3_IPV4, t.L4_UDP, t.EGRESS), 271),
    ((t.L2_ETH, t.L3_IPV4, t.L4_ICMP, t.INGRESS), 274),
    ((t.L2_ETH, t.L3_IPV6, t.L4_SCTP, t.INGRESS), 282),
    ((t.L2_VLAN, t.L3_NONE, t.L4_NONE, t.INGRESS), 286),
    ((t.L2_VLAN, t.L3_IPV4, t.L4_UDP, t.INGRESS), 300),
    ((t.L2_VLAN, t.L3_IPV6, t.L4_ICMP, t.EGRESS), 315),
])
def test_ids_are_stable(layout, tid):
    """Ids written down once: a change breaks collectors' caches
    (RFC 7011 section 8.1: reuse with another layout only after
    3 x template refresh)."""
    assert t.template_id(*layout) == tid
    assert (t.get(tid).l2, t.get(tid).l3, t.get(tid).l4,
            t.get(tid).direction) == layout


@pytest.mark.parametrize("tid", sorted(t.all_templates()))
def test_every_field_against_the_element_table(tid):
    tmpl = t.get(tid)
    rid, specs = specifiers(tmpl.record)
    assert rid == tid
    assert len(specs) == len(tmpl.fields)
    ids = set()
    for (name, length), (ie, rec_length, pen) in zip(tmpl.fields, specs):
        element = elements.lookup(name)
        assert (element.id, element.pen) == (ie, pen), name
        assert rec_length == length, name
        if length == elements.VARIABLE_LENGTH:
            assert element.data_type in ("string", "octetArray"), name
        else:
            assert elements.reduced_size_ok(element, length), name
        if length == elements.VARIABLE_LENGTH:
            pass
        elif element.data_type.startswith("unsigned"):
            assert 1 <= length <= element.length
        else:
            assert length == element.length, name
        # interfaceName/Description come once per port (OVS's layout).
        assert (ie, pen) not in ids or ie in (82, 83), "duplicate %s" % name
        ids.add((ie, pen))
        if name in IANA:
            assert ie == IANA[name] and pen == 0, name
        if name in VMWARE:
            assert (ie, length, pen) == VMWARE[name] + (6876,), name

    def fixed(fields):
        return sum(1 if n == 65535 else n for _, n in fields)
    assert tmpl.data_length == fixed(tmpl.fields)
    assert tmpl.key_length == fixed(tmpl.key_fields)


def test_plain_ipv4_tcp_ingress_by_hand():
    """Template 268, field by field (IANA id, length), OVS's order."""
    expected = [
        (138, 4), (61, 1), (56, 6), (80, 6), (256, 2), (240, 1),
        *IFACE_IN,
        (60, 1), (192, 1), (4, 1), (195, 1), (196, 1), (5, 1),
        (8, 4), (12, 4), (7, 2), (11, 2),
        (152, 8), (153, 8), (2, 8), (352, 8), (136, 1),
        (1, 8), (198, 8), (25, 8), (26, 8), (6, 2),
    ]
    tid, specs = specifiers(t.get(268).record)
    assert tid == 268
    assert [(ie, length) for ie, length, _ in specs] == expected
    assert t.get(268).key_length == 48
    assert t.get(268).data_length == 115


def test_tunnelled_ipv4_udp_egress_by_hand():
    """Template 271 + TUNNEL_OFFSET: OVS's tunnel elements (VMware PEN
    6876) after the L4 part, in OVS's order, tunnelKey variable."""
    expected = [
        (138, 4, 0), (61, 1, 0), (56, 6, 0), (80, 6, 0), (256, 2, 0),
        (240, 1, 0), *[x + (0,) for x in IFACE_IN + IFACE_OUT],
        (60, 1, 0), (192, 1, 0), (4, 1, 0), (195, 1, 0), (196, 1, 0),
        (5, 1, 0), (8, 4, 0), (12, 4, 0), (7, 2, 0), (11, 2, 0),
        (893, 4, 6876), (894, 4, 6876), (895, 1, 6876), (896, 2, 6876),
        (897, 2, 6876), (891, 1, 6876), (892, 65535, 6876),
        (152, 8, 0), (153, 8, 0), (2, 8, 0), (352, 8, 0), (136, 1, 0),
        (1, 8, 0), (198, 8, 0), (25, 8, 0), (26, 8, 0),
    ]
    tid = t.template_id(t.L2_ETH, t.L3_IPV4, t.L4_UDP, t.EGRESS, True)
    assert tid == 271 + t.TUNNEL_OFFSET == 471
    rid, specs = specifiers(t.get(tid).record)
    assert rid == tid and specs == expected


def test_vlan_ipv6_icmp_egress_by_hand():
    expected = [
        (138, 4), (61, 1), (56, 6), (80, 6), (256, 2), (240, 1),
        *IFACE_IN, *IFACE_OUT, (58, 2), (243, 2), (244, 1),
        (60, 1), (192, 1), (4, 1), (195, 1), (196, 1), (5, 1),
        (27, 16), (28, 16), (31, 4), (178, 1), (179, 1),
        (152, 8), (153, 8), (2, 8), (352, 8), (136, 1),
        (1, 8), (198, 8), (25, 8), (26, 8),
    ]
    _, specs = specifiers(t.get(315).record)
    assert [(ie, length) for ie, length, _ in specs] == expected


def test_non_ip_has_no_ip_fields():
    expected = [(138, 4), (61, 1), (56, 6), (80, 6), (256, 2), (240, 1),
                *IFACE_IN, (152, 8), (153, 8), (2, 8), (352, 8), (136, 1)]
    _, specs = specifiers(t.get(256).record)
    assert [(ie, length) for ie, length, _ in specs] == expected


@pytest.mark.parametrize("tid", sorted(t.all_templates()))
def test_layout_rules(tid):
    tmpl = t.get(tid)
    names = [n for n, _ in tmpl.fields]
    assert ("egressInterface" in names) == (tmpl.direction == t.EGRESS)
    assert ("vlanId" in names) == (tmpl.l2 == t.L2_VLAN)
    assert ("sourceIPv4Address" in names) == (tmpl.l3 == t.L3_IPV4)
    assert ("sourceIPv6Address" in names) == (tmpl.l3 == t.L3_IPV6)
    assert ("octetDeltaCount" in names) == (tmpl.l3 != t.L3_NONE)
    assert ("tcpControlBits" in names) == (tmpl.l4 == t.L4_TCP)
    assert ("tunnelKey" in names) == tmpl.tunnel
    assert names.count("interfaceName") == 1 + (tmpl.direction == t.EGRESS)
    assert ("sourceTransportPort" in names) == \
        (tmpl.l4 in (t.L4_TCP, t.L4_UDP, t.L4_SCTP))
    assert ("icmpTypeIPv4" in names) == \
        (tmpl.l4 == t.L4_ICMP and tmpl.l3 == t.L3_IPV4)
    assert ("icmpTypeIPv6" in names) == \
        (tmpl.l4 == t.L4_ICMP and tmpl.l3 == t.L3_IPV6)
    # The key comes first, the aggregate after it.
    key_names = [n for n, _ in tmpl.key_fields]
    assert names[:len(key_names)] == key_names
    assert names[len(key_names):len(key_names) + 2] == [
        "flowStartMilliseconds", "flowEndMilliseconds"]


def test_exporter_stats_options_template():
    """RFC 7011 section 4.3 with section 3.4.2.2's layout: id, field
    count, scope field count (not 0), scope fields first."""
    opt = t.exporter_stats_template()
    assert opt.record == bytes.fromhex(
        "0140" "0004" "0001"
        "0090" "0004"
        "00a6" "0008" "00a7" "0008" "00a8" "0008")
    assert opt.id == t.OPTIONS_EXPORTER_STATS_ID == 320
    assert opt.id not in t.all_templates()
    assert opt.data_length == 4 + 3 * 8


def test_virtual_obs_variants():
    """Every layout has a variant with virtualObsID (VMware PEN 6876,
    variable length) right after the key, at id + VIRTUAL_OBS_OFFSET,
    clear of the plain ids and of the options template's."""
    plain = t.all_templates()
    variants = t.virtual_obs_templates()
    assert len(variants) == len(plain) == 88
    for tid, tmpl in plain.items():
        v = variants[tid + t.VIRTUAL_OBS_OFFSET]
        assert t.get(v.id) is v and v.virtual_obs and not tmpl.virtual_obs
        rid, specs = specifiers(v.record)
        assert rid == v.id
        k = len(tmpl.key_fields)
        assert specs[:k] + specs[k + 1:] == specifiers(tmpl.record)[1]
        element = elements.lookup("virtualObsID")
        assert (element.pen, element.id) == (6876, 898)
        assert specs[k] == (898, elements.VARIABLE_LENGTH, 6876)
    ids = set(plain) | set(variants)
    assert len(ids) == 176
    assert t.OPTIONS_EXPORTER_STATS_ID not in ids
