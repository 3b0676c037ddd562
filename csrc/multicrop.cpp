// The schema of stellar::multicrop and the argument checks both bodies share.
#include "multicrop.h"

#include <torch/library.h>

namespace stellar {

at::ScalarType check_multicrop_args(const std::vector<at::Tensor>& images, const at::Tensor& crops,
                                    int64_t size, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(!images.empty() || crops.size(0) == 0,
              "multicrop: images must hold at least one image when crops has rows");
  TORCH_CHECK(size >= 1, "multicrop: size must be >= 1, got ", size);
  TORCH_CHECK(crops.dim() == 2 && crops.size(1) == kCols && crops.scalar_type() == at::kFloat,
              "multicrop: crops must be a float32 tensor of shape [K, 12], got ",
              crops.scalar_type(), " of shape ", crops.sizes());
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "multicrop: dtype must be float32, bfloat16 or float16, got ", out_dtype);
  for (size_t i = 0; i < images.size(); ++i) {
    const at::Tensor& im = images[i];
    TORCH_CHECK(im.scalar_type() == at::kByte, "multicrop: images[", i,
                "] must be a uint8 tensor, got ", im.scalar_type());
    TORCH_CHECK(im.dim() == 3 && im.size(2) == 3, "multicrop: images[", i,
                "] must have shape [H, W, 3] (HWC RGB), got ", im.sizes());
    TORCH_CHECK(im.size(0) >= 1 && im.size(1) >= 1, "multicrop: images[", i,
                "] must not be empty, got ", im.sizes());
    TORCH_CHECK(im.device() == images[0].device(), "multicrop: images[", i, "] is on ",
                im.device(), " but images[0] is on ", images[0].device(),
                "; all images must be on one device");
  }
  if (!images.empty()) {
    TORCH_CHECK(crops.device().is_cpu() || crops.device() == images[0].device(),
                "multicrop: crops must be on the CPU or on the images' device (",
                images[0].device(), "), got ", crops.device());
  }
  return out_dtype;
}

std::vector<ImageRef> image_refs(const std::vector<at::Tensor>& images) {
  std::vector<ImageRef> refs;
  refs.reserve(images.size());
  for (const at::Tensor& im : images) {
    refs.push_back(ImageRef{im.data_ptr<uint8_t>(), im.size(0), im.size(1), im.stride(0),
                            im.stride(1), im.stride(2)});
  }
  return refs;
}

void check_crop_values(const at::Tensor& crops_cpu, int64_t num_images) {
  const at::Tensor rows = crops_cpu.contiguous();
  const float* p = rows.data_ptr<float>();
  const int64_t K = rows.size(0);
  auto is_int = [](float v) { return std::isfinite(v) && std::floor(v) == v; };
  for (int64_t k = 0; k < K; ++k) {
    const float* r = p + k * kCols;
    for (int c = 0; c < kCols; ++c) {
      TORCH_CHECK(std::isfinite(r[c]), "multicrop: crops[", k, ", ", c, "] is not finite");
    }
    TORCH_CHECK(is_int(r[kImage]) && r[kImage] >= 0 && r[kImage] < num_images,
                "multicrop: crops[", k, ", 0] (image_index) must be an integer in [0, ",
                num_images, "), got ", r[kImage]);
    TORCH_CHECK(is_int(r[kY0]) && is_int(r[kX0]), "multicrop: crops[", k,
                ", 1:3] (y0, x0) must be integers, got ", r[kY0], ", ", r[kX0]);
    TORCH_CHECK(is_int(r[kH]) && is_int(r[kW]) && r[kH] >= 1 && r[kW] >= 1, "multicrop: crops[",
                k, ", 3:5] (h, w) must be integers >= 1, got ", r[kH], ", ", r[kW]);
    TORCH_CHECK(r[kFlip] == 0.f || r[kFlip] == 1.f, "multicrop: crops[", k,
                ", 5] (flip) must be 0 or 1, got ", r[kFlip]);
    TORCH_CHECK(r[kBrightness] >= 0 && r[kContrast] >= 0 && r[kSaturation] >= 0,
                "multicrop: crops[", k,
                ", 6:9] (brightness, contrast, saturation) must be >= 0, got ", r[kBrightness],
                ", ", r[kContrast], ", ", r[kSaturation]);
    TORCH_CHECK(r[kHue] >= -0.5f && r[kHue] <= 0.5f, "multicrop: crops[", k,
                ", 9] (hue) must be in [-0.5, 0.5], got ", r[kHue]);
    TORCH_CHECK(r[kGray] == 0.f || r[kGray] == 1.f, "multicrop: crops[", k,
                ", 10] (grayscale) must be 0 or 1, got ", r[kGray]);
    TORCH_CHECK(r[kSigma] >= 0, "multicrop: crops[", k, ", 11] (blur_sigma) must be >= 0, got ",
                r[kSigma]);
  }
}

}  // namespace stellar

TORCH_LIBRARY(stellar, m) {
  // images: list of N uint8 [H_i, W_i, 3] tensors (any strides, so a CHW tensor's
  //   .permute(1, 2, 0) view works), all on one device.
  // crops: float32 [K, 12] rows, on the CPU or on the images' device.
  // returns: [K, 3, size, size] of `dtype` (float32 by default), in [0, 1] when
  //   normalize=False, else normalized with ImageNet mean/std.
  m.def(
      "multicrop(Tensor[] images, Tensor crops, int size, ScalarType? dtype=None, "
      "bool normalize=True) -> Tensor");
}
