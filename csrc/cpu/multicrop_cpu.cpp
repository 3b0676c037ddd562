// CPU body of stellar::multicrop: one crop per task of at::parallel_for, each crop made in a
// planar float scratch buffer (separable resize -> flip -> brightness, then the colour steps
// once the contrast mean is known, then the separable blur, then normalize and cast). The hot
// loops work on four pixels at a time through compiler vector types (no intrinsics), with the
// same per-pixel arithmetic as the scalar helpers of multicrop.h, which finish the tails.
#include "../multicrop.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

namespace stellar {
namespace {

// Source indices (absolute, edge-replicated) and weights of one axis of a crop window.
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l1;
};

void make_axis(Axis& a, int64_t start, int64_t window, int64_t extent, int64_t out_size,
               bool flip) {
  a.i0.resize(out_size);
  a.i1.resize(out_size);
  a.l1.resize(out_size);
  const double scale = resize_scale(window, out_size);
  for (int64_t o = 0; o < out_size; ++o) {
    int64_t j0, j1;
    float l;
    linear_source(o, window, scale, &j0, &j1, &l);
    const int64_t d = flip ? out_size - 1 - o : o;
    a.i0[d] = clamp_index(start + j0, extent);
    a.i1[d] = clamp_index(start + j1, extent);
    a.l1[d] = l;
  }
}

// Four lanes of float / int32 as GCC / Clang vector extensions: SSE2 on x86-64, NEON on ARM,
// no intrinsics. Comparisons give lane masks (all bits set where true); `select` blends by one.
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));

inline f4 load4(const float* p) {
  f4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f4 v) { __builtin_memcpy(p, &v, sizeof v); }
inline f4 splat4(float x) { return f4{x, x, x, x}; }
inline f4 select4(i4 mask, f4 a, f4 b) {
  return reinterpret_cast<f4>((reinterpret_cast<i4>(a) & mask) | (reinterpret_cast<i4>(b) & ~mask));
}
// Same lane results as max2 / min2 (a > b ? a : b), so maxps / minps on x86.
inline f4 max4(f4 a, f4 b) { return select4(a > b, a, b); }
inline f4 min4(f4 a, f4 b) { return select4(a < b, a, b); }
// v - trunc(v) for 0 <= v < 2^31 (the remainder by 1 of shift_hue).
inline f4 frac4(f4 v) { return v - __builtin_convertvector(__builtin_convertvector(v, i4), f4); }

inline f4 hsv_channel4(float n, f4 h6, f4 v, f4 s) {
  f4 k = splat4(n) + h6;
  k = select4(k >= splat4(6.f), k - splat4(6.f), k);
  const f4 w = max4(splat4(0.f), min4(min4(k, splat4(4.f) - k), splat4(1.f)));
  return v - v * s * w;
}

inline f4 clamp4(f4 v) {
  return select4(v < splat4(0.f), splat4(0.f), select4(v > splat4(1.f), splat4(1.f), v));
}

inline f4 gray4(f4 r, f4 g, f4 b) {
  return splat4(0.2989f) * r + splat4(0.587f) * g + splat4(0.114f) * b;
}

// shift_hue on four pixels with the same per-lane arithmetic; the sector choice is a mask
// blend, not a branch (random colours made the branches of the scalar loop mispredict).
inline void shift_hue4(f4& R, f4& G, f4& B, float hue) {
  const f4 tiny = splat4(1e-30f), one = splat4(1.f);
  const f4 maxc = max4(R, max4(G, B));
  const f4 minc = min4(R, min4(G, B));
  const f4 range = maxc - minc;
  const f4 s = range / max4(maxc, tiny);
  const f4 inv = one / max4(range, tiny);
  const f4 rc = (maxc - R) * inv, gc = (maxc - G) * inv, bc = (maxc - B) * inv;
  const f4 hr = bc - gc, hg = splat4(2.f) + rc - bc, hb = splat4(4.f) + gc - rc;
  f4 h = select4(maxc == R, hr, select4(maxc == G, hg, hb));
  h = frac4(h * splat4(1.f / 6.f) + one);
  h = frac4(h + splat4(hue) + one);
  const f4 h6 = h * splat4(6.f);
  R = hsv_channel4(5.f, h6, maxc, s);
  G = hsv_channel4(3.f, h6, maxc, s);
  B = hsv_channel4(1.f, h6, maxc, s);
}

