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
 * Every function is generated for float (f32) and double (f64).
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

#define DEFINE_KERNELS(T, SFX)                                                                          \
                                                                                                        \
/* per-channel mean and biased variance of x (A, C, B), one sweep over memory: each block (a row of B,   \
 * or a block of rows when B == 1) is reduced exactly in cache by two passes, and blocks are merged     \
 * with Chan et al.'s pairwise update (n, mean, M2), so the result is as accurate as the two-pass     \
 * formula over the whole tensor. */                                                                   \
void col_stats_##SFX(const T *x, i64 A, i64 C, i64 B, double *mean, double *var, int nt) {              \
    double *part = calloc((size_t)nt * 3 * C, sizeof(double)); /* per thread: n, mean, M2 */           \
    const i64 rpb = C >= 32768 ? 1 : 32768 / C, rows_per_block = B == 1 ? (rpb > 256 ? 256 : rpb) : 1; \
    const i64 nblocks = B == 1 ? (A + rows_per_block - 1) / rows_per_block : A * C;                     \
    _Pragma("omp parallel num_threads(nt)")                                                             \
    {                                                                                                   \
        double *pn = part + (i64)THREAD_ID * 3 * C, *pm = pn + C, *pq = pm + C;                         \
        /* B == 1: a block's sums are short (<= 256 rows), so they run in T (a full SIMD width), and      \
         * the blocks are merged in double */                                                           \
        T *bs = B == 1 ? malloc(sizeof(T) * 2 * C) : NULL, *bq = bs ? bs + C : NULL;                    \
        _Pragma("omp for schedule(static)")                                                             \
        for (i64 blk = 0; blk < nblocks; ++blk) {                                                       \
            if (B == 1) {                                                                               \
                const i64 a0 = blk * rows_per_block;                                                    \
                const i64 a1 = a0 + rows_per_block < A ? a0 + rows_per_block : A;                       \
                const double nb = (double)(a1 - a0);                                                    \
                const T inv_nb = (T)(1.0 / nb);                                                         \
                memset(bs, 0, sizeof(T) * 2 * C);                                                       \
                for (i64 a = a0; a < a1; ++a) {                                                         \
                    const T *xa = x + a * C;                                                            \
                    _Pragma("omp simd")                                                                 \
                    for (i64 c = 0; c < C; ++c) bs[c] += xa[c];                                         \
                }                                                                                       \
                _Pragma("omp simd")                                                                     \
                for (i64 c = 0; c < C; ++c) bs[c] *= inv_nb;                                            \
                for (i64 a = a0; a < a1; ++a) {                                                         \
                    const T *xa = x + a * C;                                                            \
                    _Pragma("omp simd")                                                                 \
                    for (i64 c = 0; c < C; ++c) { const T d = xa[c] - bs[c]; bq[c] += d * d; }          \
                }                                                                                       \
                for (i64 c = 0; c < C; ++c) {                                                           \
                    const double n = pn[c] + nb, delta = (double)bs[c] - pm[c];                         \
                    pq[c] += (double)bq[c] + delta * delta * pn[c] * nb / n;                            \
                    pm[c] += delta * nb / n;                                                            \
                    pn[c] = n;                                                                          \
                }                                                                                       \
            } else {                                                                                    \
                const T *xr = x + blk * B;                                                              \
                const i64 c = blk % C;                                                                  \
                double s = 0.0, q = 0.0;                                                                \
                _Pragma("omp simd reduction(+:s)")                                                      \
                for (i64 b = 0; b < B; ++b) s += (double)xr[b];                                         \
                const double m = s / (double)B;                                                         \
                _Pragma("omp simd reduction(+:q)")                                                      \
                for (i64 b = 0; b < B; ++b) { double d = (double)xr[b] - m; q += d * d; }               \
                const double nb = (double)B, n = pn[c] + nb, delta = m - pm[c];                         \
                pq[c] += q + delta * delta * pn[c] * nb / n;                                            \
                pm[c] += delta * nb / n;                                                                \
                pn[c] = n;                                                                              \
            }                                                                                           \
        }                                                                                               \
        free(bs);                                                                                       \
    }                                                                                                   \
    for (i64 c = 0; c < C; ++c) {                                                                       \
        double n = 0.0, m = 0.0, q = 0.0;                                                               \
        for (int t = 0; t < nt; ++t) {                                                                  \
            const double *p = part + (i64)t * 3 * C;                                                    \
            const double nb = p[c];                                                                     \
            if (nb == 0.0) continue;                                                                    \
            const double n2 = n + nb, delta = p[C + c] - m;                                             \
            q += p[2 * C + c] + delta * delta * n * nb / n2;                                            \
            m += delta * nb / n2;                                                                       \
            n = n2;                                                                                     \
        }                                                                                               \
        mean[c] = m;                                                                                    \
        var[c] = n > 0.0 ? q / n : 0.0;                                                                 \
    }                                                                                                   \
    free(part);                                                                                         \
}                                                                                                       \
                                                                                                        \
