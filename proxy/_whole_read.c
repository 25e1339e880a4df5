/*
 * The fast path's usual read in native code: a read of whole PostgreSQL messages that no
 * fault can act on, on a free lane the agent does not watch, framed, counted and recorded
 * in one call, as proxy/whole_read.py's python_whole_read does it (which stays
 * for installs without a compiler, and is the reference tests hold this one to).
 *
 * WholeReader(layer, lane, agent, framer, engine, recorder, slot, conn, from_client,
 *             table, max_length, typed_mode, skipped, keep_frame_bytes, run_bytes,
 *             untestable, nothing_gated)
 * .read(data) -> data, or None when the read needs the Python path (nothing changed then).
 *
 * It reads and writes these attributes of the Python objects it was given, each the same
 * one the Python path uses (proxy/whole_read.py lists where each comes from):
 *   layer: dead, relaying, bytes_from_client / bytes_from_server
 *   lane: slow, queue;  agent (may be None): watch_client / watch_server, skim_client /
 *   skim_server;  framer: _mode, _pending;
 *   engine: _live, _killall_on, _per_connection, _whole_tests (rules.WholeTests)
 *   recorder: _epoch, _rows, _count, _rows_frames, _rows_extra, _chunk_frames, _close_chunk()
 *   slot: epoch, number;  conn: client_frames_seen / server_frames_seen
 *   table: specs (each spec's name), plain, index
 * A renamed attribute raises AttributeError on the first read: every integration test
 * goes through here when the module is built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../protocols/_pg_wire.h"

static PyObject *s_dead, *s_relaying, *s_bytes_from_client, *s_bytes_from_server, *s_slow,
    *s_queue, *s_watch_client, *s_watch_server, *s_mode, *s_pending, *s_live, *s_killall_on,
    *s_whole_tests, *s_epoch_private, *s_rows, *s_count, *s_rows_frames, *s_rows_extra,
    *s_chunk_frames, *s_close_chunk, *s_epoch, *s_number, *s_client_frames_seen,
    *s_server_frames_seen, *s_name, *s_search, *s_skim_client, *s_skim_server,
    *s_per_connection;

typedef struct {
    PyObject_HEAD
    PyObject *layer, *lane, *agent, *framer, *engine, *recorder, *slot, *conn;
    PyObject *specs;      /* the table's 256 specs */
    PyObject *plain;      /* bytes(256) */
    PyObject *keys[4];    /* engine.whole_tests_key(...): [per connection * 2 + skim] */
    PyObject *table_index;
    PyObject *untestable, *nothing_gated;
    int from_client;
    uint32_t max_length;
    long typed_mode;
    unsigned char skipped[256];
    Py_ssize_t keep_frame_bytes;
    Py_ssize_t run_bytes;
} WholeReader;

static int truth_of(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

static Py_ssize_t length_of(PyObject *obj, PyObject *name) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t length = PyObject_Length(value);
    Py_DECREF(value);
    return length;
}

static int add_to(PyObject *obj, PyObject *name, Py_ssize_t delta) {
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    PyObject *step = PyLong_FromSsize_t(delta);
    if (step == NULL) {
        Py_DECREF(value);
        return -1;
    }
    PyObject *sum = PyNumber_Add(value, step);
    Py_DECREF(value);
    Py_DECREF(step);
    if (sum == NULL) {
        return -1;
    }
    int failed = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return failed;
}

/* 1: the read may take this path, as far as the connection's state goes; 0: it may not;
 * -1: error. *skim: the agent watches this side but skims (its tests join the faults'). */
