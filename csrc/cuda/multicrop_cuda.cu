// CUDA body of stellar::multicrop: all K crops of one output size in one launch of
// `color_kernel` (one block per crop: crop + bilinear resize + flip + brightness, the block's
// grayscale mean, then contrast, saturation, hue, grayscale, normalize, cast), plus one launch
// of `blur_kernel` (separable 9-tap Gaussian in shared-memory tiles) when some row blurs; the
// colour kernel writes a blurred row's colours to a float scratch buffer (one slot per blurred
// row, nothing for the others) that the blur reads.
//
// Rows on the CPU are checked on the host. Rows already on the GPU are checked by
// `check_rows_kernel` on the device (and their blur slots numbered there); the host then reads
// its 8-byte verdict, the op's one stream synchronisation, and raises the same error as for CPU
// rows (naming the row and column) before any kernel reads an image: a bad row never reads
// outside the image table.
#include "../multicrop.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>

namespace stellar {
namespace {

constexpr int kColorThreads = 512;
constexpr int kCheckThreads = 1024;
constexpr int kNoError = 0x7fffffff;
constexpr int64_t kMaxSize = 46340;  // size * size fits in int32: 32-bit pixel indices
constexpr int kTile = 32;                           // blur: output tile side
constexpr int kTileIn = kTile + 2 * kBlurRadius;    // blur: input tile side with the halo
constexpr int kBlurThreadsY = 8;

template <typename T>
__device__ __forceinline__ T cast_out(float v) {
  return static_cast<T>(v);
}

// The resized, flipped, brightness-adjusted colour of output pixel (oy, ox) of one crop.
// scale_y, scale_x: resize_scale of the crop's height and width to S (per crop, not per pixel).
__device__ __forceinline__ void sample_pixel(const ImageRef& im, const float* row, int S, double scale_y,
                                             double scale_x, int oy, int ox, float* v) {
  const int x = row[kFlip] != 0.f ? S - 1 - ox : ox;
  int64_t y0, y1, x0, x1;
  float ly, lx;
  linear_source(oy, static_cast<int64_t>(row[kH]), scale_y, &y0, &y1, &ly);
  linear_source(x, static_cast<int64_t>(row[kW]), scale_x, &x0, &x1, &lx);
  const int64_t top = static_cast<int64_t>(row[kY0]), left = static_cast<int64_t>(row[kX0]);
  const uint8_t* r0 = im.data + clamp_index(top + y0, im.height) * im.stride_h;
  const uint8_t* r1 = im.data + clamp_index(top + y1, im.height) * im.stride_h;
  const int64_t c0 = clamp_index(left + x0, im.width) * im.stride_w;
  const int64_t c1 = clamp_index(left + x1, im.width) * im.stride_w;
  const float b = row[kBrightness];
  constexpr float inv255 = 1.f / 255.f;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    const int64_t oc = c * im.stride_c;
    const float p00 = r0[c0 + oc] * inv255, p01 = r0[c1 + oc] * inv255;
    const float p10 = r1[c0 + oc] * inv255, p11 = r1[c1 + oc] * inv255;
    const float t = (1.f - lx) * p00 + lx * p01;
    const float u = (1.f - lx) * p10 + lx * p11;
    float value = (1.f - ly) * t + ly * u;
    if (b != 1.f) value = clamp01(value * b);
    v[c] = value;
  }
}

// Exclusive prefix sum of `value` over the block (blockDim.x a multiple of 32, at most 1024),
// and the block's total in *total. `shared` holds 32 ints.
__device__ __forceinline__ int block_exclusive_scan(int value, int* shared, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? shared[lane] : 0;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += up;
    }
    shared[lane] = w;  // inclusive sums of the warps
  }
  __syncthreads();
  const int before = (warp > 0 ? shared[warp - 1] : 0) + inclusive - value;
  *total = shared[warps - 1];
  __syncthreads();  // `shared` is reused by the next call
  return before;
}

