/* A decoding step's kernels for x86-64 CPUs with AVX2 and FMA: products of a few rows with a large
 * weight (ak_linear), and the family's RMSNorm and one-query attention (ak_rmsnorm, ak_attention, at
 * the end), which replace ~10 torch calls each per layer.
 *
 *   y (M, N) = x (M, K) W^T + b        (accumulate = 0)
 *   y (M, N) += x (M, K) W^T + b       (accumulate = 1: a residual stream updated in place)
 *
 * W (N, K) arrives packed as (ceil(N / 8), K, 8) panels (alignkit.rollout.native.pack): panel p holds
 * output columns 8p..8p+7, one 8-float vector per input k, zero-padded past N. Each output row of a panel
 * keeps one AVX register accumulator; one pass over the panel serves up to 8 rows, so each weight is read
 * once from memory per 8 rows and again from cache for more. Sums run over k in order, one fp32
 * accumulator per output, with fused multiply-adds. The panels are split between the OpenMP threads of
 * the process's runtime, which is torch's own when torch is loaded first (same libgomp soname), so
 * torch.set_num_threads governs them too.
 *
 * Why: at decoding shapes (8 rows, SmolLM2-135M's weights) oneDNN's prepacked product streams the
 * weights at 11-17 GB/s on a 2-core AVX2 EPYC, this kernel at 17-23 GB/s (benchmarks/README.md).
 */
#include <immintrin.h>
#include <stddef.h>
#include <math.h>
#include <stdlib.h>

#define PANEL 8
/* Weights fetched this many floats (4 KiB) ahead of the one in use: 10-20% faster than the hardware
 * prefetcher alone when the weights stream from memory (measured at 128 to 2048). */
#define PREFETCH 1024

/* One panel's sums for a block of 4 or 8 rows. ``xt`` holds the block's inputs transposed, (K, 8):
 * input k of row r at xt[8k + r], rows past the block's last repeating it (computed, never stored), so a
 * tail costs a block's time, every broadcast is at a constant offset from one pointer, and each
 * accumulator stays in its own register (an array of them made gcc spill to the stack on every k). */
#define FMA(i) a##i = _mm256_fmadd_ps(_mm256_broadcast_ss(xk + i), w, a##i)

static inline void store_row(__m256 acc, float *restrict row, const float *restrict bias, const long cols,
                             const int accumulate) {
    if (cols == PANEL) {
        __m256 v = bias ? _mm256_add_ps(acc, _mm256_loadu_ps(bias)) : acc; /* x W^T + b, as F.linear */
        if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(row), v);       /* h + (x W^T + b) */
        _mm256_storeu_ps(row, v);
        return;
    }
    float out[PANEL]; /* the last panel, past N: the same sums, element by element */
    _mm256_storeu_ps(out, acc);
    for (long c = 0; c < cols; c++) {
        const float v = bias ? out[c] + bias[c] : out[c];
        row[c] = accumulate ? row[c] + v : v;
    }
}

static void panel_block(const long R, const long K, const float *restrict xt, const float *restrict wp,
                        const float *restrict bias, float *restrict y, const long N, const long n0,
                        const int accumulate) {
    const long cols = N - n0 < PANEL ? N - n0 : PANEL;
    const float *b = bias ? bias + n0 : 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (R <= 4) {
        for (long k = 0; k < K; k++) {
            const __m256 w = _mm256_loadu_ps(wp + k * PANEL);
            _mm_prefetch((const char *)(wp + k * PANEL + PREFETCH), _MM_HINT_T0);
            const float *xk = xt + k * PANEL;
            FMA(0); FMA(1); FMA(2); FMA(3);
        }
    } else {
        __m256 a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (long k = 0; k < K; k++) {
            const __m256 w = _mm256_loadu_ps(wp + k * PANEL);
            _mm_prefetch((const char *)(wp + k * PANEL + PREFETCH), _MM_HINT_T0);
            const float *xk = xt + k * PANEL;
            FMA(0); FMA(1); FMA(2); FMA(3); FMA(4); FMA(5); FMA(6); FMA(7);
        }
        store_row(a4, y + 4 * N + n0, b, cols, accumulate);
        if (R > 5) store_row(a5, y + 5 * N + n0, b, cols, accumulate);
        if (R > 6) store_row(a6, y + 6 * N + n0, b, cols, accumulate);
        if (R > 7) store_row(a7, y + 7 * N + n0, b, cols, accumulate);
    }
    store_row(a0, y + n0, b, cols, accumulate);
    if (R > 1) store_row(a1, y + N + n0, b, cols, accumulate);
    if (R > 2) store_row(a2, y + 2 * N + n0, b, cols, accumulate);
    if (R > 3) store_row(a3, y + 3 * N + n0, b, cols, accumulate);
}

