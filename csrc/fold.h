/*
 * fold.h - the numeric core of fusion: folding a normalisation layer's affine
 * map into the weight and bias of the layer that feeds it (or that it feeds).
 *
 * This is plain C11 on plain buffers. It knows nothing of Python or torch.
 * Every fused value is computed in float64 and rounded once, to nearest even,
 * into the destination dtype.
 *
 * The work is split in two phases so that a caller can be transactional:
 *
 *   fusion_norm_affine()  per-channel scale s = gamma / sqrt(var + eps) and
 *                         shift t = beta - mean * s, checked for finiteness.
 *   fusion_fold_check()   validates shapes, strides and bounds of every view,
 *                         checks that every input is finite and that every
 *                         fused value fits the destination dtype, and computes
 *                         the new bias into a caller-provided float64 buffer.
 *                         It writes no tensor.
 *   fusion_fold_apply()   writes the fused weight (in place, or into another
 *                         tensor of the same layout) and the new bias.
 *                         It has no failure path: call it only after a
 *                         successful fusion_fold_check() on the same
 * arguments.
 *
 * Shapes. A producer weight is viewed as [d0, d1, rest...]. Each element
 * (i0, i1, ...) belongs to one channel of the norm:
 *
 *   FUSION_AXIS0:   c = i0                      (Conv/Linear, norm after)
 *   FUSION_GROUPED: c = (i0 / a) * b + i1       (a = d0 / groups, b = d1)
 *
 * FUSION_GROUPED covers ConvTranspose with the norm after it (the weight is
 * [C_in, C_out/G, k...], a = C_in/G, b = C_out/G) and Conv/Linear with the
 * norm before it (the weight is [C_out, C_in/G, k...], a = C_out/G,
 * b = C_in/G).
 *
 * Strides are in elements and may be negative or zero. The views that are
 * written, weight and bias_out, must not reach one element through two
 * indices (an expanded tensor does); fusion_fold_check() rejects them. Each
 * view carries the element range [lo, hi) of its storage that it may touch,
 * relative to its data pointer; a view reaching outside is rejected.
 */
#ifndef FUSION_FOLD_H
#define FUSION_FOLD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FUSION_MAX_DIMS 8

typedef enum {
    FUSION_DTYPE_NONE = 0, /* an absent optional view */
    FUSION_DTYPE_F16 = 1,
    FUSION_DTYPE_BF16 = 2,
    FUSION_DTYPE_F32 = 3,
    FUSION_DTYPE_F64 = 4
} fusion_dtype;

typedef enum {
    FUSION_OK = 0,
    FUSION_E_ARG = 1,       /* a null pointer, bad enum, or bad groups */
    FUSION_E_DTYPE = 2,     /* dtype unsupported or absent where required */
    FUSION_E_SHAPE = 3,     /* sizes disagree with each other */
    FUSION_E_BOUNDS = 4,    /* a view reaches outside its storage */
    FUSION_E_NONFINITE = 5, /* an input value is NaN or infinite */
    FUSION_E_VARIANCE = 6,  /* running_var + eps <= 0 */
    FUSION_E_OVERFLOW = 7,  /* a fused value does not fit the dtype */
    FUSION_E_NOMEM = 8,
    FUSION_E_OVERLAP = 9 /* a written view reaches an element twice */
} fusion_status;

/* A strided view of a tensor. data points at element (0, ..., 0). */
typedef struct {
    void *data;
    fusion_dtype dtype;
    int ndim;
    int64_t sizes[FUSION_MAX_DIMS];
    int64_t strides[FUSION_MAX_DIMS];
    int64_t lo, hi; /* allowed element offsets from data: [lo, hi) */
} fusion_view;

/* The statistics and affine parameters of a norm with C channels.
 * mean and var are required; weight (gamma) and bias (beta) are optional
 * (dtype FUSION_DTYPE_NONE means 1 and 0). */
typedef struct {
    fusion_view mean, var, weight, bias;
    double eps;
} fusion_norm;

typedef enum { FUSION_AXIS0 = 0, FUSION_GROUPED = 1 } fusion_channel_map;

