/*
 * The audit trail's per-event work in C: chaining the statements sessions queued.
 *
 * This is Chain.append_completed_many (pgcloak/audit/chain.py) for the usual item,
 * byte for byte: the values checked as the statement builder checks them, the
 * session's template filled in canonical order, HMAC-SHA256 over the encoded line
 * (by the chain's own keyed hashlib states: no crypto here), and one record object.
 * In Python that loop allocated a dozen objects and made fifty calls per event; the
 * trail's cost per statement is what bench/audit.py measures against a 0.9x target.
 *
 * Anything unusual (an item that is not a plain 7-tuple of the expected exact types,
 * lookups of more than one column, an odd number) is not handled here: chain_completed
 * returns its index and the Python loop, the reference, chains that one item. So this
 * file only has to agree with chain.py on the plain case, which
 * tests/unit/test_audit_chain_core.py checks against it on generated batches.
 *
 * Also here: AuditLog's intake (emit_statement, once per audited statement; log.py's
 * _Intake is its reference) and tuple_run_end (where a batch's statements end).
 *
 * Pure: no IO, no threads; it runs on the event loop with the GIL held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* SHA256_Init/Update/Final: deprecated in OpenSSL 3 for EVP, whose every digest
 * allocates contexts; here a keyed state is copied as a struct, per record. The same
 * library hashlib uses. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/crypto.h>
#include <openssl/sha.h>

/* ------------------------------------------------------------------ Record */

/* The fields of chain.ChainedRecord (a Python subclass adds its methods). */
typedef struct {
    PyObject_HEAD
    PyObject *data;
    PyObject *seq;
    PyObject *chain;
    PyObject *mac;
    PyObject *ts;
    PyObject *type;
    PyObject *line;
    PyObject *record;
} RecordObject;

/* Records made here are not tracked by the garbage collector (see chain_one): a record
 * holds text, bytes, an int and at most the dict parsed from its own line, so it is
 * never part of a cycle; a busy trail makes thousands a second, and tracking them made
 * the collector run for nothing. */
