"""schemas/channel.md against ovs_ipfix_py/upcall.py: the document is the
contract, so every table and example in it must match the code."""

import os
import re

import pytest

from ovs_ipfix_py import upcall

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
