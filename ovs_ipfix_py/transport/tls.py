"""TLS over TCP (RFC 7011 section 11: IPFIX over TCP is secured with
TLS): TLS 1.2 or 1.3 only.

The certificate files are the daemon's ``-p/--private-key``,
``-c/--certificate`` and ``-C/--ca-cert`` (the ones its ``ssl:`` OVSDB
remotes use), set once with :func:`configure`.  The exporter presents its
certificate; the collector's must be signed by the CA.  As for OVS's own
``ssl:`` connections, the peer is checked against the CA only, not
against the host name or address of the target (certificates made with
``ovs-pki`` name no host).  The files are read again at every connection
attempt, so renewed certificates take effect at the next one.

The handshake runs without blocking, driven by the loop (POLLIN or
POLLOUT as OpenSSL asks); a failed one is logged with OpenSSL's reason
and retried with the stream's backoff.
"""

from __future__ import annotations

import select
import ssl
from types import SimpleNamespace

from ovs_ipfix_py.ratelimit import RateLimitedLog
from ovs_ipfix_py.transport import TargetError
from ovs_ipfix_py.transport.stream import CONNECTING, DEFAULT_BUFFER_SIZE
from ovs_ipfix_py.transport.tcp import TcpTransport

log = RateLimitedLog("collector")

_FILES = SimpleNamespace(private_key=None, certificate=None, ca_cert=None)


def configure(private_key, certificate, ca_cert) -> None:
    """The files every TLS target uses (paths, or None)."""
    _FILES.private_key = private_key
    _FILES.certificate = certificate
    _FILES.ca_cert = ca_cert


def configured() -> bool:
    return bool(_FILES.private_key and _FILES.certificate
                and _FILES.ca_cert)


def client_context() -> ssl.SSLContext:
    """A client context: TLS 1.2+, the CA, our certificate.  Raises
    OSError (ssl.SSLError included) if a file is missing or bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=_FILES.ca_cert)
    ctx.load_cert_chain(_FILES.certificate, _FILES.private_key)
    return ctx


class TlsTransport(TcpTransport):
    """TLS to one target; TargetError (not transient) when the daemon
    was given no certificate files."""

    kind = "tls"

    def __init__(self, target, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 on_lost=None):
        if not configured():
            raise TargetError(
                "target %r: tls: needs the daemon's -p/--private-key, "
                "-c/--certificate and -C/--ca-cert" % target.spec)
        super().__init__(target, buffer_size, on_lost)
        self._tls = None
        self._want = select.POLLOUT
        self.tls_version = None

    def _start(self) -> bool:
        self._tls = None
        self._want = select.POLLOUT
        return super()._start()

    def _connected(self) -> bool:
        if self._tls is None:
            self._tls = client_context().wrap_socket(
                self.sock, do_handshake_on_connect=False)
            self.sock = self._tls
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._want = select.POLLIN
            return False
        except ssl.SSLWantWriteError:
            self._want = select.POLLOUT
            return False
        except ssl.SSLCertVerificationError as e:
            raise OSError("TLS handshake failed: certificate verify "
                          "failed: %s" % (e.verify_message or e.reason)) \
                from None
        except ssl.SSLError as e:
            raise OSError("TLS handshake failed: %s"
                          % (e.reason or e)) from None
        self.tls_version = self._tls.version()
        log.info("%s: %s, cipher %s", self.spec, self.tls_version,
                 self._tls.cipher()[0])
        return True

    def _progress(self) -> bool:
        if self._tls is None:
            return super()._progress()
        return self._connected()

    def _write(self, data) -> int:
        try:
            return self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError,
                BlockingIOError):
            return 0

    def _peer_gone(self) -> bool:
        for _ in range(16):
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError,
                    BlockingIOError, InterruptedError):
                return False
            if not data:
                return True
        return False

    def _events(self) -> int:
        if self.state == CONNECTING and self._tls is not None:
            return self._want
        return super()._events()

    def _stop(self) -> None:
        self._tls = None
        super()._stop()
