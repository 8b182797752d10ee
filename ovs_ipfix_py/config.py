"""OVSDB rows -> exporter option values.

``ConfigReader`` keeps an ``ovs.db.idl.Idl`` replica of the few columns
that configure IPFIX and turns them into the immutable values of
``ovs_ipfix_py.options``:

- ``Bridge.ipfix`` -> one ``BridgeExporterOptions`` per bridge whose IPFIX
  row has at least one target (bridge sampling);
- ``Flow_Sample_Collector_Set`` rows with an ``ipfix`` reference whose row
  has targets -> one ``FlowExporterOptions`` per (bridge, id);
- ``Bridge.ports`` -> ``Port.interfaces`` -> ``Interface`` rows (name,
  ofport, ifindex, type, status) -> ``ports()``: per bridge, the
  ``interfaces.Interface`` of each OpenFlow port number, which the
  exporters put in their records (interface elements, tunnel ports).
  Ports are no options: a port that comes, goes or is renumbered changes
  ``ports()``, not ``desired()``, so nothing is flushed.

The schema is not shipped with the PyPI ``ovs`` package, so it is fetched
from the server (``get_schema``, RFC 7047 section 4.1.2) over its own
``ovs.jsonrpc.Session`` without blocking: the session connects and
reconnects with ``ovs.reconnect``'s backoff (1 s doubling to 8 s).  Only
then is the IDL built, registering ``Bridge`` (name, ipfix), all of
``IPFIX`` and ``Flow_Sample_Collector_Set`` (id, bridge, ipfix, and
local_group_id where the server has it).  Columns that only newer schemas
have (``template_interval``, ``stats_interval``, ``local_group_id``) are
read when present and take their defaults when not.  When the server's
schema changes under us (``ovsdb-client convert``, or a restart on a newer
database) the reader fetches it again, after each reconnection and when
the server cancels the IDL's monitor (as it does on a schema change), and
builds a new IDL if the schema differs.

Loop contract (one thread, ``ovs.poller``)::

    cfg.run()
    if cfg.changed():
        desired = cfg.desired()
    ...
    cfg.wait(poller)
    poller.block()

While OVSDB is away the last ``desired()`` stays valid and is returned
again; after a reconnect the IDL resyncs and ``desired()`` yields equal
values if nothing changed, so nothing is flushed needlessly.

Problems in the configuration (an out-of-range value, a malformed
other_config value, a target that does not parse) never raise: they are
counted in ``stats``, kept in ``recent_warnings`` and logged with a rate
limit, each distinct problem once while it persists.  Bad targets are
kept in the values: the collector layer skips them.
"""

from __future__ import annotations

import collections
from typing import Dict, List, Optional, Tuple, Union

import ovs.db.error
import ovs.db.idl
import ovs.json
import ovs.jsonrpc

from ovs_ipfix_py.collector import parse_target as check_target
from ovs_ipfix_py.collector import split_target as parse_target  # noqa: F401
from ovs_ipfix_py.interfaces import Interface, Ports
from ovs_ipfix_py.options import (
    DEFAULT_COLLECTOR_BUFFER_SIZE,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_SAMPLING,
    DEFAULT_STATS_INTERVAL,
    DEFAULT_TEMPLATE_INTERVAL,
    MAX_COLLECTOR_BUFFER_SIZE,
    MAX_IDLE_TIMEOUT,
    MIN_MAX_MESSAGE_SIZE,
    UINT32_MAX,
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)
from ovs_ipfix_py.ratelimit import RateLimitedLog

log = RateLimitedLog("config")

DB_NAME = "Open_vSwitch"

#: Largest IPFIX message we agree to build (bytes): the IPFIX header's
#: 16-bit length field (RFC 7011 section 3.1).
MAX_MAX_MESSAGE_SIZE = 65535
#: OVS carries virtualObsID in a short variable-length field (<= 254 B).
VIRTUAL_OBS_ID_MAX_LEN = 254

