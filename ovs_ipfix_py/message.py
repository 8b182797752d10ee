"""IPFIX messages (RFC 7011): header, sets, sequence numbers, size bound.

A ``MessageWriter`` serves one exporting process, whose messages go to
every collector of an exporter.  It keeps, per observation domain, the
sequence number, the templates already sent and when they were last
sent, and packs data records into as few messages as fit under the
configured maximum size, records of one template in one set.

RFC 7011 section 3.1: "Sequence Number: Incremental sequence counter
modulo 2^32 of all IPFIX Data Records sent in the current stream from
the current Observation Domain by the Exporting Process" -- so it counts
data records (options data included), not messages or templates, and
each domain counts on its own.

Section 8: "the Exporting Process MUST send the Template Records before
the Data Records that use them": a template not yet sent in a domain is
put in a template set at the head of the message carrying its first
data.  Section 8.4 (UDP): templates are re-sent every
``template_interval`` s (``refresh_due``/``template_messages``).

Export time (header) is in seconds; OVS rounds it up to the next whole
second so that the delta-microsecond timestamps of records, which count
back from it, are never negative.  We do the same.
"""

from __future__ import annotations

import math
import struct
from typing import Dict, Iterable, List, NamedTuple, Sequence, Tuple

IPFIX_VERSION = 10
SET_ID_TEMPLATE = 2
SET_ID_OPTIONS_TEMPLATE = 3
HEADER = struct.Struct("!HHIII")   # version, length, export time, seq, domain
SET_HEADER = struct.Struct("!HH")  # set id, length
U32_MASK = 0xFFFFFFFF


def export_time(now: float) -> int:
    """The header's export time (s) for ``now``: rounded up, as OVS."""
    return int(math.ceil(now)) & U32_MASK


class Message(bytes):
    """An encoded message; ``domain`` and ``records`` (data records in it,
    options data included) ride along for accounting, and for the flow
    records it carries from :class:`RecordBlock` groups: how many
    (``flows``) and their ``packets`` and ``octets`` totals (what is
    not sent if the message is lost, RFC 7011 section 4.3)."""

    domain: int = 0
    records: int = 0
    flows: int = 0
    packets: int = 0
    octets: int = 0


class RecordBlock(NamedTuple):
    """Data records of one template, each ``length`` bytes, back to back
    in ``data``; ``packets`` and ``octets`` give each record's counts
    for the not-sent totals.  Messages take them a slice at a time."""

    data: bytes
    length: int
    packets: Sequence[int]
    octets: Sequence[int]


class DomainState:
    """Per observation domain: sequence number and templates sent."""

    __slots__ = ("sequence", "templates", "options_templates",
                 "last_refresh")

    def __init__(self):
        self.sequence = 0
        self.templates: Dict[int, bytes] = {}        # id -> record
        self.options_templates: Dict[int, bytes] = {}
        self.last_refresh = None


class MessageWriter:
    """Packs template and data records into messages.

    ``max_size``: the largest message in bytes (RFC 7011 section 10.3.3:
    a message over UDP must fit the path MTU; at least 512).
    ``template_interval``: seconds between template refreshes.
    """

    def __init__(self, max_size: int = 1400, template_interval: int = 600):
        if max_size < 512:
            raise ValueError("max message size %d is below 512 bytes"
                             % max_size)
        self.max_size = max_size
        self.template_interval = template_interval
        self.domains: Dict[int, DomainState] = {}

    def domain(self, domain_id: int) -> DomainState:
        state = self.domains.get(domain_id)
        if state is None:
            state = self.domains[domain_id] = DomainState()
        return state

    def forget_templates(self) -> None:
        """Send every template afresh before the next data in each domain
        (new options, or a collector that joined); sequence numbers go on.
        """
        for state in self.domains.values():
            state.templates.clear()
            state.options_templates.clear()
            state.last_refresh = None

    def refresh_due(self, now: float) -> List[int]:
        """Domains whose templates are due for re-sending at ``now``."""
        return [d for d, s in self.domains.items()
                if (s.templates or s.options_templates)
                and s.last_refresh is not None
                and now >= s.last_refresh + self.template_interval]

    def next_refresh(self):
        """The earliest time (s) a template refresh is due, or None."""
        times = [s.last_refresh + self.template_interval
                 for s in self.domains.values()
                 if s.last_refresh is not None
                 and (s.templates or s.options_templates)]
        return min(times) if times else None

    def template_messages(self, domain_id: int, now: float) -> List[Message]:
        """Every template known in the domain, for a periodic refresh."""
        state = self.domain(domain_id)
        state.last_refresh = now
        builder = _Builder(self, domain_id, state, now)
        builder.add_templates(SET_ID_TEMPLATE, list(state.templates.values()))
        builder.add_templates(SET_ID_OPTIONS_TEMPLATE,
                              list(state.options_templates.values()))
        return builder.finish()

    def data_messages(self, domain_id: int, now: float,
                      groups: Iterable[Tuple[int, bytes, Sequence]],
                      options: bool = False) -> List[Message]:
        """Messages carrying ``groups`` of data records in one domain.

        Each group is (template id, template record, records), records
        being a list of encoded data records (bytes) or a
        :class:`RecordBlock`.  A template not yet sent in this domain
        goes first, in the same message as its first data.  ``options``:
        the templates are options templates (set id 3).
        """
        state = self.domain(domain_id)
        builder = _Builder(self, domain_id, state, now)
        known = state.options_templates if options else state.templates
        set_id = SET_ID_OPTIONS_TEMPLATE if options else SET_ID_TEMPLATE
        for tid, template_record, records in groups:
            if tid not in known:
                known[tid] = template_record
                if state.last_refresh is None:
                    state.last_refresh = now
                builder.add_templates(set_id, [template_record])
            if isinstance(records, RecordBlock):
                builder.add_block(tid, records)
            else:
                builder.add_data(tid, records)
        return builder.finish()


