/* Per-channel mean and biased variance of a float32 (N, C, L) tensor in ONE pass over memory, for the contiguous
 * layout (tta_channel_moments_f32) and the channels-last layout, i.e. (N * L, C) rows (tta_channel_moments_cl_f32).
 *
 * Why: test-time BN needs these for every BatchNorm layer of every batch. PyTorch's eager CPU ops need two passes
 * (a sum and a sum of squares, ~1.1 ms each at (200, 16, 32, 32)), and the statistics pass is memory-bound, so one
 * pass halves it. Built and loaded by tta/native_moments.py (plain C, no PyTorch headers); when it cannot be built
 * the library uses the PyTorch ops instead.
 *
 * Precision: blocks of 512 elements are summed in float32 (vectorised), blocks are accumulated in double, and the
 * mean and variance are formed in double. A channel whose squared mean exceeds `limit` times its variance (where
 * E[x^2] - E[x]^2 loses digits) or whose sums are not finite makes the call return 1: the caller then uses
 * batch_norm's Welford kernel for the layer. Returns 0 when every channel is well conditioned, -1 when out of
 * memory (the caller then uses PyTorch's ops).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 512

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TTA_NO_TARGET_CLONES)
#define TTA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TTA_CLONES
#endif

static inline void row_sums(const float* restrict p, int64_t len, double* restrict sum, double* restrict sumsq) {
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

static int finish(double s, double q, double count, double limit, float* mean, float* var) {
    double m = s / count;
    double v = q / count - m * m;
    if (v < 0.0) v = 0.0;
    *mean = (float)m;
    *var = (float)v;
    return !isfinite(s) || !isfinite(q) || m * m > limit * v;
}

/* One sample's rows of channels [c0, c1) (contiguous in memory), added to acc[0..width) and acc[width..2 width). */
TTA_CLONES
static void sample_sums(const float* restrict rows, int64_t width, int64_t len, double* restrict acc) {
    for (int64_t j = 0; j < width; ++j) row_sums(rows + j * len, len, &acc[j], &acc[width + j]);
}

/* A thread's channels [c0, c1): sample by sample, so that memory is read in order (channel by channel, a map of
 * 64 positions would be 64 floats read every 16 KB, which defeats the prefetcher). */
static void* channel_range(void* arg) {
    Work* w = (Work*)arg;
    int64_t width = w->c1 - w->c0;
    double* acc = (double*)calloc(2 * (size_t)(width > 0 ? width : 1), sizeof(double));
    w->ill_conditioned = 0;
    if (!acc) {
        w->ill_conditioned = -1;
        return 0;
    }
    for (int64_t i = 0; i < w->n; ++i) sample_sums(w->x + (i * w->c + w->c0) * w->len, width, w->len, acc);
    double count = (double)w->n * (double)w->len;
    for (int64_t j = w->c0; j < w->c1; ++j)
        w->ill_conditioned |= finish(acc[j - w->c0], acc[width + j - w->c0], count, w->limit, &w->mean[j],
                                     &w->var[j]);
    free(acc);
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
    int ill_conditioned = 0, out_of_memory = 0;
    for (int64_t t = 0; t < threads; ++t) {
        if (t > 0 && started[t]) pthread_join(ids[t], 0);
        else if (t > 0) channel_range(&work[t]); /* thread creation failed: do its channels here */
        if (work[t].ill_conditioned < 0) out_of_memory = 1;
        else ill_conditioned |= work[t].ill_conditioned;
    }
    return out_of_memory ? -1 : ill_conditioned;
}

/* Channels last: rows of C contiguous channels. Each thread sums a range of rows into its own per-channel
 * accumulators (float32 over blocks of ROW_BLOCK rows, then double); the calling thread adds them up. */
#define ROW_BLOCK 128

typedef struct {
    const float* x;
    int64_t c, r0, r1;
    double *sum, *sumsq; /* 2 * c doubles, owned by the caller */
    float *fs, *fq;      /* 2 * c floats of scratch */
} RowWork;

TTA_CLONES
static void add_rows(const float* restrict x, int64_t c, int64_t r0, int64_t r1, float* restrict fs,
                     float* restrict fq) {
    for (int64_t j = 0; j < c; ++j) { fs[j] = 0.0f; fq[j] = 0.0f; }
    for (int64_t r = r0; r < r1; ++r) {
        const float* p = x + r * c;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) {
            float v = p[j];
            fs[j] += v;
            fq[j] += v * v;
        }
    }
}

static void* row_range(void* arg) {
    RowWork* w = (RowWork*)arg;
    for (int64_t j = 0; j < w->c; ++j) { w->sum[j] = 0.0; w->sumsq[j] = 0.0; }
    for (int64_t b0 = w->r0; b0 < w->r1; b0 += ROW_BLOCK) {
        int64_t b1 = b0 + ROW_BLOCK < w->r1 ? b0 + ROW_BLOCK : w->r1;
        add_rows(w->x, w->c, b0, b1, w->fs, w->fq);
        for (int64_t j = 0; j < w->c; ++j) { w->sum[j] += w->fs[j]; w->sumsq[j] += w->fq[j]; }
    }
    return 0;
}

/* Returns 0 (well conditioned), 1 (some channel ill conditioned or not finite), or -1 (out of memory). */
int tta_channel_moments_cl_f32(const float* x, int64_t rows, int64_t c, int64_t threads, double limit,
                               float* mean, float* var) {
    RowWork work[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    if (threads > rows) threads = rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    double* acc = (double*)malloc(sizeof(double) * 2 * c * threads);
    float* scratch = (float*)malloc(sizeof(float) * 2 * c * threads);
    if (!acc || !scratch) {
        free(acc);
        free(scratch);
        return -1;
    }
    for (int64_t t = 0; t < threads; ++t) {
        RowWork w = {x, c, rows * t / threads, rows * (t + 1) / threads, acc + 2 * c * t, acc + 2 * c * t + c,
                     scratch + 2 * c * t, scratch + 2 * c * t + c};
        work[t] = w;
    }
    for (int64_t t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], 0, row_range, &work[t]) == 0;
    row_range(&work[0]);
    for (int64_t t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], 0);
        else row_range(&work[t]);
    }
    int ill_conditioned = 0;
    for (int64_t j = 0; j < c; ++j) {
        double s = 0.0, q = 0.0;
        for (int64_t t = 0; t < threads; ++t) { s += work[t].sum[j]; q += work[t].sumsq[j]; }
        ill_conditioned |= finish(s, q, (double)rows, limit, &mean[j], &var[j]);
    }
    free(acc);
    free(scratch);
    return ill_conditioned;
}
