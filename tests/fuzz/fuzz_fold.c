/*
 * fuzz_fold.c - a libFuzzer harness for fusion's numeric core, csrc/fold.c.
 *
 * Each input describes one fold: its map and direction, dtypes, shapes,
 * groups, strides (permuted, with gaps, reversed, expanded or arbitrary),
 * storage bounds (sometimes too small), optional biases and norm affine
 * parameters, a post norm, and every stored value (NaN, inf, subnormals and
 * huge values included). The harness runs the core exactly as csrc/module.c
 * does, fusion_norm_affine() for each norm, fusion_fold_check(), then
 * fusion_fold_apply() only if the check passed, and judges the outcome with
 * a differential oracle computed here:
 *
 *   - The statuses are consistent. The harness derives, independently of
 *     the core, every reason the fold must fail (a view outside its storage,
 *     a written view that reaches an element twice, a non-finite input,
 *     var + eps <= 0, a shape mismatch, a fused value that does not fit).
 *     The fold must fail exactly when one holds, with a status belonging to
 *     one that holds. Values within a hair of the overflow threshold may go
 *     either way.
 *   - A check writes nothing, failed or not.
 *   - Every fused value is the exact result rounded once, computed here in
 *     __float128 (113 bits), unless the exact result lies within the core's
 *     working resolution of a rounding midpoint (float64 or long double; for
 *     a bias, of the magnitudes of the terms it sums), where the neighbour
 *     is allowed. This is stricter than DESIGN.md's "within 1 ULP": a
 *     fold that truncated instead of rounding would pass that one.
 *   - Nothing outside the written views changes, nothing read-only changes.
 *   - Every instruction-set path the CPU has (fold.h's fusion_set_isa), run
 *     on the same input after the baseline, passes all of the above and
 *     reports and writes exactly what the baseline did, to the bit.
 *
 * Every view is its own allocation of exactly its declared [lo, hi) range,
 * so AddressSanitizer catches any access outside it. Anything unexpected
 * aborts, which libFuzzer reports as a crash with the input saved.
 */
#include "fold.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef __float128 quad;

/* ------------------------------------------------------------------------ */
/* Reading the input: past its end every byte is 0.                          */

typedef struct {
    const uint8_t *p;
    size_t n;
} reader;

static unsigned
rd_u8(reader *r)
{
    if (r->n == 0) {
        return 0;
    }
    r->n--;
    return *r->p++;
}

static uint64_t
rd_bits(reader *r, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) {
        v |= (uint64_t)rd_u8(r) << (8 * i);
    }
    return v;
}

/* An integer in [0, n). */
static int64_t
rd_below(reader *r, int64_t n)
{
    return (int64_t)(rd_u8(r) % (unsigned)n);
}

/* ------------------------------------------------------------------------ */
/* The oracle's view of the dtypes, independent of fold.c.                   */

static size_t
esize(fusion_dtype dt)
{
    return dt == FUSION_DTYPE_F64 ? 8 : dt == FUSION_DTYPE_F32 ? 4 : 2;
}

static double
decode(fusion_dtype dt, uint64_t bits)
{
    switch (dt) {
        case FUSION_DTYPE_F16: {
            /* sign * 2^(e - 15) * 1.m, or 2^-14 * 0.m for e == 0 */
            int e = (int)((bits >> 10) & 0x1F);
            double m = (double)(bits & 0x3FF) / 1024.0;
            double v = e == 0    ? m * 0x1p-14
                       : e == 31 ? (m != 0 ? NAN : INFINITY)
                                 : (1.0 + m) * pow(2.0, e - 15);
            return (bits & 0x8000) ? -v : v;
        }
        case FUSION_DTYPE_BF16: {
            uint32_t u = (uint32_t)bits << 16;
            float f;
            memcpy(&f, &u, 4);
            return (double)f;
        }
        case FUSION_DTYPE_F32: {
            uint32_t u = (uint32_t)bits;
            float f;
            memcpy(&f, &u, 4);
            return (double)f;
        }
        default: {
            double d;
            memcpy(&d, &bits, 8);
            return d;
        }
    }
}

static int
quad_signbit(quad x)
{
    unsigned char b[sizeof(quad)];
    memcpy(b, &x, sizeof b);
    return b[15] >> 7;
}

static quad
quad_abs(quad x)
{
    return x < 0 ? -x : x;
}

static quad
quad_sqrt(quad x)
{
    if (!(x > 0)) {
        return 0;
    }
    /* Newton from float64's sqrt; scaling keeps the seed in double range. */
    int shift = 0;
    while (x > (quad)1e300) {
        x /= (quad)0x1p200;
        shift += 100;
    }
    while (x < (quad)1e-300) {
        x *= (quad)0x1p200;
        shift -= 100;
    }
    quad r = (quad)sqrt((double)x);
    r = (r + x / r) / 2;
    r = (r + x / r) / 2;
    r = (r + x / r) / 2;
    for (; shift > 0; shift -= 100) {
        r *= (quad)0x1p100;
    }
    for (; shift < 0; shift += 100) {
        r /= (quad)0x1p100;
    }
    return r;
}

/* x rounded once, to nearest even, to dt: an encoding, inf on overflow. */
static uint64_t
round_to(fusion_dtype dt, quad x)
{
    if (dt == FUSION_DTYPE_F32) {
        float f = (float)x;
        uint32_t u;
        memcpy(&u, &f, 4);
        return u;
    }
    if (dt == FUSION_DTYPE_F64) {
        double d = (double)x;
        uint64_t u;
        memcpy(&u, &d, 8);
        return u;
    }
    uint16_t top = dt == FUSION_DTYPE_F16 ? 0x7BFF : 0x7F7F;
    uint16_t sign = quad_signbit(x) ? 0x8000 : 0;
    quad a = sign ? -x : x;
    quad vmax = decode(dt, top), vprev = decode(dt, top - 1);
    if (a >= vmax + (vmax - vprev) / 2) {
        return sign | (uint16_t)(top + 1);
    }
    uint16_t lo = 0, hi = top;
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if ((quad)decode(dt, mid) <= a) {
            lo = mid;
        }
        else {
            hi = (uint16_t)(mid - 1);
        }
    }
    quad vlo = decode(dt, lo);
    if (vlo == a || lo == top) {
        return sign | lo;
    }
    quad dlo = a - vlo, dhi = (quad)decode(dt, lo + 1) - a;
    uint16_t r;
    if (dlo != dhi) {
        r = dlo < dhi ? lo : (uint16_t)(lo + 1);
    }
    else {
        r = (lo & 1) ? (uint16_t)(lo + 1) : lo;
    }
    return sign | r;
}

