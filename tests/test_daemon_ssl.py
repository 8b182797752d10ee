"""The daemon reads OVSDB over an ssl: remote (ovs-pki certificates).

A private ovsdb-server listens on pssl: with a certificate signed by a
private CA made with ``ovs-pki``; the daemon connects with ``-p/-c/-C``
and builds the bridge exporter configured with ovs-vsctl (over the
server's unix socket).  Without the SSL options it refuses to start.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from support import kill_pid, read_pidfile, require, wait_until

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def exporter_cmd():
    here = os.path.join(os.path.dirname(sys.executable), "ovs-ipfix-exporter")
    return here if os.path.exists(here) else shutil.which("ovs-ipfix-exporter")


@pytest.fixture
def ssl_server():
    require("ovs-pki", "openvswitch-common")
    require("ovsdb-server", "openvswitch-switch")
    d = tempfile.mkdtemp(prefix="ssl.", dir="/tmp")
    pidfile = os.path.join(d, "ovsdb.pid")
    server = None
    try:
        def run(*cmd):
            subprocess.run(cmd, cwd=d, check=True, capture_output=True,
                           timeout=60)

        run("ovs-pki", "--dir=%s/pki" % d, "init", "--force")
        run("ovs-pki", "--dir=%s/pki" % d, "req+sign", "srv", "switch")
        run("ovs-pki", "--dir=%s/pki" % d, "req+sign", "cli", "switch")
        run("ovsdb-tool", "create", "conf.db", SCHEMA)
        # A child, not --detach: a detached daemon is reparented and
        # may linger as a zombie.
        server = subprocess.Popen(
            ["ovsdb-server", "--remote=punix:%s/db.sock" % d,
             "--remote=pssl:0:127.0.0.1",
             "--private-key=%s/srv-privkey.pem" % d,
             "--certificate=%s/srv-cert.pem" % d,
             "--ca-cert=%s/pki/switchca/cacert.pem" % d,
             "--pidfile=%s" % pidfile, "--no-chdir",
             "--log-file=%s/ovsdb.log" % d, "--unixctl=%s/ovsdb.ctl" % d,
             "conf.db"], cwd=d, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        port = []

        def listening():
            try:
                with open(os.path.join(d, "ovsdb.log")) as f:
                    m = re.search(r"listening on port (\d+)", f.read())
            except FileNotFoundError:   # not started yet
                return False
            if m:
                port.append(int(m.group(1)))
            return bool(m)

        wait_until(listening, 10, "ovsdb-server's pssl port")
        vsctl = ["ovs-vsctl", "--db=unix:%s/db.sock" % d, "--no-wait",
                 "--timeout=10"]
        run(*vsctl, "init")
        run(*vsctl, "add-br", "br0", "--", "--id=@i", "create", "IPFIX",
            'targets="127.0.0.1:4739"', "--", "set", "Bridge", "br0",
            "ipfix=@i")
        yield d, port[0]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        pid = read_pidfile(pidfile)
        if pid:
            kill_pid(pid, signal.SIGTERM, 10)
        shutil.rmtree(d, ignore_errors=True)


def test_ssl_remote(ssl_server):
    d, port = ssl_server
    ctl = os.path.join(d, "exporter.ctl")
    proc = subprocess.Popen(
        [exporter_cmd(), "--db=ssl:127.0.0.1:%d" % port,
         "-p", os.path.join(d, "cli-privkey.pem"),
         "-c", os.path.join(d, "cli-cert.pem"),
         "-C", os.path.join(d, "pki/switchca/cacert.pem"),
         "--channel=%s/channel.sock" % d, "--unixctl=%s" % ctl,
         "--log-file=%s/exporter.log" % d, "-vconsole:off"])
    try:
        def shown():
            if not os.path.exists(ctl):
                return ""
            r = subprocess.run(["ovs-appctl", "-t", ctl, "ipfix/show"],
                               capture_output=True, text=True, timeout=10)
            return r.stdout

        wait_until(lambda: "bridge br0:" in shown(), 15,
                   "the exporter built from the ssl: remote")
        assert "ovsdb: connected" in shown()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_ssl_remote_needs_the_ssl_options(ssl_server):
    d, port = ssl_server
    r = subprocess.run([exporter_cmd(), "--db=ssl:127.0.0.1:%d" % port,
                        "--channel=%s/c.sock" % d, "-vconsole:off"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert "needs --private-key, --certificate, --ca-cert" in r.stderr
