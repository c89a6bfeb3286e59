// vitlab's CPU kernels for bf16 inference and training, and float32 training attention, on x86-64 CPUs with AVX-512 BF16 (built at
// first use by vitlab/accel/kernels.py; every caller falls back to PyTorch's kernels without them).
//
// attention: softmax(scale * Q K^T) V per (batch, head) in blocks of 32 query rows, with the whole
//   key row in one block (no online softmax: ViT/CvT rows have at most a few thousand keys). Q K^T
//   and P V are products of 2x2 blocks of 16x16 output tiles (so each loaded tile feeds two
//   products and four accumulators stay independent), with K^T and V packed in VNNI pairs once per
//   (batch, head) (K^T by 16x16 register transposes). On AMX CPUs the tiles are AMX tiles programmed
//   here; elsewhere (AMD Zen 4, Intel Ice Lake / Cooper Lake) the same VNNI-packed operands go through
//   AVX-512 BF16 dot products (vdpbf16ps) in register blocks (`use_amx` picks, at run time). The
//   softmax runs in AVX-512 with a base-2 exponential and leaves the probabilities unnormalised
//   (rounded to bf16 for P V, as in PyTorch's kernel); the 1/sum is applied to the 64-wide output
//   rows instead of the probability rows; the output is written straight into the (B, Nq, H*d)
//   layout the output projection reads. Why hand-written: PyTorch's CPU SDPA spends most of its time
//   outside the products at ViT shapes, and oneDNN's brgemm calls cost more than the 16-row products
//   they run (docs/speed.md: 1.9x SDPA at ViT-S/16 on AMX).
// attention_fwd_f32 / attention_backward_f32: float32 attention for float32 training, every product
//   one register-blocked AVX-512 FMA kernel (see "float32 attention" below).
// layer_norm: four rows at a time, three passes over L1-resident data (mean, centred variance,
//   affine) in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>
#include <cstring>

namespace {
using bf16 = at::BFloat16;

bool amx_permitted() {
  // Linux hands out AMX tile state only on request (once per process; oneDNN asks too)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /*ARCH_REQ_XCOMP_PERM*/, 18 /*XFEATURE_XTILEDATA*/) == 0;
  return ok;
}

// The products' unit: AMX tiles, or AVX-512 BF16 dot products (set by use_amx; false until then, so
// an AMX instruction never runs on a CPU without AMX)
bool g_amx = false;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  if (!g_amx) return;
  TileConfig c;
  for (int i = 0; i < 8; ++i) { c.colsb[i] = 64; c.rows[i] = 16; }
  _tile_loadconfig(&c);
}

// 2^t, t <= 0: a polynomial of 2^f on [-1/2, 1/2] (f = t - round(t)) and vscalefps for the power of
// two. Degree 3 (relative error 8e-5, 25x below bf16's rounding) for the softmax; degree 5 (1.5e-7)
// for GELU's backward, where Phi(x) + x phi(x) cancels near x = -0.75 and 8e-5 would show.
template <int DEG>
inline __m512 exp2_ps(__m512 t) {
  static_assert(DEG == 3 || DEG == 5, "degree 3 or 5");
  static constexpr float c3[] = {0.999928940f, 0.693276242f, 0.242604051f, 0.0550886838f};
  static constexpr float c5[] = {1.00000007f, 0.693146949f, 0.240221218f, 0.0555074262f, 0.00967545975f, 0.00132669704f};
  const float* c = DEG == 3 ? c3 : c5;
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(c[DEG]);
#pragma GCC unroll 5
  for (int i = DEG - 1; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1); }
inline __m512 ld(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void st(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v)); }

// S (R rows, stride ldS floats, n valid columns) -> P (R rows of kp bf16: unnormalised 2^(c (s - max)),
// zero past n), inv = 1 / row sums. R rows at once: their max / exp / sum chains are independent,
// which hides the exponential's ~30-cycle latency (rows of ~200 keys: 2x the one-row loop).
template <int R>
inline void softmax_group(const float* S, int64_t ldS, int64_t n, int64_t kp, bf16* P, float c, float* inv, float* lse) {
  const __m512 vc = _mm512_set1_ps(c);
  __m512 vmax[R], vcm[R], vsum[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) vmax[r] = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) vmax[r] = _mm512_max_ps(vmax[r], _mm512_loadu_ps(S + r * ldS + j));
  if (j < n)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) vmax[r] = _mm512_mask_max_ps(vmax[r], first(n - j), vmax[r], _mm512_maskz_loadu_ps(first(n - j), S + r * ldS + j));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) { vcm[r] = _mm512_set1_ps(c * _mm512_reduce_max_ps(vmax[r])); vsum[r] = _mm512_setzero_ps(); }
  for (j = 0; j + 32 <= n; j += 32) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float* s = S + r * ldS + j;
      __m512 e0 = exp2_ps<3>(_mm512_fmsub_ps(_mm512_loadu_ps(s), vc, vcm[r]));
      __m512 e1 = exp2_ps<3>(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16), vc, vcm[r]));
      vsum[r] = _mm512_add_ps(vsum[r], _mm512_add_ps(e0, e1));
      _mm512_storeu_si512(P + r * kp + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
  }
  for (; j < kp; j += 32) {
    const __mmask16 m0 = first(n - j), m1 = first(n - j - 16);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float* s = S + r * ldS + j;
      __m512 e0 = _mm512_maskz_mov_ps(m0, exp2_ps<3>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m0, s), vc, vcm[r])));
      __m512 e1 = m1 ? _mm512_maskz_mov_ps(m1, exp2_ps<3>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m1, s + 16), vc, vcm[r]))) : _mm512_setzero_ps();
      vsum[r] = _mm512_add_ps(vsum[r], _mm512_add_ps(e0, e1));
      _mm512_storeu_si512(P + r * kp + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float sum = _mm512_reduce_add_ps(vsum[r]);
    inv[r] = 1.0f / sum;
    if (lse) lse[r] = c * _mm512_reduce_max_ps(vmax[r]) + std::log2(sum);  // base-2 log-sum-exp of c s
  }
}


inline void softmax_rows(const float* S, int64_t ldS, int64_t n, int64_t kp, bf16* P, float c, float* inv, float* lse, int64_t rows) {
  int64_t r = 0;
  if (n <= 512) for (; r + 4 <= rows; r += 4) softmax_group<4>(S + r * ldS, ldS, n, kp, P + r * kp, c, inv + r, lse ? lse + r : nullptr);
  for (; r < rows; ++r) softmax_group<1>(S + r * ldS, ldS, n, kp, P + r * kp, c, inv + r, lse ? lse + r : nullptr);  // long rows: enough ILP in one
}


// 16x16 transpose of 32-bit words held in 16 registers (unpack 32, unpack 64, two lane shuffles)
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) { t[2*i] = _mm512_unpacklo_epi32(r[2*i], r[2*i+1]); t[2*i+1] = _mm512_unpackhi_epi32(r[2*i], r[2*i+1]); }
  for (int i = 0; i < 4; ++i) {
    r[4*i] = _mm512_unpacklo_epi64(t[4*i], t[4*i+2]); r[4*i+1] = _mm512_unpackhi_epi64(t[4*i], t[4*i+2]);
    r[4*i+2] = _mm512_unpacklo_epi64(t[4*i+1], t[4*i+3]); r[4*i+3] = _mm512_unpackhi_epi64(t[4*i+1], t[4*i+3]);
  }
  for (int i = 0; i < 2; ++i) for (int j = 0; j < 4; ++j) {
    t[8*i+j] = _mm512_shuffle_i32x4(r[8*i+j], r[8*i+4+j], 0x88); t[8*i+4+j] = _mm512_shuffle_i32x4(r[8*i+j], r[8*i+4+j], 0xdd);
  }
  for (int j = 0; j < 8; ++j) { r[j] = _mm512_shuffle_i32x4(t[j], t[8+j], 0x88); r[8+j] = _mm512_shuffle_i32x4(t[j], t[8+j], 0xdd); }
}

// One 2x2 block of output tiles: C[r][c] (tile 2r+c) = sum over k steps of A_r (tile 4+r) x B_c (tile 6+c).
// Every loaded tile feeds two products, and four independent accumulators keep AMX busy.
// A_r step s: a + r*arow + s*astep (row stride lda bytes); B_c step s: b + s*bstep + c*bcol (stride ldb).
template <int RB, int CB>
inline void amx_block(const char* a, int64_t lda, int64_t arow, int64_t astep, const char* b, int64_t ldb, int64_t bstep,
                      int64_t bcol, int64_t ksteps, float* c, int64_t ldc, int64_t crow) {
  _tile_zero(0); if (CB > 1) _tile_zero(1); if (RB > 1) _tile_zero(2); if (RB > 1 && CB > 1) _tile_zero(3);
  for (int64_t s = 0; s < ksteps; ++s) {
    _tile_loadd(4, a + s * astep, lda);
    _tile_loadd(6, b + s * bstep, ldb);
    if (CB > 1) _tile_loadd(7, b + s * bstep + bcol, ldb);
    _tile_dpbf16ps(0, 4, 6);
    if (CB > 1) _tile_dpbf16ps(1, 4, 7);
    if (RB > 1) { _tile_loadd(5, a + arow + s * astep, lda); _tile_dpbf16ps(2, 5, 6); if (CB > 1) _tile_dpbf16ps(3, 5, 7); }
  }
  _tile_stored(0, c, ldc); if (CB > 1) _tile_stored(1, c + 16, ldc);
  if (RB > 1) { _tile_stored(2, c + crow, ldc); if (CB > 1) _tile_stored(3, c + crow + 16, ldc); }
}

