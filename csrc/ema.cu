// Multi-tensor EMA update: teacher <- momentum * teacher + (1 - momentum) * student, in place, for a whole
// list of tensors in one launch. The teacher is fp32; the student fp32, fp16 or bf16 (one dtype per launch);
// optionally a bf16 copy of the new teacher is written in the same pass.
//
// Work is split into fixed-size chunks over all tensors; each block finds its tensor by binary search over
// the chunk prefix sums (a few hundred entries, cached in L1/L2), so the host only uploads one small table
// per call. Threads move 4 elements at a time (16-byte teacher loads) where the pointers allow it.
// Only ATen's tensor core and c10's CUDA helpers: torch/extension.h would triple the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace cosmos_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec * 16;  // elements per block

struct TensorMeta {
  float* teacher;
  const void* student;
  __nv_bfloat16* copy;  // nullptr: no bf16 copy
  int64_t numel;
  int64_t first_chunk;  // prefix sum of the chunk counts
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Four consecutive student values; the caller guarantees 4 * sizeof(S) alignment.
template <typename S>
__device__ __forceinline__ void load4(const S* p, float out[kVec]);

template <>
__device__ __forceinline__ void load4<float>(const float* p, float out[kVec]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}

template <typename S>
__device__ __forceinline__ void load4(const S* p, float out[kVec]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);  // 4 x 16-bit
  const S* v = reinterpret_cast<const S*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(v[j]);
}

template <typename S, bool kCopy>
__global__ void __launch_bounds__(kThreads) ema_kernel(const TensorMeta* __restrict__ metas, int num_tensors,
                                                       float momentum) {
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = num_tensors - 1;  // last tensor whose first chunk is <= this chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (metas[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  const TensorMeta m = metas[lo];
  const S* student = static_cast<const S*>(m.student);
  const int64_t start = (chunk - m.first_chunk) * kChunk;
  const int64_t end = min(start + kChunk, m.numel);
  const float keep = momentum, take = 1.0f - momentum;
  const bool vector_ok =
      (reinterpret_cast<uintptr_t>(m.teacher) % 16 == 0) &&
      (reinterpret_cast<uintptr_t>(student) % (kVec * sizeof(S)) == 0) &&
      (!kCopy || reinterpret_cast<uintptr_t>(m.copy) % (kVec * sizeof(__nv_bfloat16)) == 0);
  for (int64_t i = start + threadIdx.x * kVec; i < end; i += kThreads * kVec) {
    if (vector_ok && i + kVec <= end) {
      float s[kVec];
      load4(student + i, s);
      float4 t = *reinterpret_cast<float4*>(m.teacher + i);
      t.x = fmaf(keep, t.x, take * s[0]);
      t.y = fmaf(keep, t.y, take * s[1]);
      t.z = fmaf(keep, t.z, take * s[2]);
      t.w = fmaf(keep, t.w, take * s[3]);
      *reinterpret_cast<float4*>(m.teacher + i) = t;
      if (kCopy) {
        __nv_bfloat162 lo2 = __floats2bfloat162_rn(t.x, t.y), hi2 = __floats2bfloat162_rn(t.z, t.w);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo2);
        packed.y = *reinterpret_cast<uint32_t*>(&hi2);
        *reinterpret_cast<uint2*>(m.copy + i) = packed;
      }
    } else {
      for (int64_t j = i; j < min(i + kVec, end); ++j) {
        const float t = fmaf(keep, m.teacher[j], take * to_float(student[j]));
        m.teacher[j] = t;
        if (kCopy) m.copy[j] = __float2bfloat16_rn(t);
      }
    }
  }
}

template <typename S>
void launch(const TensorMeta* metas, int num_tensors, int64_t num_chunks, float momentum, bool copy,
            cudaStream_t stream) {
  if (copy) {
    ema_kernel<S, true><<<num_chunks, kThreads, 0, stream>>>(metas, num_tensors, momentum);
  } else {
    ema_kernel<S, false><<<num_chunks, kThreads, 0, stream>>>(metas, num_tensors, momentum);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Arguments are checked in Python (cosmos_fast.ema_update_); the checks here guard the kernel's assumptions.
void ema_update_cuda(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                     double momentum, const std::vector<at::Tensor>& bf16_copy) {
  TORCH_CHECK(teacher.size() == student.size(), "teacher and student lists differ in length");
  TORCH_CHECK(bf16_copy.empty() || bf16_copy.size() == teacher.size(), "bf16_copy must match teacher");
  if (teacher.empty()) return;
  const at::ScalarType student_dtype = student[0].scalar_type();
  const c10::cuda::CUDAGuard guard(teacher[0].device());
  std::vector<TensorMeta> metas;
  metas.reserve(teacher.size());
  int64_t chunks = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.is_cuda() && s.is_cuda() && t.is_contiguous() && s.is_contiguous(), "tensor ", i,
                ": CUDA, contiguous tensors expected");
    TORCH_CHECK(t.scalar_type() == at::kFloat && s.scalar_type() == student_dtype && t.numel() == s.numel(),
                "tensor ", i, ": fp32 teacher and a student of the list's dtype and size expected");
    if (t.numel() == 0) continue;
    __nv_bfloat16* copy = nullptr;
    if (!bf16_copy.empty()) {
      TORCH_CHECK(bf16_copy[i].scalar_type() == at::kBFloat16 && bf16_copy[i].numel() == t.numel() &&
                  bf16_copy[i].is_contiguous(), "bf16_copy ", i, ": contiguous bf16 of the teacher's size expected");
      copy = reinterpret_cast<__nv_bfloat16*>(bf16_copy[i].data_ptr());
    }
    metas.push_back({t.data_ptr<float>(), s.data_ptr(), copy, t.numel(), chunks});
    chunks += (t.numel() + kChunk - 1) / kChunk;
  }
  if (metas.empty()) return;
  const int64_t bytes = static_cast<int64_t>(metas.size() * sizeof(TensorMeta));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), metas.data(), bytes);
  // (the caching host allocator keeps the pinned block alive until this asynchronous copy is done)
  at::Tensor device = host.to(teacher[0].device(), /*non_blocking=*/true);
  const auto* device_metas = reinterpret_cast<const TensorMeta*>(device.data_ptr());
  const int n = static_cast<int>(metas.size());
  const float m = static_cast<float>(momentum);
  const bool copy = !bf16_copy.empty();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (student_dtype) {
    case at::kFloat: launch<float>(device_metas, n, chunks, m, copy, stream); break;
    case at::kHalf: launch<__half>(device_metas, n, chunks, m, copy, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(device_metas, n, chunks, m, copy, stream); break;
    default: TORCH_CHECK(false, "student dtype must be fp32, fp16 or bf16, got ", student_dtype);
  }
}

}  // namespace cosmos_fast
