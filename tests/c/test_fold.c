/*
 * test_fold.c - unit tests of fusion's numeric core, csrc/fold.c.
 *
 * Every fused value is compared with a reference computed here, from the same
 * stored inputs, in __float128 (a 113-bit significand, so that rounding the
 * reference to float64 is practically always the exact result rounded once),
 * then rounded once to the destination dtype by code that shares nothing with
 * fold.c: float16 and bfloat16 by searching the ordered encodings of all
 * finite values, float32 and float64 by the compiler's conversions. __float128
 * rather than long double because valgrind emulates x87 arithmetic at 64 bits.
 *
 * The precision criterion is DESIGN.md's: at least 99.9% of the fused values
 * of each dtype identical to that reference, and every one within 1 ULP.
 *
 * The fold tests run on every instruction-set path the CPU has (fold.h's
 * fusion_set_isa), the baseline included, and the isa tests compare every
 * path's bytes with the baseline's: float16 and bfloat16 exhaustively over
 * their encodings, at every rounding midpoint, and where rounding through
 * float32 would go wrong.
 *
 * Tests print nothing when they pass, except the per-dtype precision
 * summary and the isa summary. The binary ends with one line, "N passed, M
 * failed", and exits non-zero when M > 0. An optional argument is the seed of
 * the random cases; FOLD_TEST_MESSAGES=n raises the number of failure messages
 * shown (40).
 */
#include "fold.h"

#include <fenv.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define HAVE_MXCSR 1
#endif

typedef __float128 quad;

/* ------------------------------------------------------------------------ */
/* A minimal harness: a test fails when any CHECK in it fails.               */

static int g_passed, g_failed, g_test_failed, g_messages;
static int g_max_messages = 40; /* FOLD_TEST_MESSAGES overrides */

/* fold.c rounds float64 values once by working in long double. Where long
 * double arithmetic is no wider than double at run time (valgrind emulates
 * x87 at 53 bits), float64 results cannot meet the precision criterion, and
 * only their memory behaviour is tested. */
static int g_wide_long_double;

static int
long_double_is_wide(void)
{
    volatile long double one = 1.0L, tiny = 0x1p-60L;
    return one + tiny != one;
}

static int
precision_asserted(fusion_dtype dt)
{
    return dt != FUSION_DTYPE_F64 || g_wide_long_double;
}
static const char *g_test;
static char g_context[256];
static const char *g_isa_name = ""; /* the instruction-set path under test */

static void
check_failed(const char *file, int line, const char *cond, const char *fmt,
             ...)
{
    g_test_failed = 1;
    /* A broken build can fail thousands of checks; the first few say why. */
    if (++g_messages > g_max_messages) {
        return;
    }
    fprintf(stderr, "FAIL %s%s%s%s%s (%s:%d): %s: ", g_isa_name,
            g_isa_name[0] ? ": " : "", g_test, g_context[0] ? " " : "",
            g_context, file, line, cond);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);             \
        }                                                                     \
    } while (0)

static void
test_begin(const char *name)
{
    g_test = name;
    g_test_failed = 0;
    g_context[0] = '\0';
}

static void
test_end(void)
{
    if (g_test_failed) {
        g_failed++;
    }
    else {
        g_passed++;
    }
}

static void
run(const char *name, void (*fn)(void))
{
    test_begin(name);
    fn();
    test_end();
}

static void *
xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* xorshift64*: deterministic across platforms, unlike rand(). */
static uint64_t g_rng = 0x9E3779B97F4A7C15u;

static uint64_t
rng_next(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Du;
}

static int64_t
rng_int(int64_t lo, int64_t hi) /* inclusive */
{
    return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1));
}

static double
rng_unit(void) /* [0, 1) with 53 random bits */
{
    return (double)(rng_next() >> 11) * 0x1p-53;
}

