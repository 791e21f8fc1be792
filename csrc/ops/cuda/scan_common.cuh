// What the CUDA scan's forward (scan_forward.cu) and backward (scan_backward.cu) share: the
// problem's shape and tensor views, the launch, the chunk plan and the vector width. Same
// results as the CPU kernels (ops/cpu/scan_kernel.cpp), with the same arithmetic
// (aaren/combine.h); scan_cuda.cpp registers them.
//
// Both directions are first-order linear recurrences over the tokens of each (batch,
// head) sequence, with gates that depend only on per-token scalars (each .cu gives its own).
//
// Work layout. A warp walks the tokens of one sequence (or one chunk of it) in tiles of
// 32: lane j holds token j's scalars, so the scalar recurrences of a tile are warp scans
// (scan_device.cuh: forward, a scan of the (m, u) merge, whose maxima are exact; backward,
// an affine suffix scan), and then every lane steps through the tile's tokens for its own
// features (VEC contiguous ones per access), the gates broadcast by shuffles. Values are
// loaded a batch of tokens ahead of their use to keep enough bytes in flight.
//
// Chunks. When the sequences x feature tiles are too few warps to fill the GPU, the
// sequence is split into chunks, in three phases, with no inter-block waiting:
//   1. summarize: each chunk's own result from an empty start (forward: the (lse, out)
//      of its tokens, (m + log u, w / u); backward: R and Q at its first token with
//      nothing after it);
//   2. the summaries form a sequence of their own, with the same recurrence (a chunk is
//      one "token" with score = its lse and value = its out; backward: gate
//      e^(L_first(c) - L_first(c+1)), the product of the chunk's gates), scanned by the
//      same code, itself chunked when long;
//   3. scan: each chunk again, from the state its predecessor (forward) or successor
//      (backward) left, writing the outputs (the forward enters a state (L, o) as
//      (m, u, w) = (L, 1, o), or (-inf, 0, 0) for L = -inf, like the initial state).
// Phases 1 and 3 both read the chunk, so a split pass moves 1.5x the bytes of a single
// one: it is used only when a single pass would leave the GPU mostly idle.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "ops/cuda/scan_device.cuh"
#include "ops/cuda/scan_kernels.h"
#include "ops/scan.h"
#include "ops/scan_varlen.h"

namespace aaren::ops::cuda {

// aaren.scan_varlen's forward and backward (scan_forward.cu, scan_backward.cu: the dense
// kernels over packed sequences), for the dtype of args.values, the chunks planned for the
// longest sequence `longest`; scan_varlen.cu's entry points call them.
void varlen_forward(const VarlenForwardArgs& args, int64_t longest);
void varlen_backward(const VarlenBackwardArgs& args, int64_t longest);

// ---- Problem description shared by host and device -------------------------------

// Sizes of one scan problem (batch: the sequences; length: theirs, or the longest of packed
// ones) and its split into chunks: chunk c holds the tokens [c chunk_len, min((c + 1)
// chunk_len, length)) (of a packed sequence: its Span's, below).
struct Shape {
  int64_t batch;
  int64_t length;
  int64_t heads;
  int64_t dim;
  int64_t chunk_len;
  int64_t num_chunks;

  // Offset into contiguous [B, C, H] tensors (times dim for [.., D]); a token's is its
  // Span's (below).
  __host__ __device__ int64_t chunk_index(int64_t b, int64_t c, int64_t h) const {
    return (b * num_chunks + c) * heads + h;
  }
};

// ---- Where each sequence's tokens are: the sequence locators ------------------------
//
// The kernels are written once for both layouts; a locator gives sequence b's tokens
// (`span`): its local token n (0 <= n < length) is row(key, h) + n stride_n of the Strided
// inputs and (base + n) of the contiguous [.., H(, D)] outputs, and its chunk c the tokens
// [c chunk_len, (c + 1) chunk_len) clipped to the length (empty past the end).
struct Span {
  int64_t key;     // the row key of the Strided views: b (dense) or the first token (packed)
  int64_t base;    // token 0's index in the contiguous outputs
  int64_t length;  // tokens
  int64_t chunk_len;

  __device__ int64_t chunk_begin(int64_t chunk) const {
    return std::min(chunk * chunk_len, length);
  }
  __device__ int64_t chunk_end(int64_t chunk) const {
    return std::min(chunk * chunk_len + chunk_len, length);
  }
};

// [B, N, H(, D)]: sequence b the N tokens at b of the views, every chunk chunk_len long but
// the last.
struct DenseSequences {
  __device__ Span span(const Shape& shape, int64_t b) const {
    return {b, b * shape.length, shape.length, shape.chunk_len};
  }
};

// Packed [T, H(, D)] (ops/scan_varlen.h): sequence i the tokens [cu_seqlens[i],
// cu_seqlens[i + 1]), the views' stride_b equal to their stride_n (a row's key is its first
// token). Every bound is clamped to [0, T] and an end to at least its start, so that wrong
// values (not checked on the device when max_seqlen is given) give wrong results but never
// an access outside the tensors. The chunk plan (Shape's chunk_len and num_chunks) is made
// for the longest sequence, max_seqlen: a sequence with more tokens than num_chunks x
// chunk_len gets longer chunks (a multiple of 32), so that every token is in one; a shorter
// one leaves its last chunks empty.
struct PackedSequences {
  const void* bounds;  // cu_seqlens [N + 1]
  bool bounds_64;      // int64 (else int32)
  int64_t tokens;      // T

