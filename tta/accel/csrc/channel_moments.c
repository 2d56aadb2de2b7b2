/* Per-channel mean and biased variance of an (N, C, L) tensor in ONE pass over memory, for float32 and bfloat16
 * elements, in the contiguous layout (tta_channel_moments_<type>) and the channels-last layout, i.e. (N * L, C)
 * rows (tta_channel_moments_cl_<type>), <type> = f32 or bf16.
 *
 * Why: test-time BN needs these for every BatchNorm layer of every batch. PyTorch's eager CPU ops need two passes
 * (a sum and a sum of squares, ~1.1 ms each at (200, 16, 32, 32) in float32), and the statistics pass is
 * memory-bound, so one pass halves it. Built and loaded by tta/native_moments.py (plain C, no PyTorch headers);
 * when it cannot be built the library uses the PyTorch ops instead.
 *
 * Threads: built with -fopenmp, the work is split with OpenMP, and the library then binds to the libgomp that
 * PyTorch has already loaded (same soname), so it shares PyTorch's thread pool. Separate pthreads were tried
 * first: PyTorch's idle OpenMP workers spin for a while after each operator and took the cores from them (two
 * threads were no faster than one). Built without OpenMP, the pragmas are ignored and one thread does the work.
 *
 * Precision: elements are widened to float32 (exact for bfloat16), blocks of BLOCK elements of a row (or ROW_BLOCK
 * rows, channels last) are summed in float32 (vectorised), blocks are accumulated in double, and the mean and
 * variance are formed in double: the variance's relative error is about 1e-6 * (1 + mean^2 / var) at most
 * (float32 rounding of the sum of squares, magnified by the cancellation; summing in double throughout was 1.6x
 * slower at (200, 16, 32, 32)). A channel whose squared mean exceeds `limit` times its variance (where
 * E[x^2] - E[x]^2 loses digits) or whose sums are not finite makes the call return 1: the caller then uses
 * batch_norm's Welford kernel for the layer. Returns 0 when every channel is well conditioned, -1 when out of
 * memory (the caller then uses PyTorch's ops).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define BLOCK 128
#define ROW_BLOCK 64

static inline float load_f32(const float* p, int64_t k) { return p[k]; }

/* bfloat16 is the top half of a float32: widening is a 16-bit shift. */
static inline float load_bf16(const uint16_t* p, int64_t k) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)p[k] << 16;
    return v.f;
}

static int finish(double s, double q, double count, double limit, float* mean, float* var) {
    double m = s / count;
    double v = q / count - m * m;
    if (v < 0.0) v = 0.0;
    *mean = (float)m;
    *var = (float)v;
    return !isfinite(s) || !isfinite(q) || m * m > limit * v;
}

typedef struct {
    const void* x;
    int64_t n, c, len, c0, c1;
    double limit;
    float *mean, *var;
    int ill_conditioned;
} Work;

typedef struct {
    const void* x;
    int64_t c, r0, r1;
    double *sum, *sumsq; /* c doubles each, owned by the caller */
} RowWork;

#define ELEMENT float
#define LOAD load_f32
#define NAME(base) base##_f32
#include "channel_moments_impl.h"
#undef ELEMENT
#undef LOAD
#undef NAME

#define ELEMENT uint16_t
#define LOAD load_bf16
#define NAME(base) base##_bf16
#include "channel_moments_impl.h"