// One block: checks every row (row_error, as the host does for CPU rows) and numbers the rows
// that blur. verdict[0]: the smallest k * kCols + column of an invalid value (kNoError if none);
// verdict[1]: the number of rows that blur; slots[k]: row k's blur slot or -1.
__global__ void __launch_bounds__(kCheckThreads)
check_rows_kernel(const float* __restrict__ crops, int K, int64_t num_images, int* __restrict__ verdict,
                  int* __restrict__ slots) {
  __shared__ int scan[32];
  __shared__ int first_error;
  if (threadIdx.x == 0) first_error = kNoError;
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < K; base += blockDim.x) {
    const int k = base + threadIdx.x;
    int blurs = 0;
    if (k < K) {
      const float* r = crops + static_cast<int64_t>(k) * kCols;
      const int col = row_error(r, num_images);
      if (col >= 0) atomicMin(&first_error, k * kCols + col);
      blurs = (col < 0 && r[kSigma] > 0.f) ? 1 : 0;
    }
    int total;
    const int before = block_exclusive_scan(blurs, scan, &total);
    if (k < K) slots[k] = blurs ? carry + before : -1;
    carry += total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    verdict[0] = first_error;
    verdict[1] = carry;
  }
}

__device__ __forceinline__ float block_sum(float value, float* shared /* [32] */) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  value = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  return shared[0];
}

// grid: K blocks (one per crop); block: up to kColorThreads threads striding over the pixels.
template <typename out_t>
__global__ void __launch_bounds__(kColorThreads)
color_kernel(const ImageRef* __restrict__ images, const float* __restrict__ crops,
             const int* __restrict__ slots, int S, bool normalize, out_t* __restrict__ out,
             float* __restrict__ scratch) {
  __shared__ float row[kCols];
  __shared__ float partial[32];
  const int64_t k = blockIdx.x;
  if (threadIdx.x < kCols) row[threadIdx.x] = crops[k * kCols + threadIdx.x];
  __syncthreads();
  const ImageRef im = images[static_cast<int64_t>(row[kImage])];
  const int plane = S * S;
  const double scale_y = resize_scale(static_cast<int64_t>(row[kH]), S);
  const double scale_x = resize_scale(static_cast<int64_t>(row[kW]), S);

  ColorParams cp{row[kBrightness], row[kContrast], row[kSaturation], row[kHue], 0.f,
                 row[kGray] != 0.f};
  if (cp.contrast != 1.f) {  // pass 1: the mean grayscale of the brightness-adjusted crop
    float sum = 0.f;
    for (int p = threadIdx.x; p < plane; p += blockDim.x) {
      float v[3];
      sample_pixel(im, row, S, scale_y, scale_x, p / S, p % S, v);
      sum += gray_of(v[0], v[1], v[2]);
    }
    cp.mean = block_sum(sum, partial) / static_cast<float>(plane);
  }
  const bool blurred = row[kSigma] > 0.f;
  const int64_t slot = blurred ? slots[k] : -1;
  for (int p = threadIdx.x; p < plane; p += blockDim.x) {  // pass 2
    float v[3];
    sample_pixel(im, row, S, scale_y, scale_x, p / S, p % S, v);
    color_after_brightness(v, cp);
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      if (blurred) {
        scratch[(slot * 3 + c) * plane + p] = v[c];
      } else {
        const float y = normalize ? (v[c] - imagenet_mean(c)) / imagenet_std(c) : v[c];
        out[(k * 3 + c) * plane + p] = cast_out<out_t>(y);
      }
    }
  }
}

