/* Linux AIO for the read queue: records read with O_DIRECT, checked and counted without Python.
 *
 * Python reader threads cost ~75 us of CPU per record (the GIL and the queue's hand-offs), which
 * caps 96 KiB records near 11 k/s where fio's libaio reads ~20 k/s (docs/benchmarks.md, "Fetch
 * path"). Here a batch (one layer's records) is queued in one call; `depth` reads stay in flight
 * through io_submit (the kernel's AIO, as fio's libaio engine does), and one POSIX thread reaps
 * completions, checks each record's xxh3, and wakes the waiter once, when its batch is complete.
 * A read-ahead (not urgent) starts only while the reads in the kernel, demand reads included, hold
 * less than `later_limit` bytes (or none are in flight), so a demand read arriving shares the flash
 * with little and read-aheads wait for the demand reads; a batch none of whose records was
 * submitted can be dropped.
 * Nothing per record runs under the GIL. Linux only, and only on O_DIRECT descriptors: AIO on a
 * buffered file reads synchronously inside io_submit. The caller keeps every buffer alive until
 * the batch is done or `close` has returned.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xxh_x86dispatch.h> /* AVX2 where the CPU has it: 2.5 us per 96 KiB, SSE2 6.6 us */
#endif

#define MAX_PIECES 256
#define REAP 64
#define PAGE 4096

/* a record's status once done: 0 read and checked; > 0 errno; these below */
#define SHORT_READ (-1)
#define MISMATCH (-2)
#define CANCELLED (-3)
#define DROPPED (-4) /* dropped by its caller before it was submitted (`Batch.drop`) */

typedef struct BatchState BatchState;

typedef struct Record {
    struct iocb cb; /* cb.aio_data points back here */
    struct Record *next;
    BatchState *batch;
    Py_ssize_t index;
    struct iovec *iov;
    int iovcnt;
    long long length;
    int checked;
    uint64_t expected;
    void *padding; /* owned: the record's bytes that belong to no tensor (hashed, then dropped) */
    int status;
    long long got;
    int later;  /* taken from the read-ahead queue (requeued there if a submit is refused) */
    int queued; /* in a queue, not yet submitted */
} Record;

struct BatchState {
    int refs;    /* the Python object + records not yet done; under the ring's mutex */
    int waiting; /* a thread is in wait(): wake it when the last record is done */
    Py_ssize_t total, left;
    double started, finished;
    Record *records;
    struct iovec *iovs;
};

typedef struct {
    Record *head, *tail;
} Fifo;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work;   /* something was submitted, or closing */
    pthread_cond_t landed; /* a batch is complete */
    aio_context_t ctx;
    Fifo urgent, later;
    int depth;
    long long later_limit;   /* a read-ahead starts only below this many bytes in flight (0: no limit) */
    long long reading_bytes; /* bytes of the records claimed or in the kernel, urgent or not */
    int inflight;  /* records claimed for submission or in the kernel: at most `depth` */
    int submitted; /* records in the kernel: what io_getevents can return */
    int closed, started;
    pthread_t reaper;
} Ring;

typedef struct {
    PyObject_HEAD
    Ring *ring; /* owned reference: the ring outlives its batches */
    BatchState *state;
} Batch;

static PyTypeObject BatchType;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void fifo_push(Fifo *q, Record *r) {
    r->next = NULL;
    r->queued = 1;
    if (q->tail) {
        q->tail->next = r;
    } else {
        q->head = r;
    }
    q->tail = r;
}

static Record *fifo_pop(Fifo *q) {
    Record *r = q->head;
    if (r) {
        q->head = r->next;
        if (!q->head) q->tail = NULL;
        r->queued = 0;
    }
    return r;
}

static void release_state(BatchState *s) { /* under the ring's mutex */
    if (--s->refs) return;
    for (Py_ssize_t i = 0; i < s->total; i++) free(s->records[i].padding);
    free(s->records);
    free(s->iovs);
    free(s);
}

static void finish_locked(Ring *ring, Record *r, int status, long long got) {
    BatchState *s = r->batch;
    r->status = status;
    r->got = got;
    free(r->padding);
    r->padding = NULL;
    if (--s->left == 0) {
        s->finished = now();
        if (s->waiting) pthread_cond_broadcast(&ring->landed); /* no wake-up for batches nobody waits on */
    }
    release_state(s);
}

