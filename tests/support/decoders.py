"""IPFIX decoders for tests: our own small parser and the real judges.

Our parser (``Session``, ``parse_messages``, ``parse_datagrams``) is
written from RFC 7011 and checks what the other tools do not report
well: sequence numbers per (source, observation domain), templates
before data, set and message lengths, padding.  It is never the only
judge: tests also read the same bytes with

- ``tshark_decode`` / ``tshark_records``: Wireshark's cflow dissector
  over a pcap (``UdpCollector.write_pcap``), with its expert warnings;
- ``NfcapdCollector`` (``nfdump_records``): nfcapd receiving live,
  records read back with ``nfdump -o json``;
- ``NfacctdCollector`` (``nfacctd_records``): pmacct's nfacctd
  receiving live, print plugin to CSV;
- ``ipfixdump_check``: CERT libfixbuf's ipfixDump over an RFC 5655
  file (``write_ipfix_file``).

Every judge returns records as dicts with the same normalized keys
(those it can provide): src_mac, dst_mac, ethertype, vlan, ip_version,
src_ip, dst_ip (text), proto, src_port, dst_port, icmp_type, icmp_code,
packets, octets, l2_octets, sumsq, min_len, max_len, end_reason,
obs_point_id, obs_domain_id, tcp_flags, flow_direction, ingress_if,
egress_if, template_id; tshark's also carry "raw" (its cflow.* fields).

A missing tool raises MissingTool naming its Debian package.
"""

import csv
import dataclasses
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

from . import (
    descendant_pids,
    free_port,
    kill_pid,
    require,
    udp_port_bound,
    wait_gone,
    wait_until,
)

# ---------------------------------------------------------------------
# Information elements the tests look at: IANA id -> (key, kind).
# kind: "uint", "mac", "ip" (4 or 16 bytes) or "string".  Kept apart from
# schemas/ipfix-elements.csv on purpose: a judge must not share the
# exporter's tables.

FIELDS = {
    1: ("octets", "uint"),
    2: ("packets", "uint"),
    4: ("proto", "uint"),
    5: ("tos", "uint"),
    6: ("tcp_flags", "uint"),
    7: ("src_port", "uint"),
    8: ("src_ip", "ip"),
    10: ("ingress_if", "uint"),
    11: ("dst_port", "uint"),
    12: ("dst_ip", "ip"),
    14: ("egress_if", "uint"),
    25: ("min_len", "uint"),
    26: ("max_len", "uint"),
    27: ("src_ip", "ip"),
    28: ("dst_ip", "ip"),
    31: ("flow_label", "uint"),
    56: ("src_mac", "mac"),
    58: ("vlan", "uint"),
    60: ("ip_version", "uint"),
    61: ("flow_direction", "uint"),
    80: ("dst_mac", "mac"),
    82: ("if_name", "string"),
    83: ("if_descr", "string"),
    136: ("end_reason", "uint"),
    138: ("obs_point_id", "uint"),
    144: ("exporting_process_id", "uint"),
    152: ("start_ms", "uint"),
    153: ("end_ms", "uint"),
    158: ("start_delta_us", "uint"),
    159: ("end_delta_us", "uint"),
    166: ("not_sent_flows", "uint"),
    167: ("not_sent_packets", "uint"),
    168: ("not_sent_octets", "uint"),
    176: ("icmp_type", "uint"),
    177: ("icmp_code", "uint"),
    178: ("icmp_type", "uint"),
    179: ("icmp_code", "uint"),
    192: ("ttl", "uint"),
    195: ("dscp", "uint"),
    196: ("precedence", "uint"),
    198: ("sumsq", "uint"),
    240: ("eth_header_len", "uint"),
    243: ("dot1q_vlan", "uint"),
    244: ("dot1q_priority", "uint"),
    256: ("ethertype", "uint"),
    302: ("selector_id", "uint"),
    304: ("selector_algorithm", "uint"),
    305: ("sampling_packet_interval", "uint"),
    306: ("sampling_packet_space", "uint"),
    309: ("sampling_size", "uint"),
    310: ("sampling_population", "uint"),
    352: ("l2_octets", "uint"),
    368: ("ingress_if_type", "uint"),
    369: ("egress_if_type", "uint"),
}

#: Enterprise elements by (PEN, id): VMware's (PEN 6876) as OVS sends
#: them (ofproto/ipfix-enterprise-entities.def).  tunnel_key is hex, so
#: its length (3 bytes for VXLAN/Geneve VNIs, 4 for GRE keys) shows.
PEN_VMWARE = 6876
ENTERPRISE_FIELDS = {
    (PEN_VMWARE, 891): ("tunnel_type", "uint"),
    (PEN_VMWARE, 892): ("tunnel_key", "hex"),
    (PEN_VMWARE, 893): ("tunnel_src", "ip"),
    (PEN_VMWARE, 894): ("tunnel_dst", "ip"),
    (PEN_VMWARE, 895): ("tunnel_proto", "uint"),
    (PEN_VMWARE, 896): ("tunnel_src_port", "uint"),
    (PEN_VMWARE, 897): ("tunnel_dst_port", "uint"),
    (PEN_VMWARE, 898): ("virtual_obs_id", "string"),
}

# ---------------------------------------------------------------------
# Our parser (RFC 7011 section 3).