#: Integer column ranges from vswitch.ovsschema (IPFIX table).  The server
#: enforces them too; checking again costs nothing and protects against a
#: modified schema.  Values: (min, max, default).
IPFIX_INT_COLUMNS = {
    "sampling": (1, UINT32_MAX, DEFAULT_SAMPLING),
    "obs_domain_id": (0, UINT32_MAX, 0),
    "obs_point_id": (0, UINT32_MAX, 0),
    "cache_active_timeout": (0, 4200, 0),
    "cache_max_flows": (0, UINT32_MAX, 0),
    "template_interval": (1, 3600, DEFAULT_TEMPLATE_INTERVAL),
    "stats_interval": (1, 3600, DEFAULT_STATS_INTERVAL),
}

#: Columns we need, per table (IPFIX is registered whole, so that columns
#: of newer schemas come along).  Optional ones are registered only when
#: the server's schema has them.
_REQUIRED_COLUMNS = {
    "Bridge": ["name", "ipfix"],
    "IPFIX": ["targets", "other_config"],
    "Flow_Sample_Collector_Set": ["id", "bridge", "ipfix"],
}
_OPTIONAL_COLUMNS = {
    "Flow_Sample_Collector_Set": ["local_group_id"],
    # Port identity (interfaces.Interface): read where the schema has it.
    "Bridge": ["ports"],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "ofport", "ifindex", "type", "status"],
}

_TABLES = tuple(_REQUIRED_COLUMNS) + tuple(
    t for t in _OPTIONAL_COLUMNS if t not in _REQUIRED_COLUMNS)

ExporterOptions = Union[BridgeExporterOptions, FlowExporterOptions]

def _first_u32(value) -> int:
    """An optional integer column's value in 0..2^32-1, else 0."""
    return value[0] if value and 0 <= value[0] <= UINT32_MAX else 0


def _u32_text(text: Optional[str]) -> int:
    """A status value such as if_type ("6"), as OVS's smap_get_ullong
    reads it: 0 when absent or not a number."""
    if text and text.strip().isdigit():
        return int(text) & UINT32_MAX
    return 0


def _split_remotes(remote: str) -> List[str]:
    """"unix:a,tcp:b:1" -> ["unix:a", "tcp:b:1"], as ovs.db.idl does."""
    remotes: List[str] = []
    for part in remote.split(","):
        if remotes and ":" not in part:
            remotes[-1] += "," + part
        else:
            remotes.append(part)
    return remotes


def _fingerprint(schema_json) -> Tuple:
    """What about a schema matters to us: its version and checksum, and
    the columns of the tables we read.  Raises KeyError/TypeError/
    AttributeError on a malformed schema."""
    tables = schema_json["tables"]
    return (str(schema_json.get("version", "")),
            str(schema_json.get("cksum", "")),
            tuple(sorted((name, tuple(sorted(tables[name]["columns"])))
                         for name in _TABLES if name in tables)))


class _Idl(ovs.db.idl.Idl):
    """An Idl that notes when the server cancels its monitor, which
    ovsdb-server does when the database's schema changes (e.g. after
    ``ovsdb-client convert``).  The Idl itself just monitors again with
    the columns it knows; the reader uses the note to refetch the schema.
    """

    schema_may_have_changed = False

    def handle_monitor_canceled(self, msg):
        handled = super().handle_monitor_canceled(msg)
        if handled:
            self.schema_may_have_changed = True
        return handled


class _Reading:
    """Warnings met while turning one snapshot of rows into values."""

    def __init__(self) -> None:
        self.problems: Dict[str, str] = {}

    def warn(self, key: str, text: str) -> None:
        self.problems.setdefault(key, text)