typedef enum {
    FUSION_NORM_AFTER = 0, /* W' = W * s, b' = (b - mean) * s + beta */
    FUSION_NORM_BEFORE = 1 /* W' = W * s, b' = b + sum W * t */
} fusion_direction;

/* One fold. weight is read, and the fused weight is written to out, or in
 * place where out is absent (dtype FUSION_DTYPE_NONE, as a zeroed struct
 * leaves it). out has weight's dtype, sizes and strides, its values are not
 * read, and it shares no byte with weight: a fold into a fresh tensor (a
 * model's copy, an untied weight) reads the source once and writes the
 * destination once, with no copy first. bias_in is optional (absent means a
 * zero bias). bias_out is written; it has d_out elements and may be the same
 * view as bias_in.
 *
 * norm is folded along the channel map, with scale (C doubles) computed by
 * fusion_norm_affine(norm). The shift the bias needs is recomputed from the
 * norm in long double, so that a float64 bias is rounded once. With
 * FUSION_NORM_BEFORE a second norm, post, may follow the layer; it is folded
 * along axis 0 in the same pass, so that each value is still rounded once:
 *
 *   W'[i0, i1, ...] = W[i0, i1, ...] * scale[c] * post_scale[i0]
 *   b'[o] = ((b[o] + sum W[o, ...] * shift[c]) - post_mean[o])
 *           * post_scale[o] + post_bias[o]
 *
 * post is NULL when absent. */
typedef struct {
    fusion_view weight;
    fusion_view bias_in;
    fusion_view bias_out;
    fusion_direction direction;
    fusion_channel_map map;
    int64_t groups; /* used by FUSION_GROUPED, >= 1 */
    const fusion_norm *norm;
    const double *scale;
    const fusion_norm *post;
    const double *post_scale;
    fusion_view out;
} fusion_fold;

/* Which part of a fold a failed check is about. */
typedef enum {
    FUSION_PART_NONE = 0,  /* the fold as a whole (its arguments) */
    FUSION_PART_LAYER = 1, /* the layer: weight, bias_in, bias_out */
    FUSION_PART_NORM = 2,  /* fold->norm */
    FUSION_PART_POST = 3   /* fold->post */
} fusion_part;

/* Which field of that part. */
typedef enum {
    FUSION_FIELD_NONE = 0,
    FUSION_FIELD_WEIGHT =
        1,                 /* the layer's weight, or a norm's weight (gamma) */
    FUSION_FIELD_BIAS = 2, /* the layer's bias (bias_in or bias_out), or a
                              norm's bias (beta) */
    FUSION_FIELD_MEAN = 3, /* a norm's running mean */
    FUSION_FIELD_VAR = 4,  /* a norm's running variance */
    FUSION_FIELD_EPS = 5,  /* a norm's eps */
    FUSION_FIELD_SCALE = 6 /* a norm's computed scale or shift */
} fusion_field;

/* Where a check failed, filled by the functions below on failure: the part
 * and field, and the element: a flat index for the 1-D views, the element
 * offset from data for the weight (its flat index only when it is
 * contiguous), or -1 for the view as a whole. value is the element's value;
 * for a view of the wrong length (FUSION_E_SHAPE with index -1), its
 * length. */
typedef struct {
    fusion_part part;
    fusion_field field;
    int64_t index;
    double value;
} fusion_where;

/* Number of norm channels a fold needs (C), and output channels (d_out).
 * Return 0 if the weight's shape does not allow the fold. */
int64_t fusion_fold_channels(const fusion_fold *fold);
int64_t fusion_fold_out_channels(const fusion_fold *fold);

/* Computes scale[c] and shift[c] for c in [0, C) in float64:
 *   scale = weight / sqrt(running_var + eps), shift = bias - mean * scale.
 * shift may be NULL: it is then checked but not stored. part is what a
 * failure reports the norm as (FUSION_PART_NORM or FUSION_PART_POST).
 * Fails with FUSION_E_SHAPE / FUSION_E_DTYPE / FUSION_E_BOUNDS if a view is
 * not a 1-D view of length C, FUSION_E_NONFINITE for a NaN or infinite
 * statistic or eps, FUSION_E_VARIANCE when var + eps <= 0, and
 * FUSION_E_OVERFLOW when a scale or shift is not finite. */
