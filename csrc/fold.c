/*
 * fold.c - the numeric core of fusion. See fold.h for the contract.
 *
 * Everything is computed in float64 from the stored values and rounded once,
 * to nearest even, to the destination dtype. A float16 or bfloat16 value is
 * never rounded twice: where a kernel goes through float32 (the float32
 * paths of the vector kernels, the portable kernels' conversion), it does so
 * only where that is proven to give the float64 product rounded once, and
 * rounds from float64 elsewhere.
 *
 * The check phase reads every weight once (finiteness, and the per-channel
 * maximum that decides overflow), the apply phase reads and writes it once.
 */
#include "fold.h"

#include <fenv.h>
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

/* A fold into another tensor of at least this many bytes uses non-temporal
 * stores (tests/c builds a second binary with 1, so that every such fold
 * does). */
#ifndef FUSION_STREAM_BYTES
#define FUSION_STREAM_BYTES (1 << 20)
#endif

/* Weights of at least this many elements are scaled by several threads when
 * the core is built with OpenMP. */
#ifndef FUSION_OMP_NUMEL
#define FUSION_OMP_NUMEL (1 << 20)
#endif

/* ------------------------------------------------------------------------ */
/* The floating-point environment.                                           */

/* Every computation here assumes the default environment: round to nearest
 * even, x87 extended precision for long double, and subnormals kept. The
 * caller's may differ: torch.set_flush_denormal(True) sets SSE's
 * flush-to-zero and denormals-are-zero, which would turn subnormal weights
 * and products into zeros. So each entry point that computes (and each
 * OpenMP thread it starts) runs in the default environment and gives the
 * caller's back, flags included, when it returns. */
typedef struct {
    fenv_t env;
} fp_saved;

static void
fp_enter(fp_saved *saved)
{
    fegetenv(&saved->env);
    fesetenv(FE_DFL_ENV);
#if defined(__SSE__)
    _mm_setcsr(0x1F80); /* exceptions masked, to nearest, no FTZ or DAZ */
#endif
}

static void
fp_leave(const fp_saved *saved)
{
    fesetenv(&saved->env);
}

/* ------------------------------------------------------------------------ */
/* Scalars: exact loads and once-rounded stores.                             */

size_t
fusion_dtype_size(fusion_dtype dtype)
{
    switch (dtype) {
        case FUSION_DTYPE_F16:
        case FUSION_DTYPE_BF16:
            return 2;
        case FUSION_DTYPE_F32:
            return 4;
        case FUSION_DTYPE_F64:
            return 8;
        default:
            return 0;
    }
}

/* float16 to float64 by bits: exact, with no libm call. */
static inline double
f16_to_double(uint16_t h)
{
    uint64_t sign = (uint64_t)(h & 0x8000) << 48;
    int exp = (h >> 10) & 0x1f;
    uint64_t mant = h & 0x3ff;
    uint64_t bits;
    if (exp == 0) {
        double v = (double)mant * 0x1p-24; /* a subnormal, exactly */
        memcpy(&bits, &v, sizeof bits);
    }
    else if (exp == 31) {
        bits = mant ? UINT64_C(0x7FF8000000000000) : UINT64_C(0x7FF0) << 48;
    }
    else {
        bits = (uint64_t)(exp - 15 + 1023) << 52 | mant << 42;
    }
    bits |= sign;
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static double
bf16_to_double(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

double
fusion_load(const void *src, fusion_dtype dtype)
{
    switch (dtype) {
        case FUSION_DTYPE_F16: {
            uint16_t h;
            memcpy(&h, src, 2);
            return f16_to_double(h);
        }
        case FUSION_DTYPE_BF16: {
            uint16_t h;
            memcpy(&h, src, 2);
            return bf16_to_double(h);
        }
        case FUSION_DTYPE_F32: {
            float f;
            memcpy(&f, src, 4);
            return (double)f;
        }
        case FUSION_DTYPE_F64: {
            double d;
            memcpy(&d, src, 8);
            return d;
        }
        default:
            return NAN;
    }
}

/* Rounds the float64 with bits `a` (sign bit clear) to nearest even in a
 * binary format with p significand bits (the implicit one included) and
 * exponent bias `bias`, and returns its bits (sign bit clear). Integer
 * arithmetic only, so it is exact, needs no libm, and runs the same under
 * any floating-point environment. Below 2^(1 - bias) the quantum stays that
 * of the smallest normal binade (the subnormal grid, whose exponent field is
 * 0); a rounding up into the next binade carries into the exponent field,
 * and past the largest finite value into infinity's pattern. */
static inline uint32_t
round_bits(uint64_t a, int p, int bias)
{
    uint32_t inf = (uint32_t)(2 * bias + 1) << (p - 1);
    if (a >= UINT64_C(0x7FF0000000000000)) {
        return a == UINT64_C(0x7FF0000000000000) ? inf : inf | 1u << (p - 2);
    }
    int e = (int)(a >> 52) - 1023;
    if (e < -1022) {
        return 0; /* 0, or a float64 subnormal: below 2^-1022 */
    }
    if (e > bias) {
        return inf;
    }
    int at =
        e < 1 - bias ? 1 - bias : e; /* the binade whose quantum applies */
    int drop = 53 - p + (at - e);
    if (drop > 54) {
        return 0; /* below a quarter of the smallest subnormal */
    }
    uint64_t m = (a & ((UINT64_C(1) << 52) - 1)) | UINT64_C(1) << 52;
    /* Nearest even with no branch: add half the quantum, less one unless
     * the kept part is odd, and cut. */
    uint64_t q =
        (m + (UINT64_C(1) << (drop - 1)) - 1 + (m >> drop & 1)) >> drop;
    return (uint32_t)(((uint64_t)(at + bias - 1) << (p - 1)) + q);
}

static inline uint16_t
double_to_16(double x, int p, int bias)
{
    uint64_t b;
    memcpy(&b, &x, sizeof b);
    return (uint16_t)((b >> 48 & 0x8000) |
                      round_bits(b & ~(UINT64_C(1) << 63), p, bias));
}

static uint16_t
double_to_f16(double x)
{
    return double_to_16(x, 11, 15);
}

static uint16_t
double_to_bf16(double x)
{
    return double_to_16(x, 8, 127);
}

int
fusion_fits(double x, fusion_dtype dtype)
{
    if (!isfinite(x)) {
        return 0;
    }
    double a = fabs(x);
    switch (dtype) {
        case FUSION_DTYPE_F16:
            return a < 65520.0; /* 65504 + half an ulp rounds to inf */
        case FUSION_DTYPE_BF16:
            return a < 0x1.ffp+127;
        case FUSION_DTYPE_F32:
            return a < 0x1.ffffffp+127;
        case FUSION_DTYPE_F64:
            return 1;
        default:
            return 0;
    }
}

void
fusion_store(void *dst, fusion_dtype dtype, double x)
{
    switch (dtype) {
        case FUSION_DTYPE_F16: {
            uint16_t h = double_to_f16(x);
            memcpy(dst, &h, 2);
            break;
        }
        case FUSION_DTYPE_BF16: {
            uint16_t h = double_to_bf16(x);
            memcpy(dst, &h, 2);
            break;
        }
        case FUSION_DTYPE_F32: {
            float f = (float)x;
            memcpy(dst, &f, 4);
            break;
        }
        case FUSION_DTYPE_F64:
            memcpy(dst, &x, 8);
            break;
        default:
            break;
    }
}

const char *
fusion_status_str(fusion_status status)
{
    switch (status) {
        case FUSION_OK:
            return "ok";
        case FUSION_E_ARG:
            return "invalid argument";
        case FUSION_E_DTYPE:
            return "unsupported dtype";
        case FUSION_E_SHAPE:
            return "shape mismatch";
        case FUSION_E_BOUNDS:
            return "view reaches outside its storage";
        case FUSION_E_NONFINITE:
            return "NaN or infinite value";
        case FUSION_E_VARIANCE:
            return "running_var + eps is not positive";
        case FUSION_E_OVERFLOW:
            return "fused value overflows the dtype";
        case FUSION_E_NOMEM:
            return "out of memory";
        case FUSION_E_OVERLAP:
            return "view reaches one element through several indices, so it "
                   "cannot be written in place";
    }
    return "unknown status";
}

/* ------------------------------------------------------------------------ */
/* Instruction-set paths: the contiguous-run kernels of the weight passes.   */
/*                                                                           */
/* Each path has the same six kernels. The scan kernels return the largest   */
/* bit pattern of a run with the sign bit cleared (see MAXABS_BITS below);   */
/* integer maxima are exact on any path. The scale kernels replace each      */
/* weight w by its float64 product w * s rounded once to the dtype, exactly  */
/* as the baseline's fusion_store(fusion_load(w) * s) does:                  */
/*                                                                           */
/*  - float32: the product in float64, rounded by the conversion to float,  */
/*    which is the same correctly rounded conversion on every path.         */
/*  - float16: F16C converts only from float32, and rounding the product to */
/*    float32 first would round twice. So the product is rounded to float32 */
/*    with round-to-odd (truncate the low 29 significand bits, then set the */
/*    lowest kept bit if any dropped bit was set), which is exact to        */
/*    represent as a float; then F16C rounds to nearest even. Round-to-odd  */
/*    to a format of p + 2 or more bits, then to nearest with p bits, is    */
/*    the correctly rounded result (Boldo and Melquiond, 2008): 24 >= 11+2. */
/*    Products below float32's normal range (2^-126) come out of the float  */
/*    conversion rounded again, but float16 rounds them all to +-0 either   */
/*    way (they are far below its 2^-25), keeping the sign.                 */
/*  - bfloat16: the same round-to-odd to float32, then the integer round to */
/*    nearest even of the float32 bits to their top 16 (24 >= 8 + 2). A     */
/*    product below 2^-126 would be a bfloat16 subnormal, where the float   */
/*    conversion's own rounding breaks that argument: a vector in which one */
/*    comes out as a float subnormal is done by the baseline's scalar code. */
/*                                                                           */
/* The check pass has already refused every product that does not fit, so  */
/* no kernel sees an overflow: round-to-odd keeps a value below a threshold */
/* that is representable with an even last bit, as 65520 and 0x1.ffp127    */
/* are in float32. float64 weights and the biases stay in long double.      */

typedef struct {
    uint16_t (*max16)(const void *p, int64_t n);
    uint32_t (*max32)(const void *p, int64_t n);
    uint64_t (*max64)(const void *p, int64_t n);
    /* dst[k] = src[k] * s, rounded once; dst may be src (in place). With
     * stream, dst is not src, and the vector paths store with non-temporal
     * stores (past the cache, which a large fresh destination would only
     * evict; fence() orders them before the fold returns). */
    void (*scale_f32)(void *dst, const void *src, int64_t n, double s,
                      int stream);
    void (*scale_f16)(void *dst, const void *src, int64_t n, double s,
                      int stream);
    void (*scale_bf16)(void *dst, const void *src, int64_t n, double s,
                       int stream);
    void (*fence)(void);
} isa_kernels;

/* Four running maxima, so that the compares do not wait on each other
 * (twice as fast as one, measured on 64 MiB). */
#define MAX_BITS_BASE(NAME, U, MASK)                                          \
    static U masked_##NAME(const unsigned char *p, int64_t k)                 \
    {                                                                         \
        U b;                                                                  \
        memcpy(&b, p + k * (int64_t)sizeof(U), sizeof b);                     \
        return b & (U)(MASK);                                                 \
    }                                                                         \
    static U NAME(const void *src, int64_t n)                                 \
    {                                                                         \
        const unsigned char *p = (const unsigned char *)src;                  \
        U m0 = 0, m1 = 0, m2 = 0, m3 = 0;                                     \
        int64_t k = 0;                                                        \
        for (; k + 4 <= n; k += 4) {                                          \
            U b0 = masked_##NAME(p, k), b1 = masked_##NAME(p, k + 1);         \
            U b2 = masked_##NAME(p, k + 2), b3 = masked_##NAME(p, k + 3);     \
            m0 = b0 > m0 ? b0 : m0;                                           \
            m1 = b1 > m1 ? b1 : m1;                                           \
            m2 = b2 > m2 ? b2 : m2;                                           \
            m3 = b3 > m3 ? b3 : m3;                                           \
        }                                                                     \
        for (; k < n; k++) {                                                  \
            U b = masked_##NAME(p, k);                                        \
            m0 = b > m0 ? b : m0;                                             \
        }                                                                     \
        m0 = m1 > m0 ? m1 : m0;                                               \
        m2 = m3 > m2 ? m3 : m2;                                               \
        return m2 > m0 ? m2 : m0;                                             \
    }

MAX_BITS_BASE(max16_base, uint16_t, 0x7FFFu)
MAX_BITS_BASE(max32_base, uint32_t, 0x7FFFFFFFu)
MAX_BITS_BASE(max64_base, uint64_t, 0x7FFFFFFFFFFFFFFFull)

static void
scale_f32_base(void *dst, const void *src, int64_t n, double s, int stream)
{
    (void)stream;
    float *f = (float *)dst;
    const float *x = (const float *)src;
    for (int64_t k = 0; k < n; k++) {
        f[k] = (float)((double)x[k] * s);
    }
}

/* The portable 16-bit scale kernels. The float64 product d is rounded to
 * float32 first (one hardware conversion), and the float32 value f to the
 * weight's dtype with integer arithmetic. Rounding to float32 is monotone
 * and keeps every float32 value, each rounding midpoint of float16 and
 * bfloat16 among them (subnormal ones included), so d and f lie on the same
 * side of every midpoint unless f is one: only then, and for float16's
 * subnormal and overflowing results, is d rounded by round_bits. The
 * default floating-point environment is assumed (no flush to zero), as in
 * every entry point. */
static inline uint32_t
f32_bits(float f)
{
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

static void
scale_f16_base(void *dst, const void *src, int64_t n, double s, int stream)
{
    (void)stream;
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x = (const unsigned char *)src;
    for (int64_t k = 0; k < n; k++) {
        uint16_t h;
        memcpy(&h, x + 2 * k, 2);
        double d = f16_to_double(h) * s;
        uint32_t b = f32_bits((float)d), a = b & 0x7FFFFFFFu;
        if (a >= 0x38800000u && a < 0x477FF000u && (a & 0x1FFFu) != 0x1000u) {
            /* In [2^-14, 65520) and no midpoint: add half of the 13 bits
             * dropped and cut, the float32 exponent rebased to 15. */
            h = (uint16_t)(((b >> 16) & 0x8000u) |
                           ((a - 0x38000000u + 0x1000u) >> 13));
        }
        else {
            h = double_to_f16(d);
        }
        memcpy(q + 2 * k, &h, 2);
    }
}

static void
scale_bf16_base(void *dst, const void *src, int64_t n, double s, int stream)
{
    (void)stream;
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x = (const unsigned char *)src;
    for (int64_t k = 0; k < n; k++) {
        uint16_t h;
        memcpy(&h, x + 2 * k, 2);
        double d = bf16_to_double(h) * s;
        uint32_t b = f32_bits((float)d);
        /* bfloat16 is float32 with 16 bits dropped, subnormals and the
         * carry into infinity included; off a midpoint, adding half of them
         * and cutting rounds to nearest. */
        h = (b & 0xFFFFu) != 0x8000u ? (uint16_t)((b + 0x8000u) >> 16)
                                     : double_to_bf16(d);
        memcpy(q + 2 * k, &h, 2);
    }
}

static void
fence_base(void)
{
}

static const isa_kernels KERNELS_BASE = {
    max16_base,     max32_base,      max64_base, scale_f32_base,
    scale_f16_base, scale_bf16_base, fence_base};

/* -DFUSION_NO_ISA_PATHS builds the baseline alone, as on other CPUs. */
#if !defined(FUSION_NO_ISA_PATHS) && defined(__x86_64__) &&                   \
    (defined(__GNUC__) || defined(__clang__))
#define FUSION_X86_PATHS 1
#include <cpuid.h>
#include <immintrin.h>

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,f16c")))

/* Before each call from a vector kernel into a portable one: clears the
 * upper halves of the vector registers. GCC 12 emits no vzeroupper before a
 * call, or a tail call, from a function compiled for AVX into one compiled
 * without it, so the portable code ran with them dirty, and so did whatever
 * the caller ran after the kernel returned, until something else cleared
 * them: on an AMD EPYC (Zen 4), after one float16 or bfloat16 fold the
 * portable float32 fold ran at 0.74 instead of 0.18 ns per weight, and every
 * other non-VEX instruction of the process paid the same. */
#define LEAVE_AVX() _mm256_zeroupper()

/* Low 29 bits of a float64's significand: what float32 drops. */
/* How far ahead the kernels prefetch, in bytes. The hardware prefetcher
 * alone left the float16 apply at a third of its in-cache speed on a 64 MiB
 * weight (measured: 0.77 against 0.26 ns per element on AVX-512); 2 KiB
 * ahead closes that gap. A prefetch never faults, past the end included. */
#define PREFETCH_AHEAD 2048
#define PREFETCH(p)                                                           \
    _mm_prefetch((const char *)(p) + PREFETCH_AHEAD, _MM_HINT_T0)

/* With stream, how many of the n elements of size es at dst come before the
 * first one aligned to `align` bytes (a non-temporal vector store needs the
 * alignment of its width): these, and a dst not aligned to its own element
 * size, go through ordinary stores. 0 without stream. */
static inline int64_t
stream_head(const void *dst, int stream, uintptr_t align, int64_t es,
            int64_t n)
{
    if (!stream) {
        return 0;
    }
    uintptr_t at = (uintptr_t)dst;
    if (at % (uintptr_t)es != 0) {
        return n;
    }
    int64_t head = (int64_t)((align - at % align) % align) / es;
    return head < n ? head : n;
}

static void
fence_sse(void)
{
    _mm_sfence();
}

#define RO_LOW 0x1FFFFFFFll
#define RO_ODD 0x20000000ll

AVX2_TARGET static uint16_t
max16_avx2(const void *src, int64_t n)
{
    const unsigned char *p = (const unsigned char *)src;
    const __m256i mask = _mm256_set1_epi16(0x7FFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        PREFETCH(p + 2 * k);
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + 2 * k));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + 2 * k + 32));
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(a, mask));
        m1 = _mm256_max_epu16(m1, _mm256_and_si256(b, mask));
    }
    m0 = _mm256_max_epu16(m0, m1);
    __m128i x = _mm_max_epu16(_mm256_castsi256_si128(m0),
                              _mm256_extracti128_si256(m0, 1));
    uint16_t lanes[8];
    _mm_storeu_si128((__m128i *)lanes, x);
    LEAVE_AVX();
    uint16_t m = max16_base(p + 2 * k, n - k);
    for (int i = 0; i < 8; i++) {
        m = lanes[i] > m ? lanes[i] : m;
    }
    return m;
}