/* Put records back at the front of the queue (a refused submit), or cancel them when closing. */
static void requeue_locked(Ring *ring, struct iocb **cbs, int n) {
    for (int i = n - 1; i >= 0; i--) {
        Record *r = (Record *)(uintptr_t)cbs[i]->aio_data;
        ring->reading_bytes -= r->length;
        if (ring->closed) {
            finish_locked(ring, r, CANCELLED, 0);
            continue;
        }
        Fifo *q = r->later ? &ring->later : &ring->urgent; /* back to the front of its own queue */
        r->next = q->head;
        r->queued = 1;
        q->head = r;
        if (!q->tail) q->tail = r;
    }
}

/* The next record to submit: urgent ones first, then a read-ahead while all reads in flight hold
 * fewer than `later_limit` bytes with it (or none are in flight), so that demand reads never share
 * the flash with read-aheads started after them, and one arriving shares it with little: one
 * multi-MB record alone keeps the flash near its full rate. */
static Record *next_record(Ring *ring) {
    Record *r = ring->urgent.head;
    if (r) {
        fifo_pop(&ring->urgent);
        r->later = 0;
    } else {
        r = ring->later.head;
        if (!r || (ring->later_limit && ring->reading_bytes && ring->reading_bytes + r->length > ring->later_limit))
            return NULL;
        fifo_pop(&ring->later);
        r->later = 1;
    }
    ring->reading_bytes += r->length;
    return r;
}

/* Keep `depth` reads in flight from the queues (urgent first). Called and returns with the mutex
 * held, but io_submit runs without it, so that a thread submitting never holds up the reaper. */
static void submit_locked(Ring *ring) {
    struct iocb *cbs[REAP];
    while (ring->inflight < ring->depth) {
        int n = 0;
        while (n < REAP && ring->inflight + n < ring->depth) {
            Record *r = next_record(ring);
            if (!r) break;
            cbs[n++] = &r->cb;
        }
        if (!n) return;
        ring->inflight += n; /* claimed, so that no other thread overfills the depth meanwhile */
        pthread_mutex_unlock(&ring->mu);
        int done = 0, err = 0;
        while (done < n) {
            long got = syscall(SYS_io_submit, ring->ctx, (long)(n - done), cbs + done);
            if (got <= 0) {
                err = got < 0 ? errno : EIO;
                break;
            }
            done += (int)got;
        }
        pthread_mutex_lock(&ring->mu);
        ring->submitted += done;
        ring->inflight -= n - done;
        pthread_cond_signal(&ring->work); /* the reaper: reads to reap, or fewer claimed */
        if (done == n) continue;
        if (err == EAGAIN && ring->submitted > 0) { /* the kernel is full: retried as reads finish */
            requeue_locked(ring, cbs + done, n - done);
            return;
        }
        /* this record cannot be read at all (a bad descriptor; EAGAIN with nothing in flight) */
        finish_locked(ring, (Record *)(uintptr_t)cbs[done]->aio_data, err, 0);
        requeue_locked(ring, cbs + done + 1, n - done - 1);
    }
}

static int check(Record *r, long long got) {
    if (got < 0) return (int)-got;
    if (got != r->length) return SHORT_READ;
    if (!r->checked) return 0;
    XXH3_state_t h;
    XXH3_64bits_reset(&h);
    for (int i = 0; i < r->iovcnt; i++) XXH3_64bits_update(&h, r->iov[i].iov_base, r->iov[i].iov_len);
    return XXH3_64bits_digest(&h) == r->expected ? 0 : MISMATCH;
}

/* The reaper takes completions, starts the next reads at once, then checks what was read (xxh3,
 * ~3-5 us per 96 KiB): a second thread to hash cost more in wake-ups than the hashing takes. */
