"""``--metrics``: Prometheus text exposition, scraped with a real HTTP
client (urllib) while traffic flows, checked against ``ipfix/show``.

The daemon runs with ``--metrics=127.0.0.1:0`` (a free port; ipfix/show
prints the URL).  Counters scraped between two ``ipfix/show`` calls lie
between what the two printed; once the traffic stops, scrape and show
agree exactly.  The exposition is parsed with prometheus_client's own
parser, so a malformed line fails the test.  Harness in ``test_daemon``.
"""

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from support.daemon import Env, bridge_ipfix, flow_ipfix, sample, scrape
from traffic import traffic_mix

from ovs_ipfix_py import upcall
from ovs_ipfix_py.metrics import (
    LoopHistogram,
    MetricsAddressError,
    parse_address,
)


@pytest.fixture
def env(ovsdb):
    with Env(ovsdb) as e:
        yield e


def value(metrics, name, **labels):
    return metrics[name, frozenset(labels.items())]


BR0 = {"bridge": "br0", "kind": "bridge", "collector_set_id": ""}
SET7 = {"bridge": "br0", "kind": "flow", "collector_set_id": "7"}
#: metric name -> ipfix/show counter, per exporter.
SHOWN = {"ovs_ipfix_exporter_flows_total": "flows",
         "ovs_ipfix_exporter_sampled_packets_total": "pkts",
         "ovs_ipfix_exporter_ipv4_ok_total": "ipv4_ok",
         "ovs_ipfix_exporter_ipv6_ok_total": "ipv6_ok",
         "ovs_ipfix_exporter_packet_errors_total": "errs",
         "ovs_ipfix_exporter_ipv4_errors_total": "ipv4_errs",
         "ovs_ipfix_exporter_ipv6_errors_total": "ipv6_errs",
         "ovs_ipfix_exporter_tx_messages_total": "tx_pkts",
         "ovs_ipfix_exporter_tx_errors_total": "tx_errs"}
CHANNEL = {"ovs_ipfix_channel_datagrams_total": "datagrams",
           "ovs_ipfix_channel_upcalls_total": "upcalls",
           "ovs_ipfix_channel_malformed_datagrams_total":
           "malformed_datagrams",
           "ovs_ipfix_channel_malformed_upcalls_total": "malformed_upcalls"}


def pairs(show, metrics):
    """(what show printed, what was scraped) for every shared counter."""
    out = {}
    for key, labels in ((("br0", None), BR0), (("br0", 7), SET7)):
        for name, counter in SHOWN.items():
            out[name, key] = (show.exporters[key][counter],
                              value(metrics, name, **labels))
        out["cache", key] = (show.exporters[key]["cache"], value(
            metrics, "ovs_ipfix_exporter_cache_flows", **labels))
    for name, counter in CHANNEL.items():
        out[name] = (show.channel[counter], value(metrics, name))
    out["no_exporter"] = (show.channel["no_exporter"], value(
        metrics, "ovs_ipfix_samples_dropped_total", bridge="", kind="",
        collector_set_id="", reason="no_exporter"))
    return out


class Feeder(threading.Thread):
    """Sends datagrams of bridge and flow samples (and one malformed
    datagram and one sample for a bridge nobody exports, every round)
    until stopped; blocking sends: nothing is lost."""

    def __init__(self, exporter, frames):
        super().__init__(daemon=True)
        self.exporter = exporter
        self.stop = threading.Event()
        self.rounds = 0
        self.error = None
        bridge = [sample(f) for f in frames]
        flow = [upcall.FlowSample("br0", 7, 5, 6, 65535,
                                  upcall.DIRECTION_INGRESS, 1, None, f,
                                  len(f))
                for f in frames[:50]]
        self.datagrams = [upcall.encode(bridge[i:i + 40])
                          for i in range(0, len(bridge), 40)]
        self.datagrams.append(upcall.encode(flow))
        self.datagrams.append(upcall.encode([sample(frames[0], "nobr")]))
        self.datagrams.append(b"garbage" * 3)

    def run(self):
        try:
            while not self.stop.is_set():
                for d in self.datagrams:
                    self.exporter.send(d)
                self.rounds += 1
                time.sleep(0.005)
        except Exception as e:  # reported by the test
            self.error = e


