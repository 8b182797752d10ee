"""Reliable streams (TCP, TLS, files): sessions, buffer, reconnection.

The exporter builds each message once for all its targets, with the
sequence numbers of its own counter.  A stream is a transport session of
its own, so it rewrites what makes a message belong to a session:

- **Sequence numbers.**  RFC 7011 section 3.1: the header's sequence
  number counts "all IPFIX Data Records sent in the current stream from
  the current Observation Domain".  Each session keeps one counter per
  domain, starting at 0, and patches bytes 8-11 of every message as it
  enters the session (``msg.records`` data records, options data
  included, move the counter on).
- **Templates.**  RFC 7011 section 8: "the Exporting Process MUST send
  the Template Records before the Data Records that use them"; a new
  connection (or a new file) is a new session, which knows no template.
  The stream remembers every (options) template it was ever handed, per
  domain, and a new session starts with all of them, in messages of
  their own (sequence number 0: they carry no data record).  A data set
  whose template the session has not carried yet (its first message was
  lost to a full buffer) gets its template injected in front of it.
- **No template twice in a session.**  Over a reliable transport a
  template is sent once per session: the periodic re-sending of RFC 7011
  section 8.4 is for UDP (over TCP the session itself keeps the
  collector in step).  Template records the session has already
  carried, identical, are cut out of the messages; a message left with
  nothing is not sent.  An id given a new layout within a session is
  withdrawn first (section 8.1), in the same set, just before.

While there is no session (connecting, collector down, file not
writable) messages wait in a buffer bounded by ``buffer_size`` bytes
(``other_config:collector-buffer-size``); what does not fit is dropped
and counted (``dropped_records``; the exporter counts the records as not
sent, RFC 7011 section 4.3), never silently.  The same bound holds
while connected when the peer reads slower than we export.  A message
written in part when the session breaks is lost (counted); messages not
yet started go back to the buffer for the next session.  What the kernel
accepted but the peer never read is beyond our knowledge (TCP gives no
delivery receipts).

Reconnection backs off exponentially, 1 s doubling to 60 s (tenacity's
wait_exponential, as for unresolved targets), and starts over at 1 s
once a session was established.

Subclasses supply the session itself: ``_start`` (begin connecting),
``_progress`` (True once established), ``_write`` (non-blocking, bytes
written), ``_peer_gone`` (the peer closed or reset the connection),
``_events`` (poll events to wait for), ``_stop`` (release).
"""

from __future__ import annotations

import collections
import errno
import os
import struct
from types import SimpleNamespace
from typing import Deque, Dict, List, Optional, Tuple

import tenacity

from ovs_ipfix_py import message
from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.transport import Transport

log = RateLimitedLog("collector")

#: Default of other_config:collector-buffer-size (bytes): room for the
#: flush of a cache of about 600,000 flows on top of the kernel's socket
#: buffer (a flush is written in one burst, which even a healthy
#: collector reads after the fact), or for a collector away a while.
DEFAULT_BUFFER_SIZE = 64 << 20

_SEQUENCE = struct.Struct("!I")
_U16 = struct.Struct("!H")
_HH = struct.Struct("!HH")
_HEADER_LEN = message.HEADER.size
_SET_HEADER = message.SET_HEADER
_TEMPLATE_SETS = (message.SET_ID_TEMPLATE, message.SET_ID_OPTIONS_TEMPLATE)
#: Largest template-only message a new session starts with (bytes).
_MAX_TEMPLATE_MESSAGE = 65000

IDLE, CONNECTING, CONNECTED, BACKOFF, CLOSED = (
    "idle", "connecting", "connected", "backoff", "closed")


def template_records(set_id: int, data: bytes, start: int, end: int):
    """(template id, record bytes) of the template set in
    ``data[start:end]`` (set header included).  Element ids with the
    enterprise bit take 8 bytes (RFC 7011 section 3.2); an options
    template has a scope field count after its field count (3.4.2.2).
    Stops at padding or anything it cannot frame."""
    off = start + _SET_HEADER.size
    while off + 4 <= end:
        tid, count = _HH.unpack_from(data, off)
        if tid < 256:
            return  # padding
        p = off + 4
        if set_id == message.SET_ID_OPTIONS_TEMPLATE and count:
            p += 2
        for _ in range(count):
            if p + 4 > end:
                return
            p += 8 if _U16.unpack_from(data, p)[0] & 0x8000 else 4
        if p > end:
            return
        yield tid, data[off:p]
        off = p


