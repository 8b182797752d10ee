"""Differential test: the plugin against Open vSwitch's own IPFIX exporter.

One ovsdb-server; on it a real ``ovs-vswitchd --enable-dummy`` (the
dummy datapath, REFERENCE.md section 4) and ``ovs-ipfix-exporter``.  The
same ovs-vsctl commands configure both: they read the same ``IPFIX`` row,
so both send to the same loopback collector, where they are told apart
by their UDP source ports (read from /proc for each process's sockets).
OVS receives the frames through ``ovs-appctl netdev-dummy/receive p1``
(paced: the dummy port queues at most 100 frames), the plugin through
``ovs-ipfix-replay`` with the same input (1) and output (2) port
numbers.  A forced-end flush (removing the exporter's row) then makes
both export every cached flow, and both streams are decoded with tshark
and with our own parser and compared flow by flow: the key fields,
packetDeltaCount, layer2OctetDeltaCount, octetDeltaCount,
octetDeltaSumOfSquares, minimum/maximumIpTotalLength, observation point
and domain, flowDirection, flowEndReason and the interface elements
(ifindex from p1's options:ifindex, type, name, description; both read
them from the Interface rows) must be identical.

The same holds for BFD frames (skipped by bridge sampling only), for a
full cache (the same evictions, as lack of resources) and for the
active timeout (reason 2).  The differences by design (README.md, "How
it differs from OVS's built-in exporter") are asserted too, so that the
table stays true: QinQ frames, IPv6 later fragments, timestamp
resolution, sequence numbers, one record per message,
exporter-wide ``*TotalCount`` fields, TCP flags, OVS 3.1's inverted
enable-input/output-sampling switches, its cache kept on an option
change and its data sent to a new collector before any template.

The harness (``ExporterDaemon``, ``Switch``, the ``pair`` fixture) is
in tests/support/switch.py, the judge (``compare``,
``assert_same_flows``...) in tests/support/differential.py.
"""

import collections
import time

import pytest
from support.collector import UdpCollector
from support.decoders import Session
from support.differential import (
    COUNT_FIELDS,
    KEY_FIELDS,
    Outcome,
    assert_design_differences,
    assert_same_flows,
    count_data_records,
    expected_counters,
    flush_and_collect,
    is_ipv6_later_fragment,
    is_qinq,
)
from support.switch import udp_ports_of
from traffic import build_frame, is_bfd, traffic_mix

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------
# The tests.

OBS_DOMAIN, OBS_POINT = 123, 456
#: BFD control and echo (UDP to 3784/3785), plain, IPv6 and tagged:
#: bridge sampling skips them (OVS and plugin), flow sampling does not.
BFD_FRAMES = [build_frame(proto=17, dport=3784, src_mac="02:00:00:00:0b:01"),
              build_frame(proto=17, dport=3785, ip_version=6,
                          src_mac="02:00:00:00:0b:02"),
              build_frame(proto=17, dport=3784, vlan=5,
                          src_mac="02:00:00:00:0b:03")]


def mix(seed):
    """The traffic mix with the BFD frames spread through it."""
    frames, _ = traffic_mix(seed=seed, flows_per_kind=2)
    for i, frame in enumerate(BFD_FRAMES):
        frames.insert(len(frames) * (i + 1) // 4, frame)
    return frames


def samples(frames, skip_bfd):
    return sum(1 for f in frames if not (skip_bfd and is_bfd(f)))


def bfd_flows(stream):
    return sum(1 for r in stream.tshark.records
               if r.get("proto") == 17 and r.get("dst_port") in (3784, 3785))


def test_bridge_sampling_gives_the_flows_ovs_gives(pair):
    """Bridge sampling 1, ingress and egress: every flow of the traffic
    mix (IPv4/IPv6 x TCP/UDP/SCTP/ICMP, VLAN, ARP, 802.3, fragments,
    extension headers, truncated frames) has the same key and counts in
    both exporters after the forced-end flush, except the two keyings
    that differ by design."""
    frames = mix(seed=11)
    pair.switch.ofctl("add-flow", "br0", "in_port=1,actions=output:2")
    pair.server.vsctl(
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"', "sampling=1",
        f"obs_domain_id={OBS_DOMAIN}", f"obs_point_id={OBS_POINT}",
        "cache_active_timeout=60", "cache_max_flows=10000",
        "--", "set", "Bridge", "br0", "ipfix=@i", wait=True)
    n = samples(frames, skip_bfd=True)
    pair.switch.inject(frames, done=lambda k: pair.switch.counters().get(
        "bridge ipfix", {}).get("sampled pkts", -1)
        >= 2 * samples(frames[:k], skip_bfd=True))
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1")
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1",
                       "--output-port=2")
    ours = pair.plugin.wait_counter("bridge br0", "sampled pkts", 2 * n)
    ovs = pair.switch.counters()["bridge ipfix"]

    # Counters, as dump-ipfix-bridge prints them.
    for name in ("flows", "current flows", "sampled pkts"):
        assert ours[name] == ovs[name], name
    want_ours, want_ovs = expected_counters(frames, 2, skip_bfd=True)
    assert {k: ours[k] for k in want_ours} == want_ours
    assert {k: ovs[k] for k in want_ovs} == want_ovs

    outcome = flush_and_collect(pair, ("clear", "Bridge", "br0", "ipfix"),
                                ovs["current flows"], ours["current flows"])
    assert_same_flows(outcome, [f for f in frames if not is_bfd(f)], 2)
    assert_design_differences(outcome)
    for stream in (outcome.ovs, outcome.ours):
        assert bfd_flows(stream) == 0
        assert {r["obs_domain_id"] for r in stream.tshark.records} \
            == {OBS_DOMAIN}
        assert {r["obs_point_id"] for r in stream.tshark.records} \
            == {OBS_POINT}
        assert {r["flow_direction"] for r in stream.tshark.records} \
            == {0, 1}