/* Returns 0, or -1 when the transposed inputs could not be allocated (nothing written then). */
int ak_linear(const float *x, long M, long K, const float *wp, const float *bias, float *y, long N,
              int accumulate) {
    const long panels = (N + PANEL - 1) / PANEL, blocks = (M + PANEL - 1) / PANEL;
    float *xt = malloc(sizeof(float) * blocks * K * PANEL); /* (blocks, K, 8) */
    if (!xt) return -1;
    for (long blk = 0; blk < blocks; blk++)
        for (long r = 0; r < PANEL; r++) {
            const long row = blk * PANEL + r < M ? blk * PANEL + r : M - 1;
            for (long k = 0; k < K; k++) xt[(blk * K + k) * PANEL + r] = x[row * K + k];
        }
#pragma omp parallel for schedule(static)
    for (long p = 0; p < panels; p++) {
        const float *w = wp + p * K * PANEL;
        for (long blk = 0; blk < blocks; blk++) {
            const long R = M - blk * PANEL < PANEL ? M - blk * PANEL : PANEL;
            panel_block(R, K, xt + blk * K * PANEL, w, bias, y + blk * PANEL * N, N, p * PANEL, accumulate);
        }
    }
    free(xt);
    return 0;
}

/* The rest of a decoding step, for the rows of a few sequences (alignkit.rollout.llama_decode).
 *
 * ak_rmsnorm: out (M, H) = w * (x * 1 / sqrt(mean(x^2) + eps)), transformers' LlamaRMSNorm (and
 * Mistral's, Qwen2's, Qwen3's) in fp32; the mean of squares summed in double, then rounded, as exact
 * as fp32 allows (torch sums in fp32 lanes: the two differ by rounding). */
void ak_rmsnorm(const float *x, long M, long H, const float *w, float eps, float *out) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * H;
        double squares = 0.0;
        for (long h = 0; h < H; h++) squares += (double)xm[h] * xm[h];
        const float inv = 1.0f / sqrtf((float)(squares / H) + eps);
        for (long h = 0; h < H; h++) out[m * H + h] = w[h] * (xm[h] * inv);
    }
}

static inline float dot(const float *restrict a, const float *restrict b, const long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; l++) sum += lanes[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* ak_attention: one query position per row against the first ``upto`` columns of its keys and values.
 *   q      (B, heads, dim), row b at q + b * q_stride (the queries of a fused q/k/v output)
 *   keys, values (B, kv, length, dim); query head j reads key/value head j / (heads / kv)
 *   mask   (B, mask_stride) int64, nonzero on the columns row b attends to
 *   out    (B, heads * dim) = softmax(scale * q K^T over the allowed columns) V, as scaled dot-product
 *          attention computes it (a row with no allowed column gets zeros: such a row is finished and
 *          its output never read). Returns 0, or -1 without memory for the scores. */
int ak_attention(const float *q, long B, long heads, long kv, long dim, long q_stride, const float *keys,
                 const float *values, long length, const long *mask, long mask_stride, long upto, float scale,
                 float *out) {
    float *scores = malloc(sizeof(float) * B * heads * upto);
    if (!scores) return -1;
    const long group = heads / kv;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < B * heads; task++) {
        const long b = task / heads, j = task % heads;
        const float *qj = q + b * q_stride + j * dim;
        const float *k0 = keys + ((b * kv + j / group) * length) * dim;
        const float *v0 = values + ((b * kv + j / group) * length) * dim;
        const long *allowed = mask + b * mask_stride;
        float *s = scores + task * upto, top = -INFINITY;
        for (long c = 0; c < upto; c++) {
            s[c] = allowed[c] ? scale * dot(qj, k0 + c * dim, dim) : -INFINITY;
            if (s[c] > top) top = s[c];
        }
        float *o = out + b * heads * dim + j * dim;
        for (long d = 0; d < dim; d++) o[d] = 0.0f;
        if (top == -INFINITY) continue;
        float total = 0.0f;
        for (long c = 0; c < upto; c++) {
            if (!allowed[c]) continue;
            const float p = expf(s[c] - top);
            total += p;
            const float *vc = v0 + c * dim;
            for (long d = 0; d < dim; d++) o[d] += p * vc[d];
        }
        for (long d = 0; d < dim; d++) o[d] /= total;
    }
    free(scores);
    return 0;
}

/* The ABI version the Python side checks, so a stale cached build is never called with new arguments. */
int ak_version(void) { return 2; }
