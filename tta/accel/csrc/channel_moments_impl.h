/* The kernels of channel_moments.c for one element type, included once per type with ELEMENT (the C type),
 * LOAD (reads element k of a row as float) and NAME(base) (appends the type's suffix) defined. */

/* One sample's rows of channels [c0, c1) (contiguous in memory), added to acc[0..width), acc[width..2w). */
TTA_CLONES
static void NAME(sample_sums)(const ELEMENT* restrict rows, int64_t width, int64_t len, double* restrict acc) {
    for (int64_t j = 0; j < width; ++j) {
        const ELEMENT* p = rows + j * len;
        double s = 0.0, q = 0.0;
        for (int64_t k0 = 0; k0 < len; k0 += BLOCK) {
            int64_t k1 = k0 + BLOCK < len ? k0 + BLOCK : len;
            float fs = 0.0f, fq = 0.0f;
#pragma omp simd reduction(+ : fs, fq)
            for (int64_t k = k0; k < k1; ++k) {
                float v = LOAD(p, k);
                fs += v;
                fq += v * v;
            }
            s += fs;
            q += fq;
        }
        acc[j] += s;
        acc[width + j] += q;
    }
}

/* A thread's channels [c0, c1), sample by sample so that memory is read in order (channel by channel, a map
 * of 64 positions would be 64 elements read every 16 KB, which defeats the prefetcher). */
static void NAME(channel_range)(Work* w) {
    const ELEMENT* x = (const ELEMENT*)w->x;
    int64_t width = w->c1 - w->c0;
    double* acc = (double*)calloc(2 * (size_t)(width > 0 ? width : 1), sizeof(double));
    w->ill_conditioned = 0;
    if (!acc) {
        w->ill_conditioned = -1;
        return;
    }
    for (int64_t i = 0; i < w->n; ++i) NAME(sample_sums)(x + (i * w->c + w->c0) * w->len, width, w->len, acc);
    double count = (double)w->n * (double)w->len;
    for (int64_t j = w->c0; j < w->c1; ++j)
        w->ill_conditioned |= finish(acc[j - w->c0], acc[width + j - w->c0], count, w->limit, &w->mean[j],
                                     &w->var[j]);
    free(acc);
}

/* Threads split the channels. */
int NAME(tta_channel_moments)(const ELEMENT* x, int64_t n, int64_t c, int64_t len, int64_t threads, double limit,
                              float* mean, float* var) {
    int ill_conditioned = 0, out_of_memory = 0;
    threads = tta_thread_count(threads, c, c, 1);
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : ill_conditioned, out_of_memory)
    for (int64_t t = 0; t < threads; ++t) {
        Work w = {x, n, c, len, c * t / threads, c * (t + 1) / threads, limit, mean, var, 0};
        NAME(channel_range)(&w);
        if (w.ill_conditioned < 0) out_of_memory = 1;
        else ill_conditioned |= w.ill_conditioned;
    }
    return out_of_memory ? -1 : ill_conditioned;
}

/* Channels last: rows r0..r1 (at most ROW_BLOCK) of C contiguous channels, summed in float32 and added to the
 * per-channel double sums. 16 channels at a time, in local accumulators the compiler keeps in registers (arrays
 * of runtime length would be loaded and stored again for every row). */
TTA_CLONES
static void NAME(add_rows)(const ELEMENT* restrict x, int64_t c, int64_t r0, int64_t r1, double* restrict sum,
                           double* restrict sumsq) {
    int64_t j0 = 0;
    for (; j0 + 16 <= c; j0 += 16) {
        float s[16] = {0.0f}, q[16] = {0.0f};
        for (int64_t r = r0; r < r1; ++r) {
            const ELEMENT* p = x + r * c + j0;
#pragma omp simd
            for (int64_t j = 0; j < 16; ++j) {
                float v = LOAD(p, j);
                s[j] += v;
                q[j] += v * v;
            }
        }
        for (int64_t j = 0; j < 16; ++j) {
            sum[j0 + j] += s[j];
            sumsq[j0 + j] += q[j];
        }
    }
    for (int64_t j = j0; j < c; ++j) { /* the remaining channels (fewer than 16) */
        float s = 0.0f, q = 0.0f;
        for (int64_t r = r0; r < r1; ++r) {
            float v = LOAD(x + r * c, j);
            s += v;
            q += v * v;
        }
        sum[j] += s;
        sumsq[j] += q;
    }
}

/* A thread's rows, in blocks of ROW_BLOCK. */
static void NAME(row_range)(RowWork* w) {
    for (int64_t j = 0; j < w->c; ++j) {
        w->sum[j] = 0.0;
        w->sumsq[j] = 0.0;
    }
    for (int64_t b0 = w->r0; b0 < w->r1; b0 += ROW_BLOCK) {
        int64_t b1 = b0 + ROW_BLOCK < w->r1 ? b0 + ROW_BLOCK : w->r1;
        NAME(add_rows)((const ELEMENT*)w->x, w->c, b0, b1, w->sum, w->sumsq);
    }
}

/* Threads split the rows, each into its own accumulators; the calling thread adds them up. */
int NAME(tta_channel_moments_cl)(const ELEMENT* x, int64_t rows, int64_t c, int64_t threads, double limit,
                                 float* mean, float* var) {
    RowWork work[MAX_THREADS];
    threads = tta_thread_count(threads, rows, rows, 1);
    /* Each thread's sums start on their own cache lines (64 bytes): two threads writing one line (false sharing)
     * made two threads 3x slower than one. */
    int64_t stride = (c + 7) / 8 * 8;
    double* acc = (double*)aligned_alloc(64, sizeof(double) * 2 * stride * threads);
    if (!acc) return -1;
    for (int64_t t = 0; t < threads; ++t) {
        RowWork w = {x, c, rows * t / threads, rows * (t + 1) / threads, acc + 2 * stride * t,
                     acc + 2 * stride * t + stride};
        work[t] = w;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t t = 0; t < threads; ++t) NAME(row_range)(&work[t]);
    int ill_conditioned = 0;
    for (int64_t j = 0; j < c; ++j) {
        double s = 0.0, q = 0.0;
        for (int64_t t = 0; t < threads; ++t) {
            s += work[t].sum[j];
            q += work[t].sumsq[j];
        }
        ill_conditioned |= finish(s, q, (double)rows, limit, &mean[j], &var[j]);
    }
    free(acc);
    return ill_conditioned;
}
