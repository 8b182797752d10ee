/*
 * ovs_ipfix_py._fastpath: the hottest loops in C (optional).
 *
 * Each function does exactly what a piece of Python does, faster; the
 * Python is the specification and runs wherever this module is not
 * built (no compiler) or OVS_IPFIX_PY_PURE=1 is set (fastpath.py).
 * tests/test_fastpath.py checks with hypothesis that both give the same
 * results.
 *
 * - decode_hits(): the channel decoder's loop over upcalls whose
 *   metadata it has seen before (upcall._decode's cache-hit branch).
 * - sample_batch(): bridge and flow samples into the flow cache
 *   (Exporter.sample_batch): the key of every frame kind packet.parse
 *   reads (Ethernet, 802.1Q/802.1ad and an inner tag, 802.3 and runt
 *   frames, IPv4 with options and fragments, IPv6 with extension
 *   headers, TCP/UDP/SCTP/ICMP/ICMPv6, cut frames) built in C,
 *   looked up in the cache's index (a FlowIndex or a dict), the flow's
 *   aggregates updated in the cache's typed arrays, the statistics
 *   counted as Exporter.sample_bridge/sample_flow count them.  A new
 *   flow is inserted here when that is all there is to it (a free slot,
 *   no expiry); otherwise it goes to FlowCache._insert, so growth and
 *   max_flows expiry stay in flowcache.py.  The interface and tunnel
 *   parts of the key and the template ids come from Python
 *   (Exporter._c_params), so the key's layout is decided there.  At the
 *   first sample it does not take (values out of range, an object of
 *   another type) it stops and says where: the caller hands that sample
 *   to the general path and calls again, so samples are aggregated in
 *   order.  With the cache's tcp_end_of_flow on, TCP samples carrying
 *   FIN or RST are not taken either: marking a flow's end stays in
 *   flowcache.py alone.
 * - FlowIndex: the flow cache's index as an open-addressing table
 *   (keys inline by slot), replacing its dict where this is built.
 * - parse_key(): the key builder alone, checked against packet.parse.
 * - one_source(): the daemon's dispatch when all upcalls of a datagram
 *   come from one source (the usual case).
 * - pcap_datagram(): ovs-ipfix-replay's loop, classic pcap records to
 *   upcall datagrams as upcall.FrameBatcher builds them.
 * - expired_flows(): FlowCache.flush's ExpiredFlow records.
 * - pack_records(): exporter.pack_records, data records of one template.
 * - group_expired(): exporter.group_expired, expired flows by template.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define UINT32_MAX_ULL 0xFFFFFFFFULL
/* BFD control and echo (RFC 5881, 5883): OVS never samples them. */
#define BFD_PORT 3784
#define BFD_ECHO_PORT 3785
/* FIN | RST (flowcache.TCP_END_FLAGS). */
#define TCP_END_FLAGS 0x05

/* The cache's three arrays (flowcache.FlowCache.times, .counters,
 * .small: typed memoryviews), held as buffers.  They are released around
 * every call back into Python and fetched again after it: _insert may
 * grow the cache, which replaces them. */
struct arrays {
    PyObject *objs[3];
    Py_buffer views[3];
    int held;
};

enum { TIMES, COUNTERS, SMALL };

static void
arrays_release(struct arrays *a)
{
    if (a->held) {
        for (int i = 0; i < 3; i++) {
            PyBuffer_Release(&a->views[i]);
        }
        a->held = 0;
    }
    for (int i = 0; i < 3; i++) {
        Py_CLEAR(a->objs[i]);
    }
}

/* Holds the buffers of a->objs (references owned by *a). */
static int
arrays_hold(struct arrays *a)
{
    static const char formats[3] = {'d', 'Q', 'I'};
    static const Py_ssize_t sizes[3] = {8, 8, 4};

    for (int i = 0; i < 3; i++) {
        Py_buffer *v = &a->views[i];
        if (PyObject_GetBuffer(a->objs[i], v,
                               PyBUF_CONTIG | PyBUF_FORMAT) < 0) {
            while (--i >= 0) {
                PyBuffer_Release(&a->views[i]);
            }
            arrays_release(a);
            return -1;
        }
        if (v->itemsize != sizes[i] || !v->format
            || v->format[0] != formats[i] || v->format[1]) {
            PyBuffer_Release(v);
            while (--i >= 0) {
                PyBuffer_Release(&a->views[i]);
            }
            arrays_release(a);
            PyErr_SetString(PyExc_TypeError,
                            "flow cache arrays must hold 'd', 'Q' (8 "
                            "bytes) and 'I' (4 bytes) items");
            return -1;
        }
    }
    a->held = 1;
    return 0;
}

/* Fetches cache.times, .counters and .small and holds their buffers. */
static int
arrays_acquire(struct arrays *a, PyObject *cache)
{
    static const char *names[3] = {"times", "counters", "small"};

    for (int i = 0; i < 3; i++) {
        a->objs[i] = PyObject_GetAttrString(cache, names[i]);
        if (!a->objs[i]) {
            arrays_release(a);
            return -1;
        }
    }
    return arrays_hold(a);
}

/* Whether slot's items lie inside the held arrays. */
static inline int
slot_in_range(const struct arrays *a, Py_ssize_t slot)
{
    return slot >= 0 && (slot + 1) * 2 <= a->views[TIMES].len / 8
           && (slot + 1) * 4 <= a->views[COUNTERS].len / 8
           && (slot + 1) * 3 <= a->views[SMALL].len / 4;
}

static inline uint64_t
sat_mul(uint64_t a, uint64_t b)
{
    uint64_t r;
    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}

static inline void
sat_add(uint64_t *p, uint64_t v)
{
    uint64_t r;
    *p = __builtin_add_overflow(*p, v, &r) ? UINT64_MAX : r;
}
/* ------------------------------------------------------------ samples */

static inline uint32_t
get_u32(const unsigned char *p)
{
    return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16
           | (uint32_t) p[2] << 8 | p[3];
}

static inline uint16_t
get_u16(const unsigned char *p)
{
    return (uint16_t) (p[0] << 8 | p[1]);
}

static inline unsigned char *
put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char) (v >> 24);
    p[1] = (unsigned char) (v >> 16);
    p[2] = (unsigned char) (v >> 8);
    p[3] = (unsigned char) v;
    return p + 4;
}

/* packet.py's constants (OVS's enum ipfix_sampled_packet_type; the
 * layouts of templates.py). */
enum { K_OTHER, K_IPV4_OK, K_IPV6_OK, K_IPV4_ERR, K_IPV6_ERR };
enum { L2_ETH, L2_VLAN };
enum { L3_NONE, L3_IPV4, L3_IPV6 };
enum { L4_NONE, L4_TCP, L4_UDP, L4_SCTP, L4_ICMP };
#define N_LAYOUTS 60            /* 2 L2 x 3 L3 x 5 L4 x 2 directions */
/* The template table: N_LAYOUTS untunnelled, then N_LAYOUTS tunnelled. */
#define N_TIDS (2 * N_LAYOUTS)

#define ETH_TYPE_IP 0x0800
#define ETH_TYPE_IPV6 0x86DD
#define ETH_TYPE_VLAN 0x8100
#define ETH_TYPE_VLAN_8021AD 0x88A8
#define ETH_TYPE_NONE 0x05FF
#define ETH_TYPE_MIN 0x0600

/* What parse() says besides the key bytes. */
struct parsed {
    int layout;                 /* ((l2 * 3 + l3) * 5 + l4) * 2 + dir */
    int kind;
    int is_ip;
    int eth_header_len;
    int udp_dst_port;           /* -1 unless a UDP header was read */
    uint32_t tcp_flags;
};

/* Bytes of L4 header OVS's flow_extract() needs (packet._L4_HEADER_LEN);
 * 0: no L4 part for this IP protocol in this IP version. */
static inline int
l4_of(int proto, int v6, int *hlen)
{
    switch (proto) {
    case 6: *hlen = 20; return L4_TCP;
    case 17: *hlen = 8; return L4_UDP;
    case 132: *hlen = 12; return L4_SCTP;
    case 1: *hlen = 8; return v6 ? L4_NONE : L4_ICMP;
    case 58: *hlen = 8; return v6 ? L4_ICMP : L4_NONE;
    default: *hlen = 0; return L4_NONE;
    }
}

/* packet._l4: ports or ICMP type and code, read only when the whole L4
 * header lies before end (the end of the IP packet). */
static unsigned char *
put_l4(unsigned char *p, const unsigned char *f, Py_ssize_t off,
       Py_ssize_t end, int proto, int l4, int hlen, int later,
       struct parsed *r)
{
    if (later || end < off + hlen) {
        memset(p, 0, l4 == L4_ICMP ? 2 : 4);
        return p + (l4 == L4_ICMP ? 2 : 4);
    }
    if (l4 == L4_ICMP) {
        memcpy(p, f + off, 2);
        return p + 2;
    }
    memcpy(p, f + off, 4);
    if (proto == 17) {
        r->udp_dst_port = f[off + 2] << 8 | f[off + 3];
    } else if (proto == 6) {
        r->tcp_flags = (uint32_t) (f[off + 12] & 0x0F) << 8 | f[off + 13];
    }
    return p + 4;
}

static inline unsigned char *
put_tos(unsigned char *p, unsigned int tos)
{
    /* ipDiffServCodePoint, ipPrecedence, ipClassOfService
     * (packet.TOS_FIELDS) */
    p[0] = (unsigned char) (tos >> 2);
    p[1] = (unsigned char) (tos >> 5);
    p[2] = (unsigned char) tos;
    return p + 3;
}

/* packet._ipv4: the L3 and L4 parts; returns the L4 layout. */
static unsigned char *
put_ipv4(unsigned char *p, const unsigned char *f, Py_ssize_t ip,
         Py_ssize_t n, struct parsed *r, int *l4out)
{
    if (n >= ip + 20 && f[ip] >> 4 == 4) {
        Py_ssize_t ihl = (f[ip] & 0x0F) * 4;

        if (ihl >= 20 && n >= ip + ihl) {
            int proto = f[ip + 9], hlen, l4;
            int later = (f[ip + 6] & 0x1F) || f[ip + 7];
            /* L4 ends with the IP packet, not with the frame's padding. */
            Py_ssize_t end = ip + (f[ip + 2] << 8 | f[ip + 3]);

            if (end > n) {
                end = n;
            }
            *p++ = 4;
            *p++ = f[ip + 8];
            *p++ = (unsigned char) proto;
            p = put_tos(p, f[ip + 1]);
            memcpy(p, f + ip + 12, 8);
            p += 8;
            l4 = l4_of(proto, 0, &hlen);
            *l4out = l4;
            if (l4 == L4_NONE) {
                r->kind = K_IPV4_ERR;   /* as OVS: no known L4 */
                return p;
            }
            r->kind = K_IPV4_OK;
            return put_l4(p, f, ip + ihl, end, proto, l4, hlen, later, r);
        }
    }
    /* Header unreadable: OVS's flow_extract() leaves every field 0. */
    *p++ = 4;
    memset(p, 0, 5 + 8);
    *l4out = L4_NONE;
    r->kind = K_IPV4_ERR;
    return p + 5 + 8;
}

