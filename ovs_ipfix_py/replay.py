"""ovs-ipfix-replay: feed the frames of a capture file to a running
ovs-ipfix-exporter as sampled packets, over its upcall channel.

Usage (the contract other tools rely on)::

    ovs-ipfix-replay [--channel=PATH] [--bridge=NAME] [--sampling=N]
        [--seed=S] [--collector-set=ID --obs-domain-id=D --obs-point-id=P
        [--probability=P16] [--direction=DIR]] [--input-port=N |
        --tunnel-port=N] [--output-port=N] [--rate=PPS]
        [--max-datagram=BYTES] FILE

- Bridge samples by default, on ``--bridge`` (br0).  ``--sampling=N``
  picks each packet with probability 1/N (random, seeded by ``--seed``,
  default 0, so runs repeat) and sets the sample's probability field to
  UINT32_MAX // N, as OVS does.  N = 1 (default) sends every packet.
- ``--collector-set=ID`` sends flow samples instead, with the obs ids
  (default 0), ``--probability`` (16-bit, default 65535: every packet) and
  ``--direction`` (0 default, 1 ingress, 2 egress; default 0).  Packets
  are picked with probability P16/65535, as the OpenFlow sample action
  would, so the exporter's scaled counts stay estimates of the file.
- ``--input-port`` (default 1); ``--output-port`` (default none: an
  ingress sample).
- ``--tunnel-port=N``: FILE holds underlay frames.  VXLAN, Geneve and
  GRE (Ethernet payload) packets over IPv4 or IPv6 are decapsulated and
  each inner frame is sent as received on port N with its tunnel
  metadata; other frames are sent as they are on port N, without
  (``ovs_ipfix_py.decap``).
- ``--rate=PPS`` paces the packets read from the file to PPS per second;
  by default they go as fast as the channel takes them.  Sends block when
  the exporter's queue is full, so nothing is lost on the way.
- Upcalls are packed into datagrams of up to ``--max-datagram`` bytes
  (65000).  Frames too long for one datagram are truncated, their
  original length kept.

Exit status 0 once every sample was handed to the channel, with one line
on stderr::

    ovs-ipfix-replay: 1000 packets read, 1000 samples sent, 3 datagrams, 0.01 s

On a bad file, a missing channel or a failed send: status 1 and a single
line on stderr, no traceback.  Bad options: status 2, one line.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import time
from typing import Iterable, NamedTuple, Optional, Tuple

import ovs.dirs

from ovs_ipfix_py import decap, fastpath, pcap, upcall
from ovs_ipfix_py.pcap import PcapError, read_frames

PROG = "ovs-ipfix-replay"
SOCKET_NAME = "ovs-ipfix-exporter.sock"
DEFAULT_MAX_DATAGRAM = 65000
UINT32_MAX = 0xFFFFFFFF
UINT16_MAX = 0xFFFF


def default_channel() -> str:
    """``$OVS_RUNDIR/ovs-ipfix-exporter.sock``, OVS_RUNDIR defaulting as
    the ovs library does (``ovs.dirs.RUNDIR``)."""
    return os.path.join(os.environ.get("OVS_RUNDIR", ovs.dirs.RUNDIR),
                        SOCKET_NAME)


class ReplayError(Exception):
    """Something that ends the replay, with a one-line message."""


class Summary(NamedTuple):
    packets: int
    samples: int
    datagrams: int
    seconds: float

    def line(self) -> str:
        return (f"{PROG}: {self.packets} packets read, {self.samples} "
                f"samples sent, {self.datagrams} datagrams, "
                f"{self.seconds:.2f} s")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not argparse's usage + message.
        self.exit(2, f"{PROG}: {message} (see --help)\n")


def _uint(bits: int, low: int = 0):
    top = (1 << bits) - 1

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer") from None
        if not low <= value <= top:
            raise argparse.ArgumentTypeError(
                f"{value} not in {low}..{top}")
        return value
    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number"
                                         ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return value


_DIRECTIONS = {"default": 0, "ingress": 1, "egress": 2,
               "0": 0, "1": 1, "2": 2}


def _direction(text: str) -> int:
    try:
        return _DIRECTIONS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 0/default, 1/ingress or 2/egress") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Replay a capture file into "
                "ovs-ipfix-exporter's upcall channel as sampled packets.")
    p.add_argument("file", metavar="FILE", help="pcap or pcapng capture "
                   "of Ethernet frames")
    p.add_argument("--channel", metavar="PATH", default=None,
                   help="the exporter's socket (default: "
                   f"$OVS_RUNDIR/{SOCKET_NAME})")
    p.add_argument("--bridge", metavar="NAME", default="br0")
    p.add_argument("--sampling", metavar="N", type=_uint(32, 1), default=1,
                   help="bridge sampling: pick packets with probability "
                   "1/N (default 1: all)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="random seed for picking packets (default 0)")
    p.add_argument("--collector-set", metavar="ID", type=_uint(32),
                   default=None, help="send flow samples for this "
                   "Flow_Sample_Collector_Set id")
    p.add_argument("--obs-domain-id", metavar="D", type=_uint(32),
                   default=None)
    p.add_argument("--obs-point-id", metavar="P", type=_uint(32),
                   default=None)
    p.add_argument("--probability", metavar="P16", type=_uint(16, 1),
                   default=None, help="flow sampling probability out of "
                   "65535 (default 65535)")
    p.add_argument("--direction", metavar="DIR", type=_direction,
                   default=None, help="flow sample direction: 0/default, "
                   "1/ingress, 2/egress (default 0)")
    p.add_argument("--input-port", metavar="N", type=_uint(32), default=None,
                   help="(default 1)")
    p.add_argument("--tunnel-port", metavar="N", type=_uint(32),
                   default=None, help="decapsulate VXLAN, Geneve and GRE "
                   "frames, sent as received on tunnel port N with their "
                   "tunnel metadata")
    p.add_argument("--output-port", metavar="N", type=_uint(32),
                   default=None, help="(default: none, an ingress sample)")
    p.add_argument("--rate", metavar="PPS", type=_rate, default=None,
                   help="pace packets read to PPS per second")
    p.add_argument("--max-datagram", metavar="BYTES",
                   type=_uint(32, 256), default=DEFAULT_MAX_DATAGRAM,
                   help=f"datagram size limit (default "
                   f"{DEFAULT_MAX_DATAGRAM})")
    args = p.parse_args(argv)
    if args.collector_set is None:
        for name in ("obs_domain_id", "obs_point_id", "probability",
                     "direction"):
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} needs --collector-set")
    elif args.sampling != 1:
        p.error("--sampling is for bridge samples; flow samples use "
                "--probability")
    if args.tunnel_port is not None:
        if args.input_port is not None:
            p.error("--tunnel-port is the input port: give one of "
                    "--input-port and --tunnel-port")
        args.input_port = args.tunnel_port
    elif args.input_port is None:
        args.input_port = 1
    if args.max_datagram > upcall.MAX_DATAGRAM_SIZE:
        p.error(f"--max-datagram above {upcall.MAX_DATAGRAM_SIZE}")
    if args.channel is None:
        args.channel = default_channel()
    return args


def _template(args) -> Tuple[upcall.Upcall, float]:
    """The upcall every frame is sent in, and the probability with which
    a packet is picked."""
    if args.collector_set is None:
        n = args.sampling
        u = upcall.BridgeSample(args.bridge, args.input_port,
                                args.output_port, UINT32_MAX // n, b"", 0)
        return u, 1.0 / n
    p16 = UINT16_MAX if args.probability is None else args.probability
    u = upcall.FlowSample(args.bridge, args.collector_set,
                          args.obs_domain_id or 0, args.obs_point_id or 0,
                          p16, args.direction or 0, args.input_port,
                          args.output_port, b"", 0)
    return u, p16 / UINT16_MAX


def _max_frame(template, max_datagram: int) -> int:
    """Longest frame whose upcall (truncated, so with ORIG_LEN) still
    fits in one datagram."""
    empty = upcall.encode([template._replace(orig_len=1)])
    room = max_datagram - len(empty)
    return max(0, min(upcall.MAX_FRAME_SIZE, room & ~3))


class Progress:
    """One line on a terminal, rewritten in place: frames sent so far
    and the rate.  Shown from ``after`` s into the replay, at most every
    ``every`` s; ``clear()`` erases it before the summary line."""

    def __init__(self, stream, after: float = 1.0, every: float = 0.5):
        self.stream = stream
        self.t0 = time.monotonic()
        self.next = self.t0 + after
        self.every = every
        self.shown = False

    def __call__(self, samples: int) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.every
        rate = samples / (now - self.t0)
        self.stream.write(f"\r{PROG}: {samples} frames sent, "
                          f"{rate:,.0f} frames/s\033[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


#: Packets between two looks at the clock for the progress line.
_PROGRESS_EVERY = 1 << 14


def pace(due: float, flush, send) -> int:
    """Sleep until ``due`` (time.monotonic() s) when it is still ahead,
    first sending what the batcher holds (``flush()`` -> datagram or
    None), so samples arrive at the paced rate, not in late bursts.
    Returns the datagrams sent (0 or 1)."""
    now = time.monotonic()
    if due <= now:
        return 0
    d = flush()
    if d is not None:
        send(d)
    time.sleep(due - now)
    return int(d is not None)


def replay(frames: Iterable, sock: socket.socket, template,
           pick: float = 1.0, seed: int = 0, rate: Optional[float] = None,
           max_datagram: int = DEFAULT_MAX_DATAGRAM,
           progress=None) -> Summary:
    """Send ``frames`` ((ts, frame, orig_len) items) as upcalls built
    from ``template`` (its frame/orig_len replaced) on the connected
    ``sock``; each packet is picked with probability ``pick``; ``rate``
    (packets/s) paces the packets read; ``progress(samples sent)`` is
    called now and then.  Returns the Summary.  Raises PcapError from
    the file, OSError from the socket."""
    t0 = time.monotonic()
    batcher = upcall.FrameBatcher(template, max_datagram)
    add = batcher.add
    send = sock.send
    limit = _max_frame(template, max_datagram)
    rnd = random.Random(seed).random
    sample_all = pick >= 1.0
    packets = samples = datagrams = 0
    interval = 1.0 / rate if rate else 0.0
    for _ts, frame, orig_len in frames:
        packets += 1
        if interval:
            due = t0 + (packets - 1) * interval
            if progress is not None and due > time.monotonic():
                progress(samples)
            datagrams += pace(due, batcher.flush, send)
        if not sample_all and rnd() >= pick:
            continue
        if len(frame) > limit:
            frame = frame[:limit]
        d = add(frame, orig_len)
        samples += 1
        if d is not None:
            send(d)
            datagrams += 1
        if progress is not None and not packets % _PROGRESS_EVERY:
            progress(samples)
    d = batcher.flush()
    if d is not None:
        send(d)
        datagrams += 1
    return Summary(packets, samples, datagrams, time.monotonic() - t0)


def replay_file(path: str, sock: socket.socket, template,
                pick: float = 1.0, seed: int = 0,
                rate: Optional[float] = None,
                max_datagram: int = DEFAULT_MAX_DATAGRAM,
                progress=None) -> Summary:
    """``replay`` of the capture at ``path``.  Every packet of a classic
    pcap file, unpaced, goes through the C loop
    (``fastpath.C.pcap_datagram``: one call per datagram, no Python per
    frame), the rest of the file (from a record it does not take) and
    any other case through ``replay``: same datagrams either way."""
    raw = None
    if fastpath.C is not None and pick >= 1.0 and not rate:
        raw = pcap.classic_pcap(path)
    if raw is None:
        return replay(read_frames(path), sock, template, pick, seed, rate,
                      max_datagram, progress)
    t0 = time.monotonic()
    buf, little = raw
    kind, prefix = upcall.frame_prefix(template)
    limit = _max_frame(template, max_datagram)
    step = fastpath.C.pcap_datagram
    send = sock.send
    off, packets, datagrams = 24, 0, 0
    while True:
        off, d, n = step(buf, off, little, limit, kind, prefix,
                         max_datagram)
        if not n:
            break
        send(d)
        packets += n
        datagrams += 1
        if progress is not None:
            progress(packets)
    rest = Summary(0, 0, 0, 0.0)
    if off < len(buf):
        rest = replay(pcap.read_frames_from(path, buf, off, packets), sock,
                      template, 1.0, seed, None, max_datagram, progress)
    return Summary(packets + rest.packets, packets + rest.samples,
                   datagrams + rest.datagrams, time.monotonic() - t0)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # Room for a full datagram in flight; best effort.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    except OSError:
        pass
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        hint = ""
        if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
            hint = " (is ovs-ipfix-exporter running?)"
        raise ReplayError(f"cannot reach the channel {path}: "
                          f"{e.strerror or e}{hint}") from None
    return sock


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        read_frames(args.file)      # says what is wrong with the file
        template, pick = _template(args)
        sock = _connect(args.channel)
        progress = Progress(sys.stderr) if sys.stderr.isatty() else None
        try:
            if args.tunnel_port is not None:
                # Frames decapsulated one by one (ovs_ipfix_py.decap).
                summary = decap.replay(read_frames(args.file), sock,
                                       template, args.tunnel_port, pick,
                                       args.seed, args.rate,
                                       args.max_datagram)
            else:
                summary = replay_file(args.file, sock, template, pick,
                                      args.seed, args.rate,
                                      args.max_datagram, progress)
        except OSError as e:
            raise ReplayError(f"sending to {args.channel} failed: "
                              f"{e.strerror or e}") from None
        finally:
            sock.close()
            if progress is not None:
                progress.clear()
    except (PcapError, ReplayError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a value the channel format cannot carry
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(summary.line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
