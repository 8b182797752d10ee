"""Open vSwitch's own IPFIX scenarios, rewritten against the plugin.

OVS's testsuite (tests/ofproto-dpif.at) checks its exporter with four
scenarios: "Bridge IPFIX sanity check", "Bridge IPFIX statistics
check", "Flow IPFIX sanity check" and "Flow IPFIX statistics check".
Each is replayed here step by step on a real ovs-vswitchd (dummy
datapath, ``fail-mode=secure`` as in OVS_VSWITCHD_START) and on the
plugin, both configured by the same ovs-vsctl commands on one database:
OVS receives the testsuite's packets (its flow syntax, through
``netdev-dummy/receive``), and the very frames it received, captured by
the dummy port (``options:rxq_pcap``), are replayed to the plugin.
``ovs-ofctl dump-ipfix-bridge|flow`` and the plugin's ``ipfix/show``
must then give the counters the testsuite expects, except ``tx pkts``
(messages: OVS sends one record per message plus its templates, the
plugin packs records).  Both send to one loopback collector, which sees
the same flows from each.

Steps of the testsuite that check OVS's datapath actions (the ct/recirc
port case, the slow-path meter) have no counterpart in the plugin, which
receives its samples from the channel; their datapath side is still
checked on OVS where the plugin's behaviour depends on it.
"""

import os

import pytest
from support import wait_until
from support.collector import UdpCollector
from support.decoders import Session
from support.switch import ExporterDaemon, Switch, udp_ports_of

from ovs_ipfix_py.pcap import read_frames

pytestmark = pytest.mark.timeout(120)

#: The testsuite's packet: Ethernet, type IPv4, and the all-zero IPv4
#: header OVS's flow syntax composes (no L4: an "ipv4 err" sample).
PACKET = ("in_port(1),eth(src=50:54:00:00:00:09,dst=50:54:00:00:00:0a),"
          "eth_type(0x0800)")
#: What ``ovs-ofctl dump-ipfix-bridge|flow`` prints after the statistics
#: checks' 20 packets (tx pkts aside).
STATISTICS_20 = {"flows": 20, "current flows": 0, "sampled pkts": 20,
                 "ipv4 ok": 0, "ipv6 ok": 0, "pkts errs": 20,
                 "ipv4 errs": 20, "ipv6 errs": 0, "tx errs": 0}


class SideBySide:
    """OVS and the plugin on one database, one collector for both, and
    the dummy port's capture of what OVS received."""

    def __init__(self, server, collector):
        self.server = server
        self.collector = collector
        self.switch = Switch(server)
        self.rx_pcap = os.path.join(server.workdir, "p1-rx.pcap")
        server.vsctl("set", "Interface", "p1",
                     f"options:rxq_pcap={self.rx_pcap}", wait=True)
        self.replayed = 0
        self.plugin = ExporterDaemon(server)

    def start(self):
        self.plugin.start()
        return self

    def vsctl(self, *args):
        """ovs-vsctl, returning once ovs-vswitchd applied the change."""
        return self.server.vsctl(*args, wait=True)

    def send(self, count, *replay_options):
        """The testsuite's loop: ``count`` times ``netdev-dummy/receive
        p1 PACKET`` to OVS; then the frames OVS received go to the
        plugin with ``ovs-ipfix-replay REPLAY_OPTIONS``."""
        start = self.switch.rx_packets()
        for _ in range(count):
            self.server.appctl("ovs-vswitchd", "netdev-dummy/receive", "p1",
                               PACKET)
        wait_until(lambda: self.switch.rx_packets() >= start + count, 10.0,
                   "OVS to receive the packets")
        wait_until(lambda: len(self.captured()) >= self.replayed + count,
                   10.0, "the dummy port's capture")
        frames = self.captured()[self.replayed:self.replayed + count]
        self.replayed += count
        self.plugin.replay(frames, "--input-port=1", *replay_options)
        return frames

    def captured(self):
        if not os.path.exists(self.rx_pcap):
            return []
        return [frame for _, frame, _ in read_frames(self.rx_pcap)]

    def dpctl_flows(self):
        return self.server.appctl("ovs-vswitchd", "dpctl/dump-flows")

    def purge(self):
        self.server.appctl("ovs-vswitchd", "revalidator/purge")

    def plugin_counters(self, head, sampled):
        """The plugin's counters of exporter ``head`` once it counted
        ``sampled`` samples (and exported them: no cache here)."""
        return self.plugin.wait_counter(head, "sampled pkts", sampled)

    def unmatched(self):
        """Samples the plugin dropped for want of an exporter."""
        show = self.plugin.appctl("ipfix/show")
        return int(show.rsplit("no exporter=", 1)[1].split()[0])


