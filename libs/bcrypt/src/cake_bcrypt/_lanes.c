/*
 * cake_bcrypt._lanes: several bcrypt computations interleaved in one thread.
 *
 * Why hand-written: bcrypt (Provos and Mazieres, "A Future-Adaptable Password Scheme", 1999)
 * spends its time in Blowfish encryptions whose 16 rounds each wait for four S-box loads that
 * depend on the previous round: one computation keeps a core's load and arithmetic units
 * mostly idle. Every library on PyPI (pyca bcrypt, passlib's backends) and libxcrypt compute
 * one hash per call. Interleaving the rounds of up to MAX_LANES independent computations
 * ("lanes") fills those idle units: on the 2-core Xeon Cake is measured on, four lanes cost
 * about 1.3x the time of one (bench/hash_check.py), so a core checks about three times as many
 * passwords per second. Each lane is an ordinary bcrypt: the same $2b$ result as any other
 * implementation (tests/test_lanes.py compares about a thousand against pyca bcrypt and
 * libxcrypt).
 *
 * A lane runs its own computation at its own pace: lanes join (start) and leave (take) between
 * two calls of run(), each with its own cost, so a password arriving while others are being
 * hashed joins them at once instead of waiting for a batch.
 *
 * Threading: an object is used by one thread at a time (the engine thread in cake_bcrypt);
 * start() and run() release the GIL while they compute, and refuse (RuntimeError) to run
 * while another call on the same object is computing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blowfish_init.h"

#define MAX_LANES 8
#define BF_WORDS (18 + 4 * 256) /* P-array, then the four S-boxes */
#define KEY_MAX 72              /* bcrypt uses at most 72 key bytes */
#define SALT_BYTES 16
#define DIGEST_BYTES 24

enum lane_state { LANE_FREE = 0, LANE_RUNNING = 1, LANE_DONE = 2 };

typedef struct {
    uint32_t box[BF_WORDS];     /* the Blowfish state: P[0..17], S0, S1, S2, S3 */
    uint32_t key_words[18];     /* the key as 18 words (cycled) */
    uint32_t salt_key_words[18];/* the salt as a key: its 4 words cycled */
    uint32_t salt_words[4];
    uint64_t rounds_left;       /* rounds of the expensive loop still to run */
    int state;
    uint8_t digest[DIGEST_BYTES];
} lane_t;

typedef struct {
    PyObject_HEAD
    lane_t *lanes;
    int capacity;
    int computing; /* a call has released the GIL and works on the lanes */
} LanesObject;

/*
 * Blowfish's F over a state's S-boxes. One base pointer per S-box and bytes as indices: GCC
 * then folds each S-box's offset into the load's displacement (with `512 + byte` it computed
 * the sum in a register, on the round's critical path: ~4 % of a check).
 */
static inline uint32_t bf_f(const uint32_t *box, uint32_t x) {
    const uint32_t *s0 = box + 18, *s1 = s0 + 256, *s2 = s0 + 512, *s3 = s0 + 768;
    return ((s0[x >> 24] + s1[(uint8_t)(x >> 16)]) ^ s2[(uint8_t)(x >> 8)]) + s3[(uint8_t)x];
}

/*
 * `half ^= p; half ^= f` for N lanes. With one lane, in that order: the subkey is mixed in
 * while F's loads are in flight, so only one XOR follows F on the critical path; the empty asm
 * keeps GCC from reassociating the two into `half ^ (f ^ p)` (two XORs after F: ~3 % of a
 * check alone). With several, the other lanes fill that gap, and the asm would only keep GCC
 * from interleaving them (it made four lanes cost four times one).
 */
#define MIX(N, half, p, f)                    \
    do {                                      \
        (half) ^= (p);                        \
        if ((N) == 1) __asm__("" : "+r"(half)); \
        (half) ^= (f);                        \
    } while (0)

/*
 * For N lanes (a compile-time constant, so the compiler unrolls the lane loops and keeps the
 * 2N halves in registers): encrypt one block per lane, round by round across the lanes; one
 * round of bcrypt's expensive loop (ExpandKey(state, 0, key) then ExpandKey(state, 0, salt));
 * and `rounds` such rounds.
 */