static void
Record_dealloc(RecordObject *self)
{
    Py_CLEAR(self->data);
    Py_CLEAR(self->seq);
    Py_CLEAR(self->chain);
    Py_CLEAR(self->mac);
    Py_CLEAR(self->ts);
    Py_CLEAR(self->type);
    Py_CLEAR(self->line);
    Py_CLEAR(self->record);
    /* Instances are of chain.ChainedRecord, a heap subtype: its subtype_dealloc
     * releases the type after this (this type is static). */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* T_OBJECT: a field never set reads as None. */
static PyMemberDef Record_members[] = {
    {"data", T_OBJECT, offsetof(RecordObject, data), 0, NULL},
    {"seq", T_OBJECT, offsetof(RecordObject, seq), 0, NULL},
    {"chain", T_OBJECT, offsetof(RecordObject, chain), 0, NULL},
    {"mac", T_OBJECT, offsetof(RecordObject, mac), 0, NULL},
    {"ts", T_OBJECT, offsetof(RecordObject, ts), 0, NULL},
    {"type", T_OBJECT, offsetof(RecordObject, type), 0, NULL},
    {"_line", T_OBJECT, offsetof(RecordObject, line), 0, NULL},
    {"_record", T_OBJECT, offsetof(RecordObject, record), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgcloak.audit._chain_core.Record",
    .tp_doc = "The fields of a chained audit record (see chain.ChainedRecord).",
    .tp_basicsize = sizeof(RecordObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_members = Record_members,
};

/* ------------------------------------------------------------------ Hmac */

/* HMAC-SHA256 (RFC 2104) with the key schedule done once: the inner and outer states
 * after their padded key block, copied for each message. */
typedef struct {
    PyObject_HEAD
    SHA256_CTX inner;
    SHA256_CTX outer;
} HmacObject;

static PyObject *
Hmac_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:Hmac", names, &key)) {
        return NULL;
    }
    unsigned char block[64] = {0}, pad[64];
    if (key.len > 64) {
        SHA256((const unsigned char *)key.buf, (size_t)key.len, block);
    } else {
        memcpy(block, key.buf, (size_t)key.len);
    }
    PyBuffer_Release(&key);
    HmacObject *self = (HmacObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        for (int i = 0; i < 64; i++) {
            pad[i] = block[i] ^ 0x36;
        }
        SHA256_Init(&self->inner);
        SHA256_Update(&self->inner, pad, 64);
        for (int i = 0; i < 64; i++) {
            pad[i] = block[i] ^ 0x5c;
        }
        SHA256_Init(&self->outer);
        SHA256_Update(&self->outer, pad, 64);
    }
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    return (PyObject *)self;
}

static void
Hmac_dealloc(HmacObject *self)
{
    OPENSSL_cleanse(&self->inner, sizeof self->inner);
    OPENSSL_cleanse(&self->outer, sizeof self->outer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The MAC of text[0:n] as 64 lowercase hex digits into out. */
static void
hmac_hex(HmacObject *h, const char *text, size_t n, char *out)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx = h->inner;
    SHA256_Update(&ctx, text, n);
    SHA256_Final(digest, &ctx);
    ctx = h->outer;
    SHA256_Update(&ctx, digest, sizeof digest);
    SHA256_Final(digest, &ctx);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        out[2 * i] = hex[digest[i] >> 4];
        out[2 * i + 1] = hex[digest[i] & 15];
    }
    OPENSSL_cleanse(&ctx, sizeof ctx);
}

static PyObject *
Hmac_hexdigest(HmacObject *self, PyObject *arg)
{
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    char out[64];
    hmac_hex(self, (const char *)data.buf, (size_t)data.len, out);
    PyBuffer_Release(&data);
    return PyUnicode_FromStringAndSize(out, 64);
}

static PyMethodDef Hmac_methods[] = {
    {"hexdigest", (PyCFunction)Hmac_hexdigest, METH_O, "hexdigest(data) -> the MAC of data, hex"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HmacType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgcloak.audit._chain_core.Hmac",
    .tp_doc = "Hmac(key): HMAC-SHA256 with the key schedule done once.",
    .tp_basicsize = sizeof(HmacObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Hmac_new,
    .tp_dealloc = (destructor)Hmac_dealloc,
    .tp_methods = Hmac_methods,
};

/* ------------------------------------------------------------------ configuration */

/* Set once by configure() from chain.py: what the Python loop uses too. */
static PyTypeObject *record_type = NULL;   /* chain.ChainedRecord */
static PyObject *invalid_error = NULL;     /* events.InvalidEventError */
static PyObject *key_ids_ok = NULL;        /* events._key_ids_ok: key ids already checked */
static PyObject *key_json = NULL;          /* chain._KEY_JSON: key id -> its JSON text */
static PyObject *failed_reason = NULL;     /* chain.FAILED_REASON_JSON */

static PyObject *s_parts, *s_statement, *s_draw;
static PyObject *s_next_seq, *s_prev, *s_since_seal, *s_ids, *s_pool, *s_pos;
static PyObject *s_chain_json, *s_chain_id, *s_hmac;

/* The date and time of the last second formatted ("2024-05-01T12:00:00."). */
static int cached_second_set = 0;
static long long cached_second = 0;
static char cached_second_text[64];
static Py_ssize_t cached_second_len = 0;

/* ------------------------------------------------------------------ Intake */

/* AuditLog's emit_statement, the call a session makes once per audited statement: its
 * usual case (room in the queue and nobody to wake) without a Python frame, which cost
 * more than the rest of the call. Anything else goes to ``slow`` (the log's
 * _enqueue_carefully). log.py's _Intake is the reference, for where this is not built. */
typedef struct {
    PyObject_HEAD
    PyObject *queue;
    PyObject *append;
    PyObject *slow;
    Py_ssize_t fast_below;
    Py_ssize_t emitted;
    vectorcallfunc vectorcall;
} IntakeObject;

static PyObject *
Intake_vectorcall(PyObject *self_obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    IntakeObject *self = (IntakeObject *)self_obj;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_SetString(PyExc_TypeError, "emit_statement takes one positional argument");
        return NULL;
    }
    Py_ssize_t depth = PyObject_Size(self->queue);
    if (depth < 0) {
        return NULL;
    }
    if (depth < self->fast_below) {
        self->emitted++;
        return PyObject_CallOneArg(self->append, args[0]);
    }
    return PyObject_CallOneArg(self->slow, args[0]);
}

static int
Intake_init(IntakeObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *queue, *slow;
    static char *names[] = {"queue", "slow", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Intake", names, &queue, &slow)) {
        return -1;
    }
    PyObject *append = PyObject_GetAttrString(queue, "append");
    if (append == NULL) {
        return -1;
    }
    Py_XSETREF(self->queue, Py_NewRef(queue));
    Py_XSETREF(self->append, append);
    Py_XSETREF(self->slow, Py_NewRef(slow));
    self->fast_below = 0;
    self->emitted = 0;
    return 0;
}

static PyObject *
Intake_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    IntakeObject *self = (IntakeObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->vectorcall = Intake_vectorcall;
    }
    return (PyObject *)self;
}

static int
Intake_traverse(IntakeObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->queue);
    Py_VISIT(self->append);
    Py_VISIT(self->slow);
    return 0;
}