// The same block product without AMX: 8 output rows x CB column tiles at a time in registers (8 x 2
// accumulators: enough independent chains for vdpbf16ps' latency, with B's rows loaded once per 8
// rows from L1). For each pair step r of a k step, B's row r (16 words, one bf16 pair per column) is
// multiplied by row i's pair r broadcast to every lane: exactly AMX's dpbf16ps, one row at a time.
template <int RB, int CB>
inline void avx512_block(const char* a, int64_t lda, int64_t arow, int64_t astep, const char* b, int64_t ldb, int64_t bstep,
                         int64_t bcol, int64_t ksteps, float* c, int64_t ldc, int64_t crow) {
  constexpr int G = 8;
  for (int64_t g0 = 0; g0 < 16 * RB; g0 += G) {
    const char* ag = a + (g0 / 16) * arow + (g0 % 16) * lda;
    float* cg = c + (g0 / 16) * crow + (g0 % 16) * (ldc / 4);
    __m512 acc[G][CB];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 2
      for (int j = 0; j < CB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ksteps; ++s) {
      const char* as = ag + s * astep; const char* bs = b + s * bstep;
#pragma GCC unroll 2
      for (int r = 0; r < 16; ++r) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bs + r * ldb);
        const __m512bh b1 = CB > 1 ? (__m512bh)_mm512_loadu_si512(bs + r * ldb + bcol) : b0;
#pragma GCC unroll 8
        for (int i = 0; i < G; ++i) {
          int32_t pair;
          std::memcpy(&pair, as + i * lda + 4 * r, 4);
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
          if (CB > 1) acc[i][CB - 1] = _mm512_dpbf16_ps(acc[i][CB - 1], av, b1);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i)
#pragma GCC unroll 2
      for (int j = 0; j < CB; ++j) _mm512_storeu_ps(cg + i * (ldc / 4) + 16 * j, acc[i][j]);
  }
}

// One 2x2 block of 16x16 output tiles (see amx_block for the operands' layout; ldc in bytes)
template <int RB, int CB>
inline void tile_block(const char* a, int64_t lda, int64_t arow, int64_t astep, const char* b, int64_t ldb, int64_t bstep,
                       int64_t bcol, int64_t ksteps, float* c, int64_t ldc, int64_t crow) {
  if (g_amx) amx_block<RB, CB>(a, lda, arow, astep, b, ldb, bstep, bcol, ksteps, c, ldc, crow);
  else avx512_block<RB, CB>(a, lda, arow, astep, b, ldb, bstep, bcol, ksteps, c, ldc, crow);
}

// What a parallel region that used tiles hands back: the tile state, and ATen's cached tile
// configuration, which is stale now (so its next brgemm reconfigures)
inline void release_tiles() {
  if (!g_amx) return;
  _tile_release();
  at::native::cpublas::brgemm_release();
}

// C (16*RB rows x 16*nblocks fp32, row stride ldc floats) = A (bf16 rows) x B (VNNI), two column blocks at a time
template <int RB>
inline void gemm_rows(const void* a, int64_t lda, int64_t astep, const char* b, int64_t ldb, int64_t bstep, int64_t bcol,
                      int64_t ksteps, int64_t nblocks, float* c, int64_t ldc) {
  const char* ac = static_cast<const char*>(a);
  int64_t cb = 0;
  for (; cb + 2 <= nblocks; cb += 2)
    tile_block<RB, 2>(ac, lda, 16 * lda, astep, b + cb * bcol, ldb, bstep, bcol, ksteps, c + cb * 16, ldc * 4, 16 * ldc);
  if (cb < nblocks)
    tile_block<RB, 1>(ac, lda, 16 * lda, astep, b + cb * bcol, ldb, bstep, bcol, ksteps, c + cb * 16, ldc * 4, 16 * ldc);
}
}  // namespace

namespace {
// K^T in VNNI pairs for a B operand whose reduction runs over the head dim: dst[c2][j] =
// (X[j][2 c2], X[j][2 c2 + 1]) as one 32-bit word, zero for rows j in [n, n16); 16 rows x 16 words
// at a time by a register transpose. X: n rows of d bf16 (row stride ld elements).
void pack_transposed(const bf16* X, int64_t ld, int64_t n, int64_t n16, int64_t d, uint32_t* dst) {
  const int64_t dh = d / 2;
  for (int64_t j0 = 0; j0 < n16; j0 += 16) {
    for (int64_t c0 = 0; c0 < dh; c0 += 16) {
      __m512i r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j0 + j < n ? _mm512_loadu_si512(reinterpret_cast<const uint32_t*>(X + (j0 + j) * ld) + c0) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t cc = 0; cc < 16; ++cc) _mm512_storeu_si512(&dst[(c0 + cc) * n16 + j0], r[cc]);
    }
  }
}

// X in VNNI pairs for a B operand whose reduction runs over X's rows: dst[j/2][col] =
// (X[j][col], X[j+1][col]), zero for rows in [n, np) (np even). X: n rows of d bf16 (stride ld).
void pack_pairs(const bf16* X, int64_t ld, int64_t n, int64_t np, int64_t d, bf16* dst) {
  const __m512i lo = _mm512_set_epi16(47,15,46,14,45,13,44,12,43,11,42,10,41,9,40,8,39,7,38,6,37,5,36,4,35,3,34,2,33,1,32,0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t j = 0; j < np; j += 2) {
    const bf16* r0 = X + j * ld; const bf16* r1 = r0 + ld;
    bf16* out = dst + j * d;
    for (int64_t col = 0; col < d; col += 32) {
      __m512i a = j < n ? _mm512_loadu_si512(r0 + col) : zero;
      __m512i b = j + 1 < n ? _mm512_loadu_si512(r1 + col) : zero;
      _mm512_storeu_si512(out + 2 * col, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + 2 * col + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// rows x d float32 (row stride d) times s, as bf16 rows of dst (row stride ld elements)
inline void store_rows(const float* O, int64_t rows, int64_t d, float s, bf16* dst, int64_t ld) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t col = 0; col < d; col += 32)
      _mm512_storeu_si512(dst + i * ld + col, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&O[i * d + col + 16]), vs),
                                                                           _mm512_mul_ps(_mm512_loadu_ps(&O[i * d + col]), vs)));
}

// q (B, H, Nq, d), k and v (B, H, N, d) of dtype dt with contiguous last dims, d a multiple of mult
void check_qkv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, at::ScalarType dt = at::kBFloat16,
               int64_t mult = 32) {
  TORCH_CHECK(q.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt,
              dt == at::kFloat ? "float32 q, k, v expected" : "bf16 q, k, v expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "(B, H, N, d) tensors with a contiguous last dim expected");
  TORCH_CHECK(q.size(3) % mult == 0, "head dim must be a multiple of ", mult);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && v.sizes() == k.sizes(),
              "q (B, H, Nq, d), k and v (B, H, N, d) expected");
  TORCH_CHECK(dt != at::kBFloat16 || !g_amx || amx_permitted(), "the OS refused AMX tile state to this process");
}

// The forward; lse (B, H, Nq) float32 or null: each row's base-2 log-sum-exp of scale*log2(e)*s
// (what the backward needs to recompute the probabilities). parts (for measuring): 1 skips packing
// K, V; 2 Q K^T; 4 softmax; 8 P V.
torch::Tensor attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                             int64_t parts, float* lse) {
  check_qkv(q, k, v);
  TORCH_CHECK(scale > 0, "scale must be positive");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2);
  auto out = torch::empty({B, Nq, H * d}, q.options());
  const int64_t N16 = (N + 15) / 16 * 16;   // columns of S (16-key blocks of Q K^T)
  const int64_t Kp = (N + 31) / 32 * 32;    // keys of P V (32-key steps)
  const int64_t dh = d / 2, rblocks = (Nq + 31) / 32;  // blocks of 32 query rows
  const bf16* qp = q.data_ptr<bf16>(); const bf16* kp = k.data_ptr<bf16>(); const bf16* vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float c = (float)scale * 1.44269504088896341f;
  // work items: (batch*head, chunk of query row blocks); chunks only when there are few heads
  const int64_t nthr = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(rblocks, std::max<int64_t>(1, (4 * nthr + B * H - 1) / (B * H)));
  const int64_t per = (rblocks + chunks - 1) / chunks;
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kt(dh * N16), vv(Kp / 2 * d);
    std::vector<float> S(32 * N16), O(32 * d), inv(32);
    std::vector<bf16> P(32 * Kp), qpad(32 * d);
    int64_t packed = -1;
    configure_tiles();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / chunks, ch = it % chunks, b = bh / H, h = bh % H;
      const bf16* qh = qp + b * qs0 + h * qs1; const bf16* kh = kp + b * ks0 + h * ks1; const bf16* vh = vp + b * vs0 + h * vs1;
      if (packed != bh && !(parts & 1)) {
        packed = bh;
        pack_transposed(kh, ks2, N, N16, d, kt.data());
        pack_pairs(vh, vs2, N, Kp, d, reinterpret_cast<bf16*>(vv.data()));
      }
      const int64_t rb1 = std::min(rblocks, (ch + 1) * per);
      for (int64_t rb = ch * per; rb < rb1; ++rb) {
        const int64_t i0 = rb * 32, m = std::min<int64_t>(32, Nq - i0), rows = m > 16 ? 32 : 16;
        const bf16* a = qh + i0 * qs2; int64_t lda = qs2 * 2;
        if (m < rows) {  // last partial block: zero-padded copy (tile loads read 16 rows)
          std::memset(qpad.data(), 0, rows * d * sizeof(bf16));
          for (int64_t i = 0; i < m; ++i) std::memcpy(&qpad[i * d], a + i * qs2, d * sizeof(bf16));
          a = qpad.data(); lda = d * 2;
        }
        const char* ktb = reinterpret_cast<const char*>(kt.data()); const char* vvb = reinterpret_cast<const char*>(vv.data());
        if (!(parts & 2)) {
          if (rows == 32) gemm_rows<2>(a, lda, 64, ktb, N16 * 4, 16 * N16 * 4, 64, d / 32, N16 / 16, S.data(), N16);
          else gemm_rows<1>(a, lda, 64, ktb, N16 * 4, 16 * N16 * 4, 64, d / 32, N16 / 16, S.data(), N16);
        }
        if (!(parts & 4)) softmax_rows(S.data(), N16, N, Kp, P.data(), c, inv.data(), lse ? lse + bh * Nq + i0 : nullptr, m);
        if (!(parts & 8)) {
          if (rows == 32) gemm_rows<2>(P.data(), Kp * 2, 64, vvb, d * 4, 16 * d * 4, 64, Kp / 32, d / 16, O.data(), d);
          else gemm_rows<1>(P.data(), Kp * 2, 64, vvb, d * 4, 16 * d * 4, 64, Kp / 32, d / 16, O.data(), d);
        }
        for (int64_t i = 0; i < m; ++i) store_rows(&O[i * d], 1, d, inv[i], op + ((b * Nq + i0 + i) * H + h) * d, 0);
      }
    }
    release_tiles();
  });
  return out;
}