def sets_of(data: bytes):
    """(set id, start, end) of each set of the message ``data``."""
    off, n = _HEADER_LEN, len(data)
    while off + _SET_HEADER.size <= n:
        set_id, length = _SET_HEADER.unpack_from(data, off)
        if length < _SET_HEADER.size or off + length > n:
            return
        yield set_id, off, off + length
        off += length


class StreamTransport(Transport):
    """A reliable stream to one target (see the module docstring)."""

    BACKOFF = tenacity.wait_exponential(multiplier=1, min=1, max=60)
    #: How a failed start is told in the log and ipfix/show.
    CONNECT_FAILED = "cannot connect"
    #: Seconds a connection (TCP and TLS handshakes) may take: a target
    #: that drops our SYNs must not wait for the kernel's minutes.
    CONNECT_TIMEOUT = 10.0

    def __init__(self, target, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 on_lost=None):
        super().__init__(target)
        self.buffer_size = buffer_size
        self.on_lost = on_lost
        self.state = IDLE
        self.sessions = 0           # sessions established so far
        self.last_error: Optional[str] = None
        self._attempts = 0
        self._retry_at: Optional[float] = None   # None: at the next run
        self._connect_deadline = 0.0
        self._now = 0.0
        # Messages waiting for a session (as the exporter built them).
        self._pending: Deque = collections.deque()
        self._pending_bytes = 0
        # Handed to the session, not fully written: [message or None
        # (template messages of the session), bytes]; _offset bytes of
        # the first are written.
        self._out: Deque[List] = collections.deque()
        self._out_bytes = 0
        self._offset = 0
        # Every template seen: domain -> {template id: (set id, record)}.
        self._templates: Dict[int, Dict[int, Tuple[int, bytes]]] = {}
        # This session: sequence number and templates carried, per domain.
        self._sequence: Dict[int, int] = {}
        self._carried: Dict[int, Dict[int, bytes]] = {}

    # -- the interface ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    @property
    def buffered_messages(self) -> int:
        return len(self._pending) + sum(1 for m, _ in self._out if m)

    @property
    def buffered_records(self) -> int:
        return sum(m.records for m in self._pending) + sum(
            m.records for m, _ in self._out if m)

    def state_name(self) -> str:
        if self.state == CONNECTED:
            return "connected"
        if self.state == CONNECTING:
            return "connecting"
        if self.last_error:
            return "not connected (%s)" % self.last_error
        return "not connected"

    def set_buffer_size(self, size: int) -> None:
        self.buffer_size = size

    def send(self, msg) -> bool:
        self._learn(msg)
        queued = self._pending_bytes + self._out_bytes
        if (queued or self.state != CONNECTED) \
                and queued + len(msg) > self.buffer_size:
            # Returning False is the report: no on_lost call too.
            self._drop(msg, "buffer full (%d bytes)" % self.buffer_size,
                       report=False)
            return False
        self._pending.append(msg)
        self._pending_bytes += len(msg)
        if self.state == CONNECTED:
            self._feed()
            self._flush()
        return True

    def run(self, now: float) -> None:
        self._now = now
        if self.state in (IDLE, BACKOFF) and (
                self._retry_at is None or now >= self._retry_at):
            self._connect(now)
        if self.state == CONNECTING:
            if now >= self._connect_deadline:
                self._fail(now, "%s: timed out after %.0f s"
                           % (self.CONNECT_FAILED, self.CONNECT_TIMEOUT))
                return
            try:
                done = self._progress()
            except OSError as e:
                self._fail(now, "%s: %s" % (self.CONNECT_FAILED, _reason(e)))
                return
            if done:
                self._established(now)
        if self.state == CONNECTED:
            try:
                gone = self._peer_gone()
            except OSError as e:
                self._fail(now, "connection lost: %s" % _reason(e))
                return
            if gone:
                self._fail(now, "collector closed the connection",
                           error=False)
                return
            self._flush()

    def wait(self, poller) -> None:
        if self.state in (CONNECTING, CONNECTED):
            events = self._events()
            if events:
                poller.fd_wait(self._fileno(), events)

    def next_deadline(self) -> Optional[float]:
        if self.state in (IDLE, BACKOFF):
            return self._retry_at if self._retry_at is not None \
                else float("-inf")
        if self.state == CONNECTING:
            return self._connect_deadline
        return None

    def close(self) -> None:
        """One last write of what is queued (best effort, bounded by
        the subclass's ``_final_flush``), then every message still
        queued is counted lost."""
        if self.state == CONNECTED:
            try:
                self._final_flush()
            except OSError:
                pass
        self._stop()
        self.state = CLOSED
        for m, _ in self._out:
            if m is not None:
                self._drop(m, None)
        for m in self._pending:
            self._drop(m, None)
        self._out.clear()
        self._pending.clear()
        self._out_bytes = self._pending_bytes = self._offset = 0

    # -- the session ------------------------------------------------

    def _connect(self, now: float) -> None:
        try:
            done = self._start()
        except OSError as e:
            self._fail(now, "%s: %s" % (self.CONNECT_FAILED, _reason(e)))
            return
        self.state = CONNECTING
        self._connect_deadline = now + self.CONNECT_TIMEOUT
        if done:
            self._established(now)

    def _established(self, now: float) -> None:
        self.state = CONNECTED
        self._attempts = 0
        self.sessions += 1
        self.last_error = None
        self._sequence = {}
        self._carried = {}
        log.info("%s: session %d established", self.spec, self.sessions)
        for msg in self._template_messages(now):
            self._out.append([None, msg])
            self._out_bytes += len(msg)
        self._feed()
        self._flush()

    def _fail(self, now: float, why: str, error: bool = True) -> None:
        """The session (or the attempt) ended: requeue, back off."""
        if error:
            self.tx_errors += 1
        self.last_error = why
        self._stop()
        if self._out:
            if self._offset:
                # Cut in the middle: the collector cannot use it.
                m, _ = self._out.popleft()
                if m is not None:
                    self._drop(m, None)
            for m, _ in reversed(self._out):
                if m is not None:
                    self._pending.appendleft(m)
                    self._pending_bytes += len(m)
            self._out.clear()
            self._out_bytes = self._offset = 0
        self._attempts += 1
        delay = self.BACKOFF(SimpleNamespace(attempt_number=self._attempts))
        self._retry_at = now + delay
        self.state = BACKOFF
        log.warn("%s: %s; next try in %ds", self.spec, why, delay)

    def _drop(self, msg, why: Optional[str], report: bool = True) -> None:
        self.dropped_records += msg.records
        if why is not None:
            self.tx_errors += 1
            log.warn("%s: %s: message of %d records dropped", self.spec,
                     why, msg.records)
        if report and self.on_lost is not None:
            self.on_lost(msg)

    def _feed(self) -> None:
        """Move the buffer into the session (sequence numbers given
        now: they count what this session carries)."""
        while self._pending:
            msg = self._pending.popleft()
            self._pending_bytes -= len(msg)
            data = self._in_session(msg)
            if data is not None:
                self._out.append([msg, data])
                self._out_bytes += len(data)

    def _flush(self) -> None:
        while self._out:
            entry = self._out[0]
            data = entry[1]
            try:
                n = self._write(memoryview(data)[self._offset:])
            except OSError as e:
                self._fail(self._now, "write failed: %s" % _reason(e))
                return
            if not n:
                return
            self._offset += n
            if self._offset < len(data):
                return
            self._out.popleft()
            self._out_bytes -= len(data)
            self._offset = 0
            self.tx_packets += 1
            self.tx_bytes += len(data)

    # -- templates and sequence numbers -----------------------------------

    def _learn(self, msg) -> None:
        """Remember the templates ``msg`` carries (for later sessions)."""
        for set_id, start, end in sets_of(msg):
            if set_id in _TEMPLATE_SETS:
                known = self._templates.setdefault(msg.domain, {})
                for tid, record in template_records(set_id, msg, start,
                                                    end):
                    known[tid] = (set_id, record)

    def _template_messages(self, now: float) -> List[bytes]:
        """Every template known, per domain, for a new session."""
        out = []
        for domain, known in self._templates.items():
            carried = self._carried.setdefault(domain, {})
            parts: List[bytes] = []
            size = _HEADER_LEN
            for set_id in _TEMPLATE_SETS:
                records = [(tid, r) for tid, (s, r) in known.items()
                           if s == set_id]
                i = 0
                while i < len(records):
                    chunk = []
                    room = _MAX_TEMPLATE_MESSAGE - size - _SET_HEADER.size
                    while i < len(records) and len(records[i][1]) <= room:
                        chunk.append(records[i][1])
                        carried[records[i][0]] = records[i][1]
                        room -= len(records[i][1])
                        i += 1
                    if chunk:
                        body = b"".join(chunk)
                        parts.append(_SET_HEADER.pack(
                            set_id, _SET_HEADER.size + len(body)) + body)
                        size += _SET_HEADER.size + len(body)
                    elif parts:
                        out.append(self._header(parts, domain, now))
                        parts, size = [], _HEADER_LEN
                    else:
                        i += 1   # cannot fit any message: never ours
            if parts:
                out.append(self._header(parts, domain, now))
        return out

    def _header(self, parts, domain: int, now: float) -> bytes:
        body = b"".join(parts)
        return message.HEADER.pack(
            message.IPFIX_VERSION, _HEADER_LEN + len(body),
            message.export_time(now), self._sequence.get(domain, 0),
            domain) + body

    def _in_session(self, msg) -> Optional[bytes]:
        """``msg`` as this session sends it: templates already carried
        cut out, missing ones put in, sequence number of the session;
        None when nothing is left to send."""
        domain = msg.domain
        carried = self._carried.setdefault(domain, {})
        parts = None   # None: the sets go as they are
        for set_id, start, end in sets_of(msg):
            if set_id in _TEMPLATE_SETS:
                keep = []
                for tid, record in template_records(set_id, msg, start,
                                                    end):
                    old = carried.get(tid)
                    if old != record:
                        if old is not None:
                            # RFC 7011 section 8.1: an id is redefined
                            # in a session only after its withdrawal
                            # (a record of the id and 0 fields).
                            keep.append(_HH.pack(tid, 0))
                        carried[tid] = record
                        keep.append(record)
                if parts is None:
                    parts = [msg[_HEADER_LEN:start]]
                if keep:
                    body = b"".join(keep)
                    parts.append(_SET_HEADER.pack(
                        set_id, _SET_HEADER.size + len(body)) + body)
                continue
            if set_id >= 256 and set_id not in carried:
                known = self._templates.get(domain, {}).get(set_id)
                if known is not None:
                    t_set, record = known
                    carried[set_id] = record
                    if parts is None:
                        parts = [msg[_HEADER_LEN:start]]
                    parts.append(_SET_HEADER.pack(
                        t_set, _SET_HEADER.size + len(record)) + record)
            if parts is not None:
                parts.append(msg[start:end])
        seq = self._sequence.get(domain, 0)
        self._sequence[domain] = (seq + msg.records) & message.U32_MASK
        if parts is None:
            return msg[:8] + _SEQUENCE.pack(seq) + msg[12:]
        body = b"".join(parts)
        if not body:
            return None
        return msg[:2] + _U16.pack(_HEADER_LEN + len(body)) + msg[4:8] \
            + _SEQUENCE.pack(seq) + msg[12:16] + body

    # -- what subclasses supply -------------------------------------------

    def _start(self) -> bool:
        """Begin a session; True if established at once.  OSError:
        failed."""
        raise NotImplementedError

    def _progress(self) -> bool:
        """Advance the connection; True once established."""
        return True

    def _write(self, data) -> int:
        """Write without blocking; bytes written (0: try later)."""
        raise NotImplementedError

    def _peer_gone(self) -> bool:
        return False

    def _events(self) -> int:
        return 0

    def _fileno(self):
        raise NotImplementedError

    def _final_flush(self) -> None:
        self._flush()

    def _stop(self) -> None:
        raise NotImplementedError


def _reason(e: BaseException) -> str:
    """A short reason for a log line: "Connection refused
    (ECONNREFUSED)", or the text of an ssl error."""
    if hasattr(e, "library"):   # ssl.SSLError: its own text says it
        return getattr(e, "verify_message", None) or str(e)
    if isinstance(e, OSError) and e.errno and not e.strerror:
        return errno.errorcode.get(e.errno, str(e))
    if isinstance(e, OSError) and e.errno and e.strerror:
        return "%s (%s)" % (os.strerror(e.errno),
                            errno.errorcode.get(e.errno, e.errno))
    return str(e) or type(e).__name__
