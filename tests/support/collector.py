"""IPFIX collectors on loopback for tests (UDP and TCP).

A collector keeps every IPFIX message it received, in arrival order, as
``datagrams``: a list of ``(arrival_time, message_bytes)`` with the
arrival time in seconds since the epoch (``time.time()``).  Over TCP the
stream is split into messages by the header's length field, so both
kinds look the same to the decoders.  Nothing is decoded here.

Receiving only happens inside ``receive()`` / ``wait_for()`` /
``wait_quiet()``: a test drives its collector explicitly, no threads.
"""

import select
import socket
import ssl
import struct
import time

from . import pcapfile

#: Receive buffer asked for: a burst of thousands of datagrams must not
#: overflow it (the default ~200 kB does).
RCVBUF_BYTES = 32 * 1024 * 1024
#: SO_RCVBUFFORCE (Linux, needs CAP_NET_ADMIN) bypasses rmem_max.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_HEADER = struct.Struct("!HH")  # version, length: enough to frame
IPFIX_VERSION = 10
IPFIX_HEADER_LEN = 16


def _loopback(family):
    if family == socket.AF_INET:
        return "127.0.0.1"
    if family == socket.AF_INET6:
        return "::1"
    raise ValueError("family must be AF_INET or AF_INET6")


def _raise_rcvbuf(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RCVBUF_BYTES)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)