// 16 x 16 floats (rows of stride ld) transposed into 16 rows of 16 bf16 (dst rows of stride ldd elements)
inline void transpose_to_bf16(const float* src, int64_t ld, bf16* dst, int64_t ldd) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(src + i * ld));
  transpose16(r);
  for (int i = 0; i < 16; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldd), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
}

// one 32-row block of C = A B (A rows of lda bytes) with 16 or 32 valid rows
inline void gemm_block(int64_t rows, const void* a, int64_t lda, const char* b, int64_t ldb, int64_t bstep, int64_t ksteps,
                       int64_t nblocks, float* c, int64_t ldc) {
  if (rows > 16) gemm_rows<2>(a, lda, 64, b, ldb, bstep, 64, ksteps, nblocks, c, ldc);
  else gemm_rows<1>(a, lda, 64, b, ldb, bstep, 64, ksteps, nblocks, c, ldc);
}
}  // namespace

// q: (B, H, Nq, d), k, v: (B, H, N, d), bf16, last dim contiguous, d a multiple of 32.
// Returns (B, Nq, H*d). parts: see attention_impl.
torch::Tensor attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t parts) {
  return attention_impl(q, k, v, scale, parts, nullptr);
}

// The forward for training: (out (B, Nq, H*d), lse (B, H, Nq) float32) for attention_backward_bf16.
std::vector<torch::Tensor> attention_fwd_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto out = attention_impl(q, k, v, scale, 0, lse.data_ptr<float>());
  return {out, lse};
}

// attention's backward, per (batch, head), flash-attention style (the probabilities recomputed from
// Q K^T and the forward's lse, never stored for the whole batch): for each block of 32 query rows,
// S = Q K^T, P = 2^(c S - lse), dP = dO V^T, dS = P (dP - rowsum(dO o O)) * scale, dQ = dS K; P^T and
// dS^T are kept for the head (keys x queries, bf16) and give dV = P^T dO and dK = dS^T Q as two long
// products at the end. Every product runs on AMX tiles; dq, dk, dv (same shapes as q, k, v, any
// strides with a contiguous last dim) are written in place, so q, k and v may be views of one qkv
// tensor and their gradient one buffer. dout, out: (B, Nq, H*d) contiguous; lse from the forward.
// parts (for measuring; 0 in use): skips 1 packing, 2 S and dP, 4 P and dS, 8 dQ, 16 the transposes, 32 dV and dK.
void attention_backward_bf16(torch::Tensor dout, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                             torch::Tensor lse, double scale, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv, int64_t parts) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2);
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && dout.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16
              && dout.numel() == B * Nq * H * d && out.numel() == dout.numel(), "dout and out: contiguous bf16 (B, Nq, H*d)");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == B * H * Nq, "lse: float32 (B, H, Nq)");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() && dq.stride(3) == 1
              && dk.stride(3) == 1 && dv.stride(3) == 1 && dq.scalar_type() == at::kBFloat16 && dk.scalar_type() == at::kBFloat16
              && dv.scalar_type() == at::kBFloat16, "dq, dk, dv: bf16 like q, k, v with a contiguous last dim");
  const int64_t N16 = (N + 15) / 16 * 16, Kp = (N + 31) / 32 * 32, Q32 = (Nq + 31) / 32 * 32;
  const int64_t dh = d / 2, HD = H * d;
  const float c = (float)scale * 1.44269504088896341f, sc = (float)scale;
  const bf16* qp = q.data_ptr<bf16>(); const bf16* kp = k.data_ptr<bf16>(); const bf16* vp = v.data_ptr<bf16>();
  const bf16* gp = dout.data_ptr<bf16>(); const bf16* op = out.data_ptr<bf16>(); const float* lp = lse.data_ptr<float>();
  bf16* dqp = dq.data_ptr<bf16>(); bf16* dkp = dk.data_ptr<bf16>(); bf16* dvp = dv.data_ptr<bf16>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kt(dh * N16), vt(dh * N16);   // K^T, V^T (reduction over d)
    std::vector<bf16> kk(Kp * d), qq(Q32 * d), gg(Q32 * d);  // K, Q, dO in pairs (reduction over keys / queries)
    std::vector<bf16> PT(Kp * Q32), DT(Kp * Q32), Ds(32 * Kp), pad(32 * d);  // P^T, dS^T, dS (block), padded rows
    std::vector<float> S(32 * N16), G(32 * N16), O(32 * d);
    configure_tiles();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bf16* qh = qp + b * q.stride(0) + h * q.stride(1); const bf16* kh = kp + b * k.stride(0) + h * k.stride(1);
      const bf16* vh = vp + b * v.stride(0) + h * v.stride(1);
      const bf16* gh = gp + b * Nq * HD + h * d; const bf16* oh = op + b * Nq * HD + h * d;  // row stride HD
      const float* lh = lp + bh * Nq;
      if (!(parts & 1)) {
      pack_transposed(kh, k.stride(2), N, N16, d, kt.data());
      pack_transposed(vh, v.stride(2), N, N16, d, vt.data());
      pack_pairs(kh, k.stride(2), N, Kp, d, kk.data());
      pack_pairs(qh, q.stride(2), Nq, Q32, d, qq.data());
      pack_pairs(gh, HD, Nq, Q32, d, gg.data());
      }
      const char* ktb = reinterpret_cast<const char*>(kt.data()); const char* vtb = reinterpret_cast<const char*>(vt.data());
      for (int64_t i0 = 0; i0 < Nq; i0 += 32) {
        const int64_t m = std::min<int64_t>(32, Nq - i0), rows = m > 16 ? 32 : 16;
        // S = Q K^T and dP = dO V^T for this block (partial blocks through a zero-padded copy)
        const bf16* a = qh + i0 * q.stride(2); int64_t lda = q.stride(2) * 2;
        const bf16* g = gh + i0 * HD; int64_t ldg = HD * 2;
        if (m < rows) {
          std::memset(pad.data(), 0, 32 * d * sizeof(bf16));
          for (int64_t i = 0; i < m; ++i) std::memcpy(&pad[i * d], a + i * q.stride(2), d * sizeof(bf16));
          a = pad.data(); lda = d * 2;
        }
        if (!(parts & 2)) gemm_block(rows, a, lda, ktb, N16 * 4, 16 * N16 * 4, d / 32, N16 / 16, S.data(), N16);
        if (m < rows) {
          for (int64_t i = 0; i < m; ++i) std::memcpy(&pad[i * d], g + i * HD, d * sizeof(bf16));
          g = pad.data(); ldg = d * 2;
        }
        if (!(parts & 2)) gemm_block(rows, g, ldg, vtb, N16 * 4, 16 * N16 * 4, d / 32, N16 / 16, G.data(), N16);
        // P and dS in float32 (S and G overwritten), dS also as bf16 rows; rows past m and keys past N zero
        for (int64_t i = 0; i < 32 && !(parts & 4); ++i) {
          float* Si = &S[i * N16]; float* Gi = &G[i * N16]; bf16* Di = &Ds[i * Kp];
          if (i >= m) {
            std::memset(Si, 0, N16 * sizeof(float)); std::memset(Gi, 0, N16 * sizeof(float));
            std::memset(Di, 0, Kp * sizeof(bf16));
            continue;
          }
          __m512 acc = _mm512_setzero_ps();
          const bf16* gi = gh + (i0 + i) * HD; const bf16* oi = oh + (i0 + i) * HD;
          for (int64_t col = 0; col < d; col += 16) acc = _mm512_fmadd_ps(ld(gi + col, 0xFFFF), ld(oi + col, 0xFFFF), acc);
          const __m512 vd = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), vl = _mm512_set1_ps(lh[i0 + i]);
          const __m512 vc = _mm512_set1_ps(c), vsc = _mm512_set1_ps(sc);
          for (int64_t j = 0; j < Kp; j += 16) {
            const __mmask16 mk = first(N - j);
            __m512 p = _mm512_maskz_mov_ps(mk, exp2_ps<3>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, Si + j), vc, vl)));
            __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, Gi + j), vd)), vsc);
            if (j < N16) { _mm512_storeu_ps(Si + j, p); _mm512_storeu_ps(Gi + j, ds); }
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(Di + j), (__m256i)_mm512_cvtneps_pbh(ds));
          }
        }
        // dQ = dS K
        if (!(parts & 8)) gemm_block(rows, Ds.data(), Kp * 2, reinterpret_cast<const char*>(kk.data()), d * 4, 16 * d * 4, Kp / 32, d / 16, O.data(), d);
        store_rows(O.data(), m, d, 1.0f, dqp + b * dq.stride(0) + h * dq.stride(1) + i0 * dq.stride(2), dq.stride(2));
        // P^T and dS^T: columns i0 .. i0+31 of the (keys x queries) matrices
        for (int64_t j0 = 0; j0 < N16 && !(parts & 16); j0 += 16)
          for (int64_t r0 = 0; r0 < 32; r0 += 16) {
            transpose_to_bf16(&S[r0 * N16 + j0], N16, &PT[j0 * Q32 + i0 + r0], Q32);
            transpose_to_bf16(&G[r0 * N16 + j0], N16, &DT[j0 * Q32 + i0 + r0], Q32);
          }
      }
      // dV = P^T dO, dK = dS^T Q: 32 keys at a time, the reduction over all queries
      for (int64_t j0 = 0; j0 < N && !(parts & 32); j0 += 32) {
        const int64_t m = std::min<int64_t>(32, N - j0), rows = m > 16 ? 32 : 16;
        gemm_block(rows, &PT[j0 * Q32], Q32 * 2, reinterpret_cast<const char*>(gg.data()), d * 4, 16 * d * 4, Q32 / 32, d / 16, O.data(), d);
        store_rows(O.data(), m, d, 1.0f, dvp + b * dv.stride(0) + h * dv.stride(1) + j0 * dv.stride(2), dv.stride(2));
        gemm_block(rows, &DT[j0 * Q32], Q32 * 2, reinterpret_cast<const char*>(qq.data()), d * 4, 16 * d * 4, Q32 / 32, d / 16, O.data(), d);
        store_rows(O.data(), m, d, 1.0f, dkp + b * dk.stride(0) + h * dk.stride(1) + j0 * dk.stride(2), dk.stride(2));
      }
    }
    release_tiles();
  });
}


