"""A private ovsdb-server (and optionally ovs-vswitchd) for tests.

Everything lives in one short directory under /tmp (unix socket paths
must stay under 108 bytes): the database ``conf.db``, the socket
``db.sock``, pid files, logs and unixctl sockets.  Children run with
OVS_RUNDIR/OVS_LOGDIR/OVS_DBDIR/OVS_SYSCONFDIR pointing there, so
nothing touches the system's Open vSwitch.  ovs-vswitchd runs on the
dummy datapath (no kernel module), as OVS's own test suite does.

The daemons run as children of the test process (not --detach) so
that they are reaped when stopped; they are stopped by pid, never by
name.
"""

import json
import os
import shutil
import signal
import socket
import subprocess

from . import kill_pid, pid_alive, read_pidfile, require, wait_until

DEFAULT_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
_PACKAGE = "openvswitch-switch"
_UNIX_PATH_MAX = 107


class OvsError(RuntimeError):
    """An OVS command failed; the message carries its output."""


class OvsdbServer:
    """One ovsdb-server on ``<workdir>/db.sock`` serving a fresh
    Open_vSwitch database created from ``schema``.

    ``start()`` creates the database on first use, starts the server and
    runs ``ovs-vsctl init``; ``restart()`` kills it with SIGKILL (by pid)
    and starts it again on the same database and socket; ``stop()``
    stops ovs-vswitchd (if started) and the server, by pid file, and is
    safe to call any number of times.
    """

    def __init__(self, workdir, schema=DEFAULT_SCHEMA):
        self.workdir = os.path.abspath(workdir)
        self.schema = schema
        self.db_path = os.path.join(self.workdir, "conf.db")
        self.sock_path = os.path.join(self.workdir, "db.sock")
        if len(self.sock_path) > _UNIX_PATH_MAX:
            raise ValueError(
                f"socket path too long for AF_UNIX: {self.sock_path}")
        self.pidfile = os.path.join(self.workdir, "ovsdb-server.pid")
        self.logfile = os.path.join(self.workdir, "ovsdb-server.log")
        self.vswitchd_pidfile = os.path.join(self.workdir,
                                             "ovs-vswitchd.pid")
        self.vswitchd_logfile = os.path.join(self.workdir,
                                             "ovs-vswitchd.log")
        self.env = dict(os.environ)
        for name in ("OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR",
                     "OVS_SYSCONFDIR"):
            self.env[name] = self.workdir
        self.pid = None
        self.vswitchd_pid = None
        self._procs = {}  # daemon name -> Popen

    @property
    def remote(self):
        """The OVSDB remote clients connect to: ``unix:<sock_path>``."""
        return "unix:" + self.sock_path

    # -- processes ---------------------------------------------------

    def _run(self, argv, check=True, timeout=30):
        result = subprocess.run(argv, env=self.env, cwd=self.workdir,
                                stdin=subprocess.DEVNULL,
                                capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise OvsError(f"{' '.join(argv)} exited with "
                           f"{result.returncode}:\n{result.stdout}"
                           f"{result.stderr}")
        return result

    def _spawn(self, name, argv):
        """Start daemon ``name`` as our own child (not --detach: a
        detached daemon is re-parented to init, which may never reap
        it), its stderr in ``<workdir>/<name>.stderr``."""
        with open(os.path.join(self.workdir, name + ".stderr"), "ab") as err:
            proc = subprocess.Popen(argv, env=self.env, cwd=self.workdir,
                                    stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err)
        self._procs[name] = proc
        return proc

    def _wait_ready(self, name, sock_path):
        """Wait until ``sock_path`` accepts connections; OvsError with
        the daemon's log if it exits first."""
        proc = self._procs[name]

        def ready():
            if proc.poll() is not None:
                return True
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(sock_path)
                except OSError:
                    return False
            return True

        wait_until(ready, 10.0, f"{name} to listen on {sock_path}")
        if proc.poll() is not None:
            raise OvsError(f"{name} exited with {proc.returncode}:\n"
                           f"{self._tail(name)}")

    def _tail(self, name):
        text = ""
        for suffix in (".stderr", ".log"):
            path = os.path.join(self.workdir, name + suffix)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()[-4000:]
        return text

    def _kill(self, name, sig, timeout=5.0):
        """Stop daemon ``name``: its Popen if we started it, else the
        pid in its pid file."""
        proc = self._procs.pop(name, None)
        if proc is None:
            kill_pid(read_pidfile(os.path.join(self.workdir,
                                               name + ".pid")), sig)
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start(self):
        """Start the server (creating and initialising the database the
        first time); returns once it accepts connections.  Returns self.
        """
        server = require("ovsdb-server", _PACKAGE)
        os.makedirs(self.workdir, exist_ok=True)
        first = not os.path.exists(self.db_path)
        if first:
            if not os.path.exists(self.schema):
                raise OvsError(
                    f"schema {self.schema} not found: install "
                    "openvswitch-common (tools/install-deps)")
            self._run([require("ovsdb-tool", "openvswitch-common"),
                       "create", self.db_path, self.schema])
        proc = self._spawn("ovsdb-server", [
            server, "--remote=punix:" + self.sock_path,
            "--pidfile=" + self.pidfile, "--no-chdir",
            "--log-file=" + self.logfile, "-vconsole:off",
            "--unixctl=" + self.ctl_path("ovsdb-server"), self.db_path])
        self.pid = proc.pid
        self._wait_ready("ovsdb-server", self.sock_path)
        if first:
            self.vsctl("init")
        return self

    def restart(self):
        """Kill the server with SIGKILL (by pid) and start it again on
        the same database and socket.  Returns self."""
        self._kill("ovsdb-server", signal.SIGKILL)
        self.pid = None
        return self.start()

    def stop(self):
        """Stop ovs-vswitchd (if any) then the server; idempotent."""
        self._kill("ovs-vswitchd", signal.SIGTERM)
        self.vswitchd_pid = None
        self._kill("ovsdb-server", signal.SIGTERM)
        self.pid = None

    def pids(self):
        """Pids of the processes this object started and still runs."""
        return [p for p in (self.pid, self.vswitchd_pid)
                if p is not None and pid_alive(p)]

    def cleanup(self):
        """stop(), then remove the working directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- commands ----------------------------------------------------

    def ctl_path(self, target):
        """The unixctl socket of daemon ``target`` in the workdir."""
        return os.path.join(self.workdir, target + ".ctl")

    def vsctl(self, *args, check=True, wait=False):
        """Run ``ovs-vsctl --db=<remote> --timeout=10 [--no-wait] ARGS``
        and return its stdout.  ``wait=True`` drops ``--no-wait`` so the
        call returns once ovs-vswitchd applied the change (only useful
        with run_vswitchd()).  Raises OvsError on failure if ``check``.
        """
        argv = [require("ovs-vsctl", "openvswitch-common"),
                "--db=" + self.remote, "--timeout=10"]
        if not wait:
            argv.append("--no-wait")
        return self._run(argv + [str(a) for a in args], check).stdout

    def appctl(self, target, *args, check=True):
        """Run ``ovs-appctl -t <workdir>/<target>.ctl ARGS``; stdout."""
        argv = [require("ovs-appctl", "openvswitch-common"),
                "-t", self.ctl_path(target), "--timeout=10"]
        return self._run(argv + [str(a) for a in args], check).stdout

    def run_vswitchd(self):
        """Start ovs-vswitchd on this database with the dummy datapath
        (no kernel module); returns its pid once its unixctl socket
        answers.  stop() stops it.  Use vsctl(..., wait=True) to wait
        until it applied a change."""
        vswitchd = require("ovs-vswitchd", _PACKAGE)
        proc = self._spawn("ovs-vswitchd", [
            vswitchd, "--enable-dummy", "--disable-system",
            "--disable-system-route", "--no-chdir",
            "--pidfile=" + self.vswitchd_pidfile,
            "--log-file=" + self.vswitchd_logfile, "-vconsole:off",
            "--unixctl=" + self.ctl_path("ovs-vswitchd"), self.remote])
        self.vswitchd_pid = proc.pid
        self._wait_ready("ovs-vswitchd", self.ctl_path("ovs-vswitchd"))
        return self.vswitchd_pid


def transact(server, *ops):
    """ovsdb-client transact on the Open_vSwitch db: for columns that
    Debian's ovs-vsctl does not know."""
    request = json.dumps(["Open_vSwitch", *ops])
    result = subprocess.run(["ovsdb-client", "transact", server.remote,
                             request], capture_output=True, text=True,
                            timeout=10, check=True)
    reply = json.loads(result.stdout)
    assert not any("error" in r for r in reply if r), reply
    return reply


def newer_schema(path, loose_sampling=False):
    """Debian's schema plus the columns of newer OVS releases: IPFIX
    template_interval / stats_interval (1..3600 s) and
    Flow_Sample_Collector_Set local_group_id.  ``loose_sampling`` drops
    the sampling column's lower bound, as a modified schema might."""
    with open(DEFAULT_SCHEMA) as f:
        schema = json.load(f)
    schema["version"] = "8.9.0"
    schema.pop("cksum", None)
    interval = {"type": {"key": {"type": "integer", "minInteger": 1,
                                 "maxInteger": 3600},
                         "min": 0, "max": 1}}
    ipfix = schema["tables"]["IPFIX"]["columns"]
    ipfix["template_interval"] = interval
    ipfix["stats_interval"] = interval
    if loose_sampling:
        ipfix["sampling"] = {"type": {"key": "integer",
                                      "min": 0, "max": 1}}
    schema["tables"]["Flow_Sample_Collector_Set"]["columns"][
        "local_group_id"] = {"type": {"key": {"type": "integer",
                                               "minInteger": 0,
                                               "maxInteger": 4294967295},
                                      "min": 0, "max": 1}}
    with open(path, "w") as f:
        json.dump(schema, f)
    return str(path)
