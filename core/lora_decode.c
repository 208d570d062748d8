/* Per-row LoRA for a decode step, in one pass per row (core/lora_kernels.py compiles this file on the machine
 * that runs it, with -O3 -march=native -fopenmp, and loads it with ctypes).
 *
 *   out[n, :] += (x[n, :] @ At[n]) @ Bt[n]        for n < rows
 *
 * x (rows, in), At (rows, in, r), Bt (rows, r, out), out (rows, out): fp32, contiguous. Bt already carries the
 * row's scaling. This is what core/routing.py's GatheredLinear does with bmm + baddbmm_, fused: each row's A
 * and B are read once, straight through, and the rank-r intermediate stays in registers. On this project's
 * 2-core machine that streams the adapters about 1.6x faster than the two bmm calls between the base model's
 * weights (BENCHMARKS.md). Sums run in a different order than bmm's: results agree to fp32 rounding.
 */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Any rank: four partial sums over `in` (independent FMA chains), then B row by row so out stays in L1. */
static void row_any_rank(const float *restrict x, const float *restrict A, const float *restrict B,
                         float *restrict out, int64_t in, int64_t r, int64_t outdim) {
    float h0[r], h1[r], h2[r], h3[r];
    for (int64_t k = 0; k < r; k++) h0[k] = h1[k] = h2[k] = h3[k] = 0.0f;
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        const float *a0 = A + i * r, *a1 = a0 + r, *a2 = a1 + r, *a3 = a2 + r;
        for (int64_t k = 0; k < r; k++) {
            h0[k] += x[i] * a0[k];
            h1[k] += x[i + 1] * a1[k];
            h2[k] += x[i + 2] * a2[k];
            h3[k] += x[i + 3] * a3[k];
        }
    }
    for (; i < in; i++)
        for (int64_t k = 0; k < r; k++) h0[k] += x[i] * A[i * r + k];
    for (int64_t k = 0; k < r; k++) {
        const float hk = (h0[k] + h1[k]) + (h2[k] + h3[k]);
        const float *restrict b = B + k * outdim;
        for (int64_t j = 0; j < outdim; j++) out[j] += hk * b[j];
    }
}

#if defined(__AVX512F__)
#define PREFETCH_AHEAD 1024 /* floats: 4 KB ahead of the loads, so DRAM latency hides behind the FMAs */

/* Rank 16, the common case: one row of A is exactly one 16-float register. */
static void row_rank16(const float *restrict x, const float *restrict A, const float *restrict B,
                       float *restrict out, int64_t in, int64_t outdim) {
    __m512 h0 = _mm512_setzero_ps(), h1 = _mm512_setzero_ps(), h2 = _mm512_setzero_ps(), h3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        const float *a = A + i * 16;
        for (int line = 0; line < 64; line += 16) _mm_prefetch((const char *)(a + PREFETCH_AHEAD + line), _MM_HINT_T0);
        h0 = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(a), h0);
        h1 = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 1]), _mm512_loadu_ps(a + 16), h1);
        h2 = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 2]), _mm512_loadu_ps(a + 32), h2);
        h3 = _mm512_fmadd_ps(_mm512_set1_ps(x[i + 3]), _mm512_loadu_ps(a + 48), h3);
    }
    for (; i < in; i++) h0 = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(A + i * 16), h0);
    float h[16];
    _mm512_storeu_ps(h, _mm512_add_ps(_mm512_add_ps(h0, h1), _mm512_add_ps(h2, h3)));
    /* out[j] += sum_k h[k] * B[k, j], 64 columns at a time held in registers */
    int64_t j = 0;
    for (; j + 64 <= outdim; j += 64) {
        __m512 o0 = _mm512_loadu_ps(out + j), o1 = _mm512_loadu_ps(out + j + 16);
        __m512 o2 = _mm512_loadu_ps(out + j + 32), o3 = _mm512_loadu_ps(out + j + 48);
        for (int k = 0; k < 16; k++) {
            const float *b = B + k * outdim + j;
            for (int line = 0; line < 64; line += 16) _mm_prefetch((const char *)(b + 256 + line), _MM_HINT_T0);
            const __m512 hk = _mm512_set1_ps(h[k]);
            o0 = _mm512_fmadd_ps(hk, _mm512_loadu_ps(b), o0);
            o1 = _mm512_fmadd_ps(hk, _mm512_loadu_ps(b + 16), o1);
            o2 = _mm512_fmadd_ps(hk, _mm512_loadu_ps(b + 32), o2);
            o3 = _mm512_fmadd_ps(hk, _mm512_loadu_ps(b + 48), o3);
        }
        _mm512_storeu_ps(out + j, o0);
        _mm512_storeu_ps(out + j + 16, o1);
        _mm512_storeu_ps(out + j + 32, o2);
        _mm512_storeu_ps(out + j + 48, o3);
    }
    for (; j < outdim; j++) {
        float acc = out[j];
        for (int k = 0; k < 16; k++) acc += h[k] * B[k * outdim + j];
        out[j] = acc;
    }
}
#endif

/* The entry point: rows split over `threads` OpenMP threads (torch's own libgomp, already loaded). */
void loramux_lora_decode_f32(const float *x, const float *At, const float *Bt, float *out, int64_t rows,
                             int64_t in, int64_t r, int64_t outdim, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < rows; n++) {
        const float *xn = x + n * in, *A = At + n * in * r, *B = Bt + n * r * outdim;
        float *o = out + n * outdim;
#if defined(__AVX512F__)
        if (r == 16) {
            row_rank16(xn, A, B, o, in, outdim);
            continue;
        }
#endif
        row_any_rank(xn, A, B, o, in, r, outdim);
    }
}