// ---------------------------------------------------------------------------- float32 attention
// softmax(scale Q K^T) V and its backward in float32, for float32 training on CPUs where these
// kernels load. Why hand-written: at ViT shapes (197 keys, head dim 64) PyTorch's CPU SDPA runs its
// products at 60-75 GFLOP/s on one Zen 4 core, and MKL's batched products of these small matrices
// at 38-67; register-blocked AVX-512 products over a whole head's rows, with the head's K^T and V^T
// packed once, run near the core's float32 peak (docs/speed.md, "float32 attention kernel").
// Everything is float32 (sums in a fixed order: the same bits for any thread count); the
// exponential is exp2_ps<5> (relative error 1.5e-7, float32's rounding).

// C (R rows x 16*CB floats, row stride ldc) = (acc ? C : 0) + sum over k < K of A(r, k) B_k, with
// A(r, k) = a[r*ars + k*aks] broadcast to every lane and B_k the 16*CB floats at b + k*ldb. One loaded
// B row feeds R products, and R*CB independent accumulators hide the FMA latency.
template <int R, int CB>
inline void f32_block(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool acc) {
  __m512 C[R][CB];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < CB; ++j) C[r][j] = acc ? _mm512_loadu_ps(c + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb; const float* ak = a + k * aks;
    __m512 bv[CB];
#pragma GCC unroll 4
    for (int j = 0; j < CB; ++j) bv[j] = _mm512_loadu_ps(bk + 16 * j);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * ars]);
#pragma GCC unroll 4
      for (int j = 0; j < CB; ++j) C[r][j] = _mm512_fmadd_ps(av, bv[j], C[r][j]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < CB; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, C[r][j]);
}

// rows in [1, R] of one column block (the tail of a row loop picks its R at run time)
template <int R, int CB>
inline void f32_rows(int64_t rows, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                     float* c, int64_t ldc, bool acc) {
  if constexpr (R > 1) {
    if (rows < R) return f32_rows<R - 1, CB>(rows, K, a, ars, aks, b, ldb, c, ldc, acc);
  }
  f32_block<R, CB>(K, a, ars, aks, b, ldb, c, ldc, acc);
}

// C (M x ncols, ncols a multiple of 16; row stride ldc) = (acc ? C : 0) + A B with A(i, k) =
// a[i*ars + k*aks] (M x K) and B's row k the ncols floats at b + k*ldb. Column blocks of 64 (6 rows
// at a time: 24 accumulators), 32 (12 rows) or 16 (12 rows). (Steps over K to keep B's block in L1
// measured slower at these sizes: 101-112 against 114-115 GFLOP/s, K = 197 and 784.)
void f32_gemm(int64_t M, int64_t ncols, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int64_t j = 0; j < ncols;) {
    const int64_t left = ncols - j;
    if (left >= 64) {
      for (int64_t i = 0; i < M; i += 6)
        f32_rows<6, 4>(std::min<int64_t>(6, M - i), K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, acc);
      j += 64;
    } else if (left >= 32) {
      for (int64_t i = 0; i < M; i += 12)
        f32_rows<12, 2>(std::min<int64_t>(12, M - i), K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, acc);
      j += 32;
    } else {
      for (int64_t i = 0; i < M; i += 12)
        f32_rows<12, 1>(std::min<int64_t>(12, M - i), K, a + i * ars, ars, aks, b + j, ldb, c + i * ldc + j, ldc, acc);
      j += 16;
    }
  }
}

// Ask for n rows of d floats (row stride ld) in L2: the next head's rows, while this head computes.
// A head's rows lie 3*H*d floats apart in the qkv projection's output, a stride the hardware
// prefetchers do not follow, and its products would otherwise wait for them row by row.
inline void f32_prefetch_rows(const float* x, int64_t n, int64_t ld, int64_t d) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; c += 16) _mm_prefetch(reinterpret_cast<const char*>(x + j * ld + c), _MM_HINT_T1);
}

// X (n rows of d floats, row stride ld, d a multiple of 16) transposed into dst (d rows of n16
// floats), zero for rows in [n, n16): 16x16 blocks by register transposes
void f32_pack_transposed(const float* X, int64_t ld, int64_t n, int64_t n16, int64_t d, float* dst) {
  for (int64_t j0 = 0; j0 < n16; j0 += 16)
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_loadu_si512(X + (j0 + i) * ld + c0) : _mm512_setzero_si512();
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * n16 + j0, r[i]);
    }
}

// Query rows per block: S and dP of one block are (F32_QB x N16) floats per thread
constexpr int64_t F32_QB = 256;

// One row of P: S[j] (j < n) -> 2^(c S[j] - c max) (unnormalised), returns the row sum and the max
inline float f32_softmax_row(float* S, int64_t n, float c, float* cmax) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first(n - j), S + j));
  const float cm = c * _mm512_reduce_max_ps(mx);
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(cm);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = first(n - j);
    const __m512 p = _mm512_maskz_mov_ps(mk, exp2_ps<5>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, S + j), vc, vm)));
    _mm512_mask_storeu_ps(S + j, mk, p);
    sum = _mm512_add_ps(sum, p);
  }
  *cmax = cm;
  return _mm512_reduce_add_ps(sum);
}

// The forward: (out (B, Nq, H*d) float32, lse (B, H, Nq): each row's base-2 log-sum-exp of
// scale*log2(e)*s, which the backward recomputes the probabilities from). q (B, H, Nq, d), k, v
// (B, H, N, d), any strides with a contiguous last dim (views of one qkv projection output).
std::vector<torch::Tensor> attention_fwd_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  check_qkv(q, k, v, at::kFloat, 16);
  TORCH_CHECK(scale > 0, "scale must be positive");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2), HD = H * d;
  auto out = torch::empty({B, Nq, HD}, q.options());
  auto lse = torch::empty({B, H, Nq}, q.options());
  const int64_t N16 = (N + 15) / 16 * 16;
  const float c = (float)scale * 1.44269504088896341f;
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>(); float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(d * N16), S(std::min(F32_QB, Nq) * N16), inv(std::min(F32_QB, Nq));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1); const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      if (bh + 1 < end) {
        const int64_t b1 = (bh + 1) / H, h1 = (bh + 1) % H;
        f32_prefetch_rows(qp + b1 * q.stride(0) + h1 * q.stride(1), Nq, q.stride(2), d);
        f32_prefetch_rows(kp + b1 * k.stride(0) + h1 * k.stride(1), N, k.stride(2), d);
        f32_prefetch_rows(vp + b1 * v.stride(0) + h1 * v.stride(1), N, v.stride(2), d);
      }
      f32_pack_transposed(kh, k.stride(2), N, N16, d, kt.data());
      for (int64_t i0 = 0; i0 < Nq; i0 += F32_QB) {
        const int64_t m = std::min(F32_QB, Nq - i0);
        f32_gemm(m, N16, d, qh + i0 * q.stride(2), q.stride(2), 1, kt.data(), N16, S.data(), N16, false);
        float* o = op + (b * Nq + i0) * HD + h * d;
        for (int64_t i = 0; i < m; ++i) {
          float cm;
          const float s = f32_softmax_row(&S[i * N16], N, c, &cm);
          inv[i] = 1.0f / s;
          lp[bh * Nq + i0 + i] = cm + std::log2(s);
        }
        // O = P V (unnormalised P), then each row times 1 / its sum
        f32_gemm(m, d, N, S.data(), N16, 1, vh, v.stride(2), o, HD, false);
        for (int64_t i = 0; i < m; ++i) {
          const __m512 s = _mm512_set1_ps(inv[i]);
          for (int64_t col = 0; col < d; col += 16) _mm512_storeu_ps(o + i * HD + col, _mm512_mul_ps(_mm512_loadu_ps(o + i * HD + col), s));
        }
      }
    }
  });
  return {out, lse};
}