def configure_flow_sampling_and_inject(pair, frames, max_flows):
    """Flow sampling on both sides: OVS's ``sample(probability=65535,
    collector_set_id=1,obs_domain_id=7,obs_point_id=9),output:2`` on
    port 1 and Flow_Sample_Collector_Set 1 (active timeout 60 s,
    ``max_flows``); then the frames into OVS, paced on its counters."""
    pair.switch.ofctl(
        "add-flow", "br0", "in_port=1,actions=sample(probability=65535,"
        "collector_set_id=1,obs_domain_id=7,obs_point_id=9),output:2")
    pair.server.vsctl(
        "--", "--id=@br0", "get", "Bridge", "br0",
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"',
        "cache_active_timeout=60", "cache_max_flows=%d" % max_flows,
        "--", "create", "Flow_Sample_Collector_Set", "id=1", "bridge=@br0",
        "ipfix=@i", wait=True)
    pair.switch.inject(frames, done=lambda k: pair.switch.counters(
        "flow").get("id   1", {}).get("sampled pkts", -1) >= k)


def test_flow_sampling_gives_the_flows_ovs_gives(pair):
    """Flow sampling: ``sample(probability=65535,collector_set_id=1,
    obs_domain_id=7,obs_point_id=9),output:2`` in OVS, flow samples of
    collector set 1 with the same ids through the channel for the plugin:
    the same flows, ids and counts, ingress as OVS reports a sample taken
    before the output."""
    frames = mix(seed=12)
    configure_flow_sampling_and_inject(pair, frames, max_flows=10000)
    n = len(frames)
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1",
                       "--collector-set=1", "--obs-domain-id=7",
                       "--obs-point-id=9")
    ours = pair.plugin.wait_counter("bridge br0 id 1", "sampled pkts", n)
    ovs = pair.switch.counters("flow")["id   1"]
    for name in ("flows", "current flows", "sampled pkts"):
        assert ours[name] == ovs[name], name
    want_ours, want_ovs = expected_counters(frames, 1, skip_bfd=False)
    assert {k: ours[k] for k in want_ours} == want_ours
    assert {k: ovs[k] for k in want_ovs} == want_ovs

    outcome = flush_and_collect(
        pair, ("--all", "destroy", "Flow_Sample_Collector_Set"),
        ovs["current flows"], ours["current flows"])
    assert_same_flows(outcome, frames, 1)
    for stream in (outcome.ovs, outcome.ours):
        records = stream.tshark.records
        assert bfd_flows(stream) == len(BFD_FRAMES)
        assert {r["obs_domain_id"] for r in records} == {7}
        assert {r["obs_point_id"] for r in records} == {9}
        assert {r["flow_direction"] for r in records} == {0}


@pytest.mark.parametrize("switch_name", ["enable-input-sampling",
                                         "enable-output-sampling"])
