/*
 * SessionAudit's per-statement calls in C: Query, Bind, Execute and Sync queued, and the
 * usual reply (one statement's whole reply) completing its event.
 *
 * The Python in pgcloak/session/auditing.py is the reference: _one_reply, _query_py,
 * _bind_py, _execute_py, _sync_py. The usual reply is the chunk an audited session sees after most
 * statements: the CommandComplete and ReadyForQuery of the one statement queued (with
 * its Sync), after the ParseComplete of an unnamed statement parsed in the same batch;
 * anything else goes to the Python walk, nothing changed. SessionAudit derives from
 * Core, whose struct holds the state these calls change (the queue, the portals, the
 * counters), so they read it without attribute lookups by name, and the session calls
 * them as methods, not through partials: they run for every statement of every audited
 * session, and bench/audit.py measures what the trail costs against a 0.9x target.
 *
 * tests/unit/test_session_audit.py runs the same input through both and compares.
 * No IO; called on the event loop with the GIL held.
 */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

/* ------------------------------------------------------------------ Unit */

/* The fields of auditing._Unit (a Python subclass adds nothing but its __init__): a
 * Query or an Execute waiting for the server's reply. */
typedef struct {
    PyObject_HEAD
    PyObject *recipe;
    PyObject *lookups;
    PyObject *simple;
    PyObject *plan;
    PyObject *text;
    PyObject *keys;
    PyObject *started;
    PyObject *rows;
    PyObject *sqlstate;
} UnitObject;

static int
Unit_traverse(UnitObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recipe);
    Py_VISIT(self->lookups);
    Py_VISIT(self->simple);
    Py_VISIT(self->plan);
    Py_VISIT(self->text);
    Py_VISIT(self->keys);
    Py_VISIT(self->started);
    Py_VISIT(self->rows);
    Py_VISIT(self->sqlstate);
    return 0;
}

static int
Unit_clear(UnitObject *self)
{
    Py_CLEAR(self->recipe);
    Py_CLEAR(self->lookups);
    Py_CLEAR(self->simple);
    Py_CLEAR(self->plan);
    Py_CLEAR(self->text);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->started);
    Py_CLEAR(self->rows);
    Py_CLEAR(self->sqlstate);
    return 0;
}

static void
Unit_dealloc(UnitObject *self)
{
    /* Instances are of auditing._Unit, a heap subtype: its subtype_dealloc untracks
     * before and releases the type after this (this type is static). */
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, Unit_dealloc)  /* units nested deep: no recursion */
    Unit_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

/* T_OBJECT_EX: a field never set raises AttributeError, as a slot does. */
static PyMemberDef Unit_members[] = {
    {"recipe", T_OBJECT_EX, offsetof(UnitObject, recipe), 0, NULL},
    {"lookups", T_OBJECT_EX, offsetof(UnitObject, lookups), 0, NULL},
    {"simple", T_OBJECT_EX, offsetof(UnitObject, simple), 0, NULL},
    {"plan", T_OBJECT_EX, offsetof(UnitObject, plan), 0, NULL},
    {"text", T_OBJECT_EX, offsetof(UnitObject, text), 0, NULL},
    {"keys", T_OBJECT_EX, offsetof(UnitObject, keys), 0, NULL},
    {"started", T_OBJECT_EX, offsetof(UnitObject, started), 0, NULL},
    {"rows", T_OBJECT_EX, offsetof(UnitObject, rows), 0, NULL},
    {"sqlstate", T_OBJECT_EX, offsetof(UnitObject, sqlstate), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject UnitType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgcloak.session._reply_core.Unit",
    .tp_doc = "The fields of a statement waiting for its reply (see auditing._Unit).",
    .tp_basicsize = sizeof(UnitObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Unit_dealloc,
    .tp_traverse = (traverseproc)Unit_traverse,
    .tp_clear = (inquiry)Unit_clear,
    .tp_members = Unit_members,
};

/* ------------------------------------------------------------------ Core */

/* SessionAudit's per-statement state (auditing.SessionAudit derives from this type): the
 * calls below read and change it in place, not through attribute lookups by name, and
 * the session calls them as methods of its type, not through partials. The fields hold
 * what SessionAudit.__init__ puts there: a deque and plain dicts (a dict of another type
 * is refused with TypeError, where Python would take a subclass). */
typedef struct {
    PyObject_HEAD
    PyObject *units;      /* _units (and pending): a deque of units, in reply order */
    PyObject *portals;    /* _portals: portal name -> (recipe, lookups, plan, text) */
    PyObject *recipes;    /* _recipes: id(plan) -> (plan, recipe) */
    PyObject *log;        /* log: the AuditLog */
    Py_ssize_t returned;  /* _returned: DataRows since the last completion */
    Py_ssize_t statements;
    PyObject *append;     /* append_of.append, looked up once per deque */
    PyObject *clear;      /* append_of.clear */
    PyObject *append_of;
} CoreObject;

static int
Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->units);
    Py_VISIT(self->portals);
    Py_VISIT(self->recipes);
    Py_VISIT(self->log);
    Py_VISIT(self->append);
    Py_VISIT(self->clear);
    Py_VISIT(self->append_of);
    return 0;
}

