"""Template layouts and their stable ids.

A data record's layout is fixed by five choices, as in OVS's
ofproto-dpif-ipfix.c: L2 (plain Ethernet | VLAN), L3 (non-IP | IPv4 |
IPv6), L4 (none | TCP | UDP | SCTP | ICMP), tunnel (not tunnelled |
tunnelled: the VMware tunnel elements after the L4 part) and flow
direction (ingress | egress: egress records also carry the output
port's interface elements).  Each combination has one template whose id
never changes:

    id = 256 + ((l2 * 3 + l3) * 5 + l4) * 2 + direction
         [+ TUNNEL_OFFSET when tunnelled]

Non-IP layouts have no L4 part, so 44 of the 60 ids of each tunnel
dimension are used.  Options templates (exporter statistics) use an id
between the ranges, and the variants carrying virtualObsID
(other_config:virtual_obs_id) use the id + VIRTUAL_OBS_OFFSET.  (OVS
computes its ids with the tunnel as a dimension inside the formula; ours
keep the untunnelled ids of earlier releases.)

Templates are lists of information element names; ids, types and
lengths come from the element table under ``schemas/``.  A few
elements are sent in reduced size (RFC 7011 section 6.2), as OVS sends
them: observationPointId in 4 bytes.
"""

from __future__ import annotations

import struct
from typing import Dict, List, NamedTuple, Tuple

from ovs_ipfix_py import elements

L2_ETH, L2_VLAN = 0, 1
L3_NONE, L3_IPV4, L3_IPV6 = 0, 1, 2
L4_NONE, L4_TCP, L4_UDP, L4_SCTP, L4_ICMP = 0, 1, 2, 3, 4
INGRESS, EGRESS = 0, 1

TEMPLATE_ID_MIN = 256
#: Layouts that carry virtualObsID (other_config:virtual_obs_id) have
#: their own ids, this far above the plain ones, so an id never changes
#: layout within a session (RFC 7011 section 8.1).
VIRTUAL_OBS_OFFSET = 100
#: Tunnelled layouts (the sample crossed a tunnel port with tunnel
#: metadata) have their own ids, this far above the untunnelled ones.
TUNNEL_OFFSET = 200
#: A variable-length field's length in a template (RFC 7011 section 7).
VARIABLE = 65535
#: Options template: exporting process reliability statistics
#: (RFC 7011 section 4.3).
OPTIONS_EXPORTER_STATS_ID = 320

# (name, encoded length).  The key part comes first, in OVS's order.
_COMMON_KEY = [
    ("observationPointId", 4),
    ("flowDirection", 1),
    ("sourceMacAddress", 6),
    ("destinationMacAddress", 6),
    ("ethernetType", 2),
    ("ethernetHeaderLength", 1),
    # The input port (interfaces.iface_part), as OVS 3.1 sends it.
    ("ingressInterface", 4),
    ("ingressInterfaceType", 4),
    ("interfaceName", VARIABLE),
    ("interfaceDescription", VARIABLE),
]
#: The output port, egress only.
_EGRESS_KEY = [
    ("egressInterface", 4),
    ("egressInterfaceType", 4),
    ("interfaceName", VARIABLE),
    ("interfaceDescription", VARIABLE),
]
_VLAN_KEY = [("vlanId", 2), ("dot1qVlanId", 2), ("dot1qPriority", 1)]
_IP_KEY = [
    ("ipVersion", 1),
    ("ipTTL", 1),
    ("protocolIdentifier", 1),
    ("ipDiffServCodePoint", 1),
    ("ipPrecedence", 1),
    ("ipClassOfService", 1),
]
_IPV4_KEY = [("sourceIPv4Address", 4), ("destinationIPv4Address", 4)]
_IPV6_KEY = [
    ("sourceIPv6Address", 16),
    ("destinationIPv6Address", 16),
    ("flowLabelIPv6", 4),
]
_PORTS_KEY = [("sourceTransportPort", 2), ("destinationTransportPort", 2)]
_ICMP4_KEY = [("icmpTypeIPv4", 1), ("icmpCodeIPv4", 1)]
_ICMP6_KEY = [("icmpTypeIPv6", 1), ("icmpCodeIPv6", 1)]