class ConfigReader:
    """The IPFIX configuration in OVSDB, as option values.

    ``remote``: an OVSDB remote as ovs.jsonrpc takes it ("unix:PATH",
    "tcp:IP:PORT", "ssl:IP:PORT", or several separated by commas; for ssl
    the caller sets ovs.stream.Stream's key, certificate and CA first).
    ``probe_interval`` (ms): inactivity probe, None for OVS's default.

    ``stats`` counts: ``schema_fetches`` (successful get_schema replies),
    ``schema_errors``, ``schema_changes`` (IDL rebuilt for a new schema),
    ``config_warnings`` (distinct problems met).
    """

    def __init__(self, remote: str,
                 probe_interval: Optional[int] = None) -> None:
        self.remote = remote
        self.probe_interval = probe_interval
        self.stats: collections.Counter = collections.Counter()
        self.recent_warnings: collections.deque = collections.deque(
            maxlen=32)
        self._problems: Dict[str, str] = {}

        self._idl: Optional[_Idl] = None
        self._idl_connected = False
        self._idl_connects = 0
        self._fingerprint: Tuple = ()
        self._ipfix_columns: frozenset = frozenset()
        self._fscs_columns: frozenset = frozenset()
        #: Registered columns per table (what the schema had of ours).
        self._registered: Dict[str, frozenset] = {}
        self._ports: Dict[str, Ports] = {}
        self._ports_seen: Tuple = (None, -1)

        # The get_schema session: open while a fetch is wanted.
        self._session: Optional[ovs.jsonrpc.Session] = None
        self._request_id = None
        self._request_seqno: Optional[int] = None

        self._seen_idl: Optional[_Idl] = None
        self._seen_seqno = -1
        self._desired: Dict[Tuple, ExporterOptions] = {}
        self._start_schema_fetch()

    # ----------------------------------------------------------- loop --

    def run(self) -> None:
        """Does whatever the connections need: fetch the schema, process
        the IDL's messages, recheck the schema after the IDL reconnects or
        its monitor is cancelled.  Never blocks."""
        if self._session is not None:
            self._run_schema_fetch()
        idl = self._idl
        if idl is None:
            return
        idl.run()
        connected = self.connected
        # A reconnect may reach a server on a newer database, and a
        # cancelled monitor means the schema changed: fetch it again.  The
        # IDL keeps running (and desired() valid) meanwhile.
        recheck = idl.schema_may_have_changed
        idl.schema_may_have_changed = False
        if connected and not self._idl_connected:
            self._idl_connects += 1
            recheck = recheck or self._idl_connects > 1
        self._idl_connected = connected
        if recheck and self._session is None:
            self._start_schema_fetch()

    def wait(self, poller) -> None:
        """Wakes ``poller`` for IDL traffic, schema-fetch traffic and the
        next reconnection attempt."""
        if self._session is not None:
            self._session.wait(poller)
            self._session.recv_wait(poller)
        if self._idl is not None:
            self._idl.wait(poller)

    def changed(self) -> bool:
        """True when the replica moved since the last ``desired()`` (also
        after a reconnect, when ``desired()`` gives equal values)."""
        idl = self._idl
        if idl is None or not idl.has_ever_connected():
            return False
        return (idl is not self._seen_idl
                or idl.change_seqno != self._seen_seqno)

    def desired(self) -> Dict[Tuple, ExporterOptions]:
        """The exporters OVSDB asks for: {options.key: options}.

        Before the first sync (and while the IDL is rebuilt for a new
        schema) the last result is returned again, initially {}.
        """
        idl = self._idl
        if idl is not None and idl.has_ever_connected():
            self._seen_idl, self._seen_seqno = idl, idl.change_seqno
            self._desired = self._read(idl)
        return dict(self._desired)

    def ports(self) -> Dict[str, Ports]:
        """{bridge name: {OpenFlow port number: interfaces.Interface}}.

        Interfaces without an ofport (vswitchd has not numbered them, or
        failed to open them: ofport -1) are left out: samples cannot name
        them.  Read again only when the replica moved; before the first
        sync (or with a schema lacking Port/Interface) {} or the last
        result.
        """
        idl = self._idl
        if idl is None or not idl.has_ever_connected():
            return self._ports
        seen = (idl, idl.change_seqno)
        if seen != self._ports_seen:
            self._ports_seen = seen
            self._ports = self._read_ports(idl)
        return self._ports

    @property
    def connected(self) -> bool:
        """True while the IDL is connected and monitoring the database."""
        idl = self._idl
        # Idl has no public "is connected"; its session is stable API in
        # every ovs release since 2.x.
        return (idl is not None and idl._session.is_connected()
                and idl.state == ovs.db.idl.Idl.IDL_S_MONITORING)

    @property
    def schema_version(self) -> Optional[str]:
        """The version of the server's schema the IDL uses, or None."""
        return self._fingerprint[0] if self._fingerprint else None

    def close(self) -> None:
        """Drops the connections.  The reader is useless afterwards."""
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._idl is not None:
            self._idl.close()
            self._idl = None

    # --------------------------------------------------- schema fetch --

    def _start_schema_fetch(self) -> None:
        self._session = ovs.jsonrpc.Session.open_multiple(
            _split_remotes(self.remote), probe_interval=self.probe_interval)
        self._request_id = None
        self._request_seqno = None

    def _run_schema_fetch(self) -> None:
        session = self._session
        session.run()
        if not session.is_connected():
            return
        if session.get_seqno() != self._request_seqno:
            # A new connection: (re)send the request on it.
            request = ovs.jsonrpc.Message.create_request("get_schema",
                                                         [DB_NAME])
            self._request_id = request.id
            self._request_seqno = session.get_seqno()
            session.send(request)
        for _ in range(50):
            msg = session.recv()
            if msg is None:
                return
            if msg.id != self._request_id or msg.type not in (
                    ovs.jsonrpc.Message.T_REPLY,
                    ovs.jsonrpc.Message.T_ERROR):
                continue
            if msg.type == ovs.jsonrpc.Message.T_ERROR:
                error = ovs.json.to_string(msg.error)
                self._schema_failed(f"server refused get_schema: {error}")
                return
            try:
                self._use_schema(msg.result)
            except (ovs.db.error.Error, ValueError, KeyError, TypeError,
                    AttributeError, AssertionError) as e:
                self._schema_failed(f"unusable {DB_NAME} schema: {e}")
                return
            session.close()
            self._session = None
            return

    def _schema_failed(self, text: str) -> None:
        self.stats["schema_errors"] += 1
        text = f"{self.remote}: {text}; retrying"
        self.recent_warnings.append(text)
        self._log(text)
        # Reconnect with backoff, then ask again on the new connection.
        self._session.force_reconnect()

    def _use_schema(self, schema_json) -> None:
        """Builds the IDL from the server's schema, unless the one in use
        already matches it.  Raises ValueError if the schema lacks a
        table or column we need."""
        self.stats["schema_fetches"] += 1
        fingerprint = _fingerprint(schema_json)
        if self._idl is not None and fingerprint == self._fingerprint:
            return
        idl = self._make_idl(schema_json)
        if self._idl is not None:
            self.stats["schema_changes"] += 1
            log.vlog.info(f"{self.remote}: {DB_NAME} schema changed from "
                      f"{self._fingerprint[0]} to {fingerprint[0]}, "
                      "reloading")
            # self._desired stays valid until the new IDL has synced.
            self._idl.close()
        else:
            log.vlog.info(f"{self.remote}: using {DB_NAME} schema "
                      f"{fingerprint[0]}")
        tables = schema_json["tables"]
        self._idl = idl
        self._idl_connected = False
        self._idl_connects = 0
        self._fingerprint = fingerprint
        self._ipfix_columns = frozenset(tables["IPFIX"]["columns"])
        self._fscs_columns = frozenset(
            tables["Flow_Sample_Collector_Set"]["columns"])

    def _make_idl(self, schema_json) -> _Idl:
        """An IDL for the tables and columns we read."""
        tables = schema_json["tables"]
        helper = ovs.db.idl.SchemaHelper(schema_json=schema_json)
        registered = {}
        for table in _TABLES:
            present = tables.get(table, {}).get("columns", {})
            columns = _REQUIRED_COLUMNS.get(table, [])
            missing = [c for c in columns if c not in present]
            if missing:
                raise ValueError(f"table {table} lacks column(s) "
                                 f"{', '.join(missing)}")
            optional = [c for c in _OPTIONAL_COLUMNS.get(table, [])
                        if c in present]
            if table == "IPFIX":
                # All of it: new columns are read as they appear.
                helper.register_table(table)
            elif columns or optional:
                helper.register_columns(table, columns + optional)
            registered[table] = frozenset(columns + optional)
        self._registered = registered
        return _Idl(self.remote, helper, probe_interval=self.probe_interval)

    # -------------------------------------------------- rows -> values --

    def _read(self, idl) -> Dict[Tuple, ExporterOptions]:
        reading = _Reading()
        out: Dict[Tuple, ExporterOptions] = {}
        for br in idl.tables["Bridge"].rows.values():
            ipfix = br.ipfix
            if not ipfix or ipfix[0] is None:
                continue
            row = ipfix[0]
            if not row.targets:
                # OVS disables an exporter with no target.
                continue
            where = f"bridge {br.name}"
            opts = BridgeExporterOptions(
                bridge=br.name,
                export=self._export_options(row, where, reading),
                sampling=self._int(row, "sampling", where, reading),
                obs_domain_id=self._int(row, "obs_domain_id", where,
                                        reading),
                obs_point_id=self._int(row, "obs_point_id", where, reading),
                enable_input_sampling=self._bool(
                    row, "enable-input-sampling", True, where, reading),
                enable_output_sampling=self._bool(
                    row, "enable-output-sampling", True, where, reading))
            out[opts.key] = opts
        for fs in idl.tables["Flow_Sample_Collector_Set"].rows.values():
            ipfix = fs.ipfix
            if not ipfix or ipfix[0] is None or not ipfix[0].targets:
                # No IPFIX (e.g. a local-sampling-only set): nothing to us.
                continue
            bridge = fs.bridge
            if not isinstance(bridge, ovs.db.idl.Row):
                continue
            local_group_id = None
            if "local_group_id" in self._fscs_columns and fs.local_group_id:
                local_group_id = fs.local_group_id[0]
            where = f"bridge {bridge.name} collector set {fs.id}"
            opts = FlowExporterOptions(
                bridge=bridge.name, collector_set_id=fs.id,
                export=self._export_options(ipfix[0], where, reading),
                local_group_id=local_group_id)
            out[opts.key] = opts
        self._report(reading)
        return out

    def _read_ports(self, idl) -> Dict[str, Ports]:
        reg = self._registered
        if ("ports" not in reg.get("Bridge", ())
                or "interfaces" not in reg.get("Port", ())
                or "ofport" not in reg.get("Interface", ())):
            return {}
        cols = reg["Interface"]
        out: Dict[str, Ports] = {}
        for br in idl.tables["Bridge"].rows.values():
            ports: Ports = {}
            for port in br.ports:
                for iface in port.interfaces:
                    if not iface.ofport or not 0 < iface.ofport[0] \
                            <= UINT32_MAX:
                        continue
                    status = iface.status if "status" in cols else {}
                    ports[iface.ofport[0]] = Interface(
                        ofport=iface.ofport[0],
                        name=iface.name if "name" in cols else "",
                        ifindex=_first_u32(iface.ifindex)
                        if "ifindex" in cols else 0,
                        if_type=_u32_text(status.get("if_type")),
                        description=status.get("if_descr", ""),
                        type=iface.type if "type" in cols else "")
            out[br.name] = ports
        return out

    def _export_options(self, row, where: str,
                        reading: _Reading) -> ExportOptions:
        targets = tuple(sorted(row.targets))
        for target in targets:
            try:
                check_target(target)
            except ValueError as e:
                reading.warn(
                    f"target {where} {target!r}",
                    f"{where}: IPFIX target {target!r} is not [udp:|tcp:|"
                    f"tls:]IP:PORT, [IPv6]:PORT, HOST:PORT, a bare "
                    f"address/host or file:/PATH ({e}); the collector "
                    "layer will skip it")
        return ExportOptions(
            targets=targets,
            cache=CacheOptions(
                active_timeout=self._int(row, "cache_active_timeout",
                                         where, reading),
                max_flows=self._int(row, "cache_max_flows", where,
                                    reading),
                idle_timeout=self._idle_timeout(row, where, reading),
                tcp_end_of_flow=self._bool(row, "tcp-end-of-flow", False,
                                           where, reading)),
            template_interval=self._int(row, "template_interval", where,
                                        reading),
            stats_interval=self._int(row, "stats_interval", where,
                                     reading),
            max_message_size=self._max_message_size(row, where, reading),
            enable_tunnel_sampling=self._bool(
                row, "enable-tunnel-sampling", True, where, reading),
            virtual_obs_id=self._virtual_obs_id(row, where, reading),
            collector_buffer_size=self._buffer_size(row, where, reading))

    def _int(self, row, column: str, where: str, reading: _Reading) -> int:
        lo, hi, default = IPFIX_INT_COLUMNS[column]
        if column not in self._ipfix_columns:
            return default  # An older schema: the column does not exist.
        value = getattr(row, column)
        if not value:
            return default
        value = value[0]
        if lo <= value <= hi:
            return value
        clamped = min(max(value, lo), hi)
        reading.warn(f"{where} {column}",
                     f"{where}: IPFIX {column}={value} is out of range "
                     f"{lo}..{hi}, using {clamped}")
        return clamped

    @staticmethod
    def _bool(row, key: str, default: bool, where: str,
              reading: _Reading) -> bool:
        value = row.other_config.get(key)
        if value is None:
            return default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        reading.warn(f"{where} {key}",
                     f"{where}: IPFIX other_config:{key}={value!r} is not "
                     f"true or false, using {str(default).lower()}")
        return default

    @staticmethod
    def _uint_option(row, key: str, unit: str, default: int, lo: int,
                     hi: int, clamp: bool, where: str,
                     reading: _Reading, zero: str = "") -> int:
        """other_config:``key``, a whole number of ``unit`` in lo..hi.

        Absent: ``default``.  Not a whole number: ``default``, logged.
        Out of range: the nearest bound when ``clamp``, else ``default``,
        logged.  Each problem is logged once per row and key; ``zero``
        names what 0 means, for the log ("off").
        """
        def says(n: int) -> str:
            return f"{n} ({zero})" if zero and n == 0 else str(n)

        value = row.other_config.get(key)
        if value is None:
            return default
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            reading.warn(f"{where} {key}",
                         f"{where}: IPFIX other_config:{key}={value!r} is "
                         f"not a number of {unit}, using {says(default)}")
            return default
        number = int(text)
        if lo <= number <= hi:
            return number
        use = min(max(number, lo), hi) if clamp else default
        reading.warn(f"{where} {key}",
                     f"{where}: IPFIX other_config:{key}={number} is out "
                     f"of range {lo}..{hi}, using {says(use)}")
        return use

    def _max_message_size(self, row, where: str, reading: _Reading) -> int:
        """other_config:max-message-size, bytes, clamped to 512..65535."""
        return self._uint_option(
            row, "max-message-size", "bytes", DEFAULT_MAX_MESSAGE_SIZE,
            MIN_MAX_MESSAGE_SIZE, MAX_MAX_MESSAGE_SIZE, True, where, reading)

    def _buffer_size(self, row, where: str, reading: _Reading) -> int:
        """other_config:collector-buffer-size, bytes (0 to 1 GiB)."""
        return self._uint_option(
            row, "collector-buffer-size", "bytes",
            DEFAULT_COLLECTOR_BUFFER_SIZE, 0, MAX_COLLECTOR_BUFFER_SIZE,
            True, where, reading)

    def _idle_timeout(self, row, where: str, reading: _Reading) -> int:
        """other_config:cache-idle-timeout (s): 0 (off) when absent or
        bad (not a whole number, negative, over MAX_IDLE_TIMEOUT)."""
        return self._uint_option(
            row, "cache-idle-timeout", "seconds", 0, 0, MAX_IDLE_TIMEOUT,
            False, where, reading, zero="off")

    @staticmethod
    def _virtual_obs_id(row, where: str,
                        reading: _Reading) -> Optional[str]:
        value = row.other_config.get("virtual_obs_id")
        if not value:
            return None
        size = len(value.encode("utf-8"))
        if size > VIRTUAL_OBS_ID_MAX_LEN:
            # OVS disables the whole exporter; we only drop the name.
            reading.warn(f"{where} virtual_obs_id",
                         f"{where}: IPFIX other_config:virtual_obs_id is "
                         f"{size} bytes long, more than "
                         f"{VIRTUAL_OBS_ID_MAX_LEN}: ignored")
            return None
        return value

    # ------------------------------------------------------- logging --

    def _report(self, reading: _Reading) -> None:
        """Logs the problems that are new since the previous reading."""
        for key, text in reading.problems.items():
            if self._problems.get(key) == text:
                continue
            self.stats["config_warnings"] += 1
            self.recent_warnings.append(text)
            self._log(text)
        self._problems = reading.problems

    @staticmethod
    def _log(text: str) -> None:
        # One rate-limit bucket for all configuration warnings.
        log.warn("%s", text)
