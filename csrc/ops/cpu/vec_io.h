// Loads and stores of the CPU kernels, compiled once per instruction set with them
// (scan_kernel.cpp): rows of scalar_t as vectors of the accumulation type, and the streaming
// (non-temporal) stores that work_plan.cpp's use_streaming_stores chooses.
#pragma once

#ifndef CPU_CAPABILITY
#error "vec_io.h belongs to the per-instruction-set kernels (scan_kernel.cpp)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace aaren::ops::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// The widest streaming store of this instruction set: one vector register, written to an
// address aligned to its size. The DEFAULT build has none.
#if defined(CPU_CAPABILITY_AVX512)
#define AAREN_STREAMING_STORES 1
using StreamWord = __m512i;
inline void stream_word(StreamWord* dst, StreamWord word) { _mm512_stream_si512(dst, word); }
#elif defined(CPU_CAPABILITY_AVX2)
#define AAREN_STREAMING_STORES 1
using StreamWord = __m256i;
inline void stream_word(StreamWord* dst, StreamWord word) { _mm256_stream_si256(dst, word); }
#endif

// Streams the vector's bits to dst when this instruction set can and dst is aligned to them
// (work_plan.cpp, "Streaming stores": only whole, aligned vectors stream); false: the caller
// stores them plainly.
template <typename Bits, typename T>
bool stream_bits(T* dst, const Bits& bits) {
#ifdef AAREN_STREAMING_STORES
  if constexpr (sizeof(Bits) == sizeof(StreamWord)) {
    if (reinterpret_cast<uintptr_t>(dst) % sizeof(StreamWord) == 0) {
      StreamWord word;
      std::memcpy(&word, &bits, sizeof(StreamWord));
      stream_word(reinterpret_cast<StreamWord*>(dst), word);
      return true;
    }
  }
#endif
  return false;
}

template <typename T>
bool stream_vector(T* dst, const Vectorized<T>& v) {
  return stream_bits(dst, v);
}

// The first `count` elements of v to dst: a whole vector by a streaming store when asked and
// possible (stream_bits), otherwise, and for a partial one, by a plain store.
template <typename T>
void store_vector(T* dst, const Vectorized<T>& v, int64_t count, bool streaming) {
  if (count == Vectorized<T>::size()) {
    if (!(streaming && stream_vector(dst, v))) {
      v.store(dst);
    }
  } else {
    v.store(dst, count);
  }
}

inline void stream_fence() {
#ifdef AAREN_STREAMING_STORES
  _mm_sfence();
#endif
}

// A vector of the accumulation type as float64 vectors, in registers: filled lane by lane
// through memory, the float64 vector's load waits for the scalar stores to reach the cache
// (no store forwarding). Returns how many float64 vectors hold it.
inline int widen(const Vectorized<double>& x, Vectorized<double>* parts) {
  parts[0] = x;
  return 1;
}

inline int widen(const Vectorized<float>& x, Vectorized<double>* parts) {
  static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size());
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 bits = x;
  parts[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(bits));
  parts[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(bits), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 bits = x;
  parts[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(bits));
  parts[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(bits, 1));
#else  // the DEFAULT build's vectors are arrays already
  constexpr int64_t half = Vectorized<double>::size();
  float lanes[Vectorized<float>::size()];
  double wide[Vectorized<float>::size()];
  x.store(lanes);
  for (int64_t k = 0; k < Vectorized<float>::size(); ++k) {
    wide[k] = lanes[k];
  }
  parts[0] = Vectorized<double>::loadu(wide);
  parts[1] = Vectorized<double>::loadu(wide + half);
#endif
  return 2;
}

// widen's inverse: two float64 vectors as one float vector, each element rounded to nearest
// (as static_cast<float> rounds it).
inline Vectorized<float> narrow(const Vectorized<double>* parts) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256 low = _mm512_cvtpd_ps(parts[0]);
  const __m256 high = _mm512_cvtpd_ps(parts[1]);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low)),
                                             _mm256_castps_pd(high), 1));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128 low = _mm256_cvtpd_ps(parts[0]);
  const __m128 high = _mm256_cvtpd_ps(parts[1]);
  return _mm256_set_m128(high, low);
#else
  constexpr int64_t half = Vectorized<double>::size();
  double wide[Vectorized<float>::size()];
  float lanes[Vectorized<float>::size()];
  parts[0].store(wide);
  parts[1].store(wide + half);
  for (int64_t k = 0; k < Vectorized<float>::size(); ++k) {
    lanes[k] = static_cast<float>(wide[k]);
  }
  return Vectorized<float>::loadu(lanes);
#endif
}

// Loads and stores a run of up to `width` elements of scalar_t as vectors of the
// accumulation type. Half types widen one vector into two float vectors.
template <typename scalar_t, typename = void>
struct VecIO {
  using acc_t = scalar_t;
  using AccVec = Vectorized<acc_t>;
  static constexpr int64_t width = AccVec::size();
  static constexpr int parts = 1;

  static void load(const scalar_t* src, int64_t count, AccVec* dst) {
    dst[0] = count == width ? AccVec::loadu(src) : AccVec::loadu(src, count);
  }
  static void store(scalar_t* dst, int64_t count, const AccVec* src, bool streaming) {
    store_vector(dst, src[0], count, streaming);
  }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using AccVec = Vectorized<float>;
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t width = Vec::size();
  static constexpr int parts = 2;

  static void load(const scalar_t* src, int64_t count, AccVec* dst) {
    const Vec v = count == width ? Vec::loadu(src) : Vec::loadu(src, count);
    std::tie(dst[0], dst[1]) = at::vec::convert_to_float<scalar_t>(v);
  }
  static void store(scalar_t* dst, int64_t count, const AccVec* src, bool streaming) {
#ifdef CPU_CAPABILITY_AVX512_BF16
    // One instruction for ATen's rounding sequence (round to nearest even, as it does; the
    // bfloat16 stores ran 6-8% faster, alternated in one process), except that it flushes
    // subnormals to zero: a vector holding one takes ATen's conversion.
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      constexpr int kSubnormal = 0x20;  // vfpclassps: denormal
      if ((_mm512_fpclass_ps_mask(src[0], kSubnormal) | _mm512_fpclass_ps_mask(src[1], kSubnormal)) == 0) {
        const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(src[1], src[0]));
        if (count == width) {
          if (!(streaming && stream_bits(dst, v))) {
            _mm512_storeu_si512(dst, v);
          }
        } else {
          _mm512_mask_storeu_epi16(dst, static_cast<__mmask32>((1ULL << count) - 1), v);
        }
        return;
      }
    }
#endif
    store_vector(dst, at::vec::convert_from_float<scalar_t>(src[0], src[1]), count, streaming);
  }
};

}  // namespace aaren::ops::cpu::CPU_CAPABILITY
