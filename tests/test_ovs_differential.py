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

The helpers at the top (``ExporterDaemon``, ``Switch``,
``parse_counters``, ``udp_ports_of``) are shared with the other
end-to-end test modules.
"""

import collections
import os
import re
import signal
import struct
import subprocess
import time

import pytest
from support import pcapfile, wait_until
from support.collector import UdpCollector
from support.decoders import Session, tshark_decode
from traffic import build_frame, flow_id_of, is_bfd, traffic_mix, truth_of

from ovs_ipfix_py.pcap import write_pcap

pytestmark = pytest.mark.timeout(120)

#: How OVS's dummy port is fed: frames per ``netdev-dummy/receive`` call
#: (its queue holds at most 100; more are dropped silently).
INJECT_BATCH = 50

# ---------------------------------------------------------------------------
# Shared helpers: the plugin as a process, OVS as a switch, counters.

_COUNTER = re.compile(r"([a-z][a-z0-9 ]*?)=(\d+)")


def parse_counters(text):
    """Exporter counters from ``ovs-ofctl dump-ipfix-bridge|flow`` or
    from the plugin's ``ipfix/show``: {header: {name: int}}.

    The header is what precedes ``flows=`` on the first line ("bridge
    ipfix", "id   1" for OVS; "bridge br0", "bridge br0 id 1" for the
    plugin); names are OVS's ("flows", "current flows", "sampled pkts",
    "ipv4 ok", "ipv6 ok", "tx pkts", "pkts errs", "ipv4 errs", "ipv6
    errs", "tx errs").
    """
    blocks = {}
    current = None
    for line in text.splitlines():
        if "current flows=" in line:
            head = line[:line.index("flows=")].strip().rstrip(":").strip()
            current = blocks[head] = {}
        elif "pkts errs=" not in line:
            current = None if "flows=" in line else current
            continue
        if current is not None:
            for name, value in _COUNTER.findall(line):
                current[name.strip()] = int(value)
    return blocks


def udp_ports_of(pid):
    """Local ports of the UDP sockets process ``pid`` holds (IPv4 and
    IPv6), from /proc: how a collector tells two exporters apart."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class ExporterDaemon:
    """``ovs-ipfix-exporter`` as our child on ``server``'s database, with
    its channel, control socket and log in the server's directory.

    ``stop()`` asks it to exit (it flushes), then SIGTERM/SIGKILL by pid;
    safe to call twice.
    """

    def __init__(self, server, name="exporter", args=()):
        self.server = server
        self.args = list(args)   # more command-line options
        work = server.workdir
        self.channel = os.path.join(work, name + ".sock")
        self.ctl = os.path.join(work, name + ".ctl")
        self.log = os.path.join(work, name + ".log")
        self.proc = None
        self._pcaps = 0

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        self.proc = subprocess.Popen(
            ["ovs-ipfix-exporter", "--db=" + self.server.remote,
             "--channel=" + self.channel, "--unixctl=" + self.ctl,
             "--log-file=" + self.log, "-vconsole:off", *self.args],
            stdin=subprocess.DEVNULL, env=self.server.env,
            cwd=self.server.workdir)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ovs-ipfix-exporter exited with {self.proc.returncode}"
                    f":\n{self.log_text()}")
            return (os.path.exists(self.channel)
                    and os.path.exists(self.ctl)
                    and "ovsdb: connected" in self.appctl("ipfix/show",
                                                          check=False))

        try:
            wait_until(ready, 10.0, "ovs-ipfix-exporter to start")
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except FileNotFoundError:
            return ""

    def appctl(self, *args, check=True):
        result = subprocess.run(
            ["ovs-appctl", "-t", self.ctl, "--timeout=10", *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=20)
        if check and result.returncode:
            raise AssertionError(f"ovs-appctl {' '.join(args)}: "
                                 f"{result.stderr}")
        return result.stdout

    def counters(self):
        """parse_counters() of ``ipfix/show``."""
        return parse_counters(self.appctl("ipfix/show"))

    def wait_counter(self, head, name, value, timeout=10.0):
        """Wait until counter ``name`` of exporter ``head`` reaches
        ``value``; returns the exporter's counters."""
        got = {}

        def reached():
            got.update(self.counters().get(head, {}))
            return got.get(name, -1) >= value

        wait_until(reached, timeout, f"{head} {name}={value} (have {got})")
        return got

    def write_frames(self, frames):
        """``frames`` as a pcap in the work directory; returns its path."""
        self._pcaps += 1
        path = os.path.join(self.server.workdir, f"replay{self._pcaps}.pcap")
        write_pcap(path, [(1.0 + i / 1000.0, f)
                          for i, f in enumerate(frames)])
        return path

    def start_replay(self, path, *options):
        """``ovs-ipfix-replay OPTIONS PATH`` in the background: the Popen
        (stderr piped); the caller waits for it."""
        return subprocess.Popen(
            ["ovs-ipfix-replay", "--channel=" + self.channel, *options,
             path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)

    def replay(self, frames, *options):
        """Send ``frames`` over the channel with ``ovs-ipfix-replay
        OPTIONS`` and wait for it."""
        proc = self.start_replay(self.write_frames(frames), *options)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err

    def udp_ports(self):
        return udp_ports_of(self.pid)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        if os.path.exists(self.ctl):
            self.appctl("exit", check=False)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Switch:
    """A real ovs-vswitchd on ``server`` (started here) with bridge br0 on
    the dummy datapath, ``fail-mode=secure`` (no flow unless added, as in
    OVS's own testsuite), and dummy ports p1 (OpenFlow port 1) and p2
    (port 2).  ``ifindex``: {name: options:ifindex}, what a dummy port
    reports as its ifindex (OVS exports it as ingress/egressInterface;
    p2, without, has none: 0)."""

    def __init__(self, server, ports=("p1", "p2"), ifindex=None):
        self.server = server
        server.run_vswitchd()
        ifindex = {"p1": 1001} if ifindex is None else ifindex
        args = ["add-br", "br0", "--", "set", "Bridge", "br0",
                "datapath_type=dummy", "fail-mode=secure"]
        for number, name in enumerate(ports, 1):
            args += ["--", "add-port", "br0", name, "--", "set",
                     "Interface", name, "type=dummy",
                     f"ofport_request={number}"]
            if name in ifindex:
                args.append(f"options:ifindex={ifindex[name]}")
        server.vsctl(*args, wait=True)

    def ofctl(self, *args, check=True):
        result = subprocess.run(["ovs-ofctl", *args], env=self.server.env,
                                cwd=self.server.workdir,
                                capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=20)
        if check and result.returncode:
            raise AssertionError(f"ovs-ofctl {' '.join(args)}: "
                                 f"{result.stderr}")
        return result.stdout

    def counters(self, kind="bridge"):
        """parse_counters() of ``ovs-ofctl dump-ipfix-bridge|flow br0``
        ({} when OVS answers NXST_NOT_CONFIGURED)."""
        return parse_counters(self.ofctl(f"dump-ipfix-{kind}", "br0"))

    def rx_packets(self, port=1):
        out = self.ofctl("dump-ports", "br0", str(port))
        return int(re.search(r"rx pkts=(\d+)", out).group(1))

    def inject(self, frames, port="p1", done=None):
        """Receive ``frames`` on dummy port ``port``, INJECT_BATCH at a
        time.  After each batch, wait until ``done(n)`` (n = frames sent
        so far) holds, by default until the port counted them all."""
        if done is None:
            start = self.rx_packets(int(port[1:]))

            def done(n):
                return self.rx_packets(int(port[1:])) >= start + n
        sent = 0
        for i in range(0, len(frames), INJECT_BATCH):
            batch = frames[i:i + INJECT_BATCH]
            self.server.appctl("ovs-vswitchd", "netdev-dummy/receive", port,
                               *[f.hex() for f in batch])
            sent += len(batch)
            wait_until(lambda n=sent: done(n), 10.0,
                       f"ovs-vswitchd to take {sent} frames")

    def wait_sampled(self, value, kind="bridge", head=None):
        """Wait until OVS's exporter counted ``value`` sampled packets."""
        head = head or ("bridge ipfix" if kind == "bridge" else "id   1")

        def reached():
            return self.counters(kind).get(head, {}).get(
                "sampled pkts", -1) >= value

        wait_until(reached, 10.0, f"OVS to sample {value} packets")


# ---------------------------------------------------------------------------
# Fixture: OVS and the plugin on one database, one collector for both.


class Pair:
    """What a differential test works with: the server, the OVS switch,
    the plugin and the shared collector."""

    def __init__(self, server, switch, plugin, collector):
        self.server = server
        self.switch = switch
        self.plugin = plugin
        self.collector = collector


@pytest.fixture
def pair(ovsdb_factory):
    server = ovsdb_factory()
    collector = UdpCollector()
    plugin = ExporterDaemon(server)
    try:
        switch = Switch(server)
        plugin.start()
        yield Pair(server, switch, plugin, collector)
    finally:
        plugin.stop()
        collector.close()
        # ovsdb_factory stops ovs-vswitchd and ovsdb-server by pid.


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