static double
rng_normal(void)
{
    double u = rng_unit(), v = rng_unit();
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

/* ------------------------------------------------------------------------ */
/* The reference's own view of the dtypes, independent of fold.c.           */

static const fusion_dtype ALL_DTYPES[4] = {FUSION_DTYPE_F16, FUSION_DTYPE_BF16,
                                           FUSION_DTYPE_F32, FUSION_DTYPE_F64};

static const char *
dtype_name(fusion_dtype dt)
{
    switch (dt) {
        case FUSION_DTYPE_F16:
            return "f16";
        case FUSION_DTYPE_BF16:
            return "bf16";
        case FUSION_DTYPE_F32:
            return "f32";
        case FUSION_DTYPE_F64:
            return "f64";
        default:
            return "none";
    }
}

static size_t
esize(fusion_dtype dt)
{
    return dt == FUSION_DTYPE_F64 ? 8 : dt == FUSION_DTYPE_F32 ? 4 : 2;
}

/* The value of an encoding: float16 through the compiler's _Float16, bfloat16
 * as the top half of a float. */
static double
ref_decode(fusion_dtype dt, uint64_t bits)
{
    switch (dt) {
        case FUSION_DTYPE_F16: {
            uint16_t h = (uint16_t)bits;
            _Float16 f;
            memcpy(&f, &h, 2);
            return (double)f;
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
    return b[15] >> 7; /* little endian: the sign is the top bit */
}

static quad
quad_abs(quad x)
{
    return x < 0 ? -x : x;
}

static quad
quad_sqrt(quad x)
{
    if (x <= 0) {
        return 0;
    }
    /* Scaling by 2^200 keeps the float64 seed finite; two Newton steps take
     * its 53 correct bits past 113. */
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
    for (; shift > 0; shift -= 100) {
        r *= (quad)0x1p100;
    }
    for (; shift < 0; shift += 100) {
        r /= (quad)0x1p100;
    }
    return r;
}

/* The encoding of x rounded once, to nearest even, to dt (inf on overflow).
 * For the 16-bit formats this searches the positive finite encodings, which
 * are ordered like their values; it shares no code with fold.c. */
static uint64_t
ref_round(fusion_dtype dt, quad x)
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
    if (x != x) {
        return dt == FUSION_DTYPE_F16 ? 0x7E00 : 0x7FC0;
    }
    uint16_t top = dt == FUSION_DTYPE_F16 ? 0x7BFF : 0x7F7F;
    uint16_t inf = dt == FUSION_DTYPE_F16 ? 0x7C00 : 0x7F80;
    uint16_t sign = quad_signbit(x) ? 0x8000 : 0;
    quad a = sign ? -x : x;
    quad vmax = ref_decode(dt, top), vprev = ref_decode(dt, top - 1);
    if (a >= vmax + (vmax - vprev) / 2) {
        return sign | inf; /* the tie goes to inf: vmax is odd */
    }
    uint16_t lo = 0, hi = top; /* invariant: v(lo) <= a */
    while (lo < hi) {
        uint16_t mid = (uint16_t)((lo + hi + 1) / 2);
        if ((quad)ref_decode(dt, mid) <= a) {
            lo = mid;
        }
        else {
            hi = (uint16_t)(mid - 1);
        }
    }
    quad vlo = ref_decode(dt, lo);
    if (vlo == a || lo == top) {
        return sign | lo;
    }
    quad dlo = a - vlo, dhi = (quad)ref_decode(dt, lo + 1) - a;
    uint16_t r;
    if (dlo != dhi) {
        r = dlo < dhi ? lo : (uint16_t)(lo + 1);
    }
    else {
        r = (lo & 1) ? (uint16_t)(lo + 1) : lo; /* a tie goes to even */
    }
    return sign | r;
}

static uint64_t
bits_of_double(fusion_dtype dt, double x)
{
    return ref_round(dt, (quad)x);
}

/* Encodings ordered as integers, so that ULP distances are differences. */
static int64_t
ordered(fusion_dtype dt, uint64_t bits)
{
    int64_t mag;
    int neg;
    if (dt == FUSION_DTYPE_F64) {
        mag = (int64_t)(bits & 0x7FFFFFFFFFFFFFFFu);
        neg = (int)(bits >> 63);
    }
    else if (dt == FUSION_DTYPE_F32) {
        mag = (int64_t)(bits & 0x7FFFFFFFu);
        neg = (int)((bits >> 31) & 1);
    }
    else {
        mag = (int64_t)(bits & 0x7FFFu);
        neg = (int)((bits >> 15) & 1);
    }
    return neg ? -mag : mag;
}

static int64_t
ulp_distance(fusion_dtype dt, uint64_t a, uint64_t b)
{
    int64_t d = ordered(dt, a) - ordered(dt, b);
    return d < 0 ? -d : d;
}

static uint64_t
read_bits(const void *p, fusion_dtype dt)
{
    switch (esize(dt)) {
        case 2: {
            uint16_t v;
            memcpy(&v, p, 2);
            return v;
        }
        case 4: {
            uint32_t v;
            memcpy(&v, p, 4);
            return v;
        }
        default: {
            uint64_t v;
            memcpy(&v, p, 8);
            return v;
        }
    }
}

static void
write_bits(void *p, fusion_dtype dt, uint64_t bits)
{
    switch (esize(dt)) {
        case 2: {
            uint16_t v = (uint16_t)bits;
            memcpy(p, &v, 2);
            break;
        }
        case 4: {
            uint32_t v = (uint32_t)bits;
            memcpy(p, &v, 4);
            break;
        }
        default:
            memcpy(p, &bits, 8);
            break;
    }
}

/* A quiet NaN with a payload: it fills every storage element outside a
 * view, so that a read outside the view shows up as a NaN status and a
 * write outside it as a changed byte. */
static uint64_t
sentinel_bits(fusion_dtype dt)
{
    switch (dt) {
        case FUSION_DTYPE_F16:
            return 0x7E5A;
        case FUSION_DTYPE_BF16:
            return 0x7FDA;
        case FUSION_DTYPE_F32:
            return 0x7FC0005Au;
        default:
            return 0x7FF800000000005Au;
    }
}

/* ------------------------------------------------------------------------ */
/* float16 and bfloat16 rounding, exhaustively.                             */

static void
check_16bit_format(fusion_dtype dt)
{
    uint16_t top = dt == FUSION_DTYPE_F16 ? 0x7BFF : 0x7F7F;
    unsigned char buf[2];
    int64_t bad_load = 0, bad_trip = 0, bad_mid = 0, bad_near = 0;
    int64_t bad_ref = 0;
    for (uint32_t b = 0; b <= 0xFFFF; b++) {
        write_bits(buf, dt, b);
        double got = fusion_load(buf, dt), want = ref_decode(dt, b);
        uint16_t mag = (uint16_t)(b & 0x7FFF);
        if (mag > (uint16_t)(top + 1)) {
            bad_load += !isnan(got);
            continue;
        }
        if (mag == top + 1) {
            bad_load += !(isinf(got) && signbit(got) == signbit(want));
            CHECK(!fusion_fits(got, dt), "%s fits(inf)", dtype_name(dt));
            continue;
        }
        /* Every finite value loads exactly and stores back to itself,
         * -0 and the subnormals included. */
        if (memcmp(&got, &want, sizeof got) != 0) {
            bad_load++;
        }
        unsigned char out[2];
        fusion_store(out, dt, got);
        bad_trip += read_bits(out, dt) != b;
        CHECK(fusion_fits(got, dt), "%s fits(0x%04x)", dtype_name(dt),
              (unsigned)b);
    }
    CHECK(bad_load == 0, "%s: %" PRId64 " encodings load wrongly",
          dtype_name(dt), bad_load);
    CHECK(bad_trip == 0, "%s: %" PRId64 " finite values do not round-trip",
          dtype_name(dt), bad_trip);

    for (uint16_t b = 0; b < top; b++) {
        double v0 = ref_decode(dt, b), v1 = ref_decode(dt, b + 1);
        double mid = v0 + (v1 - v0) / 2; /* exact: a few more bits */
        uint16_t even = (b & 1) ? (uint16_t)(b + 1) : b;
        for (int s = 0; s < 2; s++) {
            double sign = s ? -1.0 : 1.0;
            uint16_t sb = s ? 0x8000 : 0;
            unsigned char out[2];
            fusion_store(out, dt, sign * mid);
            bad_mid += read_bits(out, dt) != (uint64_t)(sb | even);
            fusion_store(out, dt, sign * nextafter(mid, 0.0));
            bad_near += read_bits(out, dt) != (uint64_t)(sb | b);
            fusion_store(out, dt, sign * nextafter(mid, INFINITY));
            bad_near += read_bits(out, dt) != (uint64_t)(sb | (b + 1));
            /* The reference rounding must agree, or the fold tests that
             * rely on it prove nothing. */
            bad_ref += ref_round(dt, (quad)(sign * mid)) != (sb | even);
        }
    }
    CHECK(bad_mid == 0, "%s: %" PRId64 " midpoints not rounded to even",
          dtype_name(dt), bad_mid);
    CHECK(bad_near == 0,
          "%s: %" PRId64 " values next to a midpoint not rounded to nearest",
          dtype_name(dt), bad_near);
    CHECK(bad_ref == 0,
          "%s: the reference rounding is wrong %" PRId64 " times",
          dtype_name(dt), bad_ref);
}

static void
test_f16_exhaustive(void)
{
    check_16bit_format(FUSION_DTYPE_F16);
}

static void
test_bf16_exhaustive(void)
{
    check_16bit_format(FUSION_DTYPE_BF16);
}

static uint64_t
store_bits(fusion_dtype dt, double x)
{
    unsigned char out[8] = {0};
    fusion_store(out, dt, x);
    return read_bits(out, dt);
}

static void
test_overflow_thresholds(void)
{
    /* The largest finite value plus half an ULP is a tie that rounds to
     * infinity (the largest finite significand is odd). */
    struct {
        fusion_dtype dt;
        double threshold;
        uint64_t max_bits;
    } cases[] = {
        {FUSION_DTYPE_F16, 65520.0, 0x7BFF},
        {FUSION_DTYPE_BF16, 0x1.ffp+127, 0x7F7F},
        {FUSION_DTYPE_F32, 0x1.ffffffp+127, 0x7F7FFFFF},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fusion_dtype dt = cases[i].dt;
        double t = cases[i].threshold, below = nextafter(t, 0.0);
        uint64_t sign = (uint64_t)1 << (8 * esize(dt) - 1);
        CHECK(ref_round(dt, (quad)t) == (cases[i].max_bits + 1),
              "%s: reference threshold", dtype_name(dt));
        CHECK(!fusion_fits(t, dt), "%s: fits(%a)", dtype_name(dt), t);
        CHECK(!fusion_fits(-t, dt), "%s: fits(%a)", dtype_name(dt), -t);
        CHECK(fusion_fits(below, dt), "%s: fits(%a)", dtype_name(dt), below);
        CHECK(fusion_fits(-below, dt), "%s: fits(%a)", dtype_name(dt), -below);
        CHECK(store_bits(dt, below) == cases[i].max_bits, "%s: store(%a)",
              dtype_name(dt), below);
        CHECK(store_bits(dt, -below) == (sign | cases[i].max_bits),
              "%s: store(%a)", dtype_name(dt), -below);
        CHECK(!fusion_fits(1e300, dt), "%s: fits(1e300)", dtype_name(dt));
        /* Past the threshold a store gives infinity; a NaN stays a NaN. */
        uint64_t inf = cases[i].max_bits + 1;
        CHECK(store_bits(dt, t) == inf, "%s: store(%a)", dtype_name(dt), t);
        CHECK(store_bits(dt, -1e300) == (sign | inf), "%s: store(-1e300)",
              dtype_name(dt));
        CHECK(store_bits(dt, INFINITY) == inf, "%s: store(inf)",
              dtype_name(dt));
        CHECK((store_bits(dt, NAN) & ~sign) > inf, "%s: store(nan)",
              dtype_name(dt));
    }
    for (size_t i = 0; i < 4; i++) {
        fusion_dtype dt = ALL_DTYPES[i];
        CHECK(!fusion_fits(INFINITY, dt), "%s: fits(inf)", dtype_name(dt));
        CHECK(!fusion_fits(-INFINITY, dt), "%s: fits(-inf)", dtype_name(dt));
        CHECK(!fusion_fits(NAN, dt), "%s: fits(nan)", dtype_name(dt));
        CHECK(fusion_fits(0.0, dt), "%s: fits(0)", dtype_name(dt));
    }
    CHECK(fusion_fits(DBL_MAX, FUSION_DTYPE_F64), "f64: fits(DBL_MAX)");
    CHECK(!fusion_fits(1.0, FUSION_DTYPE_NONE), "none: fits(1)");
}

static void
test_subnormals_and_tiny(void)
{
    struct {
        fusion_dtype dt;
        double min_sub;
    } cases[] = {{FUSION_DTYPE_F16, 0x1p-24}, {FUSION_DTYPE_BF16, 0x1p-133}};
    for (size_t i = 0; i < 2; i++) {
        fusion_dtype dt = cases[i].dt;
        double m = cases[i].min_sub;
        /* Half the smallest subnormal is a tie between 0 (even) and it. */
        CHECK(store_bits(dt, m / 2) == 0, "%s: store(min_sub / 2)",
              dtype_name(dt));
        CHECK(store_bits(dt, -m / 2) == 0x8000, "%s: store(-min_sub / 2)",
              dtype_name(dt));
        CHECK(store_bits(dt, nextafter(m / 2, 1.0)) == 1,
              "%s: store(just above min_sub / 2)", dtype_name(dt));
        CHECK(store_bits(dt, 1.5 * m) == 2, "%s: store(1.5 min_sub)",
              dtype_name(dt));
        CHECK(store_bits(dt, 2.5 * m) == 2, "%s: store(2.5 min_sub)",
              dtype_name(dt));
        CHECK(store_bits(dt, 1e-300) == 0, "%s: store(1e-300)",
              dtype_name(dt));
        CHECK(store_bits(dt, -0x1p-1074) == 0x8000,
              "%s: store(-smallest double)", dtype_name(dt));
        CHECK(store_bits(dt, -0.0) == 0x8000, "%s: store(-0)", dtype_name(dt));
    }
    /* float32 subnormals come from the conversion itself. */
    CHECK(store_bits(FUSION_DTYPE_F32, 0x1p-150) == 0, "f32: store(2^-150)");
    CHECK(store_bits(FUSION_DTYPE_F32, 0x1.8p-149) == 2,
          "f32: store(1.5 * 2^-149)");
}

/* fusion_store against the reference on random doubles over each format's
 * whole exponent range, overflow and underflow included. */
static void
test_store_random(void)
{
    struct {
        fusion_dtype dt;
        int emin, emax;
    } cases[] = {{FUSION_DTYPE_F16, -30, 17},
                 {FUSION_DTYPE_BF16, -140, 129},
                 {FUSION_DTYPE_F32, -155, 129},
                 {FUSION_DTYPE_F64, -1074, 1023}};
    for (size_t i = 0; i < 4; i++) {
        fusion_dtype dt = cases[i].dt;
        int64_t bad = 0, bad_fits = 0;
        for (int k = 0; k < 40000; k++) {
            double x = ldexp(1.0 + rng_unit(),
                             (int)rng_int(cases[i].emin, cases[i].emax));
            if (k & 1) {
                x = -x;
            }
            if (k % 7 == 0) {
                /* A short significand makes ties and exact values likely. */
                x = ldexp(floor(ldexp(x, -ilogb(x) + 12)), ilogb(x) - 12);
            }
            uint64_t want = ref_round(dt, (quad)x);
            int want_fits = isfinite(ref_decode(dt, want));
            bad_fits += fusion_fits(x, dt) != want_fits;
            if (want_fits) {
                bad += store_bits(dt, x) != want;
                bad +=
                    fusion_load(&(uint64_t){want}, dt) != ref_decode(dt, want);
            }
        }
        CHECK(bad == 0, "%s: %" PRId64 " of 40000 stores differ",
              dtype_name(dt), bad);
        CHECK(bad_fits == 0, "%s: fusion_fits wrong %" PRId64 " times",
              dtype_name(dt), bad_fits);
    }
}

static void
test_dtype_basics(void)
{
    CHECK(fusion_dtype_size(FUSION_DTYPE_F16) == 2, "f16 size");
    CHECK(fusion_dtype_size(FUSION_DTYPE_BF16) == 2, "bf16 size");
    CHECK(fusion_dtype_size(FUSION_DTYPE_F32) == 4, "f32 size");
    CHECK(fusion_dtype_size(FUSION_DTYPE_F64) == 8, "f64 size");
    CHECK(fusion_dtype_size(FUSION_DTYPE_NONE) == 0, "none size");
    CHECK(fusion_dtype_size((fusion_dtype)9) == 0, "bad dtype size");
    double d = 1.0;
    CHECK(isnan(fusion_load(&d, FUSION_DTYPE_NONE)), "load(none)");
    unsigned char nan16[2] = {0x01, 0x7C}; /* 0x7C01: a signalling NaN */
    CHECK(isnan(fusion_load(nan16, FUSION_DTYPE_F16)), "load(f16 nan)");
    unsigned char untouched[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    unsigned char copy[8];
    memcpy(copy, untouched, 8);
    fusion_store(untouched, FUSION_DTYPE_NONE, 1.0);
    CHECK(memcmp(copy, untouched, 8) == 0, "store(none) writes nothing");
    for (int s = 0; s <= FUSION_E_OVERLAP; s++) {
        const char *msg = fusion_status_str((fusion_status)s);
        CHECK(msg != NULL && strcmp(msg, "unknown status") != 0,
              "status %d has no message", s);
    }
    CHECK(strcmp(fusion_status_str((fusion_status)99), "unknown status") == 0,
          "an unknown status");
}

/* ------------------------------------------------------------------------ */
/* Strided tensors with their own storage.                                  */

enum {
    LAYOUT_CONTIGUOUS = 0,
    LAYOUT_PERMUTED = 1, /* channels-last for >= 3 dims, transposed for 2 */
    LAYOUT_OFFSET = 2,   /* a view at a storage offset inside a larger one */
    LAYOUT_GAPS = 3,     /* permuted, with gaps between elements and rows,
                          * at an offset */
    LAYOUT_COUNT = 4
};

static const char *LAYOUT_NAMES[LAYOUT_COUNT] = {"contiguous", "permuted",
                                                 "offset", "gaps"};

typedef struct {
    fusion_dtype dtype;
    int64_t numel;         /* elements of the view */
    int64_t storage_numel; /* elements of the storage */
    unsigned char *storage;
    unsigned char *snapshot;
    char *in_view; /* per storage element: does the view reach it */
    fusion_view v;
} tensor;

static void
tensor_free(tensor *t)
{
    free(t->storage);
    free(t->snapshot);
    free(t->in_view);
    memset(t, 0, sizeof *t);
}

/* Storage offset of the element at flat (row-major) index i. */
static int64_t
tensor_offset(const tensor *t, int64_t i)
{
    int64_t off = 0;
    for (int d = t->v.ndim - 1; d >= 0; d--) {
        int64_t size = t->v.sizes[d];
        off += (i % size) * t->v.strides[d];
        i /= size;
    }
    return off;
}

static unsigned char *
tensor_ptr(const tensor *t, int64_t flat)
{
    return (unsigned char *)t->v.data +
           tensor_offset(t, flat) * (int64_t)esize(t->dtype);
}

static double
tensor_get(const tensor *t, int64_t flat)
{
    return ref_decode(t->dtype, read_bits(tensor_ptr(t, flat), t->dtype));
}

static void
tensor_set(tensor *t, int64_t flat, double x)
{
    write_bits(tensor_ptr(t, flat), t->dtype, bits_of_double(t->dtype, x));
}

/* Makes a tensor of the given sizes and layout, every storage element set
 * to the sentinel NaN; the caller fills the view. */
static void
tensor_make(tensor *t, fusion_dtype dt, int ndim, const int64_t *sizes,
            int layout)
{
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->v.dtype = dt;
    t->v.ndim = ndim;
    int order[FUSION_MAX_DIMS]; /* memory order, outermost first */
    for (int d = 0; d < ndim; d++) {
        order[d] = d;
    }
    int permuted = layout == LAYOUT_PERMUTED || layout == LAYOUT_GAPS;
    if (permuted && ndim == 2) {
        order[0] = 1;
        order[1] = 0;
    }
    else if (permuted && ndim >= 3) {
        for (int k = 1; k < ndim - 1; k++) {
            order[k] = k + 1;
        }
        order[ndim - 1] = 1;
    }
    int gaps = layout == LAYOUT_GAPS;
    int64_t stride = gaps ? 2 : 1, span = 0;
    t->numel = 1;
    for (int k = ndim - 1; k >= 0; k--) {
        int d = order[k];
        int64_t size = sizes[d];
        t->v.sizes[d] = size;
        t->v.strides[d] = stride;
        t->numel *= size;
        span += (size > 0 ? size - 1 : 0) * stride;
        stride = stride * (size > 0 ? size : 1) + (gaps ? 3 : 0);
    }
    int64_t offset = layout >= LAYOUT_OFFSET ? 5 + rng_int(0, 3) : 0;
    int64_t tail = layout >= LAYOUT_OFFSET ? 4 : 0;
    t->storage_numel = offset + span + 1 + tail;
    size_t es = esize(dt);
    t->storage = xcalloc((size_t)t->storage_numel, es);
    t->snapshot = xcalloc((size_t)t->storage_numel, es);
    t->in_view = xcalloc((size_t)t->storage_numel, 1);
    for (int64_t k = 0; k < t->storage_numel; k++) {
        write_bits(t->storage + k * es, dt, sentinel_bits(dt));
    }
    t->v.data = t->storage + offset * (int64_t)es;
    t->v.lo = -offset;
    t->v.hi = t->storage_numel - offset;
    for (int64_t i = 0; i < t->numel; i++) {
        t->in_view[offset + tensor_offset(t, i)] = 1;
    }
}

static void
vector_make(tensor *t, fusion_dtype dt, int64_t n, int layout)
{
    /* A 1-D "permutation" is a strided slice, like bn.running_mean[::2]. */
    int layout1 = layout == LAYOUT_PERMUTED ? LAYOUT_GAPS : layout;
    tensor_make(t, dt, 1, &n, layout1);
}

static void
tensor_snapshot(tensor *t)
{
    if (t->storage != NULL) {
        memcpy(t->snapshot, t->storage,
               (size_t)t->storage_numel * esize(t->dtype));
    }
}

static int
tensor_unchanged(const tensor *t)
{
    return t->storage == NULL ||
           memcmp(t->snapshot, t->storage,
                  (size_t)t->storage_numel * esize(t->dtype)) == 0;
}

/* True when no storage element outside the view changed since the
 * snapshot. */
static int
tensor_outside_unchanged(const tensor *t)
{
    size_t es = esize(t->dtype);
    for (int64_t k = 0; k < t->storage_numel; k++) {
        if (!t->in_view[k] &&
            memcmp(t->snapshot + k * es, t->storage + k * es, es) != 0) {
            return 0;
        }
    }
    return 1;
}

/* A random value of dt: the usual range of weights and statistics, with
 * every significand bit of the dtype random. */
static double
random_value(fusion_dtype dt, double scale)
{
    double x = rng_normal() * scale;
    return ref_decode(dt, bits_of_double(dt, x));
}

/* ------------------------------------------------------------------------ */
/* The fold fixture, set up exactly as csrc/module.c does it.               */

enum { MAP_AFTER_AXIS0, MAP_AFTER_GROUPED, MAP_BEFORE_GROUPED, MAP_COUNT };

static const char *MAP_NAMES[MAP_COUNT] = {"after/axis0", "after/grouped",
                                           "before/grouped"};

typedef struct {
    fusion_dtype wdt, bdt, sdt; /* weight, biases, statistics */
    int map, layout, ndim;
    int64_t sizes[FUSION_MAX_DIMS];
    int64_t groups;
    int bias;   /* 0: none, 1: separate bias_out, 2: bias_out is bias_in */
    int affine; /* bit 0: norm weight, bit 1: norm bias */
    int post;   /* 0: none; else 1 + post affine bits */
    double eps, post_eps;
} fold_case;

typedef struct {
    fold_case c;
    tensor w, bias_in, bias_out, mean, var, gamma, beta;
    tensor pmean, pvar, pgamma, pbeta;
    fusion_norm norm, post;
    fusion_fold fold;
    int64_t channels, d_out;
    double *scale, *shift, *post_scale, *post_shift, *new_bias;
} fixture;

static void
fixture_free(fixture *f)
{
    tensor *all[] = {&f->w,    &f->bias_in, &f->bias_out, &f->mean,
                     &f->var,  &f->gamma,   &f->beta,     &f->pmean,
                     &f->pvar, &f->pgamma,  &f->pbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        /* An aliased bias_out shares bias_in's storage. */
        if (all[i] == &f->bias_out && f->c.bias == 2) {
            continue;
        }
        tensor_free(all[i]);
    }
    free(f->scale);
    free(f->shift);
    free(f->post_scale);
    free(f->post_shift);
    free(f->new_bias);
}

static void
fill_norm(tensor *mean, tensor *var, tensor *gamma, tensor *beta,
          fusion_dtype dt, int64_t n, int layout, int affine)
{
    vector_make(mean, dt, n, layout);
    vector_make(var, dt, n, layout);
    for (int64_t i = 0; i < n; i++) {
        tensor_set(mean, i, random_value(dt, 1.0));
        /* Positive, from near zero to a few units. */
        tensor_set(var, i, exp(rng_normal() * 1.5) * 0.5);
    }
    if (affine & 1) {
        vector_make(gamma, dt, n, layout);
        for (int64_t i = 0; i < n; i++) {
            tensor_set(gamma, i, random_value(dt, 1.0));
        }
    }
    if (affine & 2) {
        vector_make(beta, dt, n, layout);
        for (int64_t i = 0; i < n; i++) {
            tensor_set(beta, i, random_value(dt, 1.0));
        }
    }
}

/* Builds the tensors and the fold for a case, without calling the core. */
static void
fixture_make(fixture *f, const fold_case *c)
{
    memset(f, 0, sizeof *f);
    f->c = *c;
    tensor_make(&f->w, c->wdt, c->ndim, c->sizes, c->layout);
    for (int64_t i = 0; i < f->w.numel; i++) {
        double x = random_value(c->wdt, 0.5);
        if (rng_int(0, 40) == 0) {
            x = rng_int(0, 1) ? 0.0 : -0.0;
        }
        tensor_set(&f->w, i, x);
    }
    int64_t d0 = c->sizes[0], d1 = c->sizes[1];
    int before = c->map == MAP_BEFORE_GROUPED;
    f->channels = c->map == MAP_AFTER_AXIS0 ? d0 : c->groups * d1;
    f->d_out = before ? d0 : f->channels;
    if (c->bias != 0) {
        vector_make(&f->bias_in, c->bdt, f->d_out, c->layout);
        for (int64_t i = 0; i < f->d_out; i++) {
            tensor_set(&f->bias_in, i, random_value(c->bdt, 1.0));
        }
    }
    if (c->bias == 2) {
        f->bias_out = f->bias_in;
    }
    else {
        /* As the Python layer does for a producer without a bias: zeros. */
        vector_make(&f->bias_out, c->bdt, f->d_out,
                    (c->layout + 1) % LAYOUT_COUNT);
        for (int64_t i = 0; i < f->d_out; i++) {
            tensor_set(&f->bias_out, i, 0.0);
        }
    }
    fill_norm(&f->mean, &f->var, &f->gamma, &f->beta, c->sdt, f->channels,
              c->layout, c->affine);
    f->norm.mean = f->mean.v;
    f->norm.var = f->var.v;
    f->norm.weight = f->gamma.v;
    f->norm.bias = f->beta.v;
    f->norm.eps = c->eps;
    if (c->post) {
        fill_norm(&f->pmean, &f->pvar, &f->pgamma, &f->pbeta, c->sdt, f->d_out,
                  (c->layout + 2) % LAYOUT_COUNT, c->post - 1);
        f->post.mean = f->pmean.v;
        f->post.var = f->pvar.v;
        f->post.weight = f->pgamma.v;
        f->post.bias = f->pbeta.v;
        f->post.eps = c->post_eps;
    }
    f->fold.weight = f->w.v;
    f->fold.bias_in = f->bias_in.v; /* dtype NONE when absent */
    f->fold.bias_out = f->bias_out.v;
    f->fold.direction = before ? FUSION_NORM_BEFORE : FUSION_NORM_AFTER;
    f->fold.map = c->map == MAP_AFTER_AXIS0 ? FUSION_AXIS0 : FUSION_GROUPED;
    f->fold.groups = c->groups;
    size_t nc = (size_t)(f->channels > 0 ? f->channels : 1);
    size_t no = (size_t)(f->d_out > 0 ? f->d_out : 1);
    f->scale = xcalloc(nc, sizeof(double));
    f->shift = xcalloc(nc, sizeof(double));
    f->post_scale = xcalloc(no, sizeof(double));
    f->post_shift = xcalloc(no, sizeof(double));
    f->new_bias = xcalloc(no, sizeof(double));
}

static void
fixture_snapshot(fixture *f)
{
    tensor *all[] = {&f->w,    &f->bias_in, &f->bias_out, &f->mean,
                     &f->var,  &f->gamma,   &f->beta,     &f->pmean,
                     &f->pvar, &f->pgamma,  &f->pbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        tensor_snapshot(all[i]);
    }
}

static int
fixture_unchanged(const fixture *f)
{
    const tensor *all[] = {&f->w,    &f->bias_in, &f->bias_out, &f->mean,
                           &f->var,  &f->gamma,   &f->beta,     &f->pmean,
                           &f->pvar, &f->pgamma,  &f->pbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (!tensor_unchanged(all[i])) {
            return 0;
        }
    }
    return 1;
}

/* The module.c sequence up to the check: both norms' affine maps, then
 * fusion_fold_check. Returns the first failing status. */
static fusion_status
fixture_check(fixture *f, fusion_where *where)
{
    where->part = FUSION_PART_NONE;
    where->field = FUSION_FIELD_NONE;
    where->index = -1;
    where->value = 0.0;
    fusion_status st = fusion_norm_affine(
        &f->norm, FUSION_PART_NORM, f->channels, f->scale, f->shift, where);
    if (st != FUSION_OK) {
        return st;
    }
    f->fold.norm = &f->norm;
    f->fold.scale = f->scale;
    if (f->c.post) {
        st = fusion_norm_affine(&f->post, FUSION_PART_POST, f->d_out,
                                f->post_scale, f->post_shift, where);
        if (st != FUSION_OK) {
            return st;
        }
        f->fold.post = &f->post;
        f->fold.post_scale = f->post_scale;
    }
    return fusion_fold_check(&f->fold, f->new_bias, where);
}

/* "layer weight", "norm running_var": where a check failed, as text. */
static const char *
where_label(const fusion_where *w, char *buf, size_t n)
{
    snprintf(buf, n, "%s %s", fusion_part_str(w->part),
             fusion_field_str(w->field));
    return buf;
}

/* The exact affine map of one channel of a norm, from its stored values. */
static void
ref_affine(const tensor *mean, const tensor *var, const tensor *gamma,
           const tensor *beta, double eps, int64_t c, quad *s, quad *t)
{
    quad g = gamma->storage ? (quad)tensor_get(gamma, c) : 1;
    quad b = beta->storage ? (quad)tensor_get(beta, c) : 0;
    quad denom = (quad)tensor_get(var, c) + (quad)eps;
    *s = g / quad_sqrt(denom);
    *t = b - (quad)tensor_get(mean, c) * *s;
}

/* Precision tallies, per weight dtype. */
typedef struct {
    int64_t values, identical, max_ulp;
    int64_t conditioned; /* biases over 1 ULP, within float64's resolution */
} tally;

static tally g_tally[5];

/* Compares the fused weight and bias with the reference. Call after a
 * successful check and apply, with the snapshot taken before them. */
static void
fixture_verify(fixture *f)
{
    const fold_case *c = &f->c;
    tally *ty = &g_tally[c->wdt];
    quad *s = xcalloc((size_t)(f->channels + 1), sizeof(quad));
    quad *t = xcalloc((size_t)(f->channels + 1), sizeof(quad));
    quad *ps = xcalloc((size_t)(f->d_out + 1), sizeof(quad)); /* post */
    quad *pt = xcalloc((size_t)(f->d_out + 1), sizeof(quad));
    quad *bias = xcalloc((size_t)(f->d_out + 1), sizeof(quad));
    quad *bias_mag = xcalloc((size_t)(f->d_out + 1), sizeof(quad));
    quad *m = xcalloc((size_t)(f->channels + 1), sizeof(quad));
    quad *be = xcalloc((size_t)(f->channels + 1), sizeof(quad));
    for (int64_t ch = 0; ch < f->channels; ch++) {
        ref_affine(&f->mean, &f->var, &f->gamma, &f->beta, c->eps, ch, &s[ch],
                   &t[ch]);
        /* |mean * s| and |beta|: the magnitudes that the shift cancels. */
        m[ch] = quad_abs(tensor_get(&f->mean, ch) * s[ch]);
        be[ch] = f->beta.storage ? quad_abs(tensor_get(&f->beta, ch)) : 0;
    }
    for (int64_t o = 0; o < f->d_out; o++) {
        ps[o] = 1;
        if (c->post) {
            ref_affine(&f->pmean, &f->pvar, &f->pgamma, &f->pbeta, c->post_eps,
                       o, &ps[o], &pt[o]);
        }
    }
    /* The weight, read back through its original values in the snapshot. */
    tensor orig = f->w;
    orig.v.data =
        orig.snapshot + ((unsigned char *)f->w.v.data - f->w.storage);
    int64_t d0 = c->sizes[0], d1 = c->sizes[1];
    int64_t inner = d0 * d1 > 0 ? f->w.numel / (d0 * d1) : 0;
    int64_t a = d0 / c->groups;
    int before = c->map == MAP_BEFORE_GROUPED;
    int64_t worst = 0, worst_at = -1;
    char detail[256] = "";
    for (int64_t i = 0; i < f->w.numel; i++) {
        int64_t i0 = i / (d1 * inner), i1 = (i / inner) % d1;
        int64_t ch = c->map == MAP_AFTER_AXIS0 ? i0 : (i0 / a) * d1 + i1;
        quad w = tensor_get(&orig, i);
        /* Only a fold before a layer has a post norm, along dim 0. */
        quad want = c->post ? w * s[ch] * ps[i0] : w * s[ch];
        if (before) {
            bias[i0] += w * t[ch];
            bias_mag[i0] += quad_abs(w) * (quad_abs(m[ch]) + quad_abs(be[ch]));
        }
        uint64_t wb = ref_round(c->wdt, want);
        uint64_t got = read_bits(tensor_ptr(&f->w, i), c->wdt);
        int64_t u = ulp_distance(c->wdt, got, wb);
        ty->values++;
        ty->identical += u == 0;
        if (u > worst) {
            worst = u;
            worst_at = i;
            snprintf(detail, sizeof detail,
                     "i0=%" PRId64 " i1=%" PRId64 " channel %" PRId64
                     " w=%.17g: got %.17g, want %.17g",
                     i0, i1, ch, (double)w, ref_decode(c->wdt, got),
                     ref_decode(c->wdt, wb));
        }
    }
    CHECK(worst <= 1 || !precision_asserted(c->wdt),
          "weight[%" PRId64 "] is %" PRId64 " ULP from exact (%s)", worst_at,
          worst, detail);
    ty->max_ulp = worst > ty->max_ulp ? worst : ty->max_ulp;

    tensor orig_b = f->bias_in;
    if (c->bias) {
        orig_b.v.data = orig_b.snapshot + ((unsigned char *)f->bias_in.v.data -
                                           f->bias_in.storage);
    }
    worst = 0;
    worst_at = -1;
    for (int64_t o = 0; o < f->d_out; o++) {
        quad b = c->bias ? (quad)tensor_get(&orig_b, o) : 0;
        quad want, mag;
        if (before) {
            want = b + bias[o];
            mag = quad_abs(b) + bias_mag[o];
            if (c->post) {
                quad pm = tensor_get(&f->pmean, o);
                quad pb =
                    f->pbeta.storage ? (quad)tensor_get(&f->pbeta, o) : 0;
                want = (want - pm) * ps[o] + pb;
                mag = (mag + quad_abs(pm)) * quad_abs(ps[o]) + quad_abs(pb);
            }
        }
        else {
            quad m = tensor_get(&f->mean, o);
            quad be = f->beta.storage ? (quad)tensor_get(&f->beta, o) : 0;
            want = (b - m) * s[o] + be;
            mag = (quad_abs(b) + quad_abs(m)) * quad_abs(s[o]) + quad_abs(be);
        }
        uint64_t wb = ref_round(c->bdt, want);
        uint64_t got = read_bits(tensor_ptr(&f->bias_out, o), c->bdt);
        int64_t u = ulp_distance(c->bdt, got, wb);
        if (u > 1) {
            /* A bias is a sum that may cancel. Where it does, float64
             * arithmetic resolves it to 2^-53 of the magnitudes that
             * cancel, not of the result: DESIGN.md's "in float64 (good to
             * about 1e-16)". That shows only in a float64 bias. */
            quad err = quad_abs((quad)ref_decode(c->bdt, got) - want);
            if (err <= mag * (quad)0x1p-52) {
                g_tally[c->bdt].conditioned++;
                u = 1;
            }
        }
        g_tally[c->bdt].values++;
        g_tally[c->bdt].identical += u == 0;
        if (u > worst) {
            worst = u;
            worst_at = o;
        }
    }
    CHECK(worst <= 1 || !precision_asserted(c->bdt),
          "bias[%" PRId64 "] is %" PRId64 " ULP from exact", worst_at, worst);
    if (worst > g_tally[c->bdt].max_ulp) {
        g_tally[c->bdt].max_ulp = worst;
    }
    /* Nothing outside the views was written, and nothing that is only
     * read. */
    CHECK(tensor_outside_unchanged(&f->w), "weight storage outside the view");
    CHECK(tensor_outside_unchanged(&f->bias_out),
          "bias_out storage outside the view");
    if (c->bias == 1) {
        CHECK(tensor_unchanged(&f->bias_in), "bias_in was written");
    }
    const tensor *ro[] = {&f->mean,  &f->var,  &f->gamma,  &f->beta,
                          &f->pmean, &f->pvar, &f->pgamma, &f->pbeta};
    for (size_t k = 0; k < sizeof ro / sizeof ro[0]; k++) {
        CHECK(tensor_unchanged(ro[k]), "a norm tensor was written");
    }
    free(s);
    free(t);
    free(ps);
    free(pt);
    free(bias);
    free(bias_mag);
    free(m);
    free(be);
}

/* Runs one case: check must succeed and write nothing; apply must write
 * the reference. */
/* Folds a checked fixture twice: first into a fresh tensor of the weight's
 * layout (fold.out), which must leave the weight and everything outside the
 * new tensor's view as they were, then in place, which fixture_verify()
 * judges against the reference. The two must agree bit for bit. */
static void
fold_into_out_then_in_place(fixture *f)
{
    const fold_case *c = &f->c;
    tensor out;
    tensor_make(&out, c->wdt, c->ndim, c->sizes, c->layout);
    tensor_snapshot(&out);
    f->fold.out = out.v;
    fusion_where where;
    fusion_status st = fusion_fold_check(&f->fold, f->new_bias, &where);
    CHECK(st == FUSION_OK, "check with out: %s", fusion_status_str(st));
    if (st == FUSION_OK) {
        fusion_fold_apply(&f->fold, f->new_bias);
        CHECK(tensor_unchanged(&f->w), "a fold into out wrote its weight");
        CHECK(tensor_outside_unchanged(&out),
              "a fold into out wrote outside out's view");
    }
    memset(&f->fold.out, 0, sizeof f->fold.out);
    fusion_fold_apply(&f->fold, f->new_bias);
    fixture_verify(f);
    int64_t differ = 0;
    for (int64_t i = 0; i < out.numel && st == FUSION_OK; i++) {
        differ += read_bits(tensor_ptr(&out, i), c->wdt) !=
                  read_bits(tensor_ptr(&f->w, i), c->wdt);
    }
    CHECK(differ == 0,
          "%" PRId64 " of %" PRId64 " values folded into out differ from "
          "the fold in place",
          differ, out.numel);
    tensor_free(&out);
}

static void
run_case(const fold_case *c)
{
    fixture f;
    fixture_make(&f, c);
    fixture_snapshot(&f);
    fusion_where where;
    fusion_status st = fixture_check(&f, &where);
    char label[64];
    CHECK(st == FUSION_OK, "check: %s (%s[%" PRId64 "] = %g)",
          fusion_status_str(st), where_label(&where, label, sizeof label),
          where.index, where.value);
    CHECK(fixture_unchanged(&f), "the check phase wrote a tensor");
    CHECK(fusion_fold_channels(&f.fold) == f.channels, "channels");
    CHECK(fusion_fold_out_channels(&f.fold) == f.d_out, "out channels");
    if (st == FUSION_OK) {
        fold_into_out_then_in_place(&f);
    }
    fixture_free(&f);
}

/* Shapes: a conv or linear weight [C_out, C_in/G, k...] for the two maps
 * that read it that way, a ConvTranspose weight [C_in, C_out/G, k...] for
 * after/grouped. groups_kind: 0 plain, 1 grouped, 2 depthwise. */
static void
case_shape(fold_case *c, int groups_kind)
{
    c->ndim = (int)rng_int(2, 5);
    int64_t g = groups_kind == 0   ? 1
                : groups_kind == 1 ? rng_int(2, 4)
                                   : rng_int(2, 6);
    int64_t per_group_0 = groups_kind == 2 ? 1 : rng_int(1, 4);
    int64_t d1 = groups_kind == 2 ? 1 : rng_int(1, 5);
    c->groups = g;
    c->sizes[0] = g * per_group_0;
    c->sizes[1] = d1;
    for (int d = 2; d < c->ndim; d++) {
        c->sizes[d] = rng_int(1, 3);
    }
}

static void
test_fold_sweep(void)
{
    static const double EPS[3] = {1e-5, 1e-3, 0.0};
    char name[256];
    for (int di = 0; di < 4; di++) {
        for (int map = 0; map < MAP_COUNT; map++) {
            int posts = map == MAP_BEFORE_GROUPED ? 5 : 1;
            for (int post = 0; post < posts; post++) {
                for (int layout = 0; layout < LAYOUT_COUNT; layout++) {
                    for (int gk = 0; gk < 3; gk++) {
                        for (int bias = 0; bias < 3; bias++) {
                            for (int affine = 0; affine < 4; affine++) {
                                fold_case c;
                                memset(&c, 0, sizeof c);
                                c.wdt = c.bdt = c.sdt = ALL_DTYPES[di];
                                /* Mixed precision now and then: float32
                                 * statistics under a narrower weight. */
                                if (rng_int(0, 4) == 0) {
                                    c.sdt = FUSION_DTYPE_F32;
                                }
                                c.map = map;
                                c.layout = layout;
                                c.bias = bias;
                                c.affine = affine;
                                c.post = post;
                                c.eps = EPS[rng_int(0, 2)];
                                c.post_eps = EPS[rng_int(0, 2)];
                                case_shape(&c, gk);
                                snprintf(name, sizeof name,
                                         "fold %s %s post=%d %s "
                                         "groups=%" PRId64
                                         " ndim=%d bias=%d affine=%d",
                                         dtype_name(c.wdt), MAP_NAMES[map],
                                         post, LAYOUT_NAMES[layout], c.groups,
                                         c.ndim, bias, affine);
                                test_begin(name);
                                run_case(&c);
                                test_end();
                            }
                        }
                    }
                }
            }
        }
    }
}

/* Larger folds, for a meaningful share of identical values per dtype. */
static void
test_fold_large(void)
{
    for (int di = 0; di < 4; di++) {
        for (int map = 0; map < MAP_COUNT; map++) {
            fold_case c;
            memset(&c, 0, sizeof c);
            c.wdt = c.bdt = c.sdt = ALL_DTYPES[di];
            c.map = map;
            c.layout = map == 1 ? LAYOUT_GAPS : LAYOUT_PERMUTED;
            c.ndim = 4;
            c.groups = 2;
            c.sizes[0] = 32;
            c.sizes[1] = 16;
            c.sizes[2] = 3;
            c.sizes[3] = 3;
            c.bias = 1;
            c.affine = 3;
            c.post = map == MAP_BEFORE_GROUPED ? 4 : 0;
            c.eps = 1e-5;
            c.post_eps = 1e-5;
            snprintf(g_context, sizeof g_context, "%s %s", dtype_name(c.wdt),
                     MAP_NAMES[map]);
            run_case(&c);
        }
    }
}

static void
test_precision_criterion(void)
{
    for (int di = 0; di < 4; di++) {
        fusion_dtype dt = ALL_DTYPES[di];
        tally *ty = &g_tally[dt];
        double share = ty->values ? (double)ty->identical / ty->values : 0.0;
        printf("precision %-4s: %" PRId64 " values, %.4f%% identical to the "
               "exact result rounded once, max %" PRId64 " ULP, %" PRId64
               " cancelling biases within float64 resolution\n",
               dtype_name(dt), ty->values, 100.0 * share, ty->max_ulp,
               ty->conditioned);
        if (!precision_asserted(dt)) {
            printf("precision %-4s: not asserted: long double arithmetic is "
                   "no wider than double here (valgrind?)\n",
                   dtype_name(dt));
            continue;
        }
        /* Beyond float64 only a float64 bias may need that allowance. */
        CHECK(dt == FUSION_DTYPE_F64 || ty->conditioned == 0,
              "%s: %" PRId64 " values over 1 ULP", dtype_name(dt),
              ty->conditioned);
        CHECK(ty->values >= 10000, "%s: too few values to judge",
              dtype_name(dt));
        CHECK(share >= 0.999, "%s: %.4f%% identical, under 99.9%%",
              dtype_name(dt), 100.0 * share);
        CHECK(ty->max_ulp <= 1, "%s: %" PRId64 " ULP", dtype_name(dt),
              ty->max_ulp);
    }
}

/* ------------------------------------------------------------------------ */
/* Hand-made folds with known answers, and error statuses.                  */

/* A small fixture with every value set by the caller afterwards. */
static void
simple_case(fold_case *c, fusion_dtype dt, int map, int64_t d0, int64_t d1,
            int64_t k)
{
    memset(c, 0, sizeof *c);
    c->wdt = c->bdt = c->sdt = dt;
    c->map = map;
    c->layout = LAYOUT_CONTIGUOUS;
    c->ndim = 3;
    c->sizes[0] = d0;
    c->sizes[1] = d1;
    c->sizes[2] = k;
    c->groups = 1;
    c->bias = 1;
    c->affine = 3;
    c->eps = 0.0;
}

/* Sets a norm to scale s = gamma (var = 1, eps = 0) and the given mean. */
static void
set_norm(tensor *mean, tensor *var, tensor *gamma, tensor *beta, int64_t n,
         double g, double m, double b)
{
    for (int64_t i = 0; i < n; i++) {
        tensor_set(mean, i, m);
        tensor_set(var, i, 1.0);
        if (gamma->storage) {
            tensor_set(gamma, i, g);
        }
        if (beta->storage) {
            tensor_set(beta, i, b);
        }
    }
}

static void
fill_all(tensor *t, double x)
{
    for (int64_t i = 0; i < t->numel; i++) {
        tensor_set(t, i, x);
    }
}

/* Expects the module.c sequence to fail with st, naming `what` ("layer
 * weight", "norm running_var", "post bias": where's part and field), and to
 * have written nothing. */
static void
expect_failure_at(fixture *f, fusion_status st, const char *what,
                  int64_t index, int line)
{
    fixture_snapshot(f);
    fusion_where where;
    fusion_status got = fixture_check(f, &where);
    CHECK(got == st, "line %d: status %s, expected %s", line,
          fusion_status_str(got), fusion_status_str(st));
    if (what != NULL) {
        char label[64];
        where_label(&where, label, sizeof label);
        CHECK(strcmp(label, what) == 0, "line %d: where = %s, expected %s",
              line, label, what);
        CHECK(where.index == index,
              "line %d: where.index = %" PRId64 ", expected %" PRId64, line,
              where.index, index);
    }
    CHECK(fixture_unchanged(f), "line %d: a failed check wrote a tensor",
          line);
}

#define expect_failure(f, st, what, index)                                    \
    expect_failure_at((f), (st), (what), (index), __LINE__)

/* The module.c sequence, then the write only if the check passed, as the
 * contract requires. Returns whether it wrote. */
static int
check_and_apply_at(fixture *f, const char *what, int line)
{
    fusion_where where;
    fusion_status st = fixture_check(f, &where);
    char label[64];
    CHECK(st == FUSION_OK, "line %d: %s: %s (%s[%" PRId64 "])", line, what,
          fusion_status_str(st), where_label(&where, label, sizeof label),
          where.index);
    if (st != FUSION_OK) {
        return 0;
    }
    fusion_fold_apply(&f->fold, f->new_bias);
    return 1;
}

#define check_and_apply(f, what) check_and_apply_at((f), (what), __LINE__)

static void
test_nonfinite(void)
{
    for (int di = 0; di < 4; di++) {
        fusion_dtype dt = ALL_DTYPES[di];
        double bad[3] = {NAN, INFINITY, -INFINITY};
        for (int bi = 0; bi < 3; bi++) {
            snprintf(g_context, sizeof g_context, "%s %g", dtype_name(dt),
                     bad[bi]);
            struct {
                int which; /* 0 weight, 1 bias, 2..5 mean var gamma beta */
                const char *what;
            } spots[] = {{0, "layer weight"},      {1, "layer bias"},
                         {2, "norm running_mean"}, {3, "norm running_var"},
                         {4, "norm weight"},       {5, "norm bias"}};
            for (size_t k = 0; k < sizeof spots / sizeof spots[0]; k++) {
                fold_case c;
                simple_case(&c, dt, MAP_AFTER_AXIS0, 4, 3, 2);
                fixture f;
                fixture_make(&f, &c);
                fill_all(&f.w, 0.5);
                fill_all(&f.bias_in, 0.25);
                set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 2.0, 0.5, 1.0);
                tensor *target[] = {&f.w,   &f.bias_in, &f.mean,
                                    &f.var, &f.gamma,   &f.beta};
                int64_t at = spots[k].which == 0 ? 17 : 2;
                tensor_set(target[spots[k].which], at, bad[bi]);
                expect_failure(&f, FUSION_E_NONFINITE, spots[k].what, at);
                fixture_free(&f);
            }
        }
    }
    /* A non-finite eps. */
    fold_case c;
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 2, 2, 1);
    fixture f;
    fixture_make(&f, &c);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 2, 1.0, 0.0, 0.0);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 1.0);
    f.norm.eps = NAN;
    expect_failure(&f, FUSION_E_NONFINITE, "norm eps", -1);
    fixture_free(&f);
}