fusion_status fusion_norm_affine(const fusion_norm *norm, fusion_part part,
                                 int64_t channels, double *scale,
                                 double *shift, fusion_where *where);

/* Checks a fold and computes the new bias, d_out doubles, into new_bias.
 * Writes no view. Fails with FUSION_E_ARG for a missing norm or scale (part
 * FUSION_PART_NONE),
 * FUSION_E_SHAPE / FUSION_E_BOUNDS / FUSION_E_DTYPE for a bad view,
 * FUSION_E_NONFINITE for a NaN or infinite weight or bias,
 * FUSION_E_OVERFLOW when a fused weight or bias would not fit its dtype, and
 * FUSION_E_OVERLAP when weight, out or bias_out reaches an element twice or
 * out shares a byte with weight. A present out of another dtype, shape or
 * strides than weight fails with FUSION_E_DTYPE or FUSION_E_SHAPE. */
fusion_status fusion_fold_check(const fusion_fold *fold, double *new_bias,
                                fusion_where *where);

/* Writes the fold. Precondition: fusion_fold_check() returned FUSION_OK for
 * the same fold, and new_bias is what it computed. Has no failure path. */
void fusion_fold_apply(const fusion_fold *fold, const double *new_bias);

/* Rounds x once, to nearest even, to dtype and stores it at dst.
 * x must be finite and fit the dtype (see fusion_fits). */
void fusion_store(void *dst, fusion_dtype dtype, double x);

/* Loads one element of dtype at src, exactly, as a double. */
double fusion_load(const void *src, fusion_dtype dtype);

/* True when x rounded to dtype is finite. */
int fusion_fits(double x, fusion_dtype dtype);

/* Size in bytes of one element, or 0. */
size_t fusion_dtype_size(fusion_dtype dtype);

/* Short names: "layer", "norm", "post" and "weight", "bias", "running_mean",
 * "running_var", "eps", "scale"; "" for NONE. */
const char *fusion_part_str(fusion_part part);
const char *fusion_field_str(fusion_field field);

/* A short English message for a status code. */
const char *fusion_status_str(fusion_status status);

/* Instruction-set paths of the weight kernels (x86-64 only; elsewhere only
 * the baseline exists). Every path computes bit-identical results: the same
 * float64 product of each weight and its scale, rounded once to the weight's
 * dtype; float64 weights and every bias stay in the portable long double
 * code on every path. Only contiguous runs (stride 1) of float32, float16
 * and bfloat16 weights, and the check pass's reads of every dtype, use the
 * vector code.
 *
 *   FUSION_ISA_AUTO      the best path this CPU has
 *   FUSION_ISA_BASELINE  portable C
 *   FUSION_ISA_AVX2      AVX2 with F16C
 *   FUSION_ISA_AVX512    AVX-512 F and BW
 *
 * The path is chosen once, on first use: the environment variable
 * FUSION_ISA (baseline, avx2, avx512 or auto) asks for one; a path the CPU
 * lacks falls back to the best one below it. */
typedef enum {
    FUSION_ISA_AUTO = 0,
    FUSION_ISA_BASELINE = 1,
    FUSION_ISA_AVX2 = 2,
    FUSION_ISA_AVX512 = 3
} fusion_isa;

/* 1 when this CPU (and build) can run isa; AUTO and BASELINE always can. */
int fusion_isa_supported(fusion_isa isa);

/* Forces the path of every later fold (for tests and benchmarks); AUTO
 * selects the best one. Returns FUSION_E_ARG, changing nothing, for an
 * unknown or unsupported path. Do not call it while a fold runs on another
 * thread: that fold may then use either path (with identical results). */
fusion_status fusion_set_isa(fusion_isa isa);

/* The path in use (never AUTO), choosing it first if nothing has yet. */
fusion_isa fusion_get_isa(void);

/* "auto", "baseline", "avx2", "avx512"; "" for an unknown value. */
const char *fusion_isa_str(fusion_isa isa);

#ifdef __cplusplus
}
#endif

#endif /* FUSION_FOLD_H */
