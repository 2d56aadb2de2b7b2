/* out = a[c] * x + b[c] + s[c] * g elementwise, with per-channel float32 vectors a, b, s, over float32 maps x, g, out
 * of one layout: contiguous (N, C, L) rows (tta_affine_plus_scaled_f32) or channels-last, i.e. (R, C) rows
 * (tta_affine_plus_scaled_cl_f32).
 *
 * Why: this is the input gradient of core's BatchNorm backward (alpha > 0: the gradient also flows through the
 * mixed batch statistics), one pass per layer per batch. In PyTorch's eager ops it takes two passes (batch_norm's
 * eval kernel for a * x + b, then an in-place addcmul for s * g), which read and write the output map twice; here
 * x and g are read once and out written once. Called by tta/mixed_bn_kernel.py; PyTorch's two passes where the
 * kernels are not built.
 *
 * Threads: OpenMP over rows when built with -fopenmp (PyTorch's libgomp); one thread otherwise.
 */
#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TTA_NO_TARGET_CLONES)
#define TTA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TTA_CLONES
#endif

/* One row: o = av * x + bv + sv * g. */
TTA_CLONES
static void row_pass(const float* restrict x, const float* restrict g, float av, float bv, float sv,
                     float* restrict o, int64_t len) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) o[k] = av * x[k] + bv + sv * g[k];
}

/* One channels-last row: o = a * x + b + s * g, channel by channel. */
TTA_CLONES
static void channel_row_pass(const float* restrict x, const float* restrict g, const float* restrict a,
                             const float* restrict b, const float* restrict s, float* restrict o, int64_t c) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) o[ch] = a[ch] * x[ch] + b[ch] + s[ch] * g[ch];
}

static int64_t rows_per_thread_limit(int64_t threads, int64_t rows, int64_t row_length) {
    int64_t elements = rows * row_length;
    int64_t most = elements / 32768 > 0 ? elements / 32768 : 1; /* at least 32768 elements per thread */
    if (threads > most) threads = most;
    if (threads > rows) threads = rows;
    if (threads > 64) threads = 64;
    return threads < 1 ? 1 : threads;
}

/* Contiguous (N, C, L): row r is channel r % C. */
void tta_affine_plus_scaled_f32(const float* x, const float* g, const float* a, const float* b, const float* s,
                                float* out, int64_t n, int64_t c, int64_t len, int64_t threads) {
    int64_t rows = n * c;
    threads = rows_per_thread_limit(threads, rows, len);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t ch = r % c;
        row_pass(x + r * len, g + r * len, a[ch], b[ch], s[ch], out + r * len, len);
    }
}

/* Channels last, (R, C) with R = N * spatial positions: element (r, ch) at r * C + ch. */
void tta_affine_plus_scaled_cl_f32(const float* x, const float* g, const float* a, const float* b, const float* s,
                                   float* out, int64_t rows, int64_t c, int64_t threads) {
    threads = rows_per_thread_limit(threads, rows, c);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        channel_row_pass(x + r * c, g + r * c, a, b, s, out + r * c, c);
    }
}
