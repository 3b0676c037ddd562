// CPU body of stellar::multicrop: one crop per task of at::parallel_for, each crop made in a
// planar float scratch buffer (resize -> flip -> brightness, then the colour steps once the
// contrast mean is known, then the separable blur, then normalize and cast).
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
  for (int64_t o = 0; o < out_size; ++o) {
    int64_t j0, j1;
    float l;
    linear_source(o, window, out_size, &j0, &j1, &l);
    const int64_t d = flip ? out_size - 1 - o : o;
    a.i0[d] = clamp_index(start + j0, extent);
    a.i1[d] = clamp_index(start + j1, extent);
    a.l1[d] = l;
  }
}

struct Scratch {
  Axis ax, ay;
  std::vector<int64_t> ox0, ox1;  // byte offsets of the x taps in a source row
  std::vector<float> buf, tmp;
  std::vector<int> reflect;  // reflect[j + kBlurRadius] for j in [-radius, size + radius)
};

template <typename out_t>
void make_crop(const ImageRef& im, const float* row, int64_t S, bool normalize, Scratch& s,
               out_t* out) {
  static const std::array<float, 256> kLut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(i) / 255.f;
    return t;
  }();
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
  const float bright = row[kBrightness];
  const bool scale = bright != 1.f;
  const int64_t sc1 = im.stride_c, sc2 = 2 * im.stride_c;
  s.ox0.resize(S);
  s.ox1.resize(S);
  for (int64_t x = 0; x < S; ++x) {
    s.ox0[x] = s.ax.i0[x] * im.stride_w;
    s.ox1[x] = s.ax.i1[x] * im.stride_w;
  }
  const int64_t* ox0 = s.ox0.data();
  const int64_t* ox1 = s.ox1.data();
  const float* lxs = s.ax.l1.data();
  const float* lut = kLut.data();
  double gray_sum = 0.0;
  for (int64_t y = 0; y < S; ++y) {
    const uint8_t* r0 = im.data + s.ay.i0[y] * im.stride_h;
    const uint8_t* r1 = im.data + s.ay.i1[y] * im.stride_h;
    const float ly = s.ay.l1[y], ly0 = 1.f - ly;
    float* Ry = R + y * S;
    float* Gy = G + y * S;
    float* By = B + y * S;
    float row_sum = 0.f;
    for (int64_t x = 0; x < S; ++x) {
      const uint8_t* a = r0 + ox0[x];
      const uint8_t* b = r0 + ox1[x];
      const uint8_t* c = r1 + ox0[x];
      const uint8_t* d = r1 + ox1[x];
      const float lx = lxs[x], lx0 = 1.f - lx;
      float vr = ly0 * (lx0 * lut[a[0]] + lx * lut[b[0]]) + ly * (lx0 * lut[c[0]] + lx * lut[d[0]]);
      float vg = ly0 * (lx0 * lut[a[sc1]] + lx * lut[b[sc1]]) + ly * (lx0 * lut[c[sc1]] + lx * lut[d[sc1]]);
      float vb = ly0 * (lx0 * lut[a[sc2]] + lx * lut[b[sc2]]) + ly * (lx0 * lut[c[sc2]] + lx * lut[d[sc2]]);
      if (scale) {
        vr = clamp01(vr * bright);
        vg = clamp01(vg * bright);
        vb = clamp01(vb * bright);
      }
      Ry[x] = vr;
      Gy[x] = vg;
      By[x] = vb;
      row_sum += gray_of(vr, vg, vb);
    }
    gray_sum += row_sum;
  }

  // 2. contrast (against the mean grayscale), saturation, hue, grayscale: one simple loop per
  // step over the planes, so each vectorizes.
  const float contrast = row[kContrast], saturation = row[kSaturation], hue = row[kHue];
  if (contrast != 1.f) {
    const float m = (1.f - contrast) * static_cast<float>(gray_sum / static_cast<double>(plane));
    for (int64_t i = 0; i < 3 * plane; ++i) R[i] = clamp01(contrast * R[i] + m);
  }
  if (saturation != 1.f) {
    for (int64_t i = 0; i < plane; ++i) {
      const float m = (1.f - saturation) * gray_of(R[i], G[i], B[i]);
      R[i] = clamp01(saturation * R[i] + m);
      G[i] = clamp01(saturation * G[i] + m);
      B[i] = clamp01(saturation * B[i] + m);
    }
  }
  if (hue != 0.f) {
    float* __restrict r = R;
    float* __restrict g = G;
    float* __restrict b = B;
    for (int64_t i = 0; i < plane; ++i) {
      float vr = r[i], vg = g[i], vb = b[i];
      shift_hue(&vr, &vg, &vb, hue);
      r[i] = vr;
      g[i] = vg;
      b[i] = vb;
    }
  }
  if (row[kGray] != 0.f) {
    for (int64_t i = 0; i < plane; ++i) R[i] = G[i] = B[i] = gray_of(R[i], G[i], B[i]);
  }

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
    for (int c = 0; c < 3; ++c) {
      const float* src = s.buf.data() + c * plane;
      float* dst = s.tmp.data() + c * plane;
      for (int64_t y = 0; y < S; ++y) {  // horizontal
        const float* line = src + y * S;
        float* o = dst + y * S;
        for (int64_t x = 0; x < S; ++x) {
          float acc = 0.f;
          if (x >= kBlurRadius && x + kBlurRadius < S) {
            for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * line[x + t - kBlurRadius];
          } else {
            for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * line[ref[x + t - kBlurRadius]];
          }
          o[x] = acc;
        }
      }
      float* back = s.buf.data() + c * plane;
      for (int64_t y = 0; y < S; ++y) {  // vertical
        float* o = back + y * S;
        for (int64_t x = 0; x < S; ++x) o[x] = 0.f;
        for (int t = 0; t < kBlurTaps; ++t) {
          const float* line = dst + ref[y + t - kBlurRadius] * S;
          const float w = taps[t];
          for (int64_t x = 0; x < S; ++x) o[x] += w * line[x];
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