IPFIX_VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, time, sequence, domain
SET_HEADER = struct.Struct("!HH")  # set id, length
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256
VARIABLE_LENGTH = 65535
ENTERPRISE_BIT = 0x8000


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field specifier: element id, length (65535 = variable) and
    enterprise number (0 for IANA elements)."""

    ie: int
    length: int
    pen: int = 0

    @property
    def key(self):
        """How the field is keyed in DataRecord.values."""
        return (self.pen, self.ie) if self.pen else self.ie


@dataclasses.dataclass(frozen=True)
class Template:
    """A (data or options) template record; no fields = withdrawal."""

    template_id: int
    fields: Tuple[FieldSpec, ...]
    scope_count: int = 0
    options: bool = False

    @property
    def withdrawal(self):
        return not self.fields

    @property
    def min_length(self):
        """Shortest encoding of one record (variable fields: 1 byte)."""
        return sum(1 if f.length == VARIABLE_LENGTH else f.length
                   for f in self.fields)


@dataclasses.dataclass
class DataRecord:
    """A data record decoded through its template.  ``values`` maps
    element id (or (pen, id)) to the field's bytes, first occurrence."""

    template_id: int
    options: bool
    fields: List[Tuple[FieldSpec, bytes]]
    values: Dict[object, bytes]
    domain: int
    export_time: int

    def uint(self, key, default=None):
        """Field ``key`` as an unsigned integer (network order)."""
        data = self.values.get(key)
        return default if data is None else int.from_bytes(data, "big")

    def normalized(self):
        """The record as a dict with the module's normalized keys."""
        out = {"template_id": self.template_id,
               "obs_domain_id": self.domain}
        for spec, data in self.fields:
            named = (ENTERPRISE_FIELDS.get(spec.key) if spec.pen
                     else FIELDS.get(spec.ie))
            if named is None:
                continue
            key, kind = named
            if key in ("if_name", "if_descr") and key in out:
                # OVS's egress layouts name the output port second.
                key = "egress_" + key
            if key in out:
                continue
            out[key] = _decode_value(kind, data)
        for delta, key in (("start_delta_us", "flow_start"),
                           ("end_delta_us", "flow_end")):
            if delta in out:
                out[key] = self.export_time - out[delta] / 1e6
        for ms, key in (("start_ms", "flow_start"), ("end_ms", "flow_end")):
            if ms in out:
                out[key] = out[ms] / 1e3
        return out


def _decode_value(kind, data):
    if kind == "hex":
        return data.hex()
    if kind == "uint":
        return int.from_bytes(data, "big")
    if kind == "mac":
        return ":".join(f"{b:02x}" for b in data)
    if kind == "ip":
        return str(ipaddress.ip_address(data)) if len(data) in (4, 16) \
            else data.hex()
    return data.decode("utf-8", "replace")


@dataclasses.dataclass
class IpfixSet:
    set_id: int
    length: int
    templates: List[Template] = dataclasses.field(default_factory=list)
    records: List[DataRecord] = dataclasses.field(default_factory=list)
    padding: bytes = b""
    decoded: bool = True  # False: data set whose template is unknown


@dataclasses.dataclass
class Message:
    """One IPFIX message.  ``size`` is the bytes actually present;
    ``problems`` what our parser found wrong in it."""

    version: int
    length: int
    export_time: int
    sequence: int
    domain: int
    size: int
    source: object = None
    arrival: Optional[float] = None
    sets: List[IpfixSet] = dataclasses.field(default_factory=list)
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def templates(self):
        return [t for s in self.sets for t in s.templates]

    @property
    def records(self):
        """Every data record, options data records included."""
        return [r for s in self.sets for r in s.records]

    @property
    def data_records(self):
        return [r for r in self.records if not r.options]

    @property
    def options_records(self):
        return [r for r in self.records if r.options]