/* packet._ipv6: the L3 and L4 parts, extension headers walked. */
static unsigned char *
put_ipv6(unsigned char *p, const unsigned char *f, Py_ssize_t ip,
         Py_ssize_t n, struct parsed *r, int *l4out)
{
    uint32_t word;
    int nh, later = 0, ok = 1, hlen, l4;
    Py_ssize_t off, end;

    *l4out = L4_NONE;
    r->kind = K_IPV6_ERR;
    if (n < ip + 40 || f[ip] >> 4 != 6) {
        *p++ = 6;
        memset(p, 0, 5 + 16 + 16 + 4);
        return p + 5 + 16 + 16 + 4;
    }
    word = get_u32(f + ip);
    nh = f[ip + 6];
    off = ip + 40;
    /* Extension headers and L4 end with the payload length. */
    end = off + (f[ip + 4] << 8 | f[ip + 5]);
    if (end > n) {
        end = n;
    }
    /* hop-by-hop, routing, fragment, destination options, AH */
    while (nh == 0 || nh == 43 || nh == 44 || nh == 60 || nh == 51) {
        if (end < off + 8) {
            ok = 0;
            break;
        }
        if (nh == 44) {
            int frag_offset = (f[off + 2] << 8 | f[off + 3]) >> 3;

            nh = f[off];
            off += 8;
            if (frag_offset) {
                later = 1;
                break;
            }
            continue;
        }
        {
            Py_ssize_t length = nh == 51 ? (f[off + 1] + 2) * 4
                                         : (f[off + 1] + 1) * 8;
            nh = f[off];
            off += length;
        }
    }
    *p++ = 6;
    *p++ = f[ip + 7];
    *p++ = (unsigned char) nh;
    p = put_tos(p, (word >> 20) & 0xFF);
    memcpy(p, f + ip + 8, 32);
    p += 32;
    p = put_u32(p, word & 0xFFFFF);
    l4 = ok ? l4_of(nh, 1, &hlen) : L4_NONE;
    *l4out = l4;
    if (l4 == L4_NONE) {
        return p;
    }
    r->kind = K_IPV6_OK;
    return put_l4(p, f, off, end, nh, l4, hlen, later, r);
}

/* Longest interface part (port pair blob) a key may carry. */
#define PORTS_MAX 512
/* Longest tunnel part (interfaces.tunnel_part: 15 bytes and the
 * variable-length tunnelKey). */
#define TUNNEL_MAX 128
/* The rest of the longest key: prefix 11, MACs, type and length 15,
 * VLAN 5, IPv6 42, L4 4. */
#define KEY_MAX (PORTS_MAX + TUNNEL_MAX + 11 + 15 + 5 + 42 + 4)

/* packet.parse with the cache's key prefix in front: writes
 * KEY_PREFIX(domain, template id) + the encoded key into key[] and
 * returns its length.  The template id comes from tids (N_TIDS
 * big-endian u16: by layout, then the same tunnelled), the interface
 * part is iface[0:iface_len] and the tunnel part (after L4; none when
 * tunnel_len is 0) tunnel[0:tunnel_len], both as Python built them.
 * Never fails. */
static Py_ssize_t
build_key(unsigned char *key, const unsigned char *f, Py_ssize_t n,
          uint32_t domain, uint32_t point, int dir,
          const char *ports, Py_ssize_t ports_len,
          const char *tunnel, Py_ssize_t tunnel_len,
          const unsigned char *tids, struct parsed *r)
{
    unsigned char runt[14];
    unsigned char *p = key;
    unsigned int etype, tci = 0;
    Py_ssize_t off = 14;
    int l2 = L2_ETH, l3 = L3_NONE, l4 = L4_NONE, tid_i;

    if (n < 14) {
        /* A runt: the MAC bytes there are, the rest 0, ethernetType
         * "none" (it has no type field). */
        memset(runt, 0, sizeof runt);
        memcpy(runt, f, n < 12 ? n : 12);
        runt[12] = 0x05;
        runt[13] = 0xFF;
        f = runt;
        n = 14;
    }
    etype = get_u16(f + 12);
    if ((etype == ETH_TYPE_VLAN || etype == ETH_TYPE_VLAN_8021AD)
        && n >= 18) {
        tci = get_u16(f + 14);
        l2 = L2_VLAN;
        etype = get_u16(f + 16);
        off = 18;
        if (etype == ETH_TYPE_VLAN && n >= 22) {
            etype = get_u16(f + 20);
            off = 22;
        }
    }
    if (etype < ETH_TYPE_MIN) {
        etype = ETH_TYPE_NONE;
    }
    r->eth_header_len = (int) off;
    r->udp_dst_port = -1;
    r->tcp_flags = 0;
    r->kind = K_OTHER;

    p = put_u32(p, domain);
    p += 2;                         /* template id, once known */
    p = put_u32(p, point);
    *p++ = (unsigned char) dir;
    memcpy(p, f + 6, 6);
    memcpy(p + 6, f, 6);
    p += 12;
    *p++ = (unsigned char) (etype >> 8);
    *p++ = (unsigned char) etype;
    *p++ = (unsigned char) off;
    memcpy(p, ports, ports_len);
    p += ports_len;
    if (l2 == L2_VLAN) {
        unsigned int vid = tci & 0x0FFF;

        /* vlanId, dot1qVlanId, dot1qPriority */
        *p++ = (unsigned char) (vid >> 8);
        *p++ = (unsigned char) vid;
        *p++ = (unsigned char) (vid >> 8);
        *p++ = (unsigned char) vid;
        *p++ = (unsigned char) (tci >> 13);
    }
    if (etype == ETH_TYPE_IP) {
        l3 = L3_IPV4;
        p = put_ipv4(p, f, off, n, r, &l4);
    } else if (etype == ETH_TYPE_IPV6) {
        l3 = L3_IPV6;
        p = put_ipv6(p, f, off, n, r, &l4);
    }
    memcpy(p, tunnel, tunnel_len);
    p += tunnel_len;
    r->is_ip = l3 != L3_NONE;
    tid_i = ((l2 * 3 + l3) * 5 + l4) * 2 + dir
            + (tunnel_len ? N_LAYOUTS : 0);
    r->layout = tid_i;
    key[4] = tids[2 * tid_i];
    key[5] = tids[2 * tid_i + 1];
    return p - key;
}

PyDoc_STRVAR(parse_key_doc,
"parse_key(frame, domain, point, direction, iface, tunnel, tids)\n"
"    -> (key, eth_header_len, is_ip, tcp_flags, kind, udp_dst_port)\n"
"\n"
"The key builder of sample_batch on its own, for the tests: packet.parse\n"
"of frame (bytes) with KEY_PREFIX(domain, template id) in front; iface\n"
"and tunnel are the key's interface and tunnel parts (b\"\": none), tids\n"
"the template ids by layout.");

static PyObject *
parse_key(PyObject *self, PyObject *args)
{
    Py_buffer frame, ports, tunnel, tids;
    unsigned long domain, point;
    int dir;
    unsigned char key[KEY_MAX];
    struct parsed r;
    Py_ssize_t k;
    PyObject *res = NULL;

    (void) self;
    if (!PyArg_ParseTuple(args, "y*kkiy*y*y*:parse_key", &frame, &domain,
                          &point, &dir, &ports, &tunnel, &tids)) {
        return NULL;
    }
    if (ports.len > PORTS_MAX || tunnel.len > TUNNEL_MAX
        || tids.len != 2 * N_TIDS || (dir != 0 && dir != 1)
        || domain > 0xFFFFFFFFUL || point > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "parse_key: bad argument");
    } else {
        k = build_key(key, frame.buf, frame.len, (uint32_t) domain,
                      (uint32_t) point, dir, ports.buf, ports.len,
                      tunnel.buf, tunnel.len, tids.buf, &r);
        res = Py_BuildValue("y#iOIii", (const char *) key, k,
                            r.eth_header_len, r.is_ip ? Py_True : Py_False,
                            (unsigned int) r.tcp_flags, r.kind,
                            r.udp_dst_port);
    }
    PyBuffer_Release(&frame);
    PyBuffer_Release(&ports);
    PyBuffer_Release(&tunnel);
    PyBuffer_Release(&tids);
    return res;
}

/* ------------------------------------------------------------ the index */

/* FlowIndex: flowcache.FlowCache's index (encoded key -> slot) as an
 * open-addressing table, used instead of a dict where this module is
 * built.  A bucket holds 32 bits of the key's hash and its slot + 1 (0:
 * empty), 8 bytes; the keys themselves (bytes objects, shared with the
 * cache's order) are held by slot.  Against a dict it saves the
 * per-flow slot int (32 bytes), the dict's entry (24 bytes) and most of
 * its index, and a lookup touches one bucket line, the slot's key
 * pointer and the key instead of the dict's index, entry, key and int.
 * Linear probing, at most 5/8 full, deletion by backward shift (no
 * tombstones).  As a mapping it behaves as the dict it replaces for
 * FlowCache's use: keys are bytes, slots distinct ints in 0..2^32-2. */

typedef struct {
    PyObject_HEAD
    uint64_t *buckets;
    size_t mask;                /* buckets - 1 (a power of 2), or 0 */
    Py_ssize_t used;
    PyObject **keys;            /* by slot: owned bytes or NULL */
    Py_ssize_t keys_cap;
} FlowIndex;

static PyTypeObject FlowIndex_Type;

static inline PyObject *
new_ref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}

#define FI_MIN_BUCKETS 64

/* The table and the key pointers live in anonymous memory mappings, as
 * the cache's arrays do: pages are resident once used, and an outgrown
 * table goes back to the system at once (a heap block that size would
 * stay in the process after free()). */
static void *
fi_map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        PyErr_NoMemory();
        return NULL;
    }
    return p;
}

static void
fi_unmap(void *p, size_t bytes)
{
    if (p) {
        munmap(p, bytes);
    }
}
#define FI_SLOT_MAX 0xFFFFFFFEULL

static inline uint32_t
fi_hash32(Py_hash_t h)
{
    uint64_t x = (uint64_t) h;

    return (uint32_t) (x ^ (x >> 32));
}

/* A key's home bucket comes from the 32 hash bits its bucket keeps, so
 * that growing the table and shifting entries back after a removal
 * never read a key (at 1M flows each read would be a cache miss). */
static inline size_t
fi_home32(const FlowIndex *fi, uint32_t h32)
{
    return (size_t) h32 & fi->mask;
}

static inline size_t
fi_home(const FlowIndex *fi, Py_hash_t h)
{
    return fi_home32(fi, fi_hash32(h));
}

static inline int
fi_key_eq(PyObject *a, PyObject *b)
{
    return a == b || (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b)
                      && !memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b),
                                 PyBytes_GET_SIZE(a)));
}

/* The bucket holding key (hash h), or -1. */
static inline Py_ssize_t
fi_find(const FlowIndex *fi, PyObject *key, Py_hash_t h)
{
    size_t i;
    uint32_t h32 = fi_hash32(h);

    if (!fi->mask) {
        return -1;
    }
    i = fi_home(fi, h);
    for (;;) {
        uint64_t b = fi->buckets[i];

        if (!b) {
            return -1;
        }
        if ((uint32_t) (b >> 32) == h32) {
            PyObject *k = fi->keys[(b & 0xFFFFFFFFu) - 1];

            if (fi_key_eq(k, key)) {
                return (Py_ssize_t) i;
            }
        }
        i = (i + 1) & fi->mask;
    }
}

static inline Py_ssize_t
fi_slot_of(const FlowIndex *fi, Py_ssize_t bucket)
{
    return (Py_ssize_t) (fi->buckets[bucket] & 0xFFFFFFFFu) - 1;
}

static int
fi_resize(FlowIndex *fi, size_t n)
{
    uint64_t *old = fi->buckets, *nb;
    size_t old_n = fi->mask ? fi->mask + 1 : 0;

    nb = fi_map(n * sizeof *nb);        /* zero-filled */
    if (!nb) {
        return -1;
    }
    fi->buckets = nb;
    fi->mask = n - 1;
    for (size_t j = 0; j < old_n; j++) {
        uint64_t b = old[j];
        size_t i;

        if (!b) {
            continue;
        }
        i = fi_home32(fi, (uint32_t) (b >> 32));
        while (nb[i]) {
            i = (i + 1) & fi->mask;
        }
        nb[i] = b;
    }
    fi_unmap(old, old_n * sizeof *old);
    return 0;
}

