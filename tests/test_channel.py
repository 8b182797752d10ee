"""The channel: schemas/channel.md against ovs_ipfix_py/upcall.py (the
document is the contract, so every table and example in it must match the
code), then the ChannelServer on real Unix sockets."""

import os
import re
import socket
import stat
import subprocess
import sys
import time

import ovs.poller
import pytest

from ovs_ipfix_py import upcall
from ovs_ipfix_py.channel import ChannelError, ChannelServer, RateLimiter

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "schemas",
                   "channel.md")


@pytest.fixture(scope="module")
def doc():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def section(text, title):
    """The text under '## title' up to the next '## ' heading."""
    m = re.search(r"^## %s\n(.*?)(?=^## |\Z)" % re.escape(title), text,
                  re.M | re.S)
    assert m, f"no section {title!r} in channel.md"
    return m.group(1)


def table(text):
    """Rows of the first markdown table in text, as lists of cells."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    assert len(rows) >= 3, "no table"
    assert set("".join(rows[1])) <= set("-: "), "no header separator"
    return rows[0], rows[2:]


def test_constants_match(doc):
    header, rows = table(section(doc, "Constants"))
    assert header == ["name", "value"]
    seen = set()
    for name, value in rows:
        value = value.strip("`")
        expected = getattr(upcall, name)
        if isinstance(expected, str):
            assert value == expected, name
        else:
            assert int(value, 0) == expected, name
        seen.add(name)
    assert {"MAGIC", "VERSION", "HEADER_FORMAT", "UPCALL_HEADER_FORMAT",
            "ATTR_HEADER_FORMAT", "MAX_DATAGRAM_SIZE"} <= seen
    assert upcall.HEADER.format == upcall.HEADER_FORMAT
    assert upcall.UPCALL_HEADER.format == upcall.UPCALL_HEADER_FORMAT
    assert upcall.ATTR_HEADER.format == upcall.ATTR_HEADER_FORMAT
    assert upcall.MAGIC.to_bytes(4, "big") == b"OIPX"


def test_header_tables_match_struct_formats(doc):
    fmt_size = {"u8": "B", "u16": "H", "u32": "I"}
    for title, fmt in (("Datagram header", upcall.HEADER_FORMAT),
                       ("Upcall header", upcall.UPCALL_HEADER_FORMAT)):
        text = doc[doc.index(title + " ("):]
        header, rows = table(text)
        assert header[:3] == ["offset", "field", "format"]
        assert "!" + "".join(fmt_size[r[2]] for r in rows) == fmt, title
        offset = 0
        for r in rows:
            assert int(r[0]) == offset, (title, r)
            offset += {"u8": 1, "u16": 2, "u32": 4}[r[2]]


def test_kinds_match(doc):
    header, rows = table(section(doc, "Upcall kinds"))
    assert header == ["kind", "name", "Python type"]
    kinds = {int(k): (name, cls) for k, name, cls in rows}
    assert kinds == {
        upcall.KIND_BRIDGE_SAMPLE: ("KIND_BRIDGE_SAMPLE", "BridgeSample"),
        upcall.KIND_FLOW_SAMPLE: ("KIND_FLOW_SAMPLE", "FlowSample"),
    }
    for k, (name, cls) in kinds.items():
        assert getattr(upcall, name) == k
        assert upcall._CLASS[k] is getattr(upcall, cls)


def test_formats_match(doc):
    header, rows = table(section(doc, "Value formats"))
    assert header == ["format", "bytes", "meaning"]
    assert [r[0] for r in rows] == list(upcall.FORMATS)
    for fmt, size, _ in rows:
        st = upcall.FORMATS[fmt]
        if size == "any":
            assert st is None, fmt
        else:
            assert st.size == int(size), fmt


def test_attribute_table_matches(doc):
    header, rows = table(section(doc, "Attributes"))
    assert header[:5] == ["type", "name", "format", "bridge", "flow"]
    documented = [(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]
    assert documented == [tuple(a) for a in upcall.ATTRIBUTES]
    for t, name, *_ in documented:
        assert getattr(upcall, "A_" + name) == t


def test_tunnel_table_matches(doc):
    header, rows = table(section(doc, "Tunnel attributes"))
    assert header[:4] == ["type", "name", "format", "presence"]
    documented = [(int(r[0]), r[1], r[2], r[3]) for r in rows]
    assert documented == [tuple(a) for a in upcall.TUNNEL_ATTRIBUTES]
    types = re.findall(r"(\d+) ([A-Za-z-]+)", rows[-1][4])
    assert {int(n): name.lower() for n, name in types} == \
        upcall.TUNNEL_TYPES


def test_decoder_tables_follow_attribute_table():
    """The decoder's compiled tables come from ATTRIBUTES: a kind knows
    exactly its attributes, with the documented value sizes."""
    for kind, column in ((upcall.KIND_BRIDGE_SAMPLE, "bridge"),
                         (upcall.KIND_FLOW_SAMPLE, "flow")):
        table_ = upcall._TABLES[kind]
        specs = [a for a in upcall.ATTRIBUTES
                 if getattr(a, column) != "-"]
        assert sorted(table_) == sorted(a.type for a in specs)
        required = {name for _, name in upcall._REQUIRED[kind]}
        assert required == {a.name for a in specs
                            if getattr(a, column) == "required"}


def examples(text):
    blocks = re.findall(r"```(python|hex)\n(.*?)```", section(text,
                                                              "Examples"),
                        re.S)
    pairs = []
    for (k1, code), (k2, hexdump) in zip(blocks[::2], blocks[1::2]):
        assert (k1, k2) == ("python", "hex")
        pairs.append((code, bytes.fromhex(hexdump.replace("\n", " "))))
    assert pairs
    return pairs


def test_examples_encode_and_decode(doc):
    namespace = {k: getattr(upcall, k) for k in dir(upcall)
                 if not k.startswith("_")}
    for code, datagram in examples(doc):
        upcalls = eval(code, namespace)  # noqa: S307 - our own document
        assert upcall.encode(upcalls) == datagram
        assert upcall.decode(datagram) == (upcalls, 0)
        # Header fields as the layout tables say.
        magic, version, flags, count, length = upcall.HEADER.unpack_from(
            datagram)
        assert (magic, version, flags) == (upcall.MAGIC, upcall.VERSION, 0)
        assert (count, length) == (len(upcalls), len(datagram))


# ------------------------------------------------ the ChannelServer socket

def _bridge(i, frame=b"\x00" * 60):
    return upcall.BridgeSample("br0", i, None, 1, frame, len(frame))


@pytest.fixture
def sockdir(shorttmp):
    return shorttmp


@pytest.fixture
def server_factory(sockdir):
    servers = []

    def make(handler=None, max_batch=256, name="ch.sock", budget=0.04):
        got = []
        if handler is None:
            def handler(upcalls, now):
                got.append((upcalls, now))
        s = ChannelServer(os.path.join(sockdir, name), handler,
                          max_batch=max_batch, budget=budget)
        s.got = got
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            s.close()


@pytest.fixture
def client():
    socks = []

    def make():
        c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        socks.append(c)
        return c

    try:
        yield make
    finally:
        for c in socks:
            c.close()


def drain(server, expected, timeout=5.0):
    """Poll and run the server until ``expected`` upcalls arrived."""
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < expected and time.monotonic() < deadline:
        poller = ovs.poller.Poller()
        server.wait(poller)
        poller.timer_wait(100)
        poller.block()
        before = len(server.got)
        server.run()
        for ups, _ in server.got[before:]:
            out += ups
    return out


def test_socket_is_a_0660_dgram_socket_removed_on_close(server_factory):
    s = server_factory()
    st = os.lstat(s.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    sock = socket.socket(fileno=os.dup(s.fileno()))
    try:
        assert sock.type == socket.SOCK_DGRAM
        assert not os.get_blocking(sock.fileno())
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= \
            200_000
    finally:
        sock.close()
    s.close()
    assert not os.path.exists(s.path)
    s.close()  # idempotent
    assert s.run() == 0


def test_stale_socket_replaced_live_one_and_files_refused(sockdir,
                                                          server_factory):
    path = os.path.join(sockdir, "ch.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody bound
    s = server_factory()
    assert s.path == path
    with pytest.raises(ChannelError, match="in use by another"):
        ChannelServer(path, lambda u, n: None)
    assert os.path.exists(path)  # the live one is untouched
    s.close()
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ChannelError, match="is not a socket"):
        ChannelServer(path, lambda u, n: None)
    with open(path) as f:
        assert f.read() == "precious"
    with pytest.raises(ChannelError, match="cannot bind"):
        ChannelServer(os.path.join(sockdir, "no", "such", "dir"),
                      lambda u, n: None)


def test_close_leaves_a_replaced_socket_alone(server_factory):
    s = server_factory()
    os.unlink(s.path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        other.bind(s.path)
        s.close()
        assert os.path.exists(s.path)
    finally:
        other.close()


def test_receives_batched_upcalls_of_both_kinds_intact(server_factory,
                                                       client):
    s = server_factory()
    ups = []
    for i in range(3000):
        if i % 3:
            ups.append(_bridge(i, bytes([i % 256]) * (i % 100)))
        else:
            ups.append(upcall.FlowSample("br1", 9, 8, 7, 100, i % 3, i,
                                         i + 1, b"\x01" * 40, 1500))
    c = client()
    c.connect(s.path)
    dgs = list(upcall.pack_batches(ups, max_size=8000))
    assert len(dgs) > 5
    for d in dgs[:8]:  # fewer than the default queue length (10)
        c.send(d)
    got = drain(s, sum(len(upcall.decode(d)[0]) for d in dgs[:8]))
    for d in dgs[8:]:
        c.send(d)
        got += drain(s, len(upcall.decode(d)[0]))
    assert got == ups
    assert s.stats == {"datagrams": len(dgs), "upcalls": len(ups),
                       "malformed_datagrams": 0, "malformed_upcalls": 0}


def test_run_reads_at_most_max_batch_and_passes_now(server_factory,
                                                    client):
    s = server_factory(max_batch=2)
    c = client()
    for i in range(5):
        c.sendto(upcall.encode([_bridge(i)]), s.path)
    clock = iter([123.5, 124.0])
    assert s.run(now_fn=lambda: next(clock)) == 2
    # One handler call per datagram, one clock reading per run.
    assert s.got == [([_bridge(0)], 123.5), ([_bridge(1)], 123.5)]
    assert s.run() == 2
    assert s.run() == 1
    assert s.run() == 0
    assert len(s.got) == 5  # no handler call when nothing was read
    assert [u.input_port for ups, _ in s.got for u in ups] == \
        [0, 1, 2, 3, 4]


def test_run_stops_reading_when_its_budget_is_spent(server_factory,
                                                   client):
    """A slow handler: each run() reads one datagram past its budget at
    most, the next runs take the rest, in order, nothing lost."""
    got = []

    def slow(upcalls, now):
        got.extend(u.input_port for u in upcalls)
        time.sleep(0.03)

    s = server_factory(handler=slow, budget=0.05)
    c = client()
    # (8: a Unix datagram socket queues 10 by default.)
    for i in range(8):
        c.sendto(upcall.encode([_bridge(i)]), s.path)
    per_run = []
    while len(got) < 8:
        per_run.append(s.run())
        assert 1 <= per_run[-1] <= 2, per_run
    assert s.run() == 0
    assert got == list(range(8))
    assert sum(per_run) == 8 and len(per_run) >= 4


def test_malformed_input_is_counted_and_never_disturbs_the_next(
        server_factory, client):
    s = server_factory()
    c = client()
    good = upcall.encode([_bridge(1), _bridge(2)])
    # Upcall 0 of three with its BRIDGE attribute renamed to type 999.
    bad_one = bytearray(upcall.encode([_bridge(7), _bridge(8),
                                       _bridge(9)]))
    i = bad_one.index(b"\x00\x07\x00\x01br0")
    bad_one[i + 2:i + 4] = (999).to_bytes(2, "big")
    for d in (b"", b"garbage!" * 3, good[:20], bytes(bad_one), good):
        c.sendto(d, s.path)
    assert s.run() == 5
    ups = [u for batch, _ in s.got for u in batch]
    assert [u.input_port for u in ups] == [8, 9, 1, 2]
    assert s.stats == {"datagrams": 5, "upcalls": 4,
                       "malformed_datagrams": 4, "malformed_upcalls": 5}


def test_wait_wakes_the_poller_only_when_data_is_queued(server_factory,
                                                        client):
    s = server_factory()
    poller = ovs.poller.Poller()
    s.wait(poller)
    poller.timer_wait(200)
    t0 = time.monotonic()
    poller.block()
    assert time.monotonic() - t0 >= 0.15  # nothing queued: timer woke it
    client().sendto(upcall.encode([_bridge(1)]), s.path)
    poller = ovs.poller.Poller()
    s.wait(poller)
    poller.timer_wait(5000)
    t0 = time.monotonic()
    poller.block()
    assert time.monotonic() - t0 < 1.0
    assert s.run() == 1


def test_rate_limiter_bursts_then_refills():
    rl = RateLimiter(rate=6, burst=3)  # 6 per minute: one per 10 s
    assert [rl.allow(100.0) for _ in range(5)] == [True] * 3 + [False] * 2
    assert not rl.allow(105.0)
    assert rl.take_suppressed() == 3
    assert rl.take_suppressed() == 0
    assert rl.allow(110.5)
    assert not rl.allow(110.6)
    assert [rl.allow(1000.0) for _ in range(4)] == [True] * 3 + [False]
    assert not rl.allow(999.0)  # time going backwards refills nothing


LOG_SCRIPT = r"""
import socket, sys
import ovs.vlog
from ovs_ipfix_py.channel import ChannelServer
ovs.vlog.Vlog.init()
# Without a log file, the "file" destination would reach stderr too.
ovs.vlog.Vlog.set_level("any", "file", "off")
ovs.vlog.Vlog.set_level("any", "syslog", "off")
s = ChannelServer(sys.argv[1], lambda u, n: None)
c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(100):
    c.sendto(b"bad datagram %d" % i, s.path)
    s.run()  # the queue holds only net.unix.max_dgram_qlen datagrams