  __device__ int64_t bound(int64_t i) const {
    const int64_t b = bounds_64 ? static_cast<const int64_t*>(bounds)[i]
                                : static_cast<const int32_t*>(bounds)[i];
    return std::min(std::max<int64_t>(b, 0), tokens);
  }
  __device__ Span span(const Shape& shape, int64_t i) const {
    const int64_t begin = bound(i);
    const int64_t length = std::max(begin, bound(i + 1)) - begin;
    const int64_t per_chunk = (length + shape.num_chunks - 1) / shape.num_chunks;
    const int64_t chunk_len =
        std::max(shape.chunk_len, (per_chunk + kWarpSize - 1) / kWarpSize * kWarpSize);
    return {begin, begin, length, chunk_len};
  }
};

// A [B, N, H] or [B, N, H, D] tensor with arbitrary strides over B, N and H (features,
// if any, contiguous). [B, H] tensors use it with stride_n unused.
template <typename T>
struct Strided {
  T* data;
  int64_t stride_b;
  int64_t stride_n;
  int64_t stride_h;

  __device__ T* row(int64_t b, int64_t h) const {
    return data + b * stride_b + h * stride_h;
  }
};

// Views of the operator's tensors: sequences [B, N, H(, D)] and states [B, H(, D)].
template <typename T>
Strided<T> sequence_view(T* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Strided<T> state_view(T* data, const at::Tensor& t) {
  return {data, t.stride(0), 0, t.stride(1)};
}

// Packed tokens [T, H(, D)] (PackedSequences: a row's key is its first token).
template <typename T>
Strided<T> packed_view(T* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(0), t.stride(1)};
}

// A contiguous [B, N, H, D] tensor (or [B, N, H] with dim = 1).
template <typename T>
Strided<T> contiguous(T* data, int64_t length, int64_t heads, int64_t dim) {
  return {data, length * heads * dim, heads * dim, dim};
}

// ---- Host side: launches, chunking, vector width -------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename Params>
using KernelFn = void (*)(Params);

template <typename Params>
void launch(KernelFn<Params> kernel, int64_t blocks, int threads, size_t shared,
            const Params& params) {
  if (blocks == 0) {
    return;
  }
  TORCH_CHECK(blocks <= INT_MAX, "aaren (CUDA): problem too large for one launch (", blocks,
              " blocks)");
  kernel<<<static_cast<unsigned>(blocks), threads, shared, at::cuda::getCurrentCUDAStream()>>>(
      params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warps of `kernel` resident on the whole GPU at once (registers and shared memory
// decide how many blocks fit on an SM).
template <typename Params>
int64_t resident_warps(KernelFn<Params> kernel, int threads, size_t shared) {
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, shared));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max(1, blocks_per_sm) * int64_t{threads / kWarpSize} * sms;
}

// Tokens per chunk: a multiple of the 32-token tile, and long enough that the chunk
// summaries (one D-vector per chunk) stay a small fraction of the traffic.
constexpr int64_t kMinChunkLen = 64;

struct ChunkPlan {
  int64_t chunk_len;
  int64_t num_chunks;
};

// `warps`: the warps of one pass over whole sequences; `capacity()`: how many warps the
// GPU holds at once. A split pass moves 1.5x the bytes, so split only when a single pass
// would fill less than half of the GPU; then make as many chunks as fill it in one wave.
// Short sequences (a step: N = 1) never ask for the capacity.
template <typename Capacity>
ChunkPlan plan_chunks(int64_t length, int64_t warps, const Capacity& capacity) {
  if (length < 2 * kMinChunkLen) {
    return {length, 1};
  }
  const int64_t resident = capacity();
  if (2 * warps >= resident) {
    return {length, 1};
  }
  const int64_t wanted = resident / warps;  // >= 2
  const int64_t chunk_len =
      std::max(kMinChunkLen, ceil_div(ceil_div(length, wanted), kWarpSize) * kWarpSize);
  const int64_t num_chunks = ceil_div(length, chunk_len);
  return num_chunks > 1 ? ChunkPlan{chunk_len, num_chunks} : ChunkPlan{length, 1};
}

// A tensor read or written with VEC-wide accesses along its contiguous features.
struct VecOperand {
  const void* data;  // nullptr: not used
  int64_t element_size;
  std::array<int64_t, 3> strides;  // over B, N, H (in elements)
};

// Features per access: among the widths alignment allows, the narrowest that covers the
// features with the fewest warps (D = 64 float: 32 lanes x 2, not 16 lanes x 4; D = 96
// half: 24 lanes x 4, one warp rather than two).
template <typename T>
int pick_vec(int64_t dim, std::initializer_list<VecOperand> operands) {
  const auto fits = [&](int width) {
    if (dim % width != 0) {
      return false;
    }
    for (const VecOperand& operand : operands) {
      if (operand.data == nullptr) {
        continue;
      }
      if (reinterpret_cast<uintptr_t>(operand.data) % (width * operand.element_size) != 0) {
        return false;
      }
      for (const int64_t stride : operand.strides) {
        if (stride % width != 0) {
          return false;
        }
      }
    }
    return true;
  };
  const auto warps = [&](int width) { return ceil_div(dim, kWarpSize * width); };
  int best = 1;
  for (int width = 2; width <= kMaxVec<T>; width *= 2) {
    if (fits(width) && warps(width) < warps(best)) {
      best = width;
    }
  }
  return best;
}

// Calls f(std::integral_constant<int, VEC>) for a runtime vec among those T supports.
template <typename T, typename F>
void with_vec(int vec, const F& f) {
  if constexpr (kMaxVec<T> >= 4) {
    if (vec == 4) {
      return f(std::integral_constant<int, 4>{});
    }
  }
  if (vec == 2) {
    return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

}  // namespace aaren::ops::cuda
