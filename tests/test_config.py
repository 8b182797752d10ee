"""ConfigReader against a real ovsdb-server: rows -> option values.

Every test drives the reader the way the daemon does (run, wait on an
``ovs.poller``, block) and changes the database with ovs-vsctl or
ovsdb-client, as an operator would.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time

import ovs.poller
import pytest
from support.ovsdb import newer_schema, transact

from ovs_ipfix_py.config import ConfigReader, parse_target
from ovs_ipfix_py.options import (
    BridgeExporterOptions,
    CacheOptions,
    ExportOptions,
    FlowExporterOptions,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers -------------------------------------------------------------

def pump(cfg, predicate, timeout=5.0, what="condition"):
    """Run the reader's poll loop until ``predicate()`` holds after a
    run(); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        cfg.run()
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for " + what)
        poller = ovs.poller.Poller()
        cfg.wait(poller)
        poller.timer_wait(int(min(remaining, 0.5) * 1000) + 1)
        poller.block()


def spin(cfg, seconds):
    """Run the poll loop for ``seconds`` whatever happens."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cfg.run()
        poller = ovs.poller.Poller()
        cfg.wait(poller)
        poller.timer_wait(int((deadline - time.monotonic()) * 1000) + 1)
        poller.block()


def sync(cfg, what="a change"):
    """Wait for changed() and return desired()."""
    pump(cfg, cfg.changed, what=what)
    desired = cfg.desired()
    assert not cfg.changed()
    return desired


def create_ipfix(server, bridge="br0", ipfix_args=(), flow_set_id=None):
    """Give ``bridge`` (created if needed) an IPFIX row, and optionally a
    Flow_Sample_Collector_Set using the same row."""
    args = ["--may-exist", "add-br", bridge,
            "--", "set", "Bridge", bridge, "datapath_type=dummy",
            "--", "--id=@br", "get", "Bridge", bridge,
            "--", "--id=@i", "create", "IPFIX", *ipfix_args,
            "--", "set", "Bridge", bridge, "ipfix=@i"]
    if flow_set_id is not None:
        args += ["--", "create", "Flow_Sample_Collector_Set",
                 f"id={flow_set_id}", "bridge=@br", "ipfix=@i"]
    server.vsctl(*args)


@pytest.fixture
def reader_factory():
    readers = []

    def make(remote):
        cfg = ConfigReader(remote)
        readers.append(cfg)
        return cfg

    try:
        yield make
    finally:
        for cfg in readers:
            cfg.close()


def default_export(targets, **kw):
    return ExportOptions(targets=tuple(targets), **kw)


# -- pure parts ------------------------------------------------------------

@pytest.mark.parametrize("target, expected", [
    ("127.0.0.1:4739", ("127.0.0.1", 4739)),
    ("127.0.0.1", ("127.0.0.1", 4739)),
    ("[::1]:9995", ("::1", 9995)),
    ("[fe80::1]", ("fe80::1", 4739)),
    ("2001:db8::7", ("2001:db8::7", 4739)),
    ("collector.example.net:2055", ("collector.example.net", 2055)),
    ("localhost", ("localhost", 4739)),
])
def test_parse_target_accepts(target, expected):
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", [
    "", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http",
    "10.0.0.300:4739", "127.1", "[::1", "[::1]x", "[nothost]:1",
    "2001:db8::7:4739:x", "bad host:1", "-bad.example:1", ":4739",
])
def test_parse_target_rejects(target):
    with pytest.raises(ValueError):
        parse_target(target)


# -- against ovsdb-server ----------------------------------------------------

def test_bridge_exporter_defaults(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    assert not cfg.changed() and cfg.desired() == {}
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    desired = sync(cfg)
    assert cfg.connected
    assert cfg.schema_version == "8.3.1"
    expected = BridgeExporterOptions(
        bridge="br0", export=default_export(["127.0.0.1:4739"]))
    assert desired == {("bridge", "br0"): expected}
    # Spelled out: the defaults OVS documents.
    value = desired[("bridge", "br0")]
    assert (value.sampling, value.obs_domain_id, value.obs_point_id) == (
        400, 0, 0)
    assert value.enable_input_sampling and value.enable_output_sampling
    export = value.export
    assert export.cache == CacheOptions(0, 0)
    # Debian 3.1's schema has no template_interval / stats_interval.
    assert (export.template_interval, export.stats_interval) == (600, 600)
    assert export.max_message_size == 1400
    assert export.enable_tunnel_sampling
    assert export.virtual_obs_id is None


def test_bridge_and_flow_exporter_all_values(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, flow_set_id=1, ipfix_args=[
        'targets="127.0.0.1:4739"', "sampling=1", "obs_domain_id=123",
        "obs_point_id=456", "cache_active_timeout=60",
        "cache_max_flows=10000",
        "other_config:enable-tunnel-sampling=false",
        "other_config:enable-input-sampling=false",
        "other_config:enable-output-sampling=true",
        "other_config:virtual_obs_id=vobs-1",
        "other_config:max-message-size=9000",
        "other_config:cache-idle-timeout=15",
        "other_config:tcp-end-of-flow=true"])
    desired = sync(cfg)
    export = ExportOptions(
        targets=("127.0.0.1:4739",),
        cache=CacheOptions(60, 10000, idle_timeout=15,
                           tcp_end_of_flow=True),
        template_interval=600, stats_interval=600, max_message_size=9000,
        enable_tunnel_sampling=False, virtual_obs_id="vobs-1")
    assert desired == {
        ("bridge", "br0"): BridgeExporterOptions(
            bridge="br0", export=export, sampling=1, obs_domain_id=123,
            obs_point_id=456, enable_input_sampling=False,
            enable_output_sampling=True),
        ("flow", "br0", 1): FlowExporterOptions(
            bridge="br0", collector_set_id=1, export=export,
            local_group_id=None),
    }
    for key, value in desired.items():
        assert value.key == key
    assert cfg.stats["config_warnings"] == 0


def test_options_and_targets_changed(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"',
                                    "sampling=100"])
    before = sync(cfg)[("bridge", "br0")]

    ovsdb.vsctl("set", "IPFIX", ".", "sampling=10",
                "cache_active_timeout=5")
    after = sync(cfg)[("bridge", "br0")]
    assert after != before
    assert (after.sampling, after.export.cache.active_timeout) == (10, 5)
    assert after.export.targets == before.export.targets

    # Given out of order: read sorted, so equal sets compare equal.
    ovsdb.vsctl("set", "IPFIX", ".",
                'targets=["[::1]:4739","10.0.0.2:4739","10.0.0.1:4739"]')
    targets = sync(cfg)[("bridge", "br0")].export.targets
    assert targets == ("10.0.0.1:4739", "10.0.0.2:4739", "[::1]:4739")

    # A change elsewhere in the database: changed() may fire, values equal.
    ovsdb.vsctl("set", "Bridge", "br0", "external_ids:foo=bar")
    spin(cfg, 0.1)
    assert cfg.desired()[("bridge", "br0")].export.targets == targets


def test_exporters_removed(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'],
                 flow_set_id=7)
    assert set(sync(cfg)) == {("bridge", "br0"), ("flow", "br0", 7)}

    ovsdb.vsctl("clear", "Bridge", "br0", "ipfix")
    assert set(sync(cfg)) == {("flow", "br0", 7)}

    ovsdb.vsctl("--all", "destroy", "Flow_Sample_Collector_Set")
    assert sync(cfg) == {}


def test_flow_exporters_on_two_bridges(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    for br in ("br0", "br1"):
        ovsdb.vsctl("add-br", br, "--", "set", "Bridge", br,
                    "datapath_type=dummy")
    ovsdb.vsctl(
        "--", "--id=@b0", "get", "Bridge", "br0",
        "--", "--id=@b1", "get", "Bridge", "br1",
        "--", "--id=@a", "create", "IPFIX", 'targets="127.0.0.1:5001"',
        "cache_max_flows=100",
        "--", "--id=@b", "create", "IPFIX",
        'targets=["127.0.0.1:5002","[::1]:5003"]',
        "--", "create", "Flow_Sample_Collector_Set", "id=1", "bridge=@b0",
        "ipfix=@a",
        "--", "create", "Flow_Sample_Collector_Set", "id=2", "bridge=@b0",
        "ipfix=@b",
        "--", "create", "Flow_Sample_Collector_Set", "id=1", "bridge=@b1",
        "ipfix=@b")
    desired = sync(cfg)
    a = ExportOptions(targets=("127.0.0.1:5001",),
                      cache=CacheOptions(0, 100))
    b = ExportOptions(targets=("127.0.0.1:5002", "[::1]:5003"))
    assert desired == {
        ("flow", "br0", 1): FlowExporterOptions("br0", 1, a),
        ("flow", "br0", 2): FlowExporterOptions("br0", 2, b),
        ("flow", "br1", 1): FlowExporterOptions("br1", 1, b),
    }


def test_ipfix_without_targets_is_no_exporter(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=["sampling=1"], flow_set_id=1)
    ovsdb.vsctl("--", "--id=@br", "get", "Bridge", "br0",
                "--", "create", "Flow_Sample_Collector_Set", "id=2",
                "bridge=@br")   # no IPFIX at all
    assert sync(cfg) == {}
    # Giving the row a target enables both exporters that use it.
    ovsdb.vsctl("set", "IPFIX", ".", 'targets="127.0.0.1:4739"')
    assert set(sync(cfg)) == {("bridge", "br0"), ("flow", "br0", 1)}


def test_invalid_values_warn_once_and_never_raise(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=[
        'targets=["127.0.0.1:4739","bad host:1","10.0.0.1:99999"]',
        "other_config:max-message-size=100",
        "other_config:enable-tunnel-sampling=maybe",
        "other_config:virtual_obs_id=" + "x" * 300])
    value = sync(cfg)[("bridge", "br0")]
    # Targets are kept as they are: the collector layer skips bad ones.
    assert value.export.targets == ("10.0.0.1:99999", "127.0.0.1:4739",
                                    "bad host:1")
    assert value.export.max_message_size == 512
    assert value.export.enable_tunnel_sampling is True
    assert value.export.virtual_obs_id is None
    warnings = list(cfg.recent_warnings)
    assert cfg.stats["config_warnings"] == 5, warnings
    assert any("'bad host:1'" in w and "bridge br0" in w for w in warnings)
    assert any("'10.0.0.1:99999'" in w and "port 99999 is out of range"
               in w for w in warnings)
    assert any("max-message-size=100 is out of range 512..65535, using 512"
               in w for w in warnings)

    # The same problems on the next change are not logged again...
    ovsdb.vsctl("set", "IPFIX", ".", "sampling=2")
    assert sync(cfg)[("bridge", "br0")].sampling == 2
    assert cfg.stats["config_warnings"] == 5
    # ...a new one is.
    ovsdb.vsctl("set", "IPFIX", ".", "other_config:max-message-size=abc")
    assert sync(cfg)[("bridge", "br0")].export.max_message_size == 1400
    assert cfg.stats["config_warnings"] == 6
    assert "'abc' is not a number of bytes" in cfg.recent_warnings[-1]


def test_transport_targets_and_buffer_size(ovsdb, reader_factory):
    """tcp:/tls:/file: targets are read as they are; a bad one warns;
    other_config:collector-buffer-size is bytes, checked."""
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=[
        'targets=["tcp:127.0.0.1:4739","tls:[::1]","file:/var/x.ipfix",'
        '"file:relative"]',
        "other_config:collector-buffer-size=4096"])
    value = sync(cfg)[("bridge", "br0")]
    assert value.export.targets == ("file:/var/x.ipfix", "file:relative",
                                    "tcp:127.0.0.1:4739", "tls:[::1]")
    assert value.export.collector_buffer_size == 4096
    warnings = list(cfg.recent_warnings)
    assert len(warnings) == 1 and "'file:relative'" in warnings[0] \
        and "absolute path" in warnings[0], warnings
    ovsdb.vsctl("set", "IPFIX", ".", "other_config:collector-buffer-size=x")
    assert sync(cfg)[("bridge", "br0")].export.collector_buffer_size == \
        64 << 20
    assert "collector-buffer-size='x' is not a number of bytes" in \
        cfg.recent_warnings[-1]
    ovsdb.vsctl("remove", "IPFIX", ".", "other_config",
                "collector-buffer-size")
    assert sync(cfg)[("bridge", "br0")].export.collector_buffer_size == \
        64 << 20


def read_with_vlog(remote):
    """Sync a reader in a child process with ovs.vlog initialised
    (Vlog.init() is process-wide); returns (desired keys and
    config_warnings as printed, distinct WARN messages of module
    config)."""
    script = textwrap.dedent(f"""
        import time, ovs.poller, ovs.vlog
        from ovs_ipfix_py.config import ConfigReader
        cfg = ConfigReader({remote!r})
        ovs.vlog.Vlog.init()
        ovs.vlog.Vlog.set_levels_from_string("syslog:off")
        deadline = time.monotonic() + 5
        while not cfg.changed() and time.monotonic() < deadline:
            cfg.run()
            if cfg.changed():
                break
            p = ovs.poller.Poller(); cfg.wait(p); p.timer_wait(100)
            p.block()
        print(sorted(cfg.desired()), cfg.stats["config_warnings"])
        cfg.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    warned = {m.group(1) for m in re.finditer(
        r"\|\s*config\s*\|\s*WARN\s*\|\s*(.*)", result.stderr)}
    return result.stdout.strip(), sorted(warned)


