/* normlab's CPU kernels: BatchNorm ("column") and LayerNorm/RMSNorm/GroupNorm/InstanceNorm ("row").
 *
 * Plain C on raw contiguous buffers, built once per machine by normlab/_native.py and called
 * through ctypes. The maths is the same as the tensor-op path in _kernels.py / autograd.py:
 *
 *   statistics   exact two-pass within a block in cache (mean, then sum((x - mean)^2)), blocks
 *                merged pairwise (Chan et al. 1979); accumulated in double;
 *   output       y = (x - mean) * scale + shift       (centre first: exact when |mean| >> std);
 *   backward     dx = (x - mean) * kx + g * kg + k0    (BatchNorm, per-channel coefficients)
 *                dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))   (row norms, per row).
 *
 * Column layout: x is (A, C, B) contiguous, statistics per channel c over a and b.
 * Row layout: x is (R, K) contiguous, statistics per row; the affine parameter of element k of
 * row r is index (r % G) * S + k / L with S = K / L (LayerNorm: G = 1, L = 1; GroupNorm: G = groups,
 * L = spatial size; InstanceNorm: G = C, S = 1, L = spatial size).
 *
 * The kernels themselves are in norm_kernels.inc, written once for an element type T and included
 * here twice: for float (names ending _f32) and double (_f64). Every size may be 0 (an empty
 * batch, an empty spatial axis): the kernels then write the statistics of nothing (mean 0,
 * variance 0) and touch no element. Kernels that allocate scratch memory return NL_OK or
 * NL_ENOMEM (normlab/_native.py raises MemoryError); they never dereference a failed allocation.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#else
#define THREAD_ID 0
#endif

typedef int64_t i64;

#define NL_RUN 128 /* the longest run of values summed in T before the run is added in double */

/* Per-thread scratch: each thread's part starts on its own 64-byte cache line (threads writing to one line
 * would pass it back and forth on every update: false sharing). nl_pad rounds a count of elements of `size`
 * bytes up to whole lines; nl_alloc returns line-aligned memory (zeroed when asked), free() releases it. */
static inline i64 nl_pad(i64 n, size_t size) { return (i64)(((size_t)n * size + 63) / 64 * 64 / size); }

static void *nl_alloc(size_t bytes, int zero) {
    const size_t b = bytes ? (bytes + 63) / 64 * 64 : 64;
    void *p = aligned_alloc(64, b);
    if (p && zero) memset(p, 0, b);
    return p;
}

enum { NL_OK = 0, NL_ENOMEM = 1 };                            /* kernels that allocate */
enum { NL_UPDATED = 1, NL_NONFINITE = 0, NL_OVERFLOW = 2 }; /* ema_update */

#define T float
#define FN(name) name##_f32
#include "norm_kernels.inc"
#undef T
#undef FN

#define T double
#define FN(name) name##_f64
#include "norm_kernels.inc"
#undef T
#undef FN
