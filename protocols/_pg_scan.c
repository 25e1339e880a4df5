/*
 * Finds the boundaries of complete PostgreSQL typed messages in one read, in native code.
 *
 * A typed message is a type byte, then a big-endian Int32 length that counts itself and the
 * body but not the type byte. Python code (protocols/_pg_framer.py) does everything else;
 * this function only walks the headers of a run of ordinary messages, which in bulk traffic
 * (COPY, large result sets) is most of the proxy's work: about 0.3 microseconds per message
 * in Python, a few nanoseconds here.
 *
 * scan(data, pos, plain, max_length) -> (stop, types, ends)
 *   data:       the read (bytes)
 *   pos:        where a message begins
 *   plain:      256 bytes; nonzero where a type byte names one message in this direction
 *   max_length: the largest length field accepted: any int (below 4, none is; beyond
 *               UINT32_MAX, every one is)
 * Walks messages from `pos` while the header is complete, the type byte is plain, the length
 * is between 4 and max_length and the whole message is in `data`. Returns where it stopped,
 * the type byte of each message (bytes) and each message's end offset (native int64s).
 * protocols/_pg_scan.py holds the same function in Python; tests check they agree on every
 * input, any int as pos or max_length included (the same result, or the same exception with
 * the same message). Only the types are checked here alone: the framer's are always right.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_pg_wire.h"

/* The length limit as a uint32: any Python int fits, because the framer's limit is
 * whatever the user configured, minus one, and must never make the walk raise. A negative
 * limit accepts no length, as 0 does (every length is below 4 or above it); one beyond
 * UINT32_MAX accepts every length, as UINT32_MAX does. -1 only when it is not an int. */
static int read_limit(PyObject *obj, uint32_t *limit) {
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0 || (overflow == 0 && value > (long long)UINT32_MAX)) {
        *limit = UINT32_MAX;
    } else if (overflow < 0 || value < 0) {
        *limit = 0;
    } else {
        *limit = (uint32_t)value;
    }
    return 0;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan(data, pos, plain, max_length)");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "scan: data and plain must be bytes");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    if (PyBytes_GET_SIZE(args[2]) != 256) {
        PyErr_SetString(PyExc_ValueError, "scan: plain must be 256 bytes");
        return NULL;
    }
    const unsigned char *plain = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    /* Any int: an exact one the quick way (the framer's), another through __index__; one
     * beyond Py_ssize_t is outside data too, as in Python. */
    Py_ssize_t pos = PyLong_CheckExact(args[1]) ? PyLong_AsSsize_t(args[1])
                                                : PyNumber_AsSsize_t(args[1], NULL);
    if (pos == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "scan: pos is outside data");
        return NULL;
    }
    uint32_t limit;
    if (read_limit(args[3], &limit) < 0) {
        return NULL;
    }

    Py_ssize_t stop;
    Py_ssize_t count = walk(buf, size, pos, plain, limit, NULL, NULL, &stop);
    PyObject *types = PyBytes_FromStringAndSize(NULL, count);
    PyObject *ends = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int64_t));
    if (types == NULL || ends == NULL) {
        Py_XDECREF(types);
        Py_XDECREF(ends);
        return NULL;
    }
    walk(buf, size, pos, plain, limit, PyBytes_AS_STRING(types),
         (int64_t *)PyBytes_AS_STRING(ends), &stop);
    PyObject *stop_obj = PyLong_FromSsize_t(stop);
    if (stop_obj == NULL) {
        Py_DECREF(types);
        Py_DECREF(ends);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(3, stop_obj, types, ends);
    Py_DECREF(stop_obj);
    Py_DECREF(types);
    Py_DECREF(ends);
    return result;
}

/*
 * texts_pass(data, types, ends, tests) -> bool
 *   data, types, ends: a read of whole messages as scan() gave them from position 0
 *   tests: a tuple of 256 entries, by type byte: None (nothing to test: the frame passes),
 *          False (the frame does not pass), or a tuple of patterns: objects with search(),
 *          or literal tests (bytes: a flags byte, LITERAL_ANCHORED and LITERAL_FOLDED in
 *          _pg_wire.h, then the literal, lower case when folded; user_regex.literal_form)
 * True when every frame passes: those with patterns only when their sole text field (the
 * whole body: text and one NUL at its end) is ASCII and no pattern finds it in the text
 * (search(text) is not None; a literal test: the literal is at its start, or anywhere when
 * not anchored, ASCII letters compared in either case when folded).
 * Anything else is False: a NUL inside, non-ASCII text, too short a body. The same function
 * in Python (texts_pass_python) is the reference; tests hold this one to it.
 */
static PyObject *texts_pass(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    static PyObject *search_name = NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "texts_pass(data, types, ends, tests)");
        return NULL;
    }
    PyObject *data = args[0], *types = args[1], *ends = args[2], *tests = args[3];
    if (!PyBytes_CheckExact(data) || !PyBytes_CheckExact(types) || !PyBytes_CheckExact(ends)) {
        PyErr_SetString(PyExc_TypeError, "texts_pass: data, types and ends must be bytes");
        return NULL;
    }
    if (!PyTuple_CheckExact(tests) || PyTuple_GET_SIZE(tests) != 256) {
        PyErr_SetString(PyExc_TypeError, "texts_pass: tests must be a tuple of 256");
        return NULL;
    }
    Py_ssize_t count = PyBytes_GET_SIZE(types);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (PyBytes_GET_SIZE(ends) != count * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "texts_pass: one end per type");
        return NULL;
    }
    if (search_name == NULL) {
        search_name = PyUnicode_InternFromString("search");
        if (search_name == NULL) {
            return NULL;
        }
    }
    int passed = texts_pass_walk((const unsigned char *)PyBytes_AS_STRING(data), size,
                                 (const unsigned char *)PyBytes_AS_STRING(types),
                                 PyBytes_AS_STRING(ends), count, tests, search_name);
    if (passed < 0) {
        return NULL;
    }
    return PyBool_FromLong(passed);
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, pos, plain, max_length) -> (stop, types, ends)"},
    {"texts_pass", (PyCFunction)(void (*)(void))texts_pass, METH_FASTCALL,
     "texts_pass(data, types, ends, tests) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_pg_scan_native",
    "Native walk over PostgreSQL typed message headers (see protocols/_pg_scan.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__pg_scan_native(void) { return PyModule_Create(&module_def); }
