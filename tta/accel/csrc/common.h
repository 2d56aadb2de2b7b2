/* What the kernels of tta/csrc share: the AVX2 clone attribute and how many threads a call uses. */
#ifndef TTA_COMMON_H
#define TTA_COMMON_H

#include <stdint.h>

#define MAX_THREADS 64

/* GCC on x86-64 builds an AVX2 clone of a function beside its generic one and picks at load time; a compiler that
 * rejects the attribute gets -DTTA_NO_TARGET_CLONES (tta/native.py's build variants). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TTA_NO_TARGET_CLONES)
#define TTA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TTA_CLONES
#endif

/* The requested thread count, limited to one thread per work item (`items`), at least `min_elements` of the call's
 * `elements` per thread, and MAX_THREADS; at least 1. */
static inline int64_t tta_thread_count(int64_t requested, int64_t items, int64_t elements, int64_t min_elements) {
    int64_t most = elements / min_elements;
    if (most > items) most = items;
    if (most > MAX_THREADS) most = MAX_THREADS;
    if (requested > most) requested = most;
    return requested < 1 ? 1 : requested;
}

#endif
