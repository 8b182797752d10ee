"""Open vSwitch and the plugin side by side, for the end-to-end and
differential tests: ``ExporterDaemon`` (ovs-ipfix-exporter on a
server's database, with its replay and its UDP source ports),
``Switch`` (a real ``ovs-vswitchd --enable-dummy`` fed through
``netdev-dummy/receive``), ``Pair`` and its ``pair`` fixture (both on
one ovsdb-server, one collector for both), ``parse_counters`` (the
counters ``ovs-ofctl dump-ipfix-*`` and ``ipfix/show`` print) and
``udp_ports_of`` (a process's UDP source ports, from /proc).
"""

import os
import re
import signal
import subprocess

import pytest

from ovs_ipfix_py.pcap import write_pcap

from . import wait_until
from .collector import UdpCollector

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