AVX2_TARGET static uint32_t
max32_avx2(const void *src, int64_t n)
{
    const unsigned char *p = (const unsigned char *)src;
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        PREFETCH(p + 4 * k);
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + 4 * k));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + 4 * k + 32));
        m0 = _mm256_max_epu32(m0, _mm256_and_si256(a, mask));
        m1 = _mm256_max_epu32(m1, _mm256_and_si256(b, mask));
    }
    m0 = _mm256_max_epu32(m0, m1);
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, m0);
    LEAVE_AVX();
    uint32_t m = max32_base(p + 4 * k, n - k);
    for (int i = 0; i < 8; i++) {
        m = lanes[i] > m ? lanes[i] : m;
    }
    return m;
}

/* The masked patterns are below 2^63, so a signed compare orders them. */
AVX2_TARGET static uint64_t
max64_avx2(const void *src, int64_t n)
{
    const unsigned char *p = (const unsigned char *)src;
    const __m256i mask = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll);
    __m256i m0 = _mm256_setzero_si256(), m1 = m0;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        PREFETCH(p + 8 * k);
        __m256i a = _mm256_and_si256(
            _mm256_loadu_si256((const __m256i *)(p + 8 * k)), mask);
        __m256i b = _mm256_and_si256(
            _mm256_loadu_si256((const __m256i *)(p + 8 * k + 32)), mask);
        m0 = _mm256_blendv_epi8(m0, a, _mm256_cmpgt_epi64(a, m0));
        m1 = _mm256_blendv_epi8(m1, b, _mm256_cmpgt_epi64(b, m1));
    }
    m0 = _mm256_blendv_epi8(m0, m1, _mm256_cmpgt_epi64(m1, m0));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, m0);
    LEAVE_AVX();
    uint64_t m = max64_base(p + 8 * k, n - k);
    for (int i = 0; i < 4; i++) {
        m = lanes[i] > m ? lanes[i] : m;
    }
    return m;
}

/* Four float64 values rounded to float32 with round-to-odd, as float64
 * values that convert to float exactly (from 2^-126 up). */
AVX2_TARGET static inline __m256d
round_odd_avx2(__m256d x)
{
    __m256i b = _mm256_castpd_si256(x);
    __m256i low = _mm256_and_si256(b, _mm256_set1_epi64x(RO_LOW));
    __m256i exact = _mm256_cmpeq_epi64(low, _mm256_setzero_si256());
    __m256i odd = _mm256_andnot_si256(exact, _mm256_set1_epi64x(RO_ODD));
    b = _mm256_andnot_si256(_mm256_set1_epi64x(RO_LOW), b);
    return _mm256_castsi256_pd(_mm256_or_si256(b, odd));
}

