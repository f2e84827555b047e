/* megamlm CPU kernels: dropout with its mask generated in place from (seed, element index), and the
 * feed-forward's bias + GELU (forward, and backward with the bias gradient).
 *
 * Built at first use by megamlm/model/cpu_kernels.py (cc -O3 -march=native -fopenmp -shared) and
 * called through ctypes; the GIL is released during a call. Large calls run on OpenMP threads: the
 * library needs libgomp.so.1, which resolves to the copy torch has already loaded (same soname), so
 * the kernels share torch's thread pool (threads spinning after a torch op pick the work up at once)
 * instead of oversubscribing the cores. Built without OpenMP, the pragmas are ignored (serial).
 *
 * The mask stream (the specification is cpu_kernels.keep_mask_reference, in torch ops):
 *   word w      = mix64(seed + (w + 1) * 0x9e3779b97f4a7c15)    (SplitMix64's w-th output)
 *   element i   kept  <=>  (int16) bits [16 (i % 4), 16 (i % 4) + 16) of word i / 4  >=  thr
 * with thr = round(p * 65536) - 32768, so P(kept) = 1 - p up to 2^-16. A kept element is scaled
 * by 1 / (1 - p). The same (seed, i) always gives the same decision: the backward regenerates the
 * mask instead of storing it, and a tensor can be processed in any chunks given each chunk's start.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* The loops are element-wise (out[i] depends on x[i], r[i] only), so out == x is safe: tell the
   compiler, or its overlap check sends in-place calls to a scalar loop (4x slower). */
#if defined(__clang__)
#define ELEMENTWISE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define ELEMENTWISE _Pragma("GCC ivdep")
#else
#define ELEMENTWISE
#endif

/* One out-of-line copy of a loop: vectorized once, not re-costed (and left scalar) where inlined. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#else
#define NOINLINE
#endif

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#define BLOCK_WORDS 1024                /* 4096 elements: the unit of work of one thread */
static int64_t parallel_words = 8192;   /* calls of fewer words run on the calling thread alone */

/* Calls with at least this many 64-bit words (4 elements each) use the OpenMP threads; returns the
   previous setting. */
int64_t megamlm_set_parallel_words(int64_t words) {
    int64_t old = parallel_words;
    parallel_words = words;
    return old;
}

/* Whether the library was built with OpenMP. */
int megamlm_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* An OpenMP runtime function as this library resolved it (to tell which runtime it uses), or 0. */
#ifdef _OPENMP
int omp_get_max_threads(void);
void *megamlm_omp_symbol(void) { return (void *)&omp_get_max_threads; }
#else
void *megamlm_omp_symbol(void) { return 0; }
#endif

static inline int keep_at(uint64_t seed, int64_t i, int32_t thr) {
    uint64_t z = mix64(seed + (uint64_t)(i / 4 + 1) * 0x9e3779b97f4a7c15ULL);
    return (int16_t)(uint16_t)(z >> (16 * (i & 3))) >= thr;
}

/* The mask's vectorized loop: over the n elements (a multiple of 4) from element `start` (a multiple
   of 4) of stream `seed`, runs BODY with c = 0 .. n-1 (the offset) and k = scale where that element
   is kept, else 0: one SplitMix64 word per 4 elements, 16 bits each. */
