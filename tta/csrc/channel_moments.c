/* Per-channel mean and biased variance of a contiguous float32 (N, C, L) tensor in ONE pass over memory.
 *
 * Why: test-time BN needs these for every BatchNorm layer of every batch. PyTorch's eager CPU ops need two passes
 * (a sum and a sum of squares, ~1.1 ms each at (200, 16, 32, 32)), and the statistics pass is memory-bound, so one
 * pass halves it. Built and loaded by tta/native_moments.py (plain C, no PyTorch headers); when it cannot be built
 * the library uses the PyTorch ops instead.
 *
 * Precision: blocks of 512 elements are summed in float32 (vectorised), blocks are accumulated in double, and the
 * mean and variance are formed in double. A channel whose squared mean exceeds `limit` times its variance (where
 * E[x^2] - E[x]^2 loses digits) or whose sums are not finite makes the call return 1: the caller then uses
 * batch_norm's Welford kernel for the layer. Returns 0 when every channel is well conditioned.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define BLOCK 512

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TTA_NO_TARGET_CLONES)
#define TTA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TTA_CLONES
#endif

TTA_CLONES
static void row_sums(const float* p, int64_t len, double* sum, double* sumsq) {
    double s = 0.0, q = 0.0;
    for (int64_t k0 = 0; k0 < len; k0 += BLOCK) {
        int64_t k1 = k0 + BLOCK < len ? k0 + BLOCK : len;
        float fs = 0.0f, fq = 0.0f;
#pragma omp simd reduction(+ : fs, fq)
        for (int64_t k = k0; k < k1; ++k) {
            float v = p[k];
            fs += v;
            fq += v * v;
        }
        s += fs;
        q += fq;
    }
    *sum += s;
    *sumsq += q;
}

typedef struct {
    const float* x;
    int64_t n, c, len, c0, c1;
    double limit;
    float *mean, *var;
    int ill_conditioned;
} Work;

static void* channel_range(void* arg) {
    Work* w = (Work*)arg;
    double count = (double)w->n * (double)w->len;
    w->ill_conditioned = 0;
    for (int64_t j = w->c0; j < w->c1; ++j) {
        double s = 0.0, q = 0.0;
        for (int64_t i = 0; i < w->n; ++i) row_sums(w->x + (i * w->c + j) * w->len, w->len, &s, &q);
        double m = s / count;
        double v = q / count - m * m;
        if (v < 0.0) v = 0.0;
        if (!isfinite(s) || !isfinite(q) || m * m > w->limit * v) w->ill_conditioned = 1;
        w->mean[j] = (float)m;
        w->var[j] = (float)v;
    }
    return 0;
}

#define MAX_THREADS 64

int tta_channel_moments_f32(const float* x, int64_t n, int64_t c, int64_t len, int64_t threads, double limit,
                            float* mean, float* var) {
    Work work[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > c) threads = c;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int64_t t = 0; t < threads; ++t) {
        Work w = {x, n, c, len, c * t / threads, c * (t + 1) / threads, limit, mean, var, 0};
        work[t] = w;
    }
    for (int64_t t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], 0, channel_range, &work[t]) == 0;
    channel_range(&work[0]);
    int ill_conditioned = work[0].ill_conditioned;
    for (int64_t t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], 0);
        else channel_range(&work[t]); /* thread creation failed: do its channels here */
        ill_conditioned |= work[t].ill_conditioned;
    }
    return ill_conditioned;
}