def test_ovs_31_inverts_the_sampling_switches(pair, switch_name):
    """``other_config:enable-input-sampling`` / ``enable-output-sampling``
    = false turn that direction off in the plugin, as vswitch.xml
    documents; OVS 3.1 reads both switches inverted (false keeps the
    direction, true drops it).  Asserted on both so the README table
    stays true."""
    frames, _ = traffic_mix(seed=13, flows_per_kind=1)
    frames = [f for f in frames if not is_qinq(f)
              and not is_ipv6_later_fragment(f)][:20]
    n = len(frames)
    pair.switch.ofctl("add-flow", "br0", "in_port=1,actions=output:2")
    both = {0, 1}
    kept = both - {0 if switch_name == "enable-input-sampling" else 1}
    directions = {}
    for value in ("false", "true"):
        pair.collector.datagrams.clear()
        pair.collector.senders.clear()
        pair.server.vsctl(
            "--", "--id=@i", "create", "IPFIX",
            f'targets="{pair.collector.target}"', "sampling=1",
            "cache_active_timeout=60", "cache_max_flows=10000",
            f"other_config:{switch_name}={value}",
            "--", "set", "Bridge", "br0", "ipfix=@i", wait=True)
        # Fresh datapath flows, with this setting's sampling actions.
        pair.server.appctl("ovs-vswitchd", "revalidator/purge")
        pair.switch.inject(frames)
        pair.switch.wait_sampled(n)
        pair.plugin.replay(frames, "--bridge=br0", "--input-port=1")
        pair.plugin.replay(frames, "--bridge=br0", "--input-port=1",
                           "--output-port=2")
        want = n * (len(kept) if value == "false" else 2)
        ours = pair.plugin.wait_counter("bridge br0", "sampled pkts", want)
        ovs = pair.switch.counters()["bridge ipfix"]
        outcome = flush_and_collect(
            pair, ("clear", "Bridge", "br0", "ipfix"),
            ovs["current flows"], ours["current flows"], tshark=False)
        directions[value] = {
            who: {r["flow_direction"] for r in stream.parser_records}
            for who, stream in (("ovs", outcome.ovs),
                                ("ours", outcome.ours))}
    assert directions["false"]["ours"] == kept
    assert directions["true"]["ours"] == both
    # OVS 3.1.0 (Debian bookworm) reads the switches inverted.
    assert directions["false"]["ovs"] == both
    assert directions["true"]["ovs"] == kept


def test_full_cache_evicts_as_ovs_does(pair):
    """``cache_max_flows=5``: each new flow beyond five pushes the
    oldest-started one out with flowEndReason 5 (lack of resources), in
    OVS and in the plugin alike; a flow pushed out and seen again is a new
    flow.  Flow sampling, so both see the samples in the same order: the
    records, evictions included, are the same multiset (their order in
    the messages differs: ours are grouped by template)."""
    frames = [f for f in mix(seed=14) if not is_qinq(f)
              and not is_ipv6_later_fragment(f)]
    configure_flow_sampling_and_inject(pair, frames, max_flows=5)
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1",
                       "--collector-set=1", "--obs-domain-id=7",
                       "--obs-point-id=9")
    ours = pair.plugin.wait_counter("bridge br0 id 1", "sampled pkts",
                                    len(frames))
    ovs = pair.switch.counters("flow")["id   1"]
    assert without_tx(ours) == without_tx(ovs)
    assert ovs["current flows"] == 5 and ovs["flows"] > 100
    outcome = flush_and_collect(
        pair, ("--all", "destroy", "Flow_Sample_Collector_Set"),
        ovs["flows"], ours["flows"])
    for decoder in ("tshark", "parser"):
        got = []
        for stream in (outcome.ovs, outcome.ours):
            records = (stream.tshark.records if decoder == "tshark"
                       else stream.parser_records)
            got.append(collections.Counter(
                tuple(r.get(k) for k in KEY_FIELDS + COUNT_FIELDS)
                for r in records))
        assert got[0] == got[1], decoder
        reasons = collections.Counter(r[-1] for r in got[1].elements())
        assert reasons == {5: ovs["flows"] - 5, 4: 5}


def without_tx(counters):
    return {k: v for k, v in counters.items() if k != "tx pkts"}


def test_option_change_flushes_in_the_plugin_only(pair):
    """Changing an exporter option (here cache_active_timeout): the
    plugin exports its cache as forced end, under the old options; OVS
    3.1 keeps its cached flows and sends nothing."""
    frames = [build_frame(proto=6, sport=1000 + i) for i in range(3)]
    pair.switch.ofctl("add-flow", "br0", "in_port=1,actions=output:2")
    pair.server.vsctl(
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"', "sampling=1",
        "cache_active_timeout=60", "cache_max_flows=100",
        "--", "set", "Bridge", "br0", "ipfix=@i", wait=True)
    pair.switch.inject(frames)
    pair.switch.wait_sampled(6)
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1")
    pair.plugin.wait_counter("bridge br0", "sampled pkts", 3)
    ovs_ports = udp_ports_of(pair.server.vswitchd_pid)
    our_ports = pair.plugin.udp_ports()
    pair.server.vsctl("set", "IPFIX", ".", "cache_active_timeout=120",
                      wait=True)
    assert pair.collector.wait_for(
        lambda _: count_data_records(pair.collector, our_ports) >= 3, 5.0)
    pair.collector.receive(0.5)
    session = Session()
    for (arrival, data), sender in zip(pair.collector.datagrams,
                                       pair.collector.senders):
        if sender[1] in our_ports:
            session.parse(data, sender, arrival, datagram=True)
    assert {r["end_reason"] for r in session.normalized()} == {4}
    assert count_data_records(pair.collector, ovs_ports) == 0
    assert pair.switch.counters()["bridge ipfix"]["current flows"] == 6
    assert pair.plugin.counters()["bridge br0"]["current flows"] == 0