// color_after_brightness over whole planes: one loop per step (each vectorizes; measured a
// little faster than one fused pass with the steps as branches inside it).
void color_planes(float* __restrict r, float* __restrict g, float* __restrict b, int64_t n,
                  const ColorParams& c) {
  if (c.contrast != 1.f) {
    const float m = (1.f - c.contrast) * c.mean;
    for (int64_t i = 0; i < n; ++i) r[i] = clamp01(c.contrast * r[i] + m);
    for (int64_t i = 0; i < n; ++i) g[i] = clamp01(c.contrast * g[i] + m);
    for (int64_t i = 0; i < n; ++i) b[i] = clamp01(c.contrast * b[i] + m);
  }
  if (c.saturation != 1.f) {
    for (int64_t i = 0; i < n; ++i) {
      const float m = (1.f - c.saturation) * gray_of(r[i], g[i], b[i]);
      r[i] = clamp01(c.saturation * r[i] + m);
      g[i] = clamp01(c.saturation * g[i] + m);
      b[i] = clamp01(c.saturation * b[i] + m);
    }
  }
  if (c.hue != 0.f) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      f4 R = load4(r + i), G = load4(g + i), B = load4(b + i);
      shift_hue4(R, G, B, c.hue);
      store4(r + i, R);
      store4(g + i, G);
      store4(b + i, B);
    }
    for (; i < n; ++i) shift_hue(r + i, g + i, b + i, c.hue);
  }
  if (c.gray) {
    for (int64_t i = 0; i < n; ++i) r[i] = g[i] = b[i] = gray_of(r[i], g[i], b[i]);
  }
}

// One source row (uint8, channel stride `sc`) resized along x into planar floats out[3][S]:
// out[c][x] = (1 - l) * row[o0[x] + c sc] / 255 + l * row[o1[x] + c sc] / 255, l = l1[x].
inline void resize_row(const uint8_t* row, int64_t sc, const int64_t* o0, const int64_t* o1,
                       const float* l1, int64_t S, float* __restrict out) {
  static const std::array<float, 256> kLut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(i) / 255.f;
    return t;
  }();
  const float* lut = kLut.data();
  float* __restrict r = out;
  float* __restrict g = out + S;
  float* __restrict b = out + 2 * S;
  const int64_t sc2 = 2 * sc;
  for (int64_t x = 0; x < S; ++x) {
    const uint8_t* p = row + o0[x];
    const uint8_t* q = row + o1[x];
    const float l = l1[x], l0 = 1.f - l;
    r[x] = l0 * lut[p[0]] + l * lut[q[0]];
    g[x] = l0 * lut[p[sc]] + l * lut[q[sc]];
    b[x] = l0 * lut[p[sc2]] + l * lut[q[sc2]];
  }
}

// One line of the 9-tap blur: out[x] = sum_t taps[t] * in[x + t * stride] for x in [0, n), the
// taps added in order from 0.f (as the scalar loop), four outputs at a time.
inline void blur_line(const float* in, int64_t stride, const float* taps, const f4* tap4,
                      int64_t n, float* __restrict out) {
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    f4 acc = splat4(0.f);
    for (int t = 0; t < kBlurTaps; ++t) acc += tap4[t] * load4(in + x + t * stride);
    store4(out + x, acc);
  }
  for (; x < n; ++x) {
    float acc = 0.f;
    for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * in[x + t * stride];
    out[x] = acc;
  }
}

// The same with one pointer per tap (the reflected rows at the top and bottom edges).
inline void blur_rows(const float* const* rows, const float* taps, const f4* tap4, int64_t n,
                      float* __restrict out) {
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    f4 acc = splat4(0.f);
    for (int t = 0; t < kBlurTaps; ++t) acc += tap4[t] * load4(rows[t] + x);
    store4(out + x, acc);
  }
  for (; x < n; ++x) {
    float acc = 0.f;
    for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * rows[t][x];
    out[x] = acc;
  }
}

