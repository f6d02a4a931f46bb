/* The dense CRF's mean-field iterations as a plain C loop over the TensorFlow backend's
   stacked lattice (deeplab_tf/crf/mean_field.py: one splat, d + 1 blurs and one slice per
   iteration, then the softmax). Not part of the package: bench/crf_floor.py compiles it
   to measure what compiled code would gain over TensorFlow's sparse products. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void softmax_row(const float *x, float *out, int C) {
  float m = x[0];
  for (int c = 1; c < C; c++) m = x[c] > m ? x[c] : m;
  float s = 0.f;
  for (int c = 0; c < C; c++) { out[c] = expf(x[c] - m); s += out[c]; }
  float r = 1.f / s;
  for (int c = 0; c < C; c++) out[c] *= r;
}

/* q [P, C] <- mean field from the unary [P, C]: points' K vertices (vertex_of) with
   splat and slice weights [P, K], D blur directions of M vertices (up [D, M]: the
   neighbour n1 of each vertex or -1), as LatticeFilter computes them. Returns 0, or -1
   for more than 256 classes or no memory. */
int mean_field(int P, int K, int M, int C, int D, const int32_t *vertex_of,
                const float *splat, const float *slice, const int64_t *up,
                const float *unary, int iters, float *q) {
  float *lat = aligned_alloc(64, ((size_t)M * C * 4 + 63) / 64 * 64);
  float *tmp = aligned_alloc(64, ((size_t)M * C * 4 + 63) / 64 * 64);
  float buf[256];
  if (C > 256 || !lat || !tmp) { free(lat); free(tmp); return -1; }
  for (int p = 0; p < P; p++) {
    for (int c = 0; c < C; c++) buf[c] = -unary[(size_t)p * C + c];
    softmax_row(buf, q + (size_t)p * C, C);
  }
  for (int it = 0; it < iters; it++) {
    memset(lat, 0, (size_t)M * C * 4);
    for (int p = 0; p < P; p++) {
      const float *qp = q + (size_t)p * C;
      for (int k = 0; k < K; k++) {
        float w = splat[(size_t)p * K + k];
        float *L = lat + (size_t)vertex_of[(size_t)p * K + k] * C;
        for (int c = 0; c < C; c++) L[c] += w * qp[c];
      }
    }
    for (int j = 0; j < D; j++) {
      memcpy(tmp, lat, (size_t)M * C * 4);
      const int64_t *u = up + (size_t)j * M;
      for (int v = 0; v < M; v++) {
        int64_t n = u[v];
        if (n < 0) continue;
        float *tv = tmp + (size_t)v * C, *tn = tmp + (size_t)n * C;
        const float *lv = lat + (size_t)v * C, *ln = lat + (size_t)n * C;
        for (int c = 0; c < C; c++) { tv[c] += 0.5f * ln[c]; tn[c] += 0.5f * lv[c]; }
      }
      float *s = lat; lat = tmp; tmp = s;
    }
    for (int p = 0; p < P; p++) {
      for (int c = 0; c < C; c++) buf[c] = -unary[(size_t)p * C + c];
      for (int k = 0; k < K; k++) {
        float w = slice[(size_t)p * K + k];
        const float *L = lat + (size_t)vertex_of[(size_t)p * K + k] * C;
        for (int c = 0; c < C; c++) buf[c] += w * L[c];
      }
      softmax_row(buf, q + (size_t)p * C, C);
    }
  }
  free(lat); free(tmp);
  return 0;
}