@pytest.fixture
def bed(ovsdb):
    collector = UdpCollector()
    testbed = None
    try:
        testbed = SideBySide(ovsdb, collector)
        yield testbed.start()
    finally:
        if testbed is not None:
            testbed.plugin.stop()
        collector.close()


def without_tx_pkts(counters):
    return {k: v for k, v in counters.items() if k != "tx pkts"}


def records_by_exporter(bed, ovs_ports, our_ports, ovs_n, our_n):
    """Wait for ``ovs_n`` / ``our_n`` data records from each exporter;
    returns ([OVS records], [plugin records]) as normalized dicts."""
    def parse():
        out = ([], [])
        session = Session()
        for (arrival, data), sender in zip(bed.collector.datagrams,
                                           bed.collector.senders):
            for msg in session.parse(data, sender, arrival, datagram=True):
                side = 0 if sender[1] in ovs_ports else 1
                out[side].extend(r.normalized() for r in msg.data_records)
        return out

    assert bed.collector.wait_for(
        lambda _: tuple(map(len, parse())) >= (ovs_n, our_n), 10.0), \
        [len(x) for x in parse()]
    return parse()


def test_bridge_ipfix_sanity_check(bed):
    """"ofproto-dpif - Bridge IPFIX sanity check": with sampling=1 every
    packet is sampled; with the IPFIX row removed, none is."""
    bed.vsctl("--", "set", "Bridge", "br0", "ipfix=@fix",
              "--", "--id=@fix", "create", "IPFIX",
              f'targets="{bed.collector.target}"', "sampling=1")
    bed.send(3, "--bridge=br0")
    # OVS: a datapath flow that samples (the first packet went up).
    assert ("actions:userspace(pid=0,ipfix(output_port=4294967295))"
            in bed.dpctl_flows())
    assert "packets:2, bytes:68" in bed.dpctl_flows()
    ovs = bed.switch.counters()["bridge ipfix"]
    ours = bed.plugin_counters("bridge br0", 3)
    assert without_tx_pkts(ours) == without_tx_pkts(ovs)
    assert ours["sampled pkts"] == 3 and ours["flows"] == 3
    # No cache: each sample left at once, in both, as the same flow.
    ovs_recs, our_recs = records_by_exporter(
        bed, udp_ports_of(bed.server.vswitchd_pid), bed.plugin.udp_ports(),
        3, 3)
    for records in (ovs_recs, our_recs):
        assert len(records) == 3
        assert {(r["src_mac"], r["dst_mac"], r["ethertype"], r["proto"],
                 r["packets"], r["l2_octets"], r["octets"], r["end_reason"])
                for r in records} == {("50:54:00:00:00:09",
                                       "50:54:00:00:00:0a", 0x0800, 0, 1,
                                       34, 20, 2)}

    # Remove the IPFIX configuration: nothing is sampled any more.
    bed.vsctl("clear", "Bridge", "br0", "ipfix")
    bed.purge()
    bed.send(3, "--bridge=br0")
    assert "actions:drop" in bed.dpctl_flows()
    assert "userspace" not in bed.dpctl_flows()
    assert bed.switch.counters() == {}
    assert bed.plugin.counters() == {}
    assert "no IPFIX exporter on bridge br0" in bed.plugin.appctl(
        "ipfix/show", "br0")
    wait_until(lambda: bed.unmatched() == 3, 5.0, "3 unmatched samples")


def test_bridge_ipfix_statistics_check(bed):
    """"ofproto-dpif - Bridge IPFIX statistics check": 20 packets give
    the counters the testsuite expects, in OVS and in the plugin."""
    assert "NXST_NOT_CONFIGURED" in bed.switch.ofctl(
        "dump-ipfix-bridge", "br0", check=False)
    assert bed.plugin.counters() == {}
    bed.vsctl("--", "set", "Bridge", "br0", "ipfix=@fix",
              "--", "--id=@fix", "create", "IPFIX",
              f'targets="{bed.collector.target}"', "sampling=1")
    bed.send(20, "--bridge=br0")
    ovs = bed.switch.counters()["bridge ipfix"]
    ours = bed.plugin_counters("bridge br0", 20)
    assert without_tx_pkts(ovs) == STATISTICS_20
    assert without_tx_pkts(ours) == STATISTICS_20
    # One message per record plus its template messages in OVS (the
    # testsuite's "4 extra IPFIX template packets" are 20 with OVS 3.1's
    # template set); the plugin packs records and templates into fewer.
    assert ovs["tx pkts"] > 20
    assert 1 <= ours["tx pkts"] < ovs["tx pkts"]

    bed.vsctl("clear", "Bridge", "br0", "ipfix")
    bed.purge()
    bed.send(2, "--bridge=br0")
    assert "NXST_NOT_CONFIGURED" in bed.switch.ofctl(
        "dump-ipfix-bridge", "br0", check=False)
    assert bed.plugin.counters() == {}
    wait_until(lambda: bed.unmatched() == 2, 5.0, "2 unmatched samples")