static int state_allows(WholeReader *self, int *skim) {
    int truth = truth_of(self->layer, s_dead);
    if (truth != 0) {
        return truth < 0 ? -1 : 0;
    }
    truth = truth_of(self->layer, s_relaying);
    if (truth != 1) {
        return truth;
    }
    truth = truth_of(self->lane, s_slow);
    if (truth != 0) {
        return truth < 0 ? -1 : 0;
    }
    Py_ssize_t queued = length_of(self->lane, s_queue);
    if (queued != 0) {
        return queued < 0 ? -1 : 0;
    }
    if (self->agent != Py_None) {
        truth = truth_of(self->agent, self->from_client ? s_watch_client : s_watch_server);
        if (truth < 0) {
            return -1;
        }
        if (truth) {
            truth = truth_of(self->agent, self->from_client ? s_skim_client : s_skim_server);
            if (truth != 1) {
                return truth;
            }
            *skim = 1;
        }
    }
    PyObject *mode = PyObject_GetAttr(self->framer, s_mode);
    if (mode == NULL) {
        return -1;
    }
    long mode_value = PyLong_AsLong(mode);
    Py_DECREF(mode);
    if (mode_value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (mode_value != self->typed_mode) {
        return 0;
    }
    Py_ssize_t pending = length_of(self->framer, s_pending);
    if (pending != 0) {
        return pending < 0 ? -1 : 0;
    }
    return 1;
}

/* passes_whole's test, without counting: 1 no fault can act on these frames, 0 one may. */
static int faults_allow(WholeReader *self, PyObject *data, PyObject *types, PyObject *ends,
                        int skim) {
    int live = truth_of(self->engine, s_live);
    if (live < 0) {
        return -1;
    }
    if (!live && !skim) {
        return 1;
    }
    int killall = truth_of(self->engine, s_killall_on);
    if (killall != 0) {
        return killall < 0 ? -1 : 0;
    }
    int per_connection = truth_of(self->engine, s_per_connection);
    if (per_connection < 0) {
        return -1;
    }
    PyObject *all_tests = PyObject_GetAttr(self->engine, s_whole_tests);
    if (all_tests == NULL) {
        return -1;
    }
    PyObject *tests = PyDict_GetItemWithError(all_tests,
                                              self->keys[per_connection * 2 + skim]);
    Py_XINCREF(tests);
    Py_DECREF(all_tests);
    if (tests == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* not worked out yet: the Python path does */
    }
    /* (by_code, needles): see rules.WholeTests */
    int allowed;
    PyObject *by_code = NULL, *needles = NULL;
    if (PyTuple_CheckExact(tests) && PyTuple_GET_SIZE(tests) == 2) {
        by_code = PyTuple_GET_ITEM(tests, 0);
        needles = PyTuple_GET_ITEM(tests, 1);
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    if (by_code == NULL || !PyTuple_CheckExact(needles)
        || !needles_absent(buf, PyBytes_GET_SIZE(data), needles)) {
        allowed = 0;
    } else if (by_code == self->nothing_gated) {
        allowed = 1;
    } else if (by_code == self->untestable || !PyTuple_CheckExact(by_code)
               || PyTuple_GET_SIZE(by_code) != 256) {
        allowed = 0;
    } else {
        allowed = texts_pass_walk(buf, PyBytes_GET_SIZE(data),
                                  (const unsigned char *)PyBytes_AS_STRING(types),
                                  PyBytes_AS_STRING(ends), PyBytes_GET_SIZE(types), by_code,
                                  s_search);
    }
    Py_DECREF(tests);
    return allowed;
}

/* record_whole's row for the read when it is the simple one (a small frame, or a run of
 * small frames, none left out); NULL with no exception set when it is not. */
static PyObject *simple_row(WholeReader *self, PyObject *number, PyObject *data,
                            PyObject *types, PyObject *ends) {
    Py_ssize_t count = PyBytes_GET_SIZE(types);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    const unsigned char *type_bytes = (const unsigned char *)PyBytes_AS_STRING(types);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (self->skipped[type_bytes[i]]) {
            return NULL;
        }
    }
    PyObject *from_client = self->from_client ? Py_True : Py_False;
    if (count == 1) {
        if (size > self->keep_frame_bytes) {
            return NULL;
        }
        PyObject *name = PyObject_GetAttr(PyTuple_GET_ITEM(self->specs, type_bytes[0]),
                                          s_name);
        if (name == NULL) {
            return NULL;
        }
        PyObject *row = PyTuple_Pack(4, number, from_client, name, data);
        Py_DECREF(name);
        return row;
    }
    if (size > count * self->keep_frame_bytes) {
        return NULL;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(5, self->table_index, zero, zero, types, ends);
    Py_DECREF(zero);
    if (key == NULL) {
        return NULL;
    }
    PyObject *row = PyTuple_Pack(4, number, from_client, key, data);
    Py_DECREF(key);
    return row;
}

static PyObject *record(WholeReader *self, PyObject *row, Py_ssize_t count, int run) {
    PyObject *rows = PyObject_GetAttr(self->recorder, s_rows);
    if (rows == NULL) {
        return NULL;
    }
    int failed = PyList_Check(rows) ? PyList_Append(rows, row) : -1;
    if (failed && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "WholeReader: the recorder's rows are not a list");
    }
    Py_DECREF(rows);
    if (failed || add_to(self->recorder, s_count, count) < 0
        || add_to(self->recorder, s_rows_frames, count) < 0
        || (run && add_to(self->recorder, s_rows_extra, self->run_bytes) < 0)) {
        return NULL;
    }
    PyObject *frames = PyObject_GetAttr(self->recorder, s_rows_frames);
    PyObject *chunk = frames ? PyObject_GetAttr(self->recorder, s_chunk_frames) : NULL;
    int full = chunk ? PyObject_RichCompareBool(frames, chunk, Py_GE) : -1;
    Py_XDECREF(frames);
    Py_XDECREF(chunk);
    if (full < 0) {
        return NULL;
    }
    if (full) {
        PyObject *done = PyObject_CallMethodNoArgs(self->recorder, s_close_chunk);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_NONE;
}

static PyObject *reader_read(WholeReader *self, PyObject *data) {
    if (self->layer == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "WholeReader: not initialised");
        return NULL;
    }
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) == 0) {
        Py_RETURN_NONE;
    }
    int skim = 0;
    int allowed = state_allows(self, &skim);
    if (allowed != 1) {
        return allowed < 0 ? NULL : Py_NewRef(Py_None);
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data), stop;
    const unsigned char *plain = (const unsigned char *)PyBytes_AS_STRING(self->plain);
    Py_ssize_t count = walk(buf, size, 0, plain, self->max_length, NULL, NULL, &stop);
    if (stop != size || count == 0) {
        Py_RETURN_NONE;
    }
    PyObject *types = PyBytes_FromStringAndSize(NULL, count);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int64_t));
    PyObject *number = NULL, *row = NULL, *result = NULL;
    if (types == NULL || ends == NULL) {
        goto done;
    }
    walk(buf, size, 0, plain, self->max_length, PyBytes_AS_STRING(types),
         (int64_t *)PyBytes_AS_STRING(ends), &stop);
    allowed = faults_allow(self, data, types, ends, skim);
    if (allowed != 1) {
        result = allowed < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    /* The recorder numbers a connection on its first row of an epoch: the Python path. */
    PyObject *slot_epoch = PyObject_GetAttr(self->slot, s_epoch);
    PyObject *epoch = slot_epoch ? PyObject_GetAttr(self->recorder, s_epoch_private) : NULL;
    int same = epoch ? PyObject_RichCompareBool(slot_epoch, epoch, Py_EQ) : -1;
    Py_XDECREF(slot_epoch);
    Py_XDECREF(epoch);
    if (same != 1) {
        result = same < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    number = PyObject_GetAttr(self->slot, s_number);
    if (number == NULL) {
        goto done;
    }
    row = simple_row(self, number, data, types, ends);
    if (row == NULL) {
        result = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    /* Everything checked: from here on the read is this path's. */
    if (add_to(self->conn, self->from_client ? s_client_frames_seen : s_server_frames_seen,
               count) < 0
        || add_to(self->layer, self->from_client ? s_bytes_from_client : s_bytes_from_server,
                  size) < 0) {
        goto done;
    }
    PyObject *recorded = record(self, row, count, count > 1);
    if (recorded == NULL) {
        goto done;
    }
    Py_DECREF(recorded);
    result = Py_NewRef(data);
done:
    Py_XDECREF(types);
    Py_XDECREF(ends);
    Py_XDECREF(number);
    Py_XDECREF(row);
    return result;
}

static int reader_traverse(WholeReader *self, visitproc visit, void *arg) {
    Py_VISIT(self->layer);
    Py_VISIT(self->lane);
    Py_VISIT(self->agent);
    Py_VISIT(self->framer);
    Py_VISIT(self->engine);
    Py_VISIT(self->recorder);
    Py_VISIT(self->slot);
    Py_VISIT(self->conn);
    Py_VISIT(self->specs);
    Py_VISIT(self->plain);
    for (int i = 0; i < 4; i++) {
        Py_VISIT(self->keys[i]);
    }
    Py_VISIT(self->table_index);
    Py_VISIT(self->untestable);
    Py_VISIT(self->nothing_gated);
    return 0;
}

static int reader_clear(WholeReader *self) {
    Py_CLEAR(self->layer);
    Py_CLEAR(self->lane);
    Py_CLEAR(self->agent);
    Py_CLEAR(self->framer);
    Py_CLEAR(self->engine);
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->slot);
    Py_CLEAR(self->conn);
    Py_CLEAR(self->specs);
    Py_CLEAR(self->plain);
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(self->keys[i]);
    }
    Py_CLEAR(self->table_index);
    Py_CLEAR(self->untestable);
    Py_CLEAR(self->nothing_gated);
    return 0;
}