// The backward, per (batch, head) and block of query rows: S = Q K^T, P = 2^(c S - lse),
// dP = dO V^T, dS = P (dP - rowsum(dO o O)) * scale, dQ = dS K, and over the blocks dV += P^T dO,
// dK += dS^T Q (the transposed operands read in place: the products broadcast P's and dS's entries
// column-wise). dq, dk, dv (shapes of q, k, v, any strides with a contiguous last dim) are written,
// so q, k, v may be views of one qkv tensor and their gradient one buffer. dout, out: (B, Nq, H*d)
// contiguous float32; lse from attention_fwd_f32.
void attention_backward_f32(torch::Tensor dout, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                            torch::Tensor lse, double scale, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  check_qkv(q, k, v, at::kFloat, 16);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), N = k.size(2), HD = H * d;
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && dout.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat
              && dout.numel() == B * Nq * HD && out.numel() == dout.numel(), "dout and out: contiguous float32 (B, Nq, H*d)");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == B * H * Nq, "lse: float32 (B, H, Nq)");
  TORCH_CHECK(dq.sizes() == q.sizes() && dk.sizes() == k.sizes() && dv.sizes() == v.sizes() && dq.stride(3) == 1
              && dk.stride(3) == 1 && dv.stride(3) == 1 && dq.scalar_type() == at::kFloat && dk.scalar_type() == at::kFloat
              && dv.scalar_type() == at::kFloat, "dq, dk, dv: float32 like q, k, v with a contiguous last dim");
  const int64_t N16 = (N + 15) / 16 * 16;
  const float c = (float)scale * 1.44269504088896341f, sc = (float)scale;
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const float* gp = dout.data_ptr<float>(); const float* op = out.data_ptr<float>(); const float* lp = lse.data_ptr<float>();
  float* dqp = dq.data_ptr<float>(); float* dkp = dk.data_ptr<float>(); float* dvp = dv.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t QB = std::min(F32_QB, Nq);
    std::vector<float> kt(d * N16), vt(d * N16), S(QB * N16), G(QB * N16);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1); const float* kh = kp + b * k.stride(0) + h * k.stride(1);
      const float* vh = vp + b * v.stride(0) + h * v.stride(1);
      const float* gh = gp + b * Nq * HD + h * d; const float* oh = op + b * Nq * HD + h * d;  // row stride HD
      const float* lh = lp + bh * Nq;
      float* dqh = dqp + b * dq.stride(0) + h * dq.stride(1);
      float* dkh = dkp + b * dk.stride(0) + h * dk.stride(1); float* dvh = dvp + b * dv.stride(0) + h * dv.stride(1);
      if (bh + 1 < end) {
        const int64_t b1 = (bh + 1) / H, h1 = (bh + 1) % H;
        f32_prefetch_rows(qp + b1 * q.stride(0) + h1 * q.stride(1), Nq, q.stride(2), d);
        f32_prefetch_rows(kp + b1 * k.stride(0) + h1 * k.stride(1), N, k.stride(2), d);
        f32_prefetch_rows(vp + b1 * v.stride(0) + h1 * v.stride(1), N, v.stride(2), d);
        f32_prefetch_rows(gp + b1 * Nq * HD + h1 * d, Nq, HD, d);
        f32_prefetch_rows(op + b1 * Nq * HD + h1 * d, Nq, HD, d);
      }
      f32_pack_transposed(kh, k.stride(2), N, N16, d, kt.data());
      f32_pack_transposed(vh, v.stride(2), N, N16, d, vt.data());
      for (int64_t i0 = 0; i0 < Nq; i0 += QB) {
        const int64_t m = std::min(QB, Nq - i0);
        f32_gemm(m, N16, d, qh + i0 * q.stride(2), q.stride(2), 1, kt.data(), N16, S.data(), N16, false);
        f32_gemm(m, N16, d, gh + i0 * HD, HD, 1, vt.data(), N16, G.data(), N16, false);
        const __m512 vc = _mm512_set1_ps(c), vsc = _mm512_set1_ps(sc);
        for (int64_t i = 0; i < m; ++i) {
          float* Si = &S[i * N16]; float* Gi = &G[i * N16];
          const float* gi = gh + (i0 + i) * HD; const float* oi = oh + (i0 + i) * HD;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t col = 0; col < d; col += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(gi + col), _mm512_loadu_ps(oi + col), acc);
          const __m512 vd = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), vl = _mm512_set1_ps(lh[i0 + i]);
          for (int64_t j = 0; j < N; j += 16) {
            const __mmask16 mk = first(N - j);
            const __m512 p = _mm512_maskz_mov_ps(mk, exp2_ps<5>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, Si + j), vc, vl)));
            const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, Gi + j), vd)), vsc);
            _mm512_mask_storeu_ps(Si + j, mk, p);
            _mm512_mask_storeu_ps(Gi + j, mk, ds);
          }
        }
        // dQ = dS K for this block's rows; dV, dK: reductions over every block's rows
        f32_gemm(m, d, N, G.data(), N16, 1, kh, k.stride(2), dqh + i0 * dq.stride(2), dq.stride(2), false);
        f32_gemm(N, d, m, S.data(), 1, N16, gh + i0 * HD, HD, dvh, dv.stride(2), i0 > 0);
        f32_gemm(N, d, m, G.data(), 1, N16, qh + i0 * q.stride(2), q.stride(2), dkh, dk.stride(2), i0 > 0);
      }
    }
  });
}


// R rows of layer norm at once: the rows' chains (sum -> mean -> centred squares -> rstd -> affine)
// are independent, so interleaving them hides the horizontal reductions' latency, which dominates
// short rows (CvT's 64-wide stage 1 rows: one row at a time spends most of its time waiting)
template <int R>
inline void layer_norm_rows(const bf16* xr, bf16* orow, int64_t D, const bf16* wp, const bf16* bp, float eps,
                            float* mean = nullptr, float* rs = nullptr) {
  __m512 s[R], q[R], vm[R], rstd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) { s[r] = _mm512_setzero_ps(); q[r] = _mm512_setzero_ps(); }
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = first(D - j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) s[r] = _mm512_add_ps(s[r], ld(xr + r * D + j, m));
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) vm[r] = _mm512_set1_ps(_mm512_reduce_add_ps(s[r]) / D);
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = first(D - j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 c = _mm512_maskz_sub_ps(m, ld(xr + r * D + j, m), vm[r]);
      q[r] = _mm512_fmadd_ps(c, c, q[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) rstd[r] = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(q[r]) / D + eps));
  if (mean != nullptr)  // the statistics the backward needs (training)
    for (int r = 0; r < R; ++r) { mean[r] = _mm512_cvtss_f32(vm[r]); rs[r] = _mm512_cvtss_f32(rstd[r]); }
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = first(D - j);
    const __m512 wv = ld(wp + j, m), bv = ld(bp + j, m);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(ld(xr + r * D + j, m), vm[r]), rstd[r]);
      st(orow + r * D + j, _mm512_fmadd_ps(c, wv, bv), m);
    }
  }
}

// Layer norm of the last dim. with_stats: also the per-row mean and 1/std (float32, shaped like x
// without its last dim) that layer_norm_backward_bf16 takes (training).
std::vector<torch::Tensor> layer_norm_stats_bf16(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps, bool with_stats) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "bf16 x, weight, bias expected");
  TORCH_CHECK(w.is_contiguous() && b.is_contiguous() && w.numel() == x.size(-1) && b.numel() == x.size(-1), "weight and bias must match the last dim");
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  auto opt = x.options().dtype(at::kFloat);
  auto mean = with_stats ? torch::empty({R}, opt) : torch::Tensor(), rstd = with_stats ? torch::empty({R}, opt) : torch::Tensor();
  float* mp = with_stats ? mean.data_ptr<float>() : nullptr; float* rp = with_stats ? rstd.data_ptr<float>() : nullptr;
  const bf16* xp = xc.data_ptr<bf16>(); bf16* op = out.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>(); const bf16* bp = b.data_ptr<bf16>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) layer_norm_rows<4>(xp + r * D, op + r * D, D, wp, bp, (float)eps, mp ? mp + r : nullptr, rp ? rp + r : nullptr);
    for (; r < r1; ++r) layer_norm_rows<1>(xp + r * D, op + r * D, D, wp, bp, (float)eps, mp ? mp + r : nullptr, rp ? rp + r : nullptr);
  });
  if (!with_stats) return {out};
  auto sizes = x.sizes().vec(); sizes.pop_back();
  return {out, mean.view(sizes), rstd.view(sizes)};
}

torch::Tensor layer_norm_bf16(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps) {
  return layer_norm_stats_bf16(x, w, b, eps, false)[0];
}