static int
Intake_clear(IntakeObject *self)
{
    Py_CLEAR(self->queue);
    Py_CLEAR(self->append);
    Py_CLEAR(self->slow);
    return 0;
}

static void
Intake_dealloc(IntakeObject *self)
{
    PyObject_GC_UnTrack(self);
    Intake_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Intake_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return PyVectorcall_Call(self, args, kwargs);
}

static PyMemberDef Intake_members[] = {
    {"queue", T_OBJECT, offsetof(IntakeObject, queue), READONLY, "the log's queue"},
    {"slow", T_OBJECT, offsetof(IntakeObject, slow), READONLY, "called for an item the fast path does not take"},
    {"fast_below", T_PYSSIZET, offsetof(IntakeObject, fast_below), 0,
     "items are appended directly while the queue holds fewer than this"},
    {"emitted", T_PYSSIZET, offsetof(IntakeObject, emitted), 0, "items taken by the fast path (and counted by slow)"},
    {NULL},
};

static PyTypeObject IntakeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgcloak.audit._chain_core.Intake",
    .tp_doc = "Intake(queue, slow): AuditLog's emit_statement (see log.py's _Intake).",
    .tp_basicsize = sizeof(IntakeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(IntakeObject, vectorcall),
    .tp_call = Intake_call,
    .tp_new = Intake_new,
    .tp_init = (initproc)Intake_init,
    .tp_dealloc = (destructor)Intake_dealloc,
    .tp_traverse = (traverseproc)Intake_traverse,
    .tp_clear = (inquiry)Intake_clear,
    .tp_members = Intake_members,
};

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *rt, *ie, *ko, *kj, *fr;
    if (!PyArg_ParseTuple(args, "O!OO!O!U:configure", &PyType_Type, &rt, &ie,
                          &PySet_Type, &ko, &PyDict_Type, &kj, &fr)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)rt, &RecordType) || !PyType_IS_GC((PyTypeObject *)rt)) {
        PyErr_SetString(PyExc_TypeError, "the record type must be a Python subclass of Record");
        return NULL;
    }
    Py_INCREF(rt);
    Py_XSETREF(record_type, (PyTypeObject *)rt);
    Py_INCREF(ie);
    Py_XSETREF(invalid_error, ie);
    Py_INCREF(ko);
    Py_XSETREF(key_ids_ok, ko);
    Py_INCREF(kj);
    Py_XSETREF(key_json, kj);
    Py_INCREF(fr);
    Py_XSETREF(failed_reason, fr);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ helpers */

/* A growable byte buffer for one line. */
typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more) {
        cap *= 2;
    }
    char *grown = PyMem_Realloc(b->buf, (size_t)cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->buf = grown;
    b->cap = cap;
    return 0;
}

static int
buf_add(Buf *b, const char *s, Py_ssize_t n)
{
    if (buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->buf + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

/* The UTF-8 of a str (cached on the object by CPython); raises UnicodeEncodeError for
 * a lone surrogate, as str.encode does. */
static int
buf_add_str(Buf *b, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) {
        return -1;
    }
    return buf_add(b, u, n);
}

/* A blind-index value as events.LOOKUP_VALUE_PATTERN takes it: [A-Za-z0-9_-]{16,128}. */
static int
lookup_value_ok(PyObject *v)
{
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) {
        return 0;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    if (n < 16 || n > 128) {
        return 0;
    }
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(v);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS1 c = p[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-')) {
            return 0;
        }
    }
    return 1;
}

/* The lookups' JSON, for the usual case: one column whose key id was checked before
 * (it is in events._key_ids_ok, and chain._KEY_JSON holds its text), with one or more
 * blind-index values. 1: added; 0: not the usual case (the caller leaves the item to
 * Python); -1: invalid values (an InvalidEventError is set); -2: another error. */
static int
add_lookups(Buf *b, PyObject *lookups)
{
    if (PyDict_GET_SIZE(lookups) != 1) {
        return 0;
    }
    Py_ssize_t i = 0;
    PyObject *key, *values;
    if (!PyDict_Next(lookups, &i, &key, &values)) {
        return 0;
    }
    if (!PyUnicode_CheckExact(key) || !PyList_CheckExact(values) || PyList_GET_SIZE(values) == 0) {
        return 0;
    }
    int known = PySet_Contains(key_ids_ok, key);
    if (known < 0) {
        return -2;
    }
    PyObject *quoted = known ? PyDict_GetItemWithError(key_json, key) : NULL;
    if (quoted == NULL) {
        return PyErr_Occurred() ? -2 : 0;
    }
    if (!PyUnicode_CheckExact(quoted)) {
        return 0;
    }
    /* Text that cannot be encoded (a lone surrogate): Python refuses it, in its order. */
    Py_ssize_t quoted_len;
    const char *quoted_utf8 = PyUnicode_AsUTF8AndSize(quoted, &quoted_len);
    if (quoted_utf8 == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            return -2;
        }
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    for (Py_ssize_t j = 0; j < n; j++) {
        if (!lookup_value_ok(PyList_GET_ITEM(values, j))) {
            PyErr_SetString(invalid_error, "statement event: invalid value for field 'lookups'");
            return -1;
        }
    }
    if (buf_add(b, "{", 1) < 0 || buf_add(b, quoted_utf8, quoted_len) < 0 || buf_add(b, ":[", 2) < 0) {
        return -2;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *v = PyList_GET_ITEM(values, j);
        if (buf_add(b, j ? ",\"" : "\"", j ? 2 : 1) < 0 ||
            buf_add(b, (const char *)PyUnicode_1BYTE_DATA(v), PyUnicode_GET_LENGTH(v)) < 0 ||
            buf_add(b, "\"", 1) < 0) {
            return -2;
        }
    }
    return buf_add(b, "]}", 2) < 0 ? -2 : 1;
}

