/*
 * SessionAudit's usual reply in C: one statement's whole reply completes its event.
 *
 * This is SessionAudit._one_reply (pgcloak/session/auditing.py), the reference, for
 * the chunk an audited session sees after most statements: the CommandComplete and
 * ReadyForQuery of the one statement queued (with its Sync), after the ParseComplete
 * of an unnamed statement parsed in the same batch. It returns False, having changed
 * nothing, for anything else, and the Python walk handles it. In Python this took four
 * calls and a dozen objects per statement on the event loop of every audited session;
 * bench/audit.py measures what the trail costs against a 0.9x target.
 *
 * tests/unit/test_session_audit.py runs the same replies through both and compares.
 * No IO; called on the event loop with the GIL held.
 */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *template_type = NULL;   /* templates.StatementTemplate */
static PyObject *watched_type = NULL;    /* auditing._Watched */
static PyObject *sync_unit = NULL;       /* auditing._SYNC */
static PyObject *envelope_prefix = NULL; /* crypto.envelope.ENVELOPE_PREFIX (bytes) */
static PyObject *monotonic = NULL;       /* time.monotonic */
static PyObject *time_ns = NULL;         /* time.time_ns */

static PyObject *s_units, *s_returned, *s_log, *s_emit_statement, *s_clear, *s_backend;
static PyObject *s_recipe, *s_keys, *s_simple, *s_rows, *s_lookups, *s_started;

enum { PARSE_COMPLETE = '1', COMMAND_COMPLETE = 'C', READY = 'Z' };

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *tt, *wt, *su, *ep, *mo, *tn;
    if (!PyArg_ParseTuple(args, "O!O!OO!OO:configure", &PyType_Type, &tt, &PyType_Type, &wt, &su,
                          &PyBytes_Type, &ep, &mo, &tn)) {
        return NULL;
    }
    Py_INCREF(tt);
    Py_XSETREF(template_type, tt);
    Py_INCREF(wt);
    Py_XSETREF(watched_type, wt);
    Py_INCREF(su);
    Py_XSETREF(sync_unit, su);
    Py_INCREF(ep);
    Py_XSETREF(envelope_prefix, ep);
    Py_INCREF(mo);
    Py_XSETREF(monotonic, mo);
    Py_INCREF(tn);
    Py_XSETREF(time_ns, tn);
    Py_RETURN_NONE;
}

/* marks[i] as (kind, pos, end): 1 if it is a tuple of ints that fit, else 0. */
static int
mark_at(PyObject *marks, Py_ssize_t i, long *kind, Py_ssize_t *pos, Py_ssize_t *end)
{
    PyObject *mark = PyList_GET_ITEM(marks, i);
    if (!PyTuple_CheckExact(mark) || PyTuple_GET_SIZE(mark) != 4) {
        return 0;
    }
    PyObject *k = PyTuple_GET_ITEM(mark, 0), *p = PyTuple_GET_ITEM(mark, 1), *e = PyTuple_GET_ITEM(mark, 2);
    if (!PyLong_CheckExact(k) || !PyLong_CheckExact(p) || !PyLong_CheckExact(e)) {
        return 0;
    }
    *kind = PyLong_AsLong(k);
    *pos = PyLong_AsSsize_t(p);
    *end = PyLong_AsSsize_t(e);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* _tag_rows: the row count ending the CommandComplete tag at chunk[pos:end] ("SELECT 3",
 * "INSERT 0 1"), or None. New reference; NULL with an exception on error. */
static PyObject *
tag_rows(const char *chunk, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t end)
{
    /* tag = chunk[pos + 5 : end - 1], with Python's slice clamping (both are >= 0 here) */
    Py_ssize_t start = pos + 5 < size ? pos + 5 : size;
    Py_ssize_t stop = end - 1 < size ? end - 1 : size;
    if (stop < start) {
        stop = start;
    }
    Py_ssize_t digits = stop;
    while (digits > start && chunk[digits - 1] != ' ') {
        digits--;
    }
    /* count = tag[tag.rfind(b" ") + 1:]; count.isdigit(): ASCII digits, at least one */
    if (digits == stop) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = digits; i < stop; i++) {
        if (chunk[i] < '0' || chunk[i] > '9') {
            Py_RETURN_NONE;
        }
    }
    if (stop - digits <= 18) {
        long long n = 0;
        for (Py_ssize_t i = digits; i < stop; i++) {
            n = n * 10 + (chunk[i] - '0');
        }
        return PyLong_FromLongLong(n);
    }
    PyObject *text = PyUnicode_FromStringAndSize(chunk + digits, stop - digits);
    if (text == NULL) {
        return NULL;
    }
    PyObject *n = PyLong_FromUnicodeObject(text, 10);
    Py_DECREF(text);
    return n;
}

