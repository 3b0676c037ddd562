// stellar::multicrop: crop + bilinear resize + colour augmentation + blur + normalize,
// fused. Declared once here; the schema lives in multicrop.cpp, the bodies in cpu/ and cuda/.
//
// Layout of one crop row (float32 [K, 12], docs/design.md "Augmentation"):
//   0 image_index | 1 y0 | 2 x0 | 3 h | 4 w | 5 flip | 6 brightness | 7 contrast |
//   8 saturation | 9 hue | 10 grayscale | 11 blur_sigma
// Each step has the semantics of the torchvision.transforms.v2.functional op of the same
// name on float images in [0, 1], clamping to [0, 1] where those ops clamp.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__CUDACC__)
#define STELLAR_HD __host__ __device__ __forceinline__
#else
#define STELLAR_HD inline __attribute__((always_inline))
#endif

namespace stellar {

constexpr int kCols = 12;
enum Col : int {
  kImage = 0, kY0 = 1, kX0 = 2, kH = 3, kW = 4, kFlip = 5, kBrightness = 6, kContrast = 7,
  kSaturation = 8, kHue = 9, kGray = 10, kSigma = 11,
};
constexpr int kBlurTaps = 9;  // Gaussian kernel size
constexpr int kBlurRadius = kBlurTaps / 2;

// ImageNet statistics (torchvision's normalize constants), as functions so device code can
// use them without a __constant__ table.
STELLAR_HD float imagenet_mean(int c) { return c == 0 ? 0.485f : (c == 1 ? 0.456f : 0.406f); }
STELLAR_HD float imagenet_std(int c) { return c == 0 ? 0.229f : (c == 1 ? 0.224f : 0.225f); }

// Where one source image lives: uint8 [H, W, 3] with arbitrary strides (in elements), so
// HWC buffers (DALI) and permuted CHW tensors (torchvision decode) are read without a copy.
struct ImageRef {
  const uint8_t* data;
  int64_t height, width;
  int64_t stride_h, stride_w, stride_c;
};

// max / min as comparisons (fmaxf / fminf are library calls on the CPU without fast-math).
STELLAR_HD float max2(float a, float b) { return a > b ? a : b; }
STELLAR_HD float min2(float a, float b) { return a < b ? a : b; }

STELLAR_HD float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

STELLAR_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Reflect padding without repeating the edge (torch "reflect"), valid for any n >= 1.
STELLAR_HD int reflect_index(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  i = i % period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// The source-per-output step of a bilinear resize from `in_size` to `out_size`, in double:
// computed once per crop and axis (a double division), not per pixel.
STELLAR_HD double resize_scale(int64_t in_size, int64_t out_size) {
  return static_cast<double>(in_size) / static_cast<double>(out_size);
}

// One output coordinate of a bilinear resize from `in_size` pixels with step `scale`
// (resize_scale; align_corners=False, no antialias, as torch.nn.functional.interpolate): the two
// source indices inside the window and the weight of the second. The source position is kept in
// double (one multiply-add, no division) so the result does not depend on the window position.
STELLAR_HD void linear_source(int64_t out_index, int64_t in_size, double scale, int64_t* i0,
                              int64_t* i1, float* lambda1) {
  double src = (static_cast<double>(out_index) + 0.5) * scale - 0.5;
  if (src < 0.0) src = 0.0;
  int64_t lo = static_cast<int64_t>(src);  // floor: src >= 0
  if (lo > in_size - 1) lo = in_size - 1;
  *i0 = lo;
  *i1 = lo < in_size - 1 ? lo + 1 : lo;
  double frac = src - static_cast<double>(lo);
  *lambda1 = static_cast<float>(frac < 0.0 ? 0.0 : (frac > 1.0 ? 1.0 : frac));
}

STELLAR_HD float gray_of(float r, float g, float b) {
  return 0.2989f * r + 0.587f * g + 0.114f * b;
}

// One channel of HSV -> RGB: v - v s max(0, min(k, 4 - k, 1)), k = (n + 6 h) mod 6 with
// n = 5, 3, 1 for r, g, b; equal to torchvision's sector table of p, q, t (all in [0, 1] here,
// so its clamps are inactive). Branch-free; the CPU body runs a four-lane twin (shift_hue4).
STELLAR_HD float hsv_channel(float n, float h6, float v, float s) {
  float k = n + h6;                      // in [1, 12)
  k -= 6.f * static_cast<float>(k >= 6.f);
  const float w = max2(0.f, min2(min2(k, 4.f - k), 1.f));
  return v - v * s * w;
}

// adjust_hue: RGB -> HSV, h += hue (mod 1), HSV -> RGB, as torchvision's float path. Floors
// are integer truncations of values kept positive (no libm calls on the CPU's hot path).
STELLAR_HD void shift_hue(float* r, float* g, float* b, float hue) {
  const float R = *r, G = *g, B = *b;
  const float maxc = max2(R, max2(G, B));
  const float minc = min2(R, min2(G, B));
  const float range = maxc - minc;
  // torchvision divides by 1 where max == min (range 0, so s = 0 and rc = gc = bc = 0): a
  // tiny floor on the divisors gives the same results without a branch.
  const float s = range / max2(maxc, 1e-30f);
  const float inv = 1.f / max2(range, 1e-30f);
  const float rc = (maxc - R) * inv, gc = (maxc - G) * inv, bc = (maxc - B) * inv;
  const float hr = bc - gc, hg = 2.f + rc - bc, hb = 4.f + gc - rc;
  const float is_r = static_cast<float>(maxc == R);
  const float is_g = (1.f - is_r) * static_cast<float>(maxc == G);
  float h = is_r * hr + is_g * hg + (1.f - is_r - is_g) * hb;  // in [-1, 5]
  h = h * (1.f / 6.f) + 1.f;  // in [5/6, 11/6]: fmod(h, 1) = h - trunc(h)
  h = h - static_cast<float>(static_cast<int>(h));
  h = h + hue + 1.f;  // in [0.5, 2.5): the remainder by 1 as above
  h = h - static_cast<float>(static_cast<int>(h));
  const float h6 = h * 6.f;
  *r = hsv_channel(5.f, h6, maxc, s);
  *g = hsv_channel(3.f, h6, maxc, s);
  *b = hsv_channel(1.f, h6, maxc, s);
}

// The per-pixel colour steps after the contrast mean is known: contrast, saturation, hue,
// grayscale. Brightness comes before (it feeds the mean). `rgb` is updated in place.
struct ColorParams {
  float brightness, contrast, saturation, hue, mean;
  bool gray;
};

STELLAR_HD void color_after_brightness(float* rgb, const ColorParams& c) {
  float r = rgb[0], g = rgb[1], b = rgb[2];
  if (c.contrast != 1.f) {
    const float m = (1.f - c.contrast) * c.mean;
    r = clamp01(c.contrast * r + m);
    g = clamp01(c.contrast * g + m);
    b = clamp01(c.contrast * b + m);
  }
  if (c.saturation != 1.f) {
    const float m = (1.f - c.saturation) * gray_of(r, g, b);
    r = clamp01(c.saturation * r + m);
    g = clamp01(c.saturation * g + m);
    b = clamp01(c.saturation * b + m);
  }
  if (c.hue != 0.f) shift_hue(&r, &g, &b, c.hue);
  if (c.gray) r = g = b = gray_of(r, g, b);
  rgb[0] = r;
  rgb[1] = g;
  rgb[2] = b;
}

// Normalized 9-tap Gaussian weights for sigma > 0 (torchvision's _get_gaussian_kernel1d).
STELLAR_HD void gaussian_taps(float sigma, float* taps) {
  double w[kBlurTaps];
  double sum = 0.0;
  for (int i = 0; i < kBlurTaps; ++i) {
    const double x = static_cast<double>(i - kBlurRadius) / static_cast<double>(sigma);
    w[i] = exp(-0.5 * x * x);
    sum += w[i];
  }
  for (int i = 0; i < kBlurTaps; ++i) taps[i] = static_cast<float>(w[i] / sum);
}

// The first invalid column of one crop row for `num_images` images, or -1 when the row is valid.
// The same test on the host (rows on the CPU) and in the CUDA check kernel (rows on the GPU);
// raise_row_error says what is wrong with that column.
STELLAR_HD bool is_finite_value(float v) { return v - v == 0.f; }  // false for inf and NaN
STELLAR_HD bool is_integer_value(float v) {
#if defined(__CUDA_ARCH__)
  return is_finite_value(v) && floorf(v) == v;
#else
  return is_finite_value(v) && std::floor(v) == v;
#endif
}

STELLAR_HD int row_error(const float* r, int64_t num_images) {
  for (int c = 0; c < kCols; ++c) {
    if (!is_finite_value(r[c])) return c;
  }
  if (!is_integer_value(r[kImage]) || r[kImage] < 0.f || r[kImage] >= static_cast<float>(num_images)) return kImage;
  if (!is_integer_value(r[kY0])) return kY0;
  if (!is_integer_value(r[kX0])) return kX0;
  if (!is_integer_value(r[kH]) || r[kH] < 1.f) return kH;
  if (!is_integer_value(r[kW]) || r[kW] < 1.f) return kW;
  if (r[kFlip] != 0.f && r[kFlip] != 1.f) return kFlip;
  if (r[kBrightness] < 0.f) return kBrightness;
  if (r[kContrast] < 0.f) return kContrast;
  if (r[kSaturation] < 0.f) return kSaturation;
  if (r[kHue] < -0.5f || r[kHue] > 0.5f) return kHue;
  if (r[kGray] != 0.f && r[kGray] != 1.f) return kGray;
  if (r[kSigma] < 0.f) return kSigma;
  return -1;
}

// Raises the error for column `col` of row `k` (values `r`), as found by row_error.
[[noreturn]] void raise_row_error(int64_t k, int col, const float* r, int64_t num_images);

// Shared by the CPU and CUDA bodies: checks the arguments (messages name the argument) and
// returns the output dtype. `check_values` reads the rows (only when they are on the CPU).
at::ScalarType check_multicrop_args(const std::vector<at::Tensor>& images, const at::Tensor& crops,
                                    int64_t size, std::optional<at::ScalarType> dtype);

// Host-side view of the images (pointer, size, strides), in list order.
std::vector<ImageRef> image_refs(const std::vector<at::Tensor>& images);

// Raises unless every row's values are valid for `num_images` images (crops on the CPU).
void check_crop_values(const at::Tensor& crops_cpu, int64_t num_images);

}  // namespace stellar
