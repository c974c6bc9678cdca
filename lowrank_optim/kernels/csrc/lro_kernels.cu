// CUDA kernels: stochastic rounding float32 → bfloat16, the grouped min–max quantizer (INT8/INT4,
// nearest or stochastic), and the fused INT4 unpack + dequantize. Semantics: the reference in
// lowrank_optim/kernels/reference.py; random streams: the Triton kernels' (see lro_math.cuh and
// csrc/README.md), so on one GPU this extension and Triton give the same bits.
//
// The Python wrapper (lowrank_optim/kernels/cuda_ext.py) validates arguments, handles empty
// tensors and dtype conversions; these functions take contiguous CUDA tensors of the stated dtypes.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "lro_math.cuh"

namespace lro {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU; kernels stride over the rest.
int blocks_for(int64_t work, int threads = kThreads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<int>(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ------------------------------------------------------------------ stochastic rounding to bf16
// Thread per octet k: elements 8k..8k+7 share Philox(seed, k); element 8k+t takes half t % 2 (low
// first) of word t / 2. VEC: the input and output are 16-byte aligned (two float4 in, one uint4 out).
template <bool VEC>
__global__ void stochastic_round_bf16_kernel(const uint32_t* __restrict__ x, uint16_t* __restrict__ out,
                                             int64_t n, uint64_t seed) {
  const int64_t octets = (n + 7) / 8;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < octets;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Words r = philox(seed, static_cast<uint64_t>(k));
    const int64_t base = 8 * k;
    if (VEC && base + 8 <= n) {
      const uint4 a = reinterpret_cast<const uint4*>(x + base)[0];
      const uint4 b = reinterpret_cast<const uint4*>(x + base)[1];
      const uint32_t in[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      uint16_t res[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) res[t] = stochastic_bf16(in[t], (r.w[t / 2] >> (16 * (t % 2))) & 0xFFFFu);
      uint4 packed;
      packed.x = res[0] | (static_cast<uint32_t>(res[1]) << 16);
      packed.y = res[2] | (static_cast<uint32_t>(res[3]) << 16);
      packed.z = res[4] | (static_cast<uint32_t>(res[5]) << 16);
      packed.w = res[6] | (static_cast<uint32_t>(res[7]) << 16);
      *reinterpret_cast<uint4*>(out + base) = packed;
    } else {
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (base + t < n) out[base + t] = stochastic_bf16(x[base + t], (r.w[t / 2] >> (16 * (t % 2))) & 0xFFFFu);
      }
    }
  }
}

// ------------------------------------------------------------------ grouped min–max quantizer
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : shared[0];
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return v;
}

struct Min {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Block per group [start, start + group) ∩ [0, n): its range, then each element's code. Threads walk
// Philox quads q (elements 4q..4q+3, one Philox call) so the random stream is the Triton kernel's:
// element e adds uniform(word e % 4 of Philox(seed, e / 4)).
__global__ void quantize_grouped_kernel(const float* __restrict__ x, uint8_t* __restrict__ codes,
                                        float* __restrict__ scales, float* __restrict__ zeros, int64_t n,
                                        int64_t group, float levels, bool stochastic, uint64_t seed) {
  __shared__ float shared[32];
  const int64_t g = blockIdx.x;
  const int64_t start = g * group;
  const int64_t end = start + group < n ? start + group : n;

  float lo = INFINITY, hi = -INFINITY;
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const float v = x[e];
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = block_reduce(lo, Min{}, shared);
  hi = block_reduce(hi, Max{}, shared);
  const float scale = grouped_scale(lo, hi, levels);

  if (stochastic) {
    for (int64_t q = start / 4 + threadIdx.x; 4 * q < end; q += blockDim.x) {
      const Words r = philox(seed, static_cast<uint64_t>(q));
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int64_t e = 4 * q + t;
        if (e >= start && e < end) codes[e] = grouped_code(x[e], lo, scale, levels, uniform(r.w[t]));
      }
    }
  } else {
    for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
      codes[e] = grouped_code(x[e], lo, scale, levels, 0.5f);
    }
  }
  if (threadIdx.x == 0) {
    scales[g] = scale;
    zeros[g] = lo + 0.0f;  // -0 + 0 = +0: the stored zero point does not depend on where a -0 sits
  }
}