/* The largest finite value of dt plus half an ULP: values at or above it in
 * magnitude round to infinity. */
static quad
overflow_threshold(fusion_dtype dt)
{
    switch (dt) {
        case FUSION_DTYPE_F16:
            return 65520;
        case FUSION_DTYPE_BF16:
            return (quad)0x1.ffp+127;
        case FUSION_DTYPE_F32:
            return (quad)0x1.ffffffp+127;
        default:
            return (quad)0x1.fffffffffffffp+1023 + (quad)0x1p+970;
    }
}

static int64_t
ordered(fusion_dtype dt, uint64_t bits)
{
    int bitsz = (int)(8 * esize(dt));
    uint64_t sign = (uint64_t)1 << (bitsz - 1);
    int64_t mag = (int64_t)(bits & (sign - 1));
    return (bits & sign) ? -mag : mag;
}

static int64_t
ulp_distance(fusion_dtype dt, uint64_t a, uint64_t b)
{
    int64_t d = ordered(dt, a) - ordered(dt, b);
    return d < 0 ? -d : d;
}

static uint64_t
read_bits(const unsigned char *p, fusion_dtype dt)
{
    uint64_t v = 0;
    memcpy(&v, p, esize(dt)); /* little endian */
    return v;
}

static void
write_bits(unsigned char *p, fusion_dtype dt, uint64_t bits)
{
    memcpy(p, &bits, esize(dt));
}

static void
fail(const char *what)
{
    fprintf(stderr, "fuzz_fold: %s\n", what);
    abort();
}

/* ------------------------------------------------------------------------ */
/* Tensors: a view over an allocation of exactly [lo, hi).                 */

typedef struct {
    fusion_view v;
    int present;
    int64_t numel;
    unsigned char *alloc; /* element lo of the view */
    unsigned char *snapshot;
    int64_t alloc_numel;
    int in_bounds;  /* every element lies in [lo, hi) */
    int duplicates; /* two indices reach one element */
    int nested;     /* strides nest: the core's no-overlap proof applies */
    int nonfinite;  /* a stored value of the view is NaN or inf */
} tensor;

static int64_t
elem_offset(const fusion_view *v, int64_t flat)
{
    int64_t off = 0;
    for (int d = v->ndim - 1; d >= 0; d--) {
        off += (flat % v->sizes[d]) * v->strides[d];
        flat /= v->sizes[d];
    }
    return off;
}

static unsigned char *
elem_ptr(const tensor *t, int64_t flat)
{
    return (unsigned char *)t->v.data +
           elem_offset(&t->v, flat) * (int64_t)esize(t->v.dtype);
}

static double
tensor_get(const tensor *t, int64_t flat)
{
    return decode(t->v.dtype, read_bits(elem_ptr(t, flat), t->v.dtype));
}

static int
cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* One value of dt from the input. Mostly small multiples of 1/16 (exact in
 * every dtype, and they cancel), then any significand at a moderate
 * exponent, then raw encodings: NaN, inf, subnormals, the largest values. */
static uint64_t
rd_value(reader *r, fusion_dtype dt, int mode, int positive)
{
    uint64_t bits;
    if (mode == 0) {
        int k = (int)(int8_t)rd_u8(r);
        if (positive) {
            k = (k < 0 ? -k : k) + 1;
        }
        bits = round_to(dt, (quad)k / 16);
    }
    else if (mode == 1) {
        double x = (double)(rd_bits(r, 2) | 0x10000) / 65536.0;
        x = ldexp(x, (int)rd_below(r, 16) - 8);
        if (!positive && (rd_u8(r) & 1)) {
            x = -x;
        }
        if (dt == FUSION_DTYPE_F64) {
            x += ldexp((double)rd_bits(r, 4), -52) * x; /* more bits */
        }
        bits = round_to(dt, (quad)x);
    }
    else {
        bits = rd_bits(r, (int)esize(dt));
    }
    return bits;
}

/* Chooses a layout for a view of the given sizes (nested, arbitrary or
 * expanded strides; storage that may stop short of the view), allocates
 * exactly its storage, and fills its elements from the input. */
