/*
 * fold_speed.c - speed of the C core's weight passes on each instruction-set
 * path, against the memory bandwidth of the same bytes.
 *
 * For each weight dtype (float32, float16, bfloat16; float64 for reference)
 * and each path this CPU has (fold.h's fusion_set_isa), on one contiguous
 * weight of SIZE MiB (a [4096, n] Linear or 1x1 conv, norm after):
 *
 *   check     fusion_fold_check(): the read-only pass (finiteness and the
 *             per-channel maximum), against a read of the same bytes
 *             (glibc memchr, which reads at full bandwidth)
 *   prep+app  what csrc/module.c does for a fold: fusion_norm_affine(),
 *             fusion_fold_check(), fusion_fold_apply() in place, against a
 *             memcpy of the same bytes to another buffer
 *   into out  the same, writing the fused weight into another buffer
 *             (fold.out: copy mode's fold, from the original into the copy),
 *             against the same memcpy
 *
 * Each time is the median of REPS runs; the weights are restored (untimed)
 * before each apply. It prints a Markdown table; the ratios are
 * reference time / fold time, so 1.0 means "at the bandwidth of the
 * reference" (the targets: check ~1.0 of read, prep+app >= 0.6 of memcpy).
 *
 * Usage: fold_speed [SIZE_MIB [REPS]]   (default 64 MiB, 7 runs)
 * Build: benchmarks/fold_speed.sh, which also runs it.
 */
#define _POSIX_C_SOURCE 199309L
#include "fold.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double
median(double *t, int n)
{
    qsort(t, (size_t)n, sizeof *t, cmp_double);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static uint64_t g_rng = 0x9E3779B97F4A7C15u;

static double
rng_normal(void)
{
    double s = 0.0;
    for (int i = 0; i < 4; i++) {
        g_rng = g_rng * 6364136223846793005u + 1442695040888963407u;
        s += (double)(g_rng >> 11) * 0x1p-53;
    }
    return (s - 2.0) * 1.7320508075688772; /* mean 0, variance 1 */
}

static void *
xmalloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    memset(p, 0, n); /* fault the pages in before timing */
    return p;
}

static fusion_view
vector_view(float *data, int64_t n)
{
    fusion_view v;
    memset(&v, 0, sizeof v);
    v.data = data;
    v.dtype = FUSION_DTYPE_F32;
    v.ndim = 1;
    v.sizes[0] = n;
    v.strides[0] = 1;
    v.lo = 0;
    v.hi = n;
    return v;
}

typedef struct {
    double check, prep_apply, into_out;
} timings;

/* The median time of what csrc/module.c does for a fold (affine map, check,
 * apply), the weight restored from pristine (untimed) before each run. */
static double
time_prep_apply(fusion_fold *f, fusion_norm *norm, int64_t rows, double *scale,
                double *new_bias, float *bias, int reps, double *t,
                unsigned char *w, const unsigned char *pristine, size_t bytes,
                const char *what)
{
    fusion_where where;
    for (int k = 0; k < reps; k++) {
        memcpy(w, pristine, bytes);
        memset(bias, 0, (size_t)rows * sizeof(float));
        double t0 = now();
        fusion_status st = fusion_norm_affine(norm, FUSION_PART_NORM, rows,
                                              scale, NULL, &where);
        if (st == FUSION_OK) {
            st = fusion_fold_check(f, new_bias, &where);
        }
        if (st == FUSION_OK) {
            fusion_fold_apply(f, new_bias);
        }
        t[k] = now() - t0;
        if (st != FUSION_OK) {
            fprintf(stderr, "%s: %s\n", what, fusion_status_str(st));
            exit(1);
        }
    }
    return median(t, reps);
}

