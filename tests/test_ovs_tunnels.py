"""Differential test for overlays: tunnel keys and interface identity,
the plugin against Open vSwitch 3.1's own exporter (harness in
``test_ovs_differential``).

Egress: OVS's own testsuite samples egress tunnels with flow sampling
(``sample(...,sampling_port=N)``, tunnel push/pop off so the datapath
sets the tunnel with ``set(tunnel(...))`` before the sample).  OVS takes
the egress tunnel key from OVS_PACKET_ATTR_EGRESS_TUN_KEY, which only
the kernel datapath (dpif-netlink) fills in: on the dummy (userspace)
datapath OVS 3.1 exports these samples untunnelled, with the tunnel
port as egress interface.  The plugin, given what that datapath gives
(egress samples without tunnel metadata), exports the same records:
same keys, interface elements (gre0, vx0, gnv0) and counts, no tunnel
elements.  Tunnelled egress records are checked against OVS's code
(tests/test_tunnels.py); README says so.
"""

import socket

import pytest
from support.differential import KEY_FIELDS, compare, flush_and_collect
from traffic import build_frame

from ovs_ipfix_py import upcall

pytestmark = pytest.mark.timeout(120)

#: (port, OpenFlow number, type, local_ip, remote_ip, key, UDP dst port,
#: OVS's tunnelType, tunnelKey as decoded, frames' UDP dst port).
TUNNEL_PORTS = [
    ("gre0", 3, "gre", "2.2.2.2", "1.1.1.1", 5, 0, 2, "00000005", 1001),
    ("vx0", 4, "vxlan", "2.2.2.3", "1.1.1.2", 5001, 4789, 1, "001389",
     1002),
    ("gnv0", 5, "geneve", "2.2.2.4", "1.1.1.3", 7001, 6081, 7, "001b59",
     1003),
]
TUNNEL_FIELDS = ("tunnel_type", "tunnel_key", "tunnel_src", "tunnel_dst",
                 "tunnel_proto", "tunnel_src_port", "tunnel_dst_port")


def ovs31_geneve_protocol(record):
    """OVS 3.1 sends Geneve's tunnelProtocolIdentifier as 0 (its
    tunnel_protocol[] table stops one entry short of Geneve; 3.4 and
    later send 17, as we do): the one tunnel field compared after
    mending, and only when OVS sent exactly that defect."""
    if record.get("tunnel_type") == 7 and record.get("tunnel_proto") == 0:
        return dict(record, tunnel_proto=17)
    return record


def test_egress_tunnel_port_sampling_gives_what_ovs_gives(pair):  # noqa: F811
    args = []
    for name, ofport, ptype, local, remote, key, *_ in TUNNEL_PORTS:
        args += ["--", "add-port", "br0", name, "--", "set", "Interface",
                 name, f"type={ptype}", f"options:local_ip={local}",
                 f"options:remote_ip={remote}", f"options:key={key}",
                 f"ofport_request={ofport}"]
    pair.server.vsctl(*args[1:], wait=True)
    pair.server.appctl("ovs-vswitchd", "dpif/set-dp-features", "br0",
                       "tnl_push_pop", "false")
    for _, ofport, *_, dport in TUNNEL_PORTS:
        pair.switch.ofctl(
            "add-flow", "br0",
            f"in_port=1,udp,tp_dst={dport},actions=sample(probability="
            f"65535,collector_set_id=1,obs_domain_id=7,obs_point_id=9,"
            f"sampling_port={ofport}),output:{ofport}")
    pair.server.vsctl(
        "--", "--id=@br0", "get", "Bridge", "br0",
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"',
        "cache_active_timeout=60", "cache_max_flows=1000",
        "--", "create", "Flow_Sample_Collector_Set", "id=1", "bridge=@br0",
        "ipfix=@i", wait=True)
    frames = [build_frame(proto=17, sport=2000 + i, dport=port[-1])
              for port in TUNNEL_PORTS for i in range(4)
              for _ in range(1 + i % 2)]
    pair.switch.inject(frames, done=lambda k: pair.switch.counters(
        "flow").get("id   1", {}).get("sampled pkts", -1) >= k)

    # The plugin: the same frames as flow samples leaving by the tunnel
    # port, with the (no) egress tunnel key the userspace datapath gives.
    by_dport = {p[-1]: p for p in TUNNEL_PORTS}
    ups = [upcall.FlowSample("br0", 1, 7, 9, 65535, 0, 1,
                             by_dport[int.from_bytes(f[36:38], "big")][1],
                             f, len(f))
           for f in frames]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for d in upcall.pack_batches(ups):
            sock.sendto(d, pair.plugin.channel)
    finally:
        sock.close()
    ours = pair.plugin.wait_counter("bridge br0 id 1", "sampled pkts",
                                    len(frames))
    ovs = pair.switch.counters("flow")["id   1"]
    assert ours["current flows"] == ovs["current flows"] == 12

    outcome = flush_and_collect(
        pair, ("--all", "destroy", "Flow_Sample_Collector_Set"),
        ovs["current flows"], ours["current flows"])
    for decoder, ovs_recs, our_recs in (
            ("tshark", outcome.ovs.tshark.records,
             outcome.ours.tshark.records),
            ("parser", outcome.ovs.parser_records,
             outcome.ours.parser_records)):
        mismatches, _, only_ovs, only_ours = compare(ovs_recs, our_recs)
        assert not mismatches and not only_ovs and not only_ours, (
            decoder, mismatches[:3], only_ovs[:2], only_ours[:2])
        tunnels = {}
        for who, recs in (("ovs", ovs_recs), ("ours", our_recs)):
            for r in recs:
                assert r["flow_direction"] == 1
                tunnels.setdefault(who, {})[
                    tuple(r.get(k) for k in KEY_FIELDS)] = tuple(
                        r.get(k) for k in TUNNEL_FIELDS)
        assert tunnels["ovs"] == tunnels["ours"], decoder
        assert set(tunnels["ovs"].values()) == {(None,) * 7}, decoder
        names = {(r["if_name"], r.get("egress_if_name"))
                 for r in our_recs}
        assert names == {("p1", p[0]) for p in TUNNEL_PORTS}, decoder


