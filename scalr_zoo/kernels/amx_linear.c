/* bfloat16 linear layers on Intel AMX tiles, for CPUs whose AMX oneDNN cannot use.
 *
 * scalr_amx_linear: out = x @ W^T + bias, x (M, K) bf16 row-major, W given
 * prepacked (see scalr_zoo/_amx.py: pack_weight), accumulation in float32.
 * Two epilogues:
 *   mode 0: out (M, N) bf16 = [relu](x @ W^T + bias)
 *   mode 1: out (M, N) fp32 += x @ W^T + bias
 * K and N must be multiples of 32; any M.
 * scalr_layernorm_bf16: the rows of a float32 (M, C) matrix normalised to
 * zero mean and unit variance (LayerNorm without affine), written as bf16;
 * C a multiple of 16. It feeds the products above.
 * Both split their rows over `threads` POSIX threads.
 *
 * Tiles: 0-3 hold a 32 x 32 float32 output block (2 x 2 tiles of 16 x 16),
 * 4-5 two 16-row slices of x (16 x 32 bf16), 6-7 two 16-column slices of W
 * in the VNNI layout (16 pairs of k x 16 columns x 2).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define BLOCK 32

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

typedef struct {
    const uint16_t *x;
    int64_t m, k, n;
    const uint16_t *w;
    const float *bias;
    void *out;
    int mode, relu;
    volatile int failed; /* set by any thread that could not allocate its tail buffer */
} job;

typedef void (*range_fn)(void *context, int64_t first, int64_t last);

typedef struct {
    range_fn fn;
    void *context;
    int64_t first, last;
} range_task;

static void *run_range(void *arg) {
    range_task *task = (range_task *)arg;
    task->fn(task->context, task->first, task->last);
    return NULL;
}

/* fn(context, first, last) over [0, count) split in `threads` contiguous ranges, one per thread. */
static void parallel_for(int64_t count, int threads, range_fn fn, void *context) {
    enum { MAX_THREADS = 64 };
    if (threads > count) threads = (int)count;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    range_task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) tasks[t] = (range_task){fn, context, count * t / threads, count * (t + 1) / threads};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_range, &tasks[t]) == 0;
    for (int t = 1; t < threads; t++) {
        if (!started[t]) run_range(&tasks[t]); /* could not start a thread: do its share here */
    }
    run_range(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
    }
}

/* Ask the kernel for the AMX tile state of this process; 0 on success. */
int scalr_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1; /* palette 1: 8 tiles of 16 rows x 64 bytes */
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
}

static void epilogue(const job *j, const float *block_out, int64_t row0, int rows, int64_t col0) {
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (j->bias) {
        bias0 = _mm512_loadu_ps(j->bias + col0);
        bias1 = _mm512_loadu_ps(j->bias + col0 + 16);
    }
    for (int r = 0; r < rows; r++) {
        __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(block_out + r * BLOCK), bias0);
        __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(block_out + r * BLOCK + 16), bias1);
        if (j->mode == 0) {
            if (j->relu) {
                v0 = _mm512_max_ps(v0, _mm512_setzero_ps());
                v1 = _mm512_max_ps(v1, _mm512_setzero_ps());
            }
            uint16_t *dst = (uint16_t *)j->out + (row0 + r) * j->n + col0;
            _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v0));
            _mm256_storeu_si256((__m256i *)(dst + 16), (__m256i)_mm512_cvtneps_pbh(v1));
        } else {
            float *dst = (float *)j->out + (row0 + r) * j->n + col0;
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), v0));
            _mm512_storeu_ps(dst + 16, _mm512_add_ps(_mm512_loadu_ps(dst + 16), v1));
        }
    }
}