static int
Core_clear(CoreObject *self)
{
    Py_CLEAR(self->units);
    Py_CLEAR(self->portals);
    Py_CLEAR(self->recipes);
    Py_CLEAR(self->log);
    Py_CLEAR(self->append);
    Py_CLEAR(self->clear);
    Py_CLEAR(self->append_of);
    return 0;
}

static void
Core_dealloc(CoreObject *self)
{
    /* Instances are of auditing.SessionAudit, a heap subtype (see Unit_dealloc). */
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, Core_dealloc)  /* cores chained deep (a bare Core's log): no recursion */
    Core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

static PyMemberDef Core_members[] = {
    {"_units", T_OBJECT_EX, offsetof(CoreObject, units), 0, NULL},
    {"pending", T_OBJECT_EX, offsetof(CoreObject, units), READONLY,
     "Truthy while statements wait for the server's replies (the queue itself)."},
    {"_portals", T_OBJECT_EX, offsetof(CoreObject, portals), 0, NULL},
    {"_recipes", T_OBJECT_EX, offsetof(CoreObject, recipes), 0, NULL},
    {"log", T_OBJECT_EX, offsetof(CoreObject, log), 0, NULL},
    {"_returned", T_PYSSIZET, offsetof(CoreObject, returned), 0, NULL},
    {"statements", T_PYSSIZET, offsetof(CoreObject, statements), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *s_units, *s_portals, *s_recipes, *s_log, *s_append, *s_clear;
static PyObject *deque_type = NULL;  /* collections.deque */

/* A field of the core, checked: a new reference, or NULL with AttributeError as Python
 * gives for a slot never set. */
static PyObject *
core_field(PyObject *value, PyObject *name)
{
    if (value == NULL) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    return Py_NewRef(value);
}

/* The queue's bound append and clear, looked up again only when _units was replaced.
 * Borrowed references (kept by the core); 0, or -1 with an exception. Only a plain
 * deque's are kept: a subclass (a test's) may change its methods, so they are looked up
 * for every call, as Python does. */
static int
core_queue_methods(CoreObject *self)
{
    if (self->units == NULL) {
        PyErr_SetObject(PyExc_AttributeError, s_units);
        return -1;
    }
    if (self->append_of == self->units && Py_IS_TYPE(self->units, (PyTypeObject *)deque_type)) {
        return 0;
    }
    PyObject *units = Py_NewRef(self->units);
    PyObject *append = PyObject_GetAttr(units, s_append);
    PyObject *clear = append ? PyObject_GetAttr(units, s_clear) : NULL;
    if (clear == NULL) {
        Py_XDECREF(append);
        Py_DECREF(units);
        return -1;
    }
    Py_XSETREF(self->append, append);
    Py_XSETREF(self->clear, clear);
    Py_XSETREF(self->append_of, units);
    return 0;
}

static PyTypeObject CoreType;

/* fn(arg) (fn() when arg is NULL) with fn held: the core's cached methods may be
 * replaced by the Python code a call runs. */
static PyObject *
call_held(PyObject *fn, PyObject *arg)
{
    Py_INCREF(fn);
    PyObject *r = arg != NULL ? PyObject_CallOneArg(fn, arg) : PyObject_CallNoArgs(fn);
    Py_DECREF(fn);
    return r;
}

/* ------------------------------------------------------------------ configuration */

static PyTypeObject *unit_type = NULL;   /* auditing._Unit */
static PyObject *skip_execute = NULL;    /* auditing._SKIP_EXECUTE */
static PyObject *skip_query = NULL;      /* auditing._SKIP_QUERY */
static Py_ssize_t max_portals = 0;       /* auditing._MAX_PORTALS */
static PyObject *template_type = NULL;   /* templates.StatementTemplate */
static PyObject *watched_type = NULL;    /* auditing._Watched */
static PyObject *sync_unit = NULL;       /* auditing._SYNC */
static PyObject *envelope_prefix = NULL; /* crypto.envelope.ENVELOPE_PREFIX (bytes) */
static PyObject *monotonic = NULL;       /* time.monotonic */
static PyObject *time_ns = NULL;         /* time.time_ns */

static PyObject *s_emit_statement, *s_walk, *s_new_recipe;
static PyObject *s_recipe, *s_keys, *s_simple, *s_rows, *s_lookups, *s_started;

enum { PARSE_COMPLETE = '1', COMMAND_COMPLETE = 'C', READY = 'Z' };

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *tt, *wt, *su, *ep, *mo, *tn, *ut, *se, *sq;
    Py_ssize_t mp;
    if (!PyArg_ParseTuple(args, "O!O!OO!OOO!OnO:configure", &PyType_Type, &tt, &PyType_Type, &wt, &su,
                          &PyBytes_Type, &ep, &mo, &tn, &PyType_Type, &ut, &se, &mp, &sq)) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)ut, &UnitType)) {
        PyErr_SetString(PyExc_TypeError, "the unit type must derive from Unit");
        return NULL;
    }
    Py_INCREF(ut);
    Py_XSETREF(unit_type, (PyTypeObject *)ut);
    Py_INCREF(se);
    Py_XSETREF(skip_execute, se);
    Py_INCREF(sq);
    Py_XSETREF(skip_query, sq);
    max_portals = mp;
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

