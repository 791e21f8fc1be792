// What the runner and the edge benchmark's timing programs (benchmarks/edge/) report about a
// process, in standard C++ only: its memory from /proc/self/status, the time, percentiles.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace aaren::edge {

// A field of /proc/self/status as a number (kB for the memory fields), -1 where unknown.
// VmHWM, the peak resident set, rather than getrusage's ru_maxrss: that survives exec, so a
// program started from a large process (Python) would report its parent's peak.
inline double status_value(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(status, line)) {
    if (line.rfind(key, 0) == 0) {
      return std::strtod(line.c_str() + key.size(), nullptr);
    }
  }
  return -1.0;
}

// A memory field (VmRSS: now; VmHWM: the peak; RssAnon, RssFile) in MiB, -1 where unknown.
inline double status_mib(const char* field) {
  const double kb = status_value(field);
  return kb < 0 ? kb : kb / 1024.0;
}

inline double now_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The q-quantile (0 <= q <= 1) of `values`, the nearest rank; 0 for none.
inline double percentile(std::vector<double> values, double q) {
  if (values.empty()) {
    return 0.0;
  }
  std::sort(values.begin(), values.end());
  const size_t index = static_cast<size_t>(q * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

}  // namespace aaren::edge
