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

#include "common.h"

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

/* Contiguous (N, C, L): row r is channel r % C. */
void tta_affine_plus_scaled_f32(const float* x, const float* g, const float* a, const float* b, const float* s,
                                float* out, int64_t n, int64_t c, int64_t len, int64_t threads) {
    int64_t rows = n * c;
    threads = tta_thread_count(threads, rows, rows * len, 32768); /* at least 32768 elements per thread */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t ch = r % c;
        row_pass(x + r * len, g + r * len, a[ch], b[ch], s[ch], out + r * len, len);
    }
}

/* Channels last, (R, C) with R = N * spatial positions: element (r, ch) at r * C + ch. */
void tta_affine_plus_scaled_cl_f32(const float* x, const float* g, const float* a, const float* b, const float* s,
                                   float* out, int64_t rows, int64_t c, int64_t threads) {
    threads = tta_thread_count(threads, rows, rows * c, 32768);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        channel_row_pass(x + r * c, g + r * c, a, b, s, out + r * c, c);
    }
}