/* One 32 x 32 block of the product: rows of x at a (row stride k elements), columns 32 nb..32 nb+31. */
static void tile_block(const job *j, const uint16_t *a, int64_t nb, float *block_out) {
    const int64_t k_blocks = j->k / BLOCK;
    const int64_t stride = j->k * (int64_t)sizeof(uint16_t);
    const uint16_t *w0 = j->w + (2 * nb) * k_blocks * 512;
    const uint16_t *w1 = w0 + k_blocks * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < k_blocks; kb++) {
        _tile_loadd(4, a + kb * BLOCK, stride);
        _tile_loadd(5, a + 16 * j->k + kb * BLOCK, stride);
        _tile_loadd(6, w0 + kb * 512, 64);
        _tile_loadd(7, w1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, block_out, BLOCK * sizeof(float));
    _tile_stored(1, block_out + 16, BLOCK * sizeof(float));
    _tile_stored(2, block_out + 16 * BLOCK, BLOCK * sizeof(float));
    _tile_stored(3, block_out + 16 * BLOCK + 16, BLOCK * sizeof(float));
}

/* Each block of 32 rows of x (48 KB for K = 768) stays in L1 while W streams from L2; taking
 * several row blocks per slice of W instead (W in L1, x from L2) measured slower. */
static void linear_rows(void *context, int64_t first_block, int64_t last_block) {
    job *j = (job *)context;
    float block_out[BLOCK * BLOCK] __attribute__((aligned(64)));
    uint16_t *tail = NULL;
    const int64_t full_blocks = j->m / BLOCK; /* blocks from here on are partial (at most one) */
    if (last_block > full_blocks) {           /* the last, partial block: a zero-padded copy */
        tail = (uint16_t *)calloc((size_t)BLOCK * j->k, sizeof(uint16_t));
        if (!tail) {
            j->failed = 1;
            return;
        }
        memcpy(tail, j->x + full_blocks * BLOCK * j->k, (size_t)(j->m - full_blocks * BLOCK) * j->k * sizeof(uint16_t));
    }
    configure_tiles();
    for (int64_t b = first_block; b < last_block; b++) {
        const int64_t row0 = b * BLOCK;
        const int rows = (int)(j->m - row0 < BLOCK ? j->m - row0 : BLOCK);
        const uint16_t *a = rows < BLOCK ? tail : j->x + row0 * j->k;
        for (int64_t nb = 0; nb < j->n / BLOCK; nb++) {
            tile_block(j, a, nb, block_out);
            epilogue(j, block_out, row0, rows, nb * BLOCK);
        }
    }
    _tile_release();
    free(tail);
}

/* out = x @ W^T + bias (see the header); returns 0, or -1 on bad sizes or no memory. */
int scalr_amx_linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w_packed, int64_t n,
                     const float *bias, void *out, int mode, int relu, int threads) {
    if (k % BLOCK || n % BLOCK || m < 0 || threads < 1 || (mode != 0 && mode != 1)) return -1;
    job j = {x, m, k, n, w_packed, bias, out, mode, relu, 0};
    int64_t blocks = (m + BLOCK - 1) / BLOCK;
    if (blocks > 0) parallel_for(blocks, threads, linear_rows, &j);
    return j.failed ? -1 : 0;
}

typedef struct {
    const float *x;
    uint16_t *out;
    int64_t c;
    float eps;
} norm_job;

static void normalize_rows(void *context, int64_t first, int64_t last) {
    const norm_job *j = (const norm_job *)context;
    const int64_t c = j->c;
    for (int64_t r = first; r < last; r++) {
        const float *row = j->x + r * c;
        /* Deviations from the row's first value are exact for a row whose mean dwarfs its spread,
         * where summing the raw values would lose the spread to rounding. */
        const __m512 shift = _mm512_set1_ps(row[0]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < c; i += 16) sum = _mm512_add_ps(sum, _mm512_sub_ps(_mm512_loadu_ps(row + i), shift));
        const __m512 offset = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / (float)c);
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < c; i += 16) {
            __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), shift), offset);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)c + j->eps));
        uint16_t *dst = j->out + r * c;
        for (int64_t i = 0; i < c; i += 16) {
            __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), shift), offset);
            _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(d, rstd)));
        }
    }
}

/* out (M, C) bf16 = (x - row mean) / sqrt(row variance + eps), two passes in float32; -1 on bad sizes. */
int scalr_layernorm_bf16(const float *x, int64_t m, int64_t c, float eps, uint16_t *out, int threads) {
    if (c % 16 || c <= 0 || m < 0 || threads < 1) return -1;
    norm_job j = {x, out, c, eps};
    if (m > 0) parallel_for(m, threads, normalize_rows, &j);
    return 0;
}
