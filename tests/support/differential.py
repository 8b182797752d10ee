"""The differential judge: OVS's records against the plugin's, flow by
flow (``compare``, ``assert_same_flows``), the differences by design
(``assert_design_differences``), and the flush that collects both
streams (``flush_and_collect``); used by tests/test_ovs_differential.py
and tests/test_ovs_tunnels.py.
"""

import os
import struct

from traffic import flow_id_of, is_bfd, truth_of

from . import pcapfile
from .decoders import Session, tshark_decode
from .switch import udp_ports_of

# ---------------------------------------------------------------------------
# Frames whose flows OVS keys differently, by design.

ETH_VLAN_TYPES = (0x8100, 0x88A8)
IPV6_EXT_HEADERS = {0: 8, 43: 8, 60: 8, 51: 4}  # unit of the length octet
IPV6_FRAGMENT = 44


def is_qinq(frame):
    """An outer 802.1Q/802.1ad tag with an 802.1Q tag inside it."""
    outer, inner = struct.unpack_from("!H2xH", frame, 12)
    return outer in ETH_VLAN_TYPES and inner == 0x8100


def is_ipv6_later_fragment(frame):
    """An untagged or single-tagged IPv6 packet whose fragment header
    has a non-zero offset (the extension chain walked as OVS does)."""
    (etype,) = struct.unpack_from("!H", frame, 12)
    off = 14
    if etype in ETH_VLAN_TYPES:
        (etype,) = struct.unpack_from("!H", frame, 16)
        off = 18
    if etype != 0x86DD or len(frame) < off + 40:
        return False
    nh, off = frame[off + 6], off + 40
    while off + 8 <= len(frame):
        if nh == IPV6_FRAGMENT:
            return struct.unpack_from("!H", frame, off + 2)[0] >> 3 != 0
        if nh not in IPV6_EXT_HEADERS:
            return False
        unit = IPV6_EXT_HEADERS[nh]
        nh, off = frame[off], off + (frame[off + 1] + (2 if unit == 4
                                                         else 1)) * unit
    return False


# ---------------------------------------------------------------------------
# Decoding and comparing.

#: Fields that identify a flow in both exporters' records.
KEY_FIELDS = ("flow_direction", "src_mac", "dst_mac", "ethertype",
              "eth_header_len", "vlan", "dot1q_vlan", "dot1q_priority",
              "ip_version", "ttl", "proto", "dscp", "precedence", "tos",
              "src_ip", "dst_ip", "flow_label", "src_port", "dst_port",
              "icmp_type", "icmp_code", "obs_point_id", "obs_domain_id",
              # Interface identity, read by both from the Interface rows
              # (ifindex, status:if_type/if_descr, name).
              "ingress_if", "ingress_if_type", "if_name", "if_descr",
              "egress_if", "egress_if_type", "egress_if_name",
              "egress_if_descr")
#: Fields that must carry the same values for the same flow.
COUNT_FIELDS = ("packets", "l2_octets", "octets", "sumsq", "min_len",
                "max_len", "end_reason")
#: OVS's exporter-wide totals (RFC 5102 *TotalCount and OVS's own):
#: octetTotalCount, packetTotalCount, droppedPacketTotalCount,
#: postMCastPacketTotalCount, layer2OctetTotalCount...
TOTAL_COUNT_IES = {85, 86, 133, 134, 135, 353, 354, 355, 356, 357, 358}
#: The interface elements (OVS 3.1's layout): ingress/egressInterface,
#: their types, interfaceName and interfaceDescription.
INTERFACE_IES = {10, 14, 82, 83, 368, 369}
TCP_CONTROL_BITS = 6


class Stream:
    """One exporter's messages, read by our parser and by tshark."""

    def __init__(self, collector, ports, workdir, name, tshark=True):
        self.datagrams = [d for d, sender in zip(collector.datagrams,
                                                  collector.senders)
                          if sender[1] in ports]
        self.session = Session()
        for arrival, data in self.datagrams:
            self.session.parse(data, "exporter", arrival, datagram=True)
        self.tshark = None
        if tshark:
            path = os.path.join(workdir, name + ".pcap")
            pcapfile.write_pcap(path, self.datagrams, collector.port)
            self.tshark = tshark_decode(path, collector.port)

    @property
    def parser_records(self):
        return self.session.normalized()

    def template_ies(self):
        return {f.ie for t in self.session.templates.values()
                for f in t.fields if not f.pen}


def count_data_records(collector, ports):
    """Data records received so far from ``ports`` (our parser)."""
    session = Session()
    n = 0
    for (arrival, data), sender in zip(collector.datagrams,
                                       collector.senders):
        if sender[1] in ports:
            for msg in session.parse(data, sender, arrival, datagram=True):
                n += len(msg.data_records)
    return n