PyDoc_STRVAR(one_reply_doc,
"one_reply(audit, chunk, marks, tail_rows) -> bool\n\n"
"SessionAudit._one_reply: True when the chunk was the usual whole reply (its event\n"
"emitted); False, nothing changed, for anything else.");

static PyObject *
one_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "one_reply takes 4 arguments");
        return NULL;
    }
    if (template_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    PyObject *audit = args[0], *chunk = args[1], *marks = args[2], *tail_rows = args[3];
    if (!PyBytes_CheckExact(chunk) || !PyList_CheckExact(marks)) {
        Py_RETURN_FALSE;
    }
    Py_ssize_t count = PyList_GET_SIZE(marks);
    long kind, last, first;
    Py_ssize_t pos, end, ignored_pos, ignored_end;
    if (count == 3) {  /* the ParseComplete of an unnamed statement sent with it */
        if (!mark_at(marks, 0, &first, &ignored_pos, &ignored_end) || first != PARSE_COMPLETE ||
            !mark_at(marks, 1, &kind, &pos, &end) || !mark_at(marks, 2, &last, &ignored_pos, &ignored_end)) {
            Py_RETURN_FALSE;
        }
    } else if (count == 2) {
        if (!mark_at(marks, 0, &kind, &pos, &end) || !mark_at(marks, 1, &last, &ignored_pos, &ignored_end)) {
            Py_RETURN_FALSE;
        }
    } else {
        Py_RETURN_FALSE;
    }
    if (kind != COMMAND_COMPLETE || last != READY || pos < 0 || end < 0) {
        Py_RETURN_FALSE;
    }

    PyObject *result = NULL, *units = NULL, *head = NULL, *recipe = NULL, *simple = NULL, *extra = NULL;
    PyObject *rows = NULL, *ended = NULL, *wall = NULL, *lookups = NULL, *started = NULL, *item = NULL;
    PyObject *log = NULL, *r = NULL;
    units = PyObject_GetAttr(audit, s_units);
    if (units == NULL) {
        goto done;
    }
    Py_ssize_t queued = PyObject_Size(units);
    if (queued < 0) {
        goto done;
    }
    if (queued == 0) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    head = PySequence_GetItem(units, 0);
    if (head == NULL || (recipe = PyObject_GetAttr(head, s_recipe)) == NULL) {
        goto done;
    }
    int templated = Py_IS_TYPE(recipe, (PyTypeObject *)template_type);
    if (!templated) {
        /* A watched statement whose reply holds no protected value: nothing to record. */
        if (!Py_IS_TYPE(recipe, (PyTypeObject *)watched_type)) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        PyObject *keys = PyObject_GetAttr(head, s_keys);
        if (keys == NULL) {
            goto done;
        }
        int seen = keys != Py_None;
        Py_DECREF(keys);
        const char *prefix = PyBytes_AS_STRING(envelope_prefix);
        Py_ssize_t plen = PyBytes_GET_SIZE(envelope_prefix);
        if (seen || (plen > 0 && memmem(PyBytes_AS_STRING(chunk), (size_t)PyBytes_GET_SIZE(chunk), prefix,
                                        (size_t)plen) != NULL)) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    simple = PyObject_GetAttr(head, s_simple);
    if (simple == NULL) {
        goto done;
    }
    int is_simple = PyObject_IsTrue(simple);
    if (is_simple < 0) {
        goto done;
    }
    if (is_simple) {
        PyObject *so_far = PyObject_GetAttr(head, s_rows);
        if (so_far == NULL) {
            goto done;
        }
        int counted = so_far != Py_None;
        Py_DECREF(so_far);
        if (queued != 1 || counted) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    } else {
        if (queued != 2) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        extra = PySequence_GetItem(units, 1);
        if (extra == NULL) {
            goto done;
        }
        if (extra != sync_unit) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    /* The usual reply: from here on, the state changes. */
    if (templated) {
        rows = tag_rows(PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk), pos, end);
        lookups = rows ? PyObject_GetAttr(head, s_lookups) : NULL;
        started = lookups ? PyObject_GetAttr(head, s_started) : NULL;
        ended = started ? PyObject_CallNoArgs(monotonic) : NULL;
        wall = ended ? PyObject_CallNoArgs(time_ns) : NULL;
        item = wall ? PyTuple_Pack(7, recipe, lookups, started, ended, wall, rows, Py_None) : NULL;
        log = item ? PyObject_GetAttr(audit, s_log) : NULL;
        if (log == NULL) {
            goto done;
        }
    }
    r = PyObject_CallMethodNoArgs(units, s_clear);
    if (r == NULL || PyObject_SetAttr(audit, s_returned, tail_rows) < 0) {
        goto done;
    }
    if (templated) {
        Py_SETREF(r, PyObject_CallMethodOneArg(log, s_emit_statement, item));
        if (r == NULL) {
            goto done;
        }
    }
    result = Py_NewRef(Py_True);
done:
    Py_XDECREF(units);
    Py_XDECREF(head);
    Py_XDECREF(recipe);
    Py_XDECREF(simple);
    Py_XDECREF(extra);
    Py_XDECREF(rows);
    Py_XDECREF(lookups);
    Py_XDECREF(started);
    Py_XDECREF(ended);
    Py_XDECREF(wall);
    Py_XDECREF(item);
    Py_XDECREF(log);
    Py_XDECREF(r);
    return result;
}

PyDoc_STRVAR(reply_doc,
"reply(audit, chunk, marks, tail_rows) -> None\n\n"
"SessionAudit.reply: the usual reply by one_reply, anything else by audit.backend().");

static PyObject *
reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "reply takes 4 arguments");
        return NULL;
    }
    if (PyList_CheckExact(args[2]) && PyList_GET_SIZE(args[2]) >= 2 && PyList_GET_SIZE(args[2]) <= 3) {
        PyObject *done = one_reply(module, args, 4);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
        if (done == Py_True) {
            Py_RETURN_NONE;
        }
    }
    return PyObject_CallMethodObjArgs(args[0], s_backend, args[1], args[2], args[3], NULL);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)configure, METH_VARARGS,
     "configure(template_type, watched_type, sync_unit, envelope_prefix, monotonic, time_ns)"},
    {"one_reply", (PyCFunction)(void (*)(void))one_reply, METH_FASTCALL, one_reply_doc},
    {"reply", (PyCFunction)(void (*)(void))reply, METH_FASTCALL, reply_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgcloak.session._reply_core",
    .m_doc = "SessionAudit's usual reply in C (see auditing.py).",
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
PyInit__reply_core(void)
{
    INTERN(s_units, "_units");
    INTERN(s_returned, "_returned");
    INTERN(s_log, "log");
    INTERN(s_emit_statement, "emit_statement");
    INTERN(s_clear, "clear");
    INTERN(s_backend, "backend");
    INTERN(s_recipe, "recipe");
    INTERN(s_keys, "keys");
    INTERN(s_simple, "simple");
    INTERN(s_rows, "rows");
    INTERN(s_lookups, "lookups");
    INTERN(s_started, "started");
    return PyModule_Create(&moduledef);
}