namespace {
// R rows of the layer norm's backward: with xh = (x - mean) rstd and gw = g w,
// dx = rstd (gw - mean(gw) - xh mean(gw xh)); the rows' g xh and g are added to dw, db (float32).
// Two passes over L1-resident rows; R rows at once for the same reason as the forward.
template <int R>
inline void layer_norm_backward_rows(const bf16* gr, const bf16* xr, bf16* dxr, int64_t D, const bf16* wp,
                                     const float* mean, const float* rs, float* dw, float* db) {
  __m512 vm[R], vr[R], s1[R], s2[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) { vm[r] = _mm512_set1_ps(mean[r]); vr[r] = _mm512_set1_ps(rs[r]); s1[r] = _mm512_setzero_ps(); s2[r] = _mm512_setzero_ps(); }
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = first(D - j);
    const __m512 wv = ld(wp + j, m);
    __m512 dwv = _mm512_maskz_loadu_ps(m, dw + j), dbv = _mm512_maskz_loadu_ps(m, db + j);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 g = ld(gr + r * D + j, m);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(ld(xr + r * D + j, m), vm[r]), vr[r]);
      const __m512 gw = _mm512_mul_ps(g, wv);
      s1[r] = _mm512_add_ps(s1[r], gw);
      s2[r] = _mm512_fmadd_ps(gw, xh, s2[r]);
      dwv = _mm512_fmadd_ps(g, xh, dwv);
      dbv = _mm512_add_ps(dbv, g);
    }
    _mm512_mask_storeu_ps(dw + j, m, dwv); _mm512_mask_storeu_ps(db + j, m, dbv);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) { s1[r] = _mm512_set1_ps(_mm512_reduce_add_ps(s1[r]) / D); s2[r] = _mm512_set1_ps(_mm512_reduce_add_ps(s2[r]) / D); }
  for (int64_t j = 0; j < D; j += 16) {
    const __mmask16 m = first(D - j);
    const __m512 wv = ld(wp + j, m);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(ld(xr + r * D + j, m), vm[r]), vr[r]);
      const __m512 gw = _mm512_mul_ps(ld(gr + r * D + j, m), wv);
      st(dxr + r * D + j, _mm512_mul_ps(vr[r], _mm512_sub_ps(_mm512_sub_ps(gw, s1[r]), _mm512_mul_ps(xh, s2[r]))), m);
    }
  }
}
}  // namespace

// Backward of layer_norm_stats_bf16: returns [dx (bf16), dw, db (float32)]. The rows are split in a
// fixed number of chunks whose dw / db partial sums are added in chunk order, so the result does not
// depend on the thread count or on scheduling (bit-exact resume of training).
std::vector<torch::Tensor> layer_norm_backward_bf16(torch::Tensor g, torch::Tensor x, torch::Tensor mean, torch::Tensor rstd, torch::Tensor w) {
  TORCH_CHECK(g.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 grad, x, weight expected");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat, "float32 mean and rstd expected");
  TORCH_CHECK(g.sizes() == x.sizes() && w.is_contiguous() && w.numel() == x.size(-1), "grad like x and a weight matching its last dim expected");
  const int64_t D = x.size(-1), R = x.numel() / D;
  TORCH_CHECK(mean.numel() == R && rstd.numel() == R, "one mean and rstd per row expected");
  auto gc = g.contiguous(), xc = x.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  auto dx = torch::empty_like(xc);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, R / 64)), per = (R + chunks - 1) / chunks;
  auto part = torch::zeros({chunks, 2, D}, x.options().dtype(at::kFloat));
  const bf16* gp = gc.data_ptr<bf16>(); const bf16* xp = xc.data_ptr<bf16>(); const bf16* wp = w.data_ptr<bf16>();
  const float* mp = mc.data_ptr<float>(); const float* rp = rc.data_ptr<float>();
  bf16* dp = dx.data_ptr<bf16>(); float* pp = part.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* dw = pp + c * 2 * D; float* db = dw + D;
      const int64_t r1 = std::min(R, (c + 1) * per);
      int64_t r = c * per;
      for (; r + 4 <= r1; r += 4) layer_norm_backward_rows<4>(gp + r * D, xp + r * D, dp + r * D, D, wp, mp + r, rp + r, dw, db);
      for (; r < r1; ++r) layer_norm_backward_rows<1>(gp + r * D, xp + r * D, dp + r * D, D, wp, mp + r, rp + r, dw, db);
    }
  });
  auto sums = torch::zeros({2, D}, part.options());
  float* sp = sums.data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c)  // in chunk order
    for (int64_t j = 0; j < 2 * D; ++j) sp[j] += pp[c * 2 * D + j];
  return {dx, sums[0], sums[1]};
}

// GELU(x) = x Phi(x) in place on bf16, with Phi from a piecewise cubic on 32 intervals of [-6, 4)
// (coefficients fitted in float64 by vitlab/accel/kernels.py; |error| < 4e-6, so the output's
// relative error stays ~10x below bf16's rounding). Each interval's 4 coefficients come from
// 32-entry tables held in registers (vpermt2ps), so a vector costs ~10 arithmetic operations
// instead of PyTorch's erf (an exponential and a long polynomial). Outside [-6, 4) Phi is taken
// at the upper end (Phi(4) = 1 - 3e-5: x itself after bf16 rounding) and GELU is 0 below -6 (|GELU| < 6e-9 there).
namespace {
struct PhiTable {  // Phi's 32 intervals x 4 coefficients as 32-entry register tables (c[j][0..1]: c_j)
  __m512 c[4][2];
  explicit PhiTable(const torch::Tensor& coefs) {
    TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.is_contiguous() && coefs.numel() == 128, "(32, 4) float32 coefficients expected");
    const float* cf = coefs.data_ptr<float>();
    float tab[4][32];
    for (int i = 0; i < 32; ++i) for (int j = 0; j < 4; ++j) tab[j][i] = cf[i * 4 + j];
    for (int j = 0; j < 4; ++j) { c[j][0] = _mm512_loadu_ps(tab[j]); c[j][1] = _mm512_loadu_ps(tab[j] + 16); }
  }
  // Phi(x) with x clamped to [-6, 4) (not masked below -6: the callers do)
  inline __m512 operator()(__m512 xv) const {
    const __m512 t = _mm512_fmadd_ps(_mm512_min_ps(_mm512_max_ps(xv, _mm512_set1_ps(-6.0f)), _mm512_set1_ps(3.99999f)),
                                     _mm512_set1_ps(3.2f), _mm512_set1_ps(19.2f));  // in [0, 32)
    const __m512i k = _mm512_cvttps_epi32(t);
    const __m512 u = _mm512_sub_ps(t, _mm512_cvtepi32_ps(k));
    __m512 q = _mm512_permutex2var_ps(c[3][0], k, c[3][1]);
    q = _mm512_fmadd_ps(q, u, _mm512_permutex2var_ps(c[2][0], k, c[2][1]));
    q = _mm512_fmadd_ps(q, u, _mm512_permutex2var_ps(c[1][0], k, c[1][1]));
    return _mm512_fmadd_ps(q, u, _mm512_permutex2var_ps(c[0][0], k, c[0][1]));
  }
};

inline void st32(bf16* p, __m512 y0, __m512 y1, __mmask16 m0, __mmask16 m1) {
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(y1, y0);
  if (m1 == 0xFFFF) _mm512_storeu_si512(p, packed);
  else _mm512_mask_storeu_epi16(p, ((__mmask32)m1 << 16) | m0, packed);
}

// dst[i..i+15] = f(i, mask of the valid lanes) over n elements, 32 per step (two 16-lane halves,
// one 64-byte store), in parallel: the loop of the element-wise kernels below
template <class F>
void map_bf16(bf16* dst, int64_t n, F f) {
  at::parallel_for(0, (n + 31) / 32, 2048, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i = blk * 32;
      const __mmask16 m0 = first(n - i), m1 = first(n - i - 16);
      const __m512 y0 = f(i, m0), y1 = f(i + 16, m1);
      st32(dst + i, y0, y1, m0, m1);
    }
  });
}

// dst = GELU(src), n elements (dst may be src)
void gelu_run(const bf16* src, bf16* dst, int64_t n, const PhiTable& phi) {
  map_bf16(dst, n, [&](int64_t i, __mmask16 m) {
    const __m512 xv = ld(src + i, m);
    // 0 below -6 (|GELU| < 6e-9); NaN stays NaN
    return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(xv, _mm512_set1_ps(-6.0f), _CMP_NLT_UQ), xv, phi(xv));
  });
}
}  // namespace

void gelu_bf16_(torch::Tensor x, torch::Tensor coefs) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "a contiguous bf16 tensor expected");
  const PhiTable phi(coefs);
  gelu_run(x.data_ptr<bf16>(), x.data_ptr<bf16>(), x.numel(), phi);
}

// out-of-place GELU (training keeps its input for the backward)
torch::Tensor gelu_bf16(torch::Tensor x, torch::Tensor coefs) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "a bf16 tensor expected");
  const PhiTable phi(coefs);
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  gelu_run(xc.data_ptr<bf16>(), y.data_ptr<bf16>(), xc.numel(), phi);
  return y;
}

// GELU's backward: dx = g GELU'(x), GELU'(x) = Phi(x) + x phi(x), with Phi from the same cubic table
// (0 below -6) and the density phi(x) = exp(-x^2 / 2) / sqrt(2 pi) from exp2_ps<5> (|error of GELU'| < 4e-6);
// float32 arithmetic, one bf16 rounding, as PyTorch's kernel
torch::Tensor gelu_backward_bf16(torch::Tensor g, torch::Tensor x, torch::Tensor coefs) {
  TORCH_CHECK(g.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && g.sizes() == x.sizes(), "bf16 grad and input of one shape expected");
  const PhiTable phi(coefs);
  auto gc = g.contiguous(), xc = x.contiguous();
  auto dx = torch::empty_like(xc);
  const bf16* gp = gc.data_ptr<bf16>(); const bf16* xp = xc.data_ptr<bf16>(); bf16* dp = dx.data_ptr<bf16>();
  map_bf16(dp, xc.numel(), [&](int64_t i, __mmask16 m) {
    const __m512 xv = ld(xp + i, m);
    const __m512 cdf = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xv, _mm512_set1_ps(-6.0f), _CMP_NLT_UQ), phi(xv));
    const __m512 pdf = _mm512_mul_ps(exp2_ps<5>(_mm512_mul_ps(_mm512_mul_ps(xv, xv), _mm512_set1_ps(-0.72134752044448170f))),
                                     _mm512_set1_ps(0.39894228040143268f));  // exp(-x^2 / 2) / sqrt(2 pi)
    return _mm512_mul_ps(ld(gp + i, m), _mm512_fmadd_ps(xv, pdf, cdf));
  });
  return dx;
}

