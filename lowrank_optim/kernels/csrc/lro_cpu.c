/* The fused 8-bit Adam step on a CPU: reference.adam8bit_direction, bit for bit, in one pass.
 *
 * Built by lowrank_optim/kernels/cpu_ext.py with a C compiler (-O3 -ffp-contract=off, no fast-math) into a
 * shared library it calls through ctypes: no torch headers, so the build takes a second. Every float32
 * product, sum, quotient and square root is rounded on its own, in the reference's order (IEEE sqrtf is the
 * correctly rounded root the reference takes from NumPy); the nearest code is the reference's two-table
 * lookup (reference._cells), so the codes are the same for every value, NaN and infinities included.
 *
 * One call steps the blocks [first, last) of a tensor of n elements; blocks are independent, so the
 * loader runs disjoint ranges on several threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 4096

typedef struct {
    const uint8_t *base;    /* per cell: the midpoints below it */
    const float *threshold; /* per cell: the one midpoint inside it, +inf if none */
    int shift;              /* a value's cell: its float32 bit pattern >> shift */
} cells_t;

static inline uint8_t nearest(float v, const cells_t *c) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    uint32_t cell = bits >> c->shift;
    return (uint8_t)(c->base[cell] + (v > c->threshold[cell]));
}

/* max |x| over a block, NaN if it holds one (torch.maximum(amax, -amin).abs_() of the reference) */
static float absmax(const float *x, int64_t len) {
    float hi = 0.0f;
    int nan = 0;
    for (int64_t i = 0; i < len; i++) {
        float a = fabsf(x[i]);
        nan |= (a != a);
        hi = a > hi ? a : hi;
    }
    return nan ? NAN : hi;
}

static void requantize(float *x, int64_t len, uint8_t *codes, float *absmax_out, const cells_t *c) {
    float top = absmax(x, len);
    float safe = top > 0.0f ? top : 1.0f; /* NaN > 0 is false: the reference divides by 1 there too */
    for (int64_t i = 0; i < len; i++) /* apart from the lookups, so that it vectorizes */
        x[i] = x[i] / safe;
    for (int64_t i = 0; i < len; i++)
        codes[i] = nearest(x[i], c);
    *absmax_out = top;
}

/* consts: beta1, beta2, eps, 1 - beta1^t, sqrt(1 - beta2^t), 1 - beta1, 1 - beta2 (float32 each, as torch
 * casts a Python scalar for a float32 tensor). Returns 0, or -1 for a block longer than MAX_BLOCK. */
int lro_adam8bit(const float *g, float *out, int64_t n, int64_t block, int64_t first, int64_t last,
                 uint8_t *m_codes, float *m_absmax, const float *m_book,
                 uint8_t *v_codes, float *v_absmax, const float *v_book,
                 const uint8_t *m_base, const float *m_threshold, int m_shift,
                 const uint8_t *v_base, const float *v_threshold, int v_shift,
                 const float *consts) {
    if (block <= 0 || block > MAX_BLOCK)
        return -1;
    const float b1 = consts[0], b2 = consts[1], eps = consts[2], bias1 = consts[3], bias2 = consts[4];
    const float omb1 = consts[5], omb2 = consts[6];
    const cells_t mc = {m_base, m_threshold, m_shift}, vc = {v_base, v_threshold, v_shift};
    float m[MAX_BLOCK], v[MAX_BLOCK];
    for (int64_t b = first; b < last; b++) {
        int64_t start = b * block, len = n - start < block ? n - start : block;
        float am = m_absmax[b], av = v_absmax[b];
        const float *gb = g + start;
        float *ob = out + start;
        for (int64_t i = 0; i < len; i++) { /* the lookups (scalar) */
            m[i] = m_book[m_codes[start + i]] * am;
            v[i] = v_book[v_codes[start + i]] * av;
        }
        for (int64_t i = 0; i < len; i++) { /* the arithmetic (vectorized, each operation rounded) */
            float gi = gb[i];
            float mi = m[i] * b1 + gi * omb1;
            float vi = v[i] * b2 + (gi * omb2) * gi; /* not gi * gi first: it overflows from 1.8e19 */
            float d = sqrtf(vi) / bias2 + eps;
            ob[i] = (mi / d) / bias1;
            m[i] = mi;
            v[i] = vi;
        }
        requantize(m, len, m_codes + start, m_absmax + b, &mc);
        requantize(v, len, v_codes + start, v_absmax + b, &vc);
    }
    return 0;
}