/* Eight floats as two vectors of four float64, times s. */
#define AVX2_WIDEN_MUL(x, vs, lo, hi)                                         \
    do {                                                                      \
        lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), vs);   \
        hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), vs); \
    } while (0)

#define AVX2_NARROW(lo, hi)                                                   \
    _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)),         \
                         _mm256_cvtpd_ps(hi), 1)

AVX2_TARGET static void
scale_f32_avx2(void *dst, const void *src, int64_t n, double s, int stream)
{
    float *f = (float *)dst;
    const float *src_f = (const float *)src;
    const __m256d vs = _mm256_set1_pd(s);
    int64_t k = stream_head(f, stream, 32, 4, n);
    LEAVE_AVX();
    scale_f32_base(f, src_f, k, s, 0);
    for (; k + 8 <= n; k += 8) {
        PREFETCH(src_f + k);
        __m256 x = _mm256_loadu_ps(src_f + k);
        __m256d lo, hi;
        AVX2_WIDEN_MUL(x, vs, lo, hi);
        if (stream) {
            _mm256_stream_ps(f + k, AVX2_NARROW(lo, hi));
        }
        else {
            _mm256_storeu_ps(f + k, AVX2_NARROW(lo, hi));
        }
    }
    LEAVE_AVX();
    scale_f32_base(f + k, src_f + k, n - k, s, 0);
}

AVX2_TARGET static void
scale_f16_exact_avx2(void *dst, const void *src, int64_t n, double s,
                     int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    const __m256d vs = _mm256_set1_pd(s);
    int64_t k = stream_head(q, stream, 16, 2, n);
    LEAVE_AVX();
    scale_f16_base(q, x16, k, s, 0);
    for (; k + 8 <= n; k += 8) {
        PREFETCH(x16 + 2 * k);
        __m256 x =
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x16 + 2 * k)));
        __m256d lo, hi;
        AVX2_WIDEN_MUL(x, vs, lo, hi);
        __m256 r = AVX2_NARROW(round_odd_avx2(lo), round_odd_avx2(hi));
        __m128i h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT);
        if (stream) {
            _mm_stream_si128((__m128i *)(q + 2 * k), h);
        }
        else {
            _mm_storeu_si128((__m128i *)(q + 2 * k), h);
        }
    }
    LEAVE_AVX();
    scale_f16_base(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* A mask of the float lanes of b that are subnormal: the product was below
 * 2^-126, where the float conversion rounded a second time. A product that
 * rounded up to 2^-126 itself is right as it is (bfloat16 rounds it there
 * too: it lies within 2^-150 of it), and one that rounded to +-0 was below
 * 2^-150, which bfloat16 rounds to +-0 as well. */
#define F32_EXP 0x7F800000
#define F32_MAG 0x7FFFFFFF

AVX2_TARGET static inline int
subnormal_avx2(__m256i b)
{
    const __m256i zero = _mm256_setzero_si256();
    __m256i exp0 = _mm256_cmpeq_epi32(
        _mm256_and_si256(b, _mm256_set1_epi32(F32_EXP)), zero);
    __m256i mag0 = _mm256_cmpeq_epi32(
        _mm256_and_si256(b, _mm256_set1_epi32(F32_MAG)), zero);
    return _mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_andnot_si256(mag0, exp0)));
}

AVX2_TARGET static void
scale_bf16_exact_avx2(void *dst, const void *src, int64_t n, double s,
                      int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    const __m256d vs = _mm256_set1_pd(s);
    const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    int64_t k = stream_head(q, stream, 16, 2, n);
    LEAVE_AVX();
    scale_bf16_base(q, x16, k, s, 0);
    for (; k + 8 <= n; k += 8) {
        PREFETCH(x16 + 2 * k);
        __m256i h = _mm256_cvtepu16_epi32(
            _mm_loadu_si128((const __m128i *)(x16 + 2 * k)));
        __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
        __m256d lo, hi;
        AVX2_WIDEN_MUL(x, vs, lo, hi);
        __m256i b = _mm256_castps_si256(
            AVX2_NARROW(round_odd_avx2(lo), round_odd_avx2(hi)));
        if (subnormal_avx2(b)) {
            LEAVE_AVX();
            scale_bf16_base(q + 2 * k, x16 + 2 * k, 8, s, 0);
            continue;
        }
        /* Round to nearest even at bit 16: add 0x7FFF plus the kept lsb. */
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
        b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(half, lsb)),
                              16);
        /* Pack the eight 32-bit lanes (each < 2^16) to 16 bits in order. */
        __m256i packed =
            _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0xD8);
        if (stream) {
            _mm_stream_si128((__m128i *)(q + 2 * k),
                             _mm256_castsi256_si128(packed));
        }
        else {
            _mm_storeu_si128((__m128i *)(q + 2 * k),
                             _mm256_castsi256_si128(packed));
        }
    }
    LEAVE_AVX();
    scale_bf16_base(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* The float32 path of the 16-bit scale kernels.
 *
 * A float16 weight has 11 significant bits and a bfloat16 one 8, so its
 * product with a scale cut to 13 (float16) or 16 (bfloat16) bits is exact
 * in float32 (when not below 2^-126). The scale is split as s = hi + lo: hi
 * is s truncated toward zero to those bits, lo = s - hi (exact in float64,
 * of s's sign) rounded to float32. Then p = fma(x, lo, x * hi) is within
 * one float32 ulp of x * s: half an ulp for the fma's rounding, half of
 * 2^-149 more where x * hi is itself a rounded float32 subnormal, and
 * x * (lo's rounding), below 2^-35 of x * s.
 *
 * Where p is two or more float32 ulps from every rounding midpoint of the
 * weight's dtype, x * s lies on p's side of each, and so does the float64
 * product, which is within 2^-53 of x * s and can neither reach nor cross a
 * midpoint (each is a float64 value): rounding p then gives the float64
 * product rounded once. A vector in which some p lies within one ulp of a
 * midpoint (the bits that the dtype drops are 0x7FFF, 0x8000 or 0x8001 for
 * bfloat16, 0x0FFF, 0x1000 or 0x1001 for float16, read as below for its
 * subnormals) is done by the exact kernel above. bfloat16's subnormals are
 * float32's with the same 16 bits dropped, so the test and the integer
 * rounding hold there as they are. Zeros need nothing: x * hi and x * lo
 * are zeros of the same sign, so p is the signed zero that the float64
 * product is. A scale outside [2^-100, 2^100] takes the exact kernel for
 * the whole run (so that hi and lo are float32 values, and lo's rounding is
 * relative to s). */
typedef struct {
    float hi, lo;
} split_scale;

static int
split_for_f32(double s, int keep, split_scale *out)
{
    double a = fabs(s);
    if (!(a >= 0x1p-100 && a <= 0x1p100)) {
        return 0;
    }
    uint64_t b;
    memcpy(&b, &s, sizeof b);
    b &= ~((UINT64_C(1) << (53 - keep)) - 1);
    double hi;
    memcpy(&hi, &b, sizeof hi);
    out->hi = (float)hi;
    out->lo = copysignf((float)(s - hi), (float)s);
    return 1;
}

/* A mask of the float lanes of p within one ulp of a midpoint: the low
 * `drop` bits of p, plus half of their range plus one, are below 3. Also
 * returns those bits added (u), which round p to nearest wherever the
 * mask is clear. */
#define NEAR_MIDPOINT_AVX2(p, drop, u)                                        \
    _mm256_cmpgt_epi32(                                                       \
        _mm256_set1_epi32(3),                                                 \
        _mm256_and_si256(                                                     \
            (u = _mm256_add_epi32(_mm256_castps_si256(p),                     \
                                  _mm256_set1_epi32((1 << ((drop)-1)) + 1))), \
            _mm256_set1_epi32((1 << (drop)) - 1)))

AVX2_TARGET static void
scale_bf16_avx2(void *dst, const void *src, int64_t n, double s, int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    split_scale sp;
    if (n < 16 || !split_for_f32(s, 16, &sp)) {
        scale_bf16_exact_avx2(dst, src, n, s, stream);
        return;
    }
    const __m256 vhi = _mm256_set1_ps(sp.hi), vlo = _mm256_set1_ps(sp.lo);
    const __m256i zero = _mm256_setzero_si256();
    int64_t k = stream_head(q, stream, 32, 2, n);
    scale_bf16_exact_avx2(q, x16, k, s, 0);
    for (; k + 16 <= n; k += 16) {
        PREFETCH(x16 + 2 * k);
        __m256i v = _mm256_loadu_si256((const __m256i *)(x16 + 2 * k));
        /* Lanes 0-3 and 8-11 of v, and 4-7 and 12-15, as floats. */
        __m256 a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
        __m256 c = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
        a = _mm256_fmadd_ps(a, vlo, _mm256_mul_ps(a, vhi));
        c = _mm256_fmadd_ps(c, vlo, _mm256_mul_ps(c, vhi));
        __m256i ua, uc;
        __m256i bad = _mm256_or_si256(NEAR_MIDPOINT_AVX2(a, 16, ua),
                                      NEAR_MIDPOINT_AVX2(c, 16, uc));
        if (!_mm256_testz_si256(bad, bad)) {
            scale_bf16_exact_avx2(q + 2 * k, x16 + 2 * k, 16, s, 0);
            continue;
        }
        /* packus keeps each 128-bit lane's order: back to 0-15. */
        __m256i r = _mm256_packus_epi32(_mm256_srli_epi32(ua, 16),
                                        _mm256_srli_epi32(uc, 16));
        if (stream) {
            _mm256_stream_si256((__m256i *)(q + 2 * k), r);
        }
        else {
            _mm256_storeu_si256((__m256i *)(q + 2 * k), r);
        }
    }
    scale_bf16_exact_avx2(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* |p|, plus 2^-14 where |p| < 2^-14: float16's subnormals lie 2^-24 apart
 * below 2^-14, and so do its values in [2^-14, 2^-13), where float32 drops
 * the same 13 bits as in any binade. The sum is off by at most 2^-38, and
 * p by at most half its ulp (2^-39 there) and 2^-35 of itself: within one
 * float32 ulp of [2^-14, 2^-13), 2^-37, in all, so the midpoint test above
 * holds for the sum. */
AVX2_TARGET static inline __m256
f16_grid_avx2(__m256 p, __m256 sub)
{
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), p);
    return _mm256_add_ps(
        a, _mm256_and_ps(_mm256_cmp_ps(a, sub, _CMP_LT_OQ), sub));
}

AVX2_TARGET static void
scale_f16_avx2(void *dst, const void *src, int64_t n, double s, int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    split_scale sp;
    if (n < 16 || !split_for_f32(s, 13, &sp)) {
        scale_f16_exact_avx2(dst, src, n, s, stream);
        return;
    }
    const __m256 vhi = _mm256_set1_ps(sp.hi), vlo = _mm256_set1_ps(sp.lo);
    const __m256 sub = _mm256_set1_ps(0x1p-14f);
    int64_t k = stream_head(q, stream, 32, 2, n);
    scale_f16_exact_avx2(q, x16, k, s, 0);
    for (; k + 16 <= n; k += 16) {
        PREFETCH(x16 + 2 * k);
        __m256i v = _mm256_loadu_si256((const __m256i *)(x16 + 2 * k));
        __m256 a = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
        __m256 c = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
        a = _mm256_fmadd_ps(a, vlo, _mm256_mul_ps(a, vhi));
        c = _mm256_fmadd_ps(c, vlo, _mm256_mul_ps(c, vhi));
        __m256i ua, uc;
        __m256 ga = f16_grid_avx2(a, sub), gc = f16_grid_avx2(c, sub);
        __m256i bad = _mm256_or_si256(NEAR_MIDPOINT_AVX2(ga, 13, ua),
                                      NEAR_MIDPOINT_AVX2(gc, 13, uc));
        (void)ua;
        (void)uc;
        if (!_mm256_testz_si256(bad, bad)) {
            scale_f16_exact_avx2(q + 2 * k, x16 + 2 * k, 16, s, 0);
            continue;
        }
        __m256i r = _mm256_inserti128_si256(
            _mm256_castsi128_si256(
                _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT)),
            _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT), 1);
        if (stream) {
            _mm256_stream_si256((__m256i *)(q + 2 * k), r);
        }
        else {
            _mm256_storeu_si256((__m256i *)(q + 2 * k), r);
        }
    }
    scale_f16_exact_avx2(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

static const isa_kernels KERNELS_AVX2 = {
    max16_avx2,     max32_avx2,      max64_avx2, scale_f32_avx2,
    scale_f16_avx2, scale_bf16_avx2, fence_sse};

AVX512_TARGET static inline __m512d
round_odd_avx512(__m512d x)
{
    __m512i b = _mm512_castpd_si512(x);
    const __m512i low = _mm512_set1_epi64(RO_LOW);
    __mmask8 inexact = _mm512_test_epi64_mask(b, low);
    b = _mm512_andnot_si512(low, b);
    b = _mm512_mask_or_epi64(b, inexact, b, _mm512_set1_epi64(RO_ODD));
    return _mm512_castsi512_pd(b);
}

#define AVX512_WIDEN_MUL(x, vs, lo, hi)                                       \
    do {                                                                      \
        lo = _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), vs);   \
        hi = _mm512_mul_pd(                                                   \
            _mm512_cvtps_pd(_mm256_castpd_ps(                                 \
                _mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))),             \
            vs);                                                              \
    } while (0)