static void reader_dealloc(WholeReader *self) {
    PyObject_GC_UnTrack(self);
    reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int reader_init(WholeReader *self, PyObject *args, PyObject *kwargs) {
    PyObject *layer, *lane, *agent, *framer, *engine, *recorder, *slot, *conn, *table,
        *max_length, *skipped, *untestable, *nothing_gated;
    int from_client;
    long typed_mode;
    Py_ssize_t keep_frame_bytes, run_bytes;
    if (!PyArg_ParseTuple(args, "OOOOOOOOpOOlSnnOO", &layer, &lane, &agent, &framer, &engine,
                          &recorder, &slot, &conn, &from_client, &table, &max_length,
                          &typed_mode, &skipped, &keep_frame_bytes, &run_bytes, &untestable,
                          &nothing_gated)) {
        return -1;
    }
    PyObject *specs = PyObject_GetAttrString(table, "specs");
    PyObject *plain = specs ? PyObject_GetAttrString(table, "plain") : NULL;
    PyObject *index = plain ? PyObject_GetAttrString(table, "index") : NULL;
    if (index == NULL || !PyTuple_CheckExact(specs) || PyTuple_GET_SIZE(specs) != 256
        || !PyBytes_CheckExact(plain) || PyBytes_GET_SIZE(plain) != 256) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "WholeReader: not a type table");
        }
        Py_XDECREF(specs);
        Py_XDECREF(plain);
        Py_XDECREF(index);
        return -1;
    }
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(max_length, &overflow);
    if (limit == -1 && PyErr_Occurred()) {
        Py_DECREF(specs);
        Py_DECREF(plain);
        Py_DECREF(index);
        return -1;
    }
    self->max_length = overflow > 0 || limit > (long long)UINT32_MAX ? UINT32_MAX
                       : (overflow < 0 || limit < 0) ? 0 : (uint32_t)limit;
    PyObject *number = PyObject_GetAttrString(conn, "number");
    PyObject *keys[4] = {NULL, NULL, NULL, NULL};
    for (int i = 0; number != NULL && i < 4; i++) {
        keys[i] = PyObject_CallMethod(engine, "whole_tests_key", "OOOO", table,
                                      from_client ? Py_True : Py_False,
                                      (i & 1) ? Py_True : Py_False,
                                      (i & 2) ? number : Py_None);
        if (keys[i] == NULL) {
            break;
        }
    }
    Py_XDECREF(number);
    if (keys[3] == NULL) {
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(keys[i]);
        }
        Py_DECREF(specs);
        Py_DECREF(plain);
        Py_DECREF(index);
        return -1;
    }
    reader_clear(self);
    self->layer = Py_NewRef(layer);
    self->lane = Py_NewRef(lane);
    self->agent = Py_NewRef(agent);
    self->framer = Py_NewRef(framer);
    self->engine = Py_NewRef(engine);
    self->recorder = Py_NewRef(recorder);
    self->slot = Py_NewRef(slot);
    self->conn = Py_NewRef(conn);
    self->specs = specs;
    self->plain = plain;
    self->table_index = index;
    for (int i = 0; i < 4; i++) {
        self->keys[i] = keys[i];
    }
    self->untestable = Py_NewRef(untestable);
    self->nothing_gated = Py_NewRef(nothing_gated);
    self->from_client = from_client;
    self->typed_mode = typed_mode;
    memset(self->skipped, 0, sizeof self->skipped);
    const unsigned char *codes = (const unsigned char *)PyBytes_AS_STRING(skipped);
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(skipped); i++) {
        self->skipped[codes[i]] = 1;
    }
    self->keep_frame_bytes = keep_frame_bytes;
    self->run_bytes = run_bytes;
    return 0;
}

