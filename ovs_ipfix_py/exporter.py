"""One exporter: flow cache + message writer + collectors + statistics.

There is one exporter per bridge with ``Bridge.ipfix`` set (bridge
sampling) and one per (bridge, collector set id) (flow sampling), as in
OVS.  Samples go in with ``sample_bridge()`` / ``sample_flow()``;
``run(now)`` expires what is due and sends it, re-sends templates and
exporter statistics on their intervals; ``next_deadline()`` says when
``run`` next has work, so a poll loop can sleep until exactly then.

An export never holds the caller's loop for long, whatever the cache
holds: flows that leave (a flush, an expiry burst, a full cache) wait in
a queue, in order, and ``run`` sends them a slice at a time
(``EXPORT_SLICE`` flows) for at most ``EXPORT_BUDGET`` s per call;
``next_deadline`` says "now" while anything waits, so a poll loop reads
its channel between two slices.  A flush detaches the whole cache (a new
empty one takes the samples that follow) and sends the detached flows
from it, a slice at a time, as forced end; flows that leave keep the
flowEndReason they left with, however late their slice goes.  Queued
flows go to the collectors, writer and virtualObsID encoding of the
time they were cached under (an option change flushes first).

All times are seconds (float) on one clock passed in as ``now``: the
caller's wall clock, since the IPFIX header carries wall-clock export
time.  Deadlines are computed and waited on that same clock (OVS
computes its expiry deadline on the wall clock but waits on the
monotonic one, so its timeouts fire late).
"""

from __future__ import annotations

import collections
import struct
import time
import zlib
from collections import deque
from typing import Dict, List, Optional

from ovs_ipfix_py import fastpath, flowcache, interfaces, message, packet
from ovs_ipfix_py import templates as t
from ovs_ipfix_py.collector import MAX_UDP_PAYLOAD, CollectorSet
from ovs_ipfix_py.flowcache import U64_MAX
from ovs_ipfix_py.options import (
    UINT16_MAX,
    UINT32_MAX,
    BridgeExporterOptions,
    FlowExporterOptions,
)
from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.upcall import BridgeSample, FlowSample

log = RateLimitedLog("exporter")

#: Cache key prefix: observation domain id, template id.
KEY_PREFIX = struct.Struct("!IH")
#: The aggregates after a record's key, one pack per record, by (IP
#: layout, TCP layout): flowStart/EndMilliseconds, packetDeltaCount,
#: layer2OctetDeltaCount, flowEndReason; then for IP octetDeltaCount,
#: octetDeltaSumOfSquares, minimum/maximumIpTotalLength; then for TCP
#: tcpControlBits (templates.py lists the same elements).
_AGG_LAYOUT = {
    (False, False): struct.Struct("!QQQQB").pack,
    (True, False): struct.Struct("!QQQQBQQQQ").pack,
    (True, True): struct.Struct("!QQQQBQQQQH").pack,
}
_STATS_RECORD = struct.Struct("!IQQQ")
#: Flows taken, packed and sent per slice of an export.
EXPORT_SLICE = 2048
#: Seconds one run() (or a sliced flush) may spend sending slices (at
#: least one slice goes): then the loop reads its channel again.
EXPORT_BUDGET = 0.02
_BFD_PORTS = (3784, 3785)
#: Bounds on the key-part caches (port pairs, tunnel values): a cache
#: past its bound is emptied and refilled, so garbage port numbers or a
#: tunnel source port per inner flow cannot grow it without end.
_PART_CACHE_MAX = 4096
_BFD_DPORTS = (b"\x0e\xc8", b"\x0e\xc9")
#: Template id of each layout, by tunnelled * 60 + ((l2 * 3 + l3) * 5 +
#: l4) * 2 + direction, as big-endian u16: the C key builder's table.
_TEMPLATE_IDS = b"".join(
    struct.pack("!H", t.template_id(l2, l3, l4, d, tun))
    for tun in (False, True)
    for l2 in (t.L2_ETH, t.L2_VLAN)
    for l3 in (t.L3_NONE, t.L3_IPV4, t.L3_IPV6)
    for l4 in (t.L4_NONE, t.L4_TCP, t.L4_UDP, t.L4_SCTP, t.L4_ICMP)
    for d in (t.INGRESS, t.EGRESS))