def test_invalid_target_reaches_the_log(ovsdb):
    create_ipfix(ovsdb, ipfix_args=['targets=["127.0.0.1:4739","::1:x"]'])
    out, warned = read_with_vlog(ovsdb.remote)
    assert out == "[('bridge', 'br0')] 1"
    assert len(warned) == 1, warned
    assert warned[0].startswith("bridge br0: IPFIX target '::1:x' is not")


def test_warnings_are_rate_limited(ovsdb):
    bad = ",".join(f'"bad{i}:x"' for i in range(12))
    create_ipfix(ovsdb, ipfix_args=[f"targets=[{bad}]"])
    out, warned = read_with_vlog(ovsdb.remote)
    assert out == "[('bridge', 'br0')] 12"     # all counted...
    assert len(warned) == 5, warned            # ...a burst of 5 logged


def test_ovsdb_restart_keeps_and_resyncs(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"',
                                    "sampling=7"], flow_set_id=3)
    before = sync(cfg)
    assert len(before) == 2

    ovsdb.stop()
    pump(cfg, lambda: not cfg.connected, what="disconnect")
    spin(cfg, 0.3)
    # Nothing to do while the server is away: the last values stand.
    assert not cfg.changed()
    assert cfg.desired() == before

    ovsdb.start()
    pump(cfg, lambda: cfg.connected and cfg.changed(), timeout=10,
         what="resync after restart")
    assert cfg.desired() == before   # equal values: nothing to flush

    ovsdb.vsctl("set", "IPFIX", ".", "sampling=8")
    assert sync(cfg)[("bridge", "br0")].sampling == 8


