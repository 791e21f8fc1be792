// What bench_edge_et and bench_edge_libtorch share: the tokens they feed (the same
// pseudo-random vectors on both sides), the --windows list, and the "key value" report that
// benchmarks/bench_edge.py reads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "process_stats.h"  // csrc/edge: memory, time, percentiles

namespace aaren::edge {

// "0,1024,8128" -> {0, 1024, 8128}.
inline std::vector<long> parse_list(const std::string& text) {
  std::vector<long> values;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    values.push_back(std::stol(text.substr(begin, end - begin)));
    begin = end + 1;
  }
  return values;
}

// One token's vector, uniform in [-1, 1), from a 64-bit LCG: a new one per call, nothing held.
struct TokenSource {
  uint64_t seed = 0x9e3779b97f4a7c15ull;

  void fill(float* data, int64_t width) {
    for (int64_t i = 0; i < width; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      data[i] = static_cast<float>(static_cast<int64_t>(seed >> 40) - (1ll << 23)) / (1 << 23);
    }
  }
};

// The report: per window (the calls from each of `windows`, `window` of them; `us_by_token`
// holds each token's time, -1 for a token not called) the p50 and p90 in microseconds, the
// p50 and p90 over `calls_us`, the resident set (after loading, after the first call, now,
// the peak, anonymous and file-backed), the threads, and `sink` (an output, so that nothing
// is optimized away).
inline void print_report(int64_t width, long tokens, const std::vector<double>& us_by_token,
                         const std::vector<double>& calls_us, const std::vector<long>& windows,
                         long window, double rss_load, double rss_first, double sink) {
  std::printf("width %lld\ntokens %ld\ncalls %zu\nfirst_us %.2f\n", static_cast<long long>(width),
              tokens, calls_us.size(), calls_us.empty() ? 0.0 : calls_us.front());
  for (const long begin : windows) {
    if (begin < 0 || begin >= tokens) {
      continue;
    }
    const long end = std::min(tokens, begin + window);
    std::vector<double> part(us_by_token.begin() + begin, us_by_token.begin() + end);
    std::printf("window %ld %ld p50_us %.2f p90_us %.2f\n", begin, end, percentile(part, 0.5),
                percentile(part, 0.9));
  }
  std::printf("p50_us %.2f\np90_us %.2f\n", percentile(calls_us, 0.5), percentile(calls_us, 0.9));
  std::printf("rss_load_mib %.2f\nrss_first_mib %.2f\nrss_end_mib %.2f\npeak_rss_mib %.2f\n",
              rss_load, rss_first, status_mib("VmRSS"), status_mib("VmHWM"));
  std::printf("rss_anon_mib %.2f\nrss_file_mib %.2f\nos_threads %.0f\n", status_mib("RssAnon"),
              status_mib("RssFile"), status_value("Threads"));
  std::printf("output0 %g\n", sink);
}

}  // namespace aaren::edge
