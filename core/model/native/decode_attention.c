/* A decode step's attention for one query token a row, over the KV cache's buffers where they lie
 * (decode_layer.c's decode_layer; native_layers.py).
 *
 * torch's SDPA call and the cache's two copies cost 65-230 us a layer at 1-8 rows on an Intel Xeon, where the
 * arithmetic (8 heads of 64 over ~100 columns) is a few microseconds' worth (BENCHMARKS "Session 26"). Here,
 * per row and head: the scores q . k_j * scaling over the columns the row's mask attends, softmax in fp32
 * (max subtracted, exp, sum), then sum_j p_j v_j / sum. Masked columns add exactly nothing, as in SDPA; the
 * sums run in their own order, so the output agrees with SDPA's to fp32 rounding (the probe bounds the
 * logits' difference). Grouped-query heads read kv head h / (heads / kv_heads).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

#define ATTEND_SERIAL_WORK (1 << 16) /* below this many multiply-adds one thread: a team costs more */

static inline float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* one row's head: o (dim) = softmax(q K^T * scaling) V over columns [0, length) where mask (NULL: all) is not
 * 0; keys and values (length, dim) row-major; s: scratch of length floats */
static void attend_one(const float *q, const float *keys, const float *values, int64_t length, int64_t dim,
                       const int64_t *mask, float scaling, float *s, float *o) {
    int64_t first = 0; /* left padding: skipped without reading its keys */
    if (mask != NULL)
        while (first < length - 1 && mask[first] == 0) first++;
    float top = -INFINITY;
    for (int64_t j = first; j < length; j++) {
        s[j] = (mask == NULL || mask[j] != 0) ? dot(q, keys + j * dim, dim) * scaling : -INFINITY;
        if (s[j] > top) top = s[j];
    }
    if (top == -INFINITY) { /* no column attended (SDPA: NaN); nothing to weigh */
        for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
        return;
    }
    float total = 0.0f;
    int64_t j = first;
    const __m512 ninf = _mm512_set1_ps(-INFINITY), shift = _mm512_set1_ps(top);
    __m512 sum16 = _mm512_setzero_ps();
    for (; j + 16 <= length; j += 16) {
        const __m512 v = _mm512_loadu_ps(s + j);
        const __mmask16 live = _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
        const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, shift)));
        _mm512_storeu_ps(s + j, p);
        sum16 = _mm512_add_ps(sum16, p);
    }
    total = _mm512_reduce_add_ps(sum16);
    for (; j < length; j++) {
        s[j] = s[j] == -INFINITY ? 0.0f : expf(s[j] - top);
        total += s[j];
    }
    for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
    for (j = first; j < length; j++) {
        const float p = s[j];
        if (p == 0.0f) continue;
        const float *v = values + j * dim;
        int64_t i = 0;
        const __m512 pv = _mm512_set1_ps(p);
        for (; i + 16 <= dim; i += 16)
            _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(o + i)));
        for (; i < dim; i++) o[i] += p * v[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < dim; i++) o[i] *= inv;
}

/* o (rows, heads * dim) for q (rows, heads * dim; row stride ldq) against keys and values (rows, kv_heads,
 * length, dim) at row stride kv_row and head stride kv_head (a column is dim floats); mask (rows, length) or
 * NULL. Returns 0, or 1 when out of memory (nothing written). */
static int attend(const float *q, int64_t ldq, const float *keys, const float *values, int64_t kv_row,
                  int64_t kv_head, int64_t length, const int64_t *mask, int64_t rows, int64_t heads,
                  int64_t kv_heads, int64_t dim, float scaling, float *o, int threads) {
    const int64_t group = heads / kv_heads, pairs = rows * heads;
    const int team = pairs * length * dim * 2 >= ATTEND_SERIAL_WORK ? threads : 1;
    float *scores = malloc((size_t)(team * length) * sizeof(float));
    if (scores == NULL) return 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t r = p / heads, h = p % heads, kv = h / group;
        float *s = scores + omp_get_thread_num() * length;
        attend_one(q + r * ldq + h * dim, keys + r * kv_row + kv * kv_head, values + r * kv_row + kv * kv_head,
                   length, dim, mask != NULL ? mask + r * length : NULL, scaling, s, o + r * heads * dim + h * dim);
    }
    free(scores);
    return 0;
}
