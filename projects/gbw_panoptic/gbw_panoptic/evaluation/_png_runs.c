/*
 * Runs of equal colours of an 8-bit RGB(A) PNG, straight from its filtered scanlines.
 *
 * A panoptic PNG is piecewise constant, and PNG's row filters (None, Sub, Up, Average, Paeth)
 * store a pixel as its difference to a prediction from its left (a), upper (b) and upper-left (c)
 * neighbours: inside a region, almost every filtered byte is zero. Between two "events" (a pixel
 * with a non-zero filtered colour byte, or where the row above changes colour) the row above is
 * constant, b == c, and every filter turns into a short recurrence on the left pixel that becomes
 * constant after at most 9 steps (None: 0; Sub and Paeth: a; Up: b; Average: (a + b) / 2 per
 * channel). So each row is rebuilt as runs of colours from its events alone, with the row above
 * kept as runs too: the work grows with the number of runs and non-zero bytes, not with the pixels.
 * Alpha is ignored (filters act on each channel separately, so it does not affect R, G, B).
 *
 * Python API: runs_of_rows(rows, height, width, channels) -> (starts: bytes, ids: bytes)
 *   rows:     the inflated image data, height scanlines of 1 + channels * width bytes (filter type
 *             byte first), any object with the buffer protocol.
 *   channels: 3 (RGB) or 4 (RGBA).
 *   starts:   int64 flat index y * width + x of the first pixel of each run, 0 first, increasing.
 *   ids:      uint32 colour R + 256 G + 65536 B of each run; neighbouring runs differ.
 * Raises ValueError on a size mismatch or a filter type byte above 4.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FILTER_NONE, FILTER_SUB, FILTER_UP, FILTER_AVERAGE, FILTER_PAETH };

#define CHANNEL(colour, k) (((colour) >> (8 * (k))) & 0xFFu)

/* One row as runs: x of the first pixel of each run (x[0] == 0) and its colour. */
typedef struct {
    int64_t *x;
    uint32_t *colour;
    int64_t count;
} RowRuns;

/* The runs of the whole image, grown as rows are added. */
typedef struct {
    int64_t *start;
    uint32_t *id;
    int64_t count;
    int64_t capacity;
} ImageRuns;

static int image_runs_append(ImageRuns *runs, int64_t start, uint32_t id) {
    if (runs->count == runs->capacity) {
        int64_t capacity = runs->capacity * 2;
        int64_t *start_grown = realloc(runs->start, (size_t)capacity * sizeof(int64_t));
        if (start_grown == NULL) return -1;
        runs->start = start_grown;
        uint32_t *id_grown = realloc(runs->id, (size_t)capacity * sizeof(uint32_t));
        if (id_grown == NULL) return -1;
        runs->id = id_grown;
        runs->capacity = capacity;
    }
    runs->start[runs->count] = start;
    runs->id[runs->count] = id;
    runs->count++;
    return 0;
}

static inline void row_runs_add(RowRuns *row, int64_t x, uint32_t colour) {
    if (row->count == 0 || row->colour[row->count - 1] != colour) {
        row->x[row->count] = x;
        row->colour[row->count] = colour;
        row->count++;
    }
}

