/* y = x · Wᵀ (+ bias) for the few rows of a decode step: loramux's native linear kernel (native_linear.py).
 *
 * A decode step's GEMMs are skinny: a few rows against a weight that comes from memory once per step. The
 * general GEMMs (MKL, oneDNN) block for many rows; at 1-16 rows they streamed the bench model's weights at
 * 13-18 GB/s on an Intel Xeon that sums memory at 30 (BENCHMARKS "Session 22"). This kernel reads each weight
 * row once for a block of up to eight input rows, with the block's dot products in registers, and asks for
 * the weight rows a few iterations ahead (software prefetch): on that machine the loads and the FMAs then
 * overlap instead of taking turns, which is where the time went.
 *
 * Threads split the output columns in chunks of CHUNK weight rows; within a chunk the input rows go in
 * blocks of eight, so the chunk's weight rows stay in the L2 cache across blocks. Every output is one
 * fixed-order sum, whatever the thread count: results do not depend on the schedule.
 */
#ifndef __AVX512F__
#error "the native linear kernel needs AVX-512F (this CPU, or -march=native, has none)"
#endif

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define ROWS 8       /* input rows per block: 16 accumulators (two weight rows each) fit the 32 registers */
#define CHUNK 64     /* weight rows per work item */
#define AHEAD 4      /* weight rows prefetched ahead of the pair in use (best of 2, 4, 8, 16 measured) */

static inline __attribute__((always_inline)) void pair_or_one(
    const float *x, int64_t ldx, const int m, const float *w, int64_t k, int64_t n, const int two,
    int64_t n_end, float *y, int64_t ldy, const float *bias) {
    const float *w0 = w + n * k, *w1 = w0 + k;
    const int64_t full = k & ~(int64_t)15, tail = k - full;
    const __mmask16 tail_mask = (__mmask16)((1u << tail) - 1);
    __m512 a0[ROWS], a1[ROWS];
    for (int r = 0; r < m; r++) {
        a0[r] = _mm512_setzero_ps();
        a1[r] = _mm512_setzero_ps();
    }
    const int prefetch = n + AHEAD + 1 < n_end;
    for (int64_t j = 0; j < full; j += 16) {
        const __m512 v0 = _mm512_loadu_ps(w0 + j);
        const __m512 v1 = two ? _mm512_loadu_ps(w1 + j) : v0;
        if (prefetch) {
            _mm_prefetch((const char *)(w0 + AHEAD * k + j), _MM_HINT_T0);
            if (two) _mm_prefetch((const char *)(w1 + AHEAD * k + j), _MM_HINT_T0);
        }
        for (int r = 0; r < m; r++) {
            const __m512 xv = _mm512_loadu_ps(x + r * ldx + j);
            a0[r] = _mm512_fmadd_ps(xv, v0, a0[r]);
            if (two) a1[r] = _mm512_fmadd_ps(xv, v1, a1[r]);
        }
    }
    if (tail) {
        const __m512 v0 = _mm512_maskz_loadu_ps(tail_mask, w0 + full);
        const __m512 v1 = two ? _mm512_maskz_loadu_ps(tail_mask, w1 + full) : v0;
        for (int r = 0; r < m; r++) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail_mask, x + r * ldx + full);
            a0[r] = _mm512_fmadd_ps(xv, v0, a0[r]);
            if (two) a1[r] = _mm512_fmadd_ps(xv, v1, a1[r]);
        }
    }
    const float b0 = bias ? bias[n] : 0.0f, b1 = (bias && two) ? bias[n + 1] : 0.0f;
    for (int r = 0; r < m; r++) {
        y[r * ldy + n] = _mm512_reduce_add_ps(a0[r]) + b0;
        if (two) y[r * ldy + n + 1] = _mm512_reduce_add_ps(a1[r]) + b1;
    }
}

/* one block of m (a constant after inlining) input rows against weight rows [n0, n1) */
static inline __attribute__((always_inline)) void block(
    const float *x, int64_t ldx, const int m, const float *w, int64_t k, int64_t n0, int64_t n1, float *y,
    int64_t ldy, const float *bias) {
    int64_t n = n0;
    for (; n + 1 < n1; n += 2) pair_or_one(x, ldx, m, w, k, n, 1, n1, y, ldy, bias);
    if (n < n1) pair_or_one(x, ldx, m, w, k, n, 0, n1, y, ldy, bias);
}

#define BLOCK(M) block(x + m0 * ldx, ldx, M, w, k, n0, n1, y + m0 * ldy, ldy, bias)

/* x (rows, k) fp32, row stride ldx, unit column stride; w (n, k) contiguous; bias (n,) or NULL; y (rows, n),
 * row stride ldy. Returns 0. */
int skinny_linear(const float *x, int64_t rows, int64_t ldx, const float *w, int64_t n, int64_t k,
                  const float *bias, float *y, int64_t ldy, int threads) {
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t n0 = c * CHUNK, n1 = n0 + CHUNK < n ? n0 + CHUNK : n;
        for (int64_t m0 = 0; m0 < rows; m0 += ROWS) {
            switch (rows - m0 < ROWS ? rows - m0 : ROWS) {
            case 1: BLOCK(1); break;
            case 2: BLOCK(2); break;
            case 3: BLOCK(3); break;
            case 4: BLOCK(4); break;
            case 5: BLOCK(5); break;
            case 6: BLOCK(6); break;
            case 7: BLOCK(7); break;
            default: BLOCK(8); break;
            }
        }
    }
    return 0;
}