def test_metrics_match_ipfix_show_while_traffic_flows(env):
    collector = env.collector()
    bridge_ipfix(env.ovsdb, "br0", collector, sampling=1,
                 cache_active_timeout=1)
    flow_ipfix(env.ovsdb, "br0", 7, collector, cache_active_timeout=1)
    exporter = env.exporter(args=["--metrics=127.0.0.1:0"])
    show = exporter.wait_show(
        lambda s: {("br0", None), ("br0", 7)} <= set(s.exporters),
        "both exporters")
    url = show.metrics
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    port = int(url.split(":")[2].split("/")[0])
    assert port != 0

    frames, _ = traffic_mix(seed=5)
    feeder = Feeder(exporter, frames)
    feeder.start()
    try:
        scrapes = exported = 0
        deadline = time.monotonic() + 60
        # At least 5 sandwiches, the last after an active-timeout export
        # (tx messages and records counted) while samples still flow.
        while scrapes < 5 or not exported:
            assert time.monotonic() < deadline, "no export in 60 s"
            before = exporter.show()
            metrics = scrape(url)
            after = exporter.show()
            for name, (low, got) in pairs(before, metrics).items():
                high = pairs(after, metrics)[name][0]
                if name[0] == "cache":
                    continue   # a gauge: not monotonic
                assert low <= got <= high, (name, low, got, high)
            scrapes += 1
            exported = before.exporters[("br0", None)]["tx_pkts"]
            time.sleep(0.2)
        assert feeder.rounds > 1 and feeder.error is None
    finally:
        feeder.stop.set()
        feeder.join(10)
    assert feeder.error is None, feeder.error

    # Traffic stopped: once the channel has read everything and the
    # caches have emptied (active timeout 1 s), both views agree exactly.
    sent = feeder.rounds * (len(feeder.datagrams))
    exporter.wait_show(lambda s: s.channel["datagrams"] >= sent and not any(
        e["cache"] for e in s.exporters.values()), f"{sent} datagrams")
    show = exporter.show()
    metrics = scrape(url)
    for name, (shown, got) in pairs(show, metrics).items():
        assert shown == got, (name, shown, got)
    assert show.channel["malformed_datagrams"] == feeder.rounds
    assert show.channel["no_exporter"] == feeder.rounds
    assert value(metrics, "ovs_ipfix_exporter_records_total", **BR0) > 0
    # Per collector: one target, so its messages are the exporter's.
    target = {"target": collector.target, "transport": "udp"}
    for labels in (BR0, SET7):
        assert value(metrics, "ovs_ipfix_collector_tx_messages_total",
                     **labels, **target) == value(
            metrics, "ovs_ipfix_exporter_tx_messages_total", **labels)
        assert value(metrics, "ovs_ipfix_collector_tx_errors_total",
                     **labels, **target) == 0
        assert value(metrics, "ovs_ipfix_exporter_cache_max_flows",
                     **labels) == 10000
    assert value(metrics, "ovs_ipfix_ovsdb_connected") == 1
    assert value(metrics, "ovs_ipfix_exporters") == 2
    assert value(metrics, "ovs_ipfix_info", version=metrics_version(
        metrics), fast_path=show.fast_path) == 1
    # The loop histogram counted every iteration so far, in order.
    iterations = value(metrics, "ovs_ipfix_loop_iteration_seconds_count")
    assert iterations >= show.loop["iterations"] > 0
    assert value(metrics, "ovs_ipfix_loop_iteration_seconds_bucket",
                 le="+Inf") == iterations
    assert value(metrics, "ovs_ipfix_loop_read_gap_seconds_count") > 0
    # What the collector received is what both exporters say they sent.
    sent = sum(value(metrics, "ovs_ipfix_exporter_tx_messages_total", **lb)
               for lb in (BR0, SET7))
    assert collector.wait_for(lambda d: len(d) >= sent)
    assert len(collector.datagrams) == sent

    # ovsdb-server killed: the connection state follows.
    env.ovsdb.stop()
    deadline = time.monotonic() + 20
    while value(scrape(url), "ovs_ipfix_ovsdb_connected") != 0:
        assert time.monotonic() < deadline, "still connected"
        time.sleep(0.1)


def metrics_version(metrics):
    (version,) = [dict(k[1])["version"] for k in metrics
                  if k[0] == "ovs_ipfix_info"]
    return version


def test_metrics_http_edges(env):
    """404 off /metrics, 405 for POST, 400 for garbage, HEAD without a
    body; a client that connects and says nothing does not hold up the
    next scrape (the loop never blocks on it)."""
    exporter = env.exporter(args=["--metrics=127.0.0.1:0"])
    url = exporter.show().metrics
    host, port = url[len("http://"):].split("/")[0].split(":")
    base = url[:-len("/metrics")]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, data=b"x=1", timeout=10)
    assert e.value.code == 405
    silent = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        raw = socket.create_connection((host, int(port)))
        raw.sendall(b"\x00\x01garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.0 400 ")
        raw.close()
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.read() == b""
        t0 = time.monotonic()
        metrics = scrape(url)
        assert time.monotonic() - t0 < 5
        assert value(metrics, "ovs_ipfix_exporters") == 0
    finally:
        for s in silent:
            s.close()
    assert exporter.alive()


def test_metrics_off_by_default_and_bad_address(env, shorttmp):
    exporter = env.exporter()
    assert exporter.show().metrics is None
    result = subprocess.run(
        ["ovs-ipfix-exporter", "--db=" + env.ovsdb.remote,
         "--channel=%s/c.sock" % shorttmp, "--metrics=1.2.3.4:99999"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "--metrics" in result.stderr


@pytest.mark.parametrize("text, want", [
    ("9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9100", ("::1", 9100)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "x", "::1:80", "1.2.3.4:65536",
                                  "1.2.3.4:-1", "[::1]"])
def test_parse_address_refuses(text):
    with pytest.raises(MetricsAddressError):
        parse_address(text)


def test_loop_histogram_buckets():
    h = LoopHistogram((0.01, 0.1))
    for s in (0.001, 0.01, 0.05, 0.2, 3.0):
        h.observe(s)
    assert h.buckets() == [("0.01", 2), ("0.1", 3), ("+Inf", 5)]
    assert h.count == 5 and h.max == 3.0
    assert h.over(0.1) == 2 and h.over(0.01) == 3
    assert abs(h.sum - 3.261) < 1e-9