#define AVX512_NARROW(lo, hi)                                                 \
    _mm512_castpd_ps(_mm512_insertf64x4(                                      \
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),        \
        _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1))

AVX512_TARGET static void
scale_f32_avx512(void *dst, const void *src, int64_t n, double s, int stream)
{
    float *f = (float *)dst;
    const float *src_f = (const float *)src;
    const __m512d vs = _mm512_set1_pd(s);
    int64_t k = stream_head(f, stream, 64, 4, n);
    LEAVE_AVX();
    scale_f32_base(f, src_f, k, s, 0);
    for (; k + 16 <= n; k += 16) {
        PREFETCH(src_f + k);
        __m512 x = _mm512_loadu_ps(src_f + k);
        __m512d lo, hi;
        AVX512_WIDEN_MUL(x, vs, lo, hi);
        if (stream) {
            _mm512_stream_ps(f + k, AVX512_NARROW(lo, hi));
        }
        else {
            _mm512_storeu_ps(f + k, AVX512_NARROW(lo, hi));
        }
    }
    LEAVE_AVX();
    scale_f32_base(f + k, src_f + k, n - k, s, 0);
}

AVX512_TARGET static void
scale_f16_exact_avx512(void *dst, const void *src, int64_t n, double s,
                       int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    const __m512d vs = _mm512_set1_pd(s);
    int64_t k = stream_head(q, stream, 32, 2, n);
    LEAVE_AVX();
    scale_f16_base(q, x16, k, s, 0);
    for (; k + 16 <= n; k += 16) {
        PREFETCH(x16 + 2 * k);
        __m512 x = _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *)(x16 + 2 * k)));
        __m512d lo, hi;
        AVX512_WIDEN_MUL(x, vs, lo, hi);
        __m512 r = AVX512_NARROW(round_odd_avx512(lo), round_odd_avx512(hi));
        __m256i h = _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT);
        if (stream) {
            _mm256_stream_si256((__m256i *)(q + 2 * k), h);
        }
        else {
            _mm256_storeu_si256((__m256i *)(q + 2 * k), h);
        }
    }
    LEAVE_AVX();
    scale_f16_base(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

AVX512_TARGET static void
scale_bf16_exact_avx512(void *dst, const void *src, int64_t n, double s,
                        int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    const __m512d vs = _mm512_set1_pd(s);
    const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    int64_t k = stream_head(q, stream, 32, 2, n);
    LEAVE_AVX();
    scale_bf16_base(q, x16, k, s, 0);
    for (; k + 16 <= n; k += 16) {
        PREFETCH(x16 + 2 * k);
        __m512i h = _mm512_cvtepu16_epi32(
            _mm256_loadu_si256((const __m256i *)(x16 + 2 * k)));
        __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        __m512d lo, hi;
        AVX512_WIDEN_MUL(x, vs, lo, hi);
        __m512i b = _mm512_castps_si512(
            AVX512_NARROW(round_odd_avx512(lo), round_odd_avx512(hi)));
        /* Subnormal lanes (see subnormal_avx2) go the scalar way. */
        if (_mm512_testn_epi32_mask(b, _mm512_set1_epi32(F32_EXP)) &
            _mm512_test_epi32_mask(b, _mm512_set1_epi32(F32_MAG))) {
            LEAVE_AVX();
            scale_bf16_base(q + 2 * k, x16 + 2 * k, 16, s, 0);
            continue;
        }
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
        b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(half, lsb)),
                              16);
        if (stream) {
            _mm256_stream_si256((__m256i *)(q + 2 * k),
                                _mm512_cvtepi32_epi16(b));
        }
        else {
            _mm256_storeu_si256((__m256i *)(q + 2 * k),
                                _mm512_cvtepi32_epi16(b));
        }
    }
    LEAVE_AVX();
    scale_bf16_base(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* The float32 path (see split_for_f32) with 32 weights a vector pair. */
#define NEAR_MIDPOINT_AVX512(p, drop, u)                                      \
    _mm512_cmplt_epu32_mask(                                                  \
        _mm512_and_si512(                                                     \
            (u = _mm512_add_epi32(_mm512_castps_si512(p),                     \
                                  _mm512_set1_epi32((1 << ((drop)-1)) + 1))), \
            _mm512_set1_epi32((1 << (drop)) - 1)),                            \
        _mm512_set1_epi32(3))

AVX512_TARGET static void
scale_bf16_avx512(void *dst, const void *src, int64_t n, double s, int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    split_scale sp;
    if (n < 32 || !split_for_f32(s, 16, &sp)) {
        scale_bf16_exact_avx512(dst, src, n, s, stream);
        return;
    }
    const __m512 vhi = _mm512_set1_ps(sp.hi), vlo = _mm512_set1_ps(sp.lo);
    const __m512i zero = _mm512_setzero_si512();
    int64_t k = stream_head(q, stream, 64, 2, n);
    scale_bf16_exact_avx512(q, x16, k, s, 0);
    for (; k + 32 <= n; k += 32) {
        PREFETCH(x16 + 2 * k);
        __m512i v = _mm512_loadu_si512((const void *)(x16 + 2 * k));
        /* Per 128-bit lane, its low and its high four weights as floats. */
        __m512 a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
        __m512 c = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
        a = _mm512_fmadd_ps(a, vlo, _mm512_mul_ps(a, vhi));
        c = _mm512_fmadd_ps(c, vlo, _mm512_mul_ps(c, vhi));
        __m512i ua, uc;
        if (NEAR_MIDPOINT_AVX512(a, 16, ua) |
            NEAR_MIDPOINT_AVX512(c, 16, uc)) {
            scale_bf16_exact_avx512(q + 2 * k, x16 + 2 * k, 32, s, 0);
            continue;
        }
        __m512i r = _mm512_packus_epi32(_mm512_srli_epi32(ua, 16),
                                        _mm512_srli_epi32(uc, 16));
        if (stream) {
            _mm512_stream_si512((void *)(q + 2 * k), r);
        }
        else {
            _mm512_storeu_si512((void *)(q + 2 * k), r);
        }
    }
    scale_bf16_exact_avx512(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* f16_grid_avx2's sum, on 16 lanes. */
AVX512_TARGET static inline __m512
f16_grid_avx512(__m512 p, __m512 sub)
{
    __m512 a = _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(p), _mm512_set1_epi32(F32_MAG)));
    return _mm512_mask_add_ps(a, _mm512_cmp_ps_mask(a, sub, _CMP_LT_OQ), a,
                              sub);
}

AVX512_TARGET static void
scale_f16_avx512(void *dst, const void *src, int64_t n, double s, int stream)
{
    unsigned char *q = (unsigned char *)dst;
    const unsigned char *x16 = (const unsigned char *)src;
    split_scale sp;
    if (n < 32 || !split_for_f32(s, 13, &sp)) {
        scale_f16_exact_avx512(dst, src, n, s, stream);
        return;
    }
    const __m512 vhi = _mm512_set1_ps(sp.hi), vlo = _mm512_set1_ps(sp.lo);
    const __m512 sub = _mm512_set1_ps(0x1p-14f);
    int64_t k = stream_head(q, stream, 64, 2, n);
    scale_f16_exact_avx512(q, x16, k, s, 0);
    for (; k + 32 <= n; k += 32) {
        PREFETCH(x16 + 2 * k);
        __m512i v = _mm512_loadu_si512((const void *)(x16 + 2 * k));
        __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
        __m512 c = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
        a = _mm512_fmadd_ps(a, vlo, _mm512_mul_ps(a, vhi));
        c = _mm512_fmadd_ps(c, vlo, _mm512_mul_ps(c, vhi));
        __m512i ua, uc;
        __m512 ga = f16_grid_avx512(a, sub), gc = f16_grid_avx512(c, sub);
        __mmask16 bad = NEAR_MIDPOINT_AVX512(ga, 13, ua) |
                        NEAR_MIDPOINT_AVX512(gc, 13, uc);
        (void)ua;
        (void)uc;
        if (bad) {
            scale_f16_exact_avx512(q + 2 * k, x16 + 2 * k, 32, s, 0);
            continue;
        }
        __m512i r = _mm512_inserti64x4(
            _mm512_castsi256_si512(
                _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT)),
            _mm512_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT), 1);
        if (stream) {
            _mm512_stream_si512((void *)(q + 2 * k), r);
        }
        else {
            _mm512_storeu_si512((void *)(q + 2 * k), r);
        }
    }
    scale_f16_exact_avx512(q + 2 * k, x16 + 2 * k, n - k, s, 0);
}