def test_ovsdb_killed_and_restarted(ovsdb, reader_factory):
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    before = sync(cfg)
    ovsdb.restart()          # SIGKILL, then start on the same database
    pump(cfg, lambda: cfg.connected and cfg.changed(), timeout=10,
         what="resync after SIGKILL")
    assert cfg.desired() == before


def test_server_absent_at_start(ovsdb_factory, reader_factory):
    server = ovsdb_factory(start=False)
    cfg = reader_factory(server.remote)
    spin(cfg, 0.2)
    assert not cfg.connected and not cfg.changed()
    assert cfg.desired() == {}
    server.start()
    create_ipfix(server, ipfix_args=['targets="127.0.0.1:4739"'])
    # ovs.reconnect backs off 1 s, then 2 s, between attempts.
    assert set(sync(cfg)) == {("bridge", "br0")}


def test_unusable_schema_is_retried_not_fatal(ovsdb_factory, tmp_path,
                                              reader_factory):
    schema = {"name": "Open_vSwitch", "version": "0.0.1", "tables": {
        "Bridge": {"columns": {"name": {"type": "string"}}}}}
    path = tmp_path / "tiny.ovsschema"
    path.write_text(json.dumps(schema))
    server = ovsdb_factory(schema=str(path), start=False)
    server._run(["ovsdb-tool", "create", server.db_path, str(path)])
    server.start()   # no "init": this schema has no Open_vSwitch table
    cfg = reader_factory(server.remote)
    pump(cfg, lambda: cfg.stats["schema_errors"] >= 1, what="error")
    assert "table Bridge lacks column(s) ipfix" in cfg.recent_warnings[-1]
    spin(cfg, 0.1)
    assert not cfg.connected and cfg.desired() == {}


