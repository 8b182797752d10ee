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
from test_ovs_differential import (  # noqa: F401 (pair is a fixture)
    KEY_FIELDS,
    compare,
    flush_and_collect,
    pair,
)
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