static int
fi_keys_reserve(FlowIndex *fi, Py_ssize_t slot)
{
    Py_ssize_t cap = fi->keys_cap;
    PyObject **nk;

    if (slot < cap) {
        return 0;
    }
    while (cap <= slot) {
        cap = cap ? cap * 2 : 1024;
    }
    nk = fi_map(cap * sizeof *nk);      /* zero-filled: all NULL */
    if (!nk) {
        return -1;
    }
    if (fi->keys_cap) {
        memcpy(nk, fi->keys, fi->keys_cap * sizeof *nk);
    }
    fi_unmap(fi->keys, fi->keys_cap * sizeof *nk);
    fi->keys = nk;
    fi->keys_cap = cap;
    return 0;
}

/* index[key] = slot for a key not in the index (hash h). */
static int
fi_insert(FlowIndex *fi, PyObject *key, Py_hash_t h, Py_ssize_t slot)
{
    size_t i;

    if (slot < 0 || (unsigned long long) slot > FI_SLOT_MAX) {
        PyErr_SetString(PyExc_ValueError, "FlowIndex slot out of range");
        return -1;
    }
    if (fi_keys_reserve(fi, slot) < 0) {
        return -1;
    }
    if (fi->keys[slot]) {
        PyErr_SetString(PyExc_ValueError,
                        "FlowIndex: slot already holds another key");
        return -1;
    }
    if (!fi->mask || (size_t) (fi->used + 1) * 8 > (fi->mask + 1) * 5) {
        size_t n = fi->mask ? (fi->mask + 1) * 2 : FI_MIN_BUCKETS;

        if (fi_resize(fi, n) < 0) {
            return -1;
        }
    }
    i = fi_home(fi, h);
    while (fi->buckets[i]) {
        i = (i + 1) & fi->mask;
    }
    fi->buckets[i] = (uint64_t) fi_hash32(h) << 32 | (uint64_t) (slot + 1);
    Py_INCREF(key);
    fi->keys[slot] = key;
    fi->used++;
    return 0;
}

/* Removes the entry in bucket i (backward-shift deletion). */
static void
fi_remove_bucket(FlowIndex *fi, size_t i)
{
    Py_ssize_t slot = fi_slot_of(fi, (Py_ssize_t) i);
    PyObject *k = fi->keys[slot];
    size_t j = i;

    fi->keys[slot] = NULL;
    fi->used--;
    for (;;) {
        uint64_t b;
        size_t home;

        j = (j + 1) & fi->mask;
        b = fi->buckets[j];
        if (!b) {
            break;
        }
        home = fi_home32(fi, (uint32_t) (b >> 32));
        /* Move b back to i unless its home lies cyclically in (i, j]. */
        if ((j > i && (home <= i || home > j))
            || (j < i && (home <= i && home > j))) {
            fi->buckets[i] = b;
            i = j;
        }
    }
    fi->buckets[i] = 0;
    Py_DECREF(k);
}

static int
fi_check_key(PyObject *key, Py_hash_t *h)
{
    if (!PyBytes_CheckExact(key)) {
        PyErr_SetString(PyExc_TypeError, "FlowIndex keys are bytes (not a subclass)");
        return -1;
    }
    *h = PyObject_Hash(key);
    return *h == -1 ? -1 : 0;
}

static PyObject *
FlowIndex_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    FlowIndex *fi;

    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "FlowIndex() takes no arguments");
        return NULL;
    }
    fi = (FlowIndex *) type->tp_alloc(type, 0);
    return (PyObject *) fi;
}

static void
fi_clear_all(FlowIndex *fi)
{
    for (Py_ssize_t s = 0; s < fi->keys_cap; s++) {
        Py_CLEAR(fi->keys[s]);
    }
    fi_unmap(fi->keys, fi->keys_cap * sizeof *fi->keys);
    fi_unmap(fi->buckets, fi->mask ? (fi->mask + 1) * sizeof *fi->buckets
                                   : 0);
    fi->keys = NULL;
    fi->buckets = NULL;
    fi->keys_cap = 0;
    fi->mask = 0;
    fi->used = 0;
}

static void
FlowIndex_dealloc(FlowIndex *fi)
{
    fi_clear_all(fi);
    Py_TYPE(fi)->tp_free((PyObject *) fi);
}

static Py_ssize_t
FlowIndex_len(FlowIndex *fi)
{
    return fi->used;
}

static PyObject *
FlowIndex_getitem(FlowIndex *fi, PyObject *key)
{
    Py_hash_t h;
    Py_ssize_t b;

    if (!PyBytes_CheckExact(key)) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    h = PyObject_Hash(key);
    if (h == -1) {
        return NULL;
    }
    b = fi_find(fi, key, h);
    if (b < 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromSsize_t(fi_slot_of(fi, b));
}

static int
FlowIndex_setitem(FlowIndex *fi, PyObject *key, PyObject *value)
{
    Py_hash_t h;
    Py_ssize_t b, slot;

    if (fi_check_key(key, &h) < 0) {
        if (!value && PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetObject(PyExc_KeyError, key);
        }
        return -1;
    }
    b = fi_find(fi, key, h);
    if (!value) {
        if (b < 0) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        fi_remove_bucket(fi, (size_t) b);
        return 0;
    }
    slot = PyLong_AsSsize_t(value);
    if (slot == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (b >= 0) {
        /* A new slot for a key already there. */
        Py_ssize_t old = fi_slot_of(fi, b);
        PyObject *k;

        if (old == slot) {
            return 0;
        }
        if (slot < 0 || (unsigned long long) slot > FI_SLOT_MAX
            || fi_keys_reserve(fi, slot) < 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError,
                                "FlowIndex slot out of range");
            }
            return -1;
        }
        if (fi->keys[slot]) {
            PyErr_SetString(PyExc_ValueError,
                            "FlowIndex: slot already holds another key");
            return -1;
        }
        k = fi->keys[old];
        fi->keys[old] = NULL;
        fi->keys[slot] = k;
        fi->buckets[b] = (fi->buckets[b] & ~(uint64_t) 0xFFFFFFFFu)
                         | (uint64_t) (slot + 1);
        return 0;
    }
    return fi_insert(fi, key, h, slot);
}

static int
FlowIndex_contains(FlowIndex *fi, PyObject *key)
{
    Py_hash_t h;

    if (!PyBytes_CheckExact(key)) {
        return 0;
    }
    h = PyObject_Hash(key);
    if (h == -1) {
        return -1;
    }
    return fi_find(fi, key, h) >= 0;
}

static PyObject *
FlowIndex_get(FlowIndex *fi, PyObject *const *args, Py_ssize_t nargs)
{
    Py_hash_t h;
    Py_ssize_t b;
    PyObject *dflt = nargs > 1 ? args[1] : Py_None;

    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key[, default])");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) {
        return new_ref(dflt);
    }
    h = PyObject_Hash(args[0]);
    if (h == -1) {
        return NULL;
    }
    b = fi_find(fi, args[0], h);
    if (b < 0) {
        return new_ref(dflt);
    }
    return PyLong_FromSsize_t(fi_slot_of(fi, b));
}