static void
test_variance(void)
{
    struct {
        double var, eps;
        fusion_status st;
    } cases[] = {
        {-1.0, 1e-5, FUSION_E_VARIANCE}, {0.0, 0.0, FUSION_E_VARIANCE},
        {-0.5, 0.5, FUSION_E_VARIANCE},  {-0.0, 0.0, FUSION_E_VARIANCE},
        {0.0, 1e-5, FUSION_OK},          {-0.25, 0.5, FUSION_OK},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(g_context, sizeof g_context, "var=%g eps=%g", cases[i].var,
                 cases[i].eps);
        fold_case c;
        simple_case(&c, FUSION_DTYPE_F64, MAP_AFTER_AXIS0, 3, 2, 1);
        fixture f;
        fixture_make(&f, &c);
        set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 3, 1.0, 0.0, 0.0);
        fill_all(&f.w, 1.0);
        fill_all(&f.bias_in, 1.0);
        tensor_set(&f.var, 1, cases[i].var);
        f.norm.eps = cases[i].eps;
        if (cases[i].st == FUSION_OK) {
            fusion_where where;
            CHECK(fixture_check(&f, &where) == FUSION_OK, "check failed");
            double want = 1.0 / sqrt(cases[i].var + cases[i].eps);
            CHECK(f.scale[1] == want, "scale %g, expected %g", f.scale[1],
                  want);
        }
        else {
            expect_failure(&f, cases[i].st, "norm running_var", 1);
        }
        fixture_free(&f);
    }
    /* var + eps overflows float64 although both are finite: the scale is
     * still gamma / sqrt(var + eps), not gamma / inf = 0. Before this was
     * handled, an f32 layer folded to weight 0 with status ok. */
    {
        snprintf(g_context, sizeof g_context, "var + eps > DBL_MAX");
        fold_case c;
        simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 2, 1, 1);
        c.sdt = FUSION_DTYPE_F64;
        fixture f;
        fixture_make(&f, &c);
        fill_all(&f.w, 1.0);
        fill_all(&f.bias_in, 0.5);
        set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 2, 1e300, 0.5, 0.0);
        fill_all(&f.var, 1.5e308);
        f.norm.eps = 1.5e308;
        fusion_where where;
        CHECK(fusion_norm_affine(&f.norm, FUSION_PART_NORM, 2, f.scale,
                                 f.shift, &where) == FUSION_OK,
              "affine");
        double want =
            (double)((quad)1e300 / quad_sqrt((quad)1.5e308 + (quad)1.5e308));
        CHECK(fabs(f.scale[0] - want) <= 4 * DBL_EPSILON * want,
              "scale %g, expected %g", f.scale[0], want);
        /* 1 * 5.8e145 does not fit float32. */
        expect_failure(&f, FUSION_E_OVERFLOW, "layer weight", 0);
        fixture_free(&f);
    }

    /* A variance so small that the scale overflows float64. */
    fold_case c;
    simple_case(&c, FUSION_DTYPE_F64, MAP_AFTER_AXIS0, 2, 2, 1);
    fixture f;
    fixture_make(&f, &c);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 2, 1e300, 0.0, 0.0);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 1.0);
    tensor_set(&f.var, 0, 1e-300);
    expect_failure(&f, FUSION_E_OVERFLOW, "norm scale", 0);
    fixture_free(&f);
}