class ExporterStats:
    """Counters, named and printed as ``ovs-ofctl dump-ipfix-bridge``.

    ``flows``: flows created; ``current_flows``: flows cached now;
    ``pkts``: samples taken; ``ipv4_ok``/``ipv6_ok``/``ipv4_errs``/
    ``ipv6_errs``/``errs`` classify them as OVS does; ``tx_pkts``/
    ``tx_errs``: messages sent/failed, per collector (a TCP, TLS or
    file target counts a message it queued as sent, and one it loses
    later as failed).  Beyond OVS:
    ``records`` exported, the RFC 7011 section 4.3 not-sent totals,
    flows exported by flowEndReason (``ended_idle``, ``ended_active``,
    ``ended_eof``, ``ended_forced``, ``ended_lack``), and samples
    dropped before the cache: ``dropped_disabled`` (their direction's
    enable-input/output-sampling is false), ``dropped_bad_probability``
    (a flow sample with probability 0).
    """

    __slots__ = ("flows", "current_flows", "pkts", "ipv4_ok", "ipv6_ok",
                 "tx_pkts", "errs", "ipv4_errs", "ipv6_errs", "tx_errs",
                 "records", "not_sent_flows", "not_sent_packets",
                 "not_sent_octets", "dropped_disabled",
                 "dropped_bad_probability", "ended_idle", "ended_active",
                 "ended_eof", "ended_forced", "ended_lack")

    #: flowEndReason (1..5) -> its counter, and how show() names it.
    ENDED = {1: ("ended_idle", "idle timeout"),
             2: ("ended_active", "active timeout"),
             3: ("ended_eof", "end of flow"),
             4: ("ended_forced", "forced end"),
             5: ("ended_lack", "lack of resources")}

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def format(self, indent: str = "") -> str:
        """Two lines, in the words of ovs-ofctl dump-ipfix-bridge."""
        return ("flows=%d, current flows=%d, sampled pkts=%d, ipv4 ok=%d, "
                "ipv6 ok=%d, tx pkts=%d\n%spkts errs=%d, ipv4 errs=%d, "
                "ipv6 errs=%d, tx errs=%d"
                % (self.flows, self.current_flows, self.pkts, self.ipv4_ok,
                   self.ipv6_ok, self.tx_pkts, indent, self.errs,
                   self.ipv4_errs, self.ipv6_errs, self.tx_errs))

    def format_ended(self) -> str:
        """Flows exported by end reason, one line."""
        return "ended: " + ", ".join(
            "%s=%d" % (label, getattr(self, name))
            for name, label in self.ENDED.values())

    def count_ended(self, reasons) -> None:
        """Count expired flows by flowEndReason: ``reasons`` maps a
        reason to how many flows left by it (group_expired's)."""
        for reason, n in reasons.items():
            name = self.ENDED.get(reason)
            if name is not None:
                setattr(self, name[0], getattr(self, name[0]) + n)


class _Sink:
    """Where queued flows go: the message writer, collectors and
    virtualObsID encoding of the options they were cached under.
    ``retired``: the options have moved on to other collectors; once
    its last queued flow is sent, these send statistics and close."""

    __slots__ = ("writer", "collectors", "vobs", "vobs_offset", "retired")

    def __init__(self, writer, collectors, vobs, vobs_offset):
        self.writer = writer
        self.collectors = collectors
        self.vobs = vobs
        self.vobs_offset = vobs_offset
        self.retired = False


class _Expired:
    """Flows that left the cache, waiting to be sent, in order."""

    __slots__ = ("sink", "flows", "pos")

    def __init__(self, sink: _Sink, flows: list):
        self.sink = sink
        self.flows = flows
        self.pos = 0

    def __len__(self) -> int:
        return len(self.flows) - self.pos

    def take(self, n: int) -> list:
        out = self.flows[self.pos:self.pos + n]
        self.pos += len(out)
        return out


class _Flushed:
    """A cache detached by a flush: its flows leave as forced end, in
    start order, a slice at a time (``FlowCache.take_oldest``), and its
    memory with them (freeing a million flows at once takes longer than
    a slice)."""

    __slots__ = ("sink", "cache")

    def __init__(self, sink: _Sink, cache: flowcache.FlowCache):
        self.sink = sink
        self.cache = cache
        cache.detach()

    def __len__(self) -> int:
        # (What take_oldest can take: the order, not the index.)
        return len(self.cache.order)

    def take(self, n: int) -> list:
        return self.cache.take_oldest(n, flowcache.FORCED_END)