#: After the L4 part, in tunnelled layouts (interfaces.tunnel_part).
_TUNNEL_KEY = [
    ("tunnelSourceIPv4Address", 4),
    ("tunnelDestinationIPv4Address", 4),
    ("tunnelProtocolIdentifier", 1),
    ("tunnelSourceTransportPort", 2),
    ("tunnelDestinationTransportPort", 2),
    ("tunnelType", 1),
    ("tunnelKey", VARIABLE),
]

#: Absolute times (dateTimeMilliseconds), not OVS's
#: flowStart/EndDeltaMicroseconds: nfdump 1.7 reads the deltas as times
#: near 1970, and when a record carries both it takes whichever comes
#: last; nfacctd and tshark read the absolute ones (README, "Reading the
#: records with nfdump").
_COMMON_AGG = [
    ("flowStartMilliseconds", 8),
    ("flowEndMilliseconds", 8),
    ("packetDeltaCount", 8),
    ("layer2OctetDeltaCount", 8),
    ("flowEndReason", 1),
]
_IP_AGG = [
    ("octetDeltaCount", 8),
    ("octetDeltaSumOfSquares", 8),
    ("minimumIpTotalLength", 8),
    ("maximumIpTotalLength", 8),
]
_TCP_AGG = [("tcpControlBits", 2)]

#: OVS puts it after the flow key when other_config:virtual_obs_id is
#: set: a variable-length string (VMware enterprise element).
_VIRTUAL_OBS = [("virtualObsID", VARIABLE)]

_STATS_SCOPE = [("exportingProcessId", 4)]
_STATS_FIELDS = [
    ("notSentFlowTotalCount", 8),
    ("notSentPacketTotalCount", 8),
    ("notSentOctetTotalCount", 8),
]


class Template(NamedTuple):
    """One template: its id, fields and the encoded template record.

    ``key_fields`` / ``agg_fields``: (name, length) pairs of the flow
    key and of the aggregated part.  ``record`` is the template record
    (header and field specifiers) ready to put in a template set;
    ``data_length`` the fixed length of one data record in bytes.
    """

    id: int
    l2: int
    l3: int
    l4: int
    direction: int
    key_fields: Tuple[Tuple[str, int], ...]
    agg_fields: Tuple[Tuple[str, int], ...]
    record: bytes
    data_length: int
    virtual_obs: bool = False
    tunnel: bool = False

    @property
    def fields(self) -> Tuple[Tuple[str, int], ...]:
        extra = tuple(_VIRTUAL_OBS) if self.virtual_obs else ()
        return self.key_fields + extra + self.agg_fields

    @property
    def key_length(self) -> int:
        """The key's length with its variable-length fields empty."""
        return sum(1 if length == VARIABLE else length
                   for _, length in self.key_fields)


class OptionsTemplate(NamedTuple):
    """An options template (set id 3): scope fields then the others."""

    id: int
    scope_fields: Tuple[Tuple[str, int], ...]
    fields: Tuple[Tuple[str, int], ...]
    record: bytes
    data_length: int


def template_id(l2: int, l3: int, l4: int, direction: int,
                tunnel: bool = False) -> int:
    """The stable template id of a layout."""
    return (TEMPLATE_ID_MIN + ((l2 * 3 + l3) * 5 + l4) * 2 + direction
            + (TUNNEL_OFFSET if tunnel else 0))


def _field_specifiers(fields) -> bytes:
    """Encode field specifiers (RFC 7011 section 3.2).

    Enterprise-specific elements set the top bit of the element id and
    carry their PEN.
    """
    out = []
    for name, length in fields:
        element = elements.lookup(name)
        if not elements.reduced_size_ok(element, length):
            raise ValueError("%s cannot be encoded in %d bytes"
                             % (name, length))
        if element.pen:
            out.append(struct.pack("!HHI", element.id | 0x8000, length,
                                   element.pen))
        else:
            out.append(struct.pack("!HH", element.id, length))
    return b"".join(out)


