/* One Llama decoder layer's decode-step work around attention, in two calls (native_layers.py).
 *
 * At one row the decode step's 57 GEMMs stream the model's weights, and every small torch op between two of
 * them then runs with the interpreter's and the dispatcher's data evicted from the caches: on an Intel Xeon,
 * the step's time outside the linear kernel was 5.8 ms a step where the same ops took 1.6-2.6 ms with the
 * GEMMs left out (BENCHMARKS "Session 25"). Each call here does a run of those ops in C, with the native
 * linear kernel for the GEMMs:
 *
 *   decode_attn_in:      h = rms_norm(x); q, k, v = h Wq^T + bq (+ LoRA), ...; q and k rotated (cos, sin)
 *   decode_attn_out_mlp: x = x + o Wo^T + bo (+ LoRA); h = rms_norm(x); x = x + down(silu(gate(h)) * up(h))
 *   decode_layer:        decode_attn_in; k, v into the KV cache; attention (decode_attention.c); decode_attn_out_mlp
 *
 * decode_layer is the whole layer in one call; against a cache that is not growable the first two run around
 * torch's KV cache and attention. A layer with LoRA routes passes each projection's
 * add (lora_t: another library's function and its arguments, the grouped LoRA kernel's) and each runs right
 * after its GEMM, on the GEMM's input, into the GEMM's columns. The rotation and the residual adds are the
 * torch ops' arithmetic, rounding for rounding (no FMA contraction); the norms and SiLU sum and round in
 * their own order, so the logits agree with the forward's to fp32 rounding, not bit for bit.
 */
#include "skinny_linear.c"
#include "vector_math.h"
#include "decode_attention.c"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* a layer's weights (contiguous fp32, (out, in)) and sizes; a NULL bias is none. Mirrored by native_layers.py */
typedef struct {
    const float *attn_norm, *mlp_norm;
    const float *wq, *wk, *wv, *bq, *bk, *bv, *wo, *bo;
    const float *wg, *wu, *bg, *bu, *wd, *bd;
    float attn_eps, mlp_eps;
    int64_t d, heads, kv_heads, head_dim, inter;
} layer_t;

/* RMSNorm as the model computes it in fp32: weight * (x * (1 / sqrt(mean(x^2) + eps))) per row */
static void rms_norm(const float *x, int64_t rows, int64_t d, const float *weight, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = out + r * d;
        __m512 acc = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= d; j += 16) {
            const __m512 v = _mm512_loadu_ps(xr + j);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float sum = _mm512_reduce_add_ps(acc);
        for (; j < d; j++) sum += xr[j] * xr[j];
        const float scale = 1.0f / sqrtf(sum / (float)d + eps);
        for (j = 0; j < d; j++) yr[j] = weight[j] * (xr[j] * scale);
    }
}

