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
 * - bridge_batch(): plain IPv4 bridge samples into the flow cache
 *   (Exporter.sample_bridge_batch's fast path): the key built from
 *   slices of the frame, looked up in the cache's index (a Python dict),
 *   the flow's aggregates updated in the cache's typed arrays.  A new
 *   flow is inserted here when that is all there is to it (a free slot,
 *   no expiry); otherwise it goes to FlowCache._insert, so growth and
 *   max_flows expiry stay in flowcache.py.  At the first sample it does
 *   not take (anything but plain IPv4 TCP/UDP/SCTP/ICMP, an unsampled
 *   direction, an object of an unexpected type) it stops and says
 *   where: the caller hands that sample to the general path and calls
 *   again, so samples are aggregated in order.  With the cache's
 *   tcp_end_of_flow on, TCP samples carrying FIN or RST are not taken
 *   either: marking a flow's end stays in flowcache.py alone.
 * - expired_flows(): FlowCache.flush's ExpiredFlow records.
 * - pack_records(): exporter.pack_records, data records of one template.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ETH_HEADER_LEN 14
#define MIN_FRAME_LEN 42        /* Ethernet + IPv4 + 8 bytes of L4 */
/* Room for the longest key: 20 bytes of head, two interface parts of
 * 4 + 4 + (1 + 64) + (1 + 128) bytes (OVS's name and description
 * limits), IPv4 and L4 fields. */
#define KEY_MAX 1024
#define UINT32_MAX_ULL 0xFFFFFFFFULL
/* BFD control and echo (RFC 5881, 5883): OVS never samples them. */
#define BFD_PORT 3784
#define BFD_ECHO_PORT 3785
/* FIN | RST (flowcache.TCP_END_FLAGS). */
#define TCP_END_FLAGS 0x05

/* The fast path's per-protocol key pieces for one port pair, as
 * exporter.Exporter._fast_heads() builds them: (head, mid, end of the
 * key's L4 slice in the frame, is TCP, IP packet bytes needed). */
struct proto_head {
    const char *head;
    Py_ssize_t head_len;
    const char *mid;
    Py_ssize_t mid_len;
    Py_ssize_t l4_end;
    int is_tcp;
    unsigned long need;
    int valid;
};

/* Protocols with a fast path: TCP, UDP, SCTP, ICMP. */
static const int fast_protos[4] = {6, 17, 132, 1};

static int
proto_slot(unsigned char proto)
{
    switch (proto) {
    case 6: return 0;
    case 17: return 1;
    case 132: return 2;
    case 1: return 3;
    default: return -1;
    }
}

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

/* Fills table[] from heads, the dict {IP protocol: (head, mid, l4_end,
 * is_tcp, need)} returned by heads_for.  Borrowed pointers: the caller
 * holds a reference to heads. */
static int
load_heads(PyObject *heads, struct proto_head table[4])
{
    for (int i = 0; i < 4; i++) {
        struct proto_head *ph = &table[i];
        PyObject *proto = PyLong_FromLong(fast_protos[i]);
        PyObject *t;

        ph->valid = 0;
        if (!proto) {
            return -1;
        }
        t = PyDict_GetItemWithError(heads, proto);
        Py_DECREF(proto);
        if (!t) {
            if (PyErr_Occurred()) {
                return -1;
            }
            continue;
        }
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 5
            || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(t, 1))) {
            PyErr_SetString(PyExc_TypeError, "bad fast-path heads entry");
            return -1;
        }
        ph->head = PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 0));
        ph->head_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 0));
        ph->mid = PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 1));
        ph->mid_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 1));
        ph->l4_end = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 2));
        ph->is_tcp = PyObject_IsTrue(PyTuple_GET_ITEM(t, 3));
        ph->need = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 4));
        if (PyErr_Occurred() || ph->is_tcp < 0) {
            return -1;
        }
        if (ph->l4_end < 26 || ph->l4_end > MIN_FRAME_LEN
            || ph->head_len + ph->mid_len + 19 + ph->l4_end - 26
               > KEY_MAX) {
            PyErr_SetString(PyExc_ValueError, "fast-path heads too long");
            return -1;
        }
        ph->valid = 1;
    }
    return 0;
}

