"""Inputs shared by several test modules: exporter options, and the
hypothesis strategies for Ethernet frames and upcalls.

- ``bridge_options(...)``: BridgeExporterOptions for br0 with the
  defaults the exporter tests use.
- ``frames(damaged=True)``: Ethernet frames of every layout the exporter
  parses (IPv4 with options and fragments, IPv6 with extension headers,
  TCP/UDP/SCTP/ICMP or other, VLAN tags), maybe cut short and with bytes
  changed.
- ``upcalls()``: BridgeSample and FlowSample values over the channel's
  whole value ranges (frames of random bytes, tunnels of both families).
"""

import hypothesis.strategies as st
import traffic as tr

from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
)
from ovs_ipfix_py.upcall import BridgeSample, FlowSample, Tunnel


def bridge_options(targets=(), sampling=1, domain=0, point=0,
                   input_sampling=True, output_sampling=True, **export):
    """Bridge br0's exporter options; ``export`` goes to ExportOptions
    (``cache`` defaults to a 3600 s timeout and 2^20 flows)."""
    cache = export.pop("cache", CacheOptions(3600, 1 << 20))
    return BridgeExporterOptions(
        "br0", ExportOptions(targets=tuple(targets), cache=cache, **export),
        sampling=sampling, obs_domain_id=domain, obs_point_id=point,
        enable_input_sampling=input_sampling,
        enable_output_sampling=output_sampling)


# -- Ethernet frames ---------------------------------------------------------

PORTS = st.sampled_from([0, 1, 53, 80, 443, 3784, 3785, 4739, 65535])
L4 = st.sampled_from([tr.IPPROTO_TCP, tr.IPPROTO_UDP, tr.IPPROTO_SCTP,
                      "icmp", tr.IPPROTO_GRE, 59])
TAGS = st.sampled_from([
    (), (tr.dot1q(100, 5),), (tr.dot1q(4095, 7, dei=1),),
    (tr.dot1q(7, 1, tpid=tr.ETH_TYPE_8021AD), tr.dot1q(8)),
    (tr.dot1q(9, tpid=tr.ETH_TYPE_8021AD),)])
OPTIONS = st.sampled_from([b"", b"\x94\x04\x00\x00", bytes(12)])
EXT = st.sampled_from([(), (tr.hop_by_hop(),), (tr.fragment(0, True),),
                       (tr.fragment(3),), (tr.auth_header(),)])


@st.composite
def frames(draw, damaged=True):
    """An Ethernet frame: IPv4 (options, fragments) or IPv6 (extension
    headers), TCP/UDP/SCTP/ICMP or other, VLAN tags or not; with
    ``damaged``, maybe cut short and with bytes changed."""
    version = draw(st.sampled_from([4, 4, 6]))
    proto = draw(L4)
    sport, dport = draw(PORTS), draw(PORTS)
    body = bytes(draw(st.integers(0, 80)))
    if proto == tr.IPPROTO_TCP:
        l4 = tr.tcp(sport, dport, flags=draw(st.integers(0, 0x1FF)),
                    payload=body)
    elif proto == tr.IPPROTO_UDP:
        l4 = tr.udp(sport, dport, body)
    elif proto == tr.IPPROTO_SCTP:
        l4 = tr.sctp(sport, dport, body or b"x")
    elif proto == "icmp":
        proto = tr.IPPROTO_ICMP if version == 4 else tr.IPPROTO_ICMPV6
        maker = tr.icmp if version == 4 else tr.icmpv6
        l4 = maker(draw(st.integers(0, 255)), draw(st.integers(0, 255)),
                   payload=body)
    else:
        l4 = body
    tos = draw(st.integers(0, 255))
    ttl = draw(st.integers(0, 255))
    if version == 4:
        frag = draw(st.sampled_from([0, 0, 0, 1, 185]))
        pkt = tr.ipv4(l4, proto=proto, tos=tos, ttl=ttl,
                      src="10.0.0.%d" % draw(st.integers(1, 3)),
                      options=draw(OPTIONS), frag_offset=frag,
                      mf=draw(st.booleans()))
        etype = tr.ETH_TYPE_IP
    else:
        pkt = tr.ipv6(l4, proto=proto, tclass=tos, hop_limit=ttl,
                      flow_label=draw(st.integers(0, 0xFFFFF)),
                      src="2001:db8::%d" % draw(st.integers(1, 3)),
                      ext_headers=draw(EXT))
        etype = tr.ETH_TYPE_IPV6
    tags = draw(TAGS)
    frame = bytearray(tr.ethernet(pkt, ethertype=etype, tags=tags,
                                  pad=draw(st.booleans())))
    if damaged:
        for pos, value in draw(st.lists(st.tuples(
                st.integers(12, 70), st.integers(0, 255)), max_size=3)):
            if pos < len(frame):
                frame[pos] = value
        if version == 4 and draw(st.booleans()):
            # An IP total length that ends early (the L4 header cut
            # inside the packet, padding after it).
            total = draw(st.integers(0, 64))
            ip = 14 + 4 * len(tags)
            frame[ip + 2:ip + 4] = total.to_bytes(2, "big")
        cut = draw(st.one_of(st.integers(0, len(frame)),
                             st.integers(40, 60)))
        frame = frame[:cut]
    return bytes(frame)


# -- upcalls -----------------------------------------------------------------

tunnels = st.one_of(
    st.none(),
    st.builds(Tunnel, st.binary(min_size=4, max_size=4),
              st.binary(min_size=4, max_size=4),
              st.integers(0, 65535), st.integers(0, 65535),
              st.integers(0, 2**64 - 1), st.integers(0, 255)),
    st.builds(Tunnel, st.binary(min_size=16, max_size=16),
              st.binary(min_size=16, max_size=16), st.just(0), st.just(0),
              st.just(0), st.just(0)))
ports = st.integers(0, 2**32 - 1)
names = st.text(st.characters(blacklist_characters="\0",
                              blacklist_categories=("Cs",)),
                min_size=1, max_size=20)


@st.composite
def raw_frames(draw):
    frame = draw(st.binary(max_size=200))
    extra = draw(st.sampled_from([0, 0, 1, 1000]))
    return frame, len(frame) + extra


@st.composite
def upcalls(draw):
    frame, orig_len = draw(raw_frames())
    if draw(st.booleans()):
        return BridgeSample(draw(names), draw(ports),
                            draw(st.none() | ports),
                            draw(st.integers(1, 2**32 - 1)), frame,
                            orig_len, draw(tunnels))
    return FlowSample(draw(names), draw(ports), draw(ports), draw(ports),
                      draw(st.integers(1, 65535)), draw(st.integers(0, 2)),
                      draw(ports), draw(st.none() | ports), frame,
                      orig_len, draw(tunnels))