# ---------------------------------------------------------------------------
# Ingress on tunnel ports: native tunnelling (tnl_pop) on the dummy
# datapath, as OVS's tunnel-push-pop.at sets it up.

UNDERLAY_MAC, BR0_MAC = "f8:bc:12:44:34:b6", "aa:55:aa:55:00:00"
REMOTE, LOCAL = "1.1.2.92", "1.1.2.88"
#: int-br's tunnel ports, all key=flow: (name, OpenFlow port, type).
INGRESS_PORTS = [("t_vx", 2, "vxlan"), ("t_gre", 3, "gre"),
                 ("t_gnv", 4, "geneve")]


@pytest.fixture
def native(ovsdb_factory):
    """br0 (p0: the underlay, 1.1.2.88/24, route to 1.1.2.92) and int-br
    with vxlan, gre and geneve ports; bridge sampling on int-br only."""
    from support.collector import UdpCollector
    from support.switch import ExporterDaemon, Pair, Switch
    server = ovsdb_factory()
    collector = UdpCollector()
    plugin = ExporterDaemon(server)
    try:
        switch = Switch(server, ports=("p0",))
        # Tunnels terminate on br0's own MAC and IP.
        server.vsctl("set", "Bridge", "br0",
                     f"other-config:hwaddr={BR0_MAC}", wait=True)
        args = ["add-br", "int-br", "--", "set", "Bridge", "int-br",
                "datapath_type=dummy", "fail-mode=secure"]
        for name, ofport, ptype in INGRESS_PORTS:
            args += ["--", "add-port", "int-br", name, "--", "set",
                     "Interface", name, f"type={ptype}",
                     f"options:remote_ip={REMOTE}", "options:key=flow",
                     f"ofport_request={ofport}"]
        server.vsctl(*args, wait=True)
        for cmd in (("netdev-dummy/ip4addr", "br0", LOCAL + "/24"),
                    ("ovs/route/add", REMOTE + "/24", "br0")):
            server.appctl("ovs-vswitchd", *cmd)
        switch.ofctl("add-flow", "br0", "actions=normal")
        plugin.start()
        yield Pair(server, switch, plugin, collector)
    finally:
        plugin.stop()
        collector.close()


def _underlay(kind, inner, key, sport):
    from traffic import ethernet, geneve, gre_teb, ipv4, udp, vxlan
    if kind == "vxlan":
        payload, proto = udp(sport, 4789, vxlan(inner, key)), 17
    elif kind == "geneve":
        payload, proto = udp(sport, 6081, geneve(inner, key)), 17
    else:
        payload, proto = gre_teb(inner, key=key), 47
    return ethernet(ipv4(payload, src=REMOTE, dst=LOCAL, proto=proto),
                    src=UNDERLAY_MAC, dst=BR0_MAC)