def test_newer_schema_columns_are_read(ovsdb_factory, reader_factory,
                                       tmp_path):
    server = ovsdb_factory(schema=newer_schema(tmp_path / "new.ovsschema"))
    cfg = reader_factory(server.remote)
    create_ipfix(server, ipfix_args=['targets="127.0.0.1:4739"'],
                 flow_set_id=4)
    desired = sync(cfg)
    assert cfg.schema_version == "8.9.0"
    # Columns present but empty: defaults.
    assert desired[("bridge", "br0")].export.template_interval == 600
    assert desired[("flow", "br0", 4)].local_group_id is None

    transact(server,
             {"op": "update", "table": "IPFIX", "where": [],
              "row": {"template_interval": 30, "stats_interval": 45}},
             {"op": "update", "table": "Flow_Sample_Collector_Set",
              "where": [], "row": {"local_group_id": 9}})
    desired = sync(cfg)
    for value in desired.values():
        assert (value.export.template_interval,
                value.export.stats_interval) == (30, 45)
    assert desired[("flow", "br0", 4)].local_group_id == 9


def test_looser_schema_values_are_clamped(ovsdb_factory, reader_factory,
                                          tmp_path):
    path = newer_schema(tmp_path / "loose.ovsschema", loose_sampling=True)
    server = ovsdb_factory(schema=path)
    cfg = reader_factory(server.remote)
    create_ipfix(server, ipfix_args=['targets="127.0.0.1:4739"'])
    sync(cfg)
    transact(server, {"op": "update", "table": "IPFIX", "where": [],
                      "row": {"sampling": 0}})
    assert sync(cfg)[("bridge", "br0")].sampling == 1
    assert ("IPFIX sampling=0 is out of range 1..4294967295, using 1"
            in cfg.recent_warnings[-1])