def _layout_fields(l2, l3, l4, direction, tunnel=False):
    key = list(_COMMON_KEY)
    if direction == EGRESS:
        key += _EGRESS_KEY
    if l2 == L2_VLAN:
        key += _VLAN_KEY
    agg = list(_COMMON_AGG)
    if l3 != L3_NONE:
        key += _IP_KEY
        key += _IPV4_KEY if l3 == L3_IPV4 else _IPV6_KEY
        if l4 in (L4_TCP, L4_UDP, L4_SCTP):
            key += _PORTS_KEY
        elif l4 == L4_ICMP:
            key += _ICMP4_KEY if l3 == L3_IPV4 else _ICMP6_KEY
        agg += _IP_AGG
        if l4 == L4_TCP:
            agg += _TCP_AGG
    if tunnel:
        key += _TUNNEL_KEY
    return tuple(key), tuple(agg)


def _build_all() -> Dict[int, Template]:
    out = {}
    for l2 in (L2_ETH, L2_VLAN):
        for l3 in (L3_NONE, L3_IPV4, L3_IPV6):
            l4s = ((L4_NONE,) if l3 == L3_NONE
                   else (L4_NONE, L4_TCP, L4_UDP, L4_SCTP, L4_ICMP))
            for l4 in l4s:
                for direction, tunnel in ((d, tun) for tun in (False, True)
                                          for d in (INGRESS, EGRESS)):
                    tid = template_id(l2, l3, l4, direction, tunnel)
                    key, agg = _layout_fields(l2, l3, l4, direction, tunnel)
                    for vobs in (False, True):
                        extra = tuple(_VIRTUAL_OBS) if vobs else ()
                        vid = tid + (VIRTUAL_OBS_OFFSET if vobs else 0)
                        fields = key + extra + agg
                        record = (struct.pack("!HH", vid, len(fields))
                                  + _field_specifiers(fields))
                        # data_length: fixed part (variable fields count
                        # their 1-byte length prefix only).
                        out[vid] = Template(
                            vid, l2, l3, l4, direction, key, agg, record,
                            sum(1 if length == VARIABLE else length
                                for _, length in fields), vobs, tunnel)
    return out


def _build_stats() -> OptionsTemplate:
    fields = _STATS_SCOPE + _STATS_FIELDS
    # RFC 7011 section 3.4.2.2: the Scope Field Count MUST NOT be zero.
    record = (struct.pack("!HHH", OPTIONS_EXPORTER_STATS_ID, len(fields),
                          len(_STATS_SCOPE))
              + _field_specifiers(fields))
    return OptionsTemplate(OPTIONS_EXPORTER_STATS_ID, tuple(_STATS_SCOPE),
                           tuple(_STATS_FIELDS), record,
                           sum(length for _, length in fields))


_TEMPLATES: Dict[int, Template] = {}
_VOBS_TEMPLATES: Dict[int, Template] = {}
_STATS: List[OptionsTemplate] = []


def _ensure_built() -> None:
    if not _TEMPLATES:
        for tid, tmpl in _build_all().items():
            (_VOBS_TEMPLATES if tmpl.virtual_obs else _TEMPLATES)[tid] = tmpl


def all_templates() -> Dict[int, Template]:
    """The data template of every layout, tunnelled ones included, by id
    (built once)."""
    _ensure_built()
    return _TEMPLATES


def virtual_obs_templates() -> Dict[int, Template]:
    """The same layouts with virtualObsID after the key, by id."""
    _ensure_built()
    return _VOBS_TEMPLATES


def get(tid: int) -> Template:
    _ensure_built()
    tmpl = _TEMPLATES.get(tid)
    return tmpl if tmpl is not None else _VOBS_TEMPLATES[tid]


def exporter_stats_template() -> OptionsTemplate:
    if not _STATS:
        _STATS.append(_build_stats())
    return _STATS[0]