// CvT's convolutional projections (inference, BatchNorm folded into the conv): the three 3x3
// depthwise convs of one token map -- q at stride 1, k and v at stride s (padding 1) -- in one pass
// per image, written straight into (B, p + n, C) token tensors with the p prefix (class) tokens
// copied in front. Replaces three oneDNN convs (each re-reading the map), the copy that made the
// patch tokens dense and the three concatenations with the class token. Each image is first
// widened into a zero-bordered float32 map (in L2), then every output vector is 9 fused multiply-
// adds from it with the 16 channels' weights held in registers; float32 sums, one bf16 rounding.
namespace {
inline __m512 ld16(const bf16* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16)); }
inline void st16(bf16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

// One output row of NOUT 3x3 depthwise convolutions of the same windows at stride s (q alone, or k
// and v together from the same loads), for one 16-channel block of the float32 map [row][channel
// block][column][16] (r0: the window's top row; RS floats between rows). Where s is the compile-time
// S (1 or 2), four output columns per step: each loaded column feeds every window of the four that
// covers it (6 loaded columns per row at stride 1, 9 at stride 2, instead of 12); the rest one column
// at a time. Each output's products are summed in the same order either way (the same bits).
template <int NOUT, int S>
inline void dw3x3_row(const float* r0, int64_t RS, int64_t s, int64_t wo, int64_t C, const __m512 (&wt)[NOUT][9],
                      const __m512 (&bias)[NOUT], bf16* const (&out)[NOUT]) {
  int64_t xx = 0;
  if constexpr (S > 0) {
    for (; xx + 4 <= wo; xx += 4) {
      __m512 a[NOUT][4];
      for (int n = 0; n < NOUT; ++n) for (int o = 0; o < 4; ++o) a[n][o] = bias[n];
#pragma GCC unroll 3
      for (int ty = 0; ty < 3; ++ty) {
        const float* r = r0 + ty * RS + xx * S * 16;
#pragma GCC unroll 9
        for (int j = 0; j < 3 * S + 3; ++j) {
          const __m512 iv = _mm512_loadu_ps(r + j * 16);
#pragma GCC unroll 4
          for (int o = 0; o < 4; ++o)
            if (j - S * o >= 0 && j - S * o < 3)
#pragma GCC unroll 2
              for (int n = 0; n < NOUT; ++n) a[n][o] = _mm512_fmadd_ps(iv, wt[n][3 * ty + j - S * o], a[n][o]);
        }
      }
      for (int o = 0; o < 4; ++o) for (int n = 0; n < NOUT; ++n) st16(out[n] + (xx + o) * C, a[n][o]);
    }
  }
  for (; xx < wo; ++xx) {
    const float* in = r0 + xx * s * 16;
    __m512 a[NOUT];
    for (int n = 0; n < NOUT; ++n) a[n] = bias[n];
#pragma GCC unroll 3
    for (int ty = 0; ty < 3; ++ty)
#pragma GCC unroll 3
      for (int tx = 0; tx < 3; ++tx) {
        const __m512 iv = _mm512_loadu_ps(in + ty * RS + tx * 16);
#pragma GCC unroll 2
        for (int n = 0; n < NOUT; ++n) a[n] = _mm512_fmadd_ps(iv, wt[n][3 * ty + tx], a[n]);
      }
    for (int n = 0; n < NOUT; ++n) st16(out[n] + xx * C, a[n]);
  }
}
}  // namespace

// x: (B, p + h*w, C) bf16 (tokens contiguous in C and in token order; any batch stride); wt: (3, 9, C)
// float32 weights of q, k, v by tap (row-major 3x3); bias: (3, C) float32. Returns [q, k, v] (q
// undefined unless want_q).
std::vector<torch::Tensor> dwconv_qkv_bf16(torch::Tensor x, int64_t p, int64_t h, int64_t w, torch::Tensor wt,
                                           torch::Tensor bias, int64_t s, bool want_q, torch::Tensor ln_w,
                                           torch::Tensor ln_b, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "(B, N, C) bf16 tokens with dense rows expected");
  const int64_t B = x.size(0), C = x.size(2);
  TORCH_CHECK(C % 16 == 0 && x.size(1) == p + h * w && s >= 1, "token count / width do not match the map");
  TORCH_CHECK(wt.scalar_type() == at::kFloat && wt.is_contiguous() && wt.numel() == 27 * C, "(3, 9, C) float32 weights expected");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == 3 * C, "(3, C) float32 biases expected");
  const bool ln = ln_w.numel() > 0;
  TORCH_CHECK(!ln || (ln_w.scalar_type() == at::kFloat && ln_b.scalar_type() == at::kFloat && ln_w.is_contiguous()
                      && ln_b.is_contiguous() && ln_w.numel() == C && ln_b.numel() == C), "(C,) float32 layer-norm weight and bias expected");
  const float* gp = ln ? ln_w.data_ptr<float>() : nullptr; const float* betap = ln ? ln_b.data_ptr<float>() : nullptr;
  const int64_t hk = (h - 1) / s + 1, wk = (w - 1) / s + 1, W2 = w + 2, xb = x.stride(0);
  auto opt = x.options().memory_format(at::MemoryFormat::Contiguous);
  torch::Tensor q = want_q ? torch::empty({B, p + h * w, C}, opt) : torch::Tensor();
  torch::Tensor k = torch::empty({B, p + hk * wk, C}, opt), v = torch::empty({B, p + hk * wk, C}, opt);
  const bf16* xp = x.data_ptr<bf16>();
  bf16* qp = want_q ? q.data_ptr<bf16>() : nullptr;
  bf16* kp = k.data_ptr<bf16>(); bf16* vp = v.data_ptr<bf16>();
  const float* wp = wt.data_ptr<float>(); const float* bp = bias.data_ptr<float>();
  const int64_t CB = C / 16, RS = CB * W2 * 16;  // float32 map: [row][channel block][column][16], rows/columns zero-bordered
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf((h + 2) * RS, 0.0f);  // the border stays zero; the interior is rewritten per image
    std::vector<float> row(C);
    float* f = buf.data();
    // token -> float32 (layer-normed when ln: mean, centred variance, affine, as layer_norm_bf16),
    // written with stride `step` floats between channel blocks
    auto widen = [&](const bf16* src, float* dst, int64_t step) {
      if (!ln) {
        for (int64_t cb = 0; cb < CB; ++cb) _mm512_storeu_ps(dst + cb * step, ld16(src + cb * 16));
        return;
      }
      __m512 sum = _mm512_setzero_ps(), sq = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 16) { const __m512 v = ld16(src + c); _mm512_storeu_ps(&row[c], v); sum = _mm512_add_ps(sum, v); }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
      for (int64_t c = 0; c < C; c += 16) { const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(&row[c]), mean); sq = _mm512_fmadd_ps(d, d, sq); }
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / C + (float)eps));
      for (int64_t cb = 0; cb < CB; ++cb) {
        const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(&row[cb * 16]), mean), rstd);
        _mm512_storeu_ps(dst + cb * step, _mm512_fmadd_ps(d, _mm512_loadu_ps(gp + cb * 16), _mm512_loadu_ps(betap + cb * 16)));
      }
    };
    for (int64_t b = b0; b < b1; ++b) {
      const bf16* xi = xp + b * xb;
      for (int64_t y = 0; y < h; ++y)
        for (int64_t xx = 0; xx < w; ++xx) widen(xi + (p + y * w + xx) * C, f + (y + 1) * RS + (xx + 1) * 16, W2 * 16);
      bf16* ko = kp + b * (p + hk * wk) * C; bf16* vo = vp + b * (p + hk * wk) * C;
      bf16* qo = want_q ? qp + b * (p + h * w) * C : nullptr;
      for (int64_t t = 0; t < p; ++t) {  // the class token(s) bypass the convolutions
        bf16* dsts[3] = {ko + t * C, vo + t * C, qo ? qo + t * C : nullptr};
        if (ln) {
          std::vector<float> nrm(C);
          widen(xi + t * C, nrm.data(), 16);
          for (bf16* d : dsts) if (d) for (int64_t c = 0; c < C; c += 16) st16(d + c, _mm512_loadu_ps(&nrm[c]));
        } else {
          for (bf16* d : dsts) if (d) std::memcpy(d, xi + t * C, C * sizeof(bf16));
        }
      }
      for (int64_t y = 0; y < h && qo; ++y)  // q: stride 1
        for (int64_t cb = 0; cb < CB; ++cb) {
          const int64_t c = cb * 16;
          __m512 wq[1][9], bq[1] = {_mm512_loadu_ps(bp + c)};
          for (int t = 0; t < 9; ++t) wq[0][t] = _mm512_loadu_ps(wp + t * C + c);
          bf16* const out[1] = {qo + (p + y * w) * C + c};
          dw3x3_row<1, 1>(f + y * RS + cb * W2 * 16, RS, 1, w, C, wq, bq, out);
        }
      for (int64_t y = 0; y < hk; ++y)  // k and v: stride s, from the same loads
        for (int64_t cb = 0; cb < CB; ++cb) {
          const int64_t c = cb * 16;
          __m512 wkv[2][9], bkv[2] = {_mm512_loadu_ps(bp + C + c), _mm512_loadu_ps(bp + 2 * C + c)};
          for (int t = 0; t < 9; ++t) { wkv[0][t] = _mm512_loadu_ps(wp + (9 + t) * C + c); wkv[1][t] = _mm512_loadu_ps(wp + (18 + t) * C + c); }
          bf16* const out[2] = {ko + (p + y * wk) * C + c, vo + (p + y * wk) * C + c};
          const float* r0 = f + y * s * RS + cb * W2 * 16;
          if (s == 2) dw3x3_row<2, 2>(r0, RS, s, wk, C, wkv, bkv, out);
          else if (s == 1) dw3x3_row<2, 1>(r0, RS, s, wk, C, wkv, bkv, out);
          else dw3x3_row<2, 0>(r0, RS, s, wk, C, wkv, bkv, out);
        }
    }
  });
  return {q, k, v};
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolution's weight gradient (groups = channels, dilation 1, zero padding p, stride s):
//   dW[c][ky][kx] = sum over b, yo, xo of g[b][yo][xo][c] * x[b][yo*s + ky - p][xo*s + kx - p][c],
//   db[c] = sum of g[b][.][.][c],
// from channels-last g (B, Ho, Wo, C) and x (B, H, W, C), bf16 or float32, summed in float32.
// Why hand-written: oneDNN's depthwise weight gradient took 190 ms (float32) and 340 ms (bf16) for
// one ConvMixer-768/32 layer at batch 32 on a 2-core Zen 4, over half of the training step, for
// 2.5 GFLOP. Here each thread owns 16 channels at a time: one image's plane of them, converted to
// float32 and zero-padded, sits in L2, and every kernel row ky is one pass over it with the k taps'
// sums in registers (4 output columns at a time share the loaded input vectors). The sums' order
// does not depend on the thread count: training stays bit-for-bit reproducible.
inline void load_plane(const bf16* src, int64_t C, float* dst) { _mm512_storeu_ps(dst, ld(src, 0xFFFF)); }
inline void load_plane(const float* src, int64_t C, float* dst) { _mm512_storeu_ps(dst, _mm512_loadu_ps(src)); }