/* Times one dtype on the current path. */
static timings
time_fold(fusion_dtype dt, size_t bytes, int reps, unsigned char *w,
          const unsigned char *pristine, unsigned char *dst)
{
    const int64_t rows = 4096;
    size_t es = fusion_dtype_size(dt);
    int64_t cols = (int64_t)(bytes / es) / rows;
    float *stats = xmalloc((size_t)(6 * rows) * sizeof(float));
    float *mean = stats, *var = stats + rows, *gamma = stats + 2 * rows;
    float *beta = stats + 3 * rows, *bias = stats + 4 * rows;
    double *scale = xmalloc((size_t)rows * sizeof(double));
    double *new_bias = xmalloc((size_t)rows * sizeof(double));
    g_rng = 12345;
    for (int64_t r = 0; r < rows; r++) {
        mean[r] = (float)rng_normal();
        var[r] = (float)(0.5 + 0.25 * fabs(rng_normal()));
        gamma[r] = (float)rng_normal();
        beta[r] = (float)rng_normal();
    }
    fusion_norm norm;
    memset(&norm, 0, sizeof norm);
    norm.mean = vector_view(mean, rows);
    norm.var = vector_view(var, rows);
    norm.weight = vector_view(gamma, rows);
    norm.bias = vector_view(beta, rows);
    norm.eps = 1e-5;
    fusion_fold f;
    memset(&f, 0, sizeof f);
    f.weight.data = w;
    f.weight.dtype = dt;
    f.weight.ndim = 2;
    f.weight.sizes[0] = rows;
    f.weight.sizes[1] = cols;
    f.weight.strides[0] = cols;
    f.weight.strides[1] = 1;
    f.weight.lo = 0;
    f.weight.hi = rows * cols;
    f.bias_in = vector_view(bias, rows);
    f.bias_out = f.bias_in;
    f.direction = FUSION_NORM_AFTER;
    f.map = FUSION_AXIS0;
    f.groups = 1;
    f.norm = &norm;
    f.scale = scale;
    double *t = xmalloc((size_t)reps * sizeof(double));
    timings out;
    fusion_where where;
    memcpy(w, pristine, bytes);
    if (fusion_norm_affine(&norm, FUSION_PART_NORM, rows, scale, NULL,
                           &where) != FUSION_OK) {
        fprintf(stderr, "norm_affine failed\n");
        exit(1);
    }
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        fusion_status st = fusion_fold_check(&f, new_bias, &where);
        t[k] = now() - t0;
        if (st != FUSION_OK) {
            fprintf(stderr, "check: %s\n", fusion_status_str(st));
            exit(1);
        }
    }
    out.check = median(t, reps);
    out.prep_apply = time_prep_apply(&f, &norm, rows, scale, new_bias, bias,
                                     reps, t, w, pristine, bytes, "prepare");
    f.out = f.weight;
    f.out.data = dst;
    out.into_out = time_prep_apply(&f, &norm, rows, scale, new_bias, bias,
                                   reps, t, w, pristine, bytes, "into out");
    free(t);
    free(stats);
    free(scale);
    free(new_bias);
    return out;
}

/* The reference passes over the same number of bytes. */
static void
time_refs(size_t bytes, int reps, unsigned char *a, unsigned char *b,
          double *read, double *copy)
{
    double *t = xmalloc((size_t)reps * sizeof(double));
    memset(a, 0, bytes);
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        const void *hit = memchr(a, 1, bytes); /* never found: reads all */
        t[k] = now() - t0;
        if (hit != NULL) {
            exit(3);
        }
    }
    *read = median(t, reps);
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        memcpy(b, a, bytes);
        t[k] = now() - t0;
    }
    *copy = median(t, reps);
    free(t);
}

int
main(int argc, char **argv)
{
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 64;
    int reps = argc > 2 ? atoi(argv[2]) : 7;
    size_t bytes = mib << 20;
    unsigned char *w = xmalloc(bytes), *pristine = xmalloc(bytes);
    unsigned char *other = xmalloc(bytes);
    double read, copy;
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    static const fusion_dtype dts[4] = {FUSION_DTYPE_F32, FUSION_DTYPE_F16,
                                        FUSION_DTYPE_BF16, FUSION_DTYPE_F64};
    static const char *names[5] = {"", "f16", "bf16", "f32", "f64"};
    static const fusion_isa isas[3] = {FUSION_ISA_BASELINE, FUSION_ISA_AVX2,
                                       FUSION_ISA_AVX512};
    time_refs(bytes, reps, other, pristine, &read, &copy);
    printf("weights: %zu MiB, contiguous [4096, n], norm after; median of "
           "%d runs; %d thread%s%s\n\n",
           mib, reps, threads, threads == 1 ? "" : "s",
#ifdef _OPENMP
           " (OpenMP build)"
#else
           ""
#endif
    );
    printf("read (memchr) %.1f ms = %.1f GB/s; memcpy %.1f ms = %.1f GB/s "
           "(each byte read and written)\n\n",
           1e3 * read, bytes / read / 1e9, 1e3 * copy, bytes / copy / 1e9);
    printf("| dtype | path | check ms | check GB/s | check vs read | "
           "prep+apply ms | prep+apply vs memcpy | into out ms | "
           "into out vs memcpy |\n");
    printf("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int d = 0; d < 4; d++) {
        fusion_dtype dt = dts[d];
        size_t es = fusion_dtype_size(dt);
        g_rng = 777;
        for (size_t i = 0; i < bytes / es; i++) {
            fusion_store(pristine + i * es, dt, 0.05 * rng_normal());
        }
        for (int k = 0; k < 3; k++) {
            if (fusion_set_isa(isas[k]) != FUSION_OK) {
                continue;
            }
            /* The memory references again, next to each measurement: the
             * machine is shared, and its bandwidth drifts. */
            time_refs(bytes, reps, other, w, &read, &copy);
            timings tm = time_fold(dt, bytes, reps, w, pristine, other);
            printf("| %s | %s | %.1f | %.1f | %.2f | %.1f | %.2f | %.1f | "
                   "%.2f |\n",
                   names[dt], fusion_isa_str(isas[k]), 1e3 * tm.check,
                   bytes / tm.check / 1e9, read / tm.check,
                   1e3 * tm.prep_apply, copy / tm.prep_apply,
                   1e3 * tm.into_out, copy / tm.into_out);
            fflush(stdout);
        }
    }
    free(w);
    free(pristine);
    free(other);
    return 0;
}