static void *reap(void *arg) {
    Ring *ring = (Ring *)arg;
    struct io_event events[REAP];
    pthread_mutex_lock(&ring->mu);
    for (;;) {
        while (!ring->submitted && !(ring->closed && !ring->inflight)) pthread_cond_wait(&ring->work, &ring->mu);
        if (!ring->submitted) break; /* closed, and nothing in flight or being submitted */
        pthread_mutex_unlock(&ring->mu);
        long n = syscall(SYS_io_getevents, ring->ctx, 1L, (long)REAP, events, NULL);
        pthread_mutex_lock(&ring->mu);
        if (n < 0) continue; /* EINTR */
        ring->submitted -= (int)n;
        ring->inflight -= (int)n;
        for (long i = 0; i < n; i++) {
            Record *r = (Record *)(uintptr_t)events[i].data;
            ring->reading_bytes -= r->length;
        }
        if (!ring->closed) submit_locked(ring);
        pthread_mutex_unlock(&ring->mu);
        for (long i = 0; i < n; i++) {
            Record *r = (Record *)(uintptr_t)events[i].data;
            r->got = (long long)events[i].res;
            r->status = check(r, r->got);
        }
        pthread_mutex_lock(&ring->mu);
        for (long i = 0; i < n; i++) {
            Record *r = (Record *)(uintptr_t)events[i].data;
            finish_locked(ring, r, r->status, r->got < 0 ? 0 : r->got);
        }
    }
    pthread_mutex_unlock(&ring->mu);
    return NULL;
}

static int Ring_init(Ring *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"depth", "later_limit", NULL};
    int depth;
    long long later_limit = 0;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "the ring is already running");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|L", kwlist, &depth, &later_limit)) return -1;
    if (depth < 1 || depth > 4096 || later_limit < 0) {
        PyErr_SetString(PyExc_ValueError, "depth must be 1..4096, later_limit >= 0");
        return -1;
    }
    self->ctx = 0;
    if (syscall(SYS_io_setup, (long)depth, &self->ctx) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->depth = depth;
    self->later_limit = later_limit;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->work, NULL);
    pthread_cond_init(&self->landed, NULL);
    int err = pthread_create(&self->reaper, NULL, reap, self);
    if (err) {
        syscall(SYS_io_destroy, self->ctx);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->started = 1;
    return 0;
}

/* Stop: queued records are cancelled, reads in flight finish, the reaper exits. */
static void stop(Ring *self) {
    if (!self->started) return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    int was_closed = self->closed;
    self->closed = 1;
    Record *r;
    while ((r = fifo_pop(&self->urgent)) != NULL) finish_locked(self, r, CANCELLED, 0);
    while ((r = fifo_pop(&self->later)) != NULL) finish_locked(self, r, CANCELLED, 0);
    pthread_cond_broadcast(&self->work);
    pthread_mutex_unlock(&self->mu);
    if (!was_closed) {
        pthread_join(self->reaper, NULL);
        syscall(SYS_io_destroy, self->ctx);
    }
    Py_END_ALLOW_THREADS
}

static void Ring_dealloc(Ring *self) {
    if (self->started) {
        stop(self);
        pthread_mutex_destroy(&self->mu);
        pthread_cond_destroy(&self->work);
        pthread_cond_destroy(&self->landed);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int running(Ring *ring) {
    if (!ring->started) PyErr_SetString(PyExc_RuntimeError, "the ring was not started");
    return ring->started;
}

/* Fill one record from (offset, [(address or 0 for padding, length), ...], xxh3 or None). */
static int make_record(Record *r, int fd, PyObject *item, struct iovec *iov) {
    long long offset;
    PyObject *pieces, *expected;
    if (!PyArg_ParseTuple(item, "LOO", &offset, &pieces, &expected)) return -1;
    PyObject *ps = PySequence_Fast(pieces, "pieces must be a sequence");
    if (!ps) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ps);
    size_t padding = 0;
    r->length = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long address;
        Py_ssize_t length;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ps, i), "Kn", &address, &length)) goto fail;
        if (length <= 0 || length % PAGE || address % PAGE) {
            PyErr_SetString(PyExc_ValueError, "pieces are whole pages at page-aligned addresses");
            goto fail;
        }
        iov[i].iov_base = (void *)(uintptr_t)address;
        iov[i].iov_len = (size_t)length;
        if (!address) padding += (size_t)length;
        r->length += length;
    }
    Py_DECREF(ps);
    if (padding) {
        char *at;
        if (posix_memalign(&r->padding, PAGE, padding)) {
            PyErr_NoMemory();
            return -1;
        }
        at = r->padding;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!iov[i].iov_base) {
                iov[i].iov_base = at;
                at += iov[i].iov_len;
            }
        }
    }
    r->checked = expected != Py_None;
    if (r->checked) {
        r->expected = PyLong_AsUnsignedLongLong(expected);
        if (PyErr_Occurred()) return -1;
    }
    r->iov = iov;
    r->iovcnt = (int)n;
    memset(&r->cb, 0, sizeof r->cb);
    r->cb.aio_data = (uint64_t)(uintptr_t)r;
    r->cb.aio_lio_opcode = IOCB_CMD_PREADV;
    r->cb.aio_fildes = (uint32_t)fd;
    r->cb.aio_buf = (uint64_t)(uintptr_t)iov;
    r->cb.aio_nbytes = (uint64_t)n;
    r->cb.aio_offset = offset;
    return 0;