static PyObject *
FlowIndex_pop(FlowIndex *fi, PyObject *const *args, Py_ssize_t nargs)
{
    Py_hash_t h;
    Py_ssize_t b, slot;

    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    b = -1;
    if (PyBytes_CheckExact(args[0])) {
        h = PyObject_Hash(args[0]);
        if (h == -1) {
            return NULL;
        }
        b = fi_find(fi, args[0], h);
    }
    if (b < 0) {
        if (nargs > 1) {
            return new_ref(args[1]);
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    slot = fi_slot_of(fi, b);
    fi_remove_bucket(fi, (size_t) b);
    return PyLong_FromSsize_t(slot);
}

static PyObject *
FlowIndex_clear(FlowIndex *fi, PyObject *unused)
{
    (void) unused;
    fi_clear_all(fi);
    Py_RETURN_NONE;
}

/* keys(), values() or items() as a list, in slot order. */
static PyObject *
fi_list(FlowIndex *fi, int what)
{
    PyObject *out = PyList_New(fi->used);
    Py_ssize_t n = 0;

    if (!out) {
        return NULL;
    }
    for (Py_ssize_t s = 0; s < fi->keys_cap && n < fi->used; s++) {
        PyObject *k = fi->keys[s], *v;

        if (!k) {
            continue;
        }
        if (what == 0) {
            v = new_ref(k);
        } else if (what == 1) {
            v = PyLong_FromSsize_t(s);
        } else {
            v = Py_BuildValue("On", k, s);
        }
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, v);
    }
    return out;
}

static PyObject *
FlowIndex_keys(FlowIndex *fi, PyObject *unused)
{
    (void) unused;
    return fi_list(fi, 0);
}

static PyObject *
FlowIndex_values(FlowIndex *fi, PyObject *unused)
{
    (void) unused;
    return fi_list(fi, 1);
}

static PyObject *
FlowIndex_items(FlowIndex *fi, PyObject *unused)
{
    (void) unused;
    return fi_list(fi, 2);
}

static PyObject *
FlowIndex_iter(FlowIndex *fi)
{
    PyObject *keys = fi_list(fi, 0), *it;

    if (!keys) {
        return NULL;
    }
    it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *
FlowIndex_sizeof(FlowIndex *fi, PyObject *unused)
{
    (void) unused;
    return PyLong_FromSize_t(sizeof *fi
                             + (fi->mask ? (fi->mask + 1) * 8 : 0)
                             + fi->keys_cap * sizeof(PyObject *));
}

static PyMappingMethods FlowIndex_as_mapping = {
    (lenfunc) FlowIndex_len,
    (binaryfunc) FlowIndex_getitem,
    (objobjargproc) FlowIndex_setitem,
};

static PySequenceMethods FlowIndex_as_sequence = {
    .sq_contains = (objobjproc) FlowIndex_contains,
};

static PyMethodDef FlowIndex_methods[] = {
    {"get", (PyCFunction) (void (*)(void)) FlowIndex_get, METH_FASTCALL,
     "get(key[, default]): the key's slot, or default"},
    {"pop", (PyCFunction) (void (*)(void)) FlowIndex_pop, METH_FASTCALL,
     "pop(key[, default]): remove the key, return its slot"},
    {"clear", (PyCFunction) FlowIndex_clear, METH_NOARGS,
     "remove every key"},
    {"keys", (PyCFunction) FlowIndex_keys, METH_NOARGS,
     "the keys, a list in slot order"},
    {"values", (PyCFunction) FlowIndex_values, METH_NOARGS,
     "the slots, a list in order"},
    {"items", (PyCFunction) FlowIndex_items, METH_NOARGS,
     "(key, slot) pairs, a list in slot order"},
    {"__sizeof__", (PyCFunction) FlowIndex_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FlowIndex_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ovs_ipfix_py._fastpath.FlowIndex",
    .tp_basicsize = sizeof(FlowIndex),
    .tp_dealloc = (destructor) FlowIndex_dealloc,
    .tp_as_sequence = &FlowIndex_as_sequence,
    .tp_as_mapping = &FlowIndex_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FlowIndex(): flowcache.FlowCache's index (encoded key -> "
              "slot) as an open-addressing table; a mapping with the "
              "dict methods FlowCache uses.",
    .tp_iter = (getiterfunc) FlowIndex_iter,
    .tp_methods = FlowIndex_methods,
    .tp_new = FlowIndex_new,
};

/* One sample of a batch, checked and keyed, not yet looked up. */
struct taken {
    int action;                     /* TAKE_* */
    PyObject *key;                  /* owned (TAKE_CACHE only) */
    Py_hash_t hash;                 /* the key's, for a FlowIndex */
    Py_ssize_t slot;
    uint64_t count;
    uint64_t frame_len;
    uint64_t ip_len;
    uint32_t tcp_flags;
    int kind;
};

enum {
    TAKE_CACHE,                     /* aggregate into the cache */
    TAKE_DROPPED,                   /* direction not sampled: counted */
    TAKE_SKIP,                      /* BFD: not even counted */
};

/* The exporter's parameters (Exporter._c_params), and what the loop
 * carries from one sample to the next. */
struct batch_state {
    PyObject *bridge_cls, *flow_cls;
    int is_bridge, enable_in, enable_out;
    unsigned long long default_count;
    uint32_t domain, point;
    PyObject *iface_for, *tunnel_for;
    const unsigned char *tids;
    int tcp_end;                    /* cache.tcp_end_of_flow */
    /* Last probabilities seen (by identity: the batch keeps the objects
     * alive) and their packet counts, bridge and flow. */
    PyObject *last_bp, *last_fp;
    unsigned long long bcount, fcount;
    /* Interface part of the key, for the last port pair seen, per
     * sample kind (0 bridge, 1 flow). */
    PyObject *last_in[2], *last_out[2];
    int last_dir[2];
    PyObject *iface[2];             /* owned: bytes */
    /* Tunnel part, for the last (tunnel, ports) seen, per kind. */
    PyObject *last_tun[2], *last_tin[2], *last_tout[2];
    PyObject *tunnel[2];            /* owned: bytes */
};

static void
batch_state_clear(struct batch_state *st)
{
    for (int i = 0; i < 2; i++) {
        Py_CLEAR(st->iface[i]);
        Py_CLEAR(st->tunnel[i]);
        st->last_in[i] = st->last_out[i] = NULL;
        st->last_tun[i] = st->last_tin[i] = st->last_tout[i] = NULL;
    }
}

/* The key's interface part for (in, out, dir): iface_for's bytes
 * (Exporter._iface_part), called only when the port pair changes.
 * NULL (no exception): the sample goes to the general path, which
 * raises what iface_for raises. */
static PyObject *
iface_part(struct batch_state *st, int which, PyObject *in_o,
           PyObject *out_o, int dir)
{
    PyObject *b, *d;

    if (st->iface[which] && in_o == st->last_in[which]
        && out_o == st->last_out[which] && dir == st->last_dir[which]) {
        return st->iface[which];
    }
    d = PyLong_FromLong(dir);
    if (!d) {
        PyErr_Clear();
        return NULL;
    }
    b = PyObject_CallFunctionObjArgs(st->iface_for, in_o, out_o, d, NULL);
    Py_DECREF(d);
    if (!b || !PyBytes_Check(b) || PyBytes_GET_SIZE(b) > PORTS_MAX) {
        PyErr_Clear();
        Py_XDECREF(b);
        return NULL;
    }
    Py_XSETREF(st->iface[which], b);
    st->last_in[which] = in_o;
    st->last_out[which] = out_o;
    st->last_dir[which] = dir;
    return b;
}

/* The key's tunnel part for a sample's tunnel metadata: tunnel_for's
 * bytes (Exporter._tunnel_part; b"" when the sample is keyed without
 * it), called only when the tunnel or the ports change.  NULL (no
 * exception): the general path takes the sample. */
static PyObject *
tunnel_part(struct batch_state *st, int which, PyObject *in_o,
            PyObject *out_o, PyObject *tun_o)
{
    PyObject *b;

    if (st->tunnel[which] && tun_o == st->last_tun[which]
        && in_o == st->last_tin[which] && out_o == st->last_tout[which]) {
        return st->tunnel[which];
    }
    b = PyObject_CallFunctionObjArgs(st->tunnel_for, in_o, out_o, tun_o,
                                     NULL);
    if (!b || !PyBytes_Check(b) || PyBytes_GET_SIZE(b) > TUNNEL_MAX) {
        PyErr_Clear();
        Py_XDECREF(b);
        return NULL;
    }
    Py_XSETREF(st->tunnel[which], b);
    st->last_tun[which] = tun_o;
    st->last_tin[which] = in_o;
    st->last_tout[which] = out_o;
    return b;
}

/* An int in 0..2^32-1, else -1. */
static long long
as_u32(PyObject *o)
{
    unsigned long v;

    if (!PyLong_Check(o)) {
        return -1;
    }
    v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long) -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return v > 0xFFFFFFFFUL ? -1 : (long long) v;
}

/* Checks sample s, decides what becomes of it and builds its key into
 * *t.  Returns 1 when taken, 0 when the general path must take it (the
 * caller stops there), -1 on error (exception set). */
static int
take_sample(struct batch_state *st, PyObject *s, struct taken *t)
{
    PyObject *in_o, *out_o, *p_o, *f_o, *len_o, *tun_o, *ports;
    PyObject *tunnel = NULL;
    const unsigned char *f;
    unsigned long long orig_len, frame_len, count;
    unsigned char key[KEY_MAX];
    uint32_t domain, point;
    struct parsed r;
    Py_ssize_t flen, k;
    int dir, is_flow;

    if (Py_TYPE(s) == (PyTypeObject *) st->bridge_cls && st->is_bridge
        && PyTuple_GET_SIZE(s) >= 7) {
        is_flow = 0;
        in_o = PyTuple_GET_ITEM(s, 1);
        out_o = PyTuple_GET_ITEM(s, 2);
        p_o = PyTuple_GET_ITEM(s, 3);
        f_o = PyTuple_GET_ITEM(s, 4);
        len_o = PyTuple_GET_ITEM(s, 5);
        tun_o = PyTuple_GET_ITEM(s, 6);
    } else if (Py_TYPE(s) == (PyTypeObject *) st->flow_cls
               && PyTuple_GET_SIZE(s) >= 11) {
        is_flow = 1;
        p_o = PyTuple_GET_ITEM(s, 4);
        in_o = PyTuple_GET_ITEM(s, 6);
        out_o = PyTuple_GET_ITEM(s, 7);
        f_o = PyTuple_GET_ITEM(s, 8);
        len_o = PyTuple_GET_ITEM(s, 9);
        tun_o = PyTuple_GET_ITEM(s, 10);
    } else {
        return 0;
    }
    if (!PyBytes_Check(f_o) || !PyLong_Check(len_o)) {
        return 0;
    }
    t->key = NULL;

    if (!is_flow) {
        /* Exporter.sample_bridge */
        if (out_o == Py_None) {
            if (!st->enable_in) {
                t->action = TAKE_DROPPED;
                return 1;
            }
            dir = 0;
        } else {
            if (!st->enable_out) {
                t->action = TAKE_DROPPED;
                return 1;
            }
            dir = 1;
        }
        if (p_o != st->last_bp) {
            unsigned long long p;

            if (!PyLong_Check(p_o)) {
                return 0;
            }
            p = PyLong_AsUnsignedLongLong(p_o);
            if (p == (unsigned long long) -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;   /* negative or huge: the general path says */
            }
            st->bcount = p ? UINT32_MAX_ULL / p : st->default_count;
            st->last_bp = p_o;
        }
        count = st->bcount;
        domain = st->domain;
        point = st->point;
    } else {
        /* Exporter.sample_flow */
        PyObject *d_o = PyTuple_GET_ITEM(s, 5);
        long long dom;
        long d;

        if (p_o != st->last_fp) {
            long long p;

            if (!PyLong_Check(p_o)) {
                return 0;
            }
            p = PyLong_AsLongLong(p_o);
            if (p <= 0) {
                PyErr_Clear();
                return 0;   /* dropped with a warning there */
            }
            st->fcount = 0xFFFFULL / (unsigned long long) p;
            st->last_fp = p_o;
        }
        count = st->fcount;
        if (!PyLong_Check(d_o)) {
            return 0;
        }
        d = PyLong_AsLong(d_o);
        if (d == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        dir = d == 1 ? 0 : d == 2 ? 1 : out_o == Py_None ? 0 : 1;
        dom = as_u32(PyTuple_GET_ITEM(s, 2));
        if (dom < 0 || !PyLong_Check(PyTuple_GET_ITEM(s, 3))) {
            return 0;
        }
        domain = (uint32_t) dom;
        /* obs_point_id & 0xFFFFFFFF, as packet.parse */
        point = (uint32_t) PyLong_AsUnsignedLongMask(PyTuple_GET_ITEM(s, 3));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    ports = iface_part(st, is_flow, in_o, out_o, dir);
    if (!ports) {
        return 0;
    }
    if (tun_o != Py_None) {
        tunnel = tunnel_part(st, is_flow, in_o, out_o, tun_o);
        if (!tunnel) {
            return 0;
        }
    }
    orig_len = PyLong_AsUnsignedLongLong(len_o);
    if (orig_len == (unsigned long long) -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    f = (const unsigned char *) PyBytes_AS_STRING(f_o);
    flen = PyBytes_GET_SIZE(f_o);
    frame_len = orig_len > (unsigned long long) flen
                ? orig_len : (unsigned long long) flen;
    if (frame_len > UINT32_MAX_ULL) {
        return 0;           /* cannot be stored; the general path says */
    }
    k = build_key(key, f, flen, domain, point, dir,
                  PyBytes_AS_STRING(ports), PyBytes_GET_SIZE(ports),
                  tunnel ? PyBytes_AS_STRING(tunnel) : "",
                  tunnel ? PyBytes_GET_SIZE(tunnel) : 0, st->tids, &r);
    if (!is_flow && (r.udp_dst_port == BFD_PORT
                     || r.udp_dst_port == BFD_ECHO_PORT)) {
        t->action = TAKE_SKIP;      /* OVS never samples BFD */
        return 1;
    }
    t->key = PyBytes_FromStringAndSize((const char *) key, k);
    if (!t->key) {
        return -1;
    }
    t->action = TAKE_CACHE;
    t->count = count;
    t->frame_len = frame_len;
    t->ip_len = r.is_ip ? frame_len - (uint64_t) r.eth_header_len : 0;
    t->tcp_flags = r.tcp_flags;
    t->kind = r.kind;
    if (st->tcp_end && (t->tcp_flags & TCP_END_FLAGS)) {
        Py_CLEAR(t->key);
        return 0;           /* FlowCache.add_many marks its end */
    }
    return 1;
}

static void
apply_update(const struct arrays *a, const struct taken *t, double now)
{
    double *times = (double *) a->views[TIMES].buf + t->slot * 2;
    uint64_t *c = (uint64_t *) a->views[COUNTERS].buf + t->slot * 4;
    uint32_t *m = (uint32_t *) a->views[SMALL].buf + t->slot * 3;
    uint64_t octets;

    times[1] = now;
    /* Each counter saturates at 2^64-1 on its own. */
    sat_add(&c[0], t->count);
    sat_add(&c[1], sat_mul(t->count, t->frame_len));
    octets = sat_mul(t->count, t->ip_len);
    sat_add(&c[2], octets);
    sat_add(&c[3], sat_mul(octets, t->ip_len));
    if (t->ip_len < m[0]) {
        m[0] = (uint32_t) t->ip_len;
    } else if (t->ip_len > m[1]) {
        m[1] = (uint32_t) t->ip_len;
    }
    m[2] |= t->tcp_flags;
}

/* A new flow, inserted here as flowcache.FlowCache._insert does when
 * nothing else has to happen: a free slot (the free list's last, else
 * the next unused one) within the arrays, room under max_flows (no
 * expiry), and with an idle timeout, a first idle deadline in the
 * wheel's tail bucket (cache._idle_tail, number _idle_tail_b).
 * Anything else goes to _insert itself.  The cache's fields are read
 * on the first new flow of a call and again after each call to
 * _insert. */
struct inserter {
    int loaded;
    PyObject *free;                 /* owned: cache._free (a list) */
    PyObject *order_append;         /* owned: cache.order.append */
    PyObject *order_pop;            /* owned: cache.order.pop */
    PyObject *idle_tail;            /* owned: a list, or NULL */
    Py_ssize_t next_slot, capacity, max_flows, idle_timeout;
    double idle_step, idle_tail_b;
};

static void
inserter_clear(struct inserter *ins)
{
    Py_CLEAR(ins->free);
    Py_CLEAR(ins->order_append);
    Py_CLEAR(ins->order_pop);
    Py_CLEAR(ins->idle_tail);
    ins->loaded = 0;
}

static Py_ssize_t
attr_ssize(PyObject *o, const char *name)
{
    PyObject *v = PyObject_GetAttrString(o, name);
    Py_ssize_t n;

    if (!v) {
        return -1;
    }
    n = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (n == -1 && PyErr_Occurred()
        && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        n = PY_SSIZE_T_MAX;         /* a max_flows beyond any cache */
    }
    return n;
}

static int
inserter_load(struct inserter *ins, PyObject *cache)
{
    PyObject *order;

    inserter_clear(ins);
    ins->free = PyObject_GetAttrString(cache, "_free");
    order = PyObject_GetAttrString(cache, "order");
    if (!ins->free || !order) {
        Py_XDECREF(order);
        inserter_clear(ins);
        return -1;
    }
    ins->order_append = PyObject_GetAttrString(order, "append");
    ins->order_pop = PyObject_GetAttrString(order, "pop");
    Py_DECREF(order);
    ins->next_slot = attr_ssize(cache, "_next_slot");
    ins->capacity = attr_ssize(cache, "_capacity");
    ins->max_flows = attr_ssize(cache, "max_flows");
    ins->idle_timeout = attr_ssize(cache, "idle_timeout");
    if (!ins->order_append || !ins->order_pop || PyErr_Occurred()) {
        inserter_clear(ins);
        return -1;
    }
    if (ins->idle_timeout) {
        PyObject *tail = PyObject_GetAttrString(cache, "_idle_tail");
        PyObject *tail_b = tail ? PyObject_GetAttrString(cache,
                                                         "_idle_tail_b")
                                : NULL;
        PyObject *step = tail_b ? PyObject_GetAttrString(cache, "idle_step")
                                : NULL;

        if (!step) {
            Py_XDECREF(tail);
            Py_XDECREF(tail_b);
            inserter_clear(ins);
            return -1;
        }
        ins->idle_step = PyFloat_AsDouble(step);
        Py_DECREF(step);
        if (PyList_Check(tail) && PyLong_Check(tail_b)) {
            ins->idle_tail_b = PyLong_AsDouble(tail_b);
            ins->idle_tail = tail;      /* the reference moves */
        } else {
            Py_DECREF(tail);            /* no tail: _insert makes one */
        }
        Py_DECREF(tail_b);
        if (PyErr_Occurred()) {
            inserter_clear(ins);
            return -1;
        }
    }
    if (!PyList_Check(ins->free)) {
        inserter_clear(ins);
        PyErr_SetString(PyExc_TypeError, "cache._free must be a list");
        return -1;
    }
    ins->loaded = 1;
    return 0;
}

/* Undo a half-done insert_new after an error (the exception is kept):
 * the key leaves the order (appended last), with ``in_tail`` the idle
 * wheel's tail bucket (appended last), with ``in_index`` the index (the
 * FlowIndex ``fi`` when the cache has one, else the dict).  A
 * failing allocation half-way leaves the cache as it was. */
static void
insert_undo(struct inserter *ins, PyObject *index, FlowIndex *fi,
            const struct taken *t, int in_tail, int in_index)
{
    PyObject *type, *value, *tb, *r;

    PyErr_Fetch(&type, &value, &tb);
    if (in_index) {
        if (fi) {
            Py_ssize_t b = fi_find(fi, t->key, t->hash);

            if (b >= 0) {
                fi_remove_bucket(fi, (size_t) b);
            }
        } else if (PyDict_DelItem(index, t->key) < 0) {
            PyErr_Clear();
        }
    }
    if (in_tail) {
        Py_ssize_t n = PyList_GET_SIZE(ins->idle_tail);

        if (PyList_SetSlice(ins->idle_tail, n - 1, n, NULL) < 0) {
            PyErr_Clear();
        }
    }
    r = PyObject_CallNoArgs(ins->order_pop);
    if (!r) {
        PyErr_Clear();
    }
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
}

/* 1: inserted; 0: not the simple case (call _insert); -1: error, the
 * cache unchanged.  The steps that can fail come first (order, idle
 * tail, index, then the slot's bookkeeping), each undone if a later one
 * fails, as FlowCache._insert does. */
static int
insert_new(struct inserter *ins, PyObject *cache, PyObject *index,
           const struct arrays *a, const struct taken *t, double now)
{
    Py_ssize_t nfree, slot;
    PyObject *slot_o, *r;
    FlowIndex *fi;
    int from_free, in_tail;

    if (!ins->loaded && inserter_load(ins, cache) < 0) {
        return -1;
    }
    fi = Py_TYPE(index) == &FlowIndex_Type ? (FlowIndex *) index : NULL;
    if ((fi ? fi->used : PyDict_GET_SIZE(index)) + 1 > ins->max_flows) {
        return 0;                   /* _insert expires */
    }
    if (ins->idle_timeout
        && (!ins->idle_tail
            || ceil((now + (double) ins->idle_timeout) / ins->idle_step)
               != ins->idle_tail_b)) {
        return 0;                   /* _insert starts a bucket */
    }
    nfree = PyList_GET_SIZE(ins->free);
    from_free = nfree > 0;
    if (from_free) {
        slot_o = PyList_GET_ITEM(ins->free, nfree - 1);
        Py_INCREF(slot_o);
        slot = PyLong_AsSsize_t(slot_o);
    } else {
        if (ins->next_slot >= ins->capacity) {
            return 0;               /* _insert grows the arrays */
        }
        slot = ins->next_slot;
        slot_o = PyLong_FromSsize_t(slot);
        if (!slot_o) {
            return -1;
        }
    }
    if (!slot_in_range(a, slot)) {
        Py_DECREF(slot_o);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_IndexError, "cache slot out of range");
        }
        return -1;
    }
    r = PyObject_CallOneArg(ins->order_append, t->key);
    if (!r) {
        Py_DECREF(slot_o);
        return -1;
    }
    Py_DECREF(r);
    in_tail = ins->idle_timeout != 0;
    if (in_tail && PyList_Append(ins->idle_tail, t->key) < 0) {
        Py_DECREF(slot_o);
        insert_undo(ins, index, fi, t, 0, 0);
        return -1;
    }
    if (fi ? fi_insert(fi, t->key, t->hash, slot) < 0
           : PyDict_SetItem(index, t->key, slot_o) < 0) {
        Py_DECREF(slot_o);
        insert_undo(ins, index, fi, t, in_tail, 0);
        return -1;
    }
    Py_DECREF(slot_o);
    if (from_free) {
        if (PyList_SetSlice(ins->free, nfree - 1, nfree, NULL) < 0) {
            insert_undo(ins, index, fi, t, in_tail, 1);
            return -1;
        }
    } else {
        PyObject *next = PyLong_FromSsize_t(slot + 1);
        int e = next ? PyObject_SetAttrString(cache, "_next_slot", next)
                     : -1;

        Py_XDECREF(next);
        if (e < 0) {
            insert_undo(ins, index, fi, t, in_tail, 1);
            return -1;
        }
        ins->next_slot = slot + 1;
    }
    {
        double *times = (double *) a->views[TIMES].buf + slot * 2;
        uint64_t *c = (uint64_t *) a->views[COUNTERS].buf + slot * 4;
        uint32_t *m = (uint32_t *) a->views[SMALL].buf + slot * 3;
        uint64_t octets = sat_mul(t->count, t->ip_len);

        times[0] = times[1] = now;
        c[0] = t->count;
        c[1] = sat_mul(t->count, t->frame_len);
        c[2] = octets;
        c[3] = sat_mul(octets, t->ip_len);
        m[0] = m[1] = (uint32_t) t->ip_len;
        m[2] = t->tcp_flags;
    }
    return 1;
}

/* What a call adds to the exporter's statistics (ExporterStats). */
enum { S_PKTS, S_IPV4_OK, S_IPV6_OK, S_IPV4_ERRS, S_IPV6_ERRS, S_ERRS,
       S_FLOWS, S_DROPPED, S_COUNT };
static const char *const stat_names[S_COUNT] = {
    "pkts", "ipv4_ok", "ipv6_ok", "ipv4_errs", "ipv6_errs", "errs",
    "flows", "dropped_disabled",
};

static void
count_sample(Py_ssize_t *stats, const struct taken *t)
{
    if (t->action == TAKE_DROPPED) {
        stats[S_DROPPED]++;
        return;
    }
    if (t->action != TAKE_CACHE) {
        return;
    }
    stats[S_PKTS]++;
    switch (t->kind) {
    case K_IPV4_OK: stats[S_IPV4_OK]++; break;
    case K_IPV6_OK: stats[S_IPV6_OK]++; break;
    case K_IPV4_ERR: stats[S_IPV4_ERRS]++; stats[S_ERRS]++; break;
    case K_IPV6_ERR: stats[S_IPV6_ERRS]++; stats[S_ERRS]++; break;
    default: break;
    }
}

/* stats.<name> += delta for each counter; keeps a pending exception. */
static int
stats_add(PyObject *stats, const Py_ssize_t *delta)
{
    PyObject *et, *ev, *tb;
    int rc = 0;

    PyErr_Fetch(&et, &ev, &tb);
    for (int i = 0; i < S_COUNT && rc == 0; i++) {
        PyObject *old, *d, *sum;

        if (!delta[i]) {
            continue;
        }
        old = PyObject_GetAttrString(stats, stat_names[i]);
        d = old ? PyLong_FromSsize_t(delta[i]) : NULL;
        sum = d ? PyNumber_Add(old, d) : NULL;
        if (!sum || PyObject_SetAttrString(stats, stat_names[i], sum) < 0) {
            rc = -1;
        }
        Py_XDECREF(old);
        Py_XDECREF(d);
        Py_XDECREF(sum);
    }
    if (et) {
        /* The first error wins. */
        if (rc < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(et, ev, tb);
    }
    return rc;
}

/* Samples are looked up GROUP at a time: their keys are built first,
 * then the dictionary lookups run back to back and each found flow's
 * cache lines are prefetched, then the updates.  With 100k flows nearly
 * every lookup misses the CPU cache; in a group, the misses of
 * independent lookups overlap instead of adding up. */
#define GROUP 8

PyDoc_STRVAR(sample_batch_doc,
"sample_batch(samples, start, now, params, cache, stats) -> stop\n"
"\n"
"Exporter.sample_batch in C: aggregate samples[start:] (a list of\n"
"upcall.BridgeSample and upcall.FlowSample) into cache (a\n"
"flowcache.FlowCache) at now (s), each exactly as Exporter.sample_bridge\n"
"or Exporter.sample_flow would (packet.parse's key, BFD skipped, samples\n"
"of an unsampled direction dropped), and add to stats (ExporterStats)\n"
"what they count, up to the first sample it leaves to those methods\n"
"(a flow sample of probability 0, a value out of the usual range, an\n"
"object of another type, a key part its maker refused).  stop: that\n"
"sample's index (len(samples) when all were taken).\n"
"\n"
"params = (BridgeSample, FlowSample, is_bridge, default_count, domain,\n"
"point, enable_input, enable_output, iface_for, tunnel_for, tids): the\n"
"bridge options' values; iface_for(input_port, output_port, direction)\n"
"the key's interface part and tunnel_for(input_port, output_port,\n"
"tunnel) its tunnel part (bytes, b\"\" for none: Exporter._iface_part,\n"
"_tunnel_part); tids the template id of each layout (120 big-endian\n"
"u16: untunnelled, then tunnelled).  On an exception the cache and\n"
"stats hold every sample before the one that raised.");

static PyObject *
sample_batch(PyObject *self, PyObject *args)
{
    PyObject *samples, *params, *cache, *stats;
    Py_ssize_t start;
    double now;
    PyObject *seq = NULL, *index = NULL, *insert = NULL;
    struct batch_state st;
    struct arrays arr = {{NULL, NULL, NULL}, {{0}}, 0};
    struct taken g[GROUP];
    struct inserter ins = {0, NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0.0, 0.0};
    PyObject *tcp_end = NULL;
    Py_ssize_t i = 0, n, delta[S_COUNT] = {0};
    Py_buffer tids = {0};
    FlowIndex *fi = NULL;
    int ng = 0, ok = 0;
    unsigned long domain, point;

    (void) self;
    memset(&st, 0, sizeof st);
    if (!PyArg_ParseTuple(args, "OndO!OO:sample_batch", &samples, &start,
                          &now, &PyTuple_Type, &params, &cache, &stats)) {
        return NULL;
    }
    if (!PyArg_ParseTuple(params, "O!O!pKkkppOOy*:sample_batch params",
                          &PyType_Type, &st.bridge_cls, &PyType_Type,
                          &st.flow_cls, &st.is_bridge, &st.default_count,
                          &domain, &point, &st.enable_in, &st.enable_out,
                          &st.iface_for, &st.tunnel_for, &tids)) {
        return NULL;
    }
    if (tids.len != 2 * N_TIDS || domain > 0xFFFFFFFFUL
        || point > 0xFFFFFFFFUL) {
        PyBuffer_Release(&tids);
        PyErr_SetString(PyExc_ValueError, "sample_batch: bad params");
        return NULL;
    }
    st.tids = tids.buf;
    st.domain = (uint32_t) domain;
    st.point = (uint32_t) point;
    seq = PySequence_Fast(samples, "samples must be a sequence");
    if (!seq) {
        goto out;
    }
    index = PyObject_GetAttrString(cache, "index");
    insert = PyObject_GetAttrString(cache, "_insert");
    if (!index || !insert) {
        goto out;
    }
    if (Py_TYPE(index) == &FlowIndex_Type) {
        fi = (FlowIndex *) index;
    } else if (!PyDict_Check(index)) {
        PyErr_SetString(PyExc_TypeError,
                        "cache.index must be a dict or a FlowIndex");
        goto out;
    }
    tcp_end = PyObject_GetAttrString(cache, "tcp_end_of_flow");
    if (!tcp_end || (st.tcp_end = PyObject_IsTrue(tcp_end)) < 0) {
        goto out;
    }
    if (arrays_acquire(&arr, cache) < 0) {
        goto out;
    }

    n = PySequence_Fast_GET_SIZE(seq);
    i = start < 0 ? 0 : start;
    while (i < n) {
        int stop = 0, miss, j;

        /* 1. Take up to GROUP samples in a row. */
        while (ng < GROUP && i + ng < n) {
            int r = take_sample(&st, PySequence_Fast_GET_ITEM(seq, i + ng),
                                &g[ng]);
            if (r < 0) {
                goto out;
            }
            if (r == 0) {
                stop = 1;
                break;
            }
            if (fi && g[ng].action == TAKE_CACHE) {
                g[ng].hash = PyObject_Hash(g[ng].key);
                if (g[ng].hash == -1) {
                    ng++;
                    goto out;
                }
                if (fi->mask) {
                    __builtin_prefetch(&fi->buckets[fi_home(fi,
                                                            g[ng].hash)]);
                }
            }
            ng++;
        }
        if (fi && fi->mask) {
            /* The flows' keys, in the order a lookup reads them: the
             * first bucket of the right hash, then its key pointer,
             * then the key. */
            Py_ssize_t cand[GROUP];

            for (j = 0; j < ng; j++) {
                size_t b = fi_home(fi, g[j].hash);
                uint32_t h32 = fi_hash32(g[j].hash);

                cand[j] = -1;
                if (g[j].action != TAKE_CACHE) {
                    continue;
                }
                while (fi->buckets[b]) {
                    if ((uint32_t) (fi->buckets[b] >> 32) == h32) {
                        cand[j] = (Py_ssize_t) (fi->buckets[b]
                                                & 0xFFFFFFFFu) - 1;
                        __builtin_prefetch(&fi->keys[cand[j]]);
                        break;
                    }
                    b = (b + 1) & fi->mask;
                }
            }
            for (j = 0; j < ng; j++) {
                if (cand[j] >= 0) {
                    __builtin_prefetch(fi->keys[cand[j]]);
                }
            }
        }
        /* 2. Look them up, up to the first new flow. */
        miss = ng;
        for (j = 0; j < ng; j++) {
            PyObject *slot_o;
            Py_ssize_t slot;

            if (g[j].action != TAKE_CACHE) {
                continue;
            }
            if (fi) {
                Py_ssize_t b = fi_find(fi, g[j].key, g[j].hash);

                if (b < 0) {
                    miss = j;
                    break;
                }
                slot = fi_slot_of(fi, b);
                goto found;
            }
            slot_o = PyDict_GetItemWithError(index, g[j].key);
            if (!slot_o) {
                if (PyErr_Occurred()) {
                    goto out;
                }
                miss = j;
                break;
            }
            slot = PyLong_AsSsize_t(slot_o);
            if (slot < 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_ValueError, "negative cache slot");
                }
                goto out;
            }
        found:
            if (!slot_in_range(&arr, slot)) {
                PyErr_SetString(PyExc_IndexError, "cache slot out of range");
                goto out;
            }
            g[j].slot = slot;
            __builtin_prefetch((double *) arr.views[TIMES].buf + slot * 2,
                               1);
            __builtin_prefetch((uint64_t *) arr.views[COUNTERS].buf
                               + slot * 4, 1);
            __builtin_prefetch((uint32_t *) arr.views[SMALL].buf + slot * 3,
                               1);
        }
        /* 3. Update the flows found (the updates commute: sums, min,
         * max, or, the same end time). */
        for (j = 0; j < miss; j++) {
            if (g[j].action == TAKE_CACHE) {
                apply_update(&arr, &g[j], now);
            }
            count_sample(delta, &g[j]);
        }
        if (miss < ng) {
            /* A new flow.  The samples taken after it are taken again
             * (one of them may be the same flow). */
            struct taken *t = &g[miss];
            int r;

            /* Counted before it goes in, as Exporter._sample counts it
             * before FlowCache.add (so an exception there leaves the
             * same statistics on either path). */
            count_sample(delta, t);
            r = insert_new(&ins, cache, index, &arr, t, now);
            if (r < 0) {
                i += miss + 1;
                goto out;
            }
            if (r == 0) {
                /* flowcache.FlowCache._insert, which may grow the
                 * arrays and expire flows. */
                PyObject *res;

                arrays_release(&arr);
                inserter_clear(&ins);
                res = PyObject_CallFunction(insert, "OdKKKI", t->key, now,
                                            t->count, t->frame_len,
                                            t->ip_len, t->tcp_flags);
                if (!res) {
                    i += miss + 1;
                    goto out;
                }
                Py_DECREF(res);
                delta[S_FLOWS]++;
                if (arrays_acquire(&arr, cache) < 0) {
                    i += miss + 1;
                    goto out;
                }
            } else {
                delta[S_FLOWS]++;
            }
            stop = 0;
            miss++;
        }
        for (j = 0; j < ng; j++) {
            Py_CLEAR(g[j].key);
        }
        ng = 0;
        i += miss;
        if (stop) {
            break;
        }
    }
    ok = 1;

out:
    for (int j = 0; j < ng; j++) {
        Py_CLEAR(g[j].key);
    }
    arrays_release(&arr);
    inserter_clear(&ins);
    batch_state_clear(&st);
    PyBuffer_Release(&tids);
    Py_XDECREF(tcp_end);
    Py_XDECREF(insert);
    Py_XDECREF(index);
    Py_XDECREF(seq);
    if (stats_add(stats, delta) < 0 && ok) {
        return NULL;
    }
    if (!ok) {
        return NULL;
    }
    return PyLong_FromSsize_t(i);
}

/* ------------------------------------------------------------ decoding */
#define A_FRAME 5
#define A_ORIG_LEN 6

/* cls(*prefix, frame, orig_len, *suffix), built as tuple.__new__ does
 * for a tuple subclass (a namedtuple has no __dict__). */
static PyObject *
new_upcall(PyObject *hit, const unsigned char *frame, Py_ssize_t flen,
           unsigned long orig_len)
{
    PyTypeObject *cls = (PyTypeObject *) PyTuple_GET_ITEM(hit, 0);
    PyObject *prefix = PyTuple_GET_ITEM(hit, 1);
    PyObject *suffix = PyTuple_GET_ITEM(hit, 2);
    Py_ssize_t np = PyTuple_GET_SIZE(prefix);
    Py_ssize_t ns = PyTuple_GET_SIZE(suffix);
    PyObject *u, *f, *ol;

    f = PyBytes_FromStringAndSize((const char *) frame, flen);
    if (!f) {
        return NULL;
    }
    ol = PyLong_FromUnsignedLong(orig_len);
    if (!ol) {
        Py_DECREF(f);
        return NULL;
    }
    u = cls->tp_alloc(cls, np + 2 + ns);
    if (!u) {
        Py_DECREF(f);
        Py_DECREF(ol);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < np; j++) {
        PyObject *v = PyTuple_GET_ITEM(prefix, j);
        Py_INCREF(v);
        PyTuple_SET_ITEM(u, j, v);
    }
    PyTuple_SET_ITEM(u, np, f);
    PyTuple_SET_ITEM(u, np + 1, ol);
    for (Py_ssize_t j = 0; j < ns; j++) {
        PyObject *v = PyTuple_GET_ITEM(suffix, j);
        Py_INCREF(v);
        PyTuple_SET_ITEM(u, np + 2 + j, v);
    }
    return u;
}

static int
valid_hit(PyObject *hit)
{
    return PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 3
           && PyType_Check(PyTuple_GET_ITEM(hit, 0))
           && PyType_IsSubtype((PyTypeObject *) PyTuple_GET_ITEM(hit, 0),
                               &PyTuple_Type)
           && PyTuple_CheckExact(PyTuple_GET_ITEM(hit, 1))
           && PyTuple_CheckExact(PyTuple_GET_ITEM(hit, 2));
}

PyDoc_STRVAR(decode_hits_doc,
"decode_hits(datagram, offset, end, caches, out) -> (offset, n)\n"
"\n"
"Decode the upcalls of datagram (bytes) from offset, up to end, as\n"
"long as each one is a hit of the metadata cache: FRAME first, maybe\n"
"ORIG_LEN second (not below the frame's length), and the bytes after\n"
"them a key of caches[kind], whose value (cls, prefix, suffix) gives\n"
"cls(*prefix, frame, orig_len, *suffix).  Appends them to out (a list)\n"
"and returns the offset of the first upcall it did not decode and how\n"
"many it did.  This is the inlined cache-hit branch of upcall._decode,\n"
"which decodes everything else (and counts errors).");

static PyObject *
decode_hits(PyObject *self, PyObject *args)
{
    PyObject *d_o, *caches, *out;
    Py_ssize_t off, end, n = 0;
    const unsigned char *d;
    PyObject *cache = NULL, *last_meta = NULL, *last_hit = NULL;
    long cache_kind = -1, last_kind = -1;
    int ok = 0;

    (void) self;
    if (!PyArg_ParseTuple(args, "O!nnO!O!:decode_hits", &PyBytes_Type, &d_o,
                          &off, &end, &PyDict_Type, &caches, &PyList_Type,
                          &out)) {
        return NULL;
    }
    if (end > PyBytes_GET_SIZE(d_o)) {
        end = PyBytes_GET_SIZE(d_o);
    }
    if (off < 0) {
        off = 0;
    }
    d = (const unsigned char *) PyBytes_AS_STRING(d_o);
    while (end - off >= 12) {
        const unsigned char *u = d + off;
        uint32_t ulen = get_u32(u);
        uint16_t kind = get_u16(u + 4);
        uint16_t alen = get_u16(u + 8);
        uint16_t atype = get_u16(u + 10);
        Py_ssize_t uend, a, m;
        unsigned long orig_len;
        PyObject *hit, *up;

        if (ulen < 8 || (ulen & 3) || (Py_ssize_t) ulen > end - off) {
            break;
        }
        uend = off + ulen;
        a = off + 8;
        if (atype != A_FRAME || a + alen > uend || alen < 4) {
            break;
        }
        m = a + ((alen + 3) & ~3);
        orig_len = alen - 4;
        if (m + 8 <= uend && get_u16(d + m) == 8
            && get_u16(d + m + 2) == A_ORIG_LEN) {
            orig_len = get_u32(d + m + 4);
            m += 8;
        }
        if (orig_len < (unsigned long) (alen - 4) || m > uend) {
            break;
        }
        if (last_meta && kind == last_kind
            && PyBytes_GET_SIZE(last_meta) == uend - m
            && !memcmp(PyBytes_AS_STRING(last_meta), d + m, uend - m)) {
            hit = last_hit;
        } else {
            PyObject *meta;

            if (kind != cache_kind) {
                PyObject *k = PyLong_FromLong(kind);
                if (!k) {
                    goto out;
                }
                cache = PyDict_GetItemWithError(caches, k);
                Py_DECREF(k);
                if (!cache) {
                    if (PyErr_Occurred()) {
                        goto out;
                    }
                    break;
                }
                if (!PyDict_Check(cache)) {
                    PyErr_SetString(PyExc_TypeError,
                                    "metadata caches must be dicts");
                    goto out;
                }
                cache_kind = kind;
            }
            meta = PyBytes_FromStringAndSize((const char *) d + m,
                                             uend - m);
            if (!meta) {
                goto out;
            }
            hit = PyDict_GetItemWithError(cache, meta);
            if (!hit) {
                Py_DECREF(meta);
                if (PyErr_Occurred()) {
                    goto out;
                }
                break;
            }
            if (!valid_hit(hit)) {
                Py_DECREF(meta);
                PyErr_SetString(PyExc_TypeError, "bad metadata cache entry");
                goto out;
            }
            /* The cache may be cleared by the caller later, not while
             * this runs: keep our own references all the same. */
            Py_INCREF(hit);
            Py_XDECREF(last_hit);
            Py_XDECREF(last_meta);
            last_hit = hit;
            last_meta = meta;
            last_kind = kind;
        }
        up = new_upcall(hit, d + a + 4, alen - 4, orig_len);
        if (!up) {
            goto out;
        }
        if (PyList_Append(out, up) < 0) {
            Py_DECREF(up);
            goto out;
        }
        Py_DECREF(up);
        off = uend;
        n++;
    }
    ok = 1;

out:
    Py_XDECREF(last_hit);
    Py_XDECREF(last_meta);
    if (!ok) {
        return NULL;
    }
    return Py_BuildValue("nn", off, n);
}

/* ------------------------------------------------------------ export */

static inline unsigned char *
put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char) v;
        v >>= 8;
    }
    return p + 8;
}