class _Collector:
    """What UDP and TCP collectors share: the address, the received
    messages and the ways to wait for them and write them out."""

    def __init__(self, family):
        self.family = family
        self.host = _loopback(family)
        self.datagrams = []
        #: Peer address of each entry of ``datagrams`` (same order).
        self.senders = []
        self._sock = None
        #: (host, port) the collector listens on (kept after close()).
        self.address = None

    @property
    def port(self):
        return self.address[1]

    @property
    def target(self):
        """The collector as an OVSDB target string: "127.0.0.1:PORT" or
        "[::1]:PORT"."""
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def _poll_once(self, timeout):
        raise NotImplementedError

    def receive(self, timeout):
        """Receive for ``timeout`` s (at least one poll, even with 0);
        returns how many messages arrived."""
        before = len(self.datagrams)
        deadline = time.monotonic() + timeout
        while True:
            self._poll_once(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return len(self.datagrams) - before

    def _receive_until(self, done, deadline):
        """Receive until ``done()`` or the monotonic ``deadline``."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._poll_once(min(remaining, 0.05))
        return True

    def wait_for(self, predicate, timeout=10.0):
        """Receive until ``predicate(self.datagrams)`` is true; False if
        it still is not after ``timeout`` s."""
        return self._receive_until(lambda: predicate(self.datagrams),
                                   time.monotonic() + timeout)

    def wait_quiet(self, after_count, quiet=0.3, timeout=10.0):
        """Wait for a message beyond the first ``after_count`` (what the
        test's action caused: it may still be on its way), then until
        none arrives for ``quiet`` s.  Returns False if no new message
        arrived within ``timeout`` s or it never went quiet within it.
        """
        deadline = time.monotonic() + timeout
        if not self._receive_until(
                lambda: len(self.datagrams) > after_count, deadline):
            return False
        # Only a full ``quiet`` window before the deadline counts.
        while deadline - time.monotonic() >= quiet:
            if not self.receive(quiet):
                return True
        return False

    def payload(self):
        """All messages concatenated (an RFC 5655 file's content)."""
        return b"".join(data for _, data in self.datagrams)

    def write_pcap(self, path):
        """Write the messages as Ethernet/IP/UDP frames to this
        collector's port, for ``tshark -d udp.port==PORT,cflow``."""
        pcapfile.write_pcap(path, self.datagrams, self.port, self.family)

    def write_ipfix_file(self, path):
        """Write the messages back to back (RFC 5655 file, ipfixDump)."""
        with open(path, "wb") as f:
            f.write(self.payload())

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class UdpCollector(_Collector):
    """A UDP socket on 127.0.0.1 or ::1; each datagram is one entry."""

    def __init__(self, family=socket.AF_INET, port=0):
        super().__init__(family)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        _raise_rcvbuf(self._sock)
        self._sock.bind((self.host, port))
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()[:2]

    @property
    def rcvbuf(self):
        """The receive buffer the kernel granted (bytes, doubled as
        Linux reports it)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def _poll_once(self, timeout):
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return
        while True:
            try:
                data, sender = self._sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.datagrams.append((time.time(), data))
            self.senders.append(sender)


class TcpStreamError(Exception):
    """A TCP peer sent bytes that cannot be an IPFIX message."""


class TcpCollector(_Collector):
    """A listening TCP socket; accepts any number of connections (an
    exporter reconnecting opens a new one) and splits each stream into
    IPFIX messages by the header's length field (RFC 7011 section 10.4:
    messages are sent back to back on the stream).

    ``connections`` counts accepted connections; ``errors`` lists
    framing problems (the offending connection is closed).
    """

    def __init__(self, family=socket.AF_INET, port=0):
        super().__init__(family)
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, port))
        self._sock.listen(16)
        self._sock.setblocking(False)
        self.address = self._sock.getsockname()[:2]
        self._peers = {}  # socket -> [peer address, buffered bytes]
        self.connections = 0
        self.errors = []

    @property
    def open_connections(self):
        return len(self._peers)

    def _poll_once(self, timeout):
        readable, _, _ = select.select([self._sock, *self._peers], [], [],
                                       timeout)
        for sock in readable:
            if sock is self._sock:
                self._accept()
            else:
                self._read(sock)

    def _accept(self):
        try:
            conn, peer = self._sock.accept()
        except BlockingIOError:
            return
        _raise_rcvbuf(conn)
        conn.setblocking(False)
        self._peers[conn] = [peer, b""]
        self.connections += 1

    def _read(self, conn):
        peer, buf = self._peers[conn]
        try:
            data = conn.recv(1 << 20)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError as e:
            self.errors.append(f"{peer}: {e}")
            data = b""
        if not data:
            if buf:
                self.errors.append(f"{peer}: closed with {len(buf)} bytes "
                                   "of a partial message")
            self._drop(conn)
            return
        buf += data
        now = time.time()
        try:
            while len(buf) >= IPFIX_HEADER_LEN:
                version, length = _HEADER.unpack_from(buf)
                if version != IPFIX_VERSION or length < IPFIX_HEADER_LEN:
                    raise TcpStreamError(
                        f"{peer}: bad message header (version {version}, "
                        f"length {length})")
                if len(buf) < length:
                    break
                self.datagrams.append((now, buf[:length]))
                self.senders.append(peer)
                buf = buf[length:]
        except TcpStreamError as e:
            self.errors.append(str(e))
            self._drop(conn)
            return
        self._peers[conn][1] = buf

    def _drop(self, conn):
        del self._peers[conn]
        conn.close()

    def streams(self):
        """The messages of each connection, in order: a list of lists of
        (arrival, bytes), one per peer (each reconnection comes from a
        new port)."""
        by_peer = {}
        for (arrival, data), peer in zip(self.datagrams, self.senders):
            by_peer.setdefault(peer, []).append((arrival, data))
        return list(by_peer.values())

    def write_pcap(self, path):
        """Write every connection as a TCP stream to this collector's
        port, for ``tshark -d tcp.port==PORT,cflow``."""
        pcapfile.write_tcp_pcap(path, self.streams(), self.port,
                                self.family)

    def close_connections(self):
        """Close every accepted connection (to test reconnects)."""
        for conn in list(self._peers):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._drop(conn)

    def reset_connections(self):
        """Reset every accepted connection (RST: SO_LINGER 0, close)."""
        for conn in list(self._peers):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
            self._drop(conn)

    def close(self):
        self.close_connections()
        super().close()



class TlsCollector(TcpCollector):
    """A TcpCollector speaking TLS (server side): ``certfile``/``keyfile``
    its certificate; with ``cafile`` the exporter must present a
    certificate signed by it.  The handshake of an accepted connection
    blocks the collector (up to ``HANDSHAKE_TIMEOUT`` s): the exporter
    must run in another process.  ``peer_certs`` lists each peer
    certificate's subject; ``versions`` each connection's TLS version;
    failed handshakes go to ``errors``.
    """

    HANDSHAKE_TIMEOUT = 10.0

    def __init__(self, certfile, keyfile, cafile=None,
                 family=socket.AF_INET, port=0):
        super().__init__(family, port)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile)
        if cafile:
            ctx.load_verify_locations(cafile=cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.context = ctx
        self.peer_certs = []
        self.versions = []

    def _accept(self):
        try:
            conn, peer = self._sock.accept()
        except BlockingIOError:
            return
        conn.settimeout(self.HANDSHAKE_TIMEOUT)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError) as e:
            self.errors.append(f"{peer}: handshake: {e}")
            conn.close()
            return
        tls.setblocking(False)
        cert = tls.getpeercert()
        self.peer_certs.append(cert.get("subject") if cert else None)
        self.versions.append(tls.version())
        self._peers[tls] = [peer, b""]
        self.connections += 1

    def _read(self, conn):
        # OpenSSL may hold decrypted bytes select() does not see: read
        # until it wants more from the socket.
        while conn in self._peers:
            super()._read(conn)
            if conn in self._peers and not conn.pending():
                return
