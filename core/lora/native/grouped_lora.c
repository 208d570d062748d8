/* One module's LoRA deltas for a batch, rows segmented by adapter: out[row] += ((x[row] . A_k) . B_k) * s_k.
 *
 * Segment k holds rows[offsets[k] .. offsets[k+1]) and uses adapter k: A_k (in, r_k) and B_k (r_k, out), both
 * row-major and read where they lie (pointer arrays, as Punica's SGMV takes them: nothing is stacked or copied
 * when the batch's adapters change), each read once for all of its segment's rows. Phase 1 computes
 * t (V, r) = x . A per segment, ROWS rows at a time (each row of A loaded once per block and used for ROWS
 * rows); phase 2 adds (t . B) * s into out, ROWS rows by COLS columns at a time, the accumulators in
 * registers. Many short segments: each thread takes whole adapters (both phases, B requested while A streams);
 * else the phases split across the threads, phase 2 by columns. `threads` OpenMP threads: this library links
 * the libgomp torch already loaded, so it runs on torch's thread pool, not a second one.
 * Each delta is summed from zero, scaled, then added to out, as PEFT adds lora_B(lora_A(x)) * scaling to the
 * base output. fp32 throughout. Ranks 8, 16, 32 and 64 are compile-time constants (a row of A or B lives in
 * vector registers); any other rank up to MAX_RANK runs a generic loop. Plain C: any x86 vector width. */
#include <omp.h>
#include <stdint.h>

#define ROWS 4
#define COLS 64
#define MAX_RANK 64
#define PREFETCH_FLOATS 256 /* how far ahead of the row being read its next cache lines are requested */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* NB rows (1..ROWS) of one segment at rank R: phase 1 into t, phase 2 for one full block of COLS columns. */
#define DEFINE_BLOCK(NAME, R, NB)                                                                             \
    static void phase1_##NAME##_##NB(float *t, int64_t t_stride, const float *x, int64_t x_stride,            \
                                     const float *a, int64_t rank, const int64_t *rows, int64_t v0,           \
                                     int64_t in_features, const char *pf, int64_t pf_lines) {                 \
        float acc[NB][R] = {{0}};                                                                             \
        const float *xr[NB];                                                                                  \
        const int64_t per = (pf_lines + in_features - 1) / in_features; /* B lines requested per row of A */  \
        (void)rank;                                                                                           \
        for (int64_t b = 0; b < NB; b++) xr[b] = x + rows[v0 + b] * x_stride;                                 \
        for (int64_t i = 0; i < in_features; i++) {                                                           \
            const float *arow = a + i * (R_OF(R, rank));                                                      \
            __builtin_prefetch(arow + PREFETCH_FLOATS);                                                       \
            for (int64_t q = i * per; q < (i + 1) * per && q < pf_lines; q++) __builtin_prefetch(pf + 64 * q); \
            for (int64_t b = 0; b < NB; b++) {                                                                \
                const float s = xr[b][i];                                                                     \
                _Pragma("omp simd") for (int64_t j = 0; j < R_OF(R, rank); j++) acc[b][j] += s * arow[j];     \
            }                                                                                                 \
        }                                                                                                     \
        for (int64_t b = 0; b < NB; b++)                                                                      \
            for (int64_t j = 0; j < R_OF(R, rank); j++) t[(v0 + b) * t_stride + j] = acc[b][j];               \
    }                                                                                                         \
    static void phase2_##NAME##_##NB(float *out, int64_t out_stride, const float *t, int64_t t_stride,        \
                                     const float *bk, int64_t rank, float scale, const int64_t *rows,         \
                                     int64_t v0, int64_t lo, int64_t out_features) {                          \
        float acc[NB][COLS] = {{0}};                                                                          \
        (void)rank;                                                                                           \
        for (int64_t j = 0; j < R_OF(R, rank); j++) {                                                         \
            const float *brow = bk + j * out_features + lo;                                                   \
            __builtin_prefetch(brow + PREFETCH_FLOATS);                                                       \
            __builtin_prefetch(brow + PREFETCH_FLOATS + 16);                                                  \
            __builtin_prefetch(brow + PREFETCH_FLOATS + 32);                                                  \
            __builtin_prefetch(brow + PREFETCH_FLOATS + 48);                                                  \
            for (int64_t b = 0; b < NB; b++) {                                                                \
                const float s = t[(v0 + b) * t_stride + j];                                                   \
                _Pragma("omp simd") for (int64_t i = 0; i < COLS; i++) acc[b][i] += s * brow[i];              \
            }                                                                                                 \
        }                                                                                                     \
        for (int64_t b = 0; b < NB; b++) {                                                                    \
            float *orow = out + rows[v0 + b] * out_stride + lo;                                               \
            _Pragma("omp simd") for (int64_t i = 0; i < COLS; i++) orow[i] += acc[b][i] * scale;              \
        }                                                                                                     \
    }