class Session:
    """Parsing state across messages: templates per (source, domain),
    the next expected sequence number per (source, domain), and every
    problem found (``problems``, each also kept on its Message).

    ``transport`` "udp" (default), "tcp" or "file": template
    withdrawals are flagged over UDP (RFC 7011 section 8.4).
    """

    def __init__(self, transport="udp"):
        self.transport = transport
        self.templates = {}     # (source, domain, template id) -> Template
        self.next_sequence = {}  # (source, domain) -> int or None
        self.messages = []
        self.problems = []

    @property
    def records(self):
        """Every (non-options) DataRecord, in arrival order."""
        return [r for m in self.messages for r in m.data_records]

    @property
    def options_records(self):
        """Every options DataRecord, in arrival order."""
        return [r for m in self.messages for r in m.options_records]

    def normalized(self, options=False):
        """The data records (or, with ``options``, the options records)
        as normalized dicts: the keys tshark_decode's records use."""
        records = self.options_records if options else self.records
        return [r.normalized() for r in records]

    def parse(self, data, source=None, arrival=None, datagram=False):
        """Parse ``data``: messages back to back (a file, a TCP stream)
        or, with ``datagram=True``, one datagram that must hold exactly
        one message.  Returns the messages parsed; never raises on bad
        input, which is reported in ``problems`` instead."""
        messages = []
        offset = 0
        while offset < len(data):
            rest = len(data) - offset
            if rest < HEADER.size:
                self._problem(None, f"{rest} trailing bytes, shorter than "
                              "a message header")
                break
            msg = self._parse_one(data, offset, source, arrival)
            messages.append(msg)
            if msg.length < HEADER.size or msg.size < msg.length:
                break
            offset += msg.length
            if datagram and offset < len(data):
                self._problem(msg, f"datagram of {len(data)} bytes holds "
                              f"a message of {msg.length} bytes")
                break
        self.messages.extend(messages)
        return messages

    def _problem(self, msg, text):
        if msg is not None:
            text = f"domain {msg.domain} seq {msg.sequence}: {text}"
            msg.problems.append(text)
        self.problems.append(text)

    def _parse_one(self, data, offset, source, arrival):
        version, length, export_time, sequence, domain = \
            HEADER.unpack_from(data, offset)
        size = min(length, len(data) - offset) if length else 0
        msg = Message(version, length, export_time, sequence, domain,
                      size, source, arrival)
        if version != IPFIX_VERSION:
            self._problem(msg, f"version {version}, not 10")
            return msg
        if length < HEADER.size:
            self._problem(msg, f"length field {length} < 16")
            return msg
        if size < length:
            self._problem(msg, f"length field {length} but only {size} "
                          "bytes")
            return msg
        body = data[offset + HEADER.size:offset + length]
        pos = 0
        while pos < len(body):
            if len(body) - pos < SET_HEADER.size:
                self._problem(msg, "truncated set header")
                break
            set_id, set_len = SET_HEADER.unpack_from(body, pos)
            if set_len < SET_HEADER.size or pos + set_len > len(body):
                self._problem(msg, f"set {set_id} length {set_len} does "
                              "not fit the message")
                break
            content = body[pos + SET_HEADER.size:pos + set_len]
            msg.sets.append(self._parse_set(msg, set_id, set_len, content))
            pos += set_len
        self._check_sequence(msg)
        return msg

    def _parse_set(self, msg, set_id, set_len, content):
        s = IpfixSet(set_id, set_len)
        if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
            self._parse_templates(msg, s, content)
        elif set_id >= MIN_DATA_SET_ID:
            self._parse_data(msg, s, content)
        else:
            self._problem(msg, f"reserved set id {set_id}")
            s.decoded = False
        return s

    def _parse_templates(self, msg, s, content):
        options = s.set_id == OPTIONS_TEMPLATE_SET_ID
        pos = 0
        # A template record is at least 4 bytes (id, count); anything
        # shorter left at the end is padding.
        while len(content) - pos >= 4:
            tid, count = struct.unpack_from("!HH", content, pos)
            pos += 4
            scope = 0
            if options and count:
                if len(content) - pos < 2:
                    self._problem(msg, f"options template {tid} truncated")
                    return
                (scope,) = struct.unpack_from("!H", content, pos)
                pos += 2
                if scope == 0 or scope > count:
                    self._problem(msg, f"options template {tid} scope "
                                  f"count {scope} of {count} fields")
            fields = []
            for _ in range(count):
                if len(content) - pos < 4:
                    self._problem(msg, f"template {tid} truncated")
                    return
                ie, length = struct.unpack_from("!HH", content, pos)
                pos += 4
                pen = 0
                if ie & ENTERPRISE_BIT:
                    if len(content) - pos < 4:
                        self._problem(msg, f"template {tid} truncated")
                        return
                    (pen,) = struct.unpack_from("!I", content, pos)
                    pos += 4
                    ie &= ~ENTERPRISE_BIT
                fields.append(FieldSpec(ie, length, pen))
            template = Template(tid, tuple(fields), scope, options)
            self._define(msg, template)
            s.templates.append(template)
        s.padding = content[pos:]
        self._check_padding(msg, s)

    def _define(self, msg, template):
        tid = template.template_id
        if tid < MIN_DATA_SET_ID:
            self._problem(msg, f"template id {tid} < 256")
        key = (msg.source, msg.domain, tid)
        if template.withdrawal:
            if self.transport == "udp":
                self._problem(msg, f"template withdrawal of {tid} over "
                              "UDP")
            self.templates.pop(key, None)
            return
        old = self.templates.get(key)
        if old is not None and (old.fields, old.scope_count) != \
                (template.fields, template.scope_count):
            self._problem(msg, f"template {tid} redefined with another "
                          "layout")
        self.templates[key] = template

    def _parse_data(self, msg, s, content):
        template = self.templates.get((msg.source, msg.domain, s.set_id))
        if template is None:
            self._problem(msg, f"data set {s.set_id} before its template")
            s.decoded = False
            return
        minimum = template.min_length
        pos = 0
        while minimum and len(content) - pos >= minimum:
            fields = []
            for spec in template.fields:
                length = spec.length
                if length == VARIABLE_LENGTH:
                    length = content[pos]
                    pos += 1
                    if length == 255:
                        if len(content) - pos < 2:
                            length = len(content)  # forces the error
                        else:
                            (length,) = struct.unpack_from("!H", content,
                                                           pos)
                            pos += 2
                if len(content) - pos < length:
                    self._problem(msg, f"record of template {s.set_id} "
                                  "runs past its set")
                    return
                fields.append((spec, content[pos:pos + length]))
                pos += length
            values = {}
            for spec, value in fields:
                values.setdefault(spec.key, value)
            s.records.append(DataRecord(s.set_id, template.options, fields,
                                        values, msg.domain,
                                        msg.export_time))
        s.padding = content[pos:]
        self._check_padding(msg, s)

    def _check_padding(self, msg, s):
        # RFC 7011 section 3.3.1: padding is shorter than any record
        # and its octets are zero.
        if s.padding.strip(b"\0"):
            self._problem(msg, f"set {s.set_id}: {len(s.padding)} "
                          "trailing bytes are not zero padding")

    def _check_sequence(self, msg):
        # RFC 7011 section 3.1: the sequence number counts the data
        # records (options data records included) sent before this
        # message in the session from this observation domain.
        key = (msg.source, msg.domain)
        expected = self.next_sequence.get(key)
        if expected is not None and msg.sequence != expected:
            self._problem(msg, f"sequence {msg.sequence}, expected "
                          f"{expected}")
        if all(s.decoded for s in msg.sets):
            self.next_sequence[key] = \
                (msg.sequence + len(msg.records)) & 0xFFFFFFFF
        else:
            self.next_sequence[key] = None  # unknown count: resync