struct Scratch {
  Axis ax, ay;
  std::vector<int64_t> ox0, ox1;  // byte offsets of the x taps in a source row
  std::vector<float> buf, tmp, line;
  std::vector<float> rows;  // two source rows resized along x: [2][3][S]
  std::vector<int> reflect;  // reflect[j + kBlurRadius] for j in [-radius, size + radius)
};

template <typename out_t>
void make_crop(const ImageRef& im, const float* row, int64_t S, bool normalize, Scratch& s,
               out_t* out) {
  const int64_t plane = S * S;
  s.buf.resize(3 * plane);
  float* R = s.buf.data();
  float* G = R + plane;
  float* B = G + plane;
  const bool flip = row[kFlip] != 0.f;
  make_axis(s.ay, static_cast<int64_t>(row[kY0]), static_cast<int64_t>(row[kH]), im.height, S,
            false);
  make_axis(s.ax, static_cast<int64_t>(row[kX0]), static_cast<int64_t>(row[kW]), im.width, S,
            flip);

  // 1. crop + bilinear resize (+ flip through the x table) + brightness; sum of grayscale.
  // Separable: each source row the output needs is resized along x once (into one of two row
  // slots, reused by the next output row when it reads the same source row), then the two
  // rows are blended along y four pixels at a time. Same products and sums as the 2-D formula.
  const float bright = row[kBrightness];
  s.ox0.resize(S);
  s.ox1.resize(S);
  for (int64_t x = 0; x < S; ++x) {
    s.ox0[x] = s.ax.i0[x] * im.stride_w;
    s.ox1[x] = s.ax.i1[x] * im.stride_w;
  }
  s.rows.resize(6 * S);
  int64_t slot_row[2] = {-1, -1};
  int last = 0;  // the slot written last (the other one is replaced next)
  auto source_row = [&](int64_t i, int64_t keep) -> const float* {
    for (int k = 0; k < 2; ++k) {
      if (slot_row[k] == i) return s.rows.data() + 3 * S * k;
    }
    const int k = slot_row[0] == keep ? 1 : (slot_row[1] == keep ? 0 : 1 - last);
    float* dst = s.rows.data() + 3 * S * k;
    resize_row(im.data + i * im.stride_h, im.stride_c, s.ox0.data(), s.ox1.data(),
               s.ax.l1.data(), S, dst);
    slot_row[k] = i;
    last = k;
    return dst;
  };
  const bool scale = bright != 1.f;
  const f4 bright4 = splat4(bright);
  f4 gray_acc = splat4(0.f);
  float gray_tail = 0.f;
  for (int64_t y = 0; y < S; ++y) {
    const int64_t i0 = s.ay.i0[y], i1 = s.ay.i1[y];
    const float* top = source_row(i0, -1);
    const float* bottom = source_row(i1, i0);
    const float ly = s.ay.l1[y], ly0 = 1.f - ly;
    const f4 ly4 = splat4(ly), ly04 = splat4(ly0);
    float* out[3] = {R + y * S, G + y * S, B + y * S};
    int64_t x = 0;
    for (; x + 4 <= S; x += 4) {
      f4 v[3];
      for (int c = 0; c < 3; ++c) {
        v[c] = ly04 * load4(top + c * S + x) + ly4 * load4(bottom + c * S + x);
        if (scale) v[c] = clamp4(v[c] * bright4);
        store4(out[c] + x, v[c]);
      }
      gray_acc += gray4(v[0], v[1], v[2]);
    }
    for (; x < S; ++x) {
      float v[3];
      for (int c = 0; c < 3; ++c) {
        v[c] = ly0 * top[c * S + x] + ly * bottom[c * S + x];
        if (scale) v[c] = clamp01(v[c] * bright);
        out[c][x] = v[c];
      }
      gray_tail += gray_of(v[0], v[1], v[2]);
    }
  }
  const double gray_sum = static_cast<double>(gray_acc[0]) + gray_acc[1] + gray_acc[2] + gray_acc[3] + gray_tail;

  // 2. contrast (against the mean grayscale), saturation, hue, grayscale in one pass.
  ColorParams cp;
  cp.brightness = bright;
  cp.contrast = row[kContrast];
  cp.saturation = row[kSaturation];
  cp.hue = row[kHue];
  cp.mean = static_cast<float>(gray_sum / static_cast<double>(plane));
  cp.gray = row[kGray] != 0.f;
  color_planes(R, G, B, plane, cp);

  // 3. separable 9-tap Gaussian blur with reflect padding.
  const float sigma = row[kSigma];
  if (sigma > 0.f) {
    float taps[kBlurTaps];
    gaussian_taps(sigma, taps);
    s.tmp.resize(3 * plane);
    s.reflect.resize(S + 2 * kBlurRadius);
    for (int64_t j = -kBlurRadius; j < S + kBlurRadius; ++j) {
      s.reflect[j + kBlurRadius] = reflect_index(static_cast<int>(j), static_cast<int>(S));
    }
    const int* ref = s.reflect.data() + kBlurRadius;
    s.line.resize(S + 2 * kBlurRadius);
    float* pad = s.line.data();
    f4 tap4[kBlurTaps];
    for (int t = 0; t < kBlurTaps; ++t) tap4[t] = splat4(taps[t]);
    for (int c = 0; c < 3; ++c) {
      const float* src = s.buf.data() + c * plane;
      float* dst = s.tmp.data() + c * plane;
      for (int64_t y = 0; y < S; ++y) {  // horizontal, from a reflect-padded copy of the row
        const float* line = src + y * S;
        for (int64_t j = 0; j < S + 2 * kBlurRadius; ++j) pad[j] = line[ref[j - kBlurRadius]];
        blur_line(pad, 1, taps, tap4, S, dst + y * S);
      }
      float* back = s.buf.data() + c * plane;
      for (int64_t y = 0; y < S; ++y) {  // vertical: tap t reads row ref[y + t - radius]
        if (y >= kBlurRadius && y + kBlurRadius < S) {
          blur_line(dst + (y - kBlurRadius) * S, S, taps, tap4, S, back + y * S);
        } else {
          const float* rows[kBlurTaps];
          for (int t = 0; t < kBlurTaps; ++t) rows[t] = dst + ref[y + t - kBlurRadius] * S;
          blur_rows(rows, taps, tap4, S, back + y * S);
        }
      }
    }
  }

  // 4. normalize and cast.
  for (int c = 0; c < 3; ++c) {
    const float* src = s.buf.data() + c * plane;
    out_t* dst = out + c * plane;
    if (normalize) {
      const float mean = imagenet_mean(c), inv = 1.f / imagenet_std(c);
      for (int64_t i = 0; i < plane; ++i) dst[i] = static_cast<out_t>((src[i] - mean) * inv);
    } else {
      for (int64_t i = 0; i < plane; ++i) dst[i] = static_cast<out_t>(src[i]);
    }
  }
}

