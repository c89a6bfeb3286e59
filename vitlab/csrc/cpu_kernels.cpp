// vitlab's CPU kernels for bf16 inference on CPUs with AMX (built at first use by
// vitlab/models/cpu_kernels.py; every caller falls back to PyTorch's kernels without them).
//
// attention: softmax(scale * Q K^T) V per (batch, head), with the whole key row in one block (no
//   online softmax: ViT/CvT rows have at most a few thousand keys). Q K^T and P V run on AMX
//   through ATen's oneDNN batch-reduce GEMM (at::native::cpublas::brgemm) with K and V packed in
//   VNNI pairs here; the softmax runs in AVX-512 with a base-2 exponential (one FMA folds the
//   scale and the change of base); probabilities are rounded to bf16 for P V, as in PyTorch's
//   kernel; the output is written straight into the (B, Nq, H*d) layout the output projection
//   reads. Why hand-written: PyTorch's CPU SDPA spends most of its time outside the products at
//   ViT shapes (measured 1.24x slower at ViT-S/16, 1.9x at CvT-13 stage 3; docs/speed.md).
// layer_norm: one row per pass over L1-resident data (mean, centred variance, affine) in float32,
//   1.5-2x PyTorch's bf16 CPU layer norm at widths 64-768.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <vector>
#include <cstring>

namespace {
using bf16 = at::BFloat16;

// 2^t for t <= 0 (fp32): t = n + f with n = round(t), |f| <= 1/2; 2^f by its degree-5 Taylor
// polynomial (relative error < 3e-6, far below bf16's 4e-3), 2^n applied exactly by vscalefps
// (which also flushes very negative t to 0).
inline __m512 exp2_ps(__m512 t) {
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline void store_bf16(bf16* dst, __m512 v, __mmask16 m) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16(dst, m, h);
}

// softmax(scale * s) over n entries of fp32 row s, written as bf16 to p; p[n..npad) = 0
inline void softmax_row(const float* s, bf16* p, int64_t n, int64_t npad, float scale, float* tmp) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
  if (j < n) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + j));
  const float m = _mm512_reduce_max_ps(vmax), c = scale * 1.44269504088896341f;
  // softmax(scale * s) = 2^(c s - c max) / sum: the scale and the change of base in one FMA
  const __m512 vc = _mm512_set1_ps(c), vcm = _mm512_set1_ps(c * m);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, vcm));
    _mm512_storeu_ps(tmp + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (j < n) {
    __m512 e = _mm512_maskz_mov_ps(tail, exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + j), vc, vcm)));
    _mm512_storeu_ps(tmp + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (j = 0; j + 16 <= npad; j += 16) store_bf16(p + j, _mm512_mul_ps(_mm512_loadu_ps(tmp + j), inv), 0xFFFF);
  if (j < npad) {
    __mmask16 t2 = (__mmask16)((1u << (npad - j)) - 1);
    store_bf16(p + j, _mm512_mul_ps(_mm512_loadu_ps(tmp + j), inv), t2);
  }
}

inline void store_row_bf16(const float* src, bf16* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store_bf16(dst + j, _mm512_loadu_ps(src + j), 0xFFFF);
  if (j < n) store_bf16(dst + j, _mm512_loadu_ps(src + j), (__mmask16)((1u << (n - j)) - 1));
}
}  // namespace