static void
tensor_make(tensor *t, reader *r, fusion_dtype dt, int ndim,
            const int64_t *sizes, int value_mode, int positive)
{
    memset(t, 0, sizeof *t);
    t->present = 1;
    t->v.dtype = dt;
    t->v.ndim = ndim;
    t->numel = 1;
    for (int d = 0; d < ndim; d++) {
        t->v.sizes[d] = sizes[d];
        t->numel *= sizes[d];
    }
    unsigned layout = rd_u8(r);
    if ((layout & 7) < 6) {
        /* Nested strides: a permutation, gaps, some dims reversed. */
        int order[FUSION_MAX_DIMS];
        for (int d = 0; d < ndim; d++) {
            order[d] = d;
        }
        for (int d = ndim - 1; d > 0; d--) {
            int k = (int)rd_below(r, d + 1);
            int tmp = order[d];
            order[d] = order[k];
            order[k] = tmp;
        }
        int64_t stride = 1;
        for (int k = ndim - 1; k >= 0; k--) {
            int d = order[k];
            unsigned g = rd_u8(r);
            stride += (g & 3) == 3 ? (g >> 2) % 3 : 0; /* a gap */
            t->v.strides[d] = (g & 0x30) == 0x30 ? -stride : stride;
            stride *= sizes[d] > 0 ? sizes[d] : 1;
        }
    }
    else if ((layout & 7) == 6) {
        /* Arbitrary small strides: expanded, overlapping, anything. */
        for (int d = 0; d < ndim; d++) {
            t->v.strides[d] = (int64_t)rd_below(r, 9) - 4;
        }
    }
    else {
        /* Contiguous, with one dim expanded (stride 0). */
        int64_t stride = 1;
        for (int d = ndim - 1; d >= 0; d--) {
            t->v.strides[d] = stride;
            stride *= sizes[d] > 0 ? sizes[d] : 1;
        }
        if (ndim > 0) {
            t->v.strides[rd_below(r, ndim)] = 0;
        }
    }

    /* Where the elements lie, and whether two indices meet. */
    int64_t min = 0, max = 0;
    int64_t *offs =
        malloc((size_t)(t->numel > 0 ? t->numel : 1) * sizeof(int64_t));
    if (offs == NULL) {
        fail("out of memory");
    }
    for (int64_t i = 0; i < t->numel; i++) {
        offs[i] = elem_offset(&t->v, i);
        min = offs[i] < min ? offs[i] : min;
        max = offs[i] > max ? offs[i] : max;
    }
    qsort(offs, (size_t)t->numel, sizeof(int64_t), cmp_i64);
    for (int64_t i = 1; i < t->numel; i++) {
        t->duplicates |= offs[i] == offs[i - 1];
    }
    free(offs);
    /* The nesting that torch's layouts have: ordered by |stride|, each dim
     * of size > 1 steps past everything the smaller ones reach. */
    int64_t st[FUSION_MAX_DIMS], sz[FUSION_MAX_DIMS];
    int n = 0;
    for (int d = 0; d < ndim; d++) {
        if (t->v.sizes[d] > 1) {
            int64_t s =
                t->v.strides[d] < 0 ? -t->v.strides[d] : t->v.strides[d];
            int k = n++;
            while (k > 0 && st[k - 1] > s) {
                st[k] = st[k - 1];
                sz[k] = sz[k - 1];
                k--;
            }
            st[k] = s;
            sz[k] = t->v.sizes[d];
        }
    }
    int64_t reach = 0;
    t->nested = 1;
    for (int k = 0; k < n; k++) {
        t->nested &= st[k] > reach;
        reach += (sz[k] - 1) * st[k];
    }

    /* The storage: [min, max] with slack, and now and then a range that
     * stops short of the view (which the core must reject untouched). */
    unsigned b = rd_u8(r);
    t->v.lo = min - (int64_t)(b & 3);
    t->v.hi = max + 1 + (int64_t)((b >> 2) & 3);
    if ((b >> 4) == 15 && max >= 1) {
        t->v.hi = max;
    }
    else if ((b >> 4) == 14 && min <= -1) {
        t->v.lo = min + 1;
    }
    t->in_bounds = t->numel == 0 || (min >= t->v.lo && max < t->v.hi);
    t->alloc_numel = t->v.hi - t->v.lo;
    size_t es = esize(dt);
    t->alloc = malloc((size_t)t->alloc_numel * es);
    t->snapshot = malloc((size_t)t->alloc_numel * es);
    if (t->alloc == NULL || t->snapshot == NULL) {
        fail("out of memory");
    }
    /* Outside the view: a NaN that a stray read would report. */
    uint64_t sentinel = dt == FUSION_DTYPE_F16    ? 0x7E5A
                        : dt == FUSION_DTYPE_BF16 ? 0x7FDA
                        : dt == FUSION_DTYPE_F32  ? 0x7FC0005Au
                                                  : 0x7FF800000000005Au;
    for (int64_t k = 0; k < t->alloc_numel; k++) {
        write_bits(t->alloc + k * (int64_t)es, dt, sentinel);
    }
    t->v.data = t->alloc - t->v.lo * (int64_t)es;
    if (!t->in_bounds) {
        return; /* the core must not touch it; no values needed */
    }
    for (int64_t i = 0; i < t->numel; i++) {
        uint64_t bits = rd_value(r, dt, value_mode, positive);
        write_bits(elem_ptr(t, i), dt, bits);
    }
    /* After the writes: with duplicates the last write wins. */
    for (int64_t i = 0; i < t->numel; i++) {
        t->nonfinite |= !isfinite(tensor_get(t, i));
    }
}

static void
vector_make(tensor *t, reader *r, fusion_dtype dt, int64_t n, int value_mode,
            int positive)
{
    tensor_make(t, r, dt, 1, &n, value_mode, positive);
}

static void
tensor_free(tensor *t)
{
    free(t->alloc);
    free(t->snapshot);
    memset(t, 0, sizeof *t);
}

static void
tensor_snapshot(tensor *t)
{
    if (t->present) {
        memcpy(t->snapshot, t->alloc,
               (size_t)t->alloc_numel * esize(t->v.dtype));
    }
}

static int
tensor_unchanged(const tensor *t)
{
    return !t->present ||
           memcmp(t->snapshot, t->alloc,
                  (size_t)t->alloc_numel * esize(t->v.dtype)) == 0;
}

/* The stored value of element i before anything was written. */
static double
tensor_orig(const tensor *t, int64_t i)
{
    const unsigned char *p = t->snapshot + (elem_ptr(t, i) - t->alloc);
    return decode(t->v.dtype, read_bits(p, t->v.dtype));
}

/* True when no element outside the view changed. */
static int
tensor_outside_unchanged(const tensor *t)
{
    size_t es = esize(t->v.dtype);
    char *in_view = calloc((size_t)t->alloc_numel, 1);
    if (in_view == NULL) {
        fail("out of memory");
    }
    for (int64_t i = 0; i < t->numel; i++) {
        in_view[(elem_ptr(t, i) - t->alloc) / (int64_t)es] = 1;
    }
    int ok = 1;
    for (int64_t k = 0; k < t->alloc_numel; k++) {
        if (!in_view[k] && memcmp(t->alloc + k * (int64_t)es,
                                  t->snapshot + k * (int64_t)es, es) != 0) {
            ok = 0;
        }
    }
    free(in_view);
    return ok;
}