def index(records, who):
    """{key: record}; two records for one key would hide a difference."""
    out = {}
    for r in records:
        key = tuple(r.get(k) for k in KEY_FIELDS)
        assert key not in out, \
            f"{who}: two records for {dict(zip(KEY_FIELDS, key))}"
        out[key] = r
    return out


def counts(r):
    return {k: r.get(k) for k in COUNT_FIELDS}


def compare(ovs_records, our_records):
    """Match the two exporters' records flow by flow.

    Returns (mismatches, pairs, only_ovs, only_ours): mismatches lists
    flows both sent with different counts; pairs maps each design
    difference ("qinq", "ipv6 later fragment") to the (ovs, ours)
    record pairs it explains; only_* are records nothing explains.
    """
    ovs = index(ovs_records, "OVS")
    ours = index(our_records, "plugin")
    mismatches = []
    for key in ovs.keys() & ours.keys():
        if counts(ovs[key]) != counts(ours[key]):
            mismatches.append((dict(zip(KEY_FIELDS, key)),
                               counts(ovs[key]), counts(ours[key])))
    only_ovs = [ovs[k] for k in ovs.keys() - ours.keys()]
    only_ours = [ours[k] for k in ours.keys() - ovs.keys()]
    pairs = {"qinq": [], "ipv6 later fragment": []}
    for r in list(only_ours):
        match = _explain(r, only_ovs)
        if match is not None:
            kind, o = match
            pairs[kind].append((o, r))
            only_ovs.remove(o)
            only_ours.remove(r)
    return mismatches, pairs, only_ovs, only_ours


def _same(a, b, fields):
    return all(a.get(f) == b.get(f) for f in fields)


def _explain(r, candidates):
    """The OVS record that is ``r`` keyed the OVS 3.1 way, if any."""
    outer = ("flow_direction", "src_mac", "dst_mac", "vlan", "dot1q_vlan",
             "dot1q_priority", "obs_point_id", "obs_domain_id")
    for o in candidates:
        # QinQ (vlan-limit 1): OVS keys on the outer tag only, as non-IP
        # with ethertype 0x8100; we skip the inner tag and keep IP.
        if (r.get("eth_header_len") == 22 and _same(o, r, outer)
                and o.get("ethertype") == 0x8100
                and o.get("eth_header_len") == 18
                and o.get("ip_version") is None
                and _same(o, r, ("packets", "l2_octets", "end_reason"))):
            return "qinq", o
        # IPv6 later fragment: OVS leaves protocol 44 (the fragment
        # header) and no ports; we report the protocol it carries, with
        # ports 0 as for IPv4 later fragments.
        plain = [k for k in KEY_FIELDS if k not in
                 ("proto", "src_port", "dst_port", "icmp_type",
                  "icmp_code")]
        if (r.get("ip_version") == 6 and _same(o, r, plain)
                and o.get("proto") == IPV6_FRAGMENT
                and o.get("src_port") is None and o.get("icmp_type") is None
                and r.get("proto") != IPV6_FRAGMENT
                and (r.get("src_port"), r.get("dst_port")) in ((0, 0),
                                                                (None, None))
                and r.get("icmp_type") in (0, None)
                and counts(o) == counts(r)):
            return "ipv6 later fragment", o
    return None


def expected_counters(frames, directions, skip_bfd):
    """(plugin's, OVS 3.1's) ipv4/ipv6 ok/errs counters for ``frames``
    sampled ``directions`` times each, from the traffic truth: OVS counts
    QinQ frames as non-IP and IPv6 later fragments as IPv6 errors.
    ``skip_bfd``: bridge sampling, which leaves BFD out."""
    ours = dict.fromkeys(("ipv4 ok", "ipv6 ok", "ipv4 errs", "ipv6 errs"),
                         0)
    ovs = dict(ours)
    for frame in frames:
        if skip_bfd and is_bfd(frame):
            continue
        (t,) = truth_of([frame]).values()
        if t.kind == "other":
            continue
        name = f"{t.kind} {'ok' if t.status == 'ok' else 'errs'}"
        ours[name] += directions
        if is_qinq(frame):
            continue
        if is_ipv6_later_fragment(frame):
            name = "ipv6 errs"
        ovs[name] += directions
    for c in (ours, ovs):
        c["pkts errs"] = c["ipv4 errs"] + c["ipv6 errs"]
    return ours, ovs


class Outcome:
    """Both streams after a run, decoded."""

    def __init__(self, pair, ovs_ports, our_ports, tshark=True):
        work = pair.server.workdir
        self.ovs = Stream(pair.collector, ovs_ports, work, "ovs", tshark)
        self.ours = Stream(pair.collector, our_ports, work, "plugin", tshark)