/* exporter.time_ms: a time in s as dateTimeMilliseconds, truncated,
 * clamped to [0, 2^64-1].  -1 (OverflowError) for a time no clock
 * gives. */
static int
time_ms(double t, uint64_t *out)
{
    double ms;

    if (!isfinite(t)) {
        PyErr_SetString(PyExc_OverflowError, "flow time out of range");
        return -1;
    }
    ms = t * 1000.0;
    *out = ms <= 0.0 ? 0
           : ms < 18446744073709551616.0 ? (uint64_t) ms : UINT64_MAX;
    return 0;
}

/* Expired-flow fields (flowcache.ExpiredFlow) after the key. */
enum { F_KEY, F_START, F_END, F_PACKETS, F_L2, F_OCTETS, F_SUMSQ,
       F_MIN, F_MAX, F_FLAGS, F_REASON, F_COUNT };

PyDoc_STRVAR(pack_records_doc,
"pack_records(flows, vobs, ip, tcp) -> (data, packets, octets)\n"
"\n"
"exporter.pack_records in C: the data records of expired flows of one\n"
"template (flowcache.ExpiredFlow, keys of equal length), back to back,\n"
"and per record its packets and octets (IP octets when ip, else\n"
"layer-2 octets) for the not-sent totals.");

static PyObject *
pack_records(PyObject *self, PyObject *args)
{
    PyObject *flows, *seq, *vobs, *data = NULL, *packets = NULL;
    PyObject *octets = NULL, *result = NULL;
    int ip, tcp;
    Py_ssize_t n, key_len = -1, rec_len, vobs_len;
    unsigned char *p;

    (void) self;
    if (!PyArg_ParseTuple(args, "OO!pp:pack_records", &flows,
                          &PyBytes_Type, &vobs, &ip, &tcp)) {
        return NULL;
    }
    seq = PySequence_Fast(flows, "flows must be a sequence");
    if (!seq) {
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    vobs_len = PyBytes_GET_SIZE(vobs);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *key;

        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) < F_COUNT
            || !PyBytes_Check(PyTuple_GET_ITEM(f, F_KEY))) {
            PyErr_SetString(PyExc_TypeError, "flows: ExpiredFlow tuples");
            goto out;
        }
        key = PyTuple_GET_ITEM(f, F_KEY);
        if (key_len < 0) {
            key_len = PyBytes_GET_SIZE(key);
        }
        if (PyBytes_GET_SIZE(key) != key_len || key_len < 6) {
            PyErr_SetString(PyExc_ValueError,
                            "flows of one template: keys of one length");
            goto out;
        }
    }
    rec_len = (key_len < 0 ? 6 : key_len) - 6 + vobs_len + 33
              + (ip ? 32 : 0) + (ip && tcp ? 2 : 0);
    data = PyBytes_FromStringAndSize(NULL, n * rec_len);
    packets = PyList_New(n);
    octets = PyList_New(n);
    if (!data || !packets || !octets) {
        goto out;
    }
    p = (unsigned char *) PyBytes_AS_STRING(data);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *o;
        double start, end;
        uint64_t sd, ed;
        unsigned long long v[F_COUNT];

        start = PyFloat_AsDouble(PyTuple_GET_ITEM(f, F_START));
        end = PyFloat_AsDouble(PyTuple_GET_ITEM(f, F_END));
        for (int j = F_PACKETS; j < F_COUNT; j++) {
            v[j] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(f, j));
        }
        if (PyErr_Occurred() || time_ms(start, &sd) < 0
            || time_ms(end, &ed) < 0) {
            goto out;
        }
        memcpy(p, PyBytes_AS_STRING(PyTuple_GET_ITEM(f, F_KEY)) + 6,
               key_len - 6);
        p += key_len - 6;
        memcpy(p, PyBytes_AS_STRING(vobs), vobs_len);
        p += vobs_len;
        /* flowStart/EndMilliseconds, packetDeltaCount,
         * layer2OctetDeltaCount, flowEndReason (exporter._AGG_LAYOUT) */
        p = put_u64(p, sd);
        p = put_u64(p, ed);
        p = put_u64(p, v[F_PACKETS]);
        p = put_u64(p, v[F_L2]);
        *p++ = (unsigned char) v[F_REASON];
        if (ip) {
            p = put_u64(p, v[F_OCTETS]);
            p = put_u64(p, v[F_SUMSQ]);
            p = put_u64(p, v[F_MIN]);
            p = put_u64(p, v[F_MAX]);
            if (tcp) {
                p[0] = (unsigned char) (v[F_FLAGS] >> 8);
                p[1] = (unsigned char) v[F_FLAGS];
                p += 2;
            }
        }
        o = PyTuple_GET_ITEM(f, F_PACKETS);
        Py_INCREF(o);
        PyList_SET_ITEM(packets, i, o);
        o = PyTuple_GET_ITEM(f, ip ? F_OCTETS : F_L2);
        Py_INCREF(o);
        PyList_SET_ITEM(octets, i, o);
    }
    result = PyTuple_Pack(3, data, packets, octets);