static void
test_overflow(void)
{
    struct {
        fusion_dtype dt;
        int map;
        double w, gamma, post_gamma, b, mean;
        fusion_status st;
        const char *what;
    } cases[] = {
        /* 32752 * 2 = 65504, the largest float16. */
        {FUSION_DTYPE_F16, MAP_AFTER_AXIS0, 32752, 2.0, 0, 0, 0, FUSION_OK,
         NULL},
        /* 2 + 2^-9 is the float16 after 2: 32752 * it = 65568 > 65520. */
        {FUSION_DTYPE_F16, MAP_AFTER_AXIS0, 32752, 2.001953125, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F16, MAP_AFTER_AXIS0, -32752, 2.001953125, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F16, MAP_AFTER_AXIS0, 1.0, 1.5, 0, 50000, 0,
         FUSION_E_OVERFLOW, "layer bias"},
        {FUSION_DTYPE_F16, MAP_AFTER_GROUPED, 40000, 2.0, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F16, MAP_BEFORE_GROUPED, 30000, 2.5, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F16, MAP_BEFORE_GROUPED, 30000, 1.75, 0, 0, 0, FUSION_OK,
         NULL},
        /* Each factor fits; only their product with the post scale does
         * not. */
        {FUSION_DTYPE_F16, MAP_BEFORE_GROUPED, 30000, 1.5, 1.5, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        /* The bias of a fold before a layer sums every weight times the
         * shift: 3 * 2 * 20000 * (0 - (-1) * 1) + 0 overflows. */
        {FUSION_DTYPE_F16, MAP_BEFORE_GROUPED, 20000, 1.0, 0, 0, -1.0,
         FUSION_E_OVERFLOW, "layer bias"},
        {FUSION_DTYPE_BF16, MAP_AFTER_AXIS0, 0x1.fep127, 1.5, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 3e38, 2.0, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
        {FUSION_DTYPE_F64, MAP_AFTER_AXIS0, 1e308, 10.0, 0, 0, 0,
         FUSION_E_OVERFLOW, "layer weight"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(g_context, sizeof g_context, "case %zu", i);
        fold_case c;
        simple_case(&c, cases[i].dt, cases[i].map, 2, 3, 2);
        c.post = cases[i].post_gamma != 0 ? 4 : 0;
        fixture f;
        fixture_make(&f, &c);
        fill_all(&f.w, cases[i].w);
        fill_all(&f.bias_in, cases[i].b);
        set_norm(&f.mean, &f.var, &f.gamma, &f.beta, f.channels,
                 cases[i].gamma, cases[i].mean, 0.0);
        if (c.post) {
            set_norm(&f.pmean, &f.pvar, &f.pgamma, &f.pbeta, f.d_out,
                     cases[i].post_gamma, 0.0, 0.0);
        }
        if (cases[i].st == FUSION_OK) {
            fixture_snapshot(&f);
            if (check_and_apply(&f, "overflow case")) {
                quad exact = (quad)cases[i].w * cases[i].gamma;
                double want = ref_decode(c.wdt, ref_round(c.wdt, exact));
                CHECK(tensor_get(&f.w, 0) == want, "weight %g, expected %g",
                      tensor_get(&f.w, 0), want);
            }
        }
        else {
            /* The first row or bias element is the first to overflow. */
            expect_failure(&f, cases[i].st, cases[i].what, 0);
        }
        fixture_free(&f);
    }
}

/* With the norm after the layer, check first bounds the whole weight at once
 * (the largest |weight| times the largest |scale|) and reads block by block
 * only when that bound does not fit. Here it does not (30000 * 2.5 > 65504),
 * but each channel does: 30000 * 1 and 1 * 2.5. The fold must go through,
 * with the same values as ever; and the fault in the second case, which the
 * bound cannot place, is still reported at its channel. */
static void
test_whole_weight_bound(void)
{
    for (int over = 0; over < 2; over++) {
        snprintf(g_context, sizeof g_context, "bound, overflow %d", over);
        fold_case c;
        simple_case(&c, FUSION_DTYPE_F16, MAP_AFTER_AXIS0, 2, 3, 2);
        fixture f;
        fixture_make(&f, &c);
        fill_all(&f.bias_in, 0.0);
        set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 2, 1.0, 0.0, 0.0);
        tensor_set(&f.gamma, 1, 2.5);
        for (int64_t i = 0; i < 6; i++) {
            tensor_set(&f.w, i, 30000.0);       /* channel 0 */
            tensor_set(&f.w, 6 + i, over ? 30000.0 : 1.0); /* channel 1 */
        }
        if (over) {
            expect_failure(&f, FUSION_E_OVERFLOW, "layer weight", 6);
        }
        else if (check_and_apply(&f, "bound")) {
            CHECK(tensor_get(&f.w, 0) == 30000.0 && tensor_get(&f.w, 11) == 2.5,
                  "weights %g, %g", tensor_get(&f.w, 0), tensor_get(&f.w, 11));
        }
        fixture_free(&f);
    }
}

static void
test_shapes_and_arguments(void)
{
    fold_case c;
    fixture f;
    fusion_where where;
    double nb[8];

    /* Statistics of the wrong length, or not 1-D. */
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 2, 1);
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 1.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 1.0, 0.0, 0.0);
    f.norm.mean.sizes[0] = 3;
    expect_failure(&f, FUSION_E_SHAPE, "norm running_mean", -1);
    f.norm.mean.sizes[0] = 4;
    f.norm.var.ndim = 2;
    f.norm.var.sizes[1] = 1;
    expect_failure(&f, FUSION_E_SHAPE, "norm running_var", -1);
    f.norm.var.ndim = 1;
    f.norm.weight.sizes[0] = 3; /* shorter, so that it is in bounds */
    expect_failure(&f, FUSION_E_SHAPE, "norm weight", -1);
    f.norm.weight.sizes[0] = 4;
    f.norm.bias.ndim = 0;
    expect_failure(&f, FUSION_E_SHAPE, "norm bias", -1);
    f.norm.bias.ndim = 1;
    f.norm.mean.dtype = FUSION_DTYPE_NONE; /* required */
    expect_failure(&f, FUSION_E_DTYPE, "norm running_mean", -1);
    f.norm.mean.dtype = FUSION_DTYPE_F32;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "restored fixture");
    CHECK(fusion_norm_affine(NULL, FUSION_PART_NORM, 4, f.scale, f.shift,
                             &where) == FUSION_E_ARG,
          "norm NULL");
    CHECK(fusion_norm_affine(&f.norm, FUSION_PART_NORM, 4, NULL, f.shift,
                             &where) == FUSION_E_ARG,
          "scale NULL");
    CHECK(fusion_norm_affine(&f.norm, FUSION_PART_NORM, -1, f.scale, f.shift,
                             &where) == FUSION_E_ARG,
          "channels -1");
    /* shift is optional: checked, not stored. */
    CHECK(fusion_norm_affine(&f.norm, FUSION_PART_POST, 4, f.scale, NULL,
                             &where) == FUSION_OK,
          "shift NULL");
    tensor_set(&f.mean, 1, NAN);
    CHECK(fusion_norm_affine(&f.norm, FUSION_PART_POST, 4, f.scale, NULL,
                             &where) == FUSION_E_NONFINITE &&
              where.part == FUSION_PART_POST &&
              where.field == FUSION_FIELD_MEAN && where.index == 1,
          "a post norm's fault names the post part");
    tensor_set(&f.mean, 1, 1.0);

    /* Producer biases of the wrong length or rank. */
    f.fold.bias_in.sizes[0] = 3;
    expect_failure(&f, FUSION_E_SHAPE, "layer bias", -1);
    f.fold.bias_in.sizes[0] = 4;
    f.fold.bias_out.sizes[0] = 5;
    expect_failure(&f, FUSION_E_SHAPE, "layer bias", -1);
    f.fold.bias_out.sizes[0] = 4;
    f.fold.bias_out.ndim = 2;
    f.fold.bias_out.sizes[1] = 1;
    expect_failure(&f, FUSION_E_SHAPE, "layer bias", -1);
    f.fold.bias_out.ndim = 1;

    /* Bad weights. */
    f.fold.weight.ndim = 1;
    expect_failure(&f, FUSION_E_SHAPE, NULL, 0);
    f.fold.weight.ndim = 3;
    f.fold.weight.dtype = FUSION_DTYPE_NONE;
    expect_failure(&f, FUSION_E_DTYPE, NULL, 0);
    f.fold.weight.dtype = (fusion_dtype)7;
    expect_failure(&f, FUSION_E_DTYPE, NULL, 0);
    f.fold.weight.dtype = FUSION_DTYPE_F32;
    f.fold.weight.sizes[2] = -1;
    expect_failure(&f, FUSION_E_SHAPE, NULL, 0);
    f.fold.weight.sizes[2] = 1;
    f.fold.weight.data = NULL;
    expect_failure(&f, FUSION_E_ARG, NULL, 0);
    f.fold.weight.data = f.w.v.data;

    /* Bad fold arguments. */
    CHECK(fusion_fold_check(NULL, nb, &where) == FUSION_E_ARG, "fold NULL");
    CHECK(fusion_fold_check(&f.fold, NULL, &where) == FUSION_E_ARG,
          "new_bias NULL");
    f.fold.direction = FUSION_NORM_BEFORE; /* axis 0 folds only after */
    expect_failure(&f, FUSION_E_ARG, NULL, 0);
    f.fold.direction = (fusion_direction)5;
    expect_failure(&f, FUSION_E_ARG, NULL, 0);
    f.fold.direction = FUSION_NORM_AFTER;
    f.fold.map = (fusion_channel_map)3;
    expect_failure(&f, FUSION_E_ARG, NULL, 0);
    f.fold.map = FUSION_AXIS0;
    f.fold.post = &f.norm; /* a post norm needs the norm before */
    f.fold.post_scale = f.scale;
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_E_ARG,
          "post after");
    f.fold.post = NULL;
    f.fold.post_scale = NULL;
    const double *saved = f.fold.scale;
    f.fold.scale = NULL;
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_E_ARG,
          "scale NULL");
    f.fold.scale = saved;
    f.fold.norm = NULL;
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_E_ARG,
          "norm NULL");
    f.fold.norm = &f.norm;
    CHECK(fusion_fold_channels(NULL) == 0, "channels(NULL)");
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_OK,
          "restored fold");
    fixture_free(&f);

    /* Groups that do not divide the weight's first dim, or are not >= 1. */
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_GROUPED, 6, 2, 1);
    c.groups = 4;
    fixture_make(&f, &c);
    CHECK(fusion_fold_channels(&f.fold) == 0, "channels with groups 4 of 6");
    f.fold.norm = &f.norm;
    f.fold.scale = f.scale;
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_E_ARG,
          "groups 4 of 6");
    f.fold.groups = 0;
    CHECK(fusion_fold_check(&f.fold, f.new_bias, &where) == FUSION_E_ARG,
          "groups 0");
    f.fold.groups = -3;
    CHECK(fusion_fold_channels(&f.fold) == 0, "channels with groups -3");
    f.fold.groups = 3;
    CHECK(fusion_fold_channels(&f.fold) == 6, "channels with groups 3");
    fixture_free(&f);
}