// grid: (tiles of the output, min(K, 65535)); block: (kTile, kBlurThreadsY). Rows without blur
// return at once. Reflect padding at the crop's border, as torchvision's gaussian_blur.
template <typename out_t>
__global__ void __launch_bounds__(kTile * kBlurThreadsY)
blur_kernel(const float* __restrict__ crops, const int* __restrict__ slots,
                            int64_t K, int64_t S, bool normalize, const float* __restrict__ scratch,
                            out_t* __restrict__ out) {
  __shared__ float tile[3][kTileIn][kTileIn];
  __shared__ float horiz[3][kTileIn][kTile];
  __shared__ float taps[kBlurTaps];
  const int64_t tiles_x = (S + kTile - 1) / kTile;
  const int64_t ty0 = (blockIdx.x / tiles_x) * kTile, tx0 = (blockIdx.x % tiles_x) * kTile;
  const int64_t plane = S * S;
  const int n = static_cast<int>(S);
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const float sigma = crops[k * kCols + kSigma];
    if (!(sigma > 0.f)) continue;  // uniform over the block
    const float* src = scratch + static_cast<int64_t>(slots[k]) * 3 * plane;
    __syncthreads();  // the previous row's readers of tile/horiz/taps are done
    if (threadIdx.x == 0 && threadIdx.y == 0) gaussian_taps(sigma, taps);
    for (int i = threadIdx.y * kTile + threadIdx.x; i < kTileIn * kTileIn; i += kTile * kBlurThreadsY) {
      const int r = i / kTileIn, c = i % kTileIn;
      const int64_t y = reflect_index(static_cast<int>(ty0 + r - kBlurRadius), n);
      const int64_t x = reflect_index(static_cast<int>(tx0 + c - kBlurRadius), n);
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) tile[ch][r][c] = src[ch * plane + y * S + x];
    }
    __syncthreads();
    for (int r = threadIdx.y; r < kTileIn; r += kBlurThreadsY) {
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) {
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * tile[ch][r][threadIdx.x + t];
        horiz[ch][r][threadIdx.x] = acc;
      }
    }
    __syncthreads();
    const int64_t x = tx0 + threadIdx.x;
    for (int r = threadIdx.y; r < kTile; r += kBlurThreadsY) {
      const int64_t y = ty0 + r;
      if (y >= S || x >= S) continue;
#pragma unroll
      for (int ch = 0; ch < 3; ++ch) {
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < kBlurTaps; ++t) acc += taps[t] * horiz[ch][r + t][threadIdx.x];
        const float v = normalize ? (acc - imagenet_mean(ch)) / imagenet_std(ch) : acc;
        out[(k * 3 + ch) * plane + y * S + x] = cast_out<out_t>(v);
      }
    }
  }
}