/* ------------------------------------------------------------------------ */
/* One fold.                                                                 */

enum { MAP_AFTER_AXIS0, MAP_AFTER_GROUPED, MAP_BEFORE_GROUPED };

enum {
    T_W,
    T_BIAS_IN,
    T_BIAS_OUT,
    T_MEAN,
    T_VAR,
    T_GAMMA,
    T_BETA,
    T_PMEAN,
    T_PVAR,
    T_PGAMMA,
    T_PBETA,
    T_COUNT
};

typedef struct {
    tensor t[T_COUNT];
    int map, aliased, has_post;
    int64_t groups, channels, d_out;
    double eps, post_eps;
    fusion_norm norm, post;
    fusion_fold fold;
} fold_input;

/* Reasons a fold must fail, as a bit set of statuses. */
#define BIT(st) (1u << (st))

static double
rd_eps(reader *r)
{
    static const double table[8] = {1e-5, 1e-3,  0.0,    0.1,
                                    1.0,  -1e-5, 1e-300, 1e308};
    unsigned k = rd_u8(r) % 9;
    if (k < 8) {
        return table[k];
    }
    double d;
    uint64_t bits = rd_bits(r, 8);
    memcpy(&d, &bits, 8);
    return d;
}

static int64_t
vector_len(reader *r, int64_t n)
{
    /* Now and then a length that disagrees with the layer. */
    unsigned b = rd_u8(r);
    if (b == 255) {
        return n + 1;
    }
    if (b == 254 && n > 0) {
        return n - 1;
    }
    return n;
}

static void
norm_make(fold_input *in, reader *r, int first, int64_t n, fusion_dtype dt,
          fusion_norm *norm)
{
    int mode = (int)rd_below(r, 3);
    vector_make(&in->t[first], r, dt, vector_len(r, n), mode, 0);
    vector_make(&in->t[first + 1], r, dt, vector_len(r, n), mode, 1);
    unsigned affine = rd_u8(r);
    if (affine & 1) {
        vector_make(&in->t[first + 2], r, dt, vector_len(r, n), mode, 0);
    }
    if (affine & 2) {
        vector_make(&in->t[first + 3], r, dt, vector_len(r, n), mode, 0);
    }
    norm->mean = in->t[first].v;
    norm->var = in->t[first + 1].v;
    norm->weight = in->t[first + 2].v; /* dtype NONE when absent */
    norm->bias = in->t[first + 3].v;
}

static fusion_dtype
rd_dtype(reader *r)
{
    return (fusion_dtype)(1 + rd_below(r, 4));
}

/* Builds a fold from the input. Returns 0, or -1 when the input does not
 * describe one the Python layer could pass (then nothing was allocated). */
static int
fold_make(fold_input *in, reader *r)
{
    memset(in, 0, sizeof *in);
    in->map = (int)rd_below(r, 3);
    int ndim = 2 + (int)rd_below(r, 4);
    in->groups = 1 + rd_below(r, 4);
    int64_t sizes[FUSION_MAX_DIMS];
    sizes[0] = in->groups * rd_below(r, 4);
    sizes[1] = rd_below(r, 5);
    int64_t numel = sizes[0] * sizes[1];
    for (int d = 2; d < ndim; d++) {
        sizes[d] = rd_below(r, 4);
        numel *= sizes[d];
    }
    if (numel > 2048) {
        return -1;
    }
    fusion_dtype wdt = rd_dtype(r);
    unsigned types = rd_u8(r);
    /* Mostly one dtype throughout, as in a model; sometimes mixed. */
    fusion_dtype bdt = (types & 3) == 3 ? rd_dtype(r) : wdt;
    fusion_dtype sdt = (types & 12) == 12 ? rd_dtype(r) : wdt;
    int before = in->map == MAP_BEFORE_GROUPED;
    in->channels =
        in->map == MAP_AFTER_AXIS0 ? sizes[0] : in->groups * sizes[1];
    in->d_out = before ? sizes[0] : in->channels;

    tensor_make(&in->t[T_W], r, wdt, ndim, sizes, (int)rd_below(r, 3), 0);
    in->fold.weight = in->t[T_W].v;
    unsigned bias = rd_u8(r) % 3; /* none, separate, bias_out is bias_in */
    int bmode = (int)rd_below(r, 3);
    if (bias != 0) {
        vector_make(&in->t[T_BIAS_IN], r, bdt, vector_len(r, in->d_out), bmode,
                    0);
        in->fold.bias_in = in->t[T_BIAS_IN].v;
    }
    if (bias == 2) {
        in->aliased = 1;
        in->fold.bias_out = in->t[T_BIAS_IN].v;
    }
    else {
        vector_make(&in->t[T_BIAS_OUT], r, bdt, vector_len(r, in->d_out),
                    bmode, 0);
        in->fold.bias_out = in->t[T_BIAS_OUT].v;
    }
    in->eps = rd_eps(r);
    norm_make(in, r, T_MEAN, in->channels, sdt, &in->norm);
    in->norm.eps = in->eps;
    in->has_post = before && (rd_u8(r) & 1);
    if (in->has_post) {
        in->post_eps = rd_eps(r);
        norm_make(in, r, T_PMEAN, in->d_out, sdt, &in->post);
        in->post.eps = in->post_eps;
    }
    in->fold.direction = before ? FUSION_NORM_BEFORE : FUSION_NORM_AFTER;
    in->fold.map = in->map == MAP_AFTER_AXIS0 ? FUSION_AXIS0 : FUSION_GROUPED;
    in->fold.groups = in->groups;
    return 0;
}