static void
test_bounds(void)
{
    fold_case c;
    fixture f;
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 2);
    c.layout = LAYOUT_OFFSET;
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 1.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 1.0, 0.0, 0.0);
    fusion_where where;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "baseline");

    /* The storage ends one element before the view's last element; then
     * exactly at it. */
    int64_t hi = f.fold.weight.hi;
    f.fold.weight.hi = 4 * 3 * 2 - 1;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    f.fold.weight.hi = 4 * 3 * 2;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "exact fit");
    f.fold.weight.hi = hi;

    /* Strides that reach past the end. */
    f.fold.weight.strides[0] *= 2;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    f.fold.weight.strides[0] /= 2;

    /* A negative stride from a data pointer at the start of the view reaches
     * below the storage (the offset is 5 to 8 elements, a row is 6). */
    f.fold.weight.strides[0] = -6;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    /* Spans whose arithmetic overflows int64 are rejected, not wrapped:
     * (4 - 1) * stride, then the sum of two spans. */
    f.fold.weight.strides[0] = INT64_MAX / 2 + 1;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    f.fold.weight.strides[0] = INT64_MIN / 2;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    f.fold.weight.strides[0] = INT64_MAX / 3;
    f.fold.weight.strides[1] = INT64_MAX / 2;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    f.fold.weight.strides[0] = 6;
    f.fold.weight.strides[1] = 2;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "restored weight");

    /* Biases and statistics. */
    f.fold.bias_out.hi = f.fold.bias_out.strides[0] * 3;
    expect_failure(&f, FUSION_E_BOUNDS, "layer bias", -1);
    f.fold.bias_out.hi = f.bias_out.v.hi;
    f.fold.bias_in.lo = 1;
    expect_failure(&f, FUSION_E_BOUNDS, "layer bias", -1);
    f.fold.bias_in.lo = f.bias_in.v.lo;
    f.norm.var.hi = 2;
    expect_failure(&f, FUSION_E_BOUNDS, "norm running_var", -1);
    f.norm.var.hi = f.var.v.hi;
    f.norm.bias.strides[0] = 1000;
    expect_failure(&f, FUSION_E_BOUNDS, "norm bias", -1);
    f.norm.bias.strides[0] = f.beta.v.strides[0];
    CHECK(fixture_check(&f, &where) == FUSION_OK, "restored");
    fixture_free(&f);
}

/* Views the torch side can produce that are easy to get wrong: no
 * elements, size-1 dims, and a view that broadcasts one element. */
static void
test_degenerate_views(void)
{
    fusion_where where;
    for (int map = 0; map < MAP_COUNT; map++) {
        snprintf(g_context, sizeof g_context, "%s", MAP_NAMES[map]);
        /* A weight with no elements: the bias is still folded. */
        fold_case c;
        simple_case(&c, FUSION_DTYPE_F32, map, 3, 0, 2);
        c.post = map == MAP_BEFORE_GROUPED ? 4 : 0;
        fixture f;
        fixture_make(&f, &c);
        if (f.d_out > 0) {
            fill_all(&f.bias_in, 1.5);
            set_norm(&f.mean, &f.var, &f.gamma, &f.beta, f.channels, 2.0, 0.5,
                     0.25);
            if (c.post) {
                set_norm(&f.pmean, &f.pvar, &f.pgamma, &f.pbeta, f.d_out, 2.0,
                         0.5, 0.25);
            }
            /* An empty view reaches nothing twice, whatever its strides. */
            f.fold.weight.strides[0] = 0;
            fixture_snapshot(&f);
            fusion_status st = fixture_check(&f, &where);
            CHECK(st == FUSION_OK, "empty weight: %s", fusion_status_str(st));
            if (st == FUSION_OK) {
                fusion_fold_apply(&f.fold, f.new_bias);
            }
            /* after: (1.5 - 0.5) * 2 + 0.25; before: the empty sum, so
             * (1.5 - 0.5) * 2 + 0.25 by the post norm. */
            for (int64_t o = 0; o < f.d_out; o++) {
                CHECK(tensor_get(&f.bias_out, o) == 2.25, "bias %g",
                      tensor_get(&f.bias_out, o));
            }
        }
        else {
            CHECK(f.channels == 0, "channels of an empty ConvTranspose");
        }
        fixture_free(&f);
    }
}