/* sum(g) and sum(g * (x - mean)) per channel of (A, C, B) */                                           \
void col_bwd_sums_##SFX(const T *g, const T *x, i64 A, i64 C, i64 B, const double *mean,               \
                        double *sum_g, double *sum_gc, int nt) {                                        \
    double *part = calloc((size_t)nt * 2 * C, sizeof(double));                                         \
    _Pragma("omp parallel num_threads(nt)")                                                             \
    {                                                                                                   \
        double *ag = part + (i64)THREAD_ID * 2 * C, *agc = ag + C;                                      \
        if (B == 1) {                                                                                   \
            _Pragma("omp for schedule(static)")                                                         \
            for (i64 a = 0; a < A; ++a) {                                                               \
                const T *xa = x + a * C, *ga = g + a * C;                                               \
                _Pragma("omp simd")                                                                     \
                for (i64 c = 0; c < C; ++c) {                                                           \
                    double gv = (double)ga[c];                                                          \
                    ag[c] += gv;                                                                        \
                    agc[c] += gv * ((double)xa[c] - mean[c]);                                           \
                }                                                                                       \
            }                                                                                           \
        } else {                                                                                        \
            _Pragma("omp for schedule(static)")                                                         \
            for (i64 r = 0; r < A * C; ++r) {                                                           \
                const T *xr = x + r * B, *gr = g + r * B;                                               \
                const i64 c = r % C;                                                                    \
                const double m = mean[c];                                                               \
                double s = 0.0, sc = 0.0;                                                               \
                _Pragma("omp simd reduction(+:s,sc)")                                                   \
                for (i64 b = 0; b < B; ++b) {                                                           \
                    double gv = (double)gr[b];                                                          \
                    s += gv;                                                                            \
                    sc += gv * ((double)xr[b] - m);                                                     \
                }                                                                                       \
                ag[c] += s;                                                                             \
                agc[c] += sc;                                                                           \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    for (i64 c = 0; c < C; ++c) {                                                                       \
        double s = 0.0, sc = 0.0;                                                                       \
        for (int t = 0; t < nt; ++t) { s += part[(i64)t * 2 * C + c]; sc += part[(i64)t * 2 * C + C + c]; } \
        sum_g[c] = s;                                                                                   \
        sum_gc[c] = sc;                                                                                 \
    }                                                                                                   \
    free(part);                                                                                         \
}                                                                                                       \
                                                                                                        \
/* out = (x - centre[c]) * kx[c] + shift[c]  (+ g * kg[c] when g is given), all (A, C, B) */            \
void col_affine_##SFX(const T *x, const T *g, T *out, i64 A, i64 C, i64 B, const T *centre,             \
                      const T *kx, const T *kg, const T *shift, int nt) {                               \
    if (B == 1) {                                                                                       \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                                    \
        for (i64 a = 0; a < A; ++a) {                                                                   \
            const T *xa = x + a * C;                                                                    \
            T *oa = out + a * C;                                                                        \
            if (g) {                                                                                    \
                const T *ga = g + a * C;                                                                \
                _Pragma("omp simd")                                                                     \
                for (i64 c = 0; c < C; ++c) oa[c] = (xa[c] - centre[c]) * kx[c] + ga[c] * kg[c] + shift[c]; \
            } else {                                                                                    \
                _Pragma("omp simd")                                                                     \
                for (i64 c = 0; c < C; ++c) oa[c] = (xa[c] - centre[c]) * kx[c] + shift[c];             \
            }                                                                                           \
        }                                                                                               \
    } else {                                                                                            \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                                    \
        for (i64 r = 0; r < A * C; ++r) {                                                               \
            const i64 c = r % C;                                                                        \
            const T m = centre[c], k = kx[c], s = shift[c];                                             \
            const T *xr = x + r * B;                                                                    \
            T *orow = out + r * B;                                                                      \
            if (g) {                                                                                    \
                const T *gr = g + r * B;                                                                \
                const T kk = kg[c];                                                                     \
                _Pragma("omp simd")                                                                     \
                for (i64 b = 0; b < B; ++b) orow[b] = (xr[b] - m) * k + gr[b] * kk + s;                 \
            } else {                                                                                    \
                _Pragma("omp simd")                                                                     \
                for (i64 b = 0; b < B; ++b) orow[b] = (xr[b] - m) * k + s;                              \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* BatchNorm forward in one call: statistics, then y = (x - mean) * invstd * w + b */                   \
void col_forward_##SFX(const T *x, T *y, i64 A, i64 C, i64 B, const T *w, const T *bias, double eps,     \
                       T *mean, T *var, T *invstd, int nt) {                                            \
    double *m = malloc(sizeof(double) * 2 * C), *v = m + C;                                             \
    T *co = malloc(sizeof(T) * 2 * C), *kx = co, *sh = co + C;                                          \
    col_stats_##SFX(x, A, C, B, m, v, nt);                                                              \
    for (i64 c = 0; c < C; ++c) {                                                                       \
        const double inv = 1.0 / sqrt(v[c] + eps);                                                      \
        mean[c] = (T)m[c];                                                                              \
        var[c] = (T)v[c];                                                                               \
        invstd[c] = (T)inv;                                                                             \
        kx[c] = (T)(w ? inv * (double)w[c] : inv);                                                      \
        sh[c] = bias ? bias[c] : (T)0;                                                                  \
    }                                                                                                   \
    col_affine_##SFX(x, NULL, y, A, C, B, mean, kx, NULL, sh, nt);                                      \
    free(m);                                                                                            \
    free(co);                                                                                           \
}                                                                                                       \
                                                                                                        \
/* BatchNorm backward in one call: dx = a (g - mean(g) - xhat mean(g xhat)), dw = sum(g xhat), db = sum(g) */ \
void col_backward_##SFX(const T *g, const T *x, T *dx, i64 A, i64 C, i64 B, const T *mean,              \
                        const T *invstd, const T *w, T *dw, T *db, int nt) {                            \
    double *md = malloc(sizeof(double) * 3 * C), *sg = md + C, *sgc = md + 2 * C;                       \
    T *co = malloc(sizeof(T) * 3 * C), *kx = co, *kg = co + C, *sh = co + 2 * C;                        \
    for (i64 c = 0; c < C; ++c) md[c] = (double)mean[c];                                                \
    col_bwd_sums_##SFX(g, x, A, C, B, md, sg, sgc, nt);                                                 \
    const double n = (double)A * (double)B;                                                             \
    for (i64 c = 0; c < C; ++c) {                                                                       \
        const double inv = (double)invstd[c], a = w ? inv * (double)w[c] : inv;                         \
        const double k = sgc[c] * inv * inv / n;                                                        \
        kx[c] = (T)(-a * k);                                                                            \
        kg[c] = (T)a;                                                                                   \
        sh[c] = (T)(-a * sg[c] / n);                                                                    \
        if (dw) dw[c] = (T)(sgc[c] * inv);                                                              \
        if (db) db[c] = (T)sg[c];                                                                       \
    }                                                                                                   \
    if (dx) col_affine_##SFX(x, g, dx, A, C, B, mean, kx, kg, sh, nt);                                  \
    free(md);                                                                                           \
    free(co);                                                                                           \
}                                                                                                       \
                                                                                                        \
/* running = (1 - w) * running + w * batch (var scaled by var_scale first); nothing changes and 0 is      \
 * returned when any batch statistic is not finite */                                                  \
int ema_update_##SFX(T *rm, T *rv, const T *mean, const T *var, i64 C, double w, double var_scale) {     \
    for (i64 c = 0; c < C; ++c)                                                                         \
        if (!isfinite((double)mean[c]) || !isfinite((double)var[c])) return 0;                          \
    for (i64 c = 0; c < C; ++c) {                                                                       \
        if (rm) rm[c] = (T)((1.0 - w) * (double)rm[c] + w * (double)mean[c]);                           \
        if (rv) rv[c] = (T)((1.0 - w) * (double)rv[c] + w * (double)var[c] * var_scale);                \
    }                                                                                                   \
    return 1;                                                                                           \
}                                                                                                       \
                                                                                                        \
/* row forward: y, mean[R] (0 if !centered), var[R] (mean square if !centered) */                       \
void row_fwd_##SFX(const T *x, T *y, i64 R, i64 K, i64 G, i64 L, const T *w, const T *bias,            \
                   double eps, int centered, T *mean, T *var, T *rstd, int nt) {                        \
    const i64 S = K / L;                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                        \
    for (i64 r = 0; r < R; ++r) {                                                                       \
        const T *xr = x + r * K;                                                                        \
        T *yr = y + r * K;                                                                              \
        double m = 0.0, v = 0.0;                                                                        \
        if (centered) {                                                                                 \
            _Pragma("omp simd reduction(+:m)")                                                          \
            for (i64 k = 0; k < K; ++k) m += (double)xr[k];                                             \
            m /= (double)K;                                                                             \
        }                                                                                               \
        _Pragma("omp simd reduction(+:v)")                                                              \
        for (i64 k = 0; k < K; ++k) { double d = (double)xr[k] - m; v += d * d; }                       \
        v /= (double)K;                                                                                 \
        const T mt = (T)m, rs = (T)(1.0 / sqrt(v + eps));                                               \
        mean[r] = mt;                                                                                   \
        var[r] = (T)v;                                                                                  \
        rstd[r] = rs;                                                                                   \
        if (L == 1) {                                                                                   \
            const T *wr = w ? w + (r % G) * S : NULL, *br = bias ? bias + (r % G) * S : NULL;           \
            if (wr && br) {                                                                             \
                _Pragma("omp simd")                                                                     \
                for (i64 k = 0; k < K; ++k) yr[k] = (xr[k] - mt) * rs * wr[k] + br[k];                  \
            } else if (wr) {                                                                            \
                _Pragma("omp simd")                                                                     \
                for (i64 k = 0; k < K; ++k) yr[k] = (xr[k] - mt) * rs * wr[k];                          \
            } else {                                                                                    \
                _Pragma("omp simd")                                                                     \
                for (i64 k = 0; k < K; ++k) yr[k] = (xr[k] - mt) * rs + (br ? br[k] : (T)0);            \
            }                                                                                           \
        } else {                                                                                        \
            for (i64 s = 0; s < S; ++s) {                                                               \
                const i64 j = (r % G) * S + s;                                                          \
                const T sc = w ? rs * w[j] : rs, sh = bias ? bias[j] : (T)0;                            \
                const T *xs = xr + s * L;                                                               \
                T *ys = yr + s * L;                                                                     \
                _Pragma("omp simd")                                                                     \
                for (i64 l = 0; l < L; ++l) ys[l] = (xs[l] - mt) * sc + sh;                             \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* row backward: dx (if dx), and dw / db (P = G * S parameters) accumulated over rows */               \
void row_bwd_##SFX(const T *g, const T *x, T *dx, i64 R, i64 K, i64 G, i64 L, const T *w,              \
                   const T *mean, const T *rstd, int centered, T *dw, T *db, int nt) {                  \
    const i64 S = K / L, P = G * S;                                                                     \
    double *part = (dw || db) ? calloc((size_t)nt * 2 * P, sizeof(double)) : NULL;                     \
    _Pragma("omp parallel num_threads(nt)")                                                             \
    {                                                                                                   \
        double *pw = part ? part + (i64)THREAD_ID * 2 * P : NULL, *pb = pw ? pw + P : NULL;             \
        _Pragma("omp for schedule(static)")                                                             \
        for (i64 r = 0; r < R; ++r) {                                                                   \
            const T *xr = x + r * K, *gr = g + r * K;                                                   \
            const double m = (double)mean[r], rs = (double)rstd[r];                                     \
            const i64 base = (r % G) * S;                                                               \
            double a1 = 0.0, a2 = 0.0; /* sum(gw), sum(gw * xhat) */                                    \
            if (L == 1) {                                                                               \
                const T *wr = w ? w + base : NULL;                                                      \
                double *pwr = pw ? pw + base : NULL, *pbr = pb ? pb + base : NULL;                      \
                _Pragma("omp simd reduction(+:a1,a2)")                                                  \
                for (i64 k = 0; k < K; ++k) {                                                           \
                    const double gv = (double)gr[k], xh = ((double)xr[k] - m) * rs;                     \
                    const double wk = wr ? (double)wr[k] : 1.0;                                         \
                    a1 += wk * gv;                                                                      \
                    a2 += wk * gv * xh;                                                                 \
                    if (pwr) { pwr[k] += gv * xh; pbr[k] += gv; }                                       \
                }                                                                                       \
            } else {                                                                                    \
                for (i64 s = 0; s < S; ++s) {                                                           \
                    const T *xs = xr + s * L, *gs = gr + s * L;                                         \
                    double sg = 0.0, sgx = 0.0; /* sum(g), sum(g * xhat) over the segment */            \
                    _Pragma("omp simd reduction(+:sg,sgx)")                                             \
                    for (i64 l = 0; l < L; ++l) {                                                       \
                        double gv = (double)gs[l];                                                      \
                        sg += gv;                                                                       \
                        sgx += gv * ((double)xs[l] - m);                                                \
                    }                                                                                   \
                    sgx *= rs;                                                                          \
                    const double wj = w ? (double)w[base + s] : 1.0;                                    \
                    a1 += wj * sg;                                                                      \
                    a2 += wj * sgx;                                                                     \
                    if (pw) { pw[base + s] += sgx; pb[base + s] += sg; }                                \
                }                                                                                       \
            }                                                                                           \
            if (!dx) continue;                                                                          \
            const double kf = 1.0 / (double)K;                                                          \
            const T c1 = centered ? (T)(a1 * kf) : (T)0, c2 = (T)(a2 * kf), rst = (T)rs, mt = (T)m;     \
            T *dr = dx + r * K;                                                                         \
            if (L == 1) {                                                                               \
                const T *wr = w ? w + base : NULL;                                                      \
                _Pragma("omp simd")                                                                     \
                for (i64 k = 0; k < K; ++k) {                                                           \
                    T gw = wr ? gr[k] * wr[k] : gr[k];                                                  \
                    dr[k] = rst * (gw - c1 - (xr[k] - mt) * rst * c2);                                  \
                }                                                                                       \
            } else {                                                                                    \
                for (i64 s = 0; s < S; ++s) {                                                           \
                    const T wj = w ? w[base + s] : (T)1;                                                \
                    const T *xs = xr + s * L, *gs = gr + s * L;                                         \
                    T *ds = dr + s * L;                                                                 \
                    _Pragma("omp simd")                                                                 \
                    for (i64 l = 0; l < L; ++l) ds[l] = rst * (gs[l] * wj - c1 - (xs[l] - mt) * rst * c2); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    if (part) {                                                                                         \
        for (i64 j = 0; j < P; ++j) {                                                                   \
            double sw = 0.0, sb = 0.0;                                                                  \
            for (int t = 0; t < nt; ++t) { sw += part[(i64)t * 2 * P + j]; sb += part[(i64)t * 2 * P + P + j]; } \
            if (dw) dw[j] = (T)sw;                                                                      \
            if (db) db[j] = (T)sb;                                                                      \
        }                                                                                               \
        free(part);                                                                                     \
    }                                                                                                   \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
