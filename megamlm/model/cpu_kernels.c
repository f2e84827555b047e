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

/* One dropout kernel, two outputs: COMBINE(j, v) turns the dropped value v = keep ? x[j] * scale : 0
 * of element start + j into out[j] (v itself, or r[j] + v). j in [0, n); out may be x (or r). The
 * unaligned head and tail go element by element; whole 64-bit words in blocks over the threads. */
#define DROPOUT_KERNEL(NAME, T, R_PARAM, COMBINE)                                                  \
    void NAME(const T *x, R_PARAM T *out, int64_t start, int64_t n, uint64_t seed, int32_t thr,     \
              T scale) {                                                                           \
        int64_t j = 0;                                                                             \
        for (; j < n && ((start + j) & 3); j++)                                                    \
            out[j] = COMBINE(j, keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);              \
        int64_t j0 = j, nw = (n - j) / 4;                                                          \
        uint64_t w0 = (uint64_t)((start + j) / 4) + 1;                                             \
        int64_t nb = (nw + BLOCK_WORDS - 1) / BLOCK_WORDS;                                         \
        _Pragma("omp parallel for schedule(static) if (nw >= parallel_words)")                     \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            int64_t hi = (b + 1) * BLOCK_WORDS < nw ? (b + 1) * BLOCK_WORDS : nw;                  \
            ELEMENTWISE                                                                            \
            for (int64_t w = b * BLOCK_WORDS; w < hi; w++) {                                       \
                uint64_t z = mix64(seed + (w0 + (uint64_t)w) * 0x9e3779b97f4a7c15ULL);             \
                for (int l = 0; l < 4; l++) {                                                      \
                    int64_t e = j0 + 4 * w + l;                                                    \
                    T k = (int16_t)(uint16_t)(z >> (16 * l)) >= thr ? scale : (T)0;                \
                    out[e] = COMBINE(e, x[e] * k);                                                 \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (j = j0 + 4 * nw; j < n; j++)                                                          \
            out[j] = COMBINE(j, keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);              \
    }

#define DROPPED(j, v) (v)
#define RESIDUAL_PLUS(j, v) (r[j] + (v))
/* out[j] = x[j] * scale where element start + j is kept, else 0. */
#define DROPOUT_MUL(NAME, T) DROPOUT_KERNEL(NAME, T, , DROPPED)
/* out[j] = r[j] + x[j] * scale where element start + j is kept, else r[j]. */
#define DROPOUT_ADD(NAME, T) DROPOUT_KERNEL(NAME, T, const T *r COMMA, RESIDUAL_PLUS)
#define COMMA ,

DROPOUT_MUL(megamlm_dropout_mul_f32, float)
DROPOUT_MUL(megamlm_dropout_mul_f64, double)
DROPOUT_ADD(megamlm_dropout_add_f32, float)
DROPOUT_ADD(megamlm_dropout_add_f64, double)

/* ---------------------------------------------------------------------------------- bias + GELU
 * Exact (erf) GELU of z = a + bias[col]: gelu(z) = z/2 (1 + erf(z/sqrt 2)), on rows of `cols`.
 * float: erf as ATen's vectorized one (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7) with an
 * inlined exp (Cody-Waite reduction, degree-6 polynomial), so the loops vectorize; the backward
 * shares one exp(-z^2/2) between erf and the density. double: libm's erf and exp (as ATen).
 * The bias gradient (column sums of the input gradient) is accumulated in double per thread. */
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

static inline float gelu_grad_f32(float z) {
    float u = z * 0.70710678118654752f;
    float e = exp_f32(-u * u);
    return 0.5f * (1.0f + erf_f32(u, e)) + z * e * 0.39894228040143268f;
}

static inline double gelu_f64(double z) { return 0.5 * z * (1.0 + erf(z * 0.70710678118654752440)); }

static inline double gelu_grad_f64(double z) {
    return 0.5 * (1.0 + erf(z * 0.70710678118654752440)) + z * exp(-0.5 * z * z) * 0.39894228040143267794;
}

/* out[r, c] = gelu(a[r, c] + bias[c]) (bias may be NULL); out may be a. */
#define BIAS_GELU(NAME, T, GELU)                                                                   \
    void NAME(const T *a, const T *bias, T *out, int64_t rows, int64_t cols) {                     \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= 4 * parallel_words)")        \
        for (int64_t r = 0; r < rows; r++) {                                                       \
            const T *ar = a + r * cols;                                                            \
            T *o = out + r * cols;                                                                 \
            if (bias) {                                                                            \
                ELEMENTWISE                                                                        \
                for (int64_t c = 0; c < cols; c++) o[c] = GELU(ar[c] + bias[c]);                   \
            } else {                                                                               \
                ELEMENTWISE                                                                        \
                for (int64_t c = 0; c < cols; c++) o[c] = GELU(ar[c]);                             \
            }                                                                                      \
        }                                                                                          \
    }

/* grad_a = grad * gelu'(a + bias) (grad_a may be grad or a; bias is required: zeros for none);
   grad_bias[c] += sum over rows of grad_a[:, c] when grad_bias is not NULL (double, zeroed by the
   caller). Returns 0, or -1 when the per-thread column sums could not be allocated (then nothing
   was written). The inner loop has no branch, so it vectorizes. */
#define BIAS_GELU_BACKWARD(NAME, T, GRAD)                                                          \
    int NAME(const T *grad, const T *a, const T *bias, T *grad_a, double *grad_bias, int64_t rows,  \
             int64_t cols) {                                                                       \
        int failed = 0;                                                                            \
        _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")                             \
        {                                                                                          \
            double *acc = (double *)calloc((size_t)cols, sizeof(double));                          \
            if (!acc) {                                                                            \
                _Pragma("omp atomic write")                                                        \
                failed = 1;                                                                        \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                _Pragma("omp for schedule(static)")                                                \
                for (int64_t r = 0; r < rows; r++) {                                               \
                    const T *gr = grad + r * cols;                                                 \
                    const T *ar = a + r * cols;                                                    \
                    T *o = grad_a + r * cols;                                                      \
                    ELEMENTWISE                                                                    \
                    for (int64_t c = 0; c < cols; c++) {                                           \
                        T d = gr[c] * GRAD(ar[c] + bias[c]);                                       \
                        o[c] = d;                                                                  \
                        acc[c] += (double)d;                                                       \
                    }                                                                              \
                }                                                                                  \
                if (grad_bias) {                                                                   \
                    _Pragma("omp critical(megamlm_bias_grad)")                                     \
                    for (int64_t c = 0; c < cols; c++) grad_bias[c] += acc[c];                     \
                }                                                                                  \
            }                                                                                      \
            free(acc);                                                                             \
        }                                                                                          \
        return failed ? -1 : 0;                                                                    \
    }

BIAS_GELU(megamlm_bias_gelu_f32, float, gelu_f32)
BIAS_GELU(megamlm_bias_gelu_f64, double, gelu_f64)
BIAS_GELU_BACKWARD(megamlm_bias_gelu_backward_f32, float, gelu_grad_f32)
BIAS_GELU_BACKWARD(megamlm_bias_gelu_backward_f64, double, gelu_grad_f64)

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
                uint64_t w0 = (uint64_t)(start / 4) + 1;                                           \
                ELEMENTWISE                                                                        \
                for (int64_t w = 0; w < cols / 4; w++) {                                           \
                    uint64_t h = mix64(seed + (w0 + (uint64_t)w) * 0x9e3779b97f4a7c15ULL);         \
                    for (int l = 0; l < 4; l++) {                                                  \
                        int64_t c = 4 * w + l;                                                     \
                        T k = (int16_t)(uint16_t)(h >> (16 * l)) >= thr ? scale : (T)0;            \
                        zr[c] = rr[c] + k * (xr[c] + bias[c]);                                     \
                    }                                                                              \
                }                                                                                  \
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
   gx = keep * scale * gz (the gradient of x, and of the bias summed over rows). Column sums, in
   double and added to the caller's zeroed arrays: ggamma += gy * xhat, gbeta += gy, gbias += gx
   (gbias may be NULL). Returns 0, or -1 when the per-thread sums could not be allocated. */
#define RESIDUAL_LN_BACKWARD(NAME, T)                                                              \
    int NAME(const T *gy, const T *z, const T *mean, const T *rstd, const T *gamma, T *gz, T *gx,   \
             double *ggamma, double *gbeta, double *gbias, int64_t rows, int64_t cols,              \
             uint64_t seed, int32_t thr, T scale) {                                                \
        int failed = 0;                                                                            \
        int aligned = (cols & 3) == 0;                                                             \
        _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")                             \
        {                                                                                          \
            double *acc = (double *)calloc((size_t)(3 * cols), sizeof(double));                    \
            T *xhat = (T *)malloc((size_t)cols * sizeof(T));                                       \
            if (!acc || !xhat) {                                                                   \
                _Pragma("omp atomic write")                                                        \
                failed = 1;                                                                        \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                double *ag = acc, *ab = acc + cols, *ax = acc + 2 * cols;                          \
                _Pragma("omp for schedule(static)")                                                \
                for (int64_t row = 0; row < rows; row++) {                                         \
                    const T *gyr = gy + row * cols, *zr = z + row * cols;                          \
                    T *gzr = gz + row * cols, *gxr = gx + row * cols;                              \
                    T m = mean[row], rs = rstd[row];                                               \
                    T s1 = 0, s2 = 0;                                                              \
                    _Pragma("omp simd reduction(+:s1, s2)")                                        \
                    for (int64_t c = 0; c < cols; c++) {                                           \
                        T xh = (zr[c] - m) * rs;                                                   \
                        T g = gyr[c] * gamma[c];                                                   \
                        xhat[c] = xh;                                                              \
                        s1 += g;                                                                   \
                        s2 += g * xh;                                                              \
                    }                                                                              \
                    ELEMENTWISE                                                                    \
                    for (int64_t c = 0; c < cols; c++) {                                           \
                        ag[c] += (double)(gyr[c] * xhat[c]);                                       \
                        ab[c] += (double)gyr[c];                                                   \
                    }                                                                              \
                    T a1 = s1 / (T)cols, a2 = s2 / (T)cols;                                        \
                    ELEMENTWISE                                                                    \
                    for (int64_t c = 0; c < cols; c++) gzr[c] = rs * (gyr[c] * gamma[c] - a1 - xhat[c] * a2); \
                    int64_t start = row * cols;                                                    \
                    if (aligned) {                                                                 \
                        uint64_t w0 = (uint64_t)(start / 4) + 1;                                   \
                        ELEMENTWISE                                                                \
                        for (int64_t w = 0; w < cols / 4; w++) {                                   \
                            uint64_t h = mix64(seed + (w0 + (uint64_t)w) * 0x9e3779b97f4a7c15ULL); \
                            for (int l = 0; l < 4; l++) {                                          \
                                int64_t c = 4 * w + l;                                             \
                                T k = (int16_t)(uint16_t)(h >> (16 * l)) >= thr ? scale : (T)0;    \
                                gxr[c] = gzr[c] * k;                                               \
                            }                                                                      \
                        }                                                                          \
                    } else {                                                                       \
                        for (int64_t c = 0; c < cols; c++)                                         \
                            gxr[c] = keep_at(seed, start + c, thr) ? gzr[c] * scale : (T)0;        \
                    }                                                                              \
                    if (gbias) {                                                                   \
                        ELEMENTWISE                                                                \
                        for (int64_t c = 0; c < cols; c++) ax[c] += (double)gxr[c];                \
                    }                                                                              \
                }                                                                                  \
                _Pragma("omp critical(megamlm_ln_grad)")                                           \
                for (int64_t c = 0; c < cols; c++) {                                               \
                    ggamma[c] += ag[c];                                                            \
                    gbeta[c] += ab[c];                                                             \
                    if (gbias) gbias[c] += ax[c];                                                  \
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
   grad (which may be x); grad_bias[c] += its column sums (double; NULL: skipped). Returns 0, or -1
   when the per-thread sums could not be allocated (then nothing was written). */
int megamlm_ce_backward_f32(const float *x, const float *bias, const float *lse, const float *g,
                            const int64_t *labels, int64_t ignore_index, float *grad, double *grad_bias,
                            int64_t rows, int64_t cols) {
    int failed = 0;
    _Pragma("omp parallel if (rows * cols >= 4 * parallel_words)")
    {
        double *acc = grad_bias ? (double *)calloc((size_t)cols, sizeof(double)) : NULL;
        if (grad_bias && !acc) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp barrier")
        if (!failed) {
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + r * cols;
                float *gr = grad + r * cols;
                float l = lse[r], gg = g[r];
                ELEMENTWISE
                for (int64_t c = 0; c < cols; c++) gr[c] = exp_f32(xr[c] + bias[c] - l) * gg;
                int64_t t = labels[r];
                if (t != ignore_index && t >= 0 && t < cols) gr[t] -= gg;
                if (acc) {
                    ELEMENTWISE
                    for (int64_t c = 0; c < cols; c++) acc[c] += (double)gr[c];
                }
            }
            if (acc) {
                _Pragma("omp critical(megamlm_ce_bias_grad)")
                for (int64_t c = 0; c < cols; c++) grad_bias[c] += acc[c];
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

/* The ABI version the Python side checks (bump with any change of signature or stream). */
int megamlm_kernels_version(void) { return 4; }
