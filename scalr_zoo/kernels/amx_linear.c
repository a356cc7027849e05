/* bfloat16 linear layers on Intel AMX tiles, for CPUs whose AMX oneDNN cannot use.
 *
 * out = x @ W^T + bias, x (M, K) bf16 row-major, W given prepacked (see
 * scalr_zoo/_amx.py: pack_weight), accumulation in float32. Two epilogues:
 *   mode 0: out (M, N) bf16 = [relu](x @ W^T + bias)
 *   mode 1: out (M, N) fp32 += x @ W^T + bias
 * K and N must be multiples of 32; any M. Work is split over `threads`
 * POSIX threads by blocks of 32 rows.
 *
 * Tiles: 0-3 hold a 32 x 32 float32 output block (2 x 2 tiles of 16 x 16),
 * 4-5 two 16-row slices of x (16 x 32 bf16), 6-7 two 16-column slices of W
 * in the VNNI layout (16 pairs of k x 16 columns x 2).
 */
#include <immintrin.h>
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
    int64_t first_block, last_block;
    int status;
} job;

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

/* One block of 32 rows of x (a, row stride k elements) against every column of W. */
static void row_block(const job *j, const uint16_t *a, int64_t row0, int rows, float *block_out) {
    const int64_t k_blocks = j->k / BLOCK;
    const int64_t stride = j->k * (int64_t)sizeof(uint16_t);
    for (int64_t nb = 0; nb < j->n / BLOCK; nb++) {
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
        epilogue(j, block_out, row0, rows, nb * BLOCK);
    }
}

static void *run_job(void *arg) {
    job *j = (job *)arg;
    float block_out[BLOCK * BLOCK] __attribute__((aligned(64)));
    uint16_t *tail = NULL;
    configure_tiles();
    for (int64_t b = j->first_block; b < j->last_block; b++) {
        int64_t row0 = b * BLOCK;
        int rows = (int)(j->m - row0 < BLOCK ? j->m - row0 : BLOCK);
        const uint16_t *a = j->x + row0 * j->k;
        if (rows < BLOCK) { /* last, partial block: zero-padded copy */
            tail = (uint16_t *)calloc((size_t)BLOCK * j->k, sizeof(uint16_t));
            if (!tail) {
                j->status = -1;
                break;
            }
            memcpy(tail, a, (size_t)rows * j->k * sizeof(uint16_t));
            a = tail;
        }
        row_block(j, a, row0, rows, block_out);
    }
    _tile_release();
    free(tail);
    return NULL;
}

/* out = x @ W^T + bias (see the header); returns 0, or -1 on bad sizes or no memory. */
int scalr_amx_linear(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w_packed, int64_t n,
                     const float *bias, void *out, int mode, int relu, int threads) {
    if (k % BLOCK || n % BLOCK || m < 0 || threads < 1 || (mode != 0 && mode != 1)) return -1;
    int64_t blocks = (m + BLOCK - 1) / BLOCK;
    if (blocks == 0) return 0;
    if (threads > blocks) threads = (int)blocks;
    job jobs[64];
    pthread_t ids[64];
    if (threads > 64) threads = 64;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){x, m, k, n, w_packed, bias, out, mode, relu,
                        blocks * t / threads, blocks * (t + 1) / threads, 0};
    }
    int started[64] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++) {
        if (!started[t]) run_job(&jobs[t]); /* could not start a thread: do its share here */
    }
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        if (jobs[t].status) status = jobs[t].status;
    }
    return status;
}