/* unit.<name>, read from the struct when ``unit`` is a Unit (every queued unit is; its
 * Python subclass, auditing._Unit, overrides no field): no attribute lookup on the
 * per-statement path. A field never set, or any other object, goes through getattr, which
 * raises as Python does. New reference; NULL with an exception. */
#define UNIT_FIELD(unit, field, name) unit_field((unit), offsetof(UnitObject, field), (name))

static PyObject *
unit_field(PyObject *unit, size_t offset, PyObject *name)
{
    if (PyObject_TypeCheck(unit, &UnitType)) {
        PyObject *value = *(PyObject **)((char *)unit + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(unit, name);
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
    /* tag = chunk[pos + 5 : end - 1]; one_reply checked 0 <= pos, pos + 6 <= end <= size */
    Py_ssize_t start = pos + 5, stop = end - 1;
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

/* The core of ``audit``, or NULL with TypeError: one_reply() takes a SessionAudit
 * (backend() calls it, and tests beside the Python reference on twin sessions). */
static CoreObject *
as_core(PyObject *audit)
{
    if (!PyObject_TypeCheck(audit, &CoreType)) {
        PyErr_SetString(PyExc_TypeError, "a SessionAudit (derived from Core) is needed");
        return NULL;
    }
    return (CoreObject *)audit;
}

/* SessionAudit._one_reply: 1 when the chunk was the usual whole reply (its event
 * emitted), 0 (nothing changed) for anything else, -1 with an exception. */
static int
one_reply_impl(CoreObject *self, PyObject *chunk, PyObject *marks, PyObject *tail_rows)
{
    if (template_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return -1;
    }
    if (!PyBytes_CheckExact(chunk) || !PyList_CheckExact(marks)) {
        return 0;
    }
    Py_ssize_t count = PyList_GET_SIZE(marks);
    long kind, last, first;
    Py_ssize_t pos, end, ignored_pos, ignored_end;
    if (count == 3) {  /* the ParseComplete of an unnamed statement sent with it */
        if (!mark_at(marks, 0, &first, &ignored_pos, &ignored_end) || first != PARSE_COMPLETE ||
            !mark_at(marks, 1, &kind, &pos, &end) || !mark_at(marks, 2, &last, &ignored_pos, &ignored_end)) {
            return 0;
        }
    } else if (count == 2) {
        if (!mark_at(marks, 0, &kind, &pos, &end) || !mark_at(marks, 1, &last, &ignored_pos, &ignored_end)) {
            return 0;
        }
    } else {
        return 0;
    }
    /* Marks as scan_marked makes them: a whole CommandComplete at chunk[pos:end]. Anything
     * else is the Python walk's (and _tag_rows' slicing rules). */
    if (kind != COMMAND_COMPLETE || last != READY || pos < 0 || end < 6 || end > PyBytes_GET_SIZE(chunk) ||
        end - 6 < pos) {  /* (end - pos < 6, without overflow) */
        return 0;
    }
    /* _returned takes tail_rows: one that does not fit is the Python walk's to refuse. */
    if (!PyLong_Check(tail_rows)) {
        return 0;
    }
    Py_ssize_t returned = PyLong_AsSsize_t(tail_rows);
    if (returned == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }

    int result = -1;
    PyObject *units = NULL, *head = NULL, *recipe = NULL, *simple = NULL, *extra = NULL;
    PyObject *rows = NULL, *ended = NULL, *wall = NULL, *lookups = NULL, *started = NULL, *item = NULL;
    PyObject *log = NULL, *r = NULL;
    if ((units = core_field(self->units, s_units)) == NULL) {
        goto done;
    }
    Py_ssize_t queued = PyObject_Size(units);
    if (queued < 0) {
        goto done;
    }
    if (queued == 0) {
        result = 0;
        goto done;
    }
    head = PySequence_GetItem(units, 0);
    if (head == NULL || (recipe = UNIT_FIELD(head, recipe, s_recipe)) == NULL) {
        goto done;
    }
    int templated = Py_IS_TYPE(recipe, (PyTypeObject *)template_type);
    if (!templated) {
        /* A watched statement whose reply holds no protected value: nothing to record. */
        if (!Py_IS_TYPE(recipe, (PyTypeObject *)watched_type)) {
            result = 0;
            goto done;
        }
        PyObject *keys = UNIT_FIELD(head, keys, s_keys);
        if (keys == NULL) {
            goto done;
        }
        int seen = keys != Py_None;
        Py_DECREF(keys);
        const char *prefix = PyBytes_AS_STRING(envelope_prefix);
        Py_ssize_t plen = PyBytes_GET_SIZE(envelope_prefix);
        if (seen || (plen > 0 && memmem(PyBytes_AS_STRING(chunk), (size_t)PyBytes_GET_SIZE(chunk), prefix,
                                        (size_t)plen) != NULL)) {
            result = 0;
            goto done;
        }
    }
    simple = UNIT_FIELD(head, simple, s_simple);
    if (simple == NULL) {
        goto done;
    }
    int is_simple = PyObject_IsTrue(simple);
    if (is_simple < 0) {
        goto done;
    }
    /* Python code may have run since the queue was measured (attributes, truth values). */
    if ((queued = PyObject_Size(units)) < 0) {
        goto done;
    }
    if (is_simple) {
        if (queued != 1) {
            result = 0;
            goto done;
        }
        PyObject *so_far = UNIT_FIELD(head, rows, s_rows);
        if (so_far == NULL) {
            goto done;
        }
        int counted = so_far != Py_None;
        Py_DECREF(so_far);
        if (counted) {
            result = 0;
            goto done;
        }
    } else {
        if (queued != 2) {
            result = 0;
            goto done;
        }
        extra = PySequence_GetItem(units, 1);
        if (extra == NULL) {
            goto done;
        }
        if (extra != sync_unit) {
            result = 0;
            goto done;
        }
    }
    /* The usual reply: from here on the state changes, in the order Python changes it. */
    if (self->units == units) {  /* (the queue Python would clear: the one measured) */
        r = core_queue_methods(self) < 0 ? NULL : call_held(self->clear, NULL);
    } else {
        r = PyObject_CallMethodNoArgs(units, s_clear);
    }
    if (r == NULL) {
        goto done;
    }
    self->returned = returned;
    if (templated) {
        rows = tag_rows(PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk), pos, end);
        log = rows ? core_field(self->log, s_log) : NULL;
        lookups = log ? UNIT_FIELD(head, lookups, s_lookups) : NULL;
        started = lookups ? UNIT_FIELD(head, started, s_started) : NULL;
        ended = started ? PyObject_CallNoArgs(monotonic) : NULL;
        wall = ended ? PyObject_CallNoArgs(time_ns) : NULL;
        item = wall ? PyTuple_Pack(7, recipe, lookups, started, ended, wall, rows, Py_None) : NULL;
        if (item == NULL) {
            goto done;
        }
        Py_SETREF(r, PyObject_CallMethodOneArg(log, s_emit_statement, item));
        if (r == NULL) {
            goto done;
        }
    }
    result = 1;
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

/* SessionAudit.reply: the usual reply by one_reply, anything else by audit._walk()
 * (backend() without trying one_reply again). */
static PyObject *
reply_impl(CoreObject *self, PyObject *chunk, PyObject *marks, PyObject *tail_rows)
{
    if (PyList_CheckExact(marks) && PyList_GET_SIZE(marks) >= 2 && PyList_GET_SIZE(marks) <= 3) {
        int done = one_reply_impl(self, chunk, marks, tail_rows);
        if (done < 0) {
            return NULL;
        }
        if (done) {
            Py_RETURN_NONE;
        }
    }
    return PyObject_CallMethodObjArgs((PyObject *)self, s_walk, chunk, marks, tail_rows, NULL);
}

/* _Unit(recipe, lookups, simple, plan, text), started now. New reference; NULL with an
 * exception. */
static PyObject *
new_unit(PyObject *recipe, PyObject *lookups, PyObject *simple, PyObject *plan, PyObject *text)
{
    PyObject *started = PyObject_CallNoArgs(monotonic);
    if (started == NULL) {
        return NULL;
    }
    UnitObject *u = (UnitObject *)unit_type->tp_alloc(unit_type, 0);
    if (u == NULL) {
        Py_DECREF(started);
        return NULL;
    }
    u->recipe = Py_NewRef(recipe);
    u->lookups = Py_NewRef(lookups);
    u->simple = Py_NewRef(simple);
    u->plan = Py_NewRef(plan);
    u->text = Py_NewRef(text);
    u->keys = Py_NewRef(Py_None);
    u->started = started;
    u->rows = Py_NewRef(Py_None);
    u->sqlstate = Py_NewRef(Py_None);
    return (PyObject *)u;
}

/* SessionAudit._recipe(plan), inline: (plan, recipe) cached by the plan's identity, else
 * _new_recipe(plan). New reference; NULL with an exception. */
static PyObject *
recipe_of(CoreObject *self, PyObject *plan)
{
    PyObject *recipes = core_field(self->recipes, s_recipes);
    PyObject *key = recipes ? PyLong_FromVoidPtr(plan) : NULL;
    PyObject *recipe = NULL;
    if (key == NULL) {
        goto done;
    }
    PyObject *found = PyDict_CheckExact(recipes) ? PyDict_GetItemWithError(recipes, key) : NULL;
    if (found == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (found != NULL && PyTuple_CheckExact(found) && PyTuple_GET_SIZE(found) == 2 &&
        PyTuple_GET_ITEM(found, 0) == plan) {
        recipe = Py_NewRef(PyTuple_GET_ITEM(found, 1));
    } else {
        recipe = PyObject_CallMethodOneArg((PyObject *)self, s_new_recipe, plan);
    }
done:
    Py_XDECREF(recipes);
    Py_XDECREF(key);
    return recipe;
}

/* Append ``unit`` to the queue. 0, or -1 with an exception. */
static int
queue_unit(CoreObject *self, PyObject *unit)
{
    if (core_queue_methods(self) < 0) {
        return -1;
    }
    PyObject *r = call_held(self->append, unit);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* SessionAudit.query: a simple Query sent to the server (plan None: a refused one,
 * recorded as a refusal; its ReadyForQuery still comes). */
static PyObject *
query_impl(CoreObject *self, PyObject *plan, PyObject *lookups, PyObject *text)
{
    if (unit_type == NULL || skip_query == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    self->statements++;
    PyObject *recipe = plan != Py_None ? recipe_of(self, plan) : Py_NewRef(Py_None);
    if (recipe == NULL) {
        return NULL;
    }
    PyObject *unit = NULL;
    if (recipe == Py_None) {
        unit = Py_NewRef(skip_query);
    } else {
        int truthy = PyObject_IsTrue(lookups);
        unit = truthy < 0 ? NULL : new_unit(recipe, truthy ? lookups : Py_None, Py_True, plan, text);
    }
    Py_DECREF(recipe);
    if (unit == NULL) {
        return NULL;
    }
    int failed = queue_unit(self, unit);
    Py_DECREF(unit);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* SessionAudit.execute: an Execute of ``portal`` queued. */
static PyObject *
execute_impl(CoreObject *self, PyObject *portal)
{
    if (unit_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    PyObject *result = NULL, *portals = NULL, *unit = NULL;
    self->statements++;
    if ((portals = core_field(self->portals, s_portals)) == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(portals)) {
        PyErr_SetString(PyExc_TypeError, "a session's portals are a dict");
        goto done;
    }
    PyObject *found = PyDict_GetItemWithError(portals, portal);  /* borrowed */
    if (found == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        unit = Py_NewRef(skip_execute);
    } else {
        if (!PyTuple_CheckExact(found) || PyTuple_GET_SIZE(found) != 4) {
            PyErr_SetString(PyExc_TypeError, "a bound portal is (recipe, lookups, plan, text)");
            goto done;
        }
        Py_INCREF(found);  /* monotonic() in new_unit is a call */
        unit = new_unit(PyTuple_GET_ITEM(found, 0), PyTuple_GET_ITEM(found, 1), Py_False, PyTuple_GET_ITEM(found, 2),
                        PyTuple_GET_ITEM(found, 3));
        Py_DECREF(found);
        if (unit == NULL) {
            goto done;
        }
    }
    if (queue_unit(self, unit) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(portals);
    Py_XDECREF(unit);
    return result;
}

/* SessionAudit.bind: how the portal's Executes are recorded (plan None: not at all). */
static PyObject *
bind_impl(CoreObject *self, PyObject *portal, PyObject *plan, PyObject *lookups, PyObject *text)
{
    PyObject *result = NULL, *recipe = NULL, *portals = NULL, *entry = NULL;
    /* The recipe first, as Python: making one runs Python code (_new_recipe). */
    if ((recipe = plan != Py_None ? recipe_of(self, plan) : Py_NewRef(Py_None)) == NULL) {
        goto done;
    }
    if ((portals = core_field(self->portals, s_portals)) == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(portals)) {
        PyErr_SetString(PyExc_TypeError, "a session's portals are a dict");
        goto done;
    }
    if (recipe == Py_None) {
        /* portals.pop(portal, None): an empty dict hashes nothing */
        int bound = PyDict_GET_SIZE(portals) ? PyDict_Contains(portals, portal) : 0;
        if (bound < 0 || (bound && PyDict_DelItem(portals, portal) < 0)) {
            goto done;
        }
        result = Py_NewRef(Py_None);
        goto done;
    }
    int present = PyDict_Contains(portals, portal);
    if (present < 0) {
        goto done;
    }
    if (!present && PyDict_GET_SIZE(portals) >= max_portals) {
        /* PostgreSQL drops portals at transaction end without telling us; bound ours. */
        PyDict_Clear(portals);
    }
    int truthy = PyObject_IsTrue(lookups);
    if (truthy < 0) {
        goto done;
    }
    entry = PyTuple_Pack(4, recipe, truthy ? lookups : Py_None, plan, text);
    if (entry == NULL || PyDict_SetItem(portals, portal, entry) < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(recipe);
    Py_XDECREF(portals);
    Py_XDECREF(entry);
    return result;
}

/* SessionAudit.sync: a Sync or FunctionCall, answered by one ReadyForQuery. */
static PyObject *
sync_impl(CoreObject *self)
{
    if (sync_unit == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    if (queue_unit(self, sync_unit) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* -- as methods of Core (what the session calls) */

static PyObject *
Core_reply(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "reply takes 3 arguments (chunk, marks, tail_rows)");
        return NULL;
    }
    return reply_impl((CoreObject *)self, args[0], args[1], args[2]);
}

static PyObject *
Core_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "bind takes 3 or 4 arguments (portal, plan, lookups, text=None)");
        return NULL;
    }
    return bind_impl((CoreObject *)self, args[0], args[1], args[2], nargs == 4 ? args[3] : Py_None);
}

static PyObject *
Core_query(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "query takes 2 or 3 arguments (plan, lookups, text=None)");
        return NULL;
    }
    return query_impl((CoreObject *)self, args[0], args[1], nargs == 3 ? args[2] : Py_None);
}

static PyObject *
Core_execute(PyObject *self, PyObject *arg)
{
    return execute_impl((CoreObject *)self, arg);
}

/* SessionAudit.execute_message: execute() of the portal an Execute message names (the
 * whole message, header included), read as Python's msg[5 : msg.find(b"\0", 5)] reads it.
 * Slicing and find() in the session's Python cost more per Execute than execute itself. */
static PyObject *
Core_execute_message(PyObject *self, PyObject *msg)
{
    if (!PyBytes_CheckExact(msg)) {
        PyErr_SetString(PyExc_TypeError, "execute_message takes the message's bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(msg);
    Py_ssize_t size = PyBytes_GET_SIZE(msg);
    Py_ssize_t end = -1;
    if (size > 5) {
        const char *nul = memchr(data + 5, '\0', (size_t)(size - 5));
        if (nul != NULL) {
            end = nul - data;
        }
    }
    if (end < 0) {
        end = size - 1;  /* as a slice ending at find()'s -1 */
    }
    PyObject *portal = PyBytes_FromStringAndSize(data + 5, end > 5 ? end - 5 : 0);
    if (portal == NULL) {
        return NULL;
    }
    PyObject *result = execute_impl((CoreObject *)self, portal);
    Py_DECREF(portal);
    return result;
}

static PyObject *
Core_sync(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    return sync_impl((CoreObject *)self);
}

static PyMethodDef Core_methods[] = {
    {"reply", (PyCFunction)(void (*)(void))Core_reply, METH_FASTCALL,
     "reply(chunk, marks, tail_rows): the server's replies in chunk when pgcloak cut no result\n"
     "short: the usual one completed at once, anything else by _walk()."},
    {"bind", (PyCFunction)(void (*)(void))Core_bind, METH_FASTCALL,
     "bind(portal, plan, lookups, text=None): how the portal's Executes are recorded\n"
     "(plan None: not at all)."},
    {"query", (PyCFunction)(void (*)(void))Core_query, METH_FASTCALL,
     "query(plan, lookups, text=None): a simple Query sent to the server (plan None: a\n"
     "refused one, recorded as a refusal)."},
    {"execute", (PyCFunction)Core_execute, METH_O, "execute(portal): an Execute of portal queued."},
    {"execute_message", (PyCFunction)Core_execute_message, METH_O,
     "execute_message(msg): execute() of the portal the Execute message msg names."},
    {"sync", (PyCFunction)Core_sync, METH_NOARGS,
     "sync(): a Sync or FunctionCall, answered by one ReadyForQuery."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pgcloak.session._reply_core.Core",
    .tp_doc = "SessionAudit's per-statement state and calls (see auditing.SessionAudit).",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_members = Core_members,
    .tp_methods = Core_methods,
};

/* -- the usual reply as a function of a SessionAudit (backend() tries it first) */

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
    CoreObject *core = as_core(args[0]);
    int done = core ? one_reply_impl(core, args[1], args[2], args[3]) : -1;
    return done < 0 ? NULL : PyBool_FromLong(done);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)configure, METH_VARARGS,
     "configure(template_type, watched_type, sync_unit, envelope_prefix, monotonic, time_ns, "
     "unit_type, skip_execute, max_portals, skip_query)"},
    {"one_reply", (PyCFunction)(void (*)(void))one_reply, METH_FASTCALL, one_reply_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pgcloak.session._reply_core",
    .m_doc = "SessionAudit's per-statement state and calls in C (see auditing.py).",
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
    PyObject *collections = PyImport_ImportModule("collections");
    deque_type = collections ? PyObject_GetAttrString(collections, "deque") : NULL;
    Py_XDECREF(collections);
    if (deque_type == NULL) {
        return NULL;
    }
    INTERN(s_units, "_units");
    INTERN(s_log, "log");
    INTERN(s_emit_statement, "emit_statement");
    INTERN(s_clear, "clear");
    INTERN(s_walk, "_walk");
    INTERN(s_portals, "_portals");
    INTERN(s_recipes, "_recipes");
    INTERN(s_new_recipe, "_new_recipe");
    INTERN(s_append, "append");
    INTERN(s_recipe, "recipe");
    INTERN(s_keys, "keys");
    INTERN(s_simple, "simple");
    INTERN(s_rows, "rows");
    INTERN(s_lookups, "lookups");
    INTERN(s_started, "started");
    if (PyType_Ready(&UnitType) < 0 || PyType_Ready(&CoreType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&UnitType);
    if (PyModule_AddObject(m, "Unit", (PyObject *)&UnitType) < 0) {
        Py_DECREF(&UnitType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