static inline unsigned paeth(unsigned a, unsigned b, unsigned c) {
    int p = (int)a + (int)b - (int)c;
    int pa = abs(p - (int)a), pb = abs(p - (int)b), pc = abs(p - (int)c);
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

/* The colour of a pixel from its filtered bytes and its left, upper and upper-left colours. */
static inline uint32_t unfilter_pixel(int filter, const uint8_t *filtered, uint32_t left,
                                      uint32_t up, uint32_t up_left) {
    uint32_t colour = 0;
    for (int k = 0; k < 3; k++) {
        unsigned a = CHANNEL(left, k), b = CHANNEL(up, k), c = CHANNEL(up_left, k);
        unsigned prediction;
        switch (filter) {
            case FILTER_NONE: prediction = 0; break;
            case FILTER_SUB: prediction = a; break;
            case FILTER_UP: prediction = b; break;
            case FILTER_AVERAGE: prediction = (a + b) >> 1; break;
            default: prediction = paeth(a, b, c); break;
        }
        colour |= ((filtered[k] + prediction) & 0xFFu) << (8 * k);
    }
    return colour;
}

/* The colour of a pixel whose filtered bytes are zero and whose upper and upper-left neighbours
 * both have colour `up`, from the colour `left` of its left neighbour. */
static inline uint32_t unfilter_flat_pixel(int filter, uint32_t left, uint32_t up) {
    switch (filter) {
        case FILTER_NONE: return 0;
        case FILTER_UP: return up;
        case FILTER_AVERAGE: {
            /* Per channel (a + b) >> 1, without carries between channels. */
            uint32_t sum_halves = ((left >> 1) & 0x7F7F7Fu) + ((up >> 1) & 0x7F7F7Fu);
            return sum_halves + (left & up & 0x010101u);
        }
        default: return left; /* Sub, and Paeth with b == c */
    }
}

/* The first pixel at or after `pixel` with a non-zero filtered R, G or B byte, or `width`. */
static int64_t next_nonzero_pixel(const uint8_t *filtered, int64_t width, int channels,
                                  int64_t pixel) {
    int64_t size = width * channels;
    int64_t offset = pixel * channels;
    for (;;) {
        while (offset + 8 <= size) {
            uint64_t word;
            memcpy(&word, filtered + offset, 8);
            if (word != 0) break;
            offset += 8;
        }
        int64_t end = offset + 8 < size ? offset + 8 : size;
        for (; offset < end; offset++) {
            if (filtered[offset] != 0 && (channels == 3 || offset % 4 != 3)) {
                return offset / channels;
            }
        }
        if (offset >= size) return width;
    }
}

/* Rebuild one row as runs from its filtered bytes and the runs of the row above. */
static void unfilter_row(int filter, const uint8_t *filtered, int64_t width, int channels,
                         const RowRuns *above, RowRuns *row) {
    row->count = 0;
    int64_t above_index = 0;   /* run of the row above that holds pixel `x` */
    int64_t nonzero = -1;      /* next pixel with a non-zero byte at or after x, once known */
    uint32_t colour = 0;       /* colour of the last pixel rebuilt */
    int64_t x = 0;
    while (x < width) {
        while (above_index + 1 < above->count && above->x[above_index + 1] <= x) above_index++;
        uint32_t up = above->colour[above_index];
        uint32_t up_left = 0;
        if (x > 0) up_left = above->x[above_index] == x ? above->colour[above_index - 1] : up;
        uint32_t left = x > 0 ? colour : 0;
        colour = unfilter_pixel(filter, filtered + x * channels, left, up, up_left);
        row_runs_add(row, x, colour);
        /* The next event: a non-zero byte or a change of colour in the row above. */
        if (nonzero <= x) nonzero = next_nonzero_pixel(filtered, width, channels, x + 1);
        int64_t next = above_index + 1 < above->count ? above->x[above_index + 1] : width;
        if (nonzero < next) next = nonzero;
        /* Up to the next event the row above is `up` everywhere: the recurrence settles. */
        for (x++; x < next; x++) {
            uint32_t settled = unfilter_flat_pixel(filter, colour, up);
            if (settled == colour) break;
            colour = settled;
            row_runs_add(row, x, colour);
        }
        x = next;
    }
}

static PyObject *runs_of_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer rows;
    Py_ssize_t height, width;
    int channels;
    if (!PyArg_ParseTuple(args, "y*nni", &rows, &height, &width, &channels)) return NULL;
    PyObject *result = NULL;
    RowRuns above = {NULL, NULL, 0}, row = {NULL, NULL, 0};
    ImageRuns image = {NULL, NULL, 0, 0};
    if ((channels != 3 && channels != 4) || height <= 0 || width <= 0 ||
        width > (PY_SSIZE_T_MAX - 1) / channels / height ||
        rows.len != height * (1 + channels * width)) {
        PyErr_Format(PyExc_ValueError,
                     "runs_of_rows: %zd bytes do not hold %zd scanlines of %zd pixels with %d "
                     "channels",
                     rows.len, height, width, channels);
        goto done;
    }
    const uint8_t *data = rows.buf;
    int64_t stride = 1 + (int64_t)channels * width;
    for (int64_t y = 0; y < height; y++) {
        if (data[y * stride] > FILTER_PAETH) {
            PyErr_Format(PyExc_ValueError, "runs_of_rows: scanline %lld has filter type %d (0-4)",
                         (long long)y, (int)data[y * stride]);
            goto done;
        }
    }
    above.x = malloc((size_t)width * sizeof(int64_t));
    above.colour = malloc((size_t)width * sizeof(uint32_t));
    row.x = malloc((size_t)width * sizeof(int64_t));
    row.colour = malloc((size_t)width * sizeof(uint32_t));
    image.capacity = 16 * height;
    image.start = malloc((size_t)image.capacity * sizeof(int64_t));
    image.id = malloc((size_t)image.capacity * sizeof(uint32_t));
    if (!above.x || !above.colour || !row.x || !row.colour || !image.start || !image.id) {
        PyErr_NoMemory();
        goto done;
    }
    int out_of_memory = 0;
    Py_BEGIN_ALLOW_THREADS
    /* The row above the first one is black. */
    above.x[0] = 0;
    above.colour[0] = 0;
    above.count = 1;
    for (int64_t y = 0; y < height && !out_of_memory; y++) {
        const uint8_t *scanline = data + y * stride;
        unfilter_row(scanline[0], scanline + 1, width, channels, &above, &row);
        for (int64_t i = 0; i < row.count; i++) {
            if (image.count > 0 && image.id[image.count - 1] == row.colour[i]) continue;
            if (image_runs_append(&image, y * width + row.x[i], row.colour[i]) != 0) {
                out_of_memory = 1;
                break;
            }
        }
        RowRuns swap = above;
        above = row;
        row = swap;
    }
    Py_END_ALLOW_THREADS
    if (out_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("(y#y#)", (const char *)image.start,
                           (Py_ssize_t)(image.count * sizeof(int64_t)), (const char *)image.id,
                           (Py_ssize_t)(image.count * sizeof(uint32_t)));
done:
    free(above.x);
    free(above.colour);
    free(row.x);
    free(row.colour);
    free(image.start);
    free(image.id);
    PyBuffer_Release(&rows);
    return result;
}

static PyMethodDef methods[] = {
    {"runs_of_rows", runs_of_rows, METH_VARARGS,
     "runs_of_rows(rows, height, width, channels) -> (starts, ids): the runs of equal colours "
     "(int64 flat starts, uint32 R + 256 G + 65536 B ids, as bytes) of an 8-bit RGB(A) PNG from "
     "its inflated, filtered scanlines."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_png_runs",
    .m_doc = "Runs of equal colours of PNGs from their filtered scanlines.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__png_runs(void) { return PyModule_Create(&module); }
