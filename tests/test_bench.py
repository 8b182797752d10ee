"""Smoke test of tools/bench: ``--quick`` runs every part at small sizes
and prints every row of the table.  It checks the output's shape and
that the end-to-end run delivered every record; it asserts nothing
about speed (figures are the benchmark's business, not a test's)."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench")

#: Every row of the table, in order.
ROWS = (["1.%d" % i for i in range(1, 23)]
        + ["2.%d" % i for i in range(1, 6)]
        + ["3.1", "3.2", "3.3", "4.1", "4.2"])
#: Rows that carry a target from issues 2, 5 and 11.
TARGETED = {"1.4", "1.6", "1.13", "1.16", "1.19", "1.22", "3.2", "3.3"}
ROW = re.compile(r"^(\d\.\d+) +(\S.*)$")
NUMBER = r"-?[0-9][0-9,]*(\.[0-9]+)?"


@pytest.fixture
def tmpdir_short():
    """A short directory of the run's own, given as TMPDIR: the bench's
    sockets, pcap and ovsdb-server live in it."""
    d = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(
                    errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(pid), cmdline))
    return found


def test_quick_run_prints_every_row(tmpdir_short):
    if shutil.which("softflowd") is None and not os.path.exists(
            "/usr/sbin/softflowd"):
        pytest.fail("softflowd is not installed: run tools/install-deps")
    env = dict(os.environ, TMPDIR=tmpdir_short)
    proc = subprocess.run([BENCH, "--quick"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ovs-ipfix-py benchmark (--quick)"
    assert re.search(r"UTC; \d+ cores .*CPU .*; Python 3\.", lines[1])

    rows = {}
    order = []
    for i, line in enumerate(lines):
        m = ROW.match(line)
        if not m:
            continue
        fields = re.split(r" {2,}", m.group(2).strip())
        assert len(fields) == 4, line  # figure, value, target, met
        order.append(m.group(1))
        rest = lines[i + 1:i + 3]
        rows[m.group(1)] = (fields, rest)
    assert order == ROWS

    for rid, ((figure, value, target, met), rest) in rows.items():
        assert figure, rid
        # Each row ends with the command that produced it.
        assert any(r.startswith("      $ ") for r in rest), (rid, rest)
        if rid == "3.1":
            assert re.fullmatch(NUMBER + " / " + NUMBER, value), value
        else:
            assert re.fullmatch(NUMBER, value), (rid, value)
        if rid in TARGETED:
            assert re.match(r"^(>=|<=) ", target), (rid, target)
            assert met == "not judged (--quick)", (rid, met)
        else:
            assert (target, met) == ("-", "-"), rid

    # The end-to-end run delivered every flow, ours and softflowd's.
    text = proc.stdout
    assert "2,000 of 2,000 records received" in text
    assert re.search(r"\n      \(2,000 records received; ", text)
    # Everything the bench started is gone, its files removed.
    assert _processes_mentioning(tmpdir_short) == []
    assert os.listdir(tmpdir_short) == []