def parse_messages(data, source=None, session=None, datagram=False):
    """Parse ``data`` (messages back to back, or one datagram with
    ``datagram=True``) and return the list of Message.  Pass the same
    ``session`` across calls to keep templates and sequence state."""
    session = session if session is not None else Session()
    return session.parse(data, source, datagram=datagram)


def parse_datagrams(datagrams, senders=None, transport="udp"):
    """Parse a collector's ``datagrams`` [(arrival, bytes)] (one message
    each) in one Session, keyed by ``senders`` if given; returns the
    Session (``.messages``, ``.records``, ``.normalized()``,
    ``.problems``)."""
    session = Session(transport)
    for i, (arrival, data) in enumerate(datagrams):
        source = senders[i] if senders is not None else None
        session.parse(data, source, arrival, datagram=True)
    return session


def parse_collector(collector, transport=None):
    """parse_datagrams over a UdpCollector / TcpCollector."""
    if transport is None:
        transport = "tcp" if hasattr(collector, "connections") else "udp"
    return parse_datagrams(collector.datagrams, collector.senders,
                           transport)


# ---------------------------------------------------------------------
# tshark (package tshark).

#: tshark field -> normalized key, for data and options records.
TSHARK_FIELDS = {
    "cflow.srcmac": "src_mac",
    "cflow.dstmac": "dst_mac",
    "cflow.ethernet_type": "ethertype",
    "cflow.ethernet_header_length": "eth_header_len",
    "cflow.vlanid": "vlan",
    "cflow.dot1q_vlan_id": "dot1q_vlan",
    "cflow.dot1q_priority": "dot1q_priority",
    "cflow.ip_version": "ip_version",
    "cflow.srcaddr": "src_ip",
    "cflow.dstaddr": "dst_ip",
    "cflow.srcaddrv6": "src_ip",
    "cflow.dstaddrv6": "dst_ip",
    "cflow.ipv6flowlabel": "flow_label",
    "cflow.ip_ttl": "ttl",
    "cflow.tos": "tos",
    "cflow.ip_dscp": "dscp",
    "cflow.ip_precedence": "precedence",
    "cflow.protocol": "proto",
    "cflow.srcport": "src_port",
    "cflow.dstport": "dst_port",
    "cflow.packets": "packets",
    "cflow.octets": "octets",
    "cflow.layer2_octet_delta_count": "l2_octets",
    "cflow.delta_octets_squared": "sumsq",
    "cflow.length_min": "min_len",
    "cflow.length_max": "max_len",
    "cflow.flow_end_reason": "end_reason",
    "cflow.observation_point_id": "obs_point_id",
    "cflow.tcpflags": "tcp_flags",
    "cflow.direction": "flow_direction",
    "cflow.inputint": "ingress_if",
    "cflow.outputint": "egress_if",
    "cflow.if_name": "if_name",
    "cflow.if_descr": "if_descr",
    "cflow.ingress_interface_type": "ingress_if_type",
    "cflow.egress_interface_type": "egress_if_type",
    "cflow.flow_exporter": "exporting_process_id",
    "cflow.notsent_flows": "not_sent_flows",
    "cflow.notsent_packets": "not_sent_packets",
    "cflow.notsent_octets": "not_sent_octets",
    "cflow.selector_id": "selector_id",
    "cflow.selector_algorithm": "selector_algorithm",
    "cflow.sampling_probability": "sampling_probability",
}
_TSHARK_TEXT = {"src_mac", "dst_mac", "src_ip", "dst_ip", "if_name",
                "if_descr"}
_TSHARK_FLOAT = {"sampling_probability"}
#: Expert info at or above this severity is a warning (PI_WARN).
_PI_WARN = 0x00600000


@dataclasses.dataclass
class TsharkDecode:
    """What tshark made of a capture.  ``records``: normalized data
    records (options records excluded); ``options``: options data
    records; ``messages``: one dict per IPFIX message (frame, arrival,
    export_time, sequence, obs_domain_id, length, records = data
    records decoded, options data records included);
    ``warnings``: expert warnings/errors and malformed messages, each
    prefixed with its frame number, plus our own cross-checks."""

    records: List[dict]
    options: List[dict]
    messages: List[dict]
    warnings: List[str]


def _first(value):
    return value[0] if isinstance(value, list) else value


def _tshark_int(text):
    """tshark prints integers in decimal, flags in hex ("0x0012")."""
    try:
        return int(text, 16) if text.startswith("0x") else int(text)
    except ValueError:
        return text  # a value string: keep it, the test will show it


def _tshark_time(text):
    """tshark's "Nov 14, 2023 22:13:19.995000000 UTC" -> epoch s."""
    stamp, _, _ = text.rpartition(" ")
    base, _, frac = stamp.partition(".")
    parsed = datetime.datetime.strptime(base, "%b %d, %Y %H:%M:%S")
    parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp() + float("0." + (frac or "0"))