def flush_and_collect(pair, flush_args, ovs_flows, our_flows, tshark=True):
    """Run ``ovs-vsctl FLUSH_ARGS`` (removing the exporter: a forced-end
    flush in both) and wait until each exporter's records arrived."""
    ovs_ports = udp_ports_of(pair.server.vswitchd_pid)
    our_ports = pair.plugin.udp_ports()
    assert ovs_ports and our_ports and not ovs_ports & our_ports
    pair.server.vsctl(*flush_args, wait=True)
    ok = pair.collector.wait_for(
        lambda _: count_data_records(pair.collector, ovs_ports) >= ovs_flows
        and count_data_records(pair.collector, our_ports) >= our_flows,
        timeout=10.0)
    assert ok, "the flushed records did not all arrive"
    # Options records (exporter statistics) may follow: let them in.
    pair.collector.receive(0.2)
    return Outcome(pair, ovs_ports, our_ports, tshark)


def assert_same_flows(outcome, frames, directions):
    """The core differential assertion, over tshark's and our parser's
    decoding of both streams."""
    qinq = {flow_id_of(f) for f in frames if is_qinq(f)}
    frag6 = {flow_id_of(f) for f in frames if is_ipv6_later_fragment(f)}
    assert qinq and frag6, "the traffic mix lost its QinQ/fragment cases"
    for decoder, ovs_recs, our_recs in (
            ("tshark", outcome.ovs.tshark.records,
             outcome.ours.tshark.records),
            ("parser", outcome.ovs.parser_records,
             outcome.ours.parser_records)):
        mismatches, pairs, only_ovs, only_ours = compare(ovs_recs, our_recs)
        assert not mismatches, (decoder, mismatches[:5])
        assert not only_ovs and not only_ours, (
            decoder, [{k: r.get(k) for k in KEY_FIELDS + COUNT_FIELDS}
                      for r in (only_ovs + only_ours)[:6]])
        assert len(pairs["qinq"]) == len(qinq) * directions, decoder
        assert len(pairs["ipv6 later fragment"]) == (len(frag6)
                                                     * directions), decoder
        matched = len(ovs_recs) - sum(map(len, pairs.values()))
        assert matched > 50, (decoder, matched)
    # Every flow ended by the flush, in both.
    for stream in (outcome.ovs, outcome.ours):
        assert {r["end_reason"] for r in stream.tshark.records} == {4}


def assert_design_differences(outcome):
    """What README.md's table says of the two streams, checked."""
    ovs, ours = outcome.ovs, outcome.ours
    # tshark accepts our stream as it is; it flags OVS's sequence numbers
    # (one counter bumped per message, not per data record).
    assert ours.tshark.warnings == [] and ours.session.problems == []
    assert any("sequence" in w.lower() for w in ovs.tshark.warnings), \
        ovs.tshark.warnings[:3]
    # One data record per message in OVS; many in ours.
    ovs_data = [m for m in ovs.session.messages if m.data_records]
    assert {len(m.data_records) for m in ovs_data} == {1}
    our_data = [m for m in ours.session.messages if m.data_records]
    assert len(our_data) < len(ovs_data) / 5
    # Exporter-wide *TotalCount fields: OVS only.
    assert TOTAL_COUNT_IES & ovs.template_ies()
    assert not TOTAL_COUNT_IES & ours.template_ies()
    # Interface elements: both (compared flow by flow in KEY_FIELDS).
    assert INTERFACE_IES <= ovs.template_ies()
    assert INTERFACE_IES <= ours.template_ies()
    # TCP flags: only our records carry them (tcpControlBits).
    assert TCP_CONTROL_BITS in ours.template_ies()
    assert TCP_CONTROL_BITS not in ovs.template_ies()
    # Interface ids: both send the ifindex (p1's options:ifindex; p2
    # has none: 0) and the names.
    for stream in (ovs, ours):
        recs = stream.parser_records
        assert {(r.get("ingress_if"), r.get("if_name")) for r in recs} \
            == {(1001, "p1")}
        assert {(r.get("egress_if"), r.get("egress_if_name"))
                for r in recs} <= {(None, None), (0, "p2")}
    # Timestamps: OVS sends flow start/end deltas (whole milliseconds),
    # we send absolute flowStart/EndMilliseconds, which nfdump reads.
    deltas = {r["start_delta_us"] % 1000 for r in ovs.parser_records}
    assert deltas == {0}
    assert {158, 159} <= ovs.template_ies()
    assert not {152, 153} & ovs.template_ies()
    assert {152, 153} <= ours.template_ies()
    assert not {158, 159} & ours.template_ies()