class _Builder:
    """Accumulates sets into messages no larger than ``max_size``."""

    def __init__(self, writer, domain_id, state, now):
        self.max_size = writer.max_size
        self.domain_id = domain_id
        self.state = state
        self.export_time = export_time(now)
        self.messages: List[Message] = []
        self._parts: List[bytes] = []
        self._size = HEADER.size
        self._records = 0
        self._flows = 0
        self._packets = 0
        self._octets = 0
        self._set_id = None
        self._set_parts: List[bytes] = []
        self._set_size = 0

    def _close_set(self):
        if self._set_id is not None and self._set_parts:
            self._parts.append(SET_HEADER.pack(
                self._set_id, SET_HEADER.size + self._set_size))
            self._parts.extend(self._set_parts)
        self._set_id = None
        self._set_parts = []
        self._set_size = 0

    def _close_message(self):
        self._close_set()
        if not self._parts:
            return
        body = b"".join(self._parts)
        length = HEADER.size + len(body)
        msg = Message(HEADER.pack(IPFIX_VERSION, length, self.export_time,
                                  self.state.sequence, self.domain_id)
                      + body)
        msg.domain = self.domain_id
        msg.records = self._records
        msg.flows = self._flows
        msg.packets = self._packets
        msg.octets = self._octets
        self.state.sequence = (self.state.sequence + self._records) \
            & U32_MASK
        self.messages.append(msg)
        self._parts = []
        self._size = HEADER.size
        self._records = 0
        self._flows = self._packets = self._octets = 0

    def _add(self, set_id, record, is_data):
        length = len(record)
        extra = length if self._set_id == set_id else \
            length + SET_HEADER.size
        if self._size + extra > self.max_size:
            self._close_message()
            extra = length + SET_HEADER.size
            if HEADER.size + extra > self.max_size:
                raise ValueError("a record of %d bytes cannot fit a message"
                                 " of %d bytes" % (length, self.max_size))
        if self._set_id != set_id:
            self._close_set()
            self._set_id = set_id
        self._set_parts.append(record)
        self._set_size += length
        self._size += extra
        if is_data:
            self._records += 1

    def add_templates(self, set_id, records):
        for record in records:
            self._add(set_id, record, False)

    def add_data(self, tid, records):
        for record in records:
            self._add(tid, record, True)

    def add_block(self, tid, block: RecordBlock):
        """The records of ``block`` in as few messages as fit: a slice
        of the block per message, the same bytes and boundaries as
        adding them one by one."""
        data, length = block.data, block.length
        n = len(data) // length
        i = 0
        while i < n:
            extra = 0 if self._set_id == tid else SET_HEADER.size
            k = (self.max_size - self._size - extra) // length
            if k <= 0:
                if self._size == HEADER.size:
                    raise ValueError("a record of %d bytes cannot fit a "
                                     "message of %d bytes"
                                     % (length, self.max_size))
                self._close_message()
                continue
            k = min(k, n - i)
            if extra:
                self._close_set()
                self._set_id = tid
            self._set_parts.append(data[i * length:(i + k) * length])
            self._set_size += k * length
            self._size += k * length + extra
            self._records += k
            self._flows += k
            self._packets += sum(block.packets[i:i + k])
            self._octets += sum(block.octets[i:i + k])
            i += k

    def finish(self) -> List[Message]:
        self._close_message()
        return self.messages