/* A weight view that reaches one element through several indices (an
 * expanded tensor, stride 0) cannot be scaled in place element by element:
 * the shared element would be scaled once per index. */
/* fold.out: a fresh tensor of the weight's dtype, sizes and strides, that
 * shares no byte with the weight. Anything else is refused, naming the
 * layer's weight, before anything is written. */
static void
test_out_views(void)
{
    fold_case c;
    fixture f;
    fusion_where where;
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 2);
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 0.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 2.0, 0.0, 0.0);
    tensor out, wide;
    tensor_make(&out, FUSION_DTYPE_F32, 3, c.sizes, LAYOUT_CONTIGUOUS);
    tensor_make(&wide, FUSION_DTYPE_F64, 3, c.sizes, LAYOUT_CONTIGUOUS);
    tensor_snapshot(&out);
    /* The weight itself, and a view one element along in its storage. */
    f.fold.out = f.w.v;
    expect_failure(&f, FUSION_E_OVERLAP, "layer weight", -1);
    f.fold.out.data = (float *)f.w.v.data + 1;
    f.fold.out.lo = -1;
    f.fold.out.hi = f.w.v.hi; /* in bounds: one element short of the end */
    f.fold.out.sizes[0] = 3;
    f.fold.weight.sizes[0] = 3;
    f.fold.weight.hi = f.w.v.hi - 6;
    expect_failure(&f, FUSION_E_OVERLAP, "layer weight", -1);
    f.fold.weight = f.w.v;
    /* Another dtype, sizes or strides; a view past its storage. */
    f.fold.out = wide.v;
    expect_failure(&f, FUSION_E_DTYPE, "layer weight", -1);
    f.fold.out = out.v;
    f.fold.out.sizes[2] = 1;
    expect_failure(&f, FUSION_E_SHAPE, "layer weight", -1);
    f.fold.out = out.v;
    f.fold.out.ndim = 2;
    expect_failure(&f, FUSION_E_SHAPE, "layer weight", -1);
    f.fold.out = out.v;
    f.fold.out.strides[0] = 12; /* rows with gaps, in bounds */
    f.fold.out.hi = 40;
    f.fold.out.strides[1] = 4;
    expect_failure(&f, FUSION_E_SHAPE, "layer weight", -1);
    f.fold.out = out.v;
    f.fold.out.hi -= 1;
    expect_failure(&f, FUSION_E_BOUNDS, "layer weight", -1);
    CHECK(tensor_unchanged(&out), "a refused fold wrote out");
    /* A size-1 dim's stride says nothing: it is never stepped. */
    fold_case one;
    simple_case(&one, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 1, 3);
    fixture g;
    fixture_make(&g, &one);
    fill_all(&g.w, 1.5);
    fill_all(&g.bias_in, 0.0);
    set_norm(&g.mean, &g.var, &g.gamma, &g.beta, 4, 2.0, 0.0, 0.0);
    tensor o1;
    tensor_make(&o1, FUSION_DTYPE_F32, 3, one.sizes, LAYOUT_CONTIGUOUS);
    g.fold.out = o1.v;
    g.fold.out.strides[1] = 99;
    if (check_and_apply(&g, "size-1 dim with another stride")) {
        CHECK(tensor_get(&o1, 0) == 3.0 && tensor_get(&o1, 11) == 3.0,
              "folded into out: %g, %g", tensor_get(&o1, 0),
              tensor_get(&o1, 11));
        CHECK(tensor_get(&g.w, 0) == 1.5, "the weight was written");
    }
    /* The valid out passes, and the weight is only read. */
    f.fold.out = out.v;
    fixture_snapshot(&f);
    CHECK(fixture_check(&f, &where) == FUSION_OK, "a fresh out");
    fusion_fold_apply(&f.fold, f.new_bias);
    CHECK(tensor_unchanged(&f.w), "the weight was written");
    CHECK(tensor_get(&out, 0) == 2.0 && tensor_get(&out, 23) == 2.0,
          "folded into out: %g, %g", tensor_get(&out, 0),
          tensor_get(&out, 23));
    tensor_free(&o1);
    fixture_free(&g);
    tensor_free(&wide);
    tensor_free(&out);
    fixture_free(&f);
}

static void
test_overlapping_views(void)
{
    fold_case c;
    fixture f;
    fusion_where where;
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 1);
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 0.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 2.0, 0.0, 0.0);
    /* weight[o] = w[0] for every o, as torch's expand() makes it. Before
     * the check existed this folded "successfully" to 2^4 * w. */
    f.fold.weight.strides[0] = 0;
    expect_failure(&f, FUSION_E_OVERLAP, "layer weight", -1);
    /* Rows that share elements without a zero stride: strides (1, 1). */
    f.fold.weight.strides[0] = 1;
    f.fold.weight.strides[1] = 1;
    expect_failure(&f, FUSION_E_OVERLAP, "layer weight", -1);
    /* Reversed rows are fine (the data pointer is then the last row). */
    f.fold.weight.strides[0] = -3;
    f.fold.weight.data = (float *)f.w.v.data + 9;
    f.fold.weight.lo = -9;
    f.fold.weight.hi = 3;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "reversed rows");
    f.fold.weight = f.w.v;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "restored");
    fixture_free(&f);

    /* The same for the bias that is written. */
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 1);
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 0.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 2.0, 0.0, 0.0);
    tensor_set(&f.mean, 3, 1.0);
    f.fold.bias_out.strides[0] = 0;
    expect_failure(&f, FUSION_E_OVERLAP, "layer bias", -1);
    /* A bias read through a stride of 0 is fine: only bias_out is
     * written. */
    f.fold.bias_out.strides[0] = 1;
    f.fold.bias_in.strides[0] = 0;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "expanded bias_in");
    fixture_free(&f);

    /* Statistics that broadcast one value are only read: they fold. */
    simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 1);
    fixture_make(&f, &c);
    fill_all(&f.w, 1.0);
    fill_all(&f.bias_in, 0.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 2.0, 0.0, 0.0);
    f.norm.var.strides[0] = 0;
    CHECK(fixture_check(&f, &where) == FUSION_OK, "expanded running_var");
    fixture_free(&f);
}

/* The overflow check must bound the product exactly as apply forms it. A
 * float64 weight is scaled in long double: DBL_MAX * (1 + 2^-54 + ...)
 * rounds to the midpoint under 2^1024, then to inf, although
 * DBL_MAX * (double)scale = DBL_MAX * 1 fits. */
static void
test_f64_overflow_edge(void)
{
    fold_case c;
    fixture f;
    fusion_where where;
    simple_case(&c, FUSION_DTYPE_F64, MAP_AFTER_AXIS0, 2, 2, 1);
    fixture_make(&f, &c);
    fill_all(&f.w, DBL_MAX);
    fill_all(&f.bias_in, 0.0);
    set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 2, 1.0, 0.0, 0.0);
    fill_all(&f.var, 1.0 - 0x1p-53); /* scale = 1 + 2^-54 + ... */
    fixture_snapshot(&f);
    fusion_status st = fixture_check(&f, &where);
    /* Under valgrind long double arithmetic runs at 53 bits, the scale is
     * then exactly 1 and the fold fits. */
    if (g_wide_long_double) {
        CHECK(st == FUSION_E_OVERFLOW, "status %s", fusion_status_str(st));
    }
    if (st == FUSION_OK) {
        fusion_fold_apply(&f.fold, f.new_bias);
        for (int64_t i = 0; i < f.w.numel; i++) {
            CHECK(isfinite(tensor_get(&f.w, i)),
                  "a checked fold wrote inf at %" PRId64, i);
        }
    }
    else {
        CHECK(st == FUSION_E_OVERFLOW, "status %s", fusion_status_str(st));
        CHECK(fixture_unchanged(&f), "a failed check wrote a tensor");
    }
    fixture_free(&f);
}

/* Strides may be negative (a view that runs backwards through its storage):
 * the values and the NaN check must not depend on the direction. */
static void
test_negative_strides(void)
{
    for (int nan = 0; nan < 2; nan++) {
        fold_case c;
        fixture f;
        simple_case(&c, FUSION_DTYPE_F32, MAP_AFTER_AXIS0, 4, 3, 2);
        fixture_make(&f, &c);
        for (int64_t i = 0; i < f.w.numel; i++) {
            tensor_set(&f.w, i, random_value(FUSION_DTYPE_F32, 1.0));
        }
        fill_all(&f.bias_in, 0.5);
        set_norm(&f.mean, &f.var, &f.gamma, &f.beta, 4, 3.0, 0.25, 1.0);
        /* Reverse dim 0: data points at the last row, stride -6. */
        int64_t row = f.w.v.strides[0];
        f.w.v.data = (unsigned char *)f.w.v.data + 3 * row * 4;
        f.w.v.strides[0] = -row;
        f.w.v.lo = -3 * row;
        f.w.v.hi = row;
        f.fold.weight = f.w.v;
        if (nan) {
            /* weight[3, 0, 0] is storage element 0, offset -18 from data. */
            tensor_set(&f.w, 18, NAN);
            expect_failure(&f, FUSION_E_NONFINITE, "layer weight", -18);
        }
        else {
            fixture_snapshot(&f);
            if (check_and_apply(&f, "reversed weight")) {
                fixture_verify(&f);
            }
        }
        fixture_free(&f);
    }
}

/* Known answers, independent of any reference code: scale 2 is exact, so
 * every fused value is exact too. */
static void
test_known_answers(void)
{
    for (int di = 0; di < 4; di++) {
        fusion_dtype dt = ALL_DTYPES[di];
        snprintf(g_context, sizeof g_context, "%s", dtype_name(dt));

        /* ConvTranspose, 2 groups: weight [C_in=4, C_out/G=3, 1]. Output
         * channel o = g * 3 + j reads rows g*2 .. g*2+1, column j. */
        fold_case c;
        simple_case(&c, dt, MAP_AFTER_GROUPED, 4, 3, 1);
        c.groups = 2;
        fixture f;
        fixture_make(&f, &c);
        for (int64_t i = 0; i < 12; i++) {
            tensor_set(&f.w, i, 1.0);
        }
        for (int64_t o = 0; o < 6; o++) {
            tensor_set(&f.mean, o, 0.0);
            tensor_set(&f.var, o, 1.0);
            tensor_set(&f.gamma, o, (double)(o + 1)); /* scale o + 1 */
            tensor_set(&f.beta, o, 0.5);
            tensor_set(&f.bias_in, o, 1.0);
        }
        check_and_apply(&f, "convT");
        for (int64_t r = 0; r < 4; r++) {
            for (int64_t j = 0; j < 3; j++) {
                double want = (double)((r / 2) * 3 + j + 1);
                CHECK(tensor_get(&f.w, r * 3 + j) == want,
                      "convT weight[%" PRId64 ", %" PRId64 "] = %g, want %g",
                      r, j, tensor_get(&f.w, r * 3 + j), want);
            }
        }
        for (int64_t o = 0; o < 6; o++) {
            CHECK(tensor_get(&f.bias_out, o) == (double)(o + 1) + 0.5,
                  "convT bias[%" PRId64 "] = %g", o,
                  tensor_get(&f.bias_out, o));
        }
        fixture_free(&f);

        /* A norm before a Linear [2, 3] with a post norm after it:
         * y = post(W (s x + t) + b), s = 2, t = 1 - 0.5 * 2 = 0 for input
         * channel 0 and 1 - 0 = 1 otherwise; post scale 4, mean 1, bias 3. */
        simple_case(&c, dt, MAP_BEFORE_GROUPED, 2, 3, 1);
        c.ndim = 2;
        c.post = 4;
        fixture_make(&f, &c);
        double w[6] = {1, 2, 3, 4, 5, 6};
        for (int64_t i = 0; i < 6; i++) {
            tensor_set(&f.w, i, w[i]);
        }
        for (int64_t ch = 0; ch < 3; ch++) {
            tensor_set(&f.mean, ch, ch == 0 ? 0.5 : 0.0);
            tensor_set(&f.var, ch, 1.0);
            tensor_set(&f.gamma, ch, 2.0);
            tensor_set(&f.beta, ch, 1.0);
        }
        for (int64_t o = 0; o < 2; o++) {
            tensor_set(&f.bias_in, o, 0.25);
            tensor_set(&f.pmean, o, 1.0);
            tensor_set(&f.pvar, o, 1.0);
            tensor_set(&f.pgamma, o, 4.0);
            tensor_set(&f.pbeta, o, 3.0);
        }
        check_and_apply(&f, "linear");
        for (int64_t i = 0; i < 6; i++) {
            CHECK(tensor_get(&f.w, i) == w[i] * 8.0,
                  "linear weight[%" PRId64 "] = %g", i, tensor_get(&f.w, i));
        }
        /* b' = ((0.25 + W[o,1] + W[o,2]) - 1) * 4 + 3 */
        CHECK(tensor_get(&f.bias_out, 0) == ((0.25 + 2 + 3) - 1) * 4 + 3,
              "linear bias[0] = %g", tensor_get(&f.bias_out, 0));
        CHECK(tensor_get(&f.bias_out, 1) == ((0.25 + 5 + 6) - 1) * 4 + 3,
              "linear bias[1] = %g", tensor_get(&f.bias_out, 1));
        fixture_free(&f);
    }
}

/* ------------------------------------------------------------------------ */
/* Instruction-set paths: every path bit-identical to the baseline.         */

static const fusion_isa ALL_ISAS[3] = {FUSION_ISA_BASELINE, FUSION_ISA_AVX2,
                                       FUSION_ISA_AVX512};

typedef struct {
    fusion_status st;
    fusion_where where;
    unsigned char *w; /* the weight after the fold (or untouched) */
} isa_result;

/* One contiguous fold [rows, cols] of dtype wdt, norm after, axis 0, with
 * scale gamma[r] for row r (float64 statistics: mean 0, var 1, eps 0, so
 * that the scale is gamma exactly), run on the current path. Writes the
 * folded weight into out->w (rows * cols elements) and the float64 biases
 * into bias (rows). */
