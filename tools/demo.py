"""The demo behind ``tools/demo``: one complete run on an embedded default.

1. a private ovsdb-server in a temporary directory (Debian's schema);
2. bridge br0 and an IPFIX row configured with ovs-vsctl (sampling 1, so
   counts are exact; a 60 s active timeout keeps flows cached), with two
   targets: a local UDP collector and an IPFIX file (RFC 5655,
   ``file:/...``);
3. ovs-ipfix-exporter started on that database with its own channel;
4. a generated traffic mix written to a pcap and replayed with
   ovs-ipfix-replay;
5. ``ovs-appctl ipfix/show``;
6. ``ovs-vsctl set IPFIX ... cache_active_timeout=120``: the exporter
   flushes its cache as forced end; the local collector's records are
   printed as a table and checked against the generated truth;
7. the IPFIX file read back by an independent reader (CERT's
   ``ipfixDump --stats`` and ``--data``) and by our parser: the same
   flows, no warning;
8. when nfdump is installed, nfcapd received the same export as a third
   target: ``nfdump`` prints the flows with their first-seen time and
   duration (checked: within the replay's time window);
9. everything stopped and removed.

Exit status 0 when every flow arrived with the right counts.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ovs_ipfix_py.pcap import write_pcap  # noqa: E402
from tests.support.collector import UdpCollector  # noqa: E402
from tests.support.decoders import (  # noqa: E402
    NfcapdCollector,
    ipfixdump_check,
    ipfixdump_stats,
    parse_collector,
    parse_messages,
)
from tests.support.ovsdb import OvsdbServer  # noqa: E402
from tests.traffic import flow_id_of, is_bfd, traffic_mix, truth_of  # noqa

REASONS = {1: "idle", 2: "active", 3: "end", 4: "forced end",
           5: "lack of res."}


def step(text):
    print("\n== %s" % text, flush=True)


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=True,
                          **kw).stdout


def wait_for(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise SystemExit("demo: timed out waiting for %s" % what)


def endpoint(addr, port):
    if addr is None:
        return "-"
    if ":" in addr:
        addr = "[%s]" % addr
    return addr if port is None else "%s:%d" % (addr, port)


def print_table(records):
    fmt = "%-4s %-5s %-28s %-28s %5s %5s %8s %8s %5s %5s  %s"
    print(fmt % ("ip", "proto", "source", "destination", "vlan", "pkts",
                 "l2 bytes", "ip bytes", "min", "max", "end reason"))
    for r in sorted(records, key=lambda r: (r.get("ip_version") or 0,
                                            r.get("proto") or 0,
                                            str(r.get("src_ip")),
                                            r.get("src_port") or 0)):
        if r.get("ip_version"):
            src = endpoint(r.get("src_ip"), r.get("src_port"))
            dst = endpoint(r.get("dst_ip"), r.get("dst_port"))
            if r.get("icmp_type") is not None:
                dst += " type %d/%d" % (r["icmp_type"], r["icmp_code"])
            ipver, proto = "v%d" % r["ip_version"], str(r.get("proto"))
        else:
            src, dst = r.get("src_mac"), r.get("dst_mac")
            ipver, proto = "-", "0x%04x" % r.get("ethertype", 0)
        print(fmt % (ipver, proto, src, dst,
                     r.get("vlan") if r.get("vlan") is not None else "-",
                     r.get("packets"), r.get("l2_octets"),
                     r.get("octets", "-"), r.get("min_len", "-"),
                     r.get("max_len", "-"),
                     REASONS.get(r.get("end_reason"), r.get("end_reason"))))


def main():
    workdir = tempfile.mkdtemp(prefix="ovs-ipfix-demo.", dir="/tmp")
    server = collector = daemon = nfcapd = None
    try:
        step("private ovsdb-server in %s" % workdir)
        server = OvsdbServer(workdir).start()
        collector = UdpCollector()
        ipfix_file = os.path.join(workdir, "flows.ipfix")
        targets = [collector.target, "file:" + ipfix_file]
        if shutil.which("nfcapd") and shutil.which("nfdump"):
            step("start nfcapd (nfdump's collector) as a third target")
            nfdir = os.path.join(workdir, "nfcapd")
            os.makedirs(nfdir)
            nfcapd = NfcapdCollector(workdir=nfdir).__enter__()
            targets.append(nfcapd.target)
        step("configure bridge br0 and IPFIX with ovs-vsctl")
        cmd = ["add-br", "br0", "--", "set", "bridge", "br0",
               "datapath_type=dummy", "--",
               "--id=@i", "create", "IPFIX",
               "targets=[%s]" % ",".join('"%s"' % t for t in targets),
               "sampling=1",
               "obs_domain_id=1", "obs_point_id=2",
               "cache_active_timeout=60", "cache_max_flows=10000", "--",
               "set", "Bridge", "br0", "ipfix=@i"]
        print("$ ovs-vsctl " + " ".join(cmd))
        server.vsctl(*cmd)

        step("start ovs-ipfix-exporter")
        channel = os.path.join(workdir, "channel.sock")
        ctl = os.path.join(workdir, "exporter.ctl")
        exporter_cmd = ["ovs-ipfix-exporter", "--db=" + server.remote,
                        "--channel=" + channel, "--unixctl=" + ctl,
                        "--log-file=" + os.path.join(workdir, "exp.log"),
                        "-vconsole:off"]
        print("$ " + " ".join(exporter_cmd))
        daemon = subprocess.Popen(exporter_cmd)
        wait_for(lambda: os.path.exists(channel) and os.path.exists(ctl),
                 what="the exporter's sockets")
        wait_for(lambda: "bridge br0" in run(
            ["ovs-appctl", "-t", ctl, "ipfix/show"]), what="the exporter")

        step("replay a generated traffic mix")
        frames, _ = traffic_mix(seed=7)
        pcap = os.path.join(workdir, "traffic.pcap")
        write_pcap(pcap, [(1.0 + i / 1000.0, f)
                          for i, f in enumerate(frames)])
        replay_start = time.time()
        # Paced (1000 samples/s), so flows last long enough for their
        # durations to show.
        sys.stdout.write(run(["ovs-ipfix-replay", "--channel=" + channel,
                              "--bridge=br0", "--rate=1000", pcap]))
        wait_for(lambda: "sampled pkts=%d" % len(frames) in run(
            ["ovs-appctl", "-t", ctl, "ipfix/show"]), what="the samples")
        replay_end = time.time()
        sys.stdout.write(run(["ovs-appctl", "-t", ctl, "ipfix/show"]))

        step("change an option: the cache is flushed as forced end")
        before = len(collector.datagrams)
        print("$ ovs-vsctl set IPFIX . cache_active_timeout=120")
        server.vsctl("set", "IPFIX", ".", "cache_active_timeout=120")
        collector.wait_quiet(before)
        session = parse_collector(collector)
        records = [r.normalized() for r in session.records]
        print_table(records)

        step("check against the generated truth")
        truth = truth_of([f for f in frames if not is_bfd(f)])
        got = {}
        for r in records:
            got.setdefault(r["end_reason"], 0)
            got[r["end_reason"]] += 1
        total_pkts = sum(r["packets"] for r in records)
        want_pkts = sum(t.packets for t in truth.values())
        print("flows: %d received, %d generated; packets: %d received, %d"
              " generated; end reasons: %s; problems: %s"
              % (len(records), len(truth), total_pkts, want_pkts,
                 {REASONS[k]: v for k, v in got.items()},
                 session.problems or "none"))
        ok = (len(records) == len(truth) and total_pkts == want_pkts
              and set(got) == {4} and not session.problems)

        step("read the IPFIX file back (ipfixDump, then our parser)")
        print("$ ipfixDump --in %s --stats" % ipfix_file)
        stats = ipfixdump_stats(ipfix_file)
        print(stats["stdout"].strip())
        with open(ipfix_file, "rb") as f:
            in_file = parse_messages(f.read())
        file_records = sorted(
            (r.normalized() for m in in_file for r in m.data_records),
            key=repr)
        same = file_records == sorted(records, key=repr)
        # ipfixDump --stats and --data: no warning, every message read.
        dump_ok, dump_output = ipfixdump_check(ipfix_file)
        file_ok = (same and dump_ok and stats["data_records"] == sum(
            len(m.records) for m in in_file))
        print("file: %d flows, %s the UDP collector's; ipfixDump: %d "
              "messages, %d data records, %s"
              % (len(file_records), "the same as" if same else
                 "NOT the same as", stats["messages"],
                 stats["data_records"],
                 "no error" if file_ok else "ERRORS: " + dump_output[:2000]))
        ok = ok and file_ok
        sys.stdout.write(run(["ovs-appctl", "-t", ctl, "ipfix/show"]))
        run(["ovs-appctl", "-t", ctl, "exit"])
        daemon.wait(timeout=10)
        if nfcapd is not None:
            ok = show_nfdump(nfcapd, replay_start, replay_end) and ok
        print("\n%s" % ("DEMO OK" if ok else "DEMO FAILED"))
        return 0 if ok else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=10)
        if nfcapd is not None:
            nfcapd._stop(15)        # SIGTERM; nothing left after __exit__
        if collector is not None:
            collector.close()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def show_nfdump(nfcapd, start, end):
    """Stop nfcapd (it writes its file), print what nfdump reads and
    check every flow's first and last seen against the replay's window
    (s since the epoch).  True when they all lie in it."""
    nfcapd.__exit__(None, None, None)
    files = sorted(f for f in os.listdir(nfcapd.flowdir)
                   if f.startswith("nfcapd.2"))
    step("read the records with nfdump (first seen, duration, flow)")
    cmd = ["nfdump", "-r", os.path.join(nfcapd.flowdir, files[0]),
           "-o", "line", "-c", "12", "-O", "tstart",
           "proto tcp or proto udp"]
    sys.stdout.write(run(cmd, env=dict(os.environ, TZ="UTC")))
    late = [r for r in nfcapd.records
            if not start - 0.01 <= r["flow_start"] <= r["flow_end"]
            <= end + 0.01]
    print("nfdump: %d flows, first/last seen all within the replay "
          "(%s - %s UTC): %s"
          % (len(nfcapd.records), _utc(start), _utc(end),
             "yes" if not late else "NO: %r" % late[:2]))
    return bool(nfcapd.records) and not late


def _utc(t):
    return datetime.datetime.fromtimestamp(
        t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]


if __name__ == "__main__":
    sys.exit(main())
