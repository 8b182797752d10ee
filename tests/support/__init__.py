"""Test support: real ovsdb-server, loopback collectors, real decoders.

- ``ovsdb``: a private ovsdb-server (and optionally ovs-vswitchd on the
  dummy datapath) in a short temp dir.
- ``collector``: IPFIX collectors on loopback (UDP and TCP) that keep
  every message with its arrival time and write pcap / RFC 5655 files.
- ``decoders``: our own small IPFIX parser plus wrappers around the
  independent judges (tshark, nfcapd/nfdump, nfacctd, ipfixDump).
- ``pcapfile``: payloads -> libpcap file of Ethernet/IP/UDP frames.
- ``inputs``: exporter options and the hypothesis strategies for frames
  and upcalls that several test modules share.

Missing system tools are errors, never skips: the message names the
Debian package and the command that installs everything.

This module holds the small process helpers they share.
"""

import os
import shutil
import signal
import socket
import time

#: The one command that installs every tool the tests need.
INSTALL_COMMAND = "tools/install-deps"


class MissingTool(RuntimeError):
    """A system tool the tests need is not installed."""


def require(tool, package):
    """Return the path of ``tool``, or raise MissingTool naming
    the Debian ``package`` that ships it."""
    path = shutil.which(tool)
    if path is None:
        for directory in ("/usr/sbin", "/sbin"):
            candidate = os.path.join(directory, tool)
            if os.access(candidate, os.X_OK):
                return candidate
        raise MissingTool(
            f"{tool} is not installed: it comes with the Debian package "
            f"{package}. Install every test dependency with: "
            f"{INSTALL_COMMAND}")
    return path


def pid_alive(pid):
    """True if process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself
    # contain spaces or parentheses.
    state = stat[stat.rindex(")") + 2:].split()[0]
    return state not in ("Z", "X")


def read_pidfile(path):
    """The pid in ``path``, or None if the file is absent or empty."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def wait_gone(pid, timeout=5.0):
    """Wait up to ``timeout`` s for ``pid`` to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def kill_pid(pid, sig=signal.SIGTERM, timeout=5.0):
    """Send ``sig`` to ``pid``; SIGKILL it if still alive after
    ``timeout`` s.  Returns once the process is gone (or reaped as a
    zombie by nobody: zombies count as gone)."""
    if pid is None or not pid_alive(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not wait_gone(pid, timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(pid, 5.0)


def descendant_pids(pid):
    """Children of ``pid``, their children and so on (Linux /proc);
    [] if none or gone."""
    found = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


def free_port(family=socket.AF_INET, kind=socket.SOCK_DGRAM):
    """A loopback port that was free a moment ago (for tools that need
    a port number on their command line)."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def udp_port_bound(port, family=socket.AF_INET):
    """True if some socket is bound to UDP ``port`` (/proc/net/udp*)."""
    name = "/proc/net/udp" if family == socket.AF_INET else "/proc/net/udp6"
    with open(name) as f:
        next(f)
        for line in f:
            local = line.split()[1]
            if int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_until(predicate, timeout, what):
    """Poll ``predicate()`` every 5 ms; raise TimeoutError naming
    ``what`` if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.005)
