"""Which hot path runs: the optional C one or pure Python.

``ovs_ipfix_py/_fastpath.c`` (built at install where a C compiler and the
Python headers are there) holds the hot loops: the channel decoder's
cache-hit branch (``upcall._decode``), the exporter's aggregation of
bridge and flow samples of every frame kind (``Exporter.sample_batch``:
``packet.parse`` + ``FlowCache.add`` in Python), the flow cache's index
(``FlowIndex`` for a dict), the export's grouping and packing
(``exporter.group_expired``, ``pack_records``), the daemon's dispatch
(``Daemon.handle_upcalls``) and the replay's pcap-to-datagram loop
(``replay.replay``).  The Python code is their specification and runs
whenever the extension is missing; ``tests/test_fastpath.py`` (and
``tests/test_replay.py`` for the replay) check that both give identical
results.

``C`` is the extension module, or None: not built, or the environment
sets ``OVS_IPFIX_PY_PURE=1`` (read once, at import).  Callers read
``fastpath.C`` at call time, so tests can switch it.
"""

from __future__ import annotations

import contextlib
import os

C = None
if not os.environ.get("OVS_IPFIX_PY_PURE"):
    try:
        from ovs_ipfix_py import _fastpath as C
    except ImportError:
        C = None


def name() -> str:
    """"C" or "Python": the hot path in use."""
    return "C" if C is not None else "Python"


@contextlib.contextmanager
def pure_python(pure: bool = True):
    """For the duration, the pure-Python paths (``C`` set to None, as
    ``OVS_IPFIX_PY_PURE=1`` gives at import); ``pure=False`` leaves ``C``
    as it is.  For tests, benchmarks and fuzzers comparing the two
    paths: it switches the whole process."""
    global C
    saved = C
    if pure:
        C = None
    try:
        yield
    finally:
        C = saved
