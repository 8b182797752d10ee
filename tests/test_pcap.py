"""Capture files: our reader and writer against Wireshark's own tools
(tshark reads, editcap converts, text2pcap makes non-Ethernet files).
Hand-built files use the layouts from the pcap/pcapng specifications and
are first validated by tshark, so they are not our reader judging itself.
"""

import gzip
import json
import os
import shutil
import struct
import subprocess

import pytest

from ovs_ipfix_py.pcap import PcapError, read_frames, write_pcap

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None,
                                reason="tshark (Debian wireshark) needed")


@pytest.fixture
def tmp(shorttmp):
    return shorttmp


def frames(n=20):
    """(ts, frame, orig_len): varied lengths, some truncated."""
    out = []
    for i in range(n):
        frame = bytes((i * 7 + j) % 256 for j in range(14 + i * 3))
        out.append((1700000000 + i * 0.25 + 0.000123,
                    frame, len(frame) + (i % 3) * 100))
    return out


def tshark(path):
    """[(time_epoch or None, frame bytes, frame.len)] as tshark reads
    them."""
    proc = subprocess.run(["tshark", "-n", "-r", path, "-T", "json", "-x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = []
    for pkt in json.loads(proc.stdout):
        layers = pkt["_source"]["layers"]
        f = layers["frame"]
        ts = f.get("frame.time_epoch")  # absent for a simple packet block
        out.append((None if ts is None else float(ts),
                    bytes.fromhex(layers["frame_raw"][0]),
                    int(f["frame.len"])))
    return out


def same(ours, theirs, tolerance=1e-6):
    assert len(ours) == len(theirs)
    for (t1, f1, n1), (t2, f2, n2) in zip(ours, theirs):
        assert f1 == f2
        assert n1 == n2
        assert abs(t1 - t2) <= tolerance, (t1, t2)


def test_written_pcap_reads_the_same_in_tshark(tmp):
    path = os.path.join(tmp, "w.pcap")
    fr = frames()
    assert write_pcap(path, fr) == len(fr)
    same(tshark(path), fr)
    same(list(read_frames(path)), fr)
    # 2-tuples mean "not truncated".
    write_pcap(path, [(ts, f) for ts, f, _ in fr])
    assert [n for _, _, n in read_frames(path)] == [len(f) for _, f, _ in fr]


@pytest.mark.parametrize("chain", [
    ["pcapng"], ["nsecpcap"], ["nsecpcap", "pcapng"], ["pcapng", "pcap"],
])
def test_editcap_conversions(tmp, chain):
    src = os.path.join(tmp, "src.pcap")
    fr = frames()
    write_pcap(src, fr)
    for i, fmt in enumerate(chain):
        dst = os.path.join(tmp, f"c{i}.{fmt}")
        subprocess.run(["editcap", "-F", fmt, src, dst], check=True,
                       capture_output=True, timeout=60)
        src = dst
    same(list(read_frames(src)), fr)


# ------------------------------------------------ hand-built capture files

def classic(endian, nano, records, linktype=1):
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535,
                       linktype)]
    for ts, frame, orig in records:
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack(endian + "IIII", sec, frac, len(frame), orig))
        out.append(frame)
    return b"".join(out)


def pad4(b):
    return b + b"\0" * (-len(b) % 4)


def block(e, btype, body):
    body = pad4(body)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def option(e, code, value):
    return struct.pack(e + "HH", code, len(value)) + pad4(value)


def shb(e):
    return block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0,
                                            -1))


def idb(e, linktype=1, snaplen=0, options=b""):
    if options:
        options += option(e, 0, b"")
    return block(e, 1, struct.pack(e + "HHI", linktype, 0, snaplen)
                 + options)


def epb(e, iface, ticks, frame, orig):
    return block(e, 6, struct.pack(e + "IIIII", iface, ticks >> 32,
                                   ticks & 0xFFFFFFFF, len(frame), orig)
                 + pad4(frame))


def spb(e, frame, orig):
    return block(e, 3, struct.pack(e + "I", orig) + pad4(frame))


def obsolete_pb(e, iface, ticks, frame, orig):
    return block(e, 2, struct.pack(e + "HHIIII", iface, 0, ticks >> 32,
                                   ticks & 0xFFFFFFFF, len(frame), orig)
                 + pad4(frame))


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_classic_pcap_both_byte_orders_and_resolutions(tmp, endian, nano):
    fr = frames()
    path = os.path.join(tmp, "h.pcap")
    with open(path, "wb") as f:
        f.write(classic(endian, nano, fr))
    theirs = tshark(path)
    same(theirs, fr)
    same(list(read_frames(path)), theirs)