def _normalize_tshark(flow, domain, template_id, enterprise=()):
    """One tshark "Flow N" node as a normalized record.  ``enterprise``:
    the (PEN, id) of the template's enterprise fields, in order: tshark
    names no VMware element, it shows their values as
    ``cflow.enterprise_private_entry`` ("0a:00:00:01"), one per
    enterprise field in template order, and its template tree shows
    "893 [pen: VMware Inc.]"; we pair the two."""
    out = {"template_id": template_id, "obs_domain_id": domain}
    values = flow.get("cflow.enterprise_private_entry", [])
    if not isinstance(values, list):
        values = [values]
    for spec, text in zip(enterprise, values):
        named = ENTERPRISE_FIELDS.get(spec)
        if named is not None:
            data = bytes.fromhex(text.replace(":", ""))
            out[named[0]] = _decode_value(named[1], data)
    for key in ("cflow.if_name", "cflow.if_descr"):
        # The second interfaceName/Description: the egress port's.
        if isinstance(flow.get(key), list) and len(flow[key]) > 1:
            out["egress_" + key[6:]] = flow[key][1]
    for field, key in TSHARK_FIELDS.items():
        if field not in flow:
            continue
        value = _first(flow[field])
        if key in _TSHARK_TEXT:
            out[key] = value
        elif key in _TSHARK_FLOAT:
            out[key] = float(value)
        else:
            out[key] = _tshark_int(value)
    # ICMP type/code: the IPv6 elements for IPv6 flows, else IPv4's.
    v6 = out.get("ip_version") == 6 or "cflow.srcaddrv6" in flow
    order = ("ipv6", "ipv4") if v6 else ("ipv4", "ipv6")
    for part in ("type", "code"):
        for version in order:
            field = f"cflow.icmp_{version}_{part}"
            if field in flow:
                out[f"icmp_{part}"] = int(_first(flow[field]))
                break
    tree = flow.get("cflow.timedelta_tree", {})
    for field, key in (("cflow.abstimestart", "flow_start"),
                       ("cflow.abstimeend", "flow_end")):
        if field in tree:
            out[key] = _tshark_time(_first(tree[field]))
    out["raw"] = flow
    return out


def _expert_messages(node, found):
    """Collect expert messages (severity >= warn) and malformed marks
    anywhere under ``node``."""
    if isinstance(node, list):
        for item in node:
            _expert_messages(item, found)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "_ws.expert":
            # Several expert items in one node come as a list
            # (--no-duplicate-keys).
            for item in value if isinstance(value, list) else [value]:
                severity = int(_first(item.get("_ws.expert.severity",
                                                "0")))
                if severity >= _PI_WARN:
                    found.append(_first(item.get("_ws.expert.message",
                                                 "expert info")))
        elif key == "_ws.malformed" and isinstance(value, (str, list)):
            found.append("Malformed Packet")
        else:
            _expert_messages(value, found)