out:
    Py_XDECREF(data);
    Py_XDECREF(packets);
    Py_XDECREF(octets);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(group_expired_doc,
"group_expired(flows) -> (groups, reasons)\n"
"\n"
"exporter.group_expired in C: expired flows (flowcache.ExpiredFlow)\n"
"grouped by (their key's first 6 bytes, the key's length), in order of\n"
"first appearance and in order within each group; and how many left\n"
"by each flowEndReason ({reason: count}).");

static PyObject *
group_expired(PyObject *self, PyObject *args)
{
    PyObject *flows, *seq, *groups = NULL, *reasons = NULL, *res = NULL;
    PyObject *last_key = NULL, *last_list = NULL;
    Py_ssize_t n, small[16] = {0};

    (void) self;
    if (!PyArg_ParseTuple(args, "O:group_expired", &flows)) {
        return NULL;
    }
    seq = PySequence_Fast(flows, "flows must be a sequence");
    if (!seq) {
        return NULL;
    }
    groups = PyDict_New();
    reasons = PyDict_New();
    if (!groups || !reasons) {
        goto out;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PySequence_Fast_GET_ITEM(seq, i), *key, *reason;
        Py_ssize_t klen;

        if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) < F_COUNT
            || !PyBytes_Check(PyTuple_GET_ITEM(f, F_KEY))
            || PyBytes_GET_SIZE(PyTuple_GET_ITEM(f, F_KEY)) < 6) {
            PyErr_SetString(PyExc_TypeError, "flows: ExpiredFlow tuples");
            goto out;
        }
        key = PyTuple_GET_ITEM(f, F_KEY);
        klen = PyBytes_GET_SIZE(key);
        /* Expired flows come in runs of one group: compare with the
         * last flow's key before building a group key. */
        if (!last_key || PyBytes_GET_SIZE(last_key) != klen
            || memcmp(PyBytes_AS_STRING(last_key), PyBytes_AS_STRING(key),
                      6)) {
            PyObject *gk = Py_BuildValue("(y#n)", PyBytes_AS_STRING(key),
                                         (Py_ssize_t) 6, klen);
            PyObject *g;

            if (!gk) {
                goto out;
            }
            g = PyDict_GetItemWithError(groups, gk);
            if (!g) {
                if (PyErr_Occurred()) {
                    Py_DECREF(gk);
                    goto out;
                }
                g = PyList_New(0);
                if (!g || PyDict_SetItem(groups, gk, g) < 0) {
                    Py_XDECREF(g);
                    Py_DECREF(gk);
                    goto out;
                }
                Py_DECREF(g);           /* the dict holds it */
            }
            Py_DECREF(gk);
            last_list = g;
            last_key = key;
        }
        if (PyList_Append(last_list, f) < 0) {
            goto out;
        }
        reason = PyTuple_GET_ITEM(f, F_REASON);
        if (PyLong_CheckExact(reason)) {
            long r = PyLong_AsLong(reason);

            if (r >= 0 && r < 16) {
                small[r]++;
                continue;
            }
            PyErr_Clear();
        }
        {
            /* reasons[reason] = reasons.get(reason, 0) + 1 */
            PyObject *old = PyDict_GetItemWithError(reasons, reason);
            PyObject *one, *sum;

            if (!old && PyErr_Occurred()) {
                goto out;
            }
            one = PyLong_FromLong(1);
            if (!one) {
                goto out;
            }
            if (old) {
                sum = PyNumber_Add(old, one);
            } else {
                Py_INCREF(one);
                sum = one;
            }
            Py_DECREF(one);
            if (!sum || PyDict_SetItem(reasons, reason, sum) < 0) {
                Py_XDECREF(sum);
                goto out;
            }
            Py_DECREF(sum);
        }
    }
    for (long r = 0; r < 16; r++) {
        PyObject *k, *v;

        if (!small[r]) {
            continue;
        }
        k = PyLong_FromLong(r);
        v = PyLong_FromSsize_t(small[r]);
        if (!k || !v || PyDict_SetItem(reasons, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            goto out;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    res = PyTuple_Pack(2, groups, reasons);

out:
    Py_XDECREF(groups);
    Py_XDECREF(reasons);
    Py_DECREF(seq);
    return res;
}

PyDoc_STRVAR(expired_flows_doc,
"expired_flows(cls, keys, slots, times, counters, small, reason) -> list\n"
"\n"
"cls(key, start, end, packets, l2_octets, octets, sumsq, min_len,\n"
"max_len, tcp_flags, reason) for each key and its slot, read from the\n"
"flow cache's arrays (flowcache.FlowCache.flush in C).  cls: the\n"
"flowcache.ExpiredFlow namedtuple.");

static PyObject *
expired_flows(PyObject *self, PyObject *args)
{
    PyObject *cls_o, *keys, *slots, *reason, *list = NULL;
    PyTypeObject *cls;
    struct arrays arr = {{NULL, NULL, NULL}, {{0}}, 0};
    Py_ssize_t n;

    (void) self;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOO:expired_flows", &PyType_Type,
                          &cls_o, &PyList_Type, &keys, &PyList_Type,
                          &slots, &arr.objs[TIMES], &arr.objs[COUNTERS],
                          &arr.objs[SMALL], &reason)) {
        return NULL;
    }
    cls = (PyTypeObject *) cls_o;
    if (!PyType_IsSubtype(cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "cls must be a tuple subclass");
        return NULL;
    }
    n = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(slots) != n) {
        PyErr_SetString(PyExc_ValueError, "one slot per key");
        return NULL;
    }
    /* Borrowed from the arguments: references of our own, since
     * arrays_release drops them. */
    for (int i = 0; i < 3; i++) {
        Py_INCREF(arr.objs[i]);
    }
    if (arrays_hold(&arr) < 0) {
        return NULL;
    }
    list = PyList_New(n);
    if (!list) {
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t slot = PyLong_AsSsize_t(PyList_GET_ITEM(slots, i));
        const double *t;
        const uint64_t *c;
        const uint32_t *m;
        PyObject *f, *v[11];
        int j;

        if (!slot_in_range(&arr, slot)) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_IndexError, "slot out of range");
            }
            Py_CLEAR(list);
            goto out;
        }
        t = (const double *) arr.views[TIMES].buf + slot * 2;
        c = (const uint64_t *) arr.views[COUNTERS].buf + slot * 4;
        m = (const uint32_t *) arr.views[SMALL].buf + slot * 3;
        v[0] = PyList_GET_ITEM(keys, i);
        Py_INCREF(v[0]);
        v[1] = PyFloat_FromDouble(t[0]);
        v[2] = PyFloat_FromDouble(t[1]);
        for (j = 0; j < 4; j++) {
            v[3 + j] = PyLong_FromUnsignedLongLong(c[j]);
        }
        for (j = 0; j < 3; j++) {
            v[7 + j] = PyLong_FromUnsignedLong(m[j]);
        }
        v[10] = reason;
        Py_INCREF(reason);
        f = cls->tp_alloc(cls, 11);
        for (j = 0; j < 11; j++) {
            if (!v[j] || !f) {
                break;
            }
        }
        if (j < 11 || !f) {
            for (j = 0; j < 11; j++) {
                Py_XDECREF(v[j]);
            }
            Py_XDECREF(f);
            Py_CLEAR(list);
            goto out;
        }
        for (j = 0; j < 11; j++) {
            PyTuple_SET_ITEM(f, j, v[j]);
        }
        PyList_SET_ITEM(list, i, f);
    }