static void
fold_free(fold_input *in)
{
    for (int i = 0; i < T_COUNT; i++) {
        tensor_free(&in->t[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* The oracle.                                                               */

typedef struct {
    unsigned must; /* statuses of reasons that hold: the fold must fail */
    unsigned may;  /* statuses allowed beyond those, e.g. near overflow */
} verdict;

/* Records every reason a 1-D view of n elements is bad (the core reports
 * one of them, module.c's own shape check another). */
static int
vector_ok(const tensor *t, int64_t n, verdict *v)
{
    int ok = 1;
    if (!t->in_bounds) {
        v->must |= BIT(FUSION_E_BOUNDS);
        ok = 0;
    }
    if (t->v.sizes[0] != n) {
        v->must |= BIT(FUSION_E_SHAPE);
        ok = 0;
    }
    return ok;
}

/* The exact affine map of channel c; flags reasons to fail. */
static void
exact_affine(const fold_input *in, int first, double eps, int64_t c, quad *s,
             quad *t, verdict *v)
{
    const tensor *mean = &in->t[first], *var = &in->t[first + 1];
    const tensor *gamma = &in->t[first + 2], *beta = &in->t[first + 3];
    double m = tensor_get(mean, c), vv = tensor_get(var, c);
    double g = gamma->present ? tensor_get(gamma, c) : 1.0;
    double b = beta->present ? tensor_get(beta, c) : 0.0;
    *s = 0;
    *t = 0;
    if (!isfinite(m) || !isfinite(vv) || !isfinite(g) || !isfinite(b)) {
        v->must |= BIT(FUSION_E_NONFINITE);
        return;
    }
    /* The contract is var + eps > 0 as float64 computes it. */
    double denom = vv + eps;
    if (!(denom > 0.0)) {
        v->must |= BIT(FUSION_E_VARIANCE);
        return;
    }
    *s = (quad)g / quad_sqrt((quad)vv + (quad)eps);
    *t = (quad)b - (quad)m * *s;
    /* The scale and shift are float64 numbers in the core. */
    double sd = g / sqrt(denom);
    double td = fma(-m, sd, b);
    if (!isfinite(sd) || !isfinite(td)) {
        v->must |= BIT(FUSION_E_OVERFLOW);
    }
    if (quad_abs(*s) > (quad)0x1p1000 || quad_abs(*t) > (quad)0x1p1000) {
        v->may |= BIT(FUSION_E_OVERFLOW);
    }
}

/* Judges whether an exact fused value fits dt; near the threshold both
 * outcomes are allowed, since the core's intermediates are rounded. */
static void
judge_fit(fusion_dtype dt, quad exact, verdict *v)
{
    quad a = quad_abs(exact), t = overflow_threshold(dt);
    if (a >= t * (1 + (quad)0x1p-40)) {
        v->must |= BIT(FUSION_E_OVERFLOW);
    }
    else if (a >= t * (1 - (quad)0x1p-40)) {
        v->may |= BIT(FUSION_E_OVERFLOW);
    }
}

typedef struct {
    quad *s, *t, *ps, *pt; /* affine maps of the norm and the post norm */
    quad *bias, *mag;      /* exact fused bias, magnitudes that cancel */
} exact_fold;

static void
exact_free(exact_fold *e)
{
    free(e->s);
    free(e->t);
    free(e->ps);
    free(e->pt);
    free(e->bias);
    free(e->mag);
}

static quad *
qalloc(int64_t n)
{
    quad *p = calloc((size_t)(n > 0 ? n : 1), sizeof(quad));
    if (p == NULL) {
        fail("out of memory");
    }
    return p;
}

static int64_t
channel_of(const fold_input *in, int64_t i0, int64_t i1)
{
    if (in->map == MAP_AFTER_AXIS0) {
        return i0;
    }
    int64_t a = in->t[T_W].v.sizes[0] / in->groups;
    return (i0 / a) * in->t[T_W].v.sizes[1] + i1;
}

/* Everything the fold must do, from the stored inputs alone. */
static verdict
oracle(const fold_input *in, exact_fold *e)
{
    verdict v = {0, 0};
    const tensor *w = &in->t[T_W];
    int before = in->map == MAP_BEFORE_GROUPED;
    memset(e, 0, sizeof *e);
    e->s = qalloc(in->channels);
    e->t = qalloc(in->channels);
    e->ps = qalloc(in->d_out);
    e->pt = qalloc(in->d_out);
    e->bias = qalloc(in->d_out);
    e->mag = qalloc(in->d_out);

    /* Views. A weight that does not nest may be refused as overlapping
     * even when it does not overlap: the core proves, it does not search. */
    if (!w->in_bounds) {
        v.must |= BIT(FUSION_E_BOUNDS);
    }
    if (w->duplicates) {
        v.must |= BIT(FUSION_E_OVERLAP);
    }
    if (!w->nested) {
        v.may |= BIT(FUSION_E_OVERLAP);
    }
    int ok_views = w->in_bounds;
    const tensor *bo = in->aliased ? &in->t[T_BIAS_IN] : &in->t[T_BIAS_OUT];
    if (in->t[T_BIAS_IN].present) {
        ok_views &= vector_ok(&in->t[T_BIAS_IN], in->d_out, &v);
    }
    if (vector_ok(bo, in->d_out, &v)) {
        if (bo->duplicates) {
            v.must |= BIT(FUSION_E_OVERLAP);
        }
    }
    else {
        ok_views = 0;
    }
    /* Each norm on its own: the core reports the first norm's problem even
     * when the second norm's views are bad, and the other way round. */
    int main_ok = 1, post_ok = 1;
    for (int k = 0; k < 4; k++) {
        if (in->t[T_MEAN + k].present) {
            main_ok &= vector_ok(&in->t[T_MEAN + k], in->channels, &v);
        }
        if (in->has_post && in->t[T_PMEAN + k].present) {
            post_ok &= vector_ok(&in->t[T_PMEAN + k], in->d_out, &v);
        }
    }
    if (main_ok && !isfinite(in->eps)) {
        v.must |= BIT(FUSION_E_NONFINITE);
        main_ok = 0;
    }
    if (in->has_post && post_ok && !isfinite(in->post_eps)) {
        v.must |= BIT(FUSION_E_NONFINITE);
        post_ok = 0;
    }
    for (int64_t c = 0; main_ok && c < in->channels; c++) {
        exact_affine(in, T_MEAN, in->eps, c, &e->s[c], &e->t[c], &v);
    }
    for (int64_t o = 0; o < in->d_out; o++) {
        e->ps[o] = 1;
        if (in->has_post && post_ok) {
            exact_affine(in, T_PMEAN, in->post_eps, o, &e->ps[o], &e->pt[o],
                         &v);
        }
    }
    if (!main_ok || !post_ok || !ok_views || v.must != 0) {
        return v;
    }
    /* The fused values. A NaN does not stop the judging: the core checks
     * row by row, and may meet an overflow before the NaN. Only the values
     * a NaN makes undefined are skipped. */
    if (w->nonfinite ||
        (in->t[T_BIAS_IN].present && in->t[T_BIAS_IN].nonfinite)) {
        v.must |= BIT(FUSION_E_NONFINITE);
    }
    int64_t d0 = w->v.sizes[0], d1 = w->v.sizes[1];
    int64_t inner = d0 * d1 > 0 ? w->numel / (d0 * d1) : 0;
    char *row_nan = calloc((size_t)(d0 > 0 ? d0 : 1), 1);
    if (row_nan == NULL) {
        fail("out of memory");
    }
    for (int64_t i = 0; i < w->numel; i++) {
        int64_t i0 = i / (d1 * inner), i1 = (i / inner) % d1;
        int64_t c = channel_of(in, i0, i1);
        double xd = tensor_get(w, i);
        if (!isfinite(xd)) {
            row_nan[i0] = 1;
            continue;
        }
        quad x = xd;
        quad f = x * e->s[c];
        if (in->has_post) {
            f *= e->ps[i0];
            /* The core forms scale * post_scale first, in float64 for a
             * narrower weight: that product may overflow on its own. */
            if (quad_abs(e->s[c] * e->ps[i0]) > (quad)0x1p1000) {
                v.may |= BIT(FUSION_E_OVERFLOW);
            }
        }
        judge_fit(w->v.dtype, f, &v);
        if (before) {
            e->bias[i0] += x * e->t[c];
            const tensor *m = &in->t[T_MEAN], *be = &in->t[T_BETA];
            e->mag[i0] += quad_abs(x) *
                          (quad_abs((quad)tensor_get(m, c) * e->s[c]) +
                           (be->present ? quad_abs(tensor_get(be, c)) : 0));
        }
    }
    for (int64_t o = 0; o < in->d_out; o++) {
        const tensor *bi = &in->t[T_BIAS_IN];
        double bd = bi->present ? tensor_get(bi, o) : 0.0;
        if (!isfinite(bd) || (before && row_nan[o])) {
            continue;
        }
        quad b = bd;
        if (before) {
            e->bias[o] += b;
            e->mag[o] += quad_abs(b);
            if (in->has_post) {
                quad pm = tensor_get(&in->t[T_PMEAN], o);
                const tensor *pb = &in->t[T_PBETA];
                quad pbeta = pb->present ? (quad)tensor_get(pb, o) : 0;
                e->bias[o] = (e->bias[o] - pm) * e->ps[o] + pbeta;
                e->mag[o] = (e->mag[o] + quad_abs(pm)) * quad_abs(e->ps[o]) +
                            quad_abs(pbeta);
            }
        }
        else {
            quad m = tensor_get(&in->t[T_MEAN], o);
            const tensor *be = &in->t[T_BETA];
            quad beta = be->present ? (quad)tensor_get(be, o) : 0;
            e->bias[o] = (b - m) * e->s[o] + beta;
            e->mag[o] = (quad_abs(b) + quad_abs(m)) * quad_abs(e->s[o]) +
                        quad_abs(beta);
        }
        judge_fit(bo->v.dtype, e->bias[o], &v);
        /* The bias is summed in long double and rounded to double before
         * the dtype: past 2^1000 of cancelling terms, allow overflow. */
        if (e->mag[o] > (quad)0x1p1000) {
            v.may |= BIT(FUSION_E_OVERFLOW);
        }
    }
    free(row_nan);
    return v;
}

/* Where long double arithmetic is wider than double, the core forms float64
 * weights and every bias in it; elsewhere it is float64 throughout. */
static int
long_double_is_wide(void)
{
    volatile long double one = 1.0L, tiny = 0x1p-60L;
    return one + tiny != one;
}

/* True when got is the rounding of some value within res of exact: the core
 * computes an intermediate within its resolution res of the exact result,
 * then rounds it once. So got must be the exact result rounded once, unless
 * exact lies within res of a midpoint (then a neighbour is allowed too), or
 * the value is a sum that cancels, whose res spans more than an ULP. */
static int
acceptable(fusion_dtype dt, uint64_t got, quad exact, quad res)
{
    if (!isfinite(decode(dt, got))) {
        return 0;
    }
    int64_t g = ordered(dt, got);
    return ordered(dt, round_to(dt, exact - res)) <= g &&
           g <= ordered(dt, round_to(dt, exact + res));
}

static void
report_value(const char *what, int64_t i, fusion_dtype dt, uint64_t got,
             quad exact, quad res)
{
    fprintf(stderr,
            "%s[%lld]: got %.17g, exact %.17g, resolution %.3g, "
            "%lld ULP\n",
            what, (long long)i, decode(dt, got), (double)exact, (double)res,
            (long long)ulp_distance(dt, got, round_to(dt, exact)));
}

/* Compares the written fold with the exact one. */
static void
judge_values(const fold_input *in, const exact_fold *e)
{
    int wide = long_double_is_wide();
    const tensor *w = &in->t[T_W];
    int64_t d0 = w->v.sizes[0], d1 = w->v.sizes[1];
    int64_t inner = d0 * d1 > 0 ? w->numel / (d0 * d1) : 0;
    fusion_dtype wdt = w->v.dtype;
    /* A weight is one product: a float64 scale (a few roundings) for the
     * narrower dtypes, a long double one for float64. */
    quad wres =
        wdt == FUSION_DTYPE_F64 && wide ? (quad)0x1p-58 : (quad)0x1p-49;
    for (int64_t i = 0; i < w->numel; i++) {
        int64_t i0 = i / (d1 * inner), i1 = (i / inner) % d1;
        int64_t c = channel_of(in, i0, i1);
        quad f = (quad)tensor_orig(w, i) * e->s[c];
        if (in->has_post) {
            f *= e->ps[i0];
        }
        uint64_t got = read_bits(elem_ptr(w, i), wdt);
        if (!acceptable(wdt, got, f, quad_abs(f) * wres)) {
            report_value("weight", i, wdt, got, f, quad_abs(f) * wres);
            fail("a fused weight is not the exact result rounded once");
        }
    }
    /* A bias is a sum in long double of terms whose magnitudes add up to
     * mag, rounded to float64 and then, for a narrower dtype, again. */
    const tensor *bo = in->aliased ? &in->t[T_BIAS_IN] : &in->t[T_BIAS_OUT];
    fusion_dtype bdt = bo->v.dtype;
    for (int64_t o = 0; o < in->d_out; o++) {
        quad res = e->mag[o] * (wide ? (quad)0x1p-56 : (quad)0x1p-50);
        if (bdt != FUSION_DTYPE_F64) {
            res += quad_abs(e->bias[o]) * (quad)0x1p-52;
        }
        uint64_t got = read_bits(elem_ptr(bo, o), bdt);
        if (!acceptable(bdt, got, e->bias[o], res)) {
            report_value("bias", o, bdt, got, e->bias[o], res);
            fail("a fused bias is not the exact result rounded once");
        }
    }
}

static void
snapshot_all(fold_input *in)
{
    for (int i = 0; i < T_COUNT; i++) {
        tensor_snapshot(&in->t[i]);
    }
}

static int
unchanged_all(const fold_input *in)
{
    for (int i = 0; i < T_COUNT; i++) {
        if (!tensor_unchanged(&in->t[i])) {
            return 0;
        }
    }
    return 1;
}

/* The sequence of csrc/module.c's prepare(): returns the status, or -1 for
 * the weight shape that module.c refuses itself before calling the core. A
 * failure names a part of the fold. */
static int
run_core(fold_input *in, double *scale, double *shift, double *post_scale,
         double *post_shift, double *new_bias, fusion_where *where_out)
{
    fusion_where where = {FUSION_PART_NONE, FUSION_FIELD_NONE, -1, 0.0};
    fusion_fold *fold = &in->fold;
    int64_t channels = fusion_fold_channels(fold);
    if (fold->weight.ndim < 2 || channels == 0) {
        return -1;
    }
    if (channels != in->channels ||
        fusion_fold_out_channels(fold) != in->d_out) {
        fail("fusion_fold_channels disagrees with the layer");
    }
    fusion_status st = fusion_norm_affine(&in->norm, FUSION_PART_NORM,
                                          channels, scale, shift, &where);
    if (st == FUSION_OK) {
        fold->norm = &in->norm;
        fold->scale = scale;
        if (in->has_post) {
            st = fusion_norm_affine(&in->post, FUSION_PART_POST, in->d_out,
                                    post_scale, post_shift, &where);
            fold->post = &in->post;
            fold->post_scale = post_scale;
        }
    }
    if (st == FUSION_OK) {
        st = fusion_fold_check(fold, new_bias, &where);
    }
    if (st != FUSION_OK && where.part == FUSION_PART_NONE &&
        st != FUSION_E_ARG) {
        fail("a failed check names no part of the fold");
    }
    *where_out = where;
    return (int)st;
}

/* Puts every tensor back as fold_make() filled it (the snapshot), so that
 * the next instruction-set path folds the same input. */
static void
restore_all(fold_input *in)
{
    for (int i = 0; i < T_COUNT; i++) {
        tensor *t = &in->t[i];
        if (t->present) {
            memcpy(t->alloc, t->snapshot,
                   (size_t)t->alloc_numel * esize(t->v.dtype));
        }
    }
}

/* What one path did: its status, where, and the written storage. */
typedef struct {
    int st;
    fusion_where where;
    unsigned char *w, *b;
    size_t w_bytes, b_bytes;
} path_result;

static void
path_record(const fold_input *in, int st, const fusion_where *where,
            path_result *r)
{
    const tensor *w = &in->t[T_W];
    const tensor *bo = in->aliased ? &in->t[T_BIAS_IN] : &in->t[T_BIAS_OUT];
    r->st = st;
    r->where = *where;
    r->w_bytes = (size_t)w->alloc_numel * esize(w->v.dtype);
    r->b_bytes = (size_t)bo->alloc_numel * esize(bo->v.dtype);
    r->w = malloc(r->w_bytes ? r->w_bytes : 1);
    r->b = malloc(r->b_bytes ? r->b_bytes : 1);
    if (r->w == NULL || r->b == NULL) {
        fail("out of memory");
    }
    memcpy(r->w, w->alloc, r->w_bytes);
    memcpy(r->b, bo->alloc, r->b_bytes);
}

/* Every path must do exactly what the baseline did, to the bit. */
static void
path_compare(const path_result *base, const path_result *got, fusion_isa isa)
{
    if (got->st != base->st || got->where.part != base->where.part ||
        got->where.field != base->where.field ||
        got->where.index != base->where.index ||
        memcmp(&got->where.value, &base->where.value, sizeof(double)) != 0) {
        fprintf(stderr,
                "%s: status %d at %lld (%g), baseline %d at %lld (%g)\n",
                fusion_isa_str(isa), got->st, (long long)got->where.index,
                got->where.value, base->st, (long long)base->where.index,
                base->where.value);
        fail("an instruction-set path reports otherwise than the baseline");
    }
    if (memcmp(got->w, base->w, base->w_bytes) != 0 ||
        memcmp(got->b, base->b, base->b_bytes) != 0) {
        fprintf(stderr, "%s\n", fusion_isa_str(isa));
        fail("an instruction-set path writes other bits than the baseline");
    }
}

static void
path_free(path_result *r)
{
    free(r->w);
    free(r->b);
}

static int run_path(fold_input *in, const verdict *v, const exact_fold *e,
                    double *arrays, int64_t nc, int64_t no,
                    fusion_where *where);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size};
    fold_input in;
    if (fold_make(&in, &r) < 0) {
        return 0;
    }
    exact_fold e;
    verdict v = oracle(&in, &e);
    int64_t nc = in.channels > 0 ? in.channels : 1;
    int64_t no = in.d_out > 0 ? in.d_out : 1;
    double *arrays = malloc((size_t)(2 * nc + 3 * no) * sizeof(double));
    if (arrays == NULL) {
        fail("out of memory");
    }

    snapshot_all(&in);
    /* The baseline, then every vector path this CPU has, each on the same
     * input, each judged by the oracle and compared bit by bit with the
     * baseline. */
    static const fusion_isa paths[3] = {FUSION_ISA_BASELINE, FUSION_ISA_AVX2,
                                        FUSION_ISA_AVX512};
    path_result base = {0};
    for (int k = 0; k < 3; k++) {
        if (fusion_set_isa(paths[k]) != FUSION_OK) {
            continue;
        }
        restore_all(&in);
        fusion_where where;
        int st = run_path(&in, &v, &e, arrays, nc, no, &where);
        path_result got;
        path_record(&in, st, &where, &got);
        if (k == 0) {
            base = got;
        }
        else {
            path_compare(&base, &got, paths[k]);
            path_free(&got);
        }
    }
    path_free(&base);
    free(arrays);
    exact_free(&e);
    fold_free(&in);
    return 0;
}

/* The fold into a fresh buffer of the weight's layout (fold.out): it must
 * pass the check as well and leave the weight as it is. Returns the buffer,
 * which holds the weight's view at the same offsets. */
static unsigned char *
fold_into_fresh(const fold_input *in, double *new_bias, fusion_where *where)
{
    const tensor *w = &in->t[T_W];
    size_t es = esize(w->v.dtype);
    size_t bytes = (size_t)w->alloc_numel * es;
    unsigned char *buf = malloc(bytes ? bytes : 1);
    if (buf == NULL) {
        fail("out of memory");
    }
    memset(buf, 0xA5, bytes);
    fusion_fold into = in->fold;
    into.out = w->v;
    into.out.data = buf + ((unsigned char *)w->v.data - w->alloc);
    if (fusion_fold_check(&into, new_bias, where) != FUSION_OK) {
        fail("the check refused the fold into a fresh tensor");
    }
    fusion_fold_apply(&into, new_bias);
    if (!tensor_unchanged(w)) {
        fail("a fold into out wrote the weight");
    }
    return buf;
}

/* One run of the core on the current path, judged by the oracle. */
static int
run_path(fold_input *in_, const verdict *v_, const exact_fold *e_,
         double *arrays, int64_t nc, int64_t no, fusion_where *where)
{
    fold_input in = *in_; /* shallow: the tensors share their storage */
    verdict v = *v_;
    const exact_fold e = *e_;
    double *scale = arrays, *shift = scale + nc, *post_scale = shift + nc;
    double *post_shift = post_scale + no, *new_bias = post_shift + no;
    int st =
        run_core(&in, scale, shift, post_scale, post_shift, new_bias, where);
    if (!unchanged_all(&in)) {
        fail("the check phase wrote a tensor");
    }
    if (st == -1) {
        /* module.c refuses the shape itself: the oracle must agree that
         * something is wrong with the shapes, or the layer is empty. */
        if (!(v.must & BIT(FUSION_E_SHAPE)) && in.channels != 0) {
            fail("module.c's shape check refused a good fold");
        }
    }
    else if (st == FUSION_OK) {
        if (v.must != 0) {
            fprintf(stderr, "reasons to fail: 0x%x\n", v.must);
            fail("the check passed a fold that must fail");
        }
        unsigned char *fresh = fold_into_fresh(&in, new_bias, where);
        fusion_fold_apply(&in.fold, new_bias);
        judge_values(&in, &e);
        const tensor *w = &in.t[T_W];
        size_t es = esize(w->v.dtype);
        for (int64_t i = 0; i < w->numel; i++) {
            const unsigned char *p = elem_ptr(w, i);
            if (memcmp(p, fresh + (p - w->alloc), es) != 0) {
                fail("the fold into a fresh tensor differs from the fold in "
                     "place");
            }
        }
        free(fresh);
        const tensor *bo = in.aliased ? &in.t[T_BIAS_IN] : &in.t[T_BIAS_OUT];
        if (!tensor_outside_unchanged(&in.t[T_W]) ||
            !tensor_outside_unchanged(bo)) {
            fail("apply wrote outside a view");
        }
        for (int k = T_MEAN; k < T_COUNT; k++) {
            if (!tensor_unchanged(&in.t[k])) {
                fail("apply wrote a norm tensor");
            }
        }
        if (!in.aliased && !tensor_unchanged(&in.t[T_BIAS_IN])) {
            fail("apply wrote bias_in");
        }
    }
    else if (!((v.must | v.may) & BIT(st))) {
        fprintf(stderr, "status %d (%s); reasons to fail 0x%x, allowed 0x%x\n",
                st, fusion_status_str((fusion_status)st), v.must, v.may);
        fail(v.must ? "the check failed, not for a reason that holds"
                    : "the check failed a good fold");
    }
    return st;
}