/* "2024-05-01T12:00:00." for the second ``sec`` (as time.strftime(..., time.gmtime(sec))). */
static int
second_text(long long sec)
{
    if (cached_second_set && sec == cached_second) {
        return 0;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    if ((long long)t != sec || gmtime_r(&t, &tm) == NULL) {
        PyErr_SetString(PyExc_OverflowError, "timestamp out of range for platform time_t");
        return -1;
    }
    char text[sizeof cached_second_text];
    size_t n = strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S.", &tm);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "timestamp cannot be formatted");
        return -1;
    }
    memcpy(cached_second_text, text, n);
    cached_second = sec;
    cached_second_len = (Py_ssize_t)n;
    cached_second_set = 1;
    return 0;
}

/* Decimal digits of v into out (no terminator); the count. snprintf's format parsing
 * was a tenth of this loop's time. */
static int
fmt_ll(char *out, long long v)
{
    char tmp[24];
    int n = 0, k = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) {
        out[k++] = '-';
    }
    while (n) {
        out[k++] = tmp[--n];
    }
    return k;
}

/* repr(us / 1000.0) for a whole number of microseconds 0 <= us < 10**15 (a duration
 * under 1e12 ms, as checked): the decimal us / 1000 itself, trailing zeros dropped but
 * one. It has at most 15 significant digits, so it is the shortest text that reads back
 * as that double (no two such decimals share a double), which is what repr writes, in
 * fixed notation below 1e16. PyOS_double_to_string's exact algorithm cost more than
 * the rest of the line (tests/unit/test_audit_chain_core.py compares the two). */
static int
fmt_micros(char *out, long long us)
{
    int k = fmt_ll(out, us / 1000);
    int frac = (int)(us % 1000);
    out[k++] = '.';
    out[k++] = (char)('0' + frac / 100);
    if (frac % 100) {
        out[k++] = (char)('0' + frac / 10 % 10);
        if (frac % 10) {
            out[k++] = (char)('0' + frac % 10);
        }
    }
    return k;
}

static long long
floor_div(long long a, long long b)
{
    long long q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

/* The item's values if it is a plain Completed tuple: 1 (it->parts is then a new
 * reference), 0 (not plain: left to Python) or -1 (an error). */
typedef struct {
    PyObject *parts;    /* borrowed from the template (kept alive by the item) */
    PyObject *lookups;
    double started, ended;
    long long wall_ns;
    PyObject *rows;
    PyObject *sqlstate;
} Item;

static int
plain_item(PyObject *item, Item *it)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 7) {
        return 0;
    }
    PyObject *template = PyTuple_GET_ITEM(item, 0);
    /* A reference of our own: Python code runs before the parts are used (an event id
     * draw), and nothing stops it from giving the template other parts. */
    PyObject *parts = PyObject_GetAttr(template, s_parts);
    if (parts == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    int plain = PyTuple_CheckExact(parts) && PyTuple_GET_SIZE(parts) == 11;
    for (Py_ssize_t i = 0; plain && i < 11; i++) {
        plain = PyUnicode_CheckExact(PyTuple_GET_ITEM(parts, i));
    }
    if (plain) {
        /* The line's last byte, its closing brace, is where the mac goes. */
        PyObject *last = PyTuple_GET_ITEM(parts, 10);
        Py_ssize_t last_len = PyUnicode_GET_LENGTH(last);
        plain = last_len > 0 && PyUnicode_READ_CHAR(last, last_len - 1) == '}';
    }
    if (!plain) {
        Py_DECREF(parts);
        return 0;
    }
    PyObject *lookups = PyTuple_GET_ITEM(item, 1);
    PyObject *started = PyTuple_GET_ITEM(item, 2);
    PyObject *ended = PyTuple_GET_ITEM(item, 3);
    PyObject *wall = PyTuple_GET_ITEM(item, 4);
    PyObject *rows = PyTuple_GET_ITEM(item, 5);
    PyObject *sqlstate = PyTuple_GET_ITEM(item, 6);
    if ((lookups != Py_None && !PyDict_CheckExact(lookups)) || !PyFloat_CheckExact(started) ||
        !PyFloat_CheckExact(ended) || !PyLong_CheckExact(wall)) {
        Py_DECREF(parts);
        return 0;
    }
    int overflow = 0;
    long long ns = PyLong_AsLongLongAndOverflow(wall, &overflow);
    /* A row count past 64 bits is left to Python (str() of any int). */
    if (!overflow && rows != Py_None && PyLong_CheckExact(rows)) {
        (void)PyLong_AsLongLongAndOverflow(rows, &overflow);
    }
    if (overflow) {
        Py_DECREF(parts);
        return 0;
    }
    it->parts = parts;
    it->lookups = lookups;
    it->started = PyFloat_AS_DOUBLE(started);
    it->ended = PyFloat_AS_DOUBLE(ended);
    it->wall_ns = ns;
    it->rows = rows;
    it->sqlstate = sqlstate;
    return 1;
}

