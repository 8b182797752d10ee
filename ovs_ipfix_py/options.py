"""Exporter options as immutable values.

An exporter is fully described by one of these values.  Reconciliation
builds the desired set of values from OVSDB and compares them with ``==``
against the running ones: a difference means "flush as forced end, then
apply".  Nothing here touches OVSDB or sockets.

Units: timeouts and intervals in seconds, probabilities as OVS carries
them (32-bit for bridge sampling, 16-bit for flow sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

UINT32_MAX = 0xFFFFFFFF
UINT16_MAX = 0xFFFF

#: IPFIX well-known port (RFC 7011 section 10.3.4).
DEFAULT_COLLECTOR_PORT = 4739
DEFAULT_SAMPLING = 400
DEFAULT_TEMPLATE_INTERVAL = 600
DEFAULT_STATS_INTERVAL = 600
#: other_config:cache-idle-timeout's upper bound (s): as
#: cache_active_timeout's.
MAX_IDLE_TIMEOUT = 4200
#: RFC 7011 section 10.3.3: without path MTU knowledge, 512 bytes is
#: safe; 1400 fits any Ethernet path with room for tunnels.
DEFAULT_MAX_MESSAGE_SIZE = 1400
MIN_MAX_MESSAGE_SIZE = 512
#: other_config:collector-buffer-size (bytes): what a TCP, TLS or file
#: target holds while its collector is away or slower than a flush
#: (transport/stream.py says why so much).
DEFAULT_COLLECTOR_BUFFER_SIZE = 64 << 20
MAX_COLLECTOR_BUFFER_SIZE = 1 << 30


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """Flow cache behaviour shared by both exporter kinds.

    ``active_timeout`` (s): a flow started at least this long ago is
    exported with reason active timeout.  ``max_flows``: above this many
    cached flows the oldest-started leave with reason lack of resources.
    Both 0 means no caching: every sample is exported at once (as OVS).
    ``idle_timeout`` (s, other_config:cache-idle-timeout, 0: off): a
    flow with no sample for this long leaves with reason idle timeout.
    ``tcp_end_of_flow`` (other_config:tcp-end-of-flow): a TCP flow that
    saw FIN or RST leaves with reason end of flow detected, after a
    short linger (flowcache.TCP_END_LINGER).
    """

    active_timeout: int = 0
    max_flows: int = 0
    idle_timeout: int = 0
    tcp_end_of_flow: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.active_timeout or self.max_flows)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What every exporter has: where to send and how often to refresh.

    ``targets``: collector strings as OVSDB holds them ("ip:port",
    "[ipv6]:port", "host:port", port defaulting to 4739), sorted.
    ``template_interval`` / ``stats_interval`` in seconds.
    ``max_message_size`` in bytes (never below 512).
    ``virtual_obs_id``: other_config:virtual_obs_id, or None.
    ``collector_buffer_size``: bytes each TCP/TLS/file target buffers
    while its collector is away (other_config:collector-buffer-size).
    """

    targets: Tuple[str, ...] = ()
    cache: CacheOptions = CacheOptions()
    template_interval: int = DEFAULT_TEMPLATE_INTERVAL
    stats_interval: int = DEFAULT_STATS_INTERVAL
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    enable_tunnel_sampling: bool = True
    virtual_obs_id: Optional[str] = None
    collector_buffer_size: int = DEFAULT_COLLECTOR_BUFFER_SIZE


@dataclasses.dataclass(frozen=True)
class BridgeExporterOptions:
    """Bridge sampling (``Bridge.ipfix``): every packet is sampled with
    probability 1/``sampling``; ``probability`` is OVS's 32-bit value
    UINT32_MAX // sampling, and each sample counts
    UINT32_MAX // probability packets.
    """

    bridge: str
    export: ExportOptions
    sampling: int = DEFAULT_SAMPLING
    obs_domain_id: int = 0
    obs_point_id: int = 0
    enable_input_sampling: bool = True
    enable_output_sampling: bool = True

    @property
    def key(self) -> Tuple:
        return ("bridge", self.bridge)

    @property
    def probability(self) -> int:
        return max(1, UINT32_MAX // max(1, self.sampling))

    @property
    def name(self) -> str:
        return "bridge %s" % self.bridge


@dataclasses.dataclass(frozen=True)
class FlowExporterOptions:
    """Flow sampling (``Flow_Sample_Collector_Set``): samples come from
    the OpenFlow ``sample`` action naming ``collector_set_id``; the
    observation ids and the 16-bit probability travel with each sample.
    """

    bridge: str
    collector_set_id: int
    export: ExportOptions
    local_group_id: Optional[int] = None

    @property
    def key(self) -> Tuple:
        return ("flow", self.bridge, self.collector_set_id)

    @property
    def name(self) -> str:
        return "bridge %s collector set %d" % (
            self.bridge, self.collector_set_id)