#define FOR_MASK_WORDS(T, seed, start, n, thr, scale, BODY)                                        \
    do {                                                                                           \
        uint64_t w0_ = (uint64_t)((start) / 4) + 1;                                                \
        ELEMENTWISE                                                                                \
        for (int64_t w_ = 0; w_ < (n) / 4; w_++) {                                                 \
            uint64_t h_ = mix64((seed) + (w0_ + (uint64_t)w_) * 0x9e3779b97f4a7c15ULL);            \
            for (int l_ = 0; l_ < 4; l_++) {                                                       \
                int64_t c = 4 * w_ + l_;                                                           \
                T k = (int16_t)(uint16_t)(h_ >> (16 * l_)) >= (thr) ? (scale) : (T)0;             \
                BODY;                                                                              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* One dropout loop, two outputs: COMBINE(j, v) turns the dropped value v = keep ? x[j] * scale : 0
 * of element start + j into out[j] (v itself, or r[j] + v). j in [0, n); out may be x (or r).
 * NAME##_span runs on the calling thread: the unaligned head and tail element by element, whole
 * 64-bit words (4 elements) in the vectorized loop. NAME splits n into word-aligned blocks over the
 * OpenMP threads (one span each). */
#define DROPOUT_KERNEL(NAME, T, R_PARAM, R_ARG, COMBINE)                                           \
    static NOINLINE void NAME##_span(const T *x, R_PARAM T *out, int64_t start, int64_t n,          \
                                     uint64_t seed, int32_t thr, T scale) {                        \
        int64_t j = 0;                                                                             \
        for (; j < n && ((start + j) & 3); j++)                                                    \
            out[j] = COMBINE(j, keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);              \
        int64_t j0 = j, nw = (n - j) / 4;                                                          \
        FOR_MASK_WORDS(T, seed, start + j0, 4 * nw, thr, scale,                                    \
                       out[j0 + c] = COMBINE(j0 + c, x[j0 + c] * k));                              \
        for (j = j0 + 4 * nw; j < n; j++)                                                          \
            out[j] = COMBINE(j, keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);              \
    }                                                                                              \
    void NAME(const T *x, R_PARAM T *out, int64_t start, int64_t n, uint64_t seed, int32_t thr,     \
              T scale) {                                                                           \
        int64_t head = (4 - (start & 3)) & 3;                                                      \
        head = head < n ? head : n;                                                                \
        int64_t block = 4 * BLOCK_WORDS, nb = (n - head + block - 1) / block;                      \
        _Pragma("omp parallel for schedule(static) if ((n - head) / 4 >= parallel_words)")         \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            int64_t lo = head + b * block, len = n - lo < block ? n - lo : block;                  \
            NAME##_span(x + lo, R_ARG(lo) out + lo, start + lo, len, seed, thr, scale);            \
        }                                                                                          \
        NAME##_span(x, R_ARG(0) out, start, head, seed, thr, scale);                               \
    }

#define DROPPED(j, v) (v)
#define RESIDUAL_PLUS(j, v) (r[j] + (v))
#define NO_R(off)
#define R_AT(off) r + (off),
/* out[j] = x[j] * scale where element start + j is kept, else 0. */
#define DROPOUT_MUL(NAME, T) DROPOUT_KERNEL(NAME, T, , NO_R, DROPPED)
/* out[j] = r[j] + x[j] * scale where element start + j is kept, else r[j]. */
#define DROPOUT_ADD(NAME, T) DROPOUT_KERNEL(NAME, T, const T *r COMMA, R_AT, RESIDUAL_PLUS)
#define COMMA ,

DROPOUT_MUL(megamlm_dropout_mul_f32, float)
DROPOUT_MUL(megamlm_dropout_mul_f64, double)
DROPOUT_ADD(megamlm_dropout_add_f32, float)
DROPOUT_ADD(megamlm_dropout_add_f64, double)

/* ---------------------------------------------------------------------------------- bias + GELU
 * Exact (erf) GELU of z = a + bias[col]: gelu(z) = z/2 (1 + erf(z/sqrt 2)), on rows of `cols`.
 * float: erf as ATen's vectorized one (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7) with an
 * inlined exp (Cody-Waite reduction, degree-6 polynomial), so the loops vectorize. double: libm's
 * erf and exp (as ATen). In training the forward also writes the derivative gelu'(z) (one exp shared
 * by erf and the density); the backward multiplies by it and sums the bias gradient (column sums,
 * in double per thread) in the same pass. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* erf(u) given e = exp(-u*u) */
static inline float erf_f32(float u, float e) {
    float t = 1.0f / (0.3275911f * fabsf(u) + 1.0f);
    float r = (((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f;
    float y = 1.0f - r * t * e;
    return u < 0.0f ? -y : y;
}

static inline float gelu_f32(float z) {
    float u = z * 0.70710678118654752f;
    return 0.5f * z * (1.0f + erf_f32(u, exp_f32(-u * u)));
}

/* gelu(z), and gelu'(z) = Phi(z) + z phi(z) in *grad, from one exp */
static inline float gelu_and_grad_f32(float z, float *grad) {
    float u = z * 0.70710678118654752f;
    float e = exp_f32(-u * u);
    float phi2 = 1.0f + erf_f32(u, e); /* 2 Phi(z) */
    *grad = 0.5f * phi2 + z * e * 0.39894228040143268f;
    return 0.5f * z * phi2;
}

static inline double gelu_f64(double z) { return 0.5 * z * (1.0 + erf(z * 0.70710678118654752440)); }

static inline double gelu_and_grad_f64(double z, double *grad) {
    double phi2 = 1.0 + erf(z * 0.70710678118654752440);
    *grad = 0.5 * phi2 + z * exp(-0.5 * z * z) * 0.39894228040143267794;
    return 0.5 * z * phi2;
}

/* out[r, c] = gelu(a[r, c] + bias[c]) (bias is required: zeros for none; out may be a), and where
   deriv is not NULL, deriv[r, c] = gelu'(a[r, c] + bias[c]) (what the backward multiplies by: saved
   instead of a, so the backward is one multiply, not a second erf and exp). */
#define BIAS_GELU(NAME, T, GELU, GELU_AND_GRAD)                                                    \
    void NAME(const T *a, const T *bias, T *out, T *deriv, int64_t rows, int64_t cols) {           \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= 4 * parallel_words)")        \
        for (int64_t r = 0; r < rows; r++) {                                                       \
            const T *ar = a + r * cols;                                                            \
            T *o = out + r * cols;                                                                 \
            if (deriv) {                                                                           \
                T *d = deriv + r * cols;                                                           \
                ELEMENTWISE                                                                        \
                for (int64_t c = 0; c < cols; c++) o[c] = GELU_AND_GRAD(ar[c] + bias[c], d + c);   \
            } else {                                                                               \
                ELEMENTWISE                                                                        \
                for (int64_t c = 0; c < cols; c++) o[c] = GELU(ar[c] + bias[c]);                   \
            }                                                                                      \
        }                                                                                          \
    }

/* out = grad * deriv (out may be grad or deriv); colsum[c] += sum over rows of out[:, c] when colsum
   is not NULL (double, zeroed by the caller): the bias gradient, summed in T over blocks of
   COLSUM_BLOCK rows (full-width vectors), then in double per thread. Returns 0, or -1 when the
   per-thread sums could not be allocated (then nothing was written). */
#define COLSUM_BLOCK 16 /* rows summed in T before each add into the double sums */
#define MUL_COLSUM(NAME, T)                                                                        \
    int NAME(const T *grad, const T *deriv, T *out, double *colsum, int64_t rows, int64_t cols) {  \
        int failed = 0;                                                                            \
        _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")                             \
        {                                                                                          \
            double *acc = colsum ? (double *)calloc((size_t)cols, sizeof(double)) : NULL;          \
            T *part = colsum ? (T *)malloc((size_t)cols * sizeof(T)) : NULL;                       \
            if (colsum && (!acc || !part)) {                                                       \
                _Pragma("omp atomic write")                                                        \
                failed = 1;                                                                        \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                int64_t nblocks = (rows + COLSUM_BLOCK - 1) / COLSUM_BLOCK;                        \
                _Pragma("omp for schedule(static)")                                                \
                for (int64_t blk = 0; blk < nblocks; blk++) {                                      \
                    int64_t r0 = blk * COLSUM_BLOCK;                                               \
                    int64_t r1 = r0 + COLSUM_BLOCK < rows ? r0 + COLSUM_BLOCK : rows;              \
                    if (part)                                                                      \
                        for (int64_t c = 0; c < cols; c++) part[c] = 0;                            \
                    for (int64_t r = r0; r < r1; r++) {                                            \
                        const T *gr = grad + r * cols, *dr = deriv + r * cols;                     \
                        T *o = out + r * cols;                                                     \
                        if (part) {                                                                \
                            ELEMENTWISE                                                            \
                            for (int64_t c = 0; c < cols; c++) {                                   \
                                T v = gr[c] * dr[c];                                               \
                                o[c] = v;                                                          \
                                part[c] += v;                                                      \
                            }                                                                      \
                        } else {                                                                   \
                            ELEMENTWISE                                                            \
                            for (int64_t c = 0; c < cols; c++) o[c] = gr[c] * dr[c];               \
                        }                                                                          \
                    }                                                                              \
                    if (part)                                                                      \
                        for (int64_t c = 0; c < cols; c++) acc[c] += (double)part[c];              \
                }                                                                                  \
                if (acc) {                                                                         \
                    _Pragma("omp critical(megamlm_colsum)")                                        \
                    for (int64_t c = 0; c < cols; c++) colsum[c] += acc[c];                        \
                }                                                                                  \
            }                                                                                      \
            free(acc);                                                                             \
            free(part);                                                                            \
        }                                                                                          \
        return failed ? -1 : 0;                                                                    \
    }

BIAS_GELU(megamlm_bias_gelu_f32, float, gelu_f32, gelu_and_grad_f32)
BIAS_GELU(megamlm_bias_gelu_f64, double, gelu_f64, gelu_and_grad_f64)
MUL_COLSUM(megamlm_mul_colsum_f32, float)
MUL_COLSUM(megamlm_mul_colsum_f64, double)

/* ------------------------------------------------- post-LN residual: LayerNorm(r + dropout(x + bias))
 * Per row of `cols`: z = r + keep * scale * (x + bias) (mask of element row * cols + c of stream
 * `seed`; bias is required: pass zeros for none), then y = (z - mean) * rstd * gamma + beta (mean
 * and biased variance per row). Saves z, mean, rstd for the backward. */
#define RESIDUAL_LN(NAME, T, SQRT)                                                                 \
    void NAME(const T *x, const T *bias, const T *r, const T *gamma, const T *beta, T *z, T *y,     \
              T *mean_out, T *rstd_out, int64_t rows, int64_t cols, uint64_t seed, int32_t thr,     \
              T scale, double eps) {                                                               \
        int aligned = (cols & 3) == 0;                                                             \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= 4 * parallel_words)")        \
        for (int64_t row = 0; row < rows; row++) {                                                 \
            const T *xr = x + row * cols, *rr = r + row * cols;                                    \
            T *zr = z + row * cols, *yr = y + row * cols;                                          \
            int64_t start = row * cols;                                                            \
            if (aligned) {                                                                         \
                FOR_MASK_WORDS(T, seed, start, cols, thr, scale, zr[c] = rr[c] + k * (xr[c] + bias[c])); \
            } else {                                                                               \
                for (int64_t c = 0; c < cols; c++) {                                               \
                    T k = keep_at(seed, start + c, thr) ? scale : (T)0;                            \
                    zr[c] = rr[c] + k * (xr[c] + bias[c]);                                         \
                }                                                                                  \
            }                                                                                      \
            T sum = 0, sq = 0;                                                                     \
            _Pragma("omp simd reduction(+:sum)")                                                   \
            for (int64_t c = 0; c < cols; c++) sum += zr[c];                                       \
            T m = sum / (T)cols;                                                                   \
            _Pragma("omp simd reduction(+:sq)")                                                    \
            for (int64_t c = 0; c < cols; c++) {                                                   \
                T d = zr[c] - m;                                                                   \
                sq += d * d;                                                                       \
            }                                                                                      \
            T rs = (T)(1.0 / sqrt((double)sq / (double)cols + eps));                               \
            ELEMENTWISE                                                                            \
            for (int64_t c = 0; c < cols; c++) yr[c] = (zr[c] - m) * rs * gamma[c] + beta[c];       \
            mean_out[row] = m;                                                                     \
            rstd_out[row] = rs;                                                                    \
        }                                                                                          \
    }

/* Backward of RESIDUAL_LN given gy: gz = LayerNorm's input gradient (= the residual's gradient),
   gx = keep * scale * gz (the gradient of x, and of the bias summed over rows). Column sums (in T over
   blocks of COLSUM_BLOCK rows, then in double) added to the caller's zeroed arrays: ggamma += gy * xhat,
   gbeta += gy, gbias += gx (gbias may be NULL). Returns 0, or -1 when the per-thread sums could not be allocated. */
#define RESIDUAL_LN_BACKWARD(NAME, T)                                                              \
    int NAME(const T *gy, const T *z, const T *mean, const T *rstd, const T *gamma, T *gz, T *gx,   \
             double *ggamma, double *gbeta, double *gbias, int64_t rows, int64_t cols,              \
             uint64_t seed, int32_t thr, T scale) {                                                \
        int failed = 0;                                                                            \
        int aligned = (cols & 3) == 0;                                                             \
        _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")                             \
        {                                                                                          \
            double *acc = (double *)calloc((size_t)(3 * cols), sizeof(double));                    \
            T *xhat = (T *)malloc((size_t)(4 * cols) * sizeof(T));                                 \
            if (!acc || !xhat) {                                                                   \
                _Pragma("omp atomic write")                                                        \
                failed = 1;                                                                        \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                /* column sums in T over blocks of COLSUM_BLOCK rows, then in double */            \
                T *pg = xhat + cols, *pb = xhat + 2 * cols, *px = xhat + 3 * cols;                 \
                int64_t nblocks = (rows + COLSUM_BLOCK - 1) / COLSUM_BLOCK;                        \
                _Pragma("omp for schedule(static)")                                                \
                for (int64_t blk = 0; blk < nblocks; blk++) {                                      \
                    int64_t r0 = blk * COLSUM_BLOCK;                                               \
                    int64_t r1 = r0 + COLSUM_BLOCK < rows ? r0 + COLSUM_BLOCK : rows;              \
                    for (int64_t c = 0; c < 3 * cols; c++) pg[c] = 0;                              \
                    for (int64_t row = r0; row < r1; row++) {                                      \
                        const T *gyr = gy + row * cols, *zr = z + row * cols;                      \
                        T *gzr = gz + row * cols, *gxr = gx + row * cols;                          \
                        T m = mean[row], rs = rstd[row];                                           \
                        T s1 = 0, s2 = 0;                                                          \
                        _Pragma("omp simd reduction(+:s1, s2)")                                    \
                        for (int64_t c = 0; c < cols; c++) {                                       \
                            T xh = (zr[c] - m) * rs;                                               \
                            T g = gyr[c] * gamma[c];                                               \
                            xhat[c] = xh;                                                          \
                            pg[c] += gyr[c] * xh;                                                  \
                            pb[c] += gyr[c];                                                       \
                            s1 += g;                                                               \
                            s2 += g * xh;                                                          \
                        }                                                                          \
                        T a1 = s1 / (T)cols, a2 = s2 / (T)cols;                                    \
                        ELEMENTWISE                                                                \
                        for (int64_t c = 0; c < cols; c++) gzr[c] = rs * (gyr[c] * gamma[c] - a1 - xhat[c] * a2); \
                        int64_t start = row * cols;                                                \
                        if (aligned) {                                                             \
                            FOR_MASK_WORDS(T, seed, start, cols, thr, scale,                       \
                                           gxr[c] = gzr[c] * k; px[c] += gxr[c]);                  \
                        } else {                                                                   \
                            for (int64_t c = 0; c < cols; c++) {                                   \
                                gxr[c] = keep_at(seed, start + c, thr) ? gzr[c] * scale : (T)0;    \
                                px[c] += gxr[c];                                                   \
                            }                                                                      \
                        }                                                                          \
                    }                                                                              \
                    ELEMENTWISE                                                                    \
                    for (int64_t c = 0; c < 3 * cols; c++) acc[c] += (double)pg[c];               \
                }                                                                                  \
                _Pragma("omp critical(megamlm_ln_grad)")                                           \
                for (int64_t c = 0; c < cols; c++) {                                               \
                    ggamma[c] += acc[c];                                                           \
                    gbeta[c] += acc[cols + c];                                                     \
                    if (gbias) gbias[c] += acc[2 * cols + c];                                      \
                }                                                                                  \
            }                                                                                      \
            free(acc);                                                                             \
            free(xhat);                                                                            \
        }                                                                                          \
        return failed ? -1 : 0;                                                                    \
    }

RESIDUAL_LN(megamlm_residual_ln_f32, float, sqrtf)
RESIDUAL_LN(megamlm_residual_ln_f64, double, sqrt)
RESIDUAL_LN_BACKWARD(megamlm_residual_ln_backward_f32, float)
RESIDUAL_LN_BACKWARD(megamlm_residual_ln_backward_f64, double)

/* ---------------------------------------------------------------- cross-entropy over logits + bias
 * Per row of `cols` logits x (float32) and the bias (zeros for none): row max, log-sum-exp and the
 * first argmax of x + bias, read-only (a row stays in cache across the passes); the loss is
 * lse - (x + bias)[label] on rows whose label is not ignore_index (0 elsewhere). */
void megamlm_ce_forward_f32(const float *x, const float *bias, const int64_t *labels, int64_t ignore_index,
                            float *loss, float *lse, int64_t *argmax, int64_t rows, int64_t cols) {
    _Pragma("omp parallel for schedule(static) if (rows * cols >= 4 * parallel_words)")
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float m = -INFINITY;
        _Pragma("omp simd reduction(max:m)")
        for (int64_t c = 0; c < cols; c++) {
            float v = xr[c] + bias[c];
            m = v > m ? v : m;
        }
        float s = 0.0f;
        int64_t a = cols - 1;  /* the first column holding the max (the last one if none does: a NaN) */
        _Pragma("omp simd reduction(+:s) reduction(min:a)")
        for (int64_t c = 0; c < cols; c++) {
            float v = xr[c] + bias[c];
            s += exp_f32(v - m);
            a = v == m && c < a ? c : a;
        }
        float l = m + logf(s);
        lse[r] = l;
        argmax[r] = a;
        int64_t t = labels[r];
        loss[r] = (t == ignore_index || t < 0 || t >= cols) ? 0.0f : l - (xr[t] + bias[t]);
    }
}

/* grad[r, c] = g[r] * (exp(x + bias - lse[r]) - [c == label[r]]) (g = 0 on ignored rows), written to
   grad (which may be x); grad_bias[c] += its column sums (float over blocks of rows, then double;
   NULL: skipped). Returns 0, or -1 when the per-thread sums could not be allocated (then nothing
   was written). */
/* softmax terms below e^-70 are 0: no denormal gradients (they would slow the decoder's gemms ~20x) */
static inline float ce_exp_f32(float x) { return x < -70.0f ? 0.0f : exp_f32(x); }

int megamlm_ce_backward_f32(const float *x, const float *bias, const float *lse, const float *g,
                            const int64_t *labels, int64_t ignore_index, float *grad, double *grad_bias,
                            int64_t rows, int64_t cols) {
    int failed = 0;
    _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")
    {
        /* column sums in float over blocks of COLSUM_BLOCK rows, then in double per thread */
        double *acc = grad_bias ? (double *)calloc((size_t)cols, sizeof(double)) : NULL;
        float *part = grad_bias ? (float *)malloc((size_t)cols * sizeof(float)) : NULL;
        if (grad_bias && (!acc || !part)) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp barrier")
        if (!failed) {
            int64_t nblocks = (rows + COLSUM_BLOCK - 1) / COLSUM_BLOCK;
            _Pragma("omp for schedule(static)")
            for (int64_t blk = 0; blk < nblocks; blk++) {
                int64_t r0 = blk * COLSUM_BLOCK, r1 = r0 + COLSUM_BLOCK < rows ? r0 + COLSUM_BLOCK : rows;
                if (part)
                    for (int64_t c = 0; c < cols; c++) part[c] = 0.0f;
                for (int64_t r = r0; r < r1; r++) {
                    const float *xr = x + r * cols;
                    float *gr = grad + r * cols;
                    float l = lse[r], gg = g[r];
                    int64_t t = labels[r];
                    int valid = t != ignore_index && t >= 0 && t < cols;
                    if (part) {
                        ELEMENTWISE
                        for (int64_t c = 0; c < cols; c++) {
                            float v = ce_exp_f32(xr[c] + bias[c] - l) * gg;
                            gr[c] = v;
                            part[c] += v;
                        }
                        if (valid) part[t] -= gg;
                    } else {
                        ELEMENTWISE
                        for (int64_t c = 0; c < cols; c++) gr[c] = ce_exp_f32(xr[c] + bias[c] - l) * gg;
                    }
                    if (valid) gr[t] -= gg;
                }
                if (part) {
                    ELEMENTWISE
                    for (int64_t c = 0; c < cols; c++) acc[c] += (double)part[c];
                }
            }
            if (acc) {
                _Pragma("omp critical(megamlm_ce_bias_grad)")
                for (int64_t c = 0; c < cols; c++) grad_bias[c] += acc[c];
            }
        }
        free(acc);
        free(part);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------- attention with dropout
 * The whole attention of one (head, sequence) tile at a time, on one thread, while its T x T scores
 * stay in cache: S = scale q k^T (+ the padding mask), P = softmax(S) (stored for the backward),
 * D = dropout(P), y = D v. q, k, v are read in place from the fused projection qkv [B, T, 3H]
 * (columns q | k | v, heads of hd inside each), y is written merged [B, T, H]; the backward writes
 * the gradient of qkv in the same layout. The tiles t = h * B + b run over the OpenMP threads.
 * P is [nh, B, T, T] and element (t, i, j) of the dropout stream is t T^2 + i T + j: the stream of
 * dropout_mul over P as one tensor. The small gemms go to the BLAS sgemm (Fortran interface, 32-bit
 * integers) whose address megamlm_set_sgemm received: torch's own (MKL on x86); sequential inside
 * the parallel region. Rows whose keys are all masked get P = 0 (torch's softmax gives NaN). */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                        const float *, const int *, const float *, const int *, const float *, float *,
                        const int *);
static sgemm_t sgemm_fn = 0;

void megamlm_set_sgemm(void *f) { sgemm_fn = (sgemm_t)f; }

int megamlm_has_sgemm(void) { return sgemm_fn != 0; }


/* Row-major C[M, N] = alpha op(A) op(B) + beta C, op = 'N' or 'T' (as the column-major product
   C^T = op(B)^T op(A)^T: a row-major matrix is its transpose in column-major order). */
static void gemm_rm(char ta, char tb, int m, int n, int k, float alpha, const float *a, int lda, const float *b,
                    int ldb, float beta, float *c, int ldc) {
    sgemm_fn(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

/* C = A B with the gemm above, for the self-test of the pointer the Python side hands over. */
void megamlm_gemm_rm_f32(char ta, char tb, int m, int n, int k, float alpha, const float *a, int lda,
                         const float *b, int ldb, float beta, float *c, int ldc) {
    gemm_rm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* In place over the rows of a tile s [T, T]: s = softmax(s + mask) (mask [T] additive, NULL for
   none), and d = dropout(s), element (i, j) being start + i T + j of the stream. Aligned rows
   (T and start multiples of 4) take the mask in the normalising pass; others one span after. */
static void softmax_dropout_rows_f32(float *s, const float *mask, float *d, int64_t T, int64_t start,
                                     uint64_t seed, int32_t thr, float dscale) {
    int aligned = (T & 3) == 0 && (start & 3) == 0;
    for (int64_t i = 0; i < T; i++) {
        float *r = s + i * T, *dr = d + i * T;
        if (mask) {
            ELEMENTWISE
            for (int64_t j = 0; j < T; j++) r[j] += mask[j];
        }
        float m = -INFINITY;
        _Pragma("omp simd reduction(max:m)")
        for (int64_t j = 0; j < T; j++) m = r[j] > m ? r[j] : m;
        if (m == -INFINITY) {  /* every key masked: P = 0 (torch's softmax: NaN) */
            for (int64_t j = 0; j < T; j++) r[j] = dr[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        _Pragma("omp simd reduction(+:sum)")
        for (int64_t j = 0; j < T; j++) {
            /* e^-70 = 4e-31 of the row's largest term: 0 (masked keys; and no denormal P ever reaches
               the gemms, where denormal operands cost ~20x) */
            float x = r[j] - m, e = x < -70.0f ? 0.0f : exp_f32(x);
            r[j] = e;
            sum += e;
        }
        float inv = 1.0f / sum;
        if (aligned) {
            FOR_MASK_WORDS(float, seed, start + i * T, T, thr, dscale, r[c] *= inv; dr[c] = r[c] * k);
        } else {
            ELEMENTWISE
            for (int64_t j = 0; j < T; j++) r[j] *= inv;
        }
    }
    if (!aligned) megamlm_dropout_mul_f32_span(s, d, start, T * T, seed, thr, dscale);
}

/* One forward tile: scores of q [T, hd] against k (rows ld apart), softmax (+ add [T] or NULL) into
   p [T, T] (stream elements start ...), dropout into the scratch d [T, T], y = d v into yt (rows H
   apart); with the bias (q | k | v of head h, see below), coladd [T] is scratch. */
static void attention_tile_forward_f32(const float *q, const float *k, const float *v, const float *bias,
                                       int64_t h, const float *add, float *coladd, float *p, float *d, float *yt,
                                       int64_t T, int64_t H, int64_t hd, int ld, float scale, int64_t start,
                                       uint64_t seed, int32_t thr, float dscale) {
    gemm_rm('N', 'T', (int)T, (int)T, (int)hd, scale, q, ld, k, ld, 0.0f, p, (int)T);
    if (bias) {  /* coladd_j = mask_j + scale k_j.bq */
        const float *bq = bias + h * hd;
        for (int64_t j = 0; j < T; j++) {
            const float *kj = k + j * ld;
            float a = 0.0f;
            _Pragma("omp simd reduction(+:a)")
            for (int64_t c = 0; c < hd; c++) a += kj[c] * bq[c];
            coladd[j] = scale * a + (add ? add[j] : 0.0f);
        }
        add = coladd;
    }
    softmax_dropout_rows_f32(p, add, d, T, start, seed, thr, dscale);
    gemm_rm('N', 'N', (int)T, (int)hd, (int)T, 1.0f, d, (int)T, v, ld, 0.0f, yt, (int)H);
    if (bias) {  /* y_i += (rowsum D)_i bv */
        const float *bv = bias + 2 * H + h * hd;
        for (int64_t i = 0; i < T; i++) {
            const float *dr = d + i * T;
            float rs = 0.0f;
            _Pragma("omp simd reduction(+:rs)")
            for (int64_t j = 0; j < T; j++) rs += dr[j];
            float *yr = yt + i * H;
            ELEMENTWISE
            for (int64_t c = 0; c < hd; c++) yr[c] += rs * bv[c];
        }
    }
}

/* Attention over E sequences of qkv [N, 3H] (without its bias) held back to back, sequence s being rows
   cu[s] .. cu[s+1]-1 (cu [E+1] int64: 0 first, N last, increasing; the longest maxT rows): each
   (sequence, head) is one tile over its own rows, nothing computed across sequences or on padding.
   A padded batch [B, T] is the case cu[s] = s T. The probabilities P [T_s, T_s] of head h and
   sequence s are at h poff[E] + poff[s] of probs (poff [E+1] int64, poff[s] = sum_{r<s} T_r^2: for a
   batch [nh, B, T, T]), which is also the offset of element (0, 0) in the dropout stream; y [N, H].
   mask_add [N] additive (sequence s at mask_add + cu[s]) or NULL; bias [3H] (q | k | v) or NULL,
   entering without a pass over qkv:
     k's bias adds q.bk to every score of a row: a constant the softmax removes (skipped, exactly);
     q's bias adds scale k_j.bq to every score of column j: added with the mask (a [T] vector);
     v's bias adds (rowsum D)_i bv to row i of D v (after the gemm, on the tile in cache).
   Tiles t = s nh + h run round-robin over the threads (each writes only its own outputs).
   Returns 0, -1 when a thread's scratch could not be allocated, -2 without an sgemm. */
int megamlm_attention_forward_f32(const float *qkv, const float *bias, const float *mask_add, const int64_t *cu,
                                  const int64_t *poff, float *probs, float *y, int64_t E, int64_t maxT, int64_t nh,
                                  int64_t hd, float scale, uint64_t seed, int32_t thr, float dscale) {
    if (!sgemm_fn) return -2;
    int64_t H = nh * hd, tiles = nh * E, P = poff[E];
    int ld = (int)(3 * H), failed = 0;
    _Pragma("omp parallel if (tiles > 1 && nh * P / 4 >= parallel_words)")
    {
        float *d = (float *)malloc((size_t)(maxT * maxT + maxT) * sizeof(float));
        if (!d) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp barrier")
        if (!failed) {
            _Pragma("omp for schedule(static, 1)")
            for (int64_t t = 0; t < tiles; t++) {
                int64_t s = t / nh, h = t % nh, T = cu[s + 1] - cu[s], start = h * P + poff[s];
                const float *q = qkv + cu[s] * 3 * H + h * hd;
                attention_tile_forward_f32(q, q + H, q + 2 * H, bias, h, mask_add ? mask_add + cu[s] : NULL, d + T * T,
                                           probs + start, d, y + cu[s] * H + h * hd, T, H, hd, ld, scale, start,
                                           seed, thr, dscale);
            }
        }
        free(d);
    }
    return failed ? -1 : 0;
}

/* One backward tile (see megamlm_attention_backward_f32): q, k, v rows ld apart, p [T, T] the forward's
   probabilities at stream offset start, g the output gradient (rows H apart), gq, gk, gv (rows ld
   apart) written; acc [3H] (double) += this tile's bias gradient (NULL: skipped); scratch: d, dd
   [T, T], rowadd, cs, rsd [T], fq, fv [hd]. */
static void attention_tile_backward_f32(const float *q, const float *k, const float *v, const float *p,
                                        const float *g, float *gq, float *gk, float *gv, const float *bias, int64_t h,
                                        double *acc, float *d, float *dd, float *rowadd, float *cs, float *rsd,
                                        float *fq, float *fv, int64_t T, int64_t H, int64_t hd, int ld, float scale,
                                        int64_t start, uint64_t seed, int32_t thr, float dscale) {
    int64_t TT = T * T;
    megamlm_dropout_mul_f32_span(p, d, start, TT, seed, thr, dscale);
    gemm_rm('T', 'N', (int)T, (int)hd, (int)T, 1.0f, d, (int)T, g, (int)H, 0.0f, gv, ld);
    gemm_rm('N', 'T', (int)T, (int)T, (int)hd, 1.0f, g, (int)H, v, ld, 0.0f, dd, (int)T);
    if (bias) {  /* dD_ij += gy_i.bv */
        const float *bv = bias + 2 * H + h * hd;
        for (int64_t i = 0; i < T; i++) {
            const float *gr = g + i * H;
            float a = 0.0f;
            _Pragma("omp simd reduction(+:a)")
            for (int64_t c = 0; c < hd; c++) a += gr[c] * bv[c];
            rowadd[i] = a;
            cs[i] = 0.0f;
        }
    }
    for (int64_t i = 0; i < T; i++) {  /* P dP = D dD: dS = D dD - P rowsum(D dD) */
        const float *pr = p + i * T, *dr = d + i * T;
        float *r = dd + i * T;
        float ra = bias ? rowadd[i] : 0.0f, s = 0.0f;
        _Pragma("omp simd reduction(+:s)")
        for (int64_t j = 0; j < T; j++) s += dr[j] * (r[j] + ra);
        ELEMENTWISE
        for (int64_t j = 0; j < T; j++) r[j] = dr[j] * (r[j] + ra) - pr[j] * s;
        if (bias) {
            float rs = 0.0f;
            _Pragma("omp simd reduction(+:rs)")
            for (int64_t j = 0; j < T; j++) rs += dr[j];
            rsd[i] = rs;
            ELEMENTWISE
            for (int64_t j = 0; j < T; j++) cs[j] += r[j];
        }
    }
    gemm_rm('N', 'N', (int)T, (int)hd, (int)T, scale, dd, (int)T, k, ld, 0.0f, gq, ld);
    gemm_rm('T', 'N', (int)T, (int)hd, (int)T, scale, dd, (int)T, q, ld, 0.0f, gk, ld);
    if (bias) {
        const float *bq = bias + h * hd;
        for (int64_t j = 0; j < T; j++) {  /* dk_j += scale colsum(dS)_j bq */
            float *gkr = gk + j * ld, w = scale * cs[j];
            ELEMENTWISE
            for (int64_t c = 0; c < hd; c++) gkr[c] += w * bq[c];
        }
        if (acc) {  /* this tile's sums in float (T terms), then into the double sums */
            for (int64_t c = 0; c < 2 * hd; c++) fq[c] = 0.0f;  /* fq and fv */
            for (int64_t j = 0; j < T; j++) {
                const float *kj = k + j * ld, *gr = g + j * H;
                float w = scale * cs[j], rs = rsd[j];
                ELEMENTWISE
                for (int64_t c = 0; c < hd; c++) {
                    fq[c] += w * kj[c];
                    fv[c] += rs * gr[c];
                }
            }
            double *aq = acc + h * hd, *av = acc + 2 * H + h * hd;
            for (int64_t c = 0; c < hd; c++) {
                aq[c] += (double)fq[c];
                av[c] += (double)fv[c];
            }
        }
    }
}

/* The backward of megamlm_attention_forward_f32 (the same sequences cu, poff, bias and the forward's
   probs): gqkv [N, 3H] (every element written) from gy [N, H]: D = dropout(P), dv = D^T gy,
   dD = gy (v + bv)^T; the softmax backward dS = P (dP - rowsum(P dP)) with dP = keep scale dD, where
   P keep scale = D: dS = D dD - P rowsum(D dD) (the mask once, not twice); dq = scale dS (k + bk) =
   scale dS k (rows of dS sum to 0), dk = scale dS^T (q + bq). grad_bias [3H] (double, zeroed by the
   caller; NULL: skipped) += q: scale k^T colsum(dS); k: 0 (exactly: the softmax removes bk);
   v: gy^T rowsum(D). Returns as the forward. */
int megamlm_attention_backward_f32(const float *qkv, const float *bias, const int64_t *cu, const int64_t *poff,
                                   const float *probs, const float *gy, float *gqkv, double *grad_bias, int64_t E,
                                   int64_t maxT, int64_t nh, int64_t hd, float scale, uint64_t seed, int32_t thr,
                                   float dscale) {
    if (!sgemm_fn) return -2;
    int64_t H = nh * hd, tiles = nh * E, P = poff[E];
    int ld = (int)(3 * H), failed = 0;
    _Pragma("omp parallel if (tiles > 1 && nh * P / 4 >= parallel_words)")
    {
        float *d = (float *)malloc((size_t)(2 * maxT * maxT + 3 * maxT + 2 * hd) * sizeof(float));
        double *acc = grad_bias ? (double *)calloc((size_t)(3 * H), sizeof(double)) : NULL;
        if (!d || (grad_bias && !acc)) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp barrier")
        if (!failed) {
            _Pragma("omp for schedule(static, 1)")
            for (int64_t t = 0; t < tiles; t++) {
                int64_t s = t / nh, h = t % nh, T = cu[s + 1] - cu[s], TT = T * T, start = h * P + poff[s];
                float *dd = d + TT, *rowadd = dd + TT, *cs = rowadd + T, *rsd = cs + T, *fq = rsd + T, *fv = fq + hd;
                const float *q = qkv + cu[s] * 3 * H + h * hd;
                float *gq = gqkv + cu[s] * 3 * H + h * hd;
                attention_tile_backward_f32(q, q + H, q + 2 * H, probs + start, gy + cu[s] * H + h * hd, gq, gq + H,
                                            gq + 2 * H, bias, h, acc, d, dd, rowadd, cs, rsd, fq, fv, T, H, hd, ld,
                                            scale, start, seed, thr, dscale);
            }
            if (acc) {
                _Pragma("omp critical(megamlm_attention_bias_grad)")
                for (int64_t c = 0; c < 3 * H; c++) grad_bias[c] += acc[c];
            }
        }
        free(d);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* The ABI version the Python side checks (bump with any change of signature or stream). */
int megamlm_kernels_version(void) { return 9; }