out:
    arrays_release(&arr);
    return list;
}

/* ------------------------------------------------------------ replay */

#define CHANNEL_MAGIC 0x4F495058UL  /* upcall.MAGIC */
#define CHANNEL_VERSION 1
#define CHANNEL_HEADER 12           /* upcall.HEADER.size */
#define MAX_UPCALLS 0xFFFF          /* upcall.MAX_UPCALLS_PER_DATAGRAM */
#define PCAP_MAX_RECORD (16 << 20)  /* pcap.MAX_RECORD */

static inline uint32_t
get_u32_order(const unsigned char *p, int little)
{
    return little ? (uint32_t) p[3] << 24 | (uint32_t) p[2] << 16
                    | (uint32_t) p[1] << 8 | p[0]
                  : get_u32(p);
}

PyDoc_STRVAR(pcap_datagram_doc,
"pcap_datagram(buf, offset, little, limit, kind, prefix, max_size)\n"
"    -> (offset, datagram, n)\n"
"\n"
"The replay's hot loop in C: the records of a classic pcap file (buf,\n"
"from offset; little: its byte order) as upcalls of one datagram, as\n"
"upcall.FrameBatcher builds them (frames longer than limit truncated,\n"
"their original length kept; kind and prefix: FrameBatcher's, from\n"
"upcall._prefix), as many as fit in max_size bytes.  Returns the\n"
"offset of the first record not taken, the datagram (None when empty)\n"
"and its upcall count.  It stops before a record it cannot take\n"
"(truncated, too large, a frame that fits no datagram): the Python\n"
"reader and batcher take over there and report it.");