def test_flow_ipfix_sanity_check(bed):
    """"ofproto-dpif - Flow IPFIX sanity check": an invalid target in one
    collector set crashes nothing; a valid set samples every packet of
    the flow that names it; once the flow is gone, nothing is sampled."""
    # Regression in OVS: an invalid target once crashed it.
    bed.vsctl("--", "--id=@br0", "get", "Bridge", "br0",
              "--", "--id=@ipfix", "create", "IPFIX", 'targets="xyzzy"',
              "--", "--id=@cs", "create", "Flow_Sample_Collector_Set",
              "id=0", "bridge=@br0", "ipfix=@ipfix")
    bed.vsctl("--", "--id=@br0", "get", "Bridge", "br0",
              "--", "--id=@ipfix", "create", "IPFIX",
              f'targets="{bed.collector.target}"',
              "--", "--id=@cs", "create", "Flow_Sample_Collector_Set",
              "id=1", "bridge=@br0", "ipfix=@ipfix")
    bed.switch.ofctl("add-flow", "br0", "in_port=1, actions=sample("
                     "probability=65535,collector_set_id=1),output:2")
    bed.send(3, "--bridge=br0", "--collector-set=1")
    assert ("flow_sample(probability=65535,collector_set_id=1,"
            "obs_domain_id=0,obs_point_id=0,output_port=4294967295)),2"
            in bed.dpctl_flows())
    ovs = bed.switch.counters("flow")["id   1"]
    ours = bed.plugin_counters("bridge br0 id 1", 3)
    assert without_tx_pkts(ours) == without_tx_pkts(ovs)
    assert ours["sampled pkts"] == 3
    # Both still run; the plugin names the bad target.
    assert bed.switch.server.pids() and bed.plugin.proc.poll() is None
    show = bed.plugin.appctl("ipfix/show")
    assert "bridge br0 id 0:" in show and "bad target xyzzy" in show
    records_by_exporter(bed, udp_ports_of(bed.server.vswitchd_pid),
                        bed.plugin.udp_ports(), 3, 3)

    # Remove the flow which contains the sample action: OVS samples no
    # more; the plugin gets no more samples (it counts what it has).
    bed.switch.ofctl("del-flows", "br0", "in_port=1")
    bed.purge()
    start = bed.switch.rx_packets()
    for _ in range(3):
        bed.server.appctl("ovs-vswitchd", "netdev-dummy/receive", "p1",
                          PACKET)
    wait_until(lambda: bed.switch.rx_packets() >= start + 3, 10.0, "rx")
    assert "actions:drop" in bed.dpctl_flows()
    assert bed.switch.counters("flow")["id   1"]["sampled pkts"] == 3
    assert bed.plugin.counters()["bridge br0 id 1"]["sampled pkts"] == 3


def test_flow_ipfix_statistics_check(bed):
    """"ofproto-dpif - Flow IPFIX statistics check": 20 packets through
    ``sample(probability=65535,collector_set_id=1)`` give the counters
    the testsuite expects; destroying the set unconfigures it."""
    assert "NXST_NOT_CONFIGURED" in bed.switch.ofctl(
        "dump-ipfix-flow", "br0", check=False)
    bed.vsctl("--", "--id=@br0", "get", "Bridge", "br0",
              "--", "--id=@ipfix", "create", "IPFIX",
              f'targets="{bed.collector.target}"',
              "--", "--id=@cs", "create", "Flow_Sample_Collector_Set",
              "id=1", "bridge=@br0", "ipfix=@ipfix")
    bed.switch.ofctl("add-flow", "br0", "in_port=1, actions=sample("
                     "probability=65535,collector_set_id=1),output:2")
    bed.send(20, "--bridge=br0", "--collector-set=1")
    ovs = bed.switch.counters("flow")["id   1"]
    ours = bed.plugin_counters("bridge br0 id 1", 20)
    assert without_tx_pkts(ovs) == STATISTICS_20
    assert without_tx_pkts(ours) == STATISTICS_20
    assert ovs["tx pkts"] > 20
    assert 1 <= ours["tx pkts"] < ovs["tx pkts"]

    bed.switch.ofctl("del-flows", "br0", "in_port=1")
    bed.vsctl("destroy", "Flow_Sample_Collector_Set", "1")
    bed.purge()
    bed.send(3, "--bridge=br0", "--collector-set=1")
    assert "NXST_NOT_CONFIGURED" in bed.switch.ofctl(
        "dump-ipfix-flow", "br0", check=False)
    assert bed.plugin.counters() == {}
    wait_until(lambda: bed.unmatched() == 3, 5.0, "3 unmatched samples")