/* p (n heads of dim) rotated in place: p * cos + rotate_half(p) * sin, as torch computes it (no contraction) */
__attribute__((optimize("fp-contract=off"))) static void rotate(float *p, int64_t n, int64_t dim, const float *cos,
                                                                 const float *sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < n; h++, p += dim) {
        for (int64_t i = 0; i < half; i++) {
            const float a = p[i], b = p[i + half];
            p[i] = a * cos[i] + (-b) * sin[i];
            p[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* g = silu(g) * u over n values: g / (1 + exp(-g)) * u */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 v = _mm512_loadu_ps(g + j);
        const __m512 s = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        _mm512_storeu_ps(g + j, _mm512_mul_ps(s, _mm512_loadu_ps(u + j)));
    }
    for (; j < n; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* y (rows, ldy) = x W^T + b for weights a and b side by side: one call where b's rows follow a's in memory (a
 * fused group's members: the same sums, one pass of the kernel's threads), else two */
static void two_linears(const float *x, int64_t rows, int64_t ldx, int64_t k, const float *wa, const float *ba,
                        int64_t na, const float *wb, const float *bb, int64_t nb, float *y, int64_t ldy, int threads) {
    const int joined_bias = (ba == NULL && bb == NULL) || (ba != NULL && bb == ba + na);
    if (wb == wa + na * k && joined_bias) {
        skinny_linear(x, rows, ldx, wa, na + nb, k, ba, y, ldy, threads);
    } else {
        skinny_linear(x, rows, ldx, wa, na, k, ba, y, ldy, threads);
        skinny_linear(x, rows, ldx, wb, nb, k, bb, y + na, ldy, threads);
    }
}

/* one projection's LoRA add, made through the function of the library that owns the adapters' layout (the
 * grouped kernel's lora_grouped_add; native_layers.py fills it from the route's NativeLora). Mirrored by
 * loramux.core.native.NativeLora */
typedef int (*lora_add_fn)(float *out, int64_t out_stride, const float *x, int64_t x_stride, const int64_t *a_ptrs,
                           const int64_t *b_ptrs, const int64_t *ranks, const float *scales, const int64_t *rows,
                           const int64_t *offsets, int64_t adapters, int64_t in_features, int64_t out_features,
                           float *t, int64_t t_stride, int threads);
typedef struct {
    lora_add_fn add;
    const int64_t *a_ptrs, *b_ptrs, *ranks;
    const float *scales;
    const int64_t *rows, *offsets;
    int64_t adapters;
    float *scratch;
    int64_t scratch_stride;
} lora_t;

/* out (rows, n; row stride ldo) += the LoRA delta of x (rows, k; row stride ldx); loras or lora NULL, or no
 * adapters: none.
 * Returns 0, or 2 when the add refused (nothing written) */
static int add_lora(const lora_t *const *loras, int which, float *out, int64_t ldo, const float *x, int64_t ldx,
                    int64_t k, int64_t n, int threads) {
    const lora_t *lora = loras != NULL ? loras[which] : NULL;
    if (lora == NULL || lora->adapters == 0) return 0;
    return lora->add(out, ldo, x, ldx, lora->a_ptrs, lora->b_ptrs, lora->ranks, lora->scales, lora->rows,
                     lora->offsets, lora->adapters, k, n, lora->scratch, lora->scratch_stride, threads) == 0 ? 0 : 2;
}

static float *scratch(int64_t floats) { return aligned_alloc(64, (size_t)(floats * 4 + 63) / 64 * 64); }

/* h (rows, d) = rms_norm(x); qkv (rows, (heads + 2 kv_heads) head_dim) = h [Wq Wk Wv]^T + b: not rotated */
int decode_norm_qkv(const layer_t *L, int64_t rows, const float *x, float *h, float *qkv, int threads) {
    const int64_t d = L->d, nq = L->heads * L->head_dim, nk = L->kv_heads * L->head_dim, width = nq + 2 * nk;
    rms_norm(x, rows, d, L->attn_norm, L->attn_eps, h);
    if (L->wv == L->wk + nk * d && ((L->bk == NULL && L->bv == NULL) || (L->bk != NULL && L->bv == L->bk + nk))) {
        two_linears(h, rows, d, d, L->wq, L->bq, nq, L->wk, L->bk, 2 * nk, qkv, width, threads);
    } else {
        two_linears(h, rows, d, d, L->wq, L->bq, nq, L->wk, L->bk, nk, qkv, width, threads);
        skinny_linear(h, rows, d, L->wv, nk, d, L->bv, qkv + nq + nk, width, threads);
    }
    return 0;
}

/* in place: q and k of qkv (rows, width) rotated; cos, sin (rows, head_dim) */
int decode_rotate(const layer_t *L, int64_t rows, float *qkv, const float *cos, const float *sin) {
    const int64_t dim = L->head_dim, width = (L->heads + 2 * L->kv_heads) * dim;
    for (int64_t r = 0; r < rows; r++)
        rotate(qkv + r * width, L->heads + L->kv_heads, dim, cos + r * dim, sin + r * dim);
    return 0;
}

/* mid (rows, d) = o Wo^T + bo; o (rows, heads head_dim) */
int decode_o(const layer_t *L, int64_t rows, const float *o, float *mid, int threads) {
    const int64_t width = L->heads * L->head_dim;
    skinny_linear(o, rows, width, L->wo, L->d, width, L->bo, mid, L->d, threads);
    return 0;
}

/* in place mid = x + mid (the residual, as x + o_proj(o)); h = rms_norm(mid); gate_up (rows, 2 inter) =
 * h [Wg Wu]^T + b */
__attribute__((optimize("fp-contract=off"))) int decode_residual_norm_gate_up(
    const layer_t *L, int64_t rows, const float *x, float *mid, float *h, float *gate_up, int threads) {
    const int64_t d = L->d, inter = L->inter, n = rows * d;
    for (int64_t j = 0; j < n; j++) mid[j] = x[j] + mid[j];
    rms_norm(mid, rows, d, L->mlp_norm, L->mlp_eps, h);
    two_linears(h, rows, d, d, L->wg, L->bg, inter, L->wu, L->bu, inter, gate_up, 2 * inter, threads);
    return 0;
}

/* act (rows, inter) = silu(gate) * up (act may be gate_up itself: then in place, row stride 2 inter);
 * down (rows, d) = act Wd^T + bd */
int decode_silu_down(const layer_t *L, int64_t rows, float *gate_up, float *act, int64_t ld_act, float *down,
                     int threads) {
    const int64_t inter = L->inter;
    for (int64_t r = 0; r < rows; r++) {
        float *g = gate_up + r * 2 * inter, *a = act + r * ld_act;
        if (a != g) memcpy(a, g, (size_t)inter * sizeof(float));
        silu_mul(a, g + inter, inter);
    }
    skinny_linear(act, rows, ld_act, L->wd, L->d, inter, L->bd, down, L->d, threads);
    return 0;
}

/* x (rows, d); cos, sin (rows, head_dim); qkv (rows, (heads + 2 kv_heads) head_dim): q, k (rotated), v;
 * loras: NULL, or the q, k, v, o, gate, up and down adds (NULL: none; this call makes q, k and v's).
 * Returns 0; 1 when out of memory (nothing written); 2 when a LoRA add refused (qkv unfinished). */
int decode_attn_in(const layer_t *L, const lora_t *const *loras, int64_t rows, const float *x, const float *cos,
                   const float *sin, float *qkv, int threads) {
    const int64_t d = L->d, nq = L->heads * L->head_dim, nk = L->kv_heads * L->head_dim, width = nq + 2 * nk;
    float *h = scratch(rows * d);
    if (h == NULL) return 1;
    decode_norm_qkv(L, rows, x, h, qkv, threads);
    int status = add_lora(loras, 0, qkv, width, h, d, d, nq, threads);
    status |= add_lora(loras, 1, qkv + nq, width, h, d, d, nk, threads);
    status |= add_lora(loras, 2, qkv + nq + nk, width, h, d, d, nk, threads);
    decode_rotate(L, rows, qkv, cos, sin);
    free(h);
    return status;
}

/* x (rows, d): the layer's input; o (rows, heads head_dim): attention's output; out (rows, d): the layer's;
 * loras: as decode_attn_in's (this call makes o, gate, up and down's).
 * Returns 0; 1 when out of memory (nothing written); 2 when a LoRA add refused (out unfinished). */
__attribute__((optimize("fp-contract=off"))) int decode_attn_out_mlp(const layer_t *L, const lora_t *const *loras,
                                                                     int64_t rows, const float *x, const float *o,
                                                                     float *out, int threads) {
    const int64_t d = L->d, inter = L->inter, n = rows * d, width = L->heads * L->head_dim;
    float *mid = scratch(2 * n + 2 * rows * inter);
    if (mid == NULL) return 1;
    float *h = mid + n, *gate_up = h + n; /* gate_up (rows, 2 inter): gate, then up */
    decode_o(L, rows, o, mid, threads);
    int status = add_lora(loras, 3, mid, d, o, width, width, d, threads);
    decode_residual_norm_gate_up(L, rows, x, mid, h, gate_up, threads);
    status |= add_lora(loras, 4, gate_up, 2 * inter, h, d, d, inter, threads);
    status |= add_lora(loras, 5, gate_up + inter, 2 * inter, h, d, d, inter, threads);
    decode_silu_down(L, rows, gate_up, gate_up, 2 * inter, out, threads); /* act in place of gate */
    status |= add_lora(loras, 6, out, d, gate_up, 2 * inter, inter, d, threads);
    for (int64_t j = 0; j < n; j++) out[j] = mid[j] + out[j];
    free(mid);
    return status;
}

/* The whole layer: decode_attn_in, then k and v written into the KV cache's new column (the last of length),
 * attention over the cache (decode_attention.c), then decode_attn_out_mlp. keys, values: the cache's views
 * (rows, kv_heads, length, head_dim) at row stride kv_row and head stride kv_head, columns of head_dim floats;
 * mask (rows, length): 0 = not attended (NULL: all); loras: as decode_attn_in's. Returns 0; 1 when out of
 * memory (the cache's new column maybe written, out not); 2 when a LoRA add refused (out unfinished). */
int decode_layer(const layer_t *L, const lora_t *const *loras, int64_t rows, const float *x, const float *cos,
                 const float *sin, float *keys, float *values, int64_t kv_row, int64_t kv_head, int64_t length,
                 const int64_t *mask, float scaling, float *out, int threads) {
    const int64_t dim = L->head_dim, nq = L->heads * dim, nk = L->kv_heads * dim, width = nq + 2 * nk;
    float *qkv = scratch(rows * width + rows * nq);
    if (qkv == NULL) return 1;
    float *o = qkv + rows * width;
    int status = decode_attn_in(L, loras, rows, x, cos, sin, qkv, threads);
    for (int64_t r = 0; r < rows && status == 0; r++) {
        for (int64_t h = 0; h < L->kv_heads; h++) {
            const int64_t at = r * kv_row + h * kv_head + (length - 1) * dim;
            memcpy(keys + at, qkv + r * width + nq + h * dim, (size_t)dim * sizeof(float));
            memcpy(values + at, qkv + r * width + nq + nk + h * dim, (size_t)dim * sizeof(float));
        }
    }
    if (status == 0)
        status = attend(qkv, width, keys, values, kv_row, kv_head, length, mask, rows, L->heads, L->kv_heads, dim,
                        scaling, o, threads);
    if (status == 0) status = decode_attn_out_mlp(L, loras, rows, x, o, out, threads);
    free(qkv);
    return status;
}