fail:
    Py_DECREF(ps);
    return -1;
}

static BatchState *make_state(int fd, PyObject *seq) {
    Py_ssize_t total = PySequence_Fast_GET_SIZE(seq), pieces = 0;
    for (Py_ssize_t k = 0; k < total; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        PyObject *p = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 3 ? PyTuple_GET_ITEM(item, 1) : NULL;
        Py_ssize_t n = p ? PyObject_Length(p) : -1;
        if (n < 1 || n > MAX_PIECES) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a record is (offset, 1..256 pieces, xxh3)");
            return NULL;
        }
        pieces += n;
    }
    BatchState *s = calloc(1, sizeof *s);
    if (s) {
        s->records = calloc(total > 0 ? (size_t)total : 1, sizeof(Record));
        s->iovs = calloc(pieces > 0 ? (size_t)pieces : 1, sizeof(struct iovec));
    }
    if (!s || !s->records || !s->iovs) {
        if (s) free(s->records), free(s->iovs), free(s);
        PyErr_NoMemory();
        return NULL;
    }
    s->total = s->left = total;
    s->refs = 1 + (int)total;
    Py_ssize_t used = 0;
    for (Py_ssize_t k = 0; k < total; k++) {
        Record *r = &s->records[k];
        r->batch = s;
        r->index = k;
        if (make_record(r, fd, PySequence_Fast_GET_ITEM(seq, k), s->iovs + used) < 0) {
            s->refs = 1; /* nothing was queued */
            release_state(s);
            return NULL;
        }
        used += r->iovcnt;
    }
    return s;
}

/* submit(fd, records, urgent) -> Batch: queue records of (offset, pieces, xxh3 or None), in order */
static PyObject *Ring_submit(Ring *self, PyObject *args) {
    int fd, urgent;
    PyObject *records;
    if (!running(self) || !PyArg_ParseTuple(args, "iOp", &fd, &records, &urgent)) return NULL;
    PyObject *seq = PySequence_Fast(records, "records must be a sequence");
    if (!seq) return NULL;
    BatchState *s = make_state(fd, seq);
    Py_DECREF(seq);
    if (!s) return NULL;
    Batch *batch = PyObject_New(Batch, &BatchType);
    if (!batch) {
        s->refs = 1;
        release_state(s);
        return NULL;
    }
    Py_INCREF(self);
    batch->ring = self;
    batch->state = s;
    int closed;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    closed = self->closed;
    if (closed) {
        s->refs = 1;
        s->left = 0;
    } else {
        s->started = now();
        for (Py_ssize_t k = 0; k < s->total; k++) fifo_push(urgent ? &self->urgent : &self->later, &s->records[k]);
        submit_locked(self);
        if (!s->total) s->finished = s->started;
    }
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    if (closed) {
        Py_DECREF(batch);
        PyErr_SetString(PyExc_RuntimeError, "read queue is closed");
        return NULL;
    }
    return (PyObject *)batch;
}