/* A SQLSTATE as events.sqlstate_ok takes it: five digits or capital letters. */
static int
sqlstate_ok(PyObject *v)
{
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v) || PyUnicode_GET_LENGTH(v) != 5) {
        return 0;
    }
    const Py_UCS1 *p = PyUnicode_1BYTE_DATA(v);
    for (int i = 0; i < 5; i++) {
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'A' && p[i] <= 'Z'))) {
            return 0;
        }
    }
    return 1;
}

/* The chain's state, read from and written back to the Chain object. */
typedef struct {
    long long seq;
    long long first;
    PyObject *prev;        /* str: the last MAC (a new reference) */
    PyObject *pool;        /* str: event id hex digits (a new reference) */
    Py_ssize_t pos;
    PyObject *chain_json;  /* borrowed via the chain below */
    PyObject *chain_id;
    PyObject *hmac;        /* the chain's Hmac */
    PyObject *ids;
} State;

/* Chain one plain item onto out. 1: chained; 0: refused (its exception appended to
 * refused); 2: not the plain case after all (left to Python, nothing changed);
 * -1: an error that ends the batch. ``b`` and ``lk`` are scratch buffers. */
static int
chain_one(State *st, Item *it, Buf *b, Buf *lk, PyObject *out, PyObject *refused)
{
    PyObject *parts = it->parts;
    char small[32], rows_text[32], ts[96];
    const char *counted = "null";
    int failed = 0, has_lookups = 0;
    b->len = 0;
    lk->len = 0;

#define REFUSE(msg)                                   \
    do {                                              \
        PyErr_SetString(invalid_error, (msg));        \
        goto refuse;                                  \
    } while (0)

    /* Checked in the order chain.py checks them: the error names the first bad field. */
    if (it->lookups != Py_None && PyDict_GET_SIZE(it->lookups) > 0) {
        int found = add_lookups(lk, it->lookups);
        if (found == -1) {
            goto refuse;
        }
        if (found == -2) {
            return -1;
        }
        if (found == 0) {
            return 2;
        }
        has_lookups = 1;
    }
    double ms = (it->ended - it->started) * 1000.0;
    if (!(ms >= 0.0 && ms < 1e12)) {  /* also refuses NaN */
        REFUSE("statement event: invalid value for field 'duration_ms'");
    }
    if (it->sqlstate == Py_None) {
        if (PyLong_CheckExact(it->rows)) {
            long long r = PyLong_AsLongLong(it->rows);  /* fits: plain_item checked */
            if (r < 0) {
                REFUSE("statement event: invalid value for field 'rows'");
            }
            rows_text[fmt_ll(rows_text, r)] = '\0';
            counted = rows_text;
        } else if (it->rows != Py_None) {
            REFUSE("statement event: invalid value for field 'rows'");
        }
    } else if (sqlstate_ok(it->sqlstate)) {
        failed = 1;  /* failed in PostgreSQL: no rows */
    } else {
        REFUSE("statement event: invalid value for field 'sqlstate'");
    }

    long long us = floor_div(it->wall_ns, 1000);
    long long sec = floor_div(us, 1000000);
    if (second_text(sec) < 0) {
        goto refuse;
    }
    memcpy(ts, cached_second_text, (size_t)cached_second_len);
    int ts_len = (int)cached_second_len;
    long long micro = us - sec * 1000000;  /* 0 <= micro < 1e6: floor division */
    for (int i = 5; i >= 0; i--) {
        ts[ts_len + i] = (char)('0' + micro % 10);
        micro /= 10;
    }
    ts[ts_len + 6] = 'Z';
    ts_len += 7;

    /* The event id: the next 32 hex digits of the pool, drawn again when used up. */
    if (st->pos >= PyUnicode_GET_LENGTH(st->pool)) {
        PyObject *pool = PyObject_CallMethodNoArgs(st->ids, s_draw);
        if (pool == NULL) {
            return -1;
        }
        if (!PyUnicode_CheckExact(pool) || !PyUnicode_IS_ASCII(pool)) {
            Py_DECREF(pool);
            PyErr_SetString(PyExc_RuntimeError, "event ids must be hex digits");
            return -1;
        }
        Py_SETREF(st->pool, pool);
        st->pos = 0;
    }
    Py_ssize_t id_len = PyUnicode_GET_LENGTH(st->pool) - st->pos;
    if (id_len > 32) {
        id_len = 32;
    }
    const char *id = (const char *)PyUnicode_1BYTE_DATA(st->pool) + st->pos;

    /* duration: repr(round(ms * 1000.0) / 1000.0), whole microseconds. round() is
     * round-half-even and returns an int, so no negative zero. */
    double x = ms * 1000.0;
    double whole = round(x);
    if (fabs(x - whole) == 0.5) {
        whole = 2.0 * round(x / 2.0);
    }
    char duration[32];
    int duration_len = fmt_micros(duration, (long long)whole);
    int n = fmt_ll(small, st->seq);

    /* The line: the template's parts and the ten values, in canonical order. */
    int err = buf_add_str(b, PyTuple_GET_ITEM(parts, 0)) < 0
        || buf_add_str(b, st->chain_json) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 1)) < 0
        || buf_add(b, duration, duration_len) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 2)) < 0
        || buf_add(b, id, id_len) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 3)) < 0
        || (has_lookups ? buf_add(b, lk->buf, lk->len) : buf_add(b, "{}", 2)) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 4)) < 0
        || buf_add_str(b, st->prev) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 5)) < 0
        || (failed ? buf_add_str(b, failed_reason) : buf_add(b, "null", 4)) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 6)) < 0
        || buf_add(b, counted, (Py_ssize_t)strlen(counted)) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 7)) < 0
        || buf_add(b, small, n) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 8)) < 0
        || (failed ? buf_add(b, "\"", 1) < 0
                         || buf_add(b, (const char *)PyUnicode_1BYTE_DATA(it->sqlstate), 5) < 0
                         || buf_add(b, "\"", 1) < 0
                   : buf_add(b, "null", 4) < 0)
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 9)) < 0
        || buf_add(b, ts, ts_len) < 0
        || buf_add_str(b, PyTuple_GET_ITEM(parts, 10)) < 0;
    /* As in Python, the event id is used once the text is made, even if it cannot be
     * encoded. */
    st->pos += 32;
    if (err) {
        /* Text that is not Unicode (a lone surrogate) refuses the item, as in Python. */
        goto refuse;
    }
    /* data: the line without its closing brace, then ,"mac":"<mac>"} and a newline. */
    Py_ssize_t size = b->len - 1 + 8 + 64 + 3;
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL) {
        return -1;
    }
    char *d = PyBytes_AS_STRING(data);
    memcpy(d, b->buf, (size_t)(b->len - 1));
    d += b->len - 1;
    memcpy(d, ",\"mac\":\"", 8);
    hmac_hex((HmacObject *)st->hmac, b->buf, (size_t)b->len, d + 8);
    memcpy(d + 72, "\"}\n", 3);
    PyObject *mac = PyUnicode_FromStringAndSize(d + 8, 64);
    if (mac == NULL) {
        Py_DECREF(data);
        return -1;
    }

    PyObject *seq = PyLong_FromLongLong(st->seq);
    PyObject *ts_obj = PyUnicode_FromStringAndSize(ts, ts_len);
    RecordObject *rec = seq && ts_obj ? (RecordObject *)record_type->tp_alloc(record_type, 0) : NULL;
    if (rec == NULL) {
        Py_XDECREF(seq);
        Py_XDECREF(ts_obj);
        Py_DECREF(data);
        Py_DECREF(mac);
        return -1;
    }
    /* ChainedRecord is a heap type, so its instances are tracked by the collector; these
     * hold only text, bytes and an int, never a cycle: untracked, like a tuple of such. */
    PyObject_GC_UnTrack(rec);
    rec->data = data;
    rec->seq = seq;
    Py_INCREF(st->chain_id);
    rec->chain = st->chain_id;
    Py_INCREF(mac);
    rec->mac = mac;
    rec->ts = ts_obj;
    Py_INCREF(s_statement);
    rec->type = s_statement;
    int appended = PyList_Append(out, (PyObject *)rec);
    Py_DECREF(rec);
    if (appended < 0) {
        Py_DECREF(mac);
        return -1;
    }
    Py_SETREF(st->prev, mac);
    st->seq += 1;
    return 1;

