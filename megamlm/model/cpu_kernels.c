/* megamlm CPU kernels: dropout with its mask generated in place from (seed, element index).
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
#include <stddef.h>
#include <stdint.h>

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

/* out[j] = x[j] * scale where element start + j is kept, else 0; j in [0, n). out may be x. */
#define DROPOUT_MUL(NAME, T)                                                                       \
    void NAME(const T *x, T *out, int64_t start, int64_t n, uint64_t seed, int32_t thr, T scale) { \
        int64_t j = 0;                                                                             \
        for (; j < n && ((start + j) & 3); j++) out[j] = keep_at(seed, start + j, thr) ? x[j] * scale : (T)0; \
        int64_t nw = (n - j) / 4;                                                                  \
        const T *xx = x + j;                                                                       \
        T *oo = out + j;                                                                           \
        uint64_t w0 = (uint64_t)((start + j) / 4) + 1;                                             \
        int64_t nb = (nw + BLOCK_WORDS - 1) / BLOCK_WORDS;                                         \
        _Pragma("omp parallel for schedule(static) if (nw >= parallel_words)")                     \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            int64_t hi = (b + 1) * BLOCK_WORDS < nw ? (b + 1) * BLOCK_WORDS : nw;                  \
            ELEMENTWISE                                                                            \
            for (int64_t w = b * BLOCK_WORDS; w < hi; w++) {                                       \
                uint64_t z = mix64(seed + (w0 + (uint64_t)w) * 0x9e3779b97f4a7c15ULL);             \
                for (int l = 0; l < 4; l++) {                                                      \
                    T k = (int16_t)(uint16_t)(z >> (16 * l)) >= thr ? scale : (T)0;                \
                    oo[4 * w + l] = xx[4 * w + l] * k;                                             \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (j += 4 * nw; j < n; j++) out[j] = keep_at(seed, start + j, thr) ? x[j] * scale : (T)0; \
    }

/* out[j] = r[j] + x[j] * scale where element start + j is kept, else r[j]. out may be x or r. */
#define DROPOUT_ADD(NAME, T)                                                                       \
    void NAME(const T *x, const T *r, T *out, int64_t start, int64_t n, uint64_t seed, int32_t thr, \
              T scale) {                                                                           \
        int64_t j = 0;                                                                             \
        for (; j < n && ((start + j) & 3); j++)                                                    \
            out[j] = r[j] + (keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);                 \
        int64_t nw = (n - j) / 4;                                                                  \
        const T *xx = x + j;                                                                       \
        const T *rr = r + j;                                                                       \
        T *oo = out + j;                                                                           \
        uint64_t w0 = (uint64_t)((start + j) / 4) + 1;                                             \
        int64_t nb = (nw + BLOCK_WORDS - 1) / BLOCK_WORDS;                                         \
        _Pragma("omp parallel for schedule(static) if (nw >= parallel_words)")                     \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            int64_t hi = (b + 1) * BLOCK_WORDS < nw ? (b + 1) * BLOCK_WORDS : nw;                  \
            ELEMENTWISE                                                                            \
            for (int64_t w = b * BLOCK_WORDS; w < hi; w++) {                                       \
                uint64_t z = mix64(seed + (w0 + (uint64_t)w) * 0x9e3779b97f4a7c15ULL);             \
                for (int l = 0; l < 4; l++) {                                                      \
                    T k = (int16_t)(uint16_t)(z >> (16 * l)) >= thr ? scale : (T)0;                \
                    oo[4 * w + l] = rr[4 * w + l] + xx[4 * w + l] * k;                             \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (j += 4 * nw; j < n; j++)                                                              \
            out[j] = r[j] + (keep_at(seed, start + j, thr) ? x[j] * scale : (T)0);                 \
    }

DROPOUT_MUL(megamlm_dropout_mul_f32, float)
DROPOUT_MUL(megamlm_dropout_mul_f64, double)
DROPOUT_ADD(megamlm_dropout_add_f32, float)
DROPOUT_ADD(megamlm_dropout_add_f64, double)

/* The ABI version the Python side checks (bump with any change of signature or stream). */
int megamlm_kernels_version(void) { return 1; }