// One kernel row's taps over the output rows: acc[kx] += g[yo][xo] * xp[yo*s + ky][xo*s + kx]
template <int K, int S>
inline void dw_taps_row(const float* xp, int64_t Wp, const float* gp, int64_t Ho, int64_t Wo, int64_t ky, float* out) {
  __m512 acc[K];
#pragma GCC unroll 9
  for (int t = 0; t < K; ++t) acc[t] = _mm512_setzero_ps();
  constexpr int NW = 3 * S + K;  // input columns that 4 outputs' taps read
  for (int64_t yo = 0; yo < Ho; ++yo) {
    const float* xr = xp + (yo * S + ky) * Wp * 16;
    const float* gr = gp + yo * Wo * 16;
    int64_t xo = 0;
    for (; xo + 4 <= Wo; xo += 4) {
      __m512 gv[4], xv[NW];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) gv[j] = _mm512_loadu_ps(gr + (xo + j) * 16);
#pragma GCC unroll 15
      for (int w = 0; w < NW; ++w) xv[w] = _mm512_loadu_ps(xr + (xo * S + w) * 16);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 9
        for (int t = 0; t < K; ++t) acc[t] = _mm512_fmadd_ps(gv[j], xv[j * S + t], acc[t]);
    }
    for (; xo < Wo; ++xo) {
      const __m512 gv = _mm512_loadu_ps(gr + xo * 16);
#pragma GCC unroll 9
      for (int t = 0; t < K; ++t) acc[t] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(xr + (xo * S + t) * 16), acc[t]);
    }
  }
#pragma GCC unroll 9
  for (int t = 0; t < K; ++t) _mm512_storeu_ps(out + t * 16, _mm512_add_ps(_mm512_loadu_ps(out + t * 16), acc[t]));
}

// Any k and s: the same sums, taps one at a time
inline void dw_taps_row_any(const float* xp, int64_t Wp, const float* gp, int64_t Ho, int64_t Wo, int64_t ky,
                            int64_t k, int64_t s, float* out) {
  for (int64_t t = 0; t < k; ++t) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t yo = 0; yo < Ho; ++yo)
      for (int64_t xo = 0; xo < Wo; ++xo)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(gp + (yo * Wo + xo) * 16), _mm512_loadu_ps(xp + ((yo * s + ky) * Wp + xo * s + t) * 16), acc);
    _mm512_storeu_ps(out + t * 16, _mm512_add_ps(_mm512_loadu_ps(out + t * 16), acc));
  }
}

using TapsRow = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*);
TapsRow taps_row_for(int64_t k, int64_t s) {
  if (s == 1) switch (k) { case 3: return dw_taps_row<3, 1>; case 5: return dw_taps_row<5, 1>; case 7: return dw_taps_row<7, 1>; case 9: return dw_taps_row<9, 1>; }
  if (s == 2) switch (k) { case 3: return dw_taps_row<3, 2>; case 5: return dw_taps_row<5, 2>; case 7: return dw_taps_row<7, 2>; }
  return nullptr;
}

template <typename T>
void dwconv_weight_grad_impl(const T* g, const T* x, int64_t B, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t C,
                             int64_t k, int64_t s, int64_t p, float* dw, float* db) {
  const int64_t Hp = std::max(H + 2 * p, (Ho - 1) * s + k), Wp = std::max(W + 2 * p, (Wo - 1) * s + k);
  const TapsRow row = taps_row_for(k, s);
  at::parallel_for(0, C / 16, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xp(Hp * Wp * 16, 0.0f), gp(Ho * Wo * 16), acc(k * k * 16), bacc(16);
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * 16;
      std::fill(acc.begin(), acc.end(), 0.0f);
      __m512 bsum = _mm512_setzero_ps();
      for (int64_t b = 0; b < B; ++b) {
        // this image's 16 channels: x zero-padded by p (the border stays zero), g as it is
        for (int64_t y = 0; y < H; ++y)
          for (int64_t xx = 0; xx < W; ++xx) load_plane(x + ((b * H + y) * W + xx) * C + c0, C, &xp[((y + p) * Wp + xx + p) * 16]);
        for (int64_t i = 0; i < Ho * Wo; ++i) {
          load_plane(g + (b * Ho * Wo + i) * C + c0, C, &gp[i * 16]);
          bsum = _mm512_add_ps(bsum, _mm512_loadu_ps(&gp[i * 16]));
        }
        for (int64_t ky = 0; ky < k; ++ky) {
          if (row) row(xp.data(), Wp, gp.data(), Ho, Wo, ky, &acc[ky * k * 16]);
          else dw_taps_row_any(xp.data(), Wp, gp.data(), Ho, Wo, ky, k, s, &acc[ky * k * 16]);
        }
      }
      for (int64_t t = 0; t < k * k; ++t)
        for (int64_t l = 0; l < 16; ++l) dw[(c0 + l) * k * k + t] = acc[t * 16 + l];
      _mm512_storeu_ps(db + c0, bsum);
    }
  });
}

// g: (B, Ho, Wo, C), x: (B, H, W, C), both contiguous, same dtype (bf16 or float32), C a multiple of 16.
// Returns (dW (C, k*k) float32, db (C) float32).
std::vector<torch::Tensor> dwconv_weight_grad(torch::Tensor g, torch::Tensor x, int64_t k, int64_t s, int64_t p) {
  TORCH_CHECK(g.dim() == 4 && x.dim() == 4 && g.is_contiguous() && x.is_contiguous(), "g (B, Ho, Wo, C) and x (B, H, W, C) contiguous expected");
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat), "g and x: both bf16 or both float32");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), Ho = g.size(1), Wo = g.size(2);
  TORCH_CHECK(g.size(0) == B && g.size(3) == C && C % 16 == 0, "g and x must share batch and channels (a multiple of 16)");
  TORCH_CHECK(k >= 1 && s >= 1 && p >= 0 && Ho == (H + 2 * p - k) / s + 1 && Wo == (W + 2 * p - k) / s + 1,
              "g's size does not follow from x's with this kernel size, stride and padding");
  auto dw = torch::empty({C, k * k}, x.options().dtype(at::kFloat));
  auto db = torch::empty({C}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16)
    dwconv_weight_grad_impl(g.data_ptr<bf16>(), x.data_ptr<bf16>(), B, H, W, Ho, Wo, C, k, s, p, dw.data_ptr<float>(), db.data_ptr<float>());
  else
    dwconv_weight_grad_impl(g.data_ptr<float>(), x.data_ptr<float>(), B, H, W, Ho, Wo, C, k, s, p, dw.data_ptr<float>(), db.data_ptr<float>());
  return {dw, db};
}

// Products on AMX tiles when `want` and this CPU and OS allow it (else AVX-512 BF16); returns the choice
bool use_amx(bool want) {
  g_amx = want && amx_permitted() && at::native::cpublas::could_pack(at::kBFloat16);
  return g_amx;
}
bool amx_in_use() { return g_amx; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while a kernel runs: inference streams (vitlab.accel.ops.run_in_streams)
  // and any other Python threads keep running
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("attention_bf16", &attention_bf16, nogil);
  m.def("attention_fwd_bf16", &attention_fwd_bf16, nogil);
  m.def("attention_backward_bf16", &attention_backward_bf16, nogil);
  m.def("attention_fwd_f32", &attention_fwd_f32, nogil);
  m.def("attention_backward_f32", &attention_backward_f32, nogil);
  m.def("layer_norm_bf16", &layer_norm_bf16, nogil);
  m.def("gelu_bf16_", &gelu_bf16_, nogil);
  m.def("gelu_bf16", &gelu_bf16, nogil);
  m.def("gelu_backward_bf16", &gelu_backward_bf16, nogil);
  m.def("layer_norm_stats_bf16", &layer_norm_stats_bf16, nogil);
  m.def("layer_norm_backward_bf16", &layer_norm_backward_bf16, nogil);
  m.def("dwconv_qkv_bf16", &dwconv_qkv_bf16, nogil);
  m.def("dwconv_weight_grad", &dwconv_weight_grad, nogil);
  m.def("use_amx", &use_amx);
  m.def("amx_in_use", &amx_in_use);
}