static PyMethodDef reader_methods[] = {
    {"read", (PyCFunction)reader_read, METH_O,
     "read(data) -> data when framed, counted and recorded here; None: the Python path"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WholeReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirefault.proxy._whole_read_native.WholeReader",
    .tp_basicsize = sizeof(WholeReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One direction's usual read, native (see proxy/_whole_read.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_methods = reader_methods,
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_whole_read_native",
    "The fast path's usual read, native (see proxy/_whole_read.c).", -1, NULL,
};

static int intern_names(void) {
    struct { PyObject **slot; const char *text; } names[] = {
        {&s_dead, "dead"}, {&s_relaying, "relaying"},
        {&s_bytes_from_client, "bytes_from_client"},
        {&s_bytes_from_server, "bytes_from_server"}, {&s_slow, "slow"}, {&s_queue, "queue"},
        {&s_watch_client, "watch_client"}, {&s_watch_server, "watch_server"},
        {&s_mode, "_mode"}, {&s_pending, "_pending"}, {&s_live, "_live"},
        {&s_killall_on, "_killall_on"}, {&s_whole_tests, "_whole_tests"},
        {&s_epoch_private, "_epoch"}, {&s_rows, "_rows"}, {&s_count, "_count"},
        {&s_rows_frames, "_rows_frames"}, {&s_rows_extra, "_rows_extra"},
        {&s_chunk_frames, "_chunk_frames"}, {&s_close_chunk, "_close_chunk"},
        {&s_epoch, "epoch"}, {&s_number, "number"},
        {&s_client_frames_seen, "client_frames_seen"},
        {&s_server_frames_seen, "server_frames_seen"}, {&s_name, "name"},
        {&s_search, "search"}, {&s_skim_client, "skim_client"},
        {&s_skim_server, "skim_server"}, {&s_per_connection, "_per_connection"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL) {
            return -1;
        }
    }
    return 0;
}

PyMODINIT_FUNC PyInit__whole_read_native(void) {
    if (intern_names() < 0 || PyType_Ready(&WholeReaderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "WholeReader", (PyObject *)&WholeReaderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