// ------------------------------------------------------------------ INT4 unpack + dequantize
template <typename Out>
struct Store;
template <>
struct Store<float> {
  __device__ static void at(float* out, int64_t i, float v) { out[i] = v; }
};
template <>
struct Store<double> {
  __device__ static void at(double* out, int64_t i, float v) { out[i] = static_cast<double>(v); }
};
template <>
struct Store<__half> {
  __device__ static void at(__half* out, int64_t i, float v) { out[i] = __float2half_rn(v); }
};
template <>
struct Store<uint16_t> {  // bfloat16 bits
  __device__ static void at(uint16_t* out, int64_t i, float v) { out[i] = bf16_rtne(v); }
};

// Thread per output element e: nibble e % 2 (low first) of byte e / 2, in group e / group.
template <typename Out, typename Index>
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                       const float* __restrict__ zero, Out* __restrict__ out, Index n,
                                       Index group) {
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const uint32_t byte = packed[e / 2];
    const uint32_t code = (e % 2) ? (byte >> 4) : (byte & 0xFu);
    const Index g = e / group;
    Store<Out>::at(out, e, dequantize(code, scale[g], zero[g]));
  }
}

template <typename Out>
void launch_dequantize_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, Out* out,
                            int64_t n, int64_t group) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for(n);
  if (n < (int64_t{1} << 31) - kThreads * int64_t{blocks}) {  // 32-bit index math: cheaper divisions
    dequantize_int4_kernel<Out, int32_t><<<blocks, kThreads, 0, stream>>>(
        packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), out,
        static_cast<int32_t>(n), static_cast<int32_t>(group < n ? group : n));
  } else {
    dequantize_int4_kernel<Out, int64_t><<<blocks, kThreads, 0, stream>>>(
        packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), out, n, group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

}  // namespace

// ------------------------------------------------------------------ host entry points
at::Tensor stochastic_round_bf16(const at::Tensor& x, int64_t seed) {
  check_cuda(x, "x", at::kFloat);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = blocks_for((n + 7) / 8);
  if (aligned16(src) && aligned16(dst)) {
    stochastic_round_bf16_kernel<true><<<blocks, kThreads, 0, stream>>>(src, dst, n, static_cast<uint64_t>(seed));
  } else {
    stochastic_round_bf16_kernel<false><<<blocks, kThreads, 0, stream>>>(src, dst, n, static_cast<uint64_t>(seed));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> quantize_grouped(const at::Tensor& x, int64_t levels, int64_t group, bool stochastic,
                                         int64_t seed) {
  check_cuda(x, "x", at::kFloat);
  TORCH_CHECK(group > 0, "group must be positive, got ", group);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  TORCH_CHECK(groups < (int64_t{1} << 31), "too many groups for one launch: ", groups);
  auto codes = at::empty({n}, x.options().dtype(at::kByte));
  auto scale = at::empty({groups}, x.options());
  auto zero = at::empty({groups}, x.options());
  if (n == 0) return {codes, scale, zero};
  quantize_grouped_kernel<<<static_cast<unsigned>(groups), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), n, group,
      static_cast<float>(levels), stochastic, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t n,
                           int64_t group, at::ScalarType dtype) {
  check_cuda(packed, "packed", at::kByte);
  check_cuda(scale, "scale", at::kFloat);
  check_cuda(zero, "zero", at::kFloat);
  TORCH_CHECK(group > 0, "group must be positive, got ", group);
  TORCH_CHECK(n >= 0 && n <= 2 * packed.numel(), "n = ", n, " codes do not fit in ", packed.numel(), " bytes");
  TORCH_CHECK(scale.numel() * group >= n && zero.numel() * group >= n, "too few scale/zero values for ", n,
              " codes in groups of ", group);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({n}, packed.options().dtype(dtype));
  if (n == 0) return out;
  switch (dtype) {
    case at::kFloat:
      launch_dequantize_int4(packed, scale, zero, out.data_ptr<float>(), n, group);
      break;
    case at::kDouble:
      launch_dequantize_int4(packed, scale, zero, out.data_ptr<double>(), n, group);
      break;
    case at::kHalf:
      launch_dequantize_int4(packed, scale, zero, reinterpret_cast<__half*>(out.data_ptr<at::Half>()), n, group);
      break;
    case at::kBFloat16:
      launch_dequantize_int4(packed, scale, zero, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n,
                             group);
      break;
    default:
      TORCH_CHECK(false, "dequantize_int4: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  }
  return out;
}

}  // namespace lro