template <typename out_t>
void launch(const ImageRef* images, const float* crops, const int* slots, int64_t K, int64_t S,
            bool normalize, bool any_blur, float* scratch, at::Tensor& out, cudaStream_t stream) {
  out_t* out_ptr = reinterpret_cast<out_t*>(out.data_ptr());
  const int64_t plane = S * S;
  const int threads = static_cast<int>(std::min<int64_t>(kColorThreads, ((plane + 31) / 32) * 32));
  color_kernel<out_t><<<static_cast<unsigned>(K), threads, 0, stream>>>(
      images, crops, slots, static_cast<int>(S), normalize, out_ptr, scratch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!any_blur) return;
  const int64_t tiles = ((S + kTile - 1) / kTile) * ((S + kTile - 1) / kTile);
  TORCH_CHECK(tiles <= static_cast<int64_t>(INT32_MAX), "multicrop: size is too large (", S, ")");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(K, 65535)));
  blur_kernel<out_t><<<grid, dim3(kTile, kBlurThreadsY), 0, stream>>>(crops, slots, K, S, normalize,
                                                                       scratch, out_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor multicrop_cuda(const std::vector<at::Tensor>& images, const at::Tensor& crops,
                          int64_t size, std::optional<at::ScalarType> dtype, bool normalize) {
  const at::ScalarType out_dtype = check_multicrop_args(images, crops, size, dtype);
  const int64_t K = crops.size(0);
  const int64_t N = static_cast<int64_t>(images.size());
  const at::Device device = N > 0 ? images[0].device() : crops.device();
  TORCH_CHECK(device.is_cuda(), "multicrop: images must be CUDA tensors for the CUDA op, got ",
              device);
  TORCH_CHECK(size <= kMaxSize, "multicrop: size must be <= ", kMaxSize, " on CUDA, got ", size);
  TORCH_CHECK(K <= INT32_MAX / kCols, "multicrop: crops has too many rows (", K, ")");
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({K, 3, size, size}, crops.options().device(device).dtype(out_dtype));
  if (K == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // One pinned host buffer -> one copy: the image table, then (rows on the CPU) the blur slots
  // and the rows themselves.
  const bool rows_on_host = crops.device().is_cpu();
  const int64_t image_bytes = N * static_cast<int64_t>(sizeof(ImageRef));
  const int64_t slot_bytes = rows_on_host ? ((K * 4 + 15) / 16) * 16 : 0;
  const int64_t row_bytes = rows_on_host ? K * kCols * 4 : 0;
  const int64_t image_pad = ((image_bytes + 15) / 16) * 16;
  at::Tensor host = at::empty({image_pad + slot_bytes + row_bytes},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  const std::vector<ImageRef> refs = image_refs(images);
  std::memcpy(h, refs.data(), image_bytes);
  int64_t n_blur = 0;
  const float* rows_dev;
  const int* slots_ptr;
  at::Tensor device_rows, checked;
  if (rows_on_host) {
    check_crop_values(crops, N);
    const at::Tensor rows = crops.contiguous();
    const float* r = rows.data_ptr<float>();
    int* slots = reinterpret_cast<int*>(h + image_pad);
    for (int64_t k = 0; k < K; ++k) slots[k] = r[k * kCols + kSigma] > 0.f ? static_cast<int>(n_blur++) : -1;
    std::memcpy(h + image_pad + slot_bytes, r, row_bytes);
  } else {
    // Rows on the device: checked (and their blur slots numbered) there; the verdict is read
    // back before anything reads an image. This synchronises with the stream, once per call.
    device_rows = crops.contiguous();
    rows_dev = device_rows.data_ptr<float>();
    checked = at::empty({2 + K}, crops.options().dtype(at::kInt));
    int* verdict_dev = checked.data_ptr<int>();
    check_rows_kernel<<<1, kCheckThreads, 0, stream>>>(rows_dev, static_cast<int>(K), N, verdict_dev,
                                                       verdict_dev + 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    int verdict[2];
    c10::cuda::memcpy_and_sync(verdict, verdict_dev, sizeof verdict, cudaMemcpyDeviceToHost, stream);
    if (verdict[0] != kNoError) {
      const int64_t k = verdict[0] / kCols;
      const at::Tensor bad = device_rows.select(0, k).cpu();
      raise_row_error(k, verdict[0] % kCols, bad.data_ptr<float>(), N);
    }
    n_blur = verdict[1];
    slots_ptr = verdict_dev + 2;
  }
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const ImageRef* images_dev = reinterpret_cast<const ImageRef*>(table.data_ptr<uint8_t>());
  if (rows_on_host) {
    slots_ptr = reinterpret_cast<const int*>(table.data_ptr<uint8_t>() + image_pad);
    rows_dev = reinterpret_cast<const float*>(table.data_ptr<uint8_t>() + image_pad + slot_bytes);
  }
  // The blur scratch holds the rows that blur only (n_blur x 3 x S x S floats).
  at::Tensor scratch;
  if (n_blur > 0) {
    scratch = at::empty({n_blur, 3, size, size}, out.options().dtype(at::kFloat));
  }
  float* scratch_ptr = n_blur > 0 ? scratch.data_ptr<float>() : nullptr;
  switch (out_dtype) {
    case at::kFloat:
      launch<float>(images_dev, rows_dev, slots_ptr, K, size, normalize, n_blur > 0, scratch_ptr, out, stream);
      break;
    case at::kBFloat16:
      launch<at::BFloat16>(images_dev, rows_dev, slots_ptr, K, size, normalize, n_blur > 0, scratch_ptr, out, stream);
      break;
    default:
      launch<at::Half>(images_dev, rows_dev, slots_ptr, K, size, normalize, n_blur > 0, scratch_ptr, out, stream);
      break;
  }
  return out;
}

}  // namespace
}  // namespace stellar

TORCH_LIBRARY_IMPL(stellar, CUDA, m) { m.impl("multicrop", &stellar::multicrop_cuda); }