refuse:
    {
        /* As the Python loop: these refuse the item, anything else ends the batch. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (!PyErr_GivenExceptionMatches(type, PyExc_TypeError) &&
            !PyErr_GivenExceptionMatches(type, PyExc_ValueError) &&
            !PyErr_GivenExceptionMatches(type, PyExc_AttributeError) &&
            !PyErr_GivenExceptionMatches(type, PyExc_OverflowError)) {
            PyErr_Restore(type, value, tb);
            return -1;
        }
        if (tb != NULL) {
            PyException_SetTraceback(value, tb);
        }
        int appended = PyList_Append(refused, value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return appended < 0 ? -1 : 0;
    }
#undef REFUSE
}

/* Read a chain's state; 0 ok, 1 not one for C (left to Python), -1 error. */
static int
read_state(PyObject *chain, State *st)
{
    memset(st, 0, sizeof *st);
    PyObject *seq = PyObject_GetAttr(chain, s_next_seq);
    if (seq == NULL) {
        return -1;
    }
    int overflow = 0;
    st->seq = PyLong_AsLongLongAndOverflow(seq, &overflow);
    Py_DECREF(seq);
    if (st->seq == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || st->seq < 0) {
        return 1;  /* a sequence number past 64 bits: Python's */
    }
    st->first = st->seq;
    if ((st->prev = PyObject_GetAttr(chain, s_prev)) == NULL ||
        (st->ids = PyObject_GetAttr(chain, s_ids)) == NULL ||
        (st->chain_json = PyObject_GetAttr(chain, s_chain_json)) == NULL ||
        (st->chain_id = PyObject_GetAttr(chain, s_chain_id)) == NULL ||
        (st->hmac = PyObject_GetAttr(chain, s_hmac)) == NULL) {
        return -1;
    }
    if (!PyObject_TypeCheck(st->hmac, &HmacType)) {
        PyErr_SetString(PyExc_TypeError, "the chain's _hmac must be an Hmac");
        return -1;
    }
    if (!PyUnicode_CheckExact(st->prev) || !PyUnicode_IS_ASCII(st->prev) ||
        !PyUnicode_CheckExact(st->chain_json)) {
        PyErr_SetString(PyExc_TypeError, "a chain's prev and id must be text");
        return -1;
    }
    st->pool = PyObject_GetAttr(st->ids, s_pool);
    PyObject *pos = PyObject_GetAttr(st->ids, s_pos);
    if (st->pool == NULL || pos == NULL) {
        Py_XDECREF(pos);
        return -1;
    }
    st->pos = PyLong_AsSsize_t(pos);
    Py_DECREF(pos);
    if (st->pos == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (st->pos < 0) {
        PyErr_SetString(PyExc_ValueError, "the event id pool's position is negative");
        return -1;
    }
    if (!PyUnicode_CheckExact(st->pool) || !PyUnicode_IS_ASCII(st->pool)) {
        PyErr_SetString(PyExc_TypeError, "event ids must be hex digits");
        return -1;
    }
    return 0;
}

/* Write the state back (also after an error: the chain is where ``out`` ends). */
static int
write_state(PyObject *chain, State *st)
{
    int err = 0;
    PyObject *etype, *evalue, *etb;
    PyErr_Fetch(&etype, &evalue, &etb);
    PyObject *seq = PyLong_FromLongLong(st->seq);
    PyObject *pos = PyLong_FromSsize_t(st->pos);
    PyObject *since = PyObject_GetAttr(chain, s_since_seal);
    PyObject *count = PyLong_FromLongLong(st->seq - st->first);
    PyObject *total = since && count ? PyNumber_Add(since, count) : NULL;
    if (!seq || !pos || !total || PyObject_SetAttr(chain, s_next_seq, seq) < 0 ||
        PyObject_SetAttr(chain, s_prev, st->prev) < 0 || PyObject_SetAttr(chain, s_since_seal, total) < 0 ||
        PyObject_SetAttr(st->ids, s_pool, st->pool) < 0 || PyObject_SetAttr(st->ids, s_pos, pos) < 0) {
        err = -1;
    }
    Py_XDECREF(seq);
    Py_XDECREF(pos);
    Py_XDECREF(since);
    Py_XDECREF(count);
    Py_XDECREF(total);
    if (etype != NULL) {
        /* The first error is the one to report. */
        PyErr_Clear();
        PyErr_Restore(etype, evalue, etb);
        err = -1;
    }
    return err;
}

static void
free_state(State *st)
{
    Py_XDECREF(st->prev);
    Py_XDECREF(st->pool);
    Py_XDECREF(st->ids);
    Py_XDECREF(st->chain_json);
    Py_XDECREF(st->chain_id);
    Py_XDECREF(st->hmac);
}

PyDoc_STRVAR(chain_completed_doc,
"chain_completed(chain, items, start, out, refused) -> int\n\n"
"Chain items[start:] onto out (records) and refused (exceptions) as\n"
"Chain.append_completed_many does, until an item that is not the plain case:\n"
"return its index (len(items) when all were chained), chain state written back.");

static PyObject *
chain_completed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "chain_completed takes 5 arguments");
        return NULL;
    }
    PyObject *chain = args[0], *items = args[1], *out = args[3], *refused = args[4];
    if (record_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    if (!PyList_CheckExact(items) || !PyList_CheckExact(out) || !PyList_CheckExact(refused)) {
        PyErr_SetString(PyExc_TypeError, "items, out and refused must be lists");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[2]);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "start must not be negative");
        return NULL;
    }
    State st;
    int state = read_state(chain, &st);
    if (state != 0) {
        free_state(&st);
        return state < 0 ? NULL : PyLong_FromSsize_t(i);
    }
    Buf b = {0}, lk = {0};
    int failed = 0;
    for (; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        Py_INCREF(item);
        Item it;
        int rc = plain_item(item, &it);
        if (rc == 1) {
            rc = st.seq < LLONG_MAX ? chain_one(&st, &it, &b, &lk, out, refused) : 2;
            Py_DECREF(it.parts);
        } else if (rc == 0) {
            rc = 2;
        }
        Py_DECREF(item);
        if (rc == 2) {
            break;
        }
        if (rc < 0) {
            failed = 1;
            break;
        }
    }
    PyMem_Free(b.buf);
    PyMem_Free(lk.buf);
    int written = write_state(chain, &st);
    free_state(&st);
    if (failed || written < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(i);
}