print(s.stats["malformed_datagrams"])
s.close()
"""


def test_malformed_input_is_logged_with_a_rate_limit(sockdir):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT, os.path.join(sockdir, "l.sock")],
        cwd=root, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "100"
    lines = proc.stderr.splitlines()
    assert len(lines) == 20  # the burst, then silence
    assert all(re.search(r"\| channel \| WARN \| .*bad magic", line)
               for line in lines), lines[0]


def test_oversized_datagram_is_counted_as_truncated(server_factory,
                                                    client):
    s = server_factory()
    one = upcall._encode_upcall(_bridge(1, b"\x00" * 1000))
    n = upcall.MAX_DATAGRAM_SIZE // len(one) + 10
    big = upcall._datagram([one] * n, 12 + n * len(one))
    assert len(big) > upcall.MAX_DATAGRAM_SIZE
    c = client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    c.sendto(big, s.path)
    c.sendto(upcall.encode([_bridge(2)]), s.path)
    assert s.run() == 2
    ups = [u for batch, _ in s.got for u in batch]
    fit = (upcall.MAX_DATAGRAM_SIZE - 12) // len(one)
    assert len(ups) == fit + 1 and ups[-1] == _bridge(2)
    assert s.stats["malformed_datagrams"] == 1
    assert s.stats["malformed_upcalls"] == n - fit
