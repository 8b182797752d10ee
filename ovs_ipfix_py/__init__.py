"""ovs-ipfix-py: an IPFIX flow exporter plugin for Open vSwitch.

Module map (each module holds one concept):

- ``options``: exporter options as immutable values (what OVSDB says).
- ``elements``: the IPFIX information element table (schemas/).
- ``packet``: a sampled frame -> its encoded flow key (Ethernet/VLAN/IP/L4).
- ``templates``: the template layouts and their stable ids.
- ``flowcache``: aggregation of samples into flows, and their expiry.
- ``message``: IPFIX messages (header, sets, sequence numbers, MTU bound).
- ``collector``: export targets and their sockets.
- ``exporter``: one exporter = cache + message writer + collectors + stats.
- ``config`` / ``reconcile``: OVSDB rows -> options -> running exporters.
- ``upcall`` / ``channel``: the userspace sample channel and its format.
- ``pcap``: reading pcap/pcapng captures, writing pcap.
- ``ratelimit``: rate-limited logging.
- ``daemon`` / ``replay``: the two programs.
"""

__version__ = "0.1.0"