at::Tensor multicrop_cpu(const std::vector<at::Tensor>& images, const at::Tensor& crops,
                         int64_t size, std::optional<at::ScalarType> dtype, bool normalize) {
  const at::ScalarType out_dtype = check_multicrop_args(images, crops, size, dtype);
  for (size_t i = 0; i < images.size(); ++i) {
    TORCH_CHECK(images[i].device().is_cpu(), "multicrop: images[", i,
                "] must be on the CPU for the CPU op, got ", images[i].device());
  }
  const int64_t K = crops.size(0);
  at::Tensor out = at::empty({K, 3, size, size}, crops.options().dtype(out_dtype));
  if (K == 0) return out;
  check_crop_values(crops, static_cast<int64_t>(images.size()));
  const at::Tensor rows = crops.contiguous();
  const std::vector<ImageRef> refs = image_refs(images);
  const float* row_ptr = rows.data_ptr<float>();
  const int64_t per_crop = 3 * size * size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "multicrop_cpu", [&] {
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t k = begin; k < end; ++k) {
        const float* row = row_ptr + k * kCols;
        make_crop<scalar_t>(refs[static_cast<int64_t>(row[kImage])], row, size, normalize, scratch,
                            out_ptr + k * per_crop);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace stellar

TORCH_LIBRARY_IMPL(stellar, CPU, m) { m.impl("multicrop", &stellar::multicrop_cpu); }