def _run_tshark(pcap_path, port, transport="udp"):
    tshark = require("tshark", "tshark")
    # The cflow dissector drops templates of over 60 fields by default:
    # 0 lifts the limit.
    argv = [tshark, "-n", "-r", pcap_path,
            "-d", f"{transport}.port=={port},cflow",
            "-o", "cflow.max_template_fields:0",
            "-J", f"frame {transport} cflow _ws.malformed _ws.expert",
            "-T", "json", "--no-duplicate-keys"]
    result = subprocess.run(argv, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"tshark failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return json.loads(result.stdout) if result.stdout.strip() else []


def tshark_decode(pcap_path, port, transport="udp"):
    """Decode ``pcap_path`` with tshark, IPFIX on UDP ``port`` (or, with
    ``transport="tcp"``, on TCP: messages reassembled from the stream,
    several per frame, a frame with none is no problem)."""
    records, options, messages, warnings = [], [], [], []
    kinds = {}  # (domain, template id) -> (options?, min record length)
    for packet in _run_tshark(pcap_path, port, transport):
        layers = packet["_source"]["layers"]
        frame = int(_first(layers["frame"]["frame.number"]))
        found = []
        _expert_messages(layers, found)
        warnings.extend(f"frame {frame}: {text}" for text in found)
        cflows = layers.get("cflow")
        if cflows is None:
            if transport == "udp":
                warnings.append(f"frame {frame}: not decoded as IPFIX")
            continue
        udp_payload = int(_first(layers["udp"]["udp.length"])) - 8 \
            if transport == "udp" else None
        for cflow in cflows if isinstance(cflows, list) else [cflows]:
            domain = int(_first(cflow.get("cflow.od_id", "0")))
            length = int(_first(cflow.get("cflow.len", "0")))
            if udp_payload is not None and not isinstance(cflows, list) \
                    and length != udp_payload:
                warnings.append(f"frame {frame}: message length {length}"
                                f" != UDP payload {udp_payload}")
            count = 0
            for name, node in cflow.items():
                if not name.startswith("Set ") or not isinstance(node,
                                                                 dict):
                    continue
                count += _tshark_set(node, domain, kinds, records,
                                     options, warnings, frame)
            messages.append({
                "frame": frame,
                "arrival": float(_first(
                    layers["frame"]["frame.time_epoch"])),
                "export_time": int(_first(
                    cflow["cflow.timestamp_tree"]["cflow.exporttime"]))
                if "cflow.timestamp_tree" in cflow else None,
                "sequence": int(_first(cflow.get("cflow.sequence", "0"))),
                "obs_domain_id": domain,
                "length": length,
                "records": count,
            })
    return TsharkDecode(records, options, messages, warnings)


def _tshark_set(node, domain, kinds, records, options, warnings, frame):
    """Take one "Set N" node; returns the data records it held."""
    set_id = int(_first(node.get("cflow.flowset_id", "0")))
    if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
        for tmpl in node.values():
            if not isinstance(tmpl, dict) or "cflow.template_id" not in tmpl:
                continue
            tid = int(_first(tmpl["cflow.template_id"]))
            minimum = 0
            enterprise = []
            for field in tmpl.values():
                if isinstance(field, dict) and \
                        "cflow.template_field_length" in field:
                    length = int(_first(field["cflow.template_field_length"]))
                    minimum += 1 if length == VARIABLE_LENGTH else length
                    if "cflow.template_ipfix_field_pen" in field:
                        enterprise.append((
                            int(_first(field[
                                "cflow.template_ipfix_field_pen"])),
                            int(_first(field[
                                "cflow.template_ipfix_field_type_"
                                "enterprise"]))))
            kinds[(domain, tid)] = (set_id == OPTIONS_TEMPLATE_SET_ID,
                                    minimum, tuple(enterprise))
        return 0
    is_options, minimum, enterprise = kinds.get((domain, set_id),
                                                (False, 0, ()))
    count = 0
    for name, flow in node.items():
        if name.startswith("Flow ") and isinstance(flow, dict):
            record = _normalize_tshark(flow, domain, set_id, enterprise)
            (options if is_options else records).append(record)
            count += 1
    padding = _first(node.get("cflow.padding", ""))
    pad_len = (len(padding) + 1) // 3 if padding else 0
    if minimum and pad_len >= minimum:
        warnings.append(f"frame {frame}: set {set_id} has {pad_len} "
                        f"undecoded bytes (records are {minimum}+)")
    return count


def tshark_records(pcap_path, port):
    """(data records, warnings) as tshark reads ``pcap_path``; see
    TsharkDecode (``tshark_decode``) for options records and messages.
    """
    decoded = tshark_decode(pcap_path, port)
    return decoded.records, decoded.warnings


# ---------------------------------------------------------------------
# Live collectors run as processes: nfcapd (nfdump) and nfacctd.

def _loopback(family):
    return "127.0.0.1" if family == socket.AF_INET else "::1"


class _LiveCollector:
    """A collector daemon on a loopback UDP port, in its own temporary
    directory.  Use as a context manager: inside, send to ``port`` /
    ``target``; on exit the daemon is stopped (by pid), it flushes, and
    ``records`` holds what it decoded."""

    PACKAGE = ""

    def __init__(self, family=socket.AF_INET, workdir=None):
        self.family = family
        self.host = _loopback(family)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(
            prefix=self.__class__.__name__.lower() + "-", dir="/tmp")
        self.port = None
        self.proc = None
        self.records = []
        self.log = ""

    @property
    def target(self):
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def _start(self):
        raise NotImplementedError

    def _finish(self):
        raise NotImplementedError

    def __enter__(self):
        self.port = free_port(self.family)
        try:
            self._start()
            wait_until(lambda: udp_port_bound(self.port, self.family)
                       or self.proc.poll() is not None, 10.0,
                       f"{self.__class__.__name__} to bind UDP "
                       f"{self.port}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.__class__.__name__} exited: "
                                   f"{self._read_log()}")
        except BaseException:
            self._stop(signal.SIGKILL)
            raise
        return self

    def _read_log(self):
        path = os.path.join(self.workdir, "daemon.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _stop(self, sig):
        if self.proc is None:
            return
        children = descendant_pids(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Plugins and writers the daemon forked finish their flush,
        # then must not outlive it.
        for pid in children:
            if not wait_gone(pid, 10.0):
                kill_pid(pid, signal.SIGKILL)
        self.log = self._read_log()

    def __exit__(self, exc_type, exc, tb):
        try:
            self._stop(self.STOP_SIGNAL)
            if exc_type is None:
                self._finish()
        finally:
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)


class NfcapdCollector(_LiveCollector):
    """nfcapd (package nfdump) receiving on loopback; on exit it gets
    SIGTERM (it flushes its file) and ``records`` is read back with
    ``nfdump -o json``.  ``stats`` holds nfcapd's own totals line
    (flows, packets, bytes, sequence_errors, bad_packets).

    nfcapd does not count options data records in its sequence check,
    so streams carrying them show false "sequence errors".  nfdump
    1.7.1 misreads flowStart/EndDeltaMicroseconds (first/last); it
    reads flowStart/EndMilliseconds, normalized here as flow_start /
    flow_end (s since the epoch; nfdump runs with TZ=UTC).
    """

    PACKAGE = "nfdump"
    STOP_SIGNAL = signal.SIGTERM

    def _start(self):
        nfcapd = require("nfcapd", self.PACKAGE)
        self.flowdir = os.path.join(self.workdir, "flows")
        os.makedirs(self.flowdir, exist_ok=True)
        self.pidfile = os.path.join(self.workdir, "nfcapd.pid")
        log = open(os.path.join(self.workdir, "daemon.log"), "wb")
        with log:
            self.proc = subprocess.Popen(
                [nfcapd, "-w", self.flowdir, "-p", str(self.port),
                 "-b", self.host, "-B", str(32 * 1024 * 1024),
                 "-t", "3600", "-P", self.pidfile],
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir)

    def _finish(self):
        self.stats = {}
        match = re.search(
            r"Flows: (\d+), Packets: (\d+), Bytes: (\d+), "
            r"Sequence Errors: (\d+), Bad Packets: (\d+)", self.log)
        if match:
            self.stats = dict(zip(
                ("flows", "packets", "bytes", "sequence_errors",
                 "bad_packets"), map(int, match.groups())))
        files = sorted(f for f in os.listdir(self.flowdir)
                       if f.startswith("nfcapd.2"))
        if not files:
            raise RuntimeError("nfcapd wrote no file:\n" + self.log)
        nfdump = require("nfdump", self.PACKAGE)
        self.records = []
        for name in files:
            result = subprocess.run(
                # Not -q: with it, nfdump 1.7 drops the JSON list's
                # brackets.
                [nfdump, "-r", os.path.join(self.flowdir, name),
                 "-o", "json"], capture_output=True, text=True,
                stdin=subprocess.DEVNULL, timeout=120,
                env=dict(os.environ, TZ="UTC"))
            if result.returncode != 0:
                raise RuntimeError(f"nfdump failed: {result.stderr}")
            text = result.stdout.strip()
            for raw in json.loads(text) if text else []:
                self.records.append(_normalize_nfdump(raw))


_NFDUMP_FIELDS = {
    "in_src_mac": "src_mac", "in_dst_mac": "dst_mac",
    "src4_addr": "src_ip", "dst4_addr": "dst_ip",
    "src6_addr": "src_ip", "dst6_addr": "dst_ip",
    "src_port": "src_port", "dst_port": "dst_port", "proto": "proto",
    "in_packets": "packets", "in_bytes": "octets",
    "src_vlan": "vlan", "src_tos": "tos",
    "input_snmp": "ingress_if", "output_snmp": "egress_if",
    "direction": "flow_direction",
    # sic: nfdump 1.7.1 spells it this way.
    "observationDoaminID": "obs_domain_id",
    "observationDomainID": "obs_domain_id",
    "observationPointID": "obs_point_id",
}


def _utc_seconds(text):
    """"2026-11-30T07:03:50.217" or "2026-11-30 07:03:50.217000", UTC,
    as s since the epoch; None for what is no time (nfacctd prints
    "0000-00-00 00:00:00" for a record without one)."""
    try:
        parsed = datetime.datetime.fromisoformat(
            text.strip().replace(" ", "T"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def _normalize_nfdump(raw):
    out = {new: raw[old] for old, new in _NFDUMP_FIELDS.items()
           if old in raw}
    for old, new in (("first", "flow_start"), ("last", "flow_end")):
        if raw.get(old):
            out[new] = _utc_seconds(raw[old])
    out["raw"] = raw
    return out


def nfdump_records(family=socket.AF_INET, workdir=None):
    """``with nfdump_records() as nf:`` send to ``nf.port``; after the
    block, ``nf.records`` (normalized dicts) and ``nf.stats``."""
    return NfcapdCollector(family, workdir)


class NfacctdCollector(_LiveCollector):
    """pmacct's nfacctd receiving on loopback with a print plugin
    writing CSV; on exit it gets SIGINT (which flushes the cache, ~2 s)
    and ``records`` holds the CSV rows as normalized dicts.

    Rows are aggregates over ``aggregate`` (pmacct primitives): records
    with the same values of all of them are summed.  The default
    includes export_proto_seqno, so records of different messages stay
    apart.
    """

    PACKAGE = "pmacct"
    STOP_SIGNAL = signal.SIGINT
    DEFAULT_AGGREGATE = ("src_mac", "dst_mac", "vlan", "etype",
                         "src_host", "dst_host", "src_port", "dst_port",
                         "proto", "tos", "tcpflags", "in_iface",
                         "out_iface", "export_proto_seqno",
                         "timestamp_start", "timestamp_end")

    def __init__(self, family=socket.AF_INET, workdir=None,
                 aggregate=DEFAULT_AGGREGATE, extra_config=()):
        super().__init__(family, workdir)
        self.aggregate = tuple(aggregate)
        self.extra_config = tuple(extra_config)

    def _start(self):
        nfacctd = require("nfacctd", self.PACKAGE)
        self.csv_path = os.path.join(self.workdir, "flows.csv")
        self.pidfile = os.path.join(self.workdir, "nfacctd.pid")
        config = os.path.join(self.workdir, "nfacctd.conf")
        lines = [
            "daemonize: false",
            f"pidfile: {self.pidfile}",
            f"logfile: {os.path.join(self.workdir, 'daemon.log')}",
            f"nfacctd_ip: {self.host}",
            f"nfacctd_port: {self.port}",
            f"nfacctd_pipe_size: {32 * 1024 * 1024}",
            "nfacctd_time_new: true",
            "plugins: print[out]",
            f"aggregate[out]: {', '.join(self.aggregate)}",
            "print_output[out]: csv",
            f"print_output_file[out]: {self.csv_path}",
            # Flush only when stopped: SIGINT purges the cache.
            "print_refresh_time[out]: 3600",
            "print_num_protos[out]: true",
            # Flow times (timestamp_start/end) in ms, UTC.
            "timestamps_secs: false",
            "timestamps_utc: true",
            *self.extra_config,
        ]
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [nfacctd, "-f", config], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.workdir)

    def _finish(self):
        self.records = []
        if not os.path.exists(self.csv_path):
            if "Purging cache" in self.log:
                return  # flushed, nothing received
            raise RuntimeError("nfacctd wrote no CSV:\n" + self.log)
        with open(self.csv_path, newline="") as f:
            for row in csv.DictReader(f):
                self.records.append(_normalize_nfacctd(row))


_NFACCTD_FIELDS = {
    "SRC_MAC": ("src_mac", str), "DST_MAC": ("dst_mac", str),
    "VLAN": ("vlan", int), "ETYPE": ("ethertype", lambda v: int(v, 16)),
    "SRC_IP": ("src_ip", str), "DST_IP": ("dst_ip", str),
    "SRC_PORT": ("src_port", int), "DST_PORT": ("dst_port", int),
    "PROTOCOL": ("proto", int), "TOS": ("tos", int),
    "TCP_FLAGS": ("tcp_flags", int),
    "IN_IFACE": ("ingress_if", int), "OUT_IFACE": ("egress_if", int),
    "EXPORT_PROTO_SEQNO": ("sequence", int),
    "PACKETS": ("packets", int), "BYTES": ("octets", int),
}


def _normalize_nfacctd(row):
    """A CSV row as a normalized dict; with the timestamp_start/end
    primitives aggregated (and ``timestamps_utc: true``), flow_start and
    flow_end in s since the epoch."""
    out = {}
    for column, (key, convert) in _NFACCTD_FIELDS.items():
        if row.get(column) not in (None, ""):
            out[key] = convert(row[column])
    for column, key in (("TIMESTAMP_START", "flow_start"),
                        ("TIMESTAMP_END", "flow_end")):
        if row.get(column) not in (None, ""):
            out[key] = _utc_seconds(row[column])
    out["raw"] = row
    return out


def nfacctd_records(family=socket.AF_INET, workdir=None, **kwargs):
    """``with nfacctd_records() as nfa:`` send to ``nfa.port``; after
    the block, ``nfa.records``.  kwargs: aggregate, extra_config."""
    return NfacctdCollector(family, workdir, **kwargs)


# ---------------------------------------------------------------------
# ipfixDump (package libfixbuf-tools).

_STATS_RE = re.compile(r"File Stats: (\d+) Messages, (\d+) Data Records, "
                       r"(\d+) Template Records")


def _frame_file(data):
    """(non-empty message count, framing error or None) of a file of
    messages back to back, from the header length fields alone."""
    offset = count = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            return count, f"{len(data) - offset} trailing bytes"
        version, length = struct.unpack_from("!HH", data, offset)
        if version != IPFIX_VERSION or length < HEADER.size:
            return count, f"bad header at byte {offset}"
        if offset + length > len(data):
            return count, f"message at byte {offset} truncated"
        # ipfixDump does not count messages without sets.
        count += length > HEADER.size
        offset += length
    return count, None


def ipfixdump_stats(path):
    """ipfixDump's statistics of ``path``: dict with messages,
    data_records, template_records, per_template {id: records}."""
    ipfixdump = require("ipfixDump", "libfixbuf-tools")
    result = subprocess.run([ipfixdump, "--in", path, "--stats"],
                            capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    match = _STATS_RE.search(result.stdout)
    if not match:
        raise RuntimeError(f"ipfixDump printed no statistics:\n"
                           f"{result.stdout}{result.stderr}")
    per_template = {int(tid): int(n) for tid, n in re.findall(
        r"^\s*(\d+) \(0x[0-9a-f]+\)\s*\|\s*(\d+)", result.stdout, re.M)}
    return {"messages": int(match.group(1)),
            "data_records": int(match.group(2)),
            "template_records": int(match.group(3)),
            "per_template": per_template,
            "stdout": result.stdout, "stderr": result.stderr,
            "returncode": result.returncode}


def ipfixdump_check(path):
    """Run ipfixDump --stats and --data over the RFC 5655 file
    ``path``.  ok is True only if it exits 0, writes nothing to stderr
    (its warnings - sequence, missing template - and errors - bad
    version, short read - all go there) and counts as many messages as
    the file holds (it silently stops at a set it cannot frame).
    Returns (ok, output): its output plus our notes."""
    ipfixdump = require("ipfixDump", "libfixbuf-tools")
    stats = ipfixdump_stats(path)
    data_run = subprocess.run([ipfixdump, "--in", path, "--data"],
                              capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
    with open(path, "rb") as f:
        expected, framing_error = _frame_file(f.read())
    notes = []
    if framing_error:
        notes.append(f"framing: {framing_error}")
    if stats["messages"] != expected:
        notes.append(f"ipfixDump read {stats['messages']} messages of "
                     f"{expected}")
    stderr = (stats["stderr"] + data_run.stderr).strip()
    ok = (not notes and not stderr and stats["returncode"] == 0
          and data_run.returncode == 0)
    output = "\n".join(filter(None, [stats["stdout"].strip(), stderr,
                                     *notes, data_run.stdout]))
    return ok, output



# ---------------------------------------------------------------------
# All file-based judges at once.

@dataclasses.dataclass
class Judgement:
    """Our parser, tshark and ipfixDump over one collector's messages.
    ``problems``: everything any of them complained about (empty means
    all three accept the stream)."""

    session: Session
    tshark: TsharkDecode
    ipfixdump_ok: bool
    ipfixdump_output: str

    @property
    def problems(self):
        found = [f"parser: {p}" for p in self.session.problems]
        found += [f"tshark: {w}" for w in self.tshark.warnings]
        if not self.ipfixdump_ok:
            found.append(f"ipfixDump: {self.ipfixdump_output[:2000]}")
        return found


def judge_collector(collector, directory):
    """Write ``collector``'s messages as ``directory``/capture.pcap and
    capture.ipfix and read them with our parser, tshark and ipfixDump.
    """
    pcap = os.path.join(str(directory), "capture.pcap")
    ipfix = os.path.join(str(directory), "capture.ipfix")
    collector.write_pcap(pcap)
    collector.write_ipfix_file(ipfix)
    ok, output = ipfixdump_check(ipfix)
    return Judgement(parse_collector(collector),
                     tshark_decode(pcap, collector.port), ok, output)


__all__ = [
    "FIELDS", "ENTERPRISE_FIELDS", "FieldSpec", "Template", "DataRecord",
    "IpfixSet",
    "Message", "Session", "parse_messages", "parse_datagrams",
    "parse_collector", "TsharkDecode", "tshark_decode", "tshark_records",
    "NfcapdCollector", "nfdump_records", "NfacctdCollector",
    "nfacctd_records", "ipfixdump_check", "ipfixdump_stats",
    "Judgement", "judge_collector",
]
