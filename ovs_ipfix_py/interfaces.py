"""Port identity and tunnel metadata as key bytes, the way OVS encodes them.

Two pieces of a data record's flow key do not come from the sampled
frame but from the port it crossed, and are built here, once, as opaque
bytes that the key builders (``packet.parse``, the C fast path) copy
as they are:

- the **interface part** (``iface_part``), after ethernetHeaderLength:
  ingressInterface (u32, the port's ifindex, 0 when it has none),
  ingressInterfaceType (u32), interfaceName and interfaceDescription
  (variable length, RFC 7011 section 7: a 1-byte length then the bytes);
  for egress the same four again for the output port (egressInterface,
  egressInterfaceType, interfaceName, interfaceDescription).  OVS's
  ofproto-dpif-ipfix.c ``ipfix_put_iface_data_record()``: the ifindex
  vswitchd reads from the netdev (OVSDB ``Interface.ifindex``), the
  type and description from the netdev's status (``Interface.status``
  keys ``if_type`` and ``if_descr``), the netdev's name (``Interface.name``,
  at most 64 bytes; descriptions at most 128).  A port OVS does not know
  gives 4 + 4 zero bytes and two empty strings.
- the **tunnel part** (``tunnel_part``), after the L4 part, in the tunnel
  templates: tunnelSourceIPv4Address, tunnelDestinationIPv4Address,
  tunnelProtocolIdentifier (17 for VXLAN and LISP, 47 for GRE, 6 for
  STT, 0 for Geneve as OVS 3.1 sends it),
  tunnelSource/DestinationTransportPort, tunnelType (VMware PEN 6876:
  1 VXLAN, 2 GRE, 3 LISP, 4 STT, 7 Geneve) and tunnelKey (variable
  length: the low 3 bytes of tun_id for VXLAN, Geneve and LISP, 4 for
  GRE, 8 for STT), as ``ipfix_cache_entry_init()`` writes them.

OVS keys a sample by its tunnel only when the port it crossed (the input
port for a sample without output port, else the output port) is a
tunnel port, i.e. its
``Interface.type`` is one of :data:`TUNNEL_PORT_TYPES`
(``dpif_ipfix_find_tunnel_port()``), and tunnel metadata came with the
sample; otherwise the metadata is ignored.  The sample's own tunnel type
(the channel's TUN_TYPE, what the datapath decapsulated) wins over the
port's when it is a known one; an IPv6 underlay has no IPv4 addresses
to put in OVS's IPv4-only elements: they are 0.0.0.0 (README, differences
table).
"""

from __future__ import annotations

import struct
from typing import Dict, NamedTuple, Optional

#: OVS's tunnelType values (dpif_ipfix_tunnel_type) by Interface.type.
#: LISP and STT are OVS 3.1's; OVS 3.4 removed those port types.
TUNNEL_PORT_TYPES = {"vxlan": 1, "gre": 2, "lisp": 3, "stt": 4,
                     "geneve": 7}
#: tunnelKey length (bytes) and tunnelProtocolIdentifier per tunnelType.
TUNNEL_KEY_LENGTH = {1: 3, 2: 4, 3: 3, 4: 8, 7: 3}
#: Geneve runs over UDP: 17, as OVS 3.4 and later send it.  OVS 3.1's
#: tunnel_protocol[] table stops one entry short of Geneve (7) and sends
#: 0, a defect we do not copy (README, differences table).
TUNNEL_PROTOCOL = {1: 17, 2: 47, 3: 17, 4: 6, 7: 17}

#: OVS truncates names and descriptions (MAX_IF_NAME_LEN,
#: MAX_IF_DESCR_LEN).
MAX_NAME_LEN = 64
MAX_DESCR_LEN = 128

_IFACE_HEAD = struct.Struct("!II")
_TUNNEL = struct.Struct("!4s4sBHHBB")
#: The interface part of a port OVS does not know: ifindex 0, type 0,
#: two empty strings.
UNKNOWN_IFACE = bytes(10)
_ZERO_ADDR = bytes(4)


class Interface(NamedTuple):
    """One port of a bridge as OVSDB describes it (its ``Interface``
    row).  ``ofport``: OpenFlow port number; ``ifindex`` (0: none);
    ``if_type`` (``status:if_type``, 0: none); ``name``;
    ``description`` (``status:if_descr``, "" when absent); ``type``
    (``Interface.type``, "" for a system port)."""

    ofport: int
    name: str = ""
    ifindex: int = 0
    if_type: int = 0
    description: str = ""
    type: str = ""

    @property
    def tunnel_type(self) -> int:
        """OVS's tunnelType of this port, 0 when it is no tunnel port."""
        return TUNNEL_PORT_TYPES.get(self.type, 0)


#: {OpenFlow port number: Interface} of one bridge.
Ports = Dict[int, Interface]


def _string(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8")[:limit]
    return bytes((len(raw),)) + raw


def encode_iface(iface: Optional[Interface]) -> bytes:
    """One port's four interface elements; ``UNKNOWN_IFACE`` for None."""
    if iface is None:
        return UNKNOWN_IFACE
    return (_IFACE_HEAD.pack(iface.ifindex & 0xFFFFFFFF,
                             iface.if_type & 0xFFFFFFFF)
            + _string(iface.name, MAX_NAME_LEN)
            + _string(iface.description, MAX_DESCR_LEN))


def iface_part(ports: Ports, input_port: int, output_port: Optional[int],
               egress: bool) -> bytes:
    """The interface part of the key: the input port's elements, then for
    ``egress`` the output port's (None: unknown, as OVS's ODPP_NONE)."""
    part = encode_iface(ports.get(input_port))
    if egress:
        part += encode_iface(ports.get(output_port)
                             if output_port is not None else None)
    return part


def tunnel_part(port: Optional[Interface], tunnel) -> bytes:
    """The tunnel part of the key for ``tunnel`` (an upcall.Tunnel) met
    on ``port``, or b"" when OVS would not key it by its tunnel (no
    metadata, or the port is unknown or no tunnel port)."""
    if tunnel is None or port is None or not port.tunnel_type:
        return b""
    ttype = tunnel.tun_type if tunnel.tun_type in TUNNEL_KEY_LENGTH \
        else port.tunnel_type
    klen = TUNNEL_KEY_LENGTH[ttype]
    if len(tunnel.src) == 4:
        src, dst = tunnel.src, tunnel.dst
    else:
        # OVS's elements are IPv4 only (an IPv6 underlay leaves
        # flow_tnl.ip_src/ip_dst 0).
        src = dst = _ZERO_ADDR
    key = (tunnel.tun_id & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")[8 - klen:]
    return _TUNNEL.pack(src, dst, TUNNEL_PROTOCOL[ttype],
                        tunnel.src_port & 0xFFFF, tunnel.dst_port & 0xFFFF,
                        ttype, klen) + key