static void
isa_fold(fusion_dtype wdt, int64_t rows, int64_t cols, const void *w_in,
         const double *gamma, isa_result *out, double *bias)
{
    size_t es = esize(wdt);
    int64_t n = rows * cols;
    memcpy(out->w, w_in, (size_t)n * es);
    double *stats = xcalloc((size_t)(3 * rows), sizeof(double));
    double *mean = stats, *var = stats + rows, *scale = stats + 2 * rows;
    for (int64_t r = 0; r < rows; r++) {
        var[r] = 1.0;
    }
    fusion_view vec = {0};
    vec.dtype = FUSION_DTYPE_F64;
    vec.ndim = 1;
    vec.sizes[0] = rows;
    vec.strides[0] = 1;
    vec.lo = 0;
    vec.hi = rows;
    fusion_norm norm;
    memset(&norm, 0, sizeof norm);
    norm.mean = vec;
    norm.mean.data = mean;
    norm.var = vec;
    norm.var.data = var;
    norm.weight = vec;
    norm.weight.data = (void *)gamma;
    norm.eps = 0.0;
    fusion_fold f;
    memset(&f, 0, sizeof f);
    f.weight.data = out->w;
    f.weight.dtype = wdt;
    f.weight.ndim = 2;
    f.weight.sizes[0] = rows;
    f.weight.sizes[1] = cols;
    f.weight.strides[0] = cols;
    f.weight.strides[1] = 1;
    f.weight.lo = 0;
    f.weight.hi = n;
    f.bias_out = vec;
    f.bias_out.data = bias;
    f.direction = FUSION_NORM_AFTER;
    f.map = FUSION_AXIS0;
    f.groups = 1;
    f.norm = &norm;
    f.scale = scale;
    memset(bias, 0, (size_t)rows * sizeof(double));
    double *new_bias = xcalloc((size_t)rows, sizeof(double));
    memset(&out->where, 0, sizeof out->where);
    out->st = fusion_norm_affine(&norm, FUSION_PART_NORM, rows, scale, NULL,
                                 &out->where);
    if (out->st == FUSION_OK) {
        out->st = fusion_fold_check(&f, new_bias, &out->where);
    }
    if (out->st == FUSION_OK) {
        fusion_fold_apply(&f, new_bias);
    }
    free(new_bias);
    free(stats);
}

/* Runs the fold on every path this CPU has; every one must give the
 * baseline's status, where and bytes. Returns the number of paths run. */
static int
isa_compare(const char *what, fusion_dtype wdt, int64_t rows, int64_t cols,
            const void *w_in, const double *gamma, fusion_status *st_out,
            void *w_out)
{
    size_t bytes = (size_t)(rows * cols) * esize(wdt);
    isa_result base, got;
    base.w = xcalloc(bytes ? bytes : 1, 1);
    got.w = xcalloc(bytes ? bytes : 1, 1);
    double *bias0 = xcalloc((size_t)rows, sizeof(double));
    double *bias1 = xcalloc((size_t)rows, sizeof(double));
    int paths = 0;
    CHECK(fusion_set_isa(FUSION_ISA_BASELINE) == FUSION_OK, "baseline");
    isa_fold(wdt, rows, cols, w_in, gamma, &base, bias0);
    for (int k = 1; k < 3; k++) {
        if (!fusion_isa_supported(ALL_ISAS[k])) {
            continue;
        }
        paths++;
        fusion_set_isa(ALL_ISAS[k]);
        isa_fold(wdt, rows, cols, w_in, gamma, &got, bias1);
        const char *name = fusion_isa_str(ALL_ISAS[k]);
        CHECK(got.st == base.st, "%s %s: status %s, baseline %s", what, name,
              fusion_status_str(got.st), fusion_status_str(base.st));
        CHECK(got.where.part == base.where.part &&
                  got.where.field == base.where.field &&
                  got.where.index == base.where.index &&
                  memcmp(&got.where.value, &base.where.value,
                         sizeof(double)) == 0,
              "%s %s: where %" PRId64 " (%g), baseline %" PRId64 " (%g)", what,
              name, got.where.index, got.where.value, base.where.index,
              base.where.value);
        int64_t first = -1, count = 0;
        size_t es = esize(wdt);
        for (int64_t i = 0; i < rows * cols; i++) {
            if (memcmp(got.w + i * (int64_t)es, base.w + i * (int64_t)es,
                       es) != 0) {
                count++;
                first = first < 0 ? i : first;
            }
        }
        CHECK(count == 0,
              "%s %s: %" PRId64 " weights differ from the baseline, first "
              "[%" PRId64 "]: 0x%" PRIx64 " vs 0x%" PRIx64,
              what, name, count, first,
              first >= 0 ? read_bits(got.w + first * (int64_t)es, wdt) : 0,
              first >= 0 ? read_bits(base.w + first * (int64_t)es, wdt) : 0);
        CHECK(memcmp(bias0, bias1, (size_t)rows * sizeof(double)) == 0,
              "%s %s: biases differ", what, name);
    }
    fusion_set_isa(FUSION_ISA_AUTO);
    if (st_out != NULL) {
        *st_out = base.st;
    }
    if (w_out != NULL) {
        memcpy(w_out, base.w, bytes);
    }
    free(base.w);
    free(got.w);
    free(bias0);
    free(bias1);
    return paths;
}

static int64_t g_isa_values; /* values compared across paths */
static int64_t g_isa_naive;  /* of those, where a naive path would differ */

/* x rounded twice, to float32 and then to nearest even in dt: what a
 * vector path that converted through float32 would store. */
static uint64_t
naive_bits(fusion_dtype dt, double x)
{
    /* fusion_store's rounding of a double is proven exhaustively above. */
    return store_bits(dt, (double)(float)x);
}

/* Counts the products of a finished fold where rounding through float32
 * would have given another value than the (baseline's) correct one, and
 * checks that the baseline stored each product as fusion_store rounds it:
 * the paths are compared with the baseline, which is compared with this. */
static void
count_naive(fusion_dtype dt, int64_t rows, int64_t cols, const void *w_in,
            const double *gamma, const void *w_out)
{
    size_t es = esize(dt);
    int64_t wrong = 0, first = -1;
    for (int64_t i = 0; i < rows * cols; i++) {
        double x =
            fusion_load((const unsigned char *)w_in + i * (int64_t)es, dt) *
            gamma[i / cols];
        uint64_t good =
            read_bits((const unsigned char *)w_out + i * (int64_t)es, dt);
        g_isa_naive += naive_bits(dt, x) != good;
        if (store_bits(dt, x) != good) {
            wrong++;
            first = first < 0 ? i : first;
        }
    }
    CHECK(wrong == 0,
          "baseline: %" PRId64 " weights not the product rounded once, first "
          "[%" PRId64 "]",
          wrong, first);
    g_isa_values += rows * cols;
}

/* Every finite encoding of float16 or bfloat16 as a weight, times scales
 * that make ties, values next to ties (by one float64 ulp, and by amounts
 * below float32's resolution, where rounding through float32 goes wrong),
 * subnormal results and results near overflow, and random ones. Products
 * that would overflow are left out of a scale's row (the check refuses
 * them; see test_isa_check). */
static void
test_isa_exhaustive16(void)
{
    static const double base[] = {
        1.0,
        1.0 + 0x1p-11,
        1.0 + 0x1p-11 + 0x1p-30,
        1.0 + 0x1p-11 - 0x1p-30,
        1.0 + 0x1p-11 + 0x1p-52,
        1.0 + 0x1p-11 - 0x1p-53,
        1.0 + 0x1p-8,
        1.0 + 0x1p-8 + 0x1p-27,
        1.0 + 0x1p-8 - 0x1p-27,
        1.0 - 0x1p-12,
        1.0 + 3 * 0x1p-12 + 0x1p-40,
        1.5,
        0.75 - 0x1p-35,
        -1.0 - 0x1p-9 - 0x1p-31,
        /* Negative scales of a few bits: x * s's float32 split has lo = 0,
         * and a zero weight times each must keep its sign. */
        -1.0,
        -1.5,
        -1.0 - 0x1p-11,
    };
    static const int shifts[] = {0,    -5,   -10,  -14,  -20, -24, -25, -30,
                                 -120, -126, -133, -140, 1,   15,  100};
    const size_t nb = sizeof base / sizeof base[0];
    const size_t ns = sizeof shifts / sizeof shifts[0];
    for (int di = 0; di < 2; di++) {
        fusion_dtype dt = di == 0 ? FUSION_DTYPE_F16 : FUSION_DTYPE_BF16;
        uint16_t top = dt == FUSION_DTYPE_F16 ? 0x7BFF : 0x7F7F;
        uint16_t *all = xcalloc(65536, 2), *row = xcalloc(65536, 2);
        uint16_t *out = xcalloc(65536, 2);
        int64_t finite = 0;
        for (uint32_t b = 0; b <= 0xFFFF; b++) {
            if ((b & 0x7FFF) <= top) {
                all[finite++] = (uint16_t)b;
            }
        }
        int64_t before_naive = g_isa_naive;
        for (size_t k = 0; k < nb * ns + 12; k++) {
            double s = k < nb * ns
                           ? ldexp(base[k % nb], shifts[k / nb])
                           : ldexp(1.0 + rng_unit(), (int)rng_int(-30, 10)) *
                                 (rng_int(0, 1) ? 1 : -1);
            int64_t n = 0;
            for (int64_t i = 0; i < finite; i++) {
                double x = fusion_load(&all[i], dt) * s;
                if (fusion_fits(x, dt)) {
                    row[n++] = all[i];
                }
            }
            snprintf(g_context, sizeof g_context, "%s scale %a",
                     dtype_name(dt), s);
            fusion_status st;
            isa_compare("exhaustive", dt, 1, n, row, &s, &st, out);
            CHECK(st == FUSION_OK, "status %s", fusion_status_str(st));
            count_naive(dt, 1, n, row, &s, out);
        }
        CHECK(g_isa_naive > before_naive,
              "%s: no product where rounding through float32 differs: the "
              "test cannot tell a double rounding",
              dtype_name(dt));
        free(all);
        free(row);
        free(out);
    }
    g_context[0] = '\0';
}

/* Products at and next to every rounding midpoint of float16 and bfloat16,
 * subnormal ones included: row r has the scale d_r (a midpoint, moved by
 * nothing, one float64 ulp, or a few units of float32's last place, up or
 * down), and weights +-2^-j, so that its products are d_r exactly, scaled
 * by powers of two. */
static void
test_isa_midpoints(void)
{
    static const double moves[] = {0.0,      0x1p-52,  -0x1p-52,
                                   0x1p-26,  -0x1p-26, 0x1p-24,
                                   -0x1p-24, 0x1p-23,  -0x1p-23};
    const int nm = (int)(sizeof moves / sizeof moves[0]);
    const int64_t cols = 37; /* two 16-wide vectors, a tail */
    for (int di = 0; di < 2; di++) {
        fusion_dtype dt = di == 0 ? FUSION_DTYPE_F16 : FUSION_DTYPE_BF16;
        uint16_t top = dt == FUSION_DTYPE_F16 ? 0x7BFF : 0x7F7F;
        int64_t rows = (int64_t)top * nm;
        double *gamma = xcalloc((size_t)rows, sizeof(double));
        uint16_t *w = xcalloc((size_t)(rows * cols), 2);
        uint16_t *out = xcalloc((size_t)(rows * cols), 2);
        for (uint16_t b = 0; b < top; b++) {
            double v0 = ref_decode(dt, b), v1 = ref_decode(dt, b + 1);
            double mid = v0 + (v1 - v0) / 2;
            for (int m = 0; m < nm; m++) {
                double d = mid + moves[m] * mid;
                if (m == 1 || m == 2) {
                    d = nextafter(mid, moves[m] > 0 ? INFINITY : 0.0);
                }
                gamma[(int64_t)b * nm + m] = (b & 1) ? -d : d;
            }
        }
        for (int64_t j = 0; j < cols; j++) {
            double x = ldexp(1.0, -(int)(j % 12));
            write_bits(&w[j], dt, bits_of_double(dt, (j & 1) ? -x : x));
        }
        for (int64_t r = 1; r < rows; r++) {
            memcpy(&w[r * cols], w, (size_t)cols * 2);
        }
        snprintf(g_context, sizeof g_context, "%s", dtype_name(dt));
        fusion_status st;
        isa_compare("midpoints", dt, rows, cols, w, gamma, &st, out);
        CHECK(st == FUSION_OK, "status %s", fusion_status_str(st));
        count_naive(dt, rows, cols, w, gamma, out);
        /* The fold's values are the independent reference's too. */
        int64_t bad = 0;
        for (int64_t i = 0; i < rows * cols; i += 97) {
            double x = fusion_load(&w[i], dt) * gamma[i / cols];
            bad += read_bits(&out[i], dt) != ref_round(dt, (quad)x);
        }
        CHECK(bad == 0, "%" PRId64 " values differ from the reference", bad);
        free(gamma);
        free(w);
        free(out);
    }
    g_context[0] = '\0';
}

/* Signed zeros among normal weights, in every lane of a vector, times
 * scales of either sign, short ones included (whose float32 split has a
 * zero low part): each product is the zero of sign x's sign times s's. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
/* XGETBV with ECX = 1 (XINUSE): bit 2 set while some ymm register's upper
 * half is not zero, bit 6 likewise for zmm0-15's upper 256 bits. -1 where
 * the CPU cannot tell. */
static int64_t
xinuse_upper(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)) ||
        !__get_cpuid_count(0xD, 1, &a, &b, &c, &d) || !(a & (1u << 2))) {
        return -1;
    }
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
    return (int64_t)(lo & 0x44u) | (int64_t)hi << 32;
}
#else
static int64_t
xinuse_upper(void)
{
    return -1;
}
#endif

/* Every vector path returns with the upper halves of the vector registers
 * clear, as compiled code that is not VEX expects (the caller's, the
 * interpreter's, libm's): with them dirty, each such instruction after the
 * fold ran 3-4x slower on an AMD EPYC. Head, tail and near-midpoint blocks
 * (which the vector kernels hand to the portable ones) included. */
static void
test_isa_leaves_upper_clear(void)
{
    if (xinuse_upper() < 0) {
        return;
    }
    const int64_t rows = 3, cols = 211;
    for (int d = 0; d < 4; d++) {
        fusion_dtype dt = ALL_DTYPES[d];
        size_t es = esize(dt);
        unsigned char *w = xcalloc((size_t)(rows * cols), es);
        for (int64_t i = 0; i < rows * cols; i++) {
            fusion_store(w + i * (int64_t)es, dt, 0.01 * (double)(i % 97) - 0.4);
        }
        double gamma[3] = {1.0 + 0x1p-11 + 0x1p-30, -0.75, 3.0};
        double bias[3];
        isa_result got;
        got.w = xcalloc((size_t)(rows * cols), es);
        for (int k = 1; k < 3; k++) {
            if (!fusion_isa_supported(ALL_ISAS[k])) {
                continue;
            }
            fusion_set_isa(ALL_ISAS[k]);
            isa_fold(dt, rows, cols, w, gamma, &got, bias);
            int64_t dirty = xinuse_upper();
            CHECK(got.st == FUSION_OK && dirty == 0,
                  "%s %s: status %s, upper state 0x%" PRIx64 " after the fold",
                  dtype_name(dt), fusion_isa_str(ALL_ISAS[k]),
                  fusion_status_str(got.st), (uint64_t)dirty);
        }
        fusion_set_isa(FUSION_ISA_AUTO);
        free(got.w);
        free(w);
    }
}