PyDoc_STRVAR(tuple_run_end_doc,
"tuple_run_end(items, start) -> int\n\n"
"The index of the first item of the list at or after start that is not a tuple\n"
"(len(items) if none is): where a run of queued statements ends.");

/* The writer's batches are all statements (tuples) but for a seal or a rare dict event:
 * a Python loop finding where their run ends cost more than chaining's bookkeeping. */
static PyObject *
tuple_run_end(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tuple_run_end(items: list, start: int)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "start must not be negative");
        return NULL;
    }
    PyObject *items = args[0];
    while (i < PyList_GET_SIZE(items) && PyTuple_CheckExact(PyList_GET_ITEM(items, i))) {
        i++;
    }
    return PyLong_FromSsize_t(i < PyList_GET_SIZE(items) ? i : PyList_GET_SIZE(items));
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)configure, METH_VARARGS,
     "configure(record_type, invalid_error, key_ids_ok, key_json, failed_reason)"},
    {"chain_completed", (PyCFunction)(void (*)(void))chain_completed, METH_FASTCALL, chain_completed_doc},
    {"tuple_run_end", (PyCFunction)(void (*)(void))tuple_run_end, METH_FASTCALL, tuple_run_end_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgcloak.audit._chain_core",
    .m_doc = "The audit chain's per-event loop in C (see chain.py).",
    .m_size = -1,
    .m_methods = methods,
};

