/*
 * The PostgreSQL wire walks shared by the native modules: protocols/_pg_scan.c (scan,
 * texts_pass) and proxy/_whole_read.c (the fast path's usual read). Static, so each module
 * has its own copy; one source.
 */
#ifndef WIREFAULT_PG_WIRE_H
#define WIREFAULT_PG_WIRE_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t read_length(const unsigned char *at) {
    return ((uint32_t)at[0] << 24) | ((uint32_t)at[1] << 16) | ((uint32_t)at[2] << 8) | at[3];
}

/* Counts the messages from pos (when out_types is NULL) or records them. */
static Py_ssize_t walk(const unsigned char *buf, Py_ssize_t size, Py_ssize_t pos,
                       const unsigned char *plain, uint32_t max_length,
                       char *out_types, int64_t *out_ends, Py_ssize_t *stop) {
    Py_ssize_t count = 0;
    while (size - pos >= 5) {
        unsigned char type_byte = buf[pos];
        uint32_t length = read_length(buf + pos + 1);
        if (!plain[type_byte] || length < 4 || length > max_length) {
            break;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (end > size) {
            break;
        }
        if (out_types != NULL) {
            int64_t end64 = (int64_t)end;
            out_types[count] = (char)type_byte;
            memcpy(out_ends + count, &end64, sizeof end64);
        }
        count++;
        pos = end;
    }
    *stop = pos;
    return count;
}

/* A literal test (see texts_pass in _pg_scan.c): bytes whose first byte holds the flags
 * (LITERAL_ANCHORED: only at the text's start; LITERAL_FOLDED: ASCII letters in any case,
 * the literal given in lower case) and the rest the literal. 1 when `text` (ASCII) holds it. */
#define LITERAL_ANCHORED 1
#define LITERAL_FOLDED 2

static inline unsigned char ascii_lower(unsigned char c) {
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static inline int literal_found(const unsigned char *item, Py_ssize_t item_size,
                         const unsigned char *text, Py_ssize_t text_size) {
    if (item_size < 1) {
        return 1; /* not a test: treated as finding, so the read goes the general way */
    }
    int flags = item[0];
    const unsigned char *literal = item + 1;
    Py_ssize_t length = item_size - 1;
    if (length > text_size) {
        return 0;
    }
    Py_ssize_t last = (flags & LITERAL_ANCHORED) ? 0 : text_size - length;
    if (!(flags & LITERAL_FOLDED)) {
        if (flags & LITERAL_ANCHORED) {
            return memcmp(text, literal, (size_t)length) == 0;
        }
        return length == 0 || memmem(text, (size_t)text_size, literal, (size_t)length) != NULL;
    }
    for (Py_ssize_t at = 0; at <= last; at++) {
        Py_ssize_t k = 0;
        while (k < length && ascii_lower(text[at + k]) == literal[k]) {
            k++;
        }
        if (k == length) {
            return 1;
        }
    }
    return 0;
}

/* texts_pass's walk (see _pg_scan.c): 1 when every frame passes its test, 0 when one does
 * not, -1 with an exception set. `ends` holds `count` native int64s. */
static int texts_pass_walk(const unsigned char *buf, Py_ssize_t size,
                           const unsigned char *type_bytes, const char *end_bytes,
                           Py_ssize_t count, PyObject *tests, PyObject *search_name) {
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t end64;
        memcpy(&end64, end_bytes + i * (Py_ssize_t)sizeof end64, sizeof end64);
        Py_ssize_t end = (Py_ssize_t)end64;
        if (end < start || end > size) {
            PyErr_SetString(PyExc_ValueError, "texts_pass: ends outside data");
            return -1;
        }
        PyObject *test = PyTuple_GET_ITEM(tests, type_bytes[i]);
        if (test == Py_None) {
            start = end;
            continue;
        }
        if (!PyTuple_CheckExact(test)) {
            return 0;
        }
        /* After the 5-byte header, the body is the text then one NUL. */
        Py_ssize_t text_start = start + 5, text_end = end - 1;
        if (end - start < 6 || buf[text_end] != 0) {
            return 0;
        }
        for (Py_ssize_t k = text_start; k < text_end; k++) {
            if (buf[k] == 0 || buf[k] >= 0x80) {
                return 0;
            }
        }
        Py_ssize_t patterns = PyTuple_GET_SIZE(test);
        PyObject *text = NULL; /* made for the first pattern that is not a literal */
        for (Py_ssize_t p = 0; p < patterns; p++) {
            PyObject *item = PyTuple_GET_ITEM(test, p);
            int hit;
            if (PyBytes_CheckExact(item)) {
                hit = literal_found((const unsigned char *)PyBytes_AS_STRING(item),
                                    PyBytes_GET_SIZE(item), buf + text_start,
                                    text_end - text_start);
            } else {
                if (text == NULL) {
                    text = PyUnicode_FromStringAndSize((const char *)buf + text_start,
                                                       text_end - text_start);
                    if (text == NULL) {
                        return -1;
                    }
                }
                PyObject *found = PyObject_CallMethodOneArg(item, search_name, text);
                if (found == NULL) {
                    Py_DECREF(text);
                    return -1;
                }
                hit = found != Py_None;
                Py_DECREF(found);
            }
            if (hit) {
                Py_XDECREF(text);
                return 0;
            }
        }
        Py_XDECREF(text);
        start = end;
    }
    return 1;
}

/* 1 when none of `needles` (a tuple of bytes) occurs in buf, 0 when one does or one is not
 * bytes. */
static inline int needles_absent(const unsigned char *buf, Py_ssize_t size, PyObject *needles) {
    Py_ssize_t n = PyTuple_GET_SIZE(needles);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *needle = PyTuple_GET_ITEM(needles, i);
        if (!PyBytes_CheckExact(needle)) {
            return 0;
        }
        Py_ssize_t length = PyBytes_GET_SIZE(needle);
        if (length == 0  /* in every frame */
            || (length <= size
                && memmem(buf, (size_t)size, PyBytes_AS_STRING(needle), (size_t)length))) {
            return 0;
        }
    }
    return 1;
}

#endif