/* R_OF: the compile-time rank, or (for the generic variant, R = MAX_RANK) the runtime one. */
#define R_OF(R, rank) ((R) == MAX_RANK && GENERIC_##R ? (rank) : (R))
#define GENERIC_8 0
#define GENERIC_16 0
#define GENERIC_32 0
#define GENERIC_64 1

#define DEFINE_RANK(NAME, R)                                                                                  \
    DEFINE_BLOCK(NAME, R, 1) DEFINE_BLOCK(NAME, R, 2) DEFINE_BLOCK(NAME, R, 3) DEFINE_BLOCK(NAME, R, 4)       \
    static void phase1_##NAME(float *t, int64_t t_stride, const float *x, int64_t x_stride, const float *a,   \
                              int64_t rank, const int64_t *rows, int64_t v0, int64_t n, int64_t in_features,  \
                              const char *pf, int64_t pf_lines) {                                             \
        switch (n) {                                                                                          \
        case 1: phase1_##NAME##_1(t, t_stride, x, x_stride, a, rank, rows, v0, in_features, pf, pf_lines); break; \
        case 2: phase1_##NAME##_2(t, t_stride, x, x_stride, a, rank, rows, v0, in_features, pf, pf_lines); break; \
        case 3: phase1_##NAME##_3(t, t_stride, x, x_stride, a, rank, rows, v0, in_features, pf, pf_lines); break; \
        default: phase1_##NAME##_4(t, t_stride, x, x_stride, a, rank, rows, v0, in_features, pf, pf_lines); break; \
        }                                                                                                     \
    }                                                                                                         \
    static void phase2_##NAME(float *out, int64_t out_stride, const float *t, int64_t t_stride,               \
                              const float *bk, int64_t rank, float scale, const int64_t *rows, int64_t v0,    \
                              int64_t n, int64_t lo, int64_t out_features) {                                  \
        switch (n) {                                                                                          \
        case 1: phase2_##NAME##_1(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, lo, out_features); break; \
        case 2: phase2_##NAME##_2(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, lo, out_features); break; \
        case 3: phase2_##NAME##_3(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, lo, out_features); break; \
        default: phase2_##NAME##_4(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, lo, out_features); break; \
        }                                                                                                     \
    }

DEFINE_RANK(r8, 8)
DEFINE_RANK(r16, 16)
DEFINE_RANK(r32, 32)
DEFINE_RANK(any, 64)

/* pf, pf_lines: cache lines to request while A streams (the segment's B, read next), or none */
static void phase1(float *t, int64_t t_stride, const float *x, int64_t x_stride, const float *a, int64_t rank,
                   const int64_t *rows, int64_t v0, int64_t n, int64_t in_features, const char *pf,
                   int64_t pf_lines) {
    switch (rank) {
    case 8: phase1_r8(t, t_stride, x, x_stride, a, rank, rows, v0, n, in_features, pf, pf_lines); break;
    case 16: phase1_r16(t, t_stride, x, x_stride, a, rank, rows, v0, n, in_features, pf, pf_lines); break;
    case 32: phase1_r32(t, t_stride, x, x_stride, a, rank, rows, v0, n, in_features, pf, pf_lines); break;
    default: phase1_any(t, t_stride, x, x_stride, a, rank, rows, v0, n, in_features, pf, pf_lines); break;
    }
}

static void phase2(float *out, int64_t out_stride, const float *t, int64_t t_stride, const float *bk,
                   int64_t rank, float scale, const int64_t *rows, int64_t v0, int64_t n, int64_t lo,
                   int64_t out_features) {
    if (out_features - lo < COLS) { /* the last, narrower column block */
        for (int64_t b = 0; b < n; b++) {
            const float *tv = t + (v0 + b) * t_stride;
            float *orow = out + rows[v0 + b] * out_stride;
            for (int64_t i = lo; i < out_features; i++) {
                float acc = 0.0f;
                for (int64_t j = 0; j < rank; j++) acc += tv[j] * bk[j * out_features + i];
                orow[i] += acc * scale;
            }
        }
        return;
    }
    switch (rank) {
    case 8: phase2_r8(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, n, lo, out_features); break;
    case 16: phase2_r16(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, n, lo, out_features); break;
    case 32: phase2_r32(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, n, lo, out_features); break;
    default: phase2_any(out, out_stride, t, t_stride, bk, rank, scale, rows, v0, n, lo, out_features); break;
    }
}

