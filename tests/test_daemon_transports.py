"""ovs-ipfix-exporter exporting over UDP, TCP, TLS and to a file at once.

One daemon on a private ovsdb-server, one ``IPFIX`` row (ovs-vsctl)
naming four targets: a UDP collector, a TCP collector, a TLS collector
(Python's ``ssl``, certificates from a private CA made with ``ovs-pki``,
the exporter's own certificate required) and an RFC 5655 file.  The
traffic mix is replayed (sampling 1) and flushed; then

- every transport delivers exactly the generated per-flow totals;
- tshark decodes the TCP stream (written as a capture) with no
  malformed message and no sequence warning; ipfixDump reads the TCP
  stream saved as a file, and the file target, with no error;
- the TLS session is TLS 1.2 or 1.3 and the exporter presented its
  certificate;
- ``ovs-appctl ipfix/reopen`` and SIGHUP each leave the renamed file
  complete and start a new one, templates first;
- a collector whose certificate the CA did not sign is refused, the
  reason logged and shown, and retried.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import traffic as tr
from support import require, wait_until
from support.collector import TcpCollector, TlsCollector, UdpCollector
from support.daemon import our_totals, totals, truth_totals
from support.decoders import (
    ipfixdump_check,
    parse_collector,
    parse_messages,
    tshark_decode,
)
from support.switch import ExporterDaemon

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki():
    """A private CA (ovs-pki) with a certificate for the collector and
    one for the exporter: a dict of paths."""
    require("ovs-pki", "openvswitch-common")
    d = tempfile.mkdtemp(prefix="pki.", dir="/tmp")
    try:
        def run(*cmd):
            subprocess.run(cmd, cwd=d, check=True, capture_output=True,
                           timeout=120)

        run("ovs-pki", f"--dir={d}/pki", "init", "--force")
        run("ovs-pki", f"--dir={d}/pki", "req+sign", "collector", "switch")
        run("ovs-pki", f"--dir={d}/pki", "req+sign", "exporter", "switch")
        yield {
            "ca": f"{d}/pki/switchca/cacert.pem",
            "other_ca": f"{d}/pki/controllerca/cacert.pem",
            "collector_cert": f"{d}/collector-cert.pem",
            "collector_key": f"{d}/collector-privkey.pem",
            "exporter_cert": f"{d}/exporter-cert.pem",
            "exporter_key": f"{d}/exporter-privkey.pem",
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def exporter_args(pki, ca="ca"):
    return ["-p", pki["exporter_key"], "-c", pki["exporter_cert"],
            "-C", pki[ca]]


def pump(collectors, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() >= deadline:
            return False
        for c in collectors:
            c.receive(0.02)
    return True


def file_messages(path):
    try:
        with open(path, "rb") as f:
            return parse_messages(f.read())
    except FileNotFoundError:
        return []


def file_records(path):
    return [r for m in file_messages(path) for r in m.data_records]


def collector_lines(show):
    return [line.strip() for line in show.splitlines()
            if line.strip().startswith("collector ")]


def test_every_transport_delivers_exact_flows(ovsdb, pki, tmp_path):
    frames, truth = tr.traffic_mix(41)
    path = os.path.join(tmp_path, "flows.ipfix")
    plugin = ExporterDaemon(ovsdb, args=exporter_args(pki))
    udp, tcp = UdpCollector(), TcpCollector()
    tls = TlsCollector(pki["collector_cert"], pki["collector_key"],
                       cafile=pki["ca"])
    sockets = (udp, tcp, tls)
    try:
        plugin.start()
        targets = [udp.target, "tcp:" + tcp.target, "tls:" + tls.target,
                   "file:" + path]
        quoted = ",".join(f'"{t}"' for t in targets)
        ovsdb.vsctl(
            "add-br", "br0", "--", "--id=@i", "create", "IPFIX",
            f"targets=[{quoted}]", "sampling=1", "obs_domain_id=9",
            "obs_point_id=3", "cache_active_timeout=60",
            "cache_max_flows=10000", "--", "set", "Bridge", "br0",
            "ipfix=@i")
        assert pump(sockets, lambda: tcp.connections and tls.connections)
        plugin.replay(frames, "--bridge=br0")
        plugin.wait_counter("bridge br0", "sampled pkts", len(frames))
        plugin.appctl("ipfix/flush")
        assert pump(sockets, lambda: all(
            len(parse_collector(c).records) >= len(truth)
            for c in sockets)), plugin.appctl("ipfix/show")
        assert wait_until(lambda: len(file_records(path)) >= len(truth),
                          10, "the file's records") is None
        show = plugin.appctl("ipfix/show")
        lines = collector_lines(show)
        assert len(lines) == 4, show
        for spec, state in zip(targets[1:], ("connected", "connected",
                                             "open")):
            assert any(line.startswith(f"collector {spec}: {state}, ")
                       and "dropped 0 records" in line
                       for line in lines), show
        # ipfix/reopen: the renamed file is complete, a new one starts.
        os.rename(path, path + ".1")
        plugin.appctl("ipfix/reopen")
        wait_until(lambda: os.path.exists(path), 10, "a new file")
        # SIGHUP does the same.
        os.rename(path, path + ".2")
        plugin.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: os.path.exists(path), 10, "a new file")
        assert plugin.proc.poll() is None
        before = [len(c.datagrams) for c in sockets]
        plugin.stop()   # final statistics, then the connections close
        assert pump(sockets, lambda: tcp.open_connections == 0
                    and tls.open_connections == 0
                    and all(len(c.datagrams) > n
                            for c, n in zip(sockets, before)))
        log = plugin.log_text()
    finally:
        plugin.stop()
        for c in sockets:
            c.close()

    want = truth_totals(truth)
    for c in sockets:
        session = parse_collector(c)
        assert session.problems == [], c
        assert our_totals(session.records) == want, c
        assert session.options_records, c
    assert tcp.errors == [] and tls.errors == []
    assert tcp.connections == 1 and tls.connections == 1
    # TLS 1.2+, and the exporter presented its certificate.
    assert tls.versions[0] in ("TLSv1.2", "TLSv1.3")
    assert tls.peer_certs[0], "no client certificate"
    assert "exporter" in repr(tls.peer_certs[0])
    assert "TLSv1." in log

    # tshark over the TCP stream, ipfixDump over it saved as a file.
    pcap = os.path.join(tmp_path, "tcp.pcap")
    tcp.write_pcap(pcap)
    decoded = tshark_decode(pcap, tcp.port, transport="tcp")
    assert decoded.warnings == []
    assert totals(decoded.records) == want
    stream = os.path.join(tmp_path, "tcp.ipfix")
    tcp.write_ipfix_file(stream)
    ok, output = ipfixdump_check(stream)
    assert ok, output

    # The file: every flow in the first one; each later file begins
    # with the templates (sequence 0) and reads cleanly.
    assert our_totals(file_records(path + ".1")) == want
    for p in (path + ".1", path + ".2", path):
        ok, output = ipfixdump_check(p)
        assert ok, (p, output)
    for p in (path + ".2", path):
        msgs = file_messages(p)
        assert msgs[0].sequence == 0 and msgs[0].templates, p
        assert not file_records(p)
    assert file_messages(path)[-1].options_records


def test_tls_collector_the_ca_did_not_sign(ovsdb, pki, tmp_path):
    """The daemon trusts another CA: the handshake fails with the
    reason in the log and in ipfix/show; records wait in the buffer."""
    plugin = ExporterDaemon(ovsdb, args=exporter_args(pki, "other_ca"))
    tls = TlsCollector(pki["collector_cert"], pki["collector_key"],
                       cafile=pki["ca"])
    try:
        plugin.start()
        spec = "tls:" + tls.target
        ovsdb.vsctl(
            "add-br", "br0", "--", "--id=@i", "create", "IPFIX",
            f'targets="{spec}"', "sampling=1", "cache_active_timeout=60",
            "cache_max_flows=10000", "--", "set", "Bridge", "br0",
            "ipfix=@i")
        frames, truth = tr.traffic_mix(42, flows_per_kind=1)
        plugin.replay(frames, "--bridge=br0")
        plugin.wait_counter("bridge br0", "sampled pkts", len(frames))
        plugin.appctl("ipfix/flush")
        found = []

        def refused():
            tls.receive(0.05)
            found[:] = [plugin.appctl("ipfix/show")]
            return "certificate verify failed" in found[0]

        try:
            wait_until(refused, 20, "the failed handshake in ipfix/show")
        except TimeoutError:
            raise AssertionError(found[0] + plugin.log_text()) from None
        line = [x for x in collector_lines(found[0]) if spec in x][0]
        assert "not connected (cannot connect: TLS handshake failed: "\
            "certificate verify failed: " in line
        assert "buffered 0 msgs" not in line   # the flows wait
        assert tls.datagrams == []
        assert "certificate verify failed" in plugin.log_text()
    finally:
        plugin.stop()
        tls.close()