def test_ingress_on_tunnel_ports_gives_what_ovs_gives(native):
    """Underlay frames into OVS's p0 (popped natively onto int-br's
    tunnel ports) and, decapsulated by ``ovs-ipfix-replay
    --tunnel-port``, into the plugin: the same records, tunnel elements
    (type, key of the port type's length, addresses, protocol, UDP
    ports) and interface elements; the same inner flow in two VNIs is
    two records in both.

    Counts: OVS 3.1 on the dummy datapath samples the first packet of
    each new datapath flow twice after tnl_pop (its own counters show
    it: sampled pkts > frames received); every other packet once.  So
    per flow OVS's packetDeltaCount is ours or more, and the surplus
    over all flows is exactly its surplus of samples."""
    from support.switch import parse_counters
    pair = native  # noqa: F811
    pair.server.vsctl(
        "--", "--id=@i", "create", "IPFIX",
        f'targets="{pair.collector.target}"', "sampling=1",
        "cache_active_timeout=60", "cache_max_flows=1000",
        "--", "set", "Bridge", "int-br", "ipfix=@i", wait=True)
    inner = [build_frame(proto=17, sport=3000 + i, dport=53)
             for i in range(3)]
    per_port = {
        "t_vx": [_underlay("vxlan", f, vni, 40000 + vni % 7)
                 for vni in (5001, 5002) for f in inner],
        "t_gre": [_underlay("gre", f, 0x01000001, 0) for f in inner],
        "t_gnv": [_underlay("geneve", f, 7001, 50000) for f in inner],
    }
    frames = [f for fs in per_port.values() for f in fs]

    def sampled():
        return parse_counters(pair.switch.ofctl(
            "dump-ipfix-bridge", "int-br")).get("bridge ipfix", {}).get(
                "sampled pkts", -1)

    pair.switch.inject(frames, port="p0", done=lambda k: sampled() >= k)
    for name, ofport, _ in INGRESS_PORTS:
        pair.plugin.replay(per_port[name], "--bridge=int-br",
                           f"--tunnel-port={ofport}")
    ours = pair.plugin.wait_counter("bridge int-br", "sampled pkts",
                                    len(frames))
    ovs = parse_counters(pair.switch.ofctl("dump-ipfix-bridge", "int-br"))[
        "bridge ipfix"]
    assert ours["sampled pkts"] == len(frames) <= ovs["sampled pkts"]
    surplus = ovs["sampled pkts"] - len(frames)
    # 3 inner flows x 4 tunnels (two VNIs on t_vx).
    assert ours["current flows"] == ovs["current flows"] == 12

    outcome = flush_and_collect(pair, ("clear", "Bridge", "int-br",
                                       "ipfix"), 12, 12)
    for decoder, ovs_recs, our_recs in (
            ("tshark", outcome.ovs.tshark.records,
             outcome.ours.tshark.records),
            ("parser", outcome.ovs.parser_records,
             outcome.ours.parser_records)):
        def by_key(recs):
            return {tuple(r.get(k) for k in KEY_FIELDS + TUNNEL_FIELDS):
                    r["packets"] for r in recs}
        ovs_recs = [ovs31_geneve_protocol(r) for r in ovs_recs]
        theirs, mine = by_key(ovs_recs), by_key(our_recs)
        assert len(theirs) == len(ovs_recs) == len(mine) == 12, decoder
        names = KEY_FIELDS + TUNNEL_FIELDS
        diff = set(theirs) ^ set(mine)
        assert not diff, (decoder, sorted(
            "%s %s" % ("ovs" if k in theirs else "ours", [
                (n, v) for n, v in zip(names, k)
                if n.startswith(("tunnel", "src_port", "if_name"))])
            for k in diff))
        assert all(theirs[k] >= mine[k] for k in mine), decoder
        assert sum(theirs.values()) - sum(mine.values()) == surplus
        assert sum(mine.values()) == len(frames)
        got = {(r["if_name"], r["tunnel_type"], r["tunnel_key"],
                r["tunnel_src"], r["tunnel_dst"], r["tunnel_proto"])
               for r in ovs_recs}
        assert got == {
            ("t_vx", 1, "001389", REMOTE, LOCAL, 17),
            ("t_vx", 1, "00138a", REMOTE, LOCAL, 17),
            ("t_gre", 2, "01000001", REMOTE, LOCAL, 47),
            ("t_gnv", 7, "001b59", REMOTE, LOCAL, 17)}, decoder