/* What bridge_batch carries from one sample to the next: the last
 * probability and ports seen (by identity: the samples list keeps them
 * alive) and what was derived from them. */
struct batch_state {
    PyObject *heads_for;
    PyObject *tos_fields;
    unsigned long long default_count;
    PyObject *last_p, *last_in, *last_out;
    PyObject *heads;                /* owned: dict or None */
    int tcp_end;                    /* cache.tcp_end_of_flow */
    unsigned long long count;
    struct proto_head table[4];
};

/* One sample taken by the fast path, its key built, not yet looked up. */
struct taken {
    PyObject *key;                  /* owned */
    Py_ssize_t slot;
    uint64_t count;
    uint64_t frame_len;
    uint64_t ip_len;
    uint32_t tcp_flags;
};

/* Checks sample s and builds its key into *t.  Returns 1 when taken,
 * 0 when the fast path does not take it (the caller stops there), -1 on
 * error (exception set). */
static int
take_sample(struct batch_state *st, PyObject *s, struct taken *t)
{
    PyObject *in_o, *out_o, *p_o, *f_o, *len_o, *tos;
    const unsigned char *f;
    const struct proto_head *ph;
    unsigned long long orig_len, frame_len;
    unsigned long total_len;
    unsigned char key[KEY_MAX];
    Py_ssize_t flen, k;
    int ps;

    if (!PyTuple_Check(s) || PyTuple_GET_SIZE(s) < 6) {
        return 0;
    }
    /* Tunnel metadata (upcall.BridgeSample.tunnel, item 6): the key
     * may take a tunnel part, which Python builds. */
    if (PyTuple_GET_SIZE(s) > 6 && PyTuple_GET_ITEM(s, 6) != Py_None) {
        return 0;
    }
    in_o = PyTuple_GET_ITEM(s, 1);
    out_o = PyTuple_GET_ITEM(s, 2);
    p_o = PyTuple_GET_ITEM(s, 3);
    f_o = PyTuple_GET_ITEM(s, 4);
    len_o = PyTuple_GET_ITEM(s, 5);
    if (!PyBytes_Check(f_o) || !PyLong_Check(len_o)) {
        return 0;
    }

    /* Probability and ports repeat from one sample to the next (and are
     * often the very same objects): convert them only when they
     * change. */
    if (p_o != st->last_p) {
        unsigned long long p;

        if (!PyLong_Check(p_o)) {
            return 0;
        }
        p = PyLong_AsUnsignedLongLong(p_o);
        if (p == (unsigned long long) -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;       /* negative or huge: the general path says */
        }
        st->count = p ? UINT32_MAX_ULL / p : st->default_count;
        st->last_p = p_o;
    }
    if (in_o != st->last_in || out_o != st->last_out) {
        PyObject *h = PyObject_CallFunctionObjArgs(st->heads_for, in_o,
                                                   out_o, NULL);
        if (!h) {
            return -1;
        }
        Py_XSETREF(st->heads, h);
        /* Forget the ports until the heads are known good. */
        st->last_in = st->last_out = NULL;
        if (h != Py_None) {
            if (!PyDict_Check(h)) {
                PyErr_SetString(PyExc_TypeError,
                                "heads_for must return a dict or None");
                return -1;
            }
            if (load_heads(h, st->table) < 0) {
                return -1;
            }
        }
        st->last_in = in_o;
        st->last_out = out_o;
    }
    if (st->heads == Py_None) {
        return 0;           /* direction not sampled: counted there */
    }

    f = (const unsigned char *) PyBytes_AS_STRING(f_o);
    flen = PyBytes_GET_SIZE(f_o);
    /* Plain IPv4: EtherType 0x0800, version 4 with a 20-byte header,
     * not a later fragment (offset 0). */
    if (flen < MIN_FRAME_LEN || f[12] != 8 || f[13] != 0 || f[14] != 0x45
        || (f[20] & 0x1F) || f[21]) {
        return 0;
    }
    ps = proto_slot(f[23]);
    if (ps < 0 || !st->table[ps].valid) {
        return 0;
    }
    ph = &st->table[ps];
    /* The whole L4 header must lie inside the IP packet and the frame
     * (else the general parser zeroes the L4 fields). */
    total_len = (unsigned long) f[16] << 8 | f[17];
    if (ph->need > total_len
        || ph->need + ETH_HEADER_LEN > (unsigned long) flen) {
        return 0;
    }
    if (f[23] == 17) {
        unsigned int dport = (unsigned int) f[36] << 8 | f[37];
        if (dport == BFD_PORT || dport == BFD_ECHO_PORT) {
            return 0;
        }
    }
    orig_len = PyLong_AsUnsignedLongLong(len_o);
    if (orig_len == (unsigned long long) -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    frame_len = orig_len > (unsigned long long) flen
                ? orig_len : (unsigned long long) flen;
    if (frame_len > UINT32_MAX_ULL) {
        return 0;           /* cannot be stored; the general path says */
    }
    tos = PyTuple_GET_ITEM(st->tos_fields, f[15]);
    if (!PyBytes_Check(tos) || PyBytes_GET_SIZE(tos) > 16) {
        PyErr_SetString(PyExc_TypeError, "tos_fields: bytes items");
        return -1;
    }

    /* key = head | src MAC | dst MAC | mid | TTL, protocol
     *       | DSCP, precedence, ToS | addresses and L4 fields */
    k = 0;
    memcpy(key + k, ph->head, ph->head_len);
    k += ph->head_len;
    memcpy(key + k, f + 6, 6);
    k += 6;
    memcpy(key + k, f, 6);
    k += 6;
    memcpy(key + k, ph->mid, ph->mid_len);
    k += ph->mid_len;
    memcpy(key + k, f + 22, 2);
    k += 2;
    memcpy(key + k, PyBytes_AS_STRING(tos), PyBytes_GET_SIZE(tos));
    k += PyBytes_GET_SIZE(tos);
    memcpy(key + k, f + 26, ph->l4_end - 26);
    k += ph->l4_end - 26;

    t->key = PyBytes_FromStringAndSize((const char *) key, k);
    if (!t->key) {
        return -1;
    }
    t->count = st->count;
    t->frame_len = frame_len;
    t->ip_len = frame_len - ETH_HEADER_LEN;
    t->tcp_flags = ph->is_tcp
                   ? (uint32_t) (f[46] & 0x0F) << 8 | f[47] : 0;
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
 * wheel's tail bucket (appended last), with ``in_index`` the index.  A
 * failing allocation half-way leaves the cache as it was. */
static void
insert_undo(struct inserter *ins, PyObject *index, PyObject *key,
            int in_tail, int in_index)
{
    PyObject *type, *value, *tb, *r;

    PyErr_Fetch(&type, &value, &tb);
    if (in_index && PyDict_DelItem(index, key) < 0) {
        PyErr_Clear();
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
    int from_free, in_tail;

    if (!ins->loaded && inserter_load(ins, cache) < 0) {
        return -1;
    }
    if (PyDict_GET_SIZE(index) + 1 > ins->max_flows) {
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
        insert_undo(ins, index, t->key, 0, 0);
        return -1;
    }
    if (PyDict_SetItem(index, t->key, slot_o) < 0) {
        Py_DECREF(slot_o);
        insert_undo(ins, index, t->key, in_tail, 0);
        return -1;
    }
    Py_DECREF(slot_o);
    if (from_free) {
        if (PyList_SetSlice(ins->free, nfree - 1, nfree, NULL) < 0) {
            insert_undo(ins, index, t->key, in_tail, 1);
            return -1;
        }
    } else {
        PyObject *next = PyLong_FromSsize_t(slot + 1);
        int e = next ? PyObject_SetAttrString(cache, "_next_slot", next)
                     : -1;

        Py_XDECREF(next);
        if (e < 0) {
            insert_undo(ins, index, t->key, in_tail, 1);
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

/* Samples are looked up GROUP at a time: their keys are built first,
 * then the dictionary lookups run back to back and each found flow's
 * cache lines are prefetched, then the updates.  With 100k flows nearly
 * every lookup misses the CPU cache; in a group, the misses of
 * independent lookups overlap instead of adding up. */
#define GROUP 8

PyDoc_STRVAR(bridge_batch_doc,
"bridge_batch(samples, start, now, default_count, heads_for, tos_fields,\n"
"             cache) -> (stop, fast, new)\n"
"\n"
"Aggregate samples[start:] (a list of upcall.BridgeSample) into cache\n"
"(a flowcache.FlowCache) at now (s), as the pure-Python fast path of\n"
"Exporter.sample_bridge_batch does, up to the first sample it does not\n"
"take (no plain IPv4, or tunnel metadata).  stop: that sample's index\n"
"(len(samples) when all were taken);\n"
"fast: samples aggregated; new: flows they started.  Each sample counts\n"
"0xFFFFFFFF // its probability packets (default_count when 0).\n"
"heads_for(input_port, output_port) gives the key pieces per IP\n"
"protocol for a port pair, or None (that direction is not sampled);\n"
"tos_fields[tos] the key's DSCP, precedence and ToS bytes.");

static PyObject *
bridge_batch(PyObject *self, PyObject *args)
{
    PyObject *samples, *cache;
    Py_ssize_t start;
    double now;
    PyObject *seq = NULL, *index = NULL, *insert = NULL;
    struct batch_state st;
    struct arrays arr = {{NULL, NULL, NULL}, {{0}}, 0};
    struct taken g[GROUP];
    struct inserter ins = {0, NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0.0, 0.0};
    PyObject *tcp_end = NULL;
    Py_ssize_t i, n, n_fast = 0, n_new = 0;
    int ng = 0, ok = 0;

    (void) self;
    memset(&st, 0, sizeof st);
    if (!PyArg_ParseTuple(args, "OndKOOO:bridge_batch", &samples, &start,
                          &now, &st.default_count, &st.heads_for,
                          &st.tos_fields, &cache)) {
        return NULL;
    }
    if (!PyTuple_Check(st.tos_fields)
        || PyTuple_GET_SIZE(st.tos_fields) != 256) {
        PyErr_SetString(PyExc_TypeError, "tos_fields: a tuple of 256");
        return NULL;
    }
    seq = PySequence_Fast(samples, "samples must be a sequence");
    if (!seq) {
        return NULL;
    }
    index = PyObject_GetAttrString(cache, "index");
    insert = PyObject_GetAttrString(cache, "_insert");
    if (!index || !insert) {
        goto out;
    }
    if (!PyDict_Check(index)) {
        PyErr_SetString(PyExc_TypeError, "cache.index must be a dict");
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
            ng++;
        }
        /* 2. Look them up, up to the first new flow. */
        miss = ng;
        for (j = 0; j < ng; j++) {
            PyObject *slot_o = PyDict_GetItemWithError(index, g[j].key);
            Py_ssize_t slot;

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
            apply_update(&arr, &g[j], now);
        }
        n_fast += miss;
        if (miss < ng) {
            /* A new flow.  The samples taken after it are taken again
             * (one of them may be the same flow). */
            struct taken *t = &g[miss];
            int r = insert_new(&ins, cache, index, &arr, t, now);

            if (r < 0) {
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
                    goto out;
                }
                Py_DECREF(res);
                if (arrays_acquire(&arr, cache) < 0) {
                    goto out;
                }
            }
            n_new++;
            n_fast++;
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
    Py_XDECREF(st.heads);
    Py_XDECREF(tcp_end);
    Py_XDECREF(insert);
    Py_XDECREF(index);
    Py_DECREF(seq);
    if (!ok) {
        return NULL;
    }
    return Py_BuildValue("nnn", i, n_fast, n_new);
}

/* ------------------------------------------------------------ decoding */

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

static PyMethodDef methods[] = {
    {"bridge_batch", bridge_batch, METH_VARARGS, bridge_batch_doc},
    {"decode_hits", decode_hits, METH_VARARGS, decode_hits_doc},
    {"pack_records", pack_records, METH_VARARGS, pack_records_doc},
    {"expired_flows", expired_flows, METH_VARARGS, expired_flows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "ovs_ipfix_py._fastpath",
    "The bridge-sample hot path in C (optional; see exporter.py).",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