/* The check pass keeps AVX2's maxima: it is bound by the read either way,
 * and on an AMD EPYC (Zen 4) 512-bit loads ran it 10-15% slower (64 MiB of
 * float32: 2.5-2.7 against 2.2-2.4 ms, best of 25 interleaved runs). */
static const isa_kernels KERNELS_AVX512 = {
    max16_avx2,       max32_avx2,        max64_avx2, scale_f32_avx512,
    scale_f16_avx512, scale_bf16_avx512, fence_sse};
#endif /* x86-64 */

#ifdef FUSION_X86_PATHS
/* F16C by CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not
 * know the name. The compiler's check of AVX covers the OS's support for
 * the vector registers, which F16C uses. */
static int
has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
#endif

/* Bit isa of the paths this CPU has, plus bit 0 once known: CPUID is slow
 * under some hypervisors, and fusion_set_isa() asks on every call. */
static _Atomic int g_supported;

static int
isa_probe(fusion_isa isa)
{
    switch (isa) {
        case FUSION_ISA_AUTO:
        case FUSION_ISA_BASELINE:
            return 1;
#ifdef FUSION_X86_PATHS
        case FUSION_ISA_AVX2:
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma") && has_f16c();
        case FUSION_ISA_AVX512:
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") &&
                   isa_probe(FUSION_ISA_AVX2); /* its check pass is AVX2's */
#endif
        default:
            return 0;
    }
}

int
fusion_isa_supported(fusion_isa isa)
{
    if (isa < FUSION_ISA_AUTO || isa > FUSION_ISA_AVX512) {
        return 0;
    }
    int known = atomic_load_explicit(&g_supported, memory_order_relaxed);
    if (known == 0) {
        known = 1;
        for (int k = FUSION_ISA_AUTO; k <= FUSION_ISA_AVX512; k++) {
            known |= isa_probe((fusion_isa)k) << (k + 1);
        }
        atomic_store_explicit(&g_supported, known, memory_order_relaxed);
    }
    return (known >> (isa + 1)) & 1;
}

/* The best supported path at or below isa. */
static fusion_isa
isa_at_most(fusion_isa isa)
{
    while (isa > FUSION_ISA_BASELINE && !fusion_isa_supported(isa)) {
        isa = (fusion_isa)(isa - 1);
    }
    return isa;
}

static fusion_isa
isa_from_env(void)
{
    const char *s = getenv("FUSION_ISA");
    if (s != NULL && strcmp(s, "baseline") == 0) {
        return FUSION_ISA_BASELINE;
    }
    if (s != NULL && strcmp(s, "avx2") == 0) {
        return isa_at_most(FUSION_ISA_AVX2);
    }
    return isa_at_most(FUSION_ISA_AVX512); /* auto, avx512, unset, other */
}

/* 0 until chosen. Atomic: folds run with the GIL released. */
static _Atomic int g_isa;

fusion_isa
fusion_get_isa(void)
{
    int isa = atomic_load_explicit(&g_isa, memory_order_relaxed);
    if (isa == 0) {
        int want = (int)isa_from_env(), none = 0;
        /* Two first calls choose the same; the first to store wins. */
        atomic_compare_exchange_strong(&g_isa, &none, want);
        isa = atomic_load_explicit(&g_isa, memory_order_relaxed);
    }
    return (fusion_isa)isa;
}

fusion_status
fusion_set_isa(fusion_isa isa)
{
    if (isa < FUSION_ISA_AUTO || isa > FUSION_ISA_AVX512 ||
        !fusion_isa_supported(isa)) {
        return FUSION_E_ARG;
    }
    fusion_isa chosen =
        isa == FUSION_ISA_AUTO ? isa_at_most(FUSION_ISA_AVX512) : isa;
    atomic_store_explicit(&g_isa, (int)chosen, memory_order_relaxed);
    return FUSION_OK;
}

const char *
fusion_isa_str(fusion_isa isa)
{
    switch (isa) {
        case FUSION_ISA_AUTO:
            return "auto";
        case FUSION_ISA_BASELINE:
            return "baseline";
        case FUSION_ISA_AVX2:
            return "avx2";
        case FUSION_ISA_AVX512:
            return "avx512";
    }
    return "";
}

static const isa_kernels *
kernels(void)
{
#ifdef FUSION_X86_PATHS
    switch (fusion_get_isa()) {
        case FUSION_ISA_AVX512:
            return &KERNELS_AVX512;
        case FUSION_ISA_AVX2:
            return &KERNELS_AVX2;
        default:
            break;
    }
#endif
    return &KERNELS_BASE;
}

/* ------------------------------------------------------------------------ */
/* Views.                                                                    */

const char *
fusion_part_str(fusion_part part)
{
    switch (part) {
        case FUSION_PART_LAYER:
            return "layer";
        case FUSION_PART_NORM:
            return "norm";
        case FUSION_PART_POST:
            return "post";
        default:
            return "";
    }
}

const char *
fusion_field_str(fusion_field field)
{
    switch (field) {
        case FUSION_FIELD_WEIGHT:
            return "weight";
        case FUSION_FIELD_BIAS:
            return "bias";
        case FUSION_FIELD_MEAN:
            return "running_mean";
        case FUSION_FIELD_VAR:
            return "running_var";
        case FUSION_FIELD_EPS:
            return "eps";
        case FUSION_FIELD_SCALE:
            return "scale";
        default:
            return "";
    }
}

static void
set_where(fusion_where *where, fusion_part part, fusion_field field,
          int64_t index, double value)
{
    if (where != NULL) {
        where->part = part;
        where->field = field;
        where->index = index;
        where->value = value;
    }
}

static int
view_present(const fusion_view *v)
{
    return v->dtype != FUSION_DTYPE_NONE;
}

/* Checks dtype, dims and that every element lies in [lo, hi). */
static fusion_status
view_check(const fusion_view *v)
{
    if (fusion_dtype_size(v->dtype) == 0) {
        return FUSION_E_DTYPE;
    }
    if (v->ndim < 0 || v->ndim > FUSION_MAX_DIMS) {
        return FUSION_E_SHAPE;
    }
    int64_t numel = 1;
    for (int d = 0; d < v->ndim; d++) {
        if (v->sizes[d] < 0) {
            return FUSION_E_SHAPE;
        }
        numel *= v->sizes[d] > 0 ? 1 : 0;
    }
    if (numel == 0) {
        return FUSION_OK; /* nothing is touched */
    }
    if (v->data == NULL) {
        return FUSION_E_ARG;
    }
    int64_t min = 0, max = 0;
    for (int d = 0; d < v->ndim; d++) {
        int64_t span;
        if (__builtin_mul_overflow(v->sizes[d] - 1, v->strides[d], &span)) {
            return FUSION_E_BOUNDS;
        }
        if (span > 0) {
            if (__builtin_add_overflow(max, span, &max)) {
                return FUSION_E_BOUNDS;
            }
        }
        else if (__builtin_add_overflow(min, span, &min)) {
            return FUSION_E_BOUNDS;
        }
    }
    if (min < v->lo || max >= v->hi) {
        return FUSION_E_BOUNDS;
    }
    return FUSION_OK;
}

/* The bytes [*first, *end) that a checked, non-empty view reaches. */
static void
view_bytes(const fusion_view *v, uintptr_t *first, uintptr_t *end)
{
    int64_t min = 0, max = 0;
    for (int d = 0; d < v->ndim; d++) {
        int64_t span = (v->sizes[d] - 1) * v->strides[d];
        if (span > 0) {
            max += span;
        }
        else {
            min += span;
        }
    }
    int64_t es = (int64_t)fusion_dtype_size(v->dtype);
    *first = (uintptr_t)v->data + (uintptr_t)(min * es);
    *end = (uintptr_t)v->data + (uintptr_t)((max + 1) * es);
}

/* True when no two indices of a checked view reach the same element, so that
 * writing it element by element writes each element once. The test is
 * sufficient, not necessary: the dims of size > 1, ordered by |stride|, must
 * each step past everything the smaller ones reach. Every layout torch makes
 * short of as_strided passes; an expanded (stride 0) view does not. */
static int
view_disjoint(const fusion_view *v)
{
    int64_t sizes[FUSION_MAX_DIMS], strides[FUSION_MAX_DIMS];
    int n = 0;
    for (int d = 0; d < v->ndim; d++) {
        if (v->sizes[d] == 0) {
            return 1; /* no elements, nothing to reach twice */
        }
        if (v->sizes[d] == 1) {
            continue;
        }
        if (v->strides[d] == INT64_MIN) {
            return 0;
        }
        int64_t stride = v->strides[d] < 0 ? -v->strides[d] : v->strides[d];
        int k = n++;
        while (k > 0 && strides[k - 1] > stride) {
            strides[k] = strides[k - 1];
            sizes[k] = sizes[k - 1];
            k--;
        }
        strides[k] = stride;
        sizes[k] = v->sizes[d];
    }
    int64_t reach = 0; /* the largest offset the smaller dims reach */
    for (int k = 0; k < n; k++) {
        int64_t span;
        if (strides[k] <= reach ||
            __builtin_mul_overflow(sizes[k] - 1, strides[k], &span) ||
            __builtin_add_overflow(reach, span, &reach)) {
            return 0;
        }
    }
    return 1;
}

static int64_t
view_numel(const fusion_view *v)
{
    int64_t n = 1;
    for (int d = 0; d < v->ndim; d++) {
        n *= v->sizes[d];
    }
    return n;
}

/* A checked 1-D view of length n (a 0-D view is not accepted). */
static fusion_status
vector_check(const fusion_view *v, int64_t n)
{
    fusion_status st = view_check(v);
    if (st != FUSION_OK) {
        return st;
    }
    if (v->ndim != 1 || v->sizes[0] != n) {
        return FUSION_E_SHAPE;
    }
    return FUSION_OK;
}

static inline char *
elem_ptr(const fusion_view *v, int64_t offset)
{
    return (char *)v->data + offset * (int64_t)fusion_dtype_size(v->dtype);
}

static inline double
vector_get(const fusion_view *v, int64_t i)
{
    return fusion_load(elem_ptr(v, i * v->strides[0]), v->dtype);
}

/* The dims from 2 on ("rest"), with adjacent dims merged where the layout
 * allows and size-1 dims dropped, outermost first. */