class Exporter:
    """An IPFIX exporter for one bridge or one flow collector set."""

    def __init__(self, options, now: float):
        self.options = options
        self.stats = ExporterStats()
        self.is_bridge = isinstance(options, BridgeExporterOptions)
        if not (self.is_bridge
                or isinstance(options, FlowExporterOptions)):
            raise TypeError("not exporter options: %r" % (options,))
        self.exporting_process_id = zlib.crc32(
            repr(options.key).encode()) & UINT32_MAX
        self.collectors = self._collector_set(options.export, now)
        self.writer = message.MessageWriter(
            min(options.export.max_message_size, MAX_UDP_PAYLOAD),
            options.export.template_interval)
        self.cache = self._new_cache()
        #: Flows waiting to be sent, oldest first (_Expired, _Flushed).
        self._queue = deque()
        self.next_stats = now + options.export.stats_interval
        #: {OpenFlow port: interfaces.Interface} of the bridge (OVSDB),
        #: set by set_ports(); unknown ports export what OVS exports.
        self.ports: interfaces.Ports = {}
        self._derive_params()

    def _new_cache(self) -> flowcache.FlowCache:
        cache_opts = self.options.export.cache
        return flowcache.FlowCache(
            cache_opts.active_timeout, cache_opts.max_flows,
            idle_timeout=cache_opts.idle_timeout,
            tcp_end_of_flow=cache_opts.tcp_end_of_flow)

    # -- configuration ----------------------------------------------------

    def _derive_params(self):
        """Values derived from the options, recomputed when they change:
        the bridge sample count, the fast path's key heads, the encoded
        virtualObsID; the key parts built from ports and tunnels."""
        o = self.options
        if self.is_bridge:
            self._count = UINT32_MAX // o.probability
        self._forget_parts()
        # What the C loop needs to know (fastpath.C.sample_batch).
        if self.is_bridge:
            self._c_params = (
                BridgeSample, FlowSample, True, self._count,
                o.obs_domain_id, o.obs_point_id & UINT32_MAX,
                o.enable_input_sampling, o.enable_output_sampling,
                self._iface_part, self._tunnel_part, _TEMPLATE_IDS)
        else:
            self._c_params = (BridgeSample, FlowSample, False, 0, 0, 0,
                              False, False, self._iface_part,
                              self._tunnel_part, _TEMPLATE_IDS)
        # other_config:virtual_obs_id: sent after the key of every record
        # (a variable-length string, RFC 7011 section 7: 1-byte length),
        # in the templates that carry virtualObsID.
        vobs = o.export.virtual_obs_id
        if vobs is None:
            self._vobs, self._vobs_offset = b"", 0
        else:
            raw = vobs.encode("utf-8")[:254]
            self._vobs = bytes((len(raw),)) + raw
            self._vobs_offset = t.VIRTUAL_OBS_OFFSET
        self._sink = _Sink(self.writer, self.collectors, self._vobs,
                           self._vobs_offset)

    def _forget_parts(self) -> None:
        self._heads = {}
        # (input port, output port or None, direction) -> interface part.
        self._ifaces: Dict = {}
        # (port, upcall.Tunnel) -> tunnel part (b"": not tunnelled).
        self._tunnels: Dict = {}

    def set_ports(self, ports: interfaces.Ports) -> None:
        """The bridge's ports as OVSDB has them now.  Ports that come, go
        or are renumbered change the key parts of the samples that follow;
        cached flows stay (a port change is no option change)."""
        if ports != self.ports:
            self.ports = dict(ports)
            self._forget_parts()

    def _iface_part(self, in_port: int, out_port: Optional[int],
                    direction: int) -> bytes:
        """interfaces.iface_part, built once per port pair."""
        k = (in_port, out_port, direction)
        part = self._ifaces.get(k)
        if part is None:
            if len(self._ifaces) >= _PART_CACHE_MAX:
                self._ifaces.clear()
            part = self._ifaces[k] = interfaces.iface_part(
                self.ports, in_port, out_port, direction == t.EGRESS)
        return part

    def _tunnel_part(self, in_port: int, out_port: Optional[int],
                     tunnel) -> bytes:
        """interfaces.tunnel_part for a sample's tunnel metadata, built
        once per (port, Tunnel).  As OVS: the input port's tunnel for a
        sample without output port, else the output port's; nothing with
        other_config:enable-tunnel-sampling=false."""
        if tunnel is None or not self.options.export.enable_tunnel_sampling:
            return b""
        port = in_port if out_port is None else out_port
        k = (port, tunnel)
        part = self._tunnels.get(k)
        if part is None:
            if len(self._tunnels) >= _PART_CACHE_MAX:
                self._tunnels.clear()
            part = self._tunnels[k] = interfaces.tunnel_part(
                self.ports.get(port), tunnel)
        return part

    @property
    def name(self) -> str:
        return self.options.name

    def reconfigure(self, options, now: float, sliced: bool = False
                    ) -> None:
        """Apply new options: first flush everything cached as forced end
        to the current collectors, then switch.  New sockets (and so new
        transport sessions, with sequence numbers from 0) only when the
        targets changed; templates are sent afresh either way.  With
        ``sliced`` the flush is sent by the next run() calls, a slice at
        a time (see ``flush``), to the collectors of the old options.
        """
        if options == self.options:
            return
        self.flush(now, sliced)
        old = self.options.export
        new = options.export
        self.options = options
        if new.targets != old.targets:
            # These transport sessions end here: their last message is
            # the exporting process statistics, as on close() -- after
            # the flushed flows, when those wait in the queue.
            if self._queue:
                self._sink.retired = True
            else:
                self._send_stats(now)
                self.collectors.close()
            self.collectors = self._collector_set(new, now)
            self.writer = message.MessageWriter(
                min(new.max_message_size, MAX_UDP_PAYLOAD),
                new.template_interval)
        else:
            self.writer.max_size = min(new.max_message_size,
                                       MAX_UDP_PAYLOAD)
            self.writer.template_interval = new.template_interval
            self.writer.forget_templates()
            self.collectors.set_buffer_size(new.collector_buffer_size)
        self.cache.active_timeout = new.cache.active_timeout
        self.cache.max_flows = new.cache.max_flows
        self.cache.set_rules(new.cache.idle_timeout,
                             new.cache.tcp_end_of_flow)
        if new.stats_interval != old.stats_interval:
            self.next_stats = now + new.stats_interval
        self._derive_params()

    # -- transports (issue 13) -----------------------------------------

    def _collector_set(self, export, now: float) -> CollectorSet:
        return CollectorSet(export.targets, now,
                            export.collector_buffer_size, self._lost)

    def _lost(self, msg: message.Message) -> None:
        """A message a stream accepted and lost later (its buffer
        overflowed, its connection broke in the middle of it, or it was
        still queued at close): a transmit error, its records not sent
        (RFC 7011 section 4.3)."""
        st = self.stats
        st.tx_errs += 1
        st.not_sent_flows += msg.flows
        st.not_sent_packets += msg.packets
        st.not_sent_octets += msg.octets

    def wait(self, poller) -> None:
        """The transports' sockets (connecting, writing, EOF), those
        of retired collectors still sending queued flows included."""
        self.collectors.wait(poller)
        for sink in self._retired_sinks():
            sink.collectors.wait(poller)

    def _retired_sinks(self) -> List[_Sink]:
        """The retired sinks queued flows still go to (once each)."""
        out = []
        for item in self._queue:
            if item.sink.retired and item.sink not in out:
                out.append(item.sink)
        return out

    def reopen(self) -> None:
        """File targets start a new file (log rotation)."""
        self.collectors.reopen()

    def close(self, now: float) -> None:
        """Flush as forced end, send what waits and final statistics,
        close sockets."""
        self.flush(now)
        self._send_stats(now)
        self.collectors.close()

    # -- samples ----------------------------------------------------------

    def sample_bridge(self, frame: bytes, orig_len: int, input_port: int,
                      output_port: Optional[int], now: float,
                      probability: Optional[int] = None,
                      tunnel=None) -> None:
        """One bridge sample; counts UINT32_MAX // probability packets.

        ``probability``: the sample's own (32-bit, as the channel carries
        it); None takes the configured sampling rate's.  ``output_port``
        None means an ingress sample.  ``tunnel``: its upcall.Tunnel, or
        None.  BFD packets (UDP to port 3784/3785) are skipped, as OVS
        skips them.
        """
        o = self.options
        if output_port is None:
            if not o.enable_input_sampling:
                self.stats.dropped_disabled += 1
                return
            direction = t.INGRESS
        else:
            if not o.enable_output_sampling:
                self.stats.dropped_disabled += 1
                return
            direction = t.EGRESS
        if probability:
            count = UINT32_MAX // probability
        else:
            count = self._count
        self._sample(frame, orig_len, count, o.obs_domain_id,
                     o.obs_point_id, direction, input_port, output_port,
                     now, True, tunnel)

    def sample_flow(self, frame: bytes, orig_len: int, input_port: int,
                    output_port: Optional[int], probability: int,
                    obs_domain_id: int, obs_point_id: int, direction: int,
                    now: float, tunnel=None) -> None:
        """One flow sample (OpenFlow ``sample`` action).

        Counts 65535 // ``probability`` packets.  ``direction`` as OVS's
        NX_ACTION_SAMPLE_*: 1 ingress, 2 egress, 0 by output port.
        """
        if probability <= 0:
            self.stats.dropped_bad_probability += 1
            log.warn("%s: flow sample with probability 0 dropped",
                     self.name)
            return
        if direction == 1:
            d = t.INGRESS
        elif direction == 2:
            d = t.EGRESS
        else:
            d = t.INGRESS if output_port is None else t.EGRESS
        self._sample(frame, orig_len, UINT16_MAX // probability,
                     obs_domain_id, obs_point_id, d, input_port,
                     output_port, now, False, tunnel)

    def sample_batch(self, samples, now: float) -> None:
        """Many samples at once: the hot path.

        ``samples``: a list of upcall.BridgeSample and upcall.FlowSample
        values, in any mix for a bridge exporter, FlowSample only for a
        flow exporter (Daemon.handle_upcalls groups them so); each is
        aggregated exactly as
        ``sample_bridge`` or ``sample_flow`` would (a bridge sample counts
        UINT32_MAX // its own probability packets: the datapath may have
        sampled it at a rate the IPFIX row no longer says).  With the C
        extension built (``fastpath.C``) the key of every frame kind is
        built in C and the cache updated there (same results:
        ``tests/test_fastpath.py``), tunnel parts included; a sample it
        leaves (a value out of range) goes through the methods below.  Without
        it, plain IPv4 bridge samples take the Python twin of that loop
        (``_sample_batch_py``: it doubles the pure-Python speed, see
        tools/BENCHMARKS.md) and everything else goes through those
        methods (``packet.parse`` + ``FlowCache.add``).
        """
        if fastpath.C is not None:
            batch = fastpath.C.sample_batch
            if type(samples) is not list:
                samples = list(samples)
            params = self._c_params
            cache = self.cache
            st = self.stats
            n = len(samples)
            i = 0
            while i < n:
                i = batch(samples, i, now, params, cache, st)
                if i < n:
                    self._sample_one(samples[i], now)
                    i += 1
            return
        self._sample_batch_py(samples, now)

    #: The daemon's name for it before flow samples took the same path.
    sample_bridge_batch = sample_batch

    def _sample_batch_py(self, samples, now: float) -> None:
        """sample_batch in pure Python.  Plain IPv4 bridge samples (no
        VLAN, no IP options, not a later fragment, no tunnel) carrying
        TCP, UDP, SCTP or ICMP get their key from slices of the frame;
        ``tests/test_exporter.py`` checks that it is exactly what
        ``packet.parse`` gives.  Everything else goes through
        ``_sample_one``."""
        heads_for = self._heads_for
        add_many = self.cache.add_many
        # Fast-path samples wait here and go to the cache in one call;
        # a slow-path sample first sends them, so order is kept.
        pending = []
        push = pending.append
        tos_fields = packet.TOS_FIELDS
        bfd_dports = _BFD_DPORTS
        n_v4 = flows = 0
        # Probability and ports repeat from one sample to the next:
        # look them up again only when they change.
        last_p = last_in = last_out = count = h = None
        try:
            for s in samples:
                if type(s) is not BridgeSample or s.tunnel is not None:
                    h = None
                else:
                    p = s.probability
                    if p != last_p:
                        count = UINT32_MAX // p if p else self._count
                        last_p = p
                    out_port = s.output_port
                    in_port = s.input_port
                    if in_port != last_in or out_port != last_out or h is None:
                        h = heads_for(in_port, out_port)
                        last_in = in_port
                        last_out = out_port
                f = s.frame
                if (h is not None and len(f) >= 42 and f[12] == 8
                        and f[13] == 0 and f[14] == 0x45
                        and not (f[20] & 0x1F or f[21])):
                    fast = h.get(f[23])
                    # The whole L4 header must lie inside the IP packet and
                    # the frame (else packet.parse zeroes the L4 fields).
                    if fast is not None and fast[4] <= (
                            f[16] << 8 | f[17]) and fast[4] + 14 <= len(f) \
                            and not (f[23] == 17 and f[36:38] in bfd_dports):
                        head, mid, l4_end, is_tcp, _ = fast
                        frame_len = s.orig_len
                        if frame_len < len(f):
                            frame_len = len(f)
                        n_v4 += 1
                        push((b"".join((head, f[6:12], f[0:6], mid, f[22:24],
                                        tos_fields[f[15]], f[26:l4_end])),
                              count, frame_len, frame_len - 14,
                              ((f[46] & 0x0F) << 8 | f[47]) if is_tcp else 0))
                        continue
                if pending:
                    todo = pending[:]
                    pending.clear()
                    flows += add_many(todo, now)
                self._sample_one(s, now)
        finally:
            # Also when a sample raises: the samples before it are
            # aggregated and counted, as on the C path.
            if pending:
                todo = pending[:]
                pending.clear()
                flows += add_many(todo, now)
            st = self.stats
            st.pkts += n_v4
            st.ipv4_ok += n_v4
            st.flows += flows

    def _heads_for(self, in_port, out_port):
        """The Python fast path's key pieces for a port pair
        (_fast_heads), built once per pair and options."""
        hk = (in_port, out_port)
        try:
            return self._heads[hk]
        except KeyError:
            h = self._heads[hk] = self._fast_heads(
                self.options.obs_domain_id, self.options.obs_point_id,
                in_port, out_port)
            return h

    def _fast_heads(self, domain, point, in_port, out_port):
        """Key pieces of the Python fast path for one (input, output)
        port pair: {IP protocol: (prefix + head, middle, end of L4 part,
        is TCP, IP packet bytes the fast path needs)}, or None when this
        direction is not sampled.
        """
        o = self.options
        if out_port is None:
            if not o.enable_input_sampling:
                return None
            direction = t.INGRESS
        else:
            if not o.enable_output_sampling:
                return None
            direction = t.EGRESS
        iface = self._iface_part(in_port, out_port, direction)
        out = {}
        # (IP protocol, layout, end of the key's L4 slice, IP packet
        # bytes needed: 20 of IP header + the whole L4 header).
        for proto, l4, end, need in ((6, t.L4_TCP, 38, 40),
                                     (17, t.L4_UDP, 38, 28),
                                     (132, t.L4_SCTP, 38, 32),
                                     (1, t.L4_ICMP, 36, 28)):
            tid = t.template_id(t.L2_ETH, t.L3_IPV4, l4, direction)
            head = KEY_PREFIX.pack(domain, tid) + struct.pack(
                "!IB", point & UINT32_MAX, direction)
            mid = b"\x08\x00\x0e" + iface + b"\x04"
            out[proto] = (head, mid, end, proto == 6, need)
        return out

    def _sample_one(self, s, now: float) -> None:
        if type(s) is FlowSample:
            self.sample_flow(s.frame, s.orig_len, s.input_port,
                             s.output_port, s.probability, s.obs_domain_id,
                             s.obs_point_id, s.direction, now, s.tunnel)
        else:
            self.sample_bridge(s.frame, s.orig_len, s.input_port,
                               s.output_port, now, s.probability, s.tunnel)

    def _sample(self, frame, orig_len, count, domain, point, direction,
                in_port, out_port, now, skip_bfd, tunnel=None):
        fk = packet.parse(frame, point, direction,
                          self._iface_part(in_port, out_port, direction),
                          self._tunnel_part(in_port, out_port, tunnel))
        if skip_bfd and fk.udp_dst_port in _BFD_PORTS:
            return
        st = self.stats
        st.pkts += 1
        kind = fk.kind
        if kind == packet.IPV4_OK:
            st.ipv4_ok += 1
        elif kind == packet.IPV6_OK:
            st.ipv6_ok += 1
        elif kind == packet.IPV4_ERR:
            st.ipv4_errs += 1
            st.errs += 1
        elif kind == packet.IPV6_ERR:
            st.ipv6_errs += 1
            st.errs += 1
        frame_len = orig_len if orig_len > len(frame) else len(frame)
        ip_len = frame_len - fk.eth_header_len if fk.is_ip else 0
        if self.cache.add(KEY_PREFIX.pack(domain, fk.template_id) + fk.key,
                          now, count, frame_len, ip_len, fk.tcp_flags):
            st.flows += 1

    # -- export -----------------------------------------------------------

    def flush(self, now: float, sliced: bool = False) -> int:
        """Export every cached flow as forced end; returns how many.

        The cache is detached and a new one takes the samples that
        follow.  Without ``sliced`` everything waiting is sent before
        this returns; with it, the flows are sent by the next ``run``
        calls, a slice at a time, after what already waited.
        """
        n = len(self.cache)
        self._queue_expired()
        if n:
            self._queue.append(_Flushed(self._sink, self.cache))
            self.cache = self._new_cache()
        self.stats.current_flows = 0
        if not sliced:
            self._send_queued(now, None)
        return n

    def run(self, now: float) -> None:
        """Expire what is due, send it (at most about ``EXPORT_BUDGET``
        s of it; the rest on the next call); template refresh;
        statistics."""
        if self.collectors.retry(now):
            # A collector joined: every template goes out again, before
            # the next data, so it never sees data it cannot decode.
            self.writer.forget_templates()
        self.collectors.run(now)
        for sink in self._retired_sinks():
            sink.collectors.run(now)
        deadline = time.perf_counter() + EXPORT_BUDGET
        self._queue_expired()
        sent = self._send_queued(now, deadline)
        # New expiries once the queue is empty, a slice at a time: a
        # burst of due flows is taken no faster than it is sent.
        while not self._queue and (not sent
                                   or time.perf_counter() < deadline):
            n = self.cache.expire(now, EXPORT_SLICE)
            self._queue_expired()
            sent += self._send_queued(now, deadline)
            if n < EXPORT_SLICE:
                break
        for domain in self.writer.refresh_due(now):
            for msg in self.writer.template_messages(domain, now):
                self._send(msg)
        if now >= self.next_stats:
            self._send_stats(now)
            self.next_stats = now + self.options.export.stats_interval
        self.stats.current_flows = len(self.cache)

    def backlog(self) -> int:
        """Flows that left the cache (or a flush took) and are not sent
        yet."""
        return len(self.cache.expired) + sum(map(len, self._queue))

    def idle(self) -> bool:
        """Nothing waits to be sent."""
        return not self._queue and not self.cache.expired

    def next_deadline(self) -> Optional[float]:
        """When ``run`` next has timed work (s, same clock as ``now``)."""
        times = [x for x in (self.cache.next_deadline(),
                             self.writer.next_refresh(), self.next_stats,
                             self.collectors.next_retry())
                 if x is not None]
        if self.cache.expired or self._queue:
            return float("-inf")
        return min(times) if times else None

    def _queue_expired(self) -> None:
        """What left the cache joins the queue (behind a flush)."""
        if self.cache.expired:
            self._queue.append(_Expired(self._sink,
                                        self.cache.take_expired()))
        self.stats.current_flows = len(self.cache)

    def _send_queued(self, now: float, deadline: Optional[float]) -> int:
        """Send queued flows a slice at a time, oldest first, until the
        queue is empty or ``time.perf_counter()`` passes ``deadline``
        (None: no limit); at least one slice.  Returns how many."""
        queue = self._queue
        n = 0
        while queue:
            n += 1
            item = queue[0]
            flows = item.take(EXPORT_SLICE)
            if not len(item):
                queue.popleft()
            if flows:
                self._send_flows(flows, now, item.sink)
            sink = item.sink
            if (sink.retired and not len(item)
                    and not any(i.sink is sink for i in queue)):
                # Its last flows are out: end those transport sessions.
                self._send_stats(now, sink)
                sink.collectors.close()
            if deadline is not None and time.perf_counter() >= deadline:
                break
        return n

    def _send_flows(self, flows, now: float, sink: _Sink) -> None:
        """Pack and send ``flows`` (in order) through ``sink``."""
        # Flows grouped by their key's first 6 bytes (domain, template
        # id) and its length, in expiry order within each group: the
        # variable-length fields (interface names, tunnel key) make
        # records of one template differ in length, and a RecordBlock
        # holds records of one length.
        groups, reasons = (fastpath.C.group_expired if fastpath.C
                           else group_expired)(flows)
        vobs, vobs_offset = sink.vobs, sink.vobs_offset
        pack = fastpath.C.pack_records if fastpath.C else pack_records
        by_domain: Dict[int, List] = {}
        for (prefix, _), group in groups.items():
            domain, tid = KEY_PREFIX.unpack(prefix)
            tid += vobs_offset
            template = t.get(tid)
            data, packets, octets = pack(group, vobs,
                                         bool(template.l3),
                                         template.l4 == t.L4_TCP)
            # (Every record of a group has the same length.)
            by_domain.setdefault(domain, []).append(
                (tid, template.record, message.RecordBlock(
                    data, len(data) // len(group), packets, octets)))
        self.stats.records += len(flows)
        self.stats.count_ended(reasons)
        for domain, tgroups in by_domain.items():
            for msg in sink.writer.data_messages(domain, now, tgroups):
                self._send(msg, sink.collectors)

    def _domains(self, writer) -> List[int]:
        domains = list(writer.domains)
        if not domains and self.is_bridge:
            domains = [self.options.obs_domain_id]
        return domains

    def _send_stats(self, now: float, sink: Optional[_Sink] = None
                    ) -> None:
        """Exporting process reliability statistics (RFC 7011 4.3),
        through ``sink`` (default: the current collectors).

        The options template goes in the same message, before its data,
        the first time in each domain (and on each template refresh).
        """
        if sink is None:
            sink = self._sink
        st = self.stats
        tmpl = t.exporter_stats_template()
        # unsigned64 totals: held at 2^64-1 once they pass it (one
        # record of 2^64-1 octets lost already gets there).
        rec = _STATS_RECORD.pack(
            self.exporting_process_id, min(st.not_sent_flows, U64_MAX),
            min(st.not_sent_packets, U64_MAX),
            min(st.not_sent_octets, U64_MAX))
        for domain in self._domains(sink.writer):
            for msg in sink.writer.data_messages(
                    domain, now, [(tmpl.id, tmpl.record, [rec])],
                    options=True):
                self._send(msg, sink.collectors)

    def _send(self, msg: message.Message, collectors=None) -> None:
        if collectors is None:
            collectors = self.collectors
        ok, err = collectors.send(msg)
        st = self.stats
        st.tx_pkts += ok
        st.tx_errs += err
        if not len(collectors):
            err = 1   # nowhere to send: the records are lost
        if err and msg.flows:
            st.not_sent_flows += err * msg.flows
            st.not_sent_packets += err * msg.packets
            st.not_sent_octets += err * msg.octets

    # -- introspection ----------------------------------------------------

    def show(self) -> str:
        """A header line naming the exporter, then its counters."""
        o = self.options
        if self.is_bridge:
            head = "bridge %s: " % o.bridge
        else:
            head = "bridge %s id %d: " % (o.bridge, o.collector_set_id)
        self.stats.current_flows = len(self.cache)
        lines = [head + self.stats.format(" " * len(head))]
        c = o.export.cache
        lines.append("%scache: %d flows, active timeout %ds, idle timeout "
                     "%s, max flows %d, tcp end of flow %s"
                     % (" " * len(head), len(self.cache), c.active_timeout,
                        "%ds" % c.idle_timeout if c.idle_timeout else "off",
                        c.max_flows,
                        "on" if c.tcp_end_of_flow else "off"))
        lines.append(" " * len(head) + self.stats.format_ended())
        described = self.collectors.describe()
        if not described:
            lines.append("%scollectors: none" % (" " * len(head)))
        for line in described:
            lines.append("%scollector %s" % (" " * len(head), line))
        for spec, why in self.collectors.bad_targets:
            lines.append("%sbad target %s: %s" % (" " * len(head), spec,
                                                  why))
        return "\n".join(lines)


def group_expired(flows):
    """``(groups, reasons)``: expired flows grouped by (their key's
    first 6 bytes: domain and template id, the key's length), in order
    of first appearance and in expiry order within each group (the
    variable-length fields, interface names and tunnel key, make records
    of one template differ in length, and a RecordBlock holds records of
    one length); and {flowEndReason: how many flows}.
    (``fastpath.C.group_expired`` does the same in C;
    tests/test_fastpath.py checks both.)"""
    groups: Dict = {}
    for f in flows:
        gk = (f.key[:6], len(f.key))
        g = groups.get(gk)
        if g is None:
            g = groups[gk] = []
        g.append(f)
    return groups, dict(collections.Counter(f.reason for f in flows))


def pack_records(flows, vobs: bytes, ip: bool, tcp: bool):
    """Data records of expired flows of one template, back to back:
    ``(data, packets, octets)``, the last two per record (octets: IP
    octets for IP layouts, layer-2 octets otherwise) for the not-sent
    totals.  ``vobs``: the encoded virtualObsID, or b"".  First and
    last seen go out as flowStart/EndMilliseconds (ms since the epoch,
    truncated: see ``time_ms``).  (``fastpath.C.pack_records`` does the
    same in C; tests/test_fastpath.py checks both.)"""
    pack = _AGG_LAYOUT[ip, tcp]
    recs = []
    packets = []
    octets = []
    for f in flows:
        sd = time_ms(f.start)
        ed = time_ms(f.end)
        if tcp:
            agg = pack(sd, ed, f.packets, f.l2_octets, f.reason, f.octets,
                       f.sumsq, f.min_len, f.max_len, f.tcp_flags)
        elif ip:
            agg = pack(sd, ed, f.packets, f.l2_octets, f.reason, f.octets,
                       f.sumsq, f.min_len, f.max_len)
        else:
            agg = pack(sd, ed, f.packets, f.l2_octets, f.reason)
        recs.append(f.key[6:] + vobs + agg)
        packets.append(f.packets)
        octets.append(f.octets if ip else f.l2_octets)
    return b"".join(recs), packets, octets


def time_ms(t: float) -> int:
    """A time in s since the epoch as dateTimeMilliseconds (RFC 7011
    section 6.1.8: unsigned64 ms since 1970): truncated to the ms,
    never negative, never wrapped.  A time no clock gives (inf, NaN)
    raises OverflowError."""
    if t != t or t in (_INF, -_INF):
        raise OverflowError("flow time out of range")
    ms = t * 1000.0
    if ms <= 0.0:
        return 0
    return int(ms) if ms < _U64_LIMIT else U64_MAX


_INF = float("inf")
#: 2^64 as a float: ms at or beyond it hold at 2^64-1.
_U64_LIMIT = 18446744073709551616.0
