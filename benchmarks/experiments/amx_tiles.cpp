// Microbenchmark of AMX tile operations on one core (benchmarks/experiments/amx_tiles.py builds it).
// What one 16x16x32 bf16 tile product (tdpbf16ps), a 1 KB tile load and a 1 KB tile store cost,
// and what a 2x2 block of output tiles costs with 2 k-steps (attention's Q K^T with 64-wide heads)
// and with 12 (a linear layer with K = 384), data in L1. Explains why vitlab's attention products
// run below the AMX peak: each output tile of Q K^T gets two products and one store.
#include <torch/extension.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <vector>

namespace {
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

// ns per operation of the chosen kind: 0 products only, 1 loads only, 2 stores only,
// 3 a 2x2 block with ksteps products per tile (zero, loads, products, stores) per product
double tile_ns(int64_t kind, int64_t ksteps, int64_t reps) {
  TORCH_CHECK(syscall(SYS_arch_prctl, 0x1023, 18) == 0, "the OS refused AMX tile state");
  TileConfig c;
  for (int i = 0; i < 8; ++i) { c.colsb[i] = 64; c.rows[i] = 16; }
  _tile_loadconfig(&c);
  std::vector<uint16_t> a(32 * 64 * ksteps, 0x3c00), b(32 * 64 * ksteps, 0x3c00);
  std::vector<float> out(32 * 32);
  const char* ap = reinterpret_cast<const char*>(a.data()); const char* bp = reinterpret_cast<const char*>(b.data());
  int64_t ops = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    if (kind == 0) { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); ops += 4; }
    else if (kind == 1) { _tile_loadd(4, ap, 64); _tile_loadd(5, ap + 1024, 64); _tile_loadd(6, bp, 64); _tile_loadd(7, bp + 1024, 64); ops += 4; }
    else if (kind == 2) { _tile_stored(0, out.data(), 128); _tile_stored(1, out.data() + 16, 128); _tile_stored(2, out.data() + 512, 128); _tile_stored(3, out.data() + 528, 128); ops += 4; }
    else if (kind == 4) {  // as 3, with the next step's loads issued as soon as their tile is free
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      _tile_loadd(4, ap, 64); _tile_loadd(6, bp, 64); _tile_loadd(7, bp + 1024, 64); _tile_loadd(5, ap + 1024, 64);
      for (int64_t s = 0; s < ksteps; ++s) {
        const int64_t n = s + 1 < ksteps ? s + 1 : s;  // the last step reloads its own tiles (harmless)
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(4, ap + n * 2048, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_loadd(6, bp + n * 2048, 64);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(5, ap + n * 2048 + 1024, 64); _tile_loadd(7, bp + n * 2048 + 1024, 64);
      }
      _tile_stored(0, out.data(), 128); _tile_stored(1, out.data() + 16, 128); _tile_stored(2, out.data() + 512, 128); _tile_stored(3, out.data() + 528, 128);
      ops += 4 * ksteps;
    } else {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t s = 0; s < ksteps; ++s) {
        _tile_loadd(4, ap + s * 2048, 64); _tile_loadd(6, bp + s * 2048, 64); _tile_loadd(7, bp + s * 2048 + 1024, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, ap + s * 2048 + 1024, 64); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, out.data(), 128); _tile_stored(1, out.data() + 16, 128); _tile_stored(2, out.data() + 512, 128); _tile_stored(3, out.data() + 528, 128);
      ops += 4 * ksteps;
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return s / ops * 1e9;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("tile_ns", &tile_ns); }
