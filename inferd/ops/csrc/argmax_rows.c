// The index of each row's largest value: the sampler's greedy fast path (engine/sampler.py), one call for the
// step's rows where torch.argmax spends ~40 µs a row of a 49k vocabulary on one thread. torch's answer exactly:
// the first index of the maximum, and where a row holds a NaN the first NaN's index (torch ranks NaN highest).
// Two passes over each row (its max, then where it first occurs), the row staying in L2 between them.
#include "kernels.h"

static float row_max(const float *x, int n, int *has_nan) {
    int i = 0;
    float m = -INFINITY;
#if defined(__AVX512F__)
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, v);
    }
    m = _mm512_reduce_max_ps(vm);
    *has_nan = nan != 0;
#elif defined(__AVX2__)
    __m256 vm = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vm = _mm256_max_ps(vm, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    *has_nan = _mm256_movemask_ps(nan) != 0;
#else
    *has_nan = 0;
#endif
    for (; i < n; i++) {
        if (x[i] != x[i]) *has_nan = 1;
        m = x[i] > m ? x[i] : m;
    }
    return m;
}

// x: `rows` rows of `n` fp32 values, `stride` apart → out[r] = argmax of row r (int64). Returns -1 for n < 1.
int argmax_rows(const float *x, int rows, int n, int64_t stride, int64_t *out) {
    if (n < 1 || rows < 0) return -1;
#pragma omp parallel for schedule(static) if ((int64_t)rows * n >= (1 << 20))
    for (int r = 0; r < rows; r++) {
        const float *row = x + (int64_t)r * stride;
        int has_nan;
        const float m = row_max(row, n, &has_nan);
        int i = 0;
        if (has_nan) {
            while (row[i] == row[i]) i++;
        } else {
#if defined(__AVX512F__)
            const __m512 vm = _mm512_set1_ps(m);
            for (; i + 16 <= n; i += 16) {
                const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), vm, _CMP_EQ_OQ);
                if (eq) {
                    i += __builtin_ctz(eq);
                    goto found;
                }
            }
#elif defined(__AVX2__)
            const __m256 vm = _mm256_set1_ps(m);
            for (; i + 8 <= n; i += 8) {
                const int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), vm, _CMP_EQ_OQ));
                if (eq) {
                    i += __builtin_ctz((unsigned)eq);
                    goto found;
                }
            }
#endif
            while (row[i] != m) i++;  // m is one of the row's values: the loop ends
        }
#if defined(__AVX512F__) || defined(__AVX2__)
    found:
#endif
        out[r] = i;
    }
    return 0;
}