static PyObject *
pcap_datagram(PyObject *self, PyObject *args)
{
    Py_buffer buf, prefix;
    Py_ssize_t off, limit, max_size, used = CHANNEL_HEADER, count = 0;
    int little, kind;
    PyObject *d = NULL, *res = NULL;
    unsigned char *out;
    const unsigned char *b;

    (void) self;
    if (!PyArg_ParseTuple(args, "y*npniy*n:pcap_datagram", &buf, &off,
                          &little, &limit, &kind, &prefix, &max_size)) {
        return NULL;
    }
    if (off < 0 || limit < 0 || limit > 0xFFFF - 4 || kind < 0
        || kind > 0xFFFF || max_size < CHANNEL_HEADER + 8
        || max_size > (1 << 20) || prefix.len > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "pcap_datagram: bad argument");
        goto out;
    }
    d = PyBytes_FromStringAndSize(NULL, max_size);
    if (!d) {
        goto out;
    }
    out = (unsigned char *) PyBytes_AS_STRING(d);
    b = buf.buf;
    while (off + 16 <= buf.len && count < MAX_UPCALLS) {
        uint32_t incl = get_u32_order(b + off + 8, little);
        uint32_t orig = get_u32_order(b + off + 12, little);
        Py_ssize_t start = off + 16, n, pad, total;
        unsigned char *u;

        if (incl > PCAP_MAX_RECORD || (Py_ssize_t) incl > buf.len - start) {
            break;
        }
        if (orig < incl) {
            orig = incl;
        }
        n = (Py_ssize_t) incl > limit ? limit : (Py_ssize_t) incl;
        pad = (4 - (n & 3)) & 3;
        total = 12 + n + pad + ((uint32_t) n != orig ? 8 : 0) + prefix.len;
        if (used + total > max_size) {
            break;
        }
        u = out + used;
        /* length, kind, reserved, FRAME attribute header
         * (upcall._UPCALL_FIRST), the frame, padding */
        put_u32(u, (uint32_t) total);
        u[4] = (unsigned char) (kind >> 8);
        u[5] = (unsigned char) kind;
        u[6] = u[7] = 0;
        u[8] = (unsigned char) ((n + 4) >> 8);
        u[9] = (unsigned char) (n + 4);
        u[10] = 0;
        u[11] = A_FRAME;
        memcpy(u + 12, b + start, n);
        u += 12 + n;
        memset(u, 0, pad);
        u += pad;
        if ((uint32_t) n != orig) {
            /* ORIG_LEN: len 8, type, value */
            u[0] = 0;
            u[1] = 8;
            u[2] = 0;
            u[3] = A_ORIG_LEN;
            put_u32(u + 4, orig);
            u += 8;
        }
        memcpy(u, prefix.buf, prefix.len);
        used += total;
        count++;
        off = start + incl;
    }
    if (!count) {
        Py_CLEAR(d);
        res = Py_BuildValue("nOn", off, Py_None, (Py_ssize_t) 0);
        goto out;
    }
    /* magic, version, flags, count, length (upcall.HEADER) */
    put_u32(out, CHANNEL_MAGIC);
    out[4] = CHANNEL_VERSION;
    out[5] = 0;
    out[6] = (unsigned char) (count >> 8);
    out[7] = (unsigned char) count;
    put_u32(out + 8, (uint32_t) used);
    if (_PyBytes_Resize(&d, used) < 0) {
        goto out;
    }
    res = Py_BuildValue("nOn", off, d, count);

out:
    Py_XDECREF(d);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&prefix);
    return res;
}

PyDoc_STRVAR(one_source_doc,
"one_source(upcalls, bridge_cls) -> key or None\n"
"\n"
"Daemon.handle_upcalls's common case in C: when every upcall of the\n"
"list comes from one source, that source's exporter key, (\"bridge\",\n"
"bridge) for bridge samples (type bridge_cls) or (\"flow\", bridge,\n"
"collector_set_id) for flow samples; else (or for an empty list)\n"
"None, and the caller groups them.");

static PyObject *
one_source(PyObject *self, PyObject *args)
{
    PyObject *ups, *bcls, *first, *bridge, *csid = NULL;
    Py_ssize_t n;
    int is_bridge;

    (void) self;
    if (!PyArg_ParseTuple(args, "O!O!:one_source", &PyList_Type, &ups,
                          &PyType_Type, &bcls)) {
        return NULL;
    }
    n = PyList_GET_SIZE(ups);
    if (!n) {
        Py_RETURN_NONE;
    }
    first = PyList_GET_ITEM(ups, 0);
    if (!PyTuple_Check(first) || PyTuple_GET_SIZE(first) < 2) {
        Py_RETURN_NONE;
    }
    is_bridge = Py_TYPE(first) == (PyTypeObject *) bcls;
    bridge = PyTuple_GET_ITEM(first, 0);
    if (!is_bridge) {
        csid = PyTuple_GET_ITEM(first, 1);
    }
    for (Py_ssize_t i = 1; i < n; i++) {
        PyObject *u = PyList_GET_ITEM(ups, i), *b;
        int eq;

        if (Py_TYPE(u) != Py_TYPE(first)) {
            Py_RETURN_NONE;
        }
        b = PyTuple_GET_ITEM(u, 0);
        if (b != bridge) {
            eq = PyObject_RichCompareBool(b, bridge, Py_EQ);
            if (eq <= 0) {
                if (eq < 0) {
                    return NULL;
                }
                Py_RETURN_NONE;
            }
        }
        if (csid && PyTuple_GET_ITEM(u, 1) != csid) {
            eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(u, 1), csid,
                                          Py_EQ);
            if (eq <= 0) {
                if (eq < 0) {
                    return NULL;
                }
                Py_RETURN_NONE;
            }
        }
    }
    if (is_bridge) {
        return Py_BuildValue("(sO)", "bridge", bridge);
    }
    return Py_BuildValue("(sOO)", "flow", bridge, csid);
}

static PyMethodDef methods[] = {
    {"sample_batch", sample_batch, METH_VARARGS, sample_batch_doc},
    {"parse_key", parse_key, METH_VARARGS, parse_key_doc},
    {"pcap_datagram", pcap_datagram, METH_VARARGS, pcap_datagram_doc},
    {"one_source", one_source, METH_VARARGS, one_source_doc},
    {"decode_hits", decode_hits, METH_VARARGS, decode_hits_doc},
    {"pack_records", pack_records, METH_VARARGS, pack_records_doc},
    {"group_expired", group_expired, METH_VARARGS, group_expired_doc},
    {"expired_flows", expired_flows, METH_VARARGS, expired_flows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "ovs_ipfix_py._fastpath",
    "The sample hot path in C (optional; see fastpath.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    PyObject *m;

    if (PyType_Ready(&FlowIndex_Type) < 0) {
        return NULL;
    }
    m = PyModule_Create(&module);
    if (!m) {
        return NULL;
    }
    Py_INCREF(&FlowIndex_Type);
    if (PyModule_AddObject(m, "FlowIndex", (PyObject *) &FlowIndex_Type)
        < 0) {
        Py_DECREF(&FlowIndex_Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