/* a_ptrs, b_ptrs: each segment's A and B addresses; ranks (1..MAX_RANK) and scales per segment; t: scratch
 * for (V, t_stride) with t_stride >= every rank; threads: torch's intra-op thread count (the calling thread's
 * OpenMP default may differ from it). Returns 0, or -1 when a rank is outside 1..MAX_RANK (nothing written). */
int lora_grouped_add(float *out, int64_t out_stride, const float *x, int64_t x_stride, const int64_t *a_ptrs,
                     const int64_t *b_ptrs, const int64_t *ranks, const float *scales, const int64_t *rows,
                     const int64_t *offsets, int64_t adapters, int64_t in_features, int64_t out_features,
                     float *t, int64_t t_stride, int threads) {
    int64_t blocks = 0; /* row blocks over all segments, each within one segment */
    for (int64_t k = 0; k < adapters; k++) {
        if (ranks[k] < 1 || ranks[k] > MAX_RANK || ranks[k] > t_stride) return -1;
        blocks += (offsets[k + 1] - offsets[k] + ROWS - 1) / ROWS;
    }
    const int64_t chunks = (out_features + COLS - 1) / COLS;
    int64_t widest = 0;
    for (int64_t k = 0; k < adapters; k++)
        if (offsets[k + 1] - offsets[k] > widest) widest = offsets[k + 1] - offsets[k];
    if (adapters >= 2 * threads && widest <= 2 * ROWS) {
        /* Many short segments (distinct adapters, or a few rows each): each thread takes whole adapters, both
         * phases, and requests B_k while A_k streams, so the two reads overlap instead of queuing. */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t k = 0; k < adapters; k++) {
            const float *bk = (const float *)(intptr_t)b_ptrs[k];
            const int64_t lines = (ranks[k] * out_features * 4 + 63) / 64;
            for (int64_t v0 = offsets[k]; v0 < offsets[k + 1]; v0 += ROWS)
                phase1(t, t_stride, x, x_stride, (const float *)(intptr_t)a_ptrs[k], ranks[k], rows, v0,
                       min64(ROWS, offsets[k + 1] - v0), in_features, v0 == offsets[k] ? (const char *)bk : 0,
                       v0 == offsets[k] ? lines : 0);
            for (int64_t v0 = offsets[k]; v0 < offsets[k + 1]; v0 += ROWS)
                for (int64_t c = 0; c < chunks; c++)
                    phase2(out, out_stride, t, t_stride, bk, ranks[k], scales[k], rows, v0,
                           min64(ROWS, offsets[k + 1] - v0), c * COLS, out_features);
        }
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < blocks; p++) {
            int64_t k = 0, q = p, per;
            while (q >= (per = (offsets[k + 1] - offsets[k] + ROWS - 1) / ROWS)) q -= per, k++;
            const int64_t v0 = offsets[k] + q * ROWS;
            phase1(t, t_stride, x, x_stride, (const float *)(intptr_t)a_ptrs[k], ranks[k], rows, v0,
                   min64(ROWS, offsets[k + 1] - v0), in_features, 0, 0);
        }
        /* Each thread its own range of column blocks, swept for one row block of one adapter at a time: B_k
         * is then read as r sequential streams, which the prefetchers follow (columns outermost, every adapter's rows
         * at once, made 8 x r streams and ran at a third of the speed from memory). */
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        const int64_t c0 = chunks * tid / team, c1 = chunks * (tid + 1) / team;
        for (int64_t k = 0; k < adapters; k++) {
            const float *bk = (const float *)(intptr_t)b_ptrs[k];
            for (int64_t v0 = offsets[k]; v0 < offsets[k + 1]; v0 += ROWS)
                for (int64_t c = c0; c < c1; c++)
                    phase2(out, out_stride, t, t_stride, bk, ranks[k], scales[k], rows, v0,
                           min64(ROWS, offsets[k + 1] - v0), c * COLS, out_features);
        }
    }
    return 0;
}