#define DEFINE_KERNELS(N)                                                                    \
    static inline void encrypt_##N(uint32_t *const *box, uint32_t *l, uint32_t *r) {        \
        _Pragma("GCC unroll 8") for (int k = 0; k < N; k++) l[k] ^= box[k][0];               \
        _Pragma("GCC unroll 8") for (int i = 1; i <= 16; i += 2) {                           \
            _Pragma("GCC unroll 8") for (int k = 0; k < N; k++) {                            \
                MIX(N, r[k], box[k][i], bf_f(box[k], l[k]));                                    \
            }                                                                                \
            _Pragma("GCC unroll 8") for (int k = 0; k < N; k++) {                            \
                MIX(N, l[k], box[k][i + 1], bf_f(box[k], r[k]));                                \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int k = 0; k < N; k++) {                                \
            uint32_t t = l[k];                                                               \
            l[k] = r[k] ^ box[k][17];                                                        \
            r[k] = t;                                                                        \
        }                                                                                    \
    }                                                                                        \
    static void rekey_##N(uint32_t *const *box, const uint32_t *const *words) {             \
        uint32_t l[N], r[N];                                                                 \
        for (int k = 0; k < N; k++) {                                                        \
            for (int i = 0; i < 18; i++) box[k][i] ^= words[k][i];                           \
            l[k] = r[k] = 0;                                                                 \
        }                                                                                    \
        for (int i = 0; i < BF_WORDS; i += 2) {                                              \
            encrypt_##N(box, l, r);                                                          \
            _Pragma("GCC unroll 8") for (int k = 0; k < N; k++) {                            \
                box[k][i] = l[k];                                                            \
                box[k][i + 1] = r[k];                                                        \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    static void expensive_rounds_##N(lane_t *const *lanes, uint64_t rounds) {               \
        uint32_t *box[N];                                                                    \
        const uint32_t *key[N], *salt[N];                                                    \
        for (int k = 0; k < N; k++) {                                                        \
            box[k] = lanes[k]->box;                                                          \
            key[k] = lanes[k]->key_words;                                                    \
            salt[k] = lanes[k]->salt_key_words;                                              \
        }                                                                                    \
        while (rounds--) {                                                                   \
            rekey_##N(box, key);                                                             \
            rekey_##N(box, salt);                                                            \
        }                                                                                    \
    }

DEFINE_KERNELS(1)
DEFINE_KERNELS(2)
DEFINE_KERNELS(3)
DEFINE_KERNELS(4)
DEFINE_KERNELS(5)
DEFINE_KERNELS(6)
DEFINE_KERNELS(7)
DEFINE_KERNELS(8)

static void expensive_rounds(lane_t *const *lanes, int n, uint64_t rounds) {
    switch (n) {
    case 1: expensive_rounds_1(lanes, rounds); break;
    case 2: expensive_rounds_2(lanes, rounds); break;
    case 3: expensive_rounds_3(lanes, rounds); break;
    case 4: expensive_rounds_4(lanes, rounds); break;
    case 5: expensive_rounds_5(lanes, rounds); break;
    case 6: expensive_rounds_6(lanes, rounds); break;
    case 7: expensive_rounds_7(lanes, rounds); break;
    case 8: expensive_rounds_8(lanes, rounds); break;
    default: break;
    }
}

/* `count` big-endian words read cyclically from `data` (bcrypt's stream-to-word). */
static void stream_words(const uint8_t *data, size_t len, uint32_t *out, int count) {
    size_t j = 0;
    for (int i = 0; i < count; i++) {
        uint32_t w = 0;
        for (int b = 0; b < 4; b++) {
            w = (w << 8) | data[j];
            j = (j + 1) % len;
        }
        out[i] = w;
    }
}

/* Set a lane up and run bcrypt's salted key setup: EksBlowfishSetup before its loop. */
static void lane_setup(lane_t *lane, const uint8_t *key, size_t key_len, const uint8_t *salt,
                       int cost) {
    memcpy(lane->box, BLOWFISH_INIT, sizeof(lane->box));
    stream_words(key, key_len, lane->key_words, 18);
    stream_words(salt, SALT_BYTES, lane->salt_words, 4);
    for (int i = 0; i < 18; i++) lane->salt_key_words[i] = lane->salt_words[i & 3];

    uint32_t *box[1] = {lane->box};
    uint32_t l = 0, r = 0;
    for (int i = 0; i < 18; i++) lane->box[i] ^= lane->key_words[i];
    for (int i = 0; i < BF_WORDS; i += 2) {
        /* The salt's words go on where the previous pair stopped: word i and i + 1. */
        l ^= lane->salt_words[i & 3];
        r ^= lane->salt_words[(i + 1) & 3];
        encrypt_1(box, &l, &r);
        lane->box[i] = l;
        lane->box[i + 1] = r;
    }
    lane->rounds_left = (uint64_t)1 << cost;
    lane->state = LANE_RUNNING;
}

/* Encrypt "OrpheanBeholderScryDoubt" 64 times with the lane's state: the digest. */
static void lane_finish(lane_t *lane) {
    static const uint8_t magic[] = "OrpheanBeholderScryDoubt";
    uint32_t text[6];
    uint32_t *box[1] = {lane->box};
    stream_words(magic, 24, text, 6);
    for (int n = 0; n < 64; n++) {
        for (int b = 0; b < 6; b += 2) encrypt_1(box, &text[b], &text[b + 1]);
    }
    for (int i = 0; i < 6; i++) {
        lane->digest[4 * i] = (uint8_t)(text[i] >> 24);
        lane->digest[4 * i + 1] = (uint8_t)(text[i] >> 16);
        lane->digest[4 * i + 2] = (uint8_t)(text[i] >> 8);
        lane->digest[4 * i + 3] = (uint8_t)text[i];
    }
    /* The key schedule is derived from the password: do not keep it around. */
    memset(lane->box, 0, sizeof(lane->box));
    memset(lane->key_words, 0, sizeof(lane->key_words));
    lane->state = LANE_DONE;
}

static int check_slot(LanesObject *self, int slot) {
    if (slot < 0 || slot >= self->capacity) {
        PyErr_Format(PyExc_IndexError, "lane %d is not in 0..%d", slot, self->capacity - 1);
        return -1;
    }
    return 0;
}

static int claim(LanesObject *self) {
    if (self->computing) {
        PyErr_SetString(PyExc_RuntimeError,
                        "another thread is computing on these lanes (use one thread each)");
        return -1;
    }
    self->computing = 1;
    return 0;
}

static PyObject *Lanes_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"capacity", NULL};
    int capacity = 4;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i", keywords, &capacity)) return NULL;
    if (capacity < 1 || capacity > MAX_LANES) {
        PyErr_Format(PyExc_ValueError, "capacity must be 1..%d, not %d", MAX_LANES, capacity);
        return NULL;
    }
    LanesObject *self = (LanesObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    /* Cache-line aligned: each lane's S-boxes start on a line of their own. */
    void *memory = NULL;
    if (posix_memalign(&memory, 64, sizeof(lane_t) * (size_t)capacity) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    memset(memory, 0, sizeof(lane_t) * (size_t)capacity);
    self->lanes = memory;
    self->capacity = capacity;
    self->computing = 0;
    return (PyObject *)self;
}

static void Lanes_dealloc(LanesObject *self) {
    if (self->lanes != NULL) {
        memset(self->lanes, 0, sizeof(lane_t) * (size_t)self->capacity);
        free(self->lanes);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(start_doc,
"start(slot, key, salt, cost)\n--\n\n"
"Start a bcrypt computation in free lane `slot`: `key` is the key bytes bcrypt uses (1..72:\n"
"the password and its NUL, cut at 72), `salt` the 16 salt bytes, `cost` 4..31.");

static PyObject *Lanes_start(LanesObject *self, PyObject *args) {
    int slot, cost;
    Py_buffer key, salt;
    if (!PyArg_ParseTuple(args, "iy*y*i", &slot, &key, &salt, &cost)) return NULL;
    PyObject *result = NULL;
    if (check_slot(self, slot) < 0) goto done;
    if (key.len < 1 || key.len > KEY_MAX) {
        PyErr_Format(PyExc_ValueError, "key must be 1..%d bytes, not %zd", KEY_MAX, key.len);
        goto done;
    }
    if (salt.len != SALT_BYTES) {
        PyErr_Format(PyExc_ValueError, "salt must be %d bytes, not %zd", SALT_BYTES, salt.len);
        goto done;
    }
    if (cost < 4 || cost > 31) {
        PyErr_Format(PyExc_ValueError, "cost must be 4..31, not %d", cost);
        goto done;
    }
    lane_t *lane = &self->lanes[slot];
    if (lane->state != LANE_FREE) {
        PyErr_Format(PyExc_ValueError, "lane %d is busy", slot);
        goto done;
    }
    if (claim(self) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    lane_setup(lane, key.buf, (size_t)key.len, salt.buf, cost);
    Py_END_ALLOW_THREADS
    self->computing = 0;
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&salt);
    return result;
}

PyDoc_STRVAR(run_doc,
"run(max_rounds) -> list[int]\n--\n\n"
"Run every running lane for up to `max_rounds` rounds of bcrypt's expensive loop, together,\n"
"stopping early when a lane completes. Returns the lanes that completed (take() them).");

static PyObject *Lanes_run(LanesObject *self, PyObject *arg) {
    long long max_rounds = PyLong_AsLongLong(arg);
    if (max_rounds == -1 && PyErr_Occurred()) return NULL;
    if (max_rounds < 1) {
        PyErr_Format(PyExc_ValueError, "max_rounds must be >= 1, not %lld", max_rounds);
        return NULL;
    }
    lane_t *running[MAX_LANES];
    int n = 0;
    uint64_t rounds = (uint64_t)max_rounds;
    for (int i = 0; i < self->capacity; i++) {
        lane_t *lane = &self->lanes[i];
        if (lane->state == LANE_RUNNING) {
            running[n++] = lane;
            if (lane->rounds_left < rounds) rounds = lane->rounds_left;
        }
    }
    if (claim(self) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (n > 0) expensive_rounds(running, n, rounds);
    for (int k = 0; k < n; k++) {
        running[k]->rounds_left -= rounds;
        if (running[k]->rounds_left == 0) lane_finish(running[k]);
    }
    Py_END_ALLOW_THREADS
    self->computing = 0;
    PyObject *done = PyList_New(0);
    if (done == NULL) return NULL;
    for (int k = 0; k < n; k++) {
        if (running[k]->state != LANE_DONE) continue;
        PyObject *slot = PyLong_FromLong((long)(running[k] - self->lanes));
        if (slot == NULL || PyList_Append(done, slot) < 0) {
            Py_XDECREF(slot);
            Py_DECREF(done);
            return NULL;
        }
        Py_DECREF(slot);
    }
    return done;
}

PyDoc_STRVAR(take_doc,
"take(slot) -> bytes\n--\n\n"
"The 23 digest bytes of the completed lane `slot` (what a bcrypt hash encodes); frees it.");

static PyObject *Lanes_take(LanesObject *self, PyObject *arg) {
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    if (check_slot(self, (int)slot) < 0) return NULL;
    lane_t *lane = &self->lanes[slot];
    if (lane->state != LANE_DONE) {
        PyErr_Format(PyExc_ValueError, "lane %ld has not completed", slot);
        return NULL;
    }
    PyObject *digest = PyBytes_FromStringAndSize((const char *)lane->digest, DIGEST_BYTES - 1);
    if (digest == NULL) return NULL;
    memset(lane, 0, sizeof(*lane));
    return digest;
}

PyDoc_STRVAR(running_doc, "How many lanes are computing (started and not completed).");

static PyObject *Lanes_get_running(LanesObject *self, void *closure) {
    (void)closure;
    long n = 0;
    for (int i = 0; i < self->capacity; i++) n += self->lanes[i].state == LANE_RUNNING;
    return PyLong_FromLong(n);
}

static PyObject *Lanes_get_capacity(LanesObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->capacity);
}

static PyMethodDef Lanes_methods[] = {
    {"start", (PyCFunction)Lanes_start, METH_VARARGS, start_doc},
    {"run", (PyCFunction)Lanes_run, METH_O, run_doc},
    {"take", (PyCFunction)Lanes_take, METH_O, take_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lanes_getset[] = {
    {"running", (getter)Lanes_get_running, NULL, running_doc, NULL},
    {"capacity", (getter)Lanes_get_capacity, NULL, "How many lanes there are.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Lanes_doc,
"Lanes(capacity=4)\n--\n\n"
"Up to `capacity` (1..8) bcrypt computations run interleaved by one thread.");

static PyTypeObject LanesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cake_bcrypt._lanes.Lanes",
    .tp_basicsize = sizeof(LanesObject),
    .tp_dealloc = (destructor)Lanes_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Lanes_doc,
    .tp_methods = Lanes_methods,
    .tp_getset = Lanes_getset,
    .tp_new = Lanes_new,
};

static struct PyModuleDef lanes_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cake_bcrypt._lanes",
    .m_doc = "Several bcrypt computations interleaved in one thread.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__lanes(void) {
    if (PyType_Ready(&LanesType) < 0) return NULL;
    PyObject *module = PyModule_Create(&lanes_module);
    if (module == NULL) return NULL;
    Py_INCREF(&LanesType);
    if (PyModule_AddObject(module, "Lanes", (PyObject *)&LanesType) < 0 ||
        PyModule_AddIntConstant(module, "MAX_LANES", MAX_LANES) < 0) {
        Py_DECREF(&LanesType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