typedef struct {
    int n;
    int64_t sizes[FUSION_MAX_DIMS];
    int64_t strides[FUSION_MAX_DIMS];
    int64_t numel;
} rest_dims;

static void
rest_collapse(const fusion_view *w, int first, rest_dims *r)
{
    r->n = 0;
    r->numel = 1;
    for (int d = first; d < w->ndim; d++) {
        int64_t size = w->sizes[d], stride = w->strides[d];
        r->numel *= size;
        if (size == 1) {
            continue;
        }
        if (r->n > 0 && r->strides[r->n - 1] == stride * size) {
            r->sizes[r->n - 1] *= size;
            r->strides[r->n - 1] = stride;
            continue;
        }
        r->sizes[r->n] = size;
        r->strides[r->n] = stride;
        r->n++;
    }
    if (r->n == 0) {
        r->sizes[0] = 1;
        r->strides[0] = 1;
        r->n = 1;
    }
}

/* Runs over every innermost run of `rest` below the element offset `base`,
 * calling the run kernel with (offset, count, stride). */
#define FOR_EACH_RUN(r, base, OFF, COUNT, STRIDE, BODY)                       \
    do {                                                                      \
        int64_t idx_[FUSION_MAX_DIMS] = {0};                                  \
        int inner_ = (r)->n - 1;                                              \
        int64_t COUNT = (r)->sizes[inner_];                                   \
        int64_t STRIDE = (r)->strides[inner_];                                \
        for (;;) {                                                            \
            int64_t OFF = (base);                                             \
            for (int d_ = 0; d_ < inner_; d_++) {                             \
                OFF += idx_[d_] * (r)->strides[d_];                           \
            }                                                                 \
            BODY;                                                             \
            int d_ = inner_ - 1;                                              \
            while (d_ >= 0) {                                                 \
                if (++idx_[d_] < (r)->sizes[d_]) {                            \
                    break;                                                    \
                }                                                             \
                idx_[d_] = 0;                                                 \
                d_--;                                                         \
            }                                                                 \
            if (d_ < 0) {                                                     \
                break;                                                        \
            }                                                                 \
        }                                                                     \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Run kernels.                                                              */

/* Max |w| over a run into *max. With sum != NULL, also the sum of the run
 * in long double (Neumaier summation): the bias of a fold before a layer
 * sums products that may cancel. Returns 0, or -1 with *bad set to the
 * offset of the first non-finite value: under a negative stride an offset is
 * negative, so it cannot double as the "found" flag. */
static int run_first_nonfinite(const fusion_view *w, int64_t off,
                               int64_t count, int64_t stride, int64_t *bad);

/* The check pass reads every weight once. Without a sum it works on the bit
 * patterns: with the sign bit cleared, the bits of a float, read as an
 * unsigned integer, grow with its magnitude, and every pattern at or above
 * infinity's is inf or NaN, so one maximum decides both finiteness and the
 * largest magnitude. An integer maximum has no NaN semantics to keep, and a
 * contiguous run takes the vector kernel of the chosen path. A second,
 * scalar pass finds the position only when something is not finite. */
#define MAXABS_BITS(DT, U, MASK, INF, KERNEL)                                 \
    do {                                                                      \
        const unsigned char *p =                                              \
            (const unsigned char *)w->data + off * (int64_t)sizeof(U);        \
        U m = 0;                                                              \
        if (stride == 1) {                                                    \
            m = (KERNEL)(p, count);                                           \
        }                                                                     \
        else {                                                                \
            for (int64_t k = 0; k < count; k++) {                             \
                U b;                                                          \
                memcpy(&b, p + k * stride * (int64_t)sizeof(U), sizeof b);    \
                b &= (U)(MASK);                                               \
                m = b > m ? b : m;                                            \
            }                                                                 \
        }                                                                     \
        if (m >= (U)(INF)) {                                                  \
            return run_first_nonfinite(w, off, count, stride, bad);           \
        }                                                                     \
        unsigned char bytes[sizeof(U)];                                       \
        memcpy(bytes, &m, sizeof m);                                          \
        *max = fusion_load(bytes, (DT));                                      \
        return 0;                                                             \
    } while (0)

static int
run_maxabs_sum(const fusion_view *w, int64_t off, int64_t count,
               int64_t stride, double *max, long double *sum, int64_t *bad)
{
    if (sum == NULL) {
        const isa_kernels *kern = kernels();
        switch (w->dtype) {
            case FUSION_DTYPE_F16:
                MAXABS_BITS(FUSION_DTYPE_F16, uint16_t, 0x7FFFu, 0x7C00u,
                            kern->max16);
            case FUSION_DTYPE_BF16:
                MAXABS_BITS(FUSION_DTYPE_BF16, uint16_t, 0x7FFFu, 0x7F80u,
                            kern->max16);
            case FUSION_DTYPE_F32:
                MAXABS_BITS(FUSION_DTYPE_F32, uint32_t, 0x7FFFFFFFu,
                            0x7F800000u, kern->max32);
            case FUSION_DTYPE_F64:
                MAXABS_BITS(FUSION_DTYPE_F64, uint64_t, 0x7FFFFFFFFFFFFFFFull,
                            0x7FF0000000000000ull, kern->max64);
            default:
                break;
        }
    }
    double m = 0.0;
    long double s = 0.0L, c = 0.0L;
    for (int64_t k = 0; k < count; k++) {
        int64_t o = off + k * stride;
        double x = fusion_load(elem_ptr(w, o), w->dtype);
        if (!isfinite(x)) {
            *bad = o;
            return -1;
        }
        double a = fabs(x);
        m = a > m ? a : m;
        if (sum != NULL) {
            long double t = s + x;
            c += fabsl(s) >= a ? (s - t) + x : (x - t) + s;
            s = t;
        }
    }
    if (sum != NULL) {
        *sum = s + c;
    }
    *max = m;
    return 0;
}

static int
run_first_nonfinite(const fusion_view *w, int64_t off, int64_t count,
                    int64_t stride, int64_t *bad)
{
    for (int64_t k = 0; k < count; k++) {
        int64_t o = off + k * stride;
        if (!isfinite(fusion_load(elem_ptr(w, o), w->dtype))) {
            *bad = o;
            return -1;
        }
    }
    return 0; /* not reached when called after a failed fast pass */
}

/* A float64 run times a long double scale, rounded once to double. Not
 * inlined: inlined into fold_apply, GCC -O2 kept `wide` on the stack and
 * reloaded it with an 80-bit load on every weight, which ran ten times
 * slower on an AMD EPYC (55 against 5.5 ms for 64 MiB); here it stays in an
 * x87 register. */
NOINLINE static void
scale_f64(double *q, const double *p, int64_t count, int64_t stride,
          long double wide)
{
    for (int64_t k = 0; k < count; k++) {
        q[k * stride] = (double)((long double)p[k * stride] * wide);
    }
}

/* Writes out[i] = w[i] * wide, rounded once, over one run; out has w's
 * strides, and is w itself for a fold in place. stream: see isa_kernels. */
static void
run_scale(const fusion_view *w, const fusion_view *out, int64_t off,
          int64_t count, int64_t stride, long double wide, int stream)
{
    double scale = (double)wide;
    switch (w->dtype) {
        case FUSION_DTYPE_F32: {
            const float *p = (const float *)w->data + off;
            float *q = (float *)out->data + off;
            if (stride == 1) {
                kernels()->scale_f32(q, p, count, scale, stream);
            }
            else {
                for (int64_t k = 0; k < count; k++) {
                    q[k * stride] = (float)((double)p[k * stride] * scale);
                }
            }
            break;
        }
        case FUSION_DTYPE_F64: {
            /* A float64 weight cannot be rounded once from a float64 product;
             * the product is formed in long double and rounded to double. */
            scale_f64((double *)out->data + off, (const double *)w->data + off,
                      count, stride, wide);
            break;
        }
        default: {
            size_t es = fusion_dtype_size(w->dtype);
            const char *p = elem_ptr(w, off);
            char *q = elem_ptr(out, off);
            if (stride == 1) {
                const isa_kernels *kern = kernels();
                (w->dtype == FUSION_DTYPE_F16
                     ? kern->scale_f16
                     : kern->scale_bf16)(q, p, count, scale, stream);
                break;
            }
            for (int64_t k = 0; k < count; k++) {
                int64_t at = k * stride * (int64_t)es;
                fusion_store(q + at, w->dtype,
                             fusion_load(p + at, w->dtype) * scale);
            }
            break;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Folds.                                                                    */

static int64_t
channel_of(const fusion_fold *f, int64_t i0, int64_t i1, int64_t a)
{
    if (f->map == FUSION_AXIS0) {
        return i0;
    }
    return (i0 / a) * f->weight.sizes[1] + i1;
}

static int
fold_shape_ok(const fusion_fold *f)
{
    const fusion_view *w = &f->weight;
    if (w->ndim < 2 || w->ndim > FUSION_MAX_DIMS) {
        return 0;
    }
    if (f->map == FUSION_AXIS0) {
        return f->direction == FUSION_NORM_AFTER;
    }
    if (f->map != FUSION_GROUPED || f->groups < 1) {
        return 0;
    }
    if (f->direction != FUSION_NORM_AFTER &&
        f->direction != FUSION_NORM_BEFORE) {
        return 0;
    }
    return w->sizes[0] % f->groups == 0;
}

int64_t
fusion_fold_channels(const fusion_fold *fold)
{
    if (fold == NULL || !fold_shape_ok(fold)) {
        return 0;
    }
    if (fold->map == FUSION_AXIS0) {
        return fold->weight.sizes[0];
    }
    return fold->groups * fold->weight.sizes[1];
}

int64_t
fusion_fold_out_channels(const fusion_fold *fold)
{
    if (fold == NULL || !fold_shape_ok(fold)) {
        return 0;
    }
    if (fold->direction == FUSION_NORM_BEFORE) {
        return fold->weight.sizes[0];
    }
    return fusion_fold_channels(fold);
}

/* The one shape check of a norm: mean and var, and weight and bias where
 * present, are checked 1-D views of `channels` elements. On failure, where
 * names the field and holds the view's length. */
static fusion_status
norm_views_check(const fusion_norm *n, fusion_part part, int64_t channels,
                 fusion_where *where)
{
    const fusion_view *views[4] = {&n->mean, &n->var, &n->weight, &n->bias};
    const fusion_field fields[4] = {FUSION_FIELD_MEAN, FUSION_FIELD_VAR,
                                    FUSION_FIELD_WEIGHT, FUSION_FIELD_BIAS};
    for (int i = 0; i < 4; i++) {
        if (i >= 2 && !view_present(views[i])) {
            continue;
        }
        fusion_status st = vector_check(views[i], channels);
        if (st != FUSION_OK) {
            set_where(where, part, fields[i], -1,
                      views[i]->ndim >= 1 ? (double)views[i]->sizes[0] : 0.0);
            return st;
        }
    }
    return FUSION_OK;
}

/* The first non-finite statistic of channel c, or FUSION_FIELD_NONE. */
static fusion_field
nonfinite_field(double mean, double var, double gamma, double beta,
                double *value)
{
    const double v[4] = {mean, var, gamma, beta};
    const fusion_field f[4] = {FUSION_FIELD_MEAN, FUSION_FIELD_VAR,
                               FUSION_FIELD_WEIGHT, FUSION_FIELD_BIAS};
    for (int i = 0; i < 4; i++) {
        if (!isfinite(v[i])) {
            *value = v[i];
            return f[i];
        }
    }
    return FUSION_FIELD_NONE;
}

static fusion_status
norm_affine(const fusion_norm *norm, fusion_part part, int64_t channels,
            double *scale, double *shift, fusion_where *where)
{
    if (norm == NULL || scale == NULL || channels < 0) {
        set_where(where, FUSION_PART_NONE, FUSION_FIELD_NONE, -1, 0.0);
        return FUSION_E_ARG;
    }
    fusion_status st = norm_views_check(norm, part, channels, where);
    if (st != FUSION_OK) {
        return st;
    }
    if (!isfinite(norm->eps)) {
        set_where(where, part, FUSION_FIELD_EPS, -1, norm->eps);
        return FUSION_E_NONFINITE;
    }
    int has_w = view_present(&norm->weight), has_b = view_present(&norm->bias);
    for (int64_t c = 0; c < channels; c++) {
        double mean = vector_get(&norm->mean, c);
        double var = vector_get(&norm->var, c);
        double gamma = has_w ? vector_get(&norm->weight, c) : 1.0;
        double beta = has_b ? vector_get(&norm->bias, c) : 0.0;
        double bad_value = 0.0;
        fusion_field bad = nonfinite_field(mean, var, gamma, beta, &bad_value);
        if (bad != FUSION_FIELD_NONE) {
            set_where(where, part, bad, c, bad_value);
            return FUSION_E_NONFINITE;
        }
        double denom = var + norm->eps;
        if (!(denom > 0.0)) {
            set_where(where, part, FUSION_FIELD_VAR, c, var);
            return FUSION_E_VARIANCE;
        }
        /* var + eps may overflow although both are finite; sqrt(x) is
         * exactly 2 sqrt(x / 4), and x / 4 cannot overflow. */
        double s = isinf(denom)
                       ? gamma / (2.0 * sqrt(0.25 * var + 0.25 * norm->eps))
                       : gamma / sqrt(denom);
        double t = fma(-mean, s, beta);
        if (!isfinite(s) || !isfinite(t)) {
            set_where(where, part, FUSION_FIELD_SCALE, c, s);
            return FUSION_E_OVERFLOW;
        }
        scale[c] = s;
        if (shift != NULL) {
            shift[c] = t;
        }
    }
    return FUSION_OK;
}

fusion_status
fusion_norm_affine(const fusion_norm *norm, fusion_part part, int64_t channels,
                   double *scale, double *shift, fusion_where *where)
{
    fp_saved env;
    fp_enter(&env);
    fusion_status st = norm_affine(norm, part, channels, scale, shift, where);
    fp_leave(&env);
    return st;
}

/* gamma / sqrt(var + eps) of channel c in long double. Used for float64
 * weights, whose fused values need more than float64 to be rounded once. On
 * targets where long double is double this is the float64 result. */
static long double
wide_scale(const fusion_norm *n, int64_t c)
{
    long double var = vector_get(&n->var, c);
    long double gamma =
        view_present(&n->weight) ? vector_get(&n->weight, c) : 1.0L;
    return gamma / sqrtl(var + (long double)n->eps);
}

static long double
wide_shift(const fusion_norm *n, int64_t c, long double s)
{
    long double beta = view_present(&n->bias) ? vector_get(&n->bias, c) : 0.0L;
    return beta - (long double)vector_get(&n->mean, c) * s;
}

/* The factor applied to weight element (i0, i1, ...). */
static inline long double
elem_scale(const fusion_fold *f, int64_t i0, int64_t i1, int64_t a)
{
    int64_t c = channel_of(f, i0, i1, a);
    if (f->weight.dtype == FUSION_DTYPE_F64) {
        long double s = wide_scale(f->norm, c);
        return f->post != NULL ? s * wide_scale(f->post, i0) : s;
    }
    double s = f->scale[c];
    return f->post != NULL ? s * f->post_scale[i0] : s;
}

/* Rounds a fused bias value and checks that it fits the bias dtype. */
static fusion_status
store_bias(const fusion_fold *fold, int64_t o, long double v, double *new_bias,
           fusion_where *where)
{
    double rounded = (double)v;
    if (!fusion_fits(rounded, fold->bias_out.dtype)) {
        set_where(where, FUSION_PART_LAYER, FUSION_FIELD_BIAS, o, rounded);
        return FUSION_E_OVERFLOW;
    }
    new_bias[o] = rounded;
    return FUSION_OK;
}

/* The bias of output channel o of a fold before a layer, from the sum
 * acc = sum W[o, ...] * shift[c], with the optional post norm applied. */
static fusion_status
finish_before_bias(const fusion_fold *fold, int64_t o, long double acc,
                   int has_bias, double *new_bias, fusion_where *where)
{
    double b = has_bias ? vector_get(&fold->bias_in, o) : 0.0;
    if (!isfinite(b)) {
        set_where(where, FUSION_PART_LAYER, FUSION_FIELD_BIAS, o, b);
        return FUSION_E_NONFINITE;
    }
    long double v = (long double)b + acc;
    if (fold->post != NULL) {
        long double s2 = wide_scale(fold->post, o);
        long double beta = view_present(&fold->post->bias)
                               ? vector_get(&fold->post->bias, o)
                               : 0.0L;
        v = (v - (long double)vector_get(&fold->post->mean, o)) * s2 + beta;
    }
    return store_bias(fold, o, v, new_bias, where);
}

/* How a fold walks its weight: d0 x d1 blocks of runs r, with a the d0 extent
 * of one group. With one scale per i0 (FUSION_AXIS0), dims 1.. form the runs
 * and d1 is 1: a 1x1 conv's rows would otherwise be runs of one element. */
static void
fold_layout(const fusion_fold *fold, int64_t *d0, int64_t *d1, int64_t *a,
            rest_dims *r)
{
    const fusion_view *w = &fold->weight;
    *d0 = w->sizes[0];
    *d1 = w->sizes[1];
    *a = fold->map == FUSION_GROUPED ? *d0 / fold->groups : 1;
    if (fold->map == FUSION_AXIS0) {
        rest_collapse(w, 1, r);
        *d1 = 1;
    }
    else {
        rest_collapse(w, 2, r);
    }
}

/* 1 when every weight of a fold with the norm after the layer is finite and
 * every fused weight fits its dtype, computed by several threads for a large
 * weight; 0 when something is wrong or the weight is small (then the caller's
 * serial loop checks, and reports where). */
static int
weights_ok_parallel(const fusion_fold *fold, int64_t d0, int64_t d1, int64_t a,
                    const rest_dims *r)
{
#ifdef _OPENMP
    const fusion_view *w = &fold->weight;
    if (view_numel(w) < FUSION_OMP_NUMEL) {
        return 0;
    }
    int ok = 1;
#pragma omp parallel reduction(&& : ok)
    {
        fp_saved env;
        fp_enter(&env);
#pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < d0; i0++) {
            for (int64_t i1 = 0; i1 < d1 && ok; i1++) {
                int64_t base = i0 * w->strides[0] + i1 * w->strides[1];
                double m = 0.0;
                int64_t bad = 0;
                FOR_EACH_RUN(r, base, off, count, stride, {
                    double mm = 0.0;
                    if (run_maxabs_sum(w, off, count, stride, &mm, NULL,
                                       &bad) < 0) {
                        ok = 0;
                        break;
                    }
                    m = mm > m ? mm : m;
                });
                long double s = fabsl(elem_scale(fold, i0, i1, a));
                double largest = w->dtype == FUSION_DTYPE_F64
                                     ? (double)((long double)m * s)
                                     : m * (double)s;
                ok = ok && fusion_fits(largest, w->dtype);
            }
        }
        fp_leave(&env);
    }
    return ok;
#else
    (void)fold, (void)d0, (void)d1, (void)a, (void)r;
    return 0;
#endif
}

/* 1 when every weight of a fold with the norm after the layer is finite and
 * every fused weight fits its dtype, shown for the whole weight at once: the
 * largest |weight| times the largest |scale| fits. Rounding is monotonic, so
 * then each block's largest |weight| times its own |scale| fits as well, and
 * the per-block loop would find nothing. 0 when this does not show it (a
 * float64, strided or empty weight, or a bound too large): the loop decides,
 * and reports where. One kernel call replaces a call per block, which
 * dominates for a depthwise conv (nine weights per channel). */
static int
weights_ok_bound(const fusion_fold *fold)
{
    const fusion_view *w = &fold->weight;
    if (w->dtype == FUSION_DTYPE_F64) {
        return 0;
    }
    int64_t n = 1;
    for (int d = w->ndim - 1; d >= 0; d--) {
        if (w->sizes[d] != 1 && w->strides[d] != n) {
            return 0;
        }
        n *= w->sizes[d];
    }
    double m = 0.0;
    int64_t bad = 0;
    if (n == 0 || run_maxabs_sum(w, 0, n, 1, &m, NULL, &bad) < 0) {
        return 0;
    }
    double s = 0.0;
    int64_t channels = fusion_fold_channels(fold);
    for (int64_t c = 0; c < channels; c++) {
        double a = fabs(fold->scale[c]);
        s = a > s ? a : s;
    }
    if (fold->post != NULL) {
        double p = 0.0;
        int64_t d_out = fusion_fold_out_channels(fold);
        for (int64_t o = 0; o < d_out; o++) {
            double a = fabs(fold->post_scale[o]);
            p = a > p ? a : p;
        }
        s *= p; /* bounds every |scale[c] * post_scale[o]|, rounded */
    }
    return fusion_fits(m * s, w->dtype);
}

/* A fold's out, beside its checked weight w: the same dtype, sizes and
 * strides, in its own bounds, and sharing no byte with w (the kernels read
 * each element of w after writing the ones before it). */
static fusion_status
out_check(const fusion_view *w, const fusion_view *out)
{
    if (out->dtype != w->dtype) {
        return FUSION_E_DTYPE;
    }
    if (out->ndim != w->ndim) {
        return FUSION_E_SHAPE;
    }
    for (int d = 0; d < w->ndim; d++) {
        if (out->sizes[d] != w->sizes[d] ||
            (w->sizes[d] > 1 && out->strides[d] != w->strides[d])) {
            return FUSION_E_SHAPE;
        }
    }
    fusion_status st = view_check(out);
    if (st != FUSION_OK || view_numel(w) == 0) {
        return st;
    }
    uintptr_t a0, a1, b0, b1;
    view_bytes(w, &a0, &a1);
    view_bytes(out, &b0, &b1);
    return a0 < b1 && b0 < a1 ? FUSION_E_OVERLAP : FUSION_OK;
}

/* The arguments, every view's dtype, bounds and shape, and that the written
 * views reach each element once. */
static fusion_status
fold_views_check(const fusion_fold *fold, fusion_where *where)
{
    set_where(where, FUSION_PART_NONE, FUSION_FIELD_NONE, -1, 0.0);
    if (fold->norm == NULL || fold->scale == NULL ||
        (fold->post != NULL && (fold->direction != FUSION_NORM_BEFORE ||
                                fold->post_scale == NULL))) {
        return FUSION_E_ARG;
    }
    set_where(where, FUSION_PART_LAYER, FUSION_FIELD_WEIGHT, -1, 0.0);
    if (!fold_shape_ok(fold)) {
        return fold->weight.ndim < 2 ? FUSION_E_SHAPE : FUSION_E_ARG;
    }
    fusion_status st = view_check(&fold->weight);
    if (st != FUSION_OK) {
        return st;
    }
    /* The fold scales the weight in place: an element reached twice would
     * be scaled twice. */
    if (!view_disjoint(&fold->weight)) {
        return FUSION_E_OVERLAP;
    }
    if (view_present(&fold->out)) {
        st = out_check(&fold->weight, &fold->out);
        if (st != FUSION_OK) {
            return st;
        }
    }
    int64_t d_out = fusion_fold_out_channels(fold);
    set_where(where, FUSION_PART_LAYER, FUSION_FIELD_BIAS, -1, 0.0);
    if (view_present(&fold->bias_in)) {
        st = vector_check(&fold->bias_in, d_out);
        if (st != FUSION_OK) {
            return st;
        }
    }
    st = vector_check(&fold->bias_out, d_out);
    if (st == FUSION_OK && !view_disjoint(&fold->bias_out)) {
        st = FUSION_E_OVERLAP;
    }
    if (st != FUSION_OK) {
        return st;
    }
    /* The norms' vectors are read again below (in long double): never trust
     * that fusion_norm_affine() checked these very views. */
    st = norm_views_check(fold->norm, FUSION_PART_NORM,
                          fusion_fold_channels(fold), where);
    if (st == FUSION_OK && fold->post != NULL) {
        st = norm_views_check(fold->post, FUSION_PART_POST, d_out, where);
    }
    return st;
}

/* The largest |fused weight| of block (i0, i1) fits the dtype; a float64
 * weight's product is formed in long double, as run_scale() forms it. */
static int
block_fits(const fusion_fold *fold, int64_t i0, int64_t i1, int64_t a,
           double m, double *largest)
{
    long double s = fabsl(elem_scale(fold, i0, i1, a));
    *largest = fold->weight.dtype == FUSION_DTYPE_F64
                   ? (double)((long double)m * s)
                   : m * (double)s;
    return fusion_fits(*largest, fold->weight.dtype);
}

/* Reads the runs of the weight block at base: the largest |weight| into *m
 * and, where sum is not NULL, the sum of the weights into *sum. Returns 0,
 * or -1 with *bad the offset of the first element that is not finite. */
static int
block_read(const fusion_view *w, const rest_dims *r, int64_t base, double *m,
           long double *sum, int64_t *bad)
{
    *m = 0.0;
    if (sum != NULL) {
        *sum = 0.0L;
    }
    FOR_EACH_RUN(r, base, off, count, stride, {
        long double s = 0.0L;
        double mm = 0.0;
        if (run_maxabs_sum(w, off, count, stride, &mm, sum ? &s : NULL, bad) <
            0) {
            return -1;
        }
        *m = mm > *m ? mm : *m;
        if (sum != NULL) {
            *sum += s;
        }
    });
    return 0;
}

/* Reads every weight once: each is finite, each fused weight fits, and with
 * the norm before the layer each output channel's bias is accumulated and
 * stored into new_bias. */
static fusion_status
weights_check(const fusion_fold *fold, double *new_bias, fusion_where *where)
{
    const fusion_view *w = &fold->weight;
    int before = fold->direction == FUSION_NORM_BEFORE;
    int64_t d0, d1, a;
    rest_dims r;
    fold_layout(fold, &d0, &d1, &a, &r);
    int empty = view_numel(w) == 0; /* no weight to read, biases still due */
    /* With the norm after the layer, the whole weight is bounded at once, and
     * a large one is read by several threads; only if neither shows it is
     * sound does the serial loop below run over the weight, to report the
     * first fault exactly as it would alone. */
    if (!before && !empty &&
        (weights_ok_bound(fold) || weights_ok_parallel(fold, d0, d1, a, &r))) {
        return FUSION_OK;
    }
    for (int64_t i0 = 0; i0 < d0; i0++) {
        long double acc = 0.0L, acc_c = 0.0L; /* Neumaier, see above */
        for (int64_t i1 = 0; i1 < d1; i1++) {
            int64_t base = i0 * w->strides[0] + i1 * w->strides[1];
            double m = 0.0, largest = 0.0;
            long double row = 0.0L;
            int64_t bad = 0;
            if (!empty &&
                block_read(w, &r, base, &m, before ? &row : NULL, &bad) < 0) {
                set_where(where, FUSION_PART_LAYER, FUSION_FIELD_WEIGHT, bad,
                          fusion_load(elem_ptr(w, bad), w->dtype));
                return FUSION_E_NONFINITE;
            }
            /* Rounding is monotonic, so the largest magnitude decides. */
            if (!block_fits(fold, i0, i1, a, m, &largest)) {
                set_where(where, FUSION_PART_LAYER, FUSION_FIELD_WEIGHT, base,
                          largest);
                return FUSION_E_OVERFLOW;
            }
            if (before) {
                int64_t ch = channel_of(fold, i0, i1, a);
                long double x = row * wide_shift(fold->norm, ch,
                                                 wide_scale(fold->norm, ch));
                long double t = acc + x;
                acc_c +=
                    fabsl(acc) >= fabsl(x) ? (acc - t) + x : (x - t) + acc;
                acc = t;
            }
        }
        fusion_status st =
            before ? finish_before_bias(fold, i0, acc + acc_c,
                                        view_present(&fold->bias_in), new_bias,
                                        where)
                   : FUSION_OK;
        if (st != FUSION_OK) {
            return st;
        }
    }
    return FUSION_OK;
}

/* The biases of a fold with the norm after the layer:
 * (b - mean) * s + beta, in long double so that a float64 bias is rounded
 * once. b - mean is exact for two values of one narrower format with close
 * exponents, which is where a bias and a running mean cancel. */
static fusion_status
after_bias(const fusion_fold *fold, double *new_bias, fusion_where *where)
{
    const fusion_norm *norm = fold->norm;
    int has_bias = view_present(&fold->bias_in);
    int64_t d_out = fusion_fold_out_channels(fold);
    for (int64_t o = 0; o < d_out; o++) {
        double b = has_bias ? vector_get(&fold->bias_in, o) : 0.0;
        if (!isfinite(b)) {
            set_where(where, FUSION_PART_LAYER, FUSION_FIELD_BIAS, o, b);
            return FUSION_E_NONFINITE;
        }
        long double s1 = wide_scale(norm, o);
        long double beta =
            view_present(&norm->bias) ? vector_get(&norm->bias, o) : 0.0L;
        long double v =
            ((long double)b - (long double)vector_get(&norm->mean, o)) * s1 +
            beta;
        fusion_status st = store_bias(fold, o, v, new_bias, where);
        if (st != FUSION_OK) {
            return st;
        }
    }
    return FUSION_OK;
}

static fusion_status
fold_check(const fusion_fold *fold, double *new_bias, fusion_where *where)
{
    if (fold == NULL || new_bias == NULL) {
        set_where(where, FUSION_PART_NONE, FUSION_FIELD_NONE, -1, 0.0);
        return FUSION_E_ARG;
    }
    fusion_status st = fold_views_check(fold, where);
    if (st != FUSION_OK) {
        return st;
    }
    int64_t d_out = fusion_fold_out_channels(fold);
    for (int64_t o = 0; o < d_out; o++) {
        new_bias[o] = 0.0;
    }
    st = weights_check(fold, new_bias, where);
    if (st != FUSION_OK || fold->direction == FUSION_NORM_BEFORE) {
        return st;
    }
    return after_bias(fold, new_bias, where);
}

fusion_status
fusion_fold_check(const fusion_fold *fold, double *new_bias,
                  fusion_where *where)
{
    fp_saved env;
    fp_enter(&env);
    fusion_status st = fold_check(fold, new_bias, where);
    fp_leave(&env);
    return st;
}

static void
fold_apply(const fusion_fold *fold, const double *new_bias)
{
    const fusion_view *w = &fold->weight;
    const fusion_view *out = view_present(&fold->out) ? &fold->out : w;
    int64_t d0, d1, a;
    rest_dims r;
    fold_layout(fold, &d0, &d1, &a, &r);
    int64_t numel = view_numel(w);
    if (numel == 0) {
        d0 = 0;
    }
    /* A large fold into another tensor stores past the cache. */
    int stream = out != w && numel * (int64_t)fusion_dtype_size(w->dtype) >=
                                 FUSION_STREAM_BYTES;
    const isa_kernels *kern = kernels();
#ifdef _OPENMP
#pragma omp parallel if (numel >= FUSION_OMP_NUMEL)
#endif
    {
        fp_saved env; /* OpenMP's threads have environments of their own */
        fp_enter(&env);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i0 = 0; i0 < d0; i0++) {
            for (int64_t i1 = 0; i1 < d1; i1++) {
                long double s = elem_scale(fold, i0, i1, a);
                int64_t base = i0 * w->strides[0] + i1 * w->strides[1];
                FOR_EACH_RUN(&r, base, off, count, stride,
                             run_scale(w, out, off, count, stride, s, stream));
            }
        }
        if (stream) {
            kern->fence(); /* each thread's own stores */
        }
        fp_leave(&env);
    }
    int64_t d_out = fusion_fold_out_channels(fold);
    const fusion_view *b = &fold->bias_out;
    for (int64_t o = 0; o < d_out; o++) {
        fusion_store(elem_ptr(b, o * b->strides[0]), b->dtype, new_bias[o]);
    }
}

void
fusion_fold_apply(const fusion_fold *fold, const double *new_bias)
{
    fp_saved env;
    fp_enter(&env);
    fold_apply(fold, new_bias);
    fp_leave(&env);
}