#define INTERN(var, text)                              \
    do {                                               \
        var = PyUnicode_InternFromString(text);        \
        if (var == NULL) {                             \
            return NULL;                               \
        }                                              \
    } while (0)

PyMODINIT_FUNC
PyInit__chain_core(void)
{
    INTERN(s_parts, "parts");
    INTERN(s_statement, "statement");
    INTERN(s_draw, "draw");
    INTERN(s_next_seq, "next_seq");
    INTERN(s_prev, "prev");
    INTERN(s_since_seal, "since_seal");
    INTERN(s_ids, "_ids");
    INTERN(s_pool, "pool");
    INTERN(s_pos, "pos");
    INTERN(s_chain_json, "_chain_json");
    INTERN(s_chain_id, "chain_id");
    INTERN(s_hmac, "_hmac");
    if (PyType_Ready(&RecordType) < 0 || PyType_Ready(&HmacType) < 0 || PyType_Ready(&IntakeType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(m, "Record", (PyObject *)&RecordType) < 0) {
        Py_DECREF(&RecordType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HmacType);
    if (PyModule_AddObject(m, "Hmac", (PyObject *)&HmacType) < 0) {
        Py_DECREF(&HmacType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&IntakeType);
    if (PyModule_AddObject(m, "Intake", (PyObject *)&IntakeType) < 0) {
        Py_DECREF(&IntakeType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