// q: (B, H, Nq, d), k, v: (B, H, N, d), bf16, last dim contiguous. Returns (B, Nq, H*d).
torch::Tensor attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t q_block, int64_t parts) {
  TORCH_CHECK(q_block > 0, "q_block must be positive");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16, "bf16 q, k, v expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "(B, H, N, d) tensors with a contiguous last dim expected");
  TORCH_CHECK(q.size(3) % 32 == 0 && k.stride(2) % 2 == 0, "head dim must be a multiple of 32");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "q (B, H, Nq, d), k and v (B, H, N, d) expected");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2);
  auto out = torch::empty({B, Nq, H * d}, q.options());
  const int64_t Npad = (N + 63) / 64 * 64;     // row length of logits / probabilities
  const int64_t Neven = (N + 1) / 2 * 2;       // K of the P V product (VNNI pairs)
  const bf16* qp = q.data_ptr<bf16>(); const bf16* kp = k.data_ptr<bf16>(); const bf16* vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float fscale = (float)scale;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> kpack(d * Npad), vpack(Neven * d), P(q_block * Npad);
    std::vector<float> S(q_block * Npad), O(q_block * d), tmp(Npad);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bf16* qh = qp + b * qs0 + h * qs1; const bf16* kh = kp + b * ks0 + h * ks1; const bf16* vh = vp + b * vs0 + h * vs1;
      if (!(parts & 1)) {
        // K^T in VNNI pairs, 64-column blocks: kpack[blk][c/2][j][c%2] = K[blk*64 + j][c],
        // i.e. a 32-bit transpose of K viewed as (N x d/2) uint32
        const uint32_t* k32 = reinterpret_cast<const uint32_t*>(kh);
        uint32_t* kp32 = reinterpret_cast<uint32_t*>(kpack.data());
        const int64_t kstr = ks2 / 2, dh = d / 2;
        for (int64_t n0 = 0; n0 < N; n0 += 64) {
          const int64_t w = std::min<int64_t>(64, N - n0);
          uint32_t* dst = kp32 + n0 * dh;
          for (int64_t j = 0; j < w; ++j) {
            const uint32_t* src = k32 + (n0 + j) * kstr;
            for (int64_t c = 0; c < dh; ++c) dst[c * 64 + j] = src[c];
          }
        }
        // V in VNNI pairs: vpack[j/2][c][j%2] = V[j][c] (a zero row pads odd N)
        const __m512i lo = _mm512_set_epi16(47,15,46,14,45,13,44,12,43,11,42,10,41,9,40,8,39,7,38,6,37,5,36,4,35,3,34,2,33,1,32,0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        const __m512i zero = _mm512_setzero_si512();
        for (int64_t j = 0; j < N; j += 2) {
          const bf16* r0 = vh + j * vs2; const bf16* r1 = r0 + vs2;
          bf16* dst = vpack.data() + j * d;
          for (int64_t c = 0; c < d; c += 32) {
            __m512i a = _mm512_loadu_si512(r0 + c);
            __m512i bb = (j + 1 < N) ? _mm512_loadu_si512(r1 + c) : zero;
            _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo, bb));
            _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, bb));
          }
        }
      }
      for (int64_t i0 = 0; i0 < Nq; i0 += q_block) {
        const int64_t m = std::min(q_block, Nq - i0);
        if (!(parts & 2)) for (int64_t n0 = 0; n0 < N; n0 += 64)
          at::native::cpublas::brgemm(m, std::min<int64_t>(64, N - n0), d, qs2, 64, Npad, false, qh + i0 * qs2, kpack.data() + n0 * d, S.data() + n0);
        if (!(parts & 4)) for (int64_t i = 0; i < m; ++i) softmax_row(&S[i * Npad], &P[i * Npad], N, Neven, fscale, tmp.data());
        if (!(parts & 8)) at::native::cpublas::brgemm(m, d, Neven, Npad, d, d, false, P.data(), vpack.data(), O.data());
        for (int64_t i = 0; i < m; ++i) store_row_bf16(&O[i * d], op + ((b * Nq + i0 + i) * H + h) * d, d);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

namespace {
inline __m512 ld(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void st(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v)); }
}  // namespace

torch::Tensor layer_norm_bf16(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "bf16 x, weight, bias expected");
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && w.numel() == x.size(-1) && b.numel() == x.size(-1), "weight and bias must match the last dim");
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const bf16* xp = xc.data_ptr<bf16>(); bf16* op = out.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>(); const bf16* bp = b.data_ptr<bf16>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bf16* xr = xp + r * D; bf16* orow = op + r * D;
      __m512 s = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = D - j >= 16 ? 0xFFFF : (__mmask16)((1u << (D - j)) - 1);
        s = _mm512_add_ps(s, ld(xr + j, m));
      }
      const float mean = _mm512_reduce_add_ps(s) / D;
      const __m512 vm = _mm512_set1_ps(mean);
      __m512 q = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = D - j >= 16 ? 0xFFFF : (__mmask16)((1u << (D - j)) - 1);
        __m512 c = _mm512_maskz_sub_ps(m, ld(xr + j, m), vm);
        q = _mm512_fmadd_ps(c, c, q);
      }
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(q) / D + (float)eps));
      for (int64_t j = 0; j < D; j += 16) {
        __mmask16 m = D - j >= 16 ? 0xFFFF : (__mmask16)((1u << (D - j)) - 1);
        __m512 c = _mm512_mul_ps(_mm512_sub_ps(ld(xr + j, m), vm), rstd);
        st(orow + j, _mm512_fmadd_ps(c, ld(wp + j, m), ld(bp + j, m)), m);
      }
    }
  });
  return out;
}

bool available() { return at::native::cpublas::could_pack(at::kBFloat16); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_bf16", &attention_bf16);
  m.def("layer_norm_bf16", &layer_norm_bf16);
  m.def("available", &available);
}