/* promote(batch): move its records that wait behind read-aheads to the front */
static PyObject *Ring_promote(Ring *self, PyObject *arg) {
    if (!running(self)) return NULL;
    if (!PyObject_TypeCheck(arg, &BatchType)) {
        PyErr_SetString(PyExc_TypeError, "promote takes a Batch");
        return NULL;
    }
    BatchState *s = ((Batch *)arg)->state;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    Fifo kept = {NULL, NULL}, moved = {NULL, NULL};
    Record *r;
    while ((r = fifo_pop(&self->later)) != NULL) fifo_push(r->batch == s ? &moved : &kept, r);
    self->later = kept;
    if (moved.head) {
        moved.tail->next = self->urgent.head;
        if (!self->urgent.head) self->urgent.tail = moved.tail;
        self->urgent.head = moved.head;
    }
    pthread_mutex_unlock(&self->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Ring_close(Ring *self, PyObject *Py_UNUSED(ignored)) {
    stop(self);
    Py_RETURN_NONE;
}

static PyMethodDef Ring_methods[] = {
    {"submit", (PyCFunction)Ring_submit, METH_VARARGS, "submit(fd, records, urgent) -> Batch"},
    {"promote", (PyCFunction)Ring_promote, METH_O, "promote(batch): its queued records go first"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "cancel queued records, finish reads in flight, stop"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "flashmesh.node._aio_reads.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(depth, later_limit=0): `depth` O_DIRECT reads in flight through Linux AIO, checked by one "
              "POSIX thread; a read-ahead starts only while reads in flight hold less than `later_limit` bytes (0: no limit)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static void Batch_dealloc(Batch *self) {
    Ring *ring = self->ring;
    pthread_mutex_lock(&ring->mu);
    release_state(self->state);
    pthread_mutex_unlock(&ring->mu);
    Py_DECREF(ring);
    PyObject_Free(self);
}

static PyObject *Batch_wait(Batch *self, PyObject *Py_UNUSED(ignored)) {
    Ring *ring = self->ring;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ring->mu);
    self->state->waiting++;
    while (self->state->left) pthread_cond_wait(&ring->landed, &ring->mu);
    self->state->waiting--;
    pthread_mutex_unlock(&ring->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Batch_done(Batch *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->ring->mu);
    int done = self->state->left == 0;
    pthread_mutex_unlock(&self->ring->mu);
    return PyBool_FromLong(done);
}

/* drop() -> bool: if no record of the batch has been submitted, finish them all as DROPPED (never
 * read) and return True; else change nothing and return False. */
static PyObject *Batch_drop(Batch *self, PyObject *Py_UNUSED(ignored)) {
    Ring *ring = self->ring;
    BatchState *s = self->state;
    pthread_mutex_lock(&ring->mu);
    int queued = s->left == s->total;
    for (Py_ssize_t i = 0; queued && i < s->total; i++) queued = s->records[i].queued;
    if (queued && s->total) {
        Fifo *queues[2] = {&ring->urgent, &ring->later};
        for (int q = 0; q < 2; q++) {
            Fifo kept = {NULL, NULL};
            Record *r;
            while ((r = fifo_pop(queues[q])) != NULL) {
                if (r->batch == s) {
                    finish_locked(ring, r, DROPPED, 0);
                } else {
                    fifo_push(&kept, r);
                }
            }
            *queues[q] = kept;
        }
    }
    pthread_mutex_unlock(&ring->mu);
    return PyBool_FromLong(queued && s->total);
}

/* failures() -> [(index, status, bytes read)]: status > 0 errno, -1 short, -2 mismatch, -3 cancelled */
static PyObject *Batch_failures(Batch *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    BatchState *s = self->state;
    for (Py_ssize_t i = 0; out && i < s->total; i++) {
        Record *r = &s->records[i];
        if (!r->status) continue;
        PyObject *item = Py_BuildValue("(niL)", i, r->status, r->got);
        if (!item || PyList_Append(out, item) < 0) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    return out;
}

static PyObject *Batch_seconds(Batch *self, void *Py_UNUSED(closure)) {
    BatchState *s = self->state;
    pthread_mutex_lock(&self->ring->mu);
    double seconds = s->left ? 0.0 : s->finished - s->started;
    pthread_mutex_unlock(&self->ring->mu);
    return PyFloat_FromDouble(seconds > 0 ? seconds : 0.0);
}

static PyMethodDef Batch_methods[] = {
    {"wait", (PyCFunction)Batch_wait, METH_NOARGS, "block (without the GIL) until every record is done"},
    {"done", (PyCFunction)Batch_done, METH_NOARGS, "whether every record is done"},
    {"failures", (PyCFunction)Batch_failures, METH_NOARGS, "[(index, status, bytes read)] of failed records"},
    {"drop", (PyCFunction)Batch_drop, METH_NOARGS, "finish the batch unread if none of it was submitted; say whether"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Batch_getset[] = {
    {"seconds", (getter)Batch_seconds, NULL, "submission to the last record done", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "flashmesh.node._aio_reads.Batch",
    .tp_basicsize = sizeof(Batch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "the records of one submit",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_aio_reads", .m_size = -1};

PyMODINIT_FUNC PyInit__aio_reads(void) {
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&BatchType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "SHORT_READ", SHORT_READ);
    PyModule_AddIntConstant(m, "MISMATCH", MISMATCH);
    PyModule_AddIntConstant(m, "CANCELLED", CANCELLED);
    PyModule_AddIntConstant(m, "DROPPED", DROPPED);
    return m;
}