@pytest.mark.parametrize("e", ["<", ">"])
def test_pcapng_blocks_sections_and_time_options(tmp, e):
    other = ">" if e == "<" else "<"
    a, b, c, d = (bytes([n]) * (14 + n) for n in range(4))
    data = b"".join([
        shb(e),
        idb(e),                                        # 0: us, default
        idb(e, options=option(e, 9, b"\x09")),         # 1: ns
        block(e, 4, struct.pack(e + "HH", 0, 0)),      # NRB: skipped
        epb(e, 0, 1700000000_250000, a, len(a) + 10),
        epb(e, 1, 1700000001_123456789, b, len(b)),
        block(e, 5, struct.pack(e + "III", 0, 0, 0)),  # ISB: skipped
        obsolete_pb(e, 0, 1700000002_000001, c, len(c)),
        # A second section, other byte order, binary resolution and an
        # offset of 1000 s.
        shb(other),
        idb(other, snaplen=16, options=option(other, 9, b"\x8a")
            + option(other, 14, struct.pack(other + "q", 1000))),
        epb(other, 0, (1699999000 << 10) + 512, d[:16], len(d)),
        spb(other, d[:16], len(d)),
    ])
    path = os.path.join(tmp, "h.pcapng")
    with open(path, "wb") as f:
        f.write(data)
    ours = list(read_frames(path))
    expect = [
        (1700000000.25, a, len(a) + 10),
        (1700000001.123456789, b, len(b)),
        (1700000002.000001, c, len(c)),
        (1700000000.5, d[:16], len(d)),
        (1700000000.5, d[:16], len(d)),  # SPB: no time, the previous one
    ]
    same(ours, expect)
    theirs = tshark(path)
    # tshark gives a simple packet block no time at all: compare the rest.
    same(theirs[:4], expect[:4])
    assert theirs[4][1:] == expect[4][1:]


def test_orig_len_never_below_the_captured_length(tmp):
    path = os.path.join(tmp, "o.pcap")
    with open(path, "wb") as f:
        f.write(classic("<", False, [(1.0, b"x" * 60, 20)]))
    assert list(read_frames(path)) == [(1.0, b"x" * 60, 60)]


# ----------------------------------------------------------- bad files

def text2pcap(tmp, name, *args):
    txt = os.path.join(tmp, "in.txt")
    with open(txt, "w") as f:
        f.write("0000  00 00 00 01 00 06 00 11 22 33 44 55 00 00 08 00\n"
                "0010  45 00 00 14 00 00 00 00 40 00 00 00 0a 00 00 01\n"
                "0020  0a 00 00 02\n")
    out = os.path.join(tmp, name)
    subprocess.run(["text2pcap", *args, txt, out], check=True,
                   capture_output=True, timeout=60)
    return out


def one_line_error(path, match):
    with pytest.raises(PcapError) as info:
        list(read_frames(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path + ": ")
    assert match in message, message
    return message


def test_non_ethernet_captures_are_refused_clearly(tmp):
    sll = text2pcap(tmp, "sll.pcap", "-F", "pcap", "-l", "113")
    one_line_error(sll, "link type 113 (Linux cooked (SLL)) is not "
                        "Ethernet")
    # Checked before the first frame is asked for.
    with pytest.raises(PcapError):
        read_frames(sll)
    sllng = text2pcap(tmp, "sll.pcapng", "-F", "pcapng", "-l", "113")
    one_line_error(sllng, "interface 0: link type 113")
    eth = text2pcap(tmp, "eth.pcapng", "-F", "pcapng")
    assert [len(f) for _, f, _ in read_frames(eth)] == [36]


def test_bad_files_raise_one_line_errors(tmp):
    good = classic("<", False, frames(3))
    cases = {
        "missing.pcap": (None, "cannot open: No such file"),
        "empty.pcap": (b"", "empty file"),
        "text.pcap": (b"hello, this is not a capture\n", "not a pcap"),
        "gz.pcap": (gzip.compress(good), "gzip"),
        "short.pcap": (good[:20], "truncated pcap header"),
        "cut.pcap": (good[:-5], "truncated or corrupt"),
        "cuthdr.pcap": (good[:24 + 16 + 14 + 8], "truncated record header"),
        "huge.pcap": (good[:24] + struct.pack("<IIII", 0, 0, 1 << 30, 60),
                      "truncated or corrupt"),
        "badng.pcapng": (shb("<")[:-4] + b"\x99\0\0\0",
                         "trailing length"),
        "cutng.pcapng": ((shb("<") + idb("<")
                          + epb("<", 0, 0, b"x" * 20, 20))[:-8],
                         "bad length"),
        "noiface.pcapng": (shb("<") + epb("<", 0, 0, b"x" * 20, 20),
                           "interface 0, not described"),
        "bom.pcapng": (b"\x0a\x0d\x0d\x0a" + b"\x1c\0\0\0" + b"\0" * 20,
                       "byte-order magic"),
    }
    for name, (content, match) in cases.items():
        path = os.path.join(tmp, name)
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        one_line_error(path, match)
    one_line_error(tmp, "cannot")  # a directory


def test_frames_before_a_corrupt_record_are_delivered(tmp):
    path = os.path.join(tmp, "cut.pcap")
    fr = frames(3)
    with open(path, "wb") as f:
        f.write(classic("<", False, fr)[:-5])
    got = []
    with pytest.raises(PcapError, match="packet 3"):
        for item in read_frames(path):
            got.append(item)
    same(got, fr[:2])


def test_write_pcap_rejects_bad_items(tmp):
    path = os.path.join(tmp, "x.pcap")
    with pytest.raises(ValueError, match="orig_len"):
        write_pcap(path, [(1.0, b"abc", 2)])
    with pytest.raises(ValueError, match="negative"):
        write_pcap(path, [(-1.0, b"abc")])
