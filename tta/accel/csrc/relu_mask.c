/* ReLU that records where it passes its input as one BIT per element, and the backward that reads those bits
 * (float32, any dense layout: the elements are taken in memory order).
 *
 * Why: to pass a gradient, a ReLU needs only where its output is not <= 0, but autograd saves the whole float
 * output, 32 bits per element; in a ResNet adapted by tent that is one activation map per convolution, about
 * half of the saved bytes (ResNet-20, batch 200: 288 MB saved, 148 MB with these bits). One bit per element is
 * 1/32 of it. PyTorch's boolean ops would store 8 bits and are slower than the float ops they replace on CPU
 * (a boolean-masked backward took 6.7-23 ms against 3.1 ms for threshold_backward at (200, 16, 32, 32)), so both
 * directions are written here, as single memory-bound passes.
 *
 * Semantics, matching torch.relu and threshold_backward(grad, out, 0) bit for bit on everything but the sign of a
 * zero output: out = x where !(x <= 0) (x > 0 or NaN), else +0; bit k % 8 of bits[k / 8] is set where element k
 * passed, i.e. !(x <= 0); grad_in = grad where the bit is set, else +0.
 *
 * Threads: OpenMP over byte ranges when built with -fopenmp (PyTorch's libgomp); AVX2 through a separately
 * compiled function chosen at run time on x86-64 (GCC and clang), plain C elsewhere. Maps over STREAM_MIN_BYTES
 * are written with non-temporal stores: no read of the destination's old contents, which takes a memory-bound pass
 * from three map-sizes of traffic to two (at (200, 16, 32, 32), one thread, ReLU and bits in 1.79 ms against 2.38 ms
 * for torch.relu alone: benchmarks/lean_graph.py --kernels).
 */
#include <stdint.h>
#include <string.h>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(TTA_NO_TARGET_CLONES)
#define TTA_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

/* Elements [8 * b0, 8 * b1) and their bytes, in plain C (the tail and non-x86 builds). */
static void relu_bits_plain(const float* x, float* out, uint8_t* bits, int64_t b0, int64_t b1, int64_t n) {
    for (int64_t b = b0; b < b1; ++b) {
        uint8_t byte = 0;
        for (int64_t j = 0; j < 8 && 8 * b + j < n; ++j) {
            float v = x[8 * b + j];
            int pass = !(v <= 0.0f);
            out[8 * b + j] = pass ? v : 0.0f;
            byte |= (uint8_t)(pass << j);
        }
        bits[b] = byte;
    }
}

static void relu_grad_plain(const float* grad, const uint8_t* bits, float* out, int64_t b0, int64_t b1, int64_t n) {
    for (int64_t b = b0; b < b1; ++b) {
        uint8_t byte = bits[b];
        for (int64_t j = 0; j < 8 && 8 * b + j < n; ++j) out[8 * b + j] = (byte >> j) & 1 ? grad[8 * b + j] : 0.0f;
    }
}

#ifdef TTA_HAVE_AVX2_PATH
/* Non-temporal stores (no read of the destination's old contents, no cache pollution) for maps too large for the
 * caches to keep anyway: they cut the memory traffic of the pass from three map-sizes to two. */
#define STREAM_MIN_BYTES (4 << 20)

__attribute__((target("avx2"))) static void relu_bits_avx2(const float* x, float* out, uint8_t* bits, int64_t b0,
                                                            int64_t b1, int stream) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4) { /* 32 elements and one 32-bit store of their bits per iteration */
        uint32_t word = 0;
        for (int k = 0; k < 4; ++k) {
            __m256 v = _mm256_loadu_ps(x + 8 * (b + k));
            __m256 stop = _mm256_cmp_ps(v, zero, _CMP_LE_OQ); /* v <= 0; false for NaN */
            if (stream) _mm256_stream_ps(out + 8 * (b + k), _mm256_andnot_ps(stop, v));
            else _mm256_storeu_ps(out + 8 * (b + k), _mm256_andnot_ps(stop, v));
            word |= (uint32_t)(~_mm256_movemask_ps(stop) & 0xff) << (8 * k);
        }
        memcpy(bits + b, &word, 4); /* little-endian x86: byte k holds elements 8k..8k+7 */
    }
    for (; b < b1; ++b) {
        __m256 v = _mm256_loadu_ps(x + 8 * b);
        __m256 stop = _mm256_cmp_ps(v, zero, _CMP_LE_OQ);
        _mm256_storeu_ps(out + 8 * b, _mm256_andnot_ps(stop, v));
        bits[b] = (uint8_t)(~_mm256_movemask_ps(stop) & 0xff);
    }
    if (stream) _mm_sfence();
}

__attribute__((target("avx2"))) static void relu_grad_avx2(const float* grad, const uint8_t* bits, float* out,
                                                            int64_t b0, int64_t b1, int stream) {
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t b = b0; b < b1; ++b) {
        __m256i byte = _mm256_set1_epi32(bits[b]);
        __m256i pass = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lanes), lanes);
        __m256 masked = _mm256_and_ps(_mm256_castsi256_ps(pass), _mm256_loadu_ps(grad + 8 * b));
        if (stream) _mm256_stream_ps(out + 8 * b, masked);
        else _mm256_storeu_ps(out + 8 * b, masked);
    }
    if (stream) _mm_sfence();
}

static int have_avx2(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}
#endif

/* One pass over elements [0, n), split between threads by byte of bits: the forward (bits written) or the backward
 * (bits read). `input` is x or grad. Streaming stores need 32-byte aligned destinations: every thread starts a
 * multiple of 32 bytes after `out`, so `out` itself must be aligned; the backward in place (out == grad) keeps
 * ordinary stores. */
static void relu_pass(int backward, const float* input, float* out, uint8_t* bits, int64_t n, int64_t threads) {
    int64_t bytes = (n + 7) / 8, full = n / 8;
    threads = tta_thread_count(threads, bytes, n, 32768); /* at least 32768 elements per thread */
#ifdef TTA_HAVE_AVX2_PATH
    int avx2 = have_avx2();
    int stream = n * 4 >= STREAM_MIN_BYTES && ((uintptr_t)out % 32) == 0 && !(backward && out == input);
#endif
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) {
        int64_t b0 = bytes * t / threads, b1 = bytes * (t + 1) / threads;
        int64_t vector_end = b1 < full ? b1 : full;
#ifdef TTA_HAVE_AVX2_PATH
        if (avx2 && b0 < vector_end) {
            if (backward) relu_grad_avx2(input, bits, out, b0, vector_end, stream);
            else relu_bits_avx2(input, out, bits, b0, vector_end, stream);
            b0 = vector_end;
        }
#endif
        if (backward) relu_grad_plain(input, bits, out, b0, b1, n);
        else relu_bits_plain(input, out, bits, b0, b1, n);
    }
}

/* out = relu(x) (out may be x: in place) and bits[0 .. ceil(n / 8)) = where x passed. */
void tta_relu_bits_f32(const float* x, float* out, uint8_t* bits, int64_t n, int64_t threads) {
    relu_pass(0, x, out, bits, n, threads);
}

/* out = grad where the bit is set, else 0 (out must not alias grad's other elements; out == grad is fine). */
void tta_relu_grad_f32(const float* grad, const uint8_t* bits, float* out, int64_t n, int64_t threads) {
    relu_pass(1, grad, out, (uint8_t*)bits, n, threads);
}