def test_live_schema_upgrade_is_followed(ovsdb, reader_factory, tmp_path):
    """ovsdb-client convert to a newer schema under a running reader: it
    refetches the schema and reads the new columns, with no spurious
    change to the values meanwhile."""
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    before = sync(cfg)
    assert cfg.schema_version == "8.3.1"

    subprocess.run(["ovsdb-client", "convert", ovsdb.remote,
                    newer_schema(tmp_path / "new.ovsschema")],
                   check=True, capture_output=True, timeout=10)
    pump(cfg, lambda: cfg.schema_version == "8.9.0" and cfg.changed(),
         what="schema reload")
    assert cfg.stats["schema_changes"] == 1
    assert cfg.desired() == before

    transact(ovsdb, {"op": "update", "table": "IPFIX", "where": [],
                     "row": {"template_interval": 20}})
    assert sync(cfg)[("bridge", "br0")].export.template_interval == 20


def test_commit_to_changed_latency(ovsdb, reader_factory):
    """Median time from an ovs-vsctl commit to changed() over 20 runs.

    Measured from ovs-vsctl's exit (its transaction committed) and from
    its start (process start-up included)."""
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    sync(cfg)
    from_exit, from_start = [], []
    for i in range(20):
        t0 = time.perf_counter()
        ovsdb.vsctl("set", "IPFIX", ".", f"sampling={100 + i}")
        t1 = time.perf_counter()
        assert sync(cfg)[("bridge", "br0")].sampling == 100 + i
        t2 = time.perf_counter()
        from_exit.append(t2 - t1)
        from_start.append(t2 - t0)
    exit_ms = statistics.median(from_exit) * 1000
    start_ms = statistics.median(from_start) * 1000
    print(f"\ncommit->changed(): median {exit_ms:.2f} ms after ovs-vsctl "
          f"exits, {start_ms:.2f} ms from its start (n=20)")
    assert exit_ms < 100