static void
test_isa_signed_zeros(void)
{
    static const double scales[] = {-1.0, -1.5,   -0x1p-3, -1.0 - 0x1p-11,
                                    1.0,  0.375, -1.1,    -0x1.8p10};
    const int64_t rows = (int64_t)(sizeof scales / sizeof scales[0]);
    const int64_t cols = 67;
    for (int di = 0; di < 2; di++) {
        fusion_dtype dt = di == 0 ? FUSION_DTYPE_F16 : FUSION_DTYPE_BF16;
        uint16_t *w = xcalloc((size_t)(rows * cols), 2);
        uint16_t *out = xcalloc((size_t)(rows * cols), 2);
        for (int64_t i = 0; i < rows * cols; i++) {
            int64_t j = i % cols;
            double x = j % 5 == 2 ? 0.0 : 0.5 + (double)(j % 7) / 8;
            x = (j / 3) % 2 ? -x : x;
            write_bits(&w[i], dt, bits_of_double(dt, x));
        }
        snprintf(g_context, sizeof g_context, "%s", dtype_name(dt));
        fusion_status st;
        isa_compare("signed zeros", dt, rows, cols, w, scales, &st, out);
        CHECK(st == FUSION_OK, "status %s", fusion_status_str(st));
        int64_t bad = 0;
        for (int64_t i = 0; i < rows * cols; i++) {
            if ((w[i] & 0x7FFF) == 0) {
                int neg = ((w[i] >> 15) != 0) != (scales[i / cols] < 0);
                bad += out[i] != (neg ? 0x8000 : 0);
            }
        }
        CHECK(bad == 0, "%" PRId64 " zeros with the wrong sign", bad);
        free(w);
        free(out);
    }
    g_context[0] = '\0';
}

/* float32 weights: random encodings at every exponent, times random scales
 * and scales that put products at float32 midpoints. */
static void
test_isa_f32(void)
{
    const int64_t rows = 512, cols = 263;
    uint32_t *w = xcalloc((size_t)(rows * cols), 4);
    double *gamma = xcalloc((size_t)rows, sizeof(double));
    for (int64_t r = 0; r < rows; r++) {
        gamma[r] = r % 3 == 0 ? 1.0 + 0x1p-24 + (r % 2 ? 0x1p-50 : -0x1p-51)
                              : ldexp(1.0 + rng_unit(), (int)rng_int(-40, 8));
        int e = (int)rng_int(-149, 100);
        for (int64_t j = 0; j < cols; j++) {
            uint32_t u = (uint32_t)rng_next();
            u = (u & 0x807FFFFFu) |
                ((uint32_t)((e + (int)(j % 20) + 127) & 0xFF) << 23);
            float f;
            memcpy(&f, &u, 4);
            if (!isfinite(f) ||
                !fusion_fits((double)f * gamma[r], FUSION_DTYPE_F32)) {
                u = 0x3F800000u;
            }
            w[r * cols + j] = u;
        }
    }
    fusion_status st;
    isa_compare("f32", FUSION_DTYPE_F32, rows, cols, w, gamma, &st, NULL);
    CHECK(st == FUSION_OK, "status %s", fusion_status_str(st));
    g_isa_values += rows * cols;
    free(w);
    free(gamma);
}

/* The caller's floating-point environment does not change a fold: with
 * SSE's flush-to-zero and denormals-are-zero set (what
 * torch.set_flush_denormal(True) sets) and rounding toward +infinity, every
 * path gives the bits the baseline gives in the default environment, for
 * weights and products in every dtype's subnormal range; and the caller's
 * environment is as it was afterwards. */
static void
test_fp_environment(void)
{
    const int64_t rows = 24, cols = 131;
    for (int di = 0; di < 4; di++) {
        fusion_dtype dt = ALL_DTYPES[di];
        size_t es = esize(dt);
        unsigned char *w = xcalloc((size_t)(rows * cols), es);
        double *gamma = xcalloc((size_t)rows, sizeof(double));
        double emin = dt == FUSION_DTYPE_F16    ? -24
                      : dt == FUSION_DTYPE_F64 ? -1074
                                               : -149;
        for (int64_t r = 0; r < rows; r++) {
            /* Scales from 2^-12 to 2^11, so that products of the smallest
             * weights land among the subnormals, or leave them. */
            gamma[r] = ldexp(1.0 + rng_unit(), (int)(r - 12)) *
                       (r % 2 ? -1.0 : 1.0);
            for (int64_t j = 0; j < cols; j++) {
                /* Weights from the smallest subnormal up by powers of
                 * two, with random significands, and zeros. */
                double x = j % 9 == 4 ? 0.0
                                      : ldexp(1.0 + rng_unit(),
                                              (int)(emin + (double)(j % 40)));
                x = ref_decode(dt, bits_of_double(dt, (j % 3) ? x : -x));
                if (!fusion_fits(x * gamma[r], dt)) {
                    x = 1.0;
                }
                write_bits(w + (r * cols + j) * (int64_t)es, dt,
                           bits_of_double(dt, x));
            }
        }
        isa_result ref, got;
        ref.w = xcalloc((size_t)(rows * cols), es);
        got.w = xcalloc((size_t)(rows * cols), es);
        double *bias0 = xcalloc((size_t)rows, sizeof(double));
        double *bias1 = xcalloc((size_t)rows, sizeof(double));
        fusion_set_isa(FUSION_ISA_BASELINE);
        isa_fold(dt, rows, cols, w, gamma, &ref, bias0);
        CHECK(ref.st == FUSION_OK, "%s: status %s", dtype_name(dt),
              fusion_status_str(ref.st));
        for (int k = 0; k < 3; k++) {
            if (!fusion_isa_supported(ALL_ISAS[k])) {
                continue;
            }
            fusion_set_isa(ALL_ISAS[k]);
#ifdef HAVE_MXCSR
            unsigned csr = _mm_getcsr();
            _mm_setcsr(csr | 0x8040u); /* FTZ, DAZ */
            unsigned hostile = _mm_getcsr();
#endif
            CHECK(fesetround(FE_UPWARD) == 0, "fesetround");
            isa_fold(dt, rows, cols, w, gamma, &got, bias1);
            int round = fegetround();
            fesetround(FE_TONEAREST);
#ifdef HAVE_MXCSR
            unsigned after = _mm_getcsr();
            _mm_setcsr(csr);
            CHECK(after == hostile, "%s %s: MXCSR 0x%x after the fold, 0x%x "
                  "before", dtype_name(dt), fusion_isa_str(ALL_ISAS[k]),
                  after, hostile);
#endif
            CHECK(round == FE_UPWARD, "%s %s: the rounding mode changed",
                  dtype_name(dt), fusion_isa_str(ALL_ISAS[k]));
            int64_t differ = 0, first = -1;
            for (int64_t i = 0; i < rows * cols; i++) {
                if (memcmp(got.w + i * (int64_t)es, ref.w + i * (int64_t)es,
                           es) != 0) {
                    differ++;
                    first = first < 0 ? i : first;
                }
            }
            CHECK(got.st == FUSION_OK && differ == 0,
                  "%s %s: %" PRId64 " weights differ, first [%" PRId64
                  "]: 0x%" PRIx64 " vs 0x%" PRIx64,
                  dtype_name(dt), fusion_isa_str(ALL_ISAS[k]), differ, first,
                  first >= 0 ? read_bits(got.w + first * (int64_t)es, dt) : 0,
                  first >= 0 ? read_bits(ref.w + first * (int64_t)es, dt) : 0);
            CHECK(memcmp(bias0, bias1, (size_t)rows * sizeof(double)) == 0,
                  "%s %s: biases differ", dtype_name(dt),
                  fusion_isa_str(ALL_ISAS[k]));
        }
        fusion_set_isa(FUSION_ISA_AUTO);
        free(w);
        free(gamma);
        free(ref.w);
        free(got.w);
        free(bias0);
        free(bias1);
    }
}

/* The check pass on every path: a NaN or infinity, or an overflowing
 * product, anywhere in long contiguous rows (first, last, in a vector, in
 * a tail, two of them) is reported with the same status, index and value;
 * float64 weights included. */
static void
test_isa_check(void)
{
    const int64_t rows = 6, cols = 301;
    for (int di = 0; di < 4; di++) {
        fusion_dtype dt = ALL_DTYPES[di];
        size_t es = esize(dt);
        unsigned char *w = xcalloc((size_t)(rows * cols), es);
        double gamma[6];
        for (int trial = 0; trial < 60; trial++) {
            for (int64_t r = 0; r < rows; r++) {
                gamma[r] = random_value(FUSION_DTYPE_F32, 1.0);
                for (int64_t j = 0; j < cols; j++) {
                    write_bits(w + (r * cols + j) * (int64_t)es, dt,
                               bits_of_double(dt, random_value(dt, 1.0)));
                }
            }
            int64_t at = trial < 6
                             ? (int64_t[]){0,   cols - 1,        31,
                                           290, rows * cols - 1, 64}[trial]
                             : rng_int(0, rows * cols - 1);
            int kind = trial % 4;
            if (kind == 0 || kind == 1) {
                double bad =
                    kind == 0 ? NAN : (trial & 8 ? -INFINITY : INFINITY);
                write_bits(w + at * (int64_t)es, dt, bits_of_double(dt, bad));
                if (trial & 16) {
                    write_bits(w + rng_int(0, rows * cols - 1) * (int64_t)es,
                               dt, bits_of_double(dt, NAN));
                }
            }
            else if (kind == 2) {
                /* The largest finite value times 1 + 2^-7 overflows. */
                uint64_t max = dt == FUSION_DTYPE_F16    ? 0x7BFF
                               : dt == FUSION_DTYPE_BF16 ? 0x7F7F
                               : dt == FUSION_DTYPE_F32
                                   ? 0x7F7FFFFFu
                                   : 0x7FEFFFFFFFFFFFFFull;
                write_bits(w + at * (int64_t)es, dt, max);
                gamma[at / cols] = 1.0 + 0x1p-7;
            }
            snprintf(g_context, sizeof g_context, "%s trial %d at %" PRId64,
                     dtype_name(dt), trial, at);
            fusion_status st;
            isa_compare("check", dt, rows, cols, w, gamma, &st, NULL);
            CHECK(kind == 3 || st != FUSION_OK, "a bad weight passed");
        }
        free(w);
    }
    g_context[0] = '\0';
}

static void
test_isa_api(void)
{
    fusion_isa was = fusion_get_isa();
    CHECK(was != FUSION_ISA_AUTO && fusion_isa_supported(was),
          "the chosen path %d", (int)was);
    CHECK(fusion_set_isa((fusion_isa)7) == FUSION_E_ARG, "unknown path");
    CHECK(fusion_get_isa() == was, "a refused path changed the path");
    for (int k = 0; k < 3; k++) {
        fusion_isa isa = ALL_ISAS[k];
        fusion_status st = fusion_set_isa(isa);
        CHECK(st == (fusion_isa_supported(isa) ? FUSION_OK : FUSION_E_ARG),
              "set %s", fusion_isa_str(isa));
        CHECK(st != FUSION_OK || fusion_get_isa() == isa, "get %s",
              fusion_isa_str(isa));
    }
    CHECK(fusion_set_isa(FUSION_ISA_AUTO) == FUSION_OK, "auto");
    CHECK(fusion_isa_supported(FUSION_ISA_BASELINE), "baseline");
    CHECK(strcmp(fusion_isa_str(FUSION_ISA_AVX512), "avx512") == 0, "str");
    CHECK(strcmp(fusion_isa_str((fusion_isa)9), "") == 0, "str(9)");
    fusion_set_isa(was);
}

static void
test_isa_summary(void)
{
    int paths = 0;
    for (int k = 0; k < 3; k++) {
        paths += fusion_isa_supported(ALL_ISAS[k]);
    }
    printf("isa paths: baseline%s%s; %" PRId64 " fused values bit-identical "
           "on every path, %" PRId64 " of them where rounding through "
           "float32 would differ\n",
           fusion_isa_supported(FUSION_ISA_AVX2) ? ", avx2" : "",
           fusion_isa_supported(FUSION_ISA_AVX512) ? ", avx512" : "",
           g_isa_values, g_isa_naive);
    CHECK(paths >= 1, "no path");
}

int
main(int argc, char **argv)
{
    if (argc > 1) {
        g_rng = strtoull(argv[1], NULL, 0) | 1;
    }
    g_wide_long_double = long_double_is_wide();
    const char *messages = getenv("FOLD_TEST_MESSAGES");
    if (messages != NULL) {
        g_max_messages = atoi(messages);
    }
    run("f16 exhaustive", test_f16_exhaustive);
    run("bf16 exhaustive", test_bf16_exhaustive);
    run("overflow thresholds", test_overflow_thresholds);
    run("subnormals", test_subnormals_and_tiny);
    run("store random", test_store_random);
    run("dtype basics", test_dtype_basics);
    /* The fold tests on every instruction-set path this CPU has, the
     * baseline first; the precision tallies cover them all. */
    for (int k = 0; k < 3; k++) {
        if (fusion_set_isa(ALL_ISAS[k]) != FUSION_OK) {
            continue;
        }
        g_isa_name = fusion_isa_str(ALL_ISAS[k]);
        run("known answers", test_known_answers);
        test_fold_sweep();
        run("fold large", test_fold_large);
        run("nonfinite", test_nonfinite);
        run("variance", test_variance);
        run("overflow", test_overflow);
        run("whole-weight bound", test_whole_weight_bound);
        run("shapes and arguments", test_shapes_and_arguments);
        run("bounds", test_bounds);
        run("degenerate views", test_degenerate_views);
        run("overlapping views", test_overlapping_views);
        run("out views", test_out_views);
        run("negative strides", test_negative_strides);
        run("f64 overflow edge", test_f64_overflow_edge);
    }
    fusion_set_isa(FUSION_ISA_AUTO);
    g_isa_name = "";
    run("precision criterion", test_precision_criterion);
    run("isa api", test_isa_api);
    run("isa exhaustive 16-bit", test_isa_exhaustive16);
    run("isa midpoints", test_isa_midpoints);
    run("isa signed zeros", test_isa_signed_zeros);
    run("isa leaves the upper halves clear", test_isa_leaves_upper_clear);
    run("isa f32", test_isa_f32);
    run("isa check pass", test_isa_check);
    run("fp environment", test_fp_environment);
    run("isa summary", test_isa_summary);
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
