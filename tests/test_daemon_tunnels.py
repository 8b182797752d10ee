"""Overlays end to end: ``ovs-ipfix-replay --tunnel-port`` over a mixed
underlay capture into the daemon, whose bridge's ports come from OVSDB
(Interface rows set with ovs-vsctl).  Judged by tshark, our parser and
ipfixDump against the generator's truth.  Harness in ``test_daemon``."""

import pytest
import traffic as tr
from support.daemon import (
    REASON_FORCED_END,
    Env,
    assert_flows_exact,
    bridge_ipfix,
    flush_and_collect,
    replay_ok,
)

TUNNEL_PORT = 10

#: Six tunnels (VXLAN, Geneve, GRE with key; two of each, the second
#: Geneve over IPv6), all carrying the same inner flows: (name, outer
#: builder, expected tunnel fields as decoded).
U4 = ("198.51.100.1", "198.51.100.2")
U6 = ("2001:db8::1", "2001:db8::2")


def _udp4(sport, dport, payload):
    return tr.ethernet(tr.ipv4(tr.udp(sport, dport, payload), src=U4[0],
                               dst=U4[1]))


def _udp6(sport, dport, payload):
    return tr.ethernet(tr.ipv6(tr.udp(sport, dport, payload), src=U6[0],
                               dst=U6[1]), ethertype=tr.ETH_TYPE_IPV6)


def _gre4(payload):
    return tr.ethernet(tr.ipv4(payload, src=U4[1], dst=U4[0],
                               proto=tr.IPPROTO_GRE))


TUNNELS = [
    ("vxlan-5001", lambda f: _udp4(49152, 4789, tr.vxlan(f, 5001)),
     dict(tunnel_type=1, tunnel_key="001389", tunnel_proto=17,
          tunnel_src=U4[0], tunnel_dst=U4[1], tunnel_src_port=49152,
          tunnel_dst_port=4789)),
    ("vxlan-5002", lambda f: _udp4(49152, 4789, tr.vxlan(f, 5002)),
     dict(tunnel_type=1, tunnel_key="00138a", tunnel_proto=17,
          tunnel_src=U4[0], tunnel_dst=U4[1], tunnel_src_port=49152,
          tunnel_dst_port=4789)),
    ("geneve-7001", lambda f: _udp4(50000, 6081,
                                    tr.geneve(f, 7001, bytes(8))),
     dict(tunnel_type=7, tunnel_key="001b59", tunnel_proto=17,
          tunnel_src=U4[0], tunnel_dst=U4[1], tunnel_src_port=50000,
          tunnel_dst_port=6081)),
    ("geneve6-7002", lambda f: _udp6(50001, 6081, tr.geneve(f, 7002)),
     dict(tunnel_type=7, tunnel_key="001b5a", tunnel_proto=17,
          tunnel_src="0.0.0.0", tunnel_dst="0.0.0.0",
          tunnel_src_port=50001, tunnel_dst_port=6081)),
    ("gre-key-1", lambda f: _gre4(tr.gre_teb(f, key=0x01000001)),
     dict(tunnel_type=2, tunnel_key="01000001", tunnel_proto=47,
          tunnel_src=U4[1], tunnel_dst=U4[0], tunnel_src_port=0,
          tunnel_dst_port=0)),
    ("gre-key-2", lambda f: _gre4(tr.gre_teb(f, key=0x01000002,
                                             seq=5)),
     dict(tunnel_type=2, tunnel_key="01000002", tunnel_proto=47,
          tunnel_src=U4[1], tunnel_dst=U4[0], tunnel_src_port=0,
          tunnel_dst_port=0)),
]
TUNNEL_FIELDS = tuple(TUNNELS[0][2])


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


def _tunnel_of(record):
    return tuple(record.get(k) for k in TUNNEL_FIELDS)


def test_replay_tunnel_port_exact(env, tmp_path):
    """Every flow of a mixed underlay capture, replayed with
    ``--tunnel-port``, is exported with tunnel elements equal to its
    tunnel and exact inner totals; the same inner flow in six tunnels is
    six records; frames that are no tunnel packets are exported
    untunnelled on the same port.  Interface elements come from OVSDB."""
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1)
    env.ovsdb.vsctl(
        "add-port", "br0", "vx0", "--", "set", "Interface", "vx0",
        "type=vxlan", "options:remote_ip=flow", "options:key=flow",
        f"ofport={TUNNEL_PORT}", "ifindex=42", "--",
        "add-port", "br0", "p1", "--", "set", "Interface", "p1",
        "ofport=1", "ifindex=7")
    exporter = env.exporter()
    exporter.wait_show(lambda s: ("br0", None) in s.exporters,
                       "the br0 exporter")

    inner, _ = tr.traffic_mix(seed=31, flows_per_kind=1,
                              packets_per_flow=(1, 3))
    inner = [f for f in inner if len(f) >= 14 and not tr.is_bfd(f)]
    truth = tr.truth_of(inner, skip_bfd=True)
    plain = [tr.build_frame(sport=7000 + i, dport=53) for i in range(5)]
    frames = [build(f) for _, build, _ in TUNNELS for f in inner] + plain
    read, sent, _ = replay_ok(exporter, env.pcap("underlay.pcap", frames),
                              "--bridge=br0",
                              f"--tunnel-port={TUNNEL_PORT}")
    assert read == sent == len(frames)
    exporter.wait_upcalls(len(frames))
    flush_and_collect(exporter, [collector])

    judged = judge_collector_ok(collector, tmp_path)
    for name, records in (("tshark", judged.tshark.records),
                          ("ours", judged.session.normalized())):
        records = [r for r in records if "packets" in r
                   and "exporting_process_id" not in r]
        groups = {}
        for r in records:
            groups.setdefault(_tunnel_of(r), []).append(r)
            assert (r["ingress_if"], r["if_name"]) == (42, "vx0"), name
        untunnelled = groups.pop((None,) * len(TUNNEL_FIELDS))
        assert sorted(r["src_port"] for r in untunnelled) == list(
            range(7000, 7005)), name
        assert len(groups) == len(TUNNELS), (name, list(groups))
        for tname, _, fields in TUNNELS:
            key = tuple(fields[k] for k in TUNNEL_FIELDS)
            assert key in groups, (name, tname)
            assert_flows_exact(groups[key], truth, REASON_FORCED_END)
        assert len(records) == len(TUNNELS) * len(truth) + len(plain)


def judge_collector_ok(collector, tmp_path):
    from support.decoders import judge_collector
    judged = judge_collector(collector, tmp_path)
    assert judged.problems == []
    return judged