def test_restart_on_newer_database_is_followed(ovsdb, reader_factory,
                                               tmp_path):
    """The server comes back on a database converted offline: the reader
    notices on reconnecting and reads the new columns."""
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    before = sync(cfg)
    ovsdb.stop()
    subprocess.run(["ovsdb-tool", "convert", ovsdb.db_path,
                    newer_schema(tmp_path / "new.ovsschema")],
                   check=True, capture_output=True, timeout=10)
    ovsdb.start()
    pump(cfg, lambda: cfg.schema_version == "8.9.0" and cfg.changed(),
         timeout=10, what="schema reload after restart")
    assert cfg.desired() == before
    assert cfg.stats["schema_changes"] == 1
    transact(ovsdb, {"op": "update", "table": "IPFIX", "where": [],
                     "row": {"stats_interval": 60}})
    assert sync(cfg)[("bridge", "br0")].export.stats_interval == 60


def test_close_drops_the_connection(ovsdb, reader_factory):
    def memory():
        text = ovsdb.appctl("ovsdb-server", "memory/show")
        return dict(kv.split(":") for kv in text.split())

    cfg = reader_factory(ovsdb.remote)
    sync(cfg, "initial sync")
    assert memory().get("sessions") == "1"
    assert memory()["monitors"] == "2"        # Open_vSwitch and _Server
    cfg.close()
    deadline = time.monotonic() + 5
    while memory()["monitors"] != "0" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert memory()["monitors"] == "0" and "sessions" not in memory()
    cfg.run()                                 # harmless after close
    assert not cfg.connected and not cfg.changed()


# -- ports: Bridge.ports -> Port.interfaces -> Interface ----------------------

def test_ports_are_read_and_followed_live(ovsdb, reader_factory):
    """Interface rows become interfaces.Interface values per bridge and
    OpenFlow port; a port that comes, is renamed, renumbered or goes
    changes ports(), never desired() (no flush)."""
    from ovs_ipfix_py.interfaces import Interface
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=['targets="127.0.0.1:4739"'])
    ovsdb.vsctl("add-port", "br0", "p1", "--", "set", "Interface", "p1",
                "ofport=1", "ifindex=7", "status:if_type=6",
                'status:if_descr="uplink NIC"', "--",
                "add-port", "br0", "vx0", "--", "set", "Interface", "vx0",
                "type=vxlan", "ofport=10", "options:remote_ip=flow", "--",
                "add-port", "br0", "new", "--", "set", "Interface", "new",
                "ofport=-1")
    desired = sync(cfg)
    assert cfg.ports() == {"br0": {
        1: Interface(1, "p1", 7, 6, "uplink NIC", ""),
        10: Interface(10, "vx0", 0, 0, "", "vxlan"),
    }}
    assert cfg.ports()["br0"][10].tunnel_type == 1
    ovsdb.vsctl("set", "Interface", "vx0", "ofport=11", "--",
                "set", "Interface", "new", "ofport=3", "--",
                "del-port", "br0", "p1")
    assert sync(cfg) == desired
    assert cfg.ports() == {"br0": {11: Interface(11, "vx0", type="vxlan"),
                                   3: Interface(3, "new")}}