def test_new_collector_gets_templates_first(pair):
    """A collector added to a running exporter: the plugin sends it the
    templates before the first data (a new session); OVS 3.1 sends it
    data whose templates it never sent there."""
    second = UdpCollector()
    try:
        pair.switch.ofctl("add-flow", "br0", "in_port=1,actions=output:2")
        pair.server.vsctl(
            "--", "--id=@i", "create", "IPFIX",
            f'targets="{pair.collector.target}"', "sampling=1",
            "--", "set", "Bridge", "br0", "ipfix=@i", wait=True)
        first = [build_frame(proto=6, sport=1)]
        pair.switch.inject(first)
        pair.switch.wait_sampled(2)
        pair.plugin.replay(first, "--bridge=br0", "--input-port=1")
        pair.plugin.wait_counter("bridge br0", "sampled pkts", 1)
        pair.server.vsctl("add", "IPFIX", ".", "targets",
                          f'"{second.target}"', wait=True)
        # The plugin rebuilt its exporter: wait until it runs again.
        pair.plugin.wait_counter("bridge br0", "flows", 0)
        then = [build_frame(proto=6, sport=2)]
        pair.switch.inject(then)
        pair.switch.wait_sampled(4)
        pair.plugin.replay(then, "--bridge=br0", "--input-port=1")
        ovs_ports = udp_ports_of(pair.server.vswitchd_pid)
        our_ports = pair.plugin.udp_ports()
        # OVS's two records (ingress, egress) cannot be decoded there:
        # count its messages.
        assert second.wait_for(
            lambda _: sum(s[1] in ovs_ports for s in second.senders) >= 2
            and count_data_records(second, our_ports) >= 1, 5.0), (
            second.senders, ovs_ports, our_ports)
        problems = {}
        for name, ports in (("ovs", ovs_ports), ("ours", our_ports)):
            session = Session()
            for (arrival, data), sender in zip(second.datagrams,
                                               second.senders):
                if sender[1] in ports:
                    session.parse(data, sender, arrival, datagram=True)
            problems[name] = session.problems
    finally:
        second.close()
    assert problems["ours"] == []
    assert problems["ovs"] and all("before its template" in p
                                   for p in problems["ovs"])


def test_active_timeout_ends_flows_in_both(pair):
    """cache_active_timeout=1: both export the flow with flowEndReason 2
    (active timeout) and the same counts; the plugin's record leaves on
    time (OVS's waits for an unrelated wake-up of its main loop: its
    deadline is on the wall clock, its timer on the monotonic one)."""
    pair.switch.ofctl("add-flow", "br0", "in_port=1,actions=output:2")
    pair.server.vsctl(
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"', "sampling=1",
        "cache_active_timeout=1", "cache_max_flows=100",
        "--", "set", "Bridge", "br0", "ipfix=@i", wait=True)
    frames = [build_frame(proto=17, sport=5000 + i, frame_len=100 + i)
              for i in range(3)]
    pair.switch.inject(frames)
    sent = time.time()
    pair.plugin.replay(frames, "--bridge=br0", "--input-port=1",
                       "--output-port=2")
    ovs_ports = udp_ports_of(pair.server.vswitchd_pid)
    our_ports = pair.plugin.udp_ports()
    assert pair.collector.wait_for(
        lambda _: count_data_records(pair.collector, ovs_ports) >= 6
        and count_data_records(pair.collector, our_ports) >= 3, 5.0)
    outcome = Outcome(pair, ovs_ports, our_ports, tshark=False)
    ovs = [r for r in outcome.ovs.parser_records
           if r["flow_direction"] == 1]
    ours = outcome.ours.parser_records
    assert ({(r["src_port"], r["packets"], r["l2_octets"], r["end_reason"])
             for r in ovs}
            == {(r["src_port"], r["packets"], r["l2_octets"],
                 r["end_reason"]) for r in ours}
            == {(5000 + i, 1, 100 + i, 2) for i in range(3)})
    first = min(arrival for (arrival, _), sender in zip(
        pair.collector.datagrams, pair.collector.senders)
        if sender[1] in our_ports)
    assert 1.0 <= first - sent <= 1.0 + 0.6