def test_ports_with_an_older_schema(ovsdb_factory, reader_factory,
                                    tmp_path):
    """A schema without Interface.ifindex and status (older OVS): ports
    are still read, ifindex, type and description 0 and empty."""
    from ovs_ipfix_py.interfaces import Interface
    with open("/usr/share/openvswitch/vswitch.ovsschema") as f:
        schema = json.load(f)
    schema["version"] = "7.0.0"
    schema.pop("cksum", None)
    for column in ("ifindex", "status"):
        del schema["tables"]["Interface"]["columns"][column]
    path = tmp_path / "old.ovsschema"
    path.write_text(json.dumps(schema))
    server = ovsdb_factory(schema=str(path))
    cfg = reader_factory(server.remote)
    transact(server, {
        "op": "insert", "table": "Interface", "uuid-name": "i",
        "row": {"name": "p5", "ofport": 5}}, {
        "op": "insert", "table": "Port", "uuid-name": "p",
        "row": {"name": "p5", "interfaces": ["named-uuid", "i"]}}, {
        "op": "insert", "table": "Bridge", "uuid-name": "b",
        "row": {"name": "br9", "ports": ["named-uuid", "p"]}}, {
        "op": "mutate", "table": "Open_vSwitch", "where": [],
        "mutations": [["bridges", "insert", ["set", [["named-uuid",
                                                      "b"]]]]]})
    pump(cfg, lambda: cfg.changed() and cfg.ports().get("br9"),
         what="ports")
    assert cfg.ports() == {"br9": {5: Interface(5, "p5")}}


@pytest.mark.parametrize("value", ["-5", "abc", "1.5", "4201", "9" * 30,
                                   ""])
def test_bad_idle_timeout_warns_once_and_means_off(ovsdb, reader_factory,
                                                   value):
    """A negative, non-numeric, fractional or absurdly large
    cache-idle-timeout: logged once with the row and the key, 0 (off)
    used, the exporter kept; tcp-end-of-flow likewise (default false).
    """
    cfg = reader_factory(ovsdb.remote)
    create_ipfix(ovsdb, ipfix_args=[
        'targets="127.0.0.1:4739"', "cache_active_timeout=60",
        f'other_config:cache-idle-timeout="{value}"',
        "other_config:tcp-end-of-flow=sometimes"])
    cache = sync(cfg)[("bridge", "br0")].export.cache
    assert (cache.idle_timeout, cache.tcp_end_of_flow) == (0, False)
    assert cache.active_timeout == 60
    warnings = list(cfg.recent_warnings)
    assert cfg.stats["config_warnings"] == 2, warnings
    assert any("bridge br0" in w and "cache-idle-timeout=" in w
               and "using 0 (off)" in w for w in warnings)
    assert any("bridge br0" in w and "tcp-end-of-flow='sometimes'" in w
               for w in warnings)
    ovsdb.vsctl("set", "IPFIX", ".", "sampling=2")
    assert sync(cfg)[("bridge", "br0")].sampling == 2
    assert cfg.stats["config_warnings"] == 2
    # Fixed: the value applies, nothing more is logged.
    ovsdb.vsctl("set", "IPFIX", ".", "other_config:cache-idle-timeout=30",
                "other_config:tcp-end-of-flow=true")
    cache = sync(cfg)[("bridge", "br0")].export.cache
    assert (cache.idle_timeout, cache.tcp_end_of_flow) == (30, True)
    assert cfg.stats["config_warnings"] == 2
