#include "data/criteo_parser.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace dlrm_ops::data {
namespace {

// Byte offsets of the line starts that split buf into about `parts` pieces
// of whole lines.
std::vector<int64_t> split_points(const char* buf, int64_t size, int parts) {
  std::vector<int64_t> at{0};
  for (int p = 1; p < parts; ++p) {
    int64_t guess = size * p / parts;
    if (guess <= at.back()) continue;
    const void* nl = std::memchr(buf + guess, '\n', static_cast<size_t>(size - guess));
    if (nl == nullptr) break;
    int64_t next = static_cast<const char*>(nl) - buf + 1;
    if (next < size && next > at.back()) at.push_back(next);
  }
  at.push_back(size);
  return at;
}

// log(x+1) as fp32 of the small counts most fields hold, computed once (the
// same double log1p, so the same bits as computing it each time).
constexpr int64_t kLogTable = 1 << 16;
const float* log1p_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(kLogTable);
    for (int64_t v = 0; v < kLogTable; ++v)
      t[v] = static_cast<float>(std::log1p(static_cast<double>(v)));
    return t;
  }();
  return table.data();
}

int64_t count_lines(const char* b, const char* e) {
  int64_t n = std::count(b, e, '\n');
  return n + (e > b && e[-1] != '\n');
}

// A decimal integer of at most 15 digits (exact in a double); false otherwise.
bool parse_int(const char* b, const char* e, int64_t* v) {
  bool neg = false;
  if (b < e && *b == '-') {
    neg = true;
    ++b;
  }
  if (b == e || e - b > 15) return false;
  int64_t x = 0;
  for (; b < e; ++b) {
    if (*b < '0' || *b > '9') return false;
    x = x * 10 + (*b - '0');
  }
  *v = neg ? -x : x;
  return true;
}

bool parse_hex(const char* b, const char* e, uint64_t* v) {
  if (b == e || e - b > 16) return false;
  uint64_t x = 0;
  for (; b < e; ++b) {
    char c = *b;
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (d < 0) return false;
    x = x << 4 | static_cast<uint64_t>(d);
  }
  *v = x;
  return true;
}

// One line [b, e) without its newline into row i; false: leave it to Python.
bool parse_line(const char* b, const char* e, int64_t max_ind_range, float* dense, int64_t* sparse,
                float* label) {
  if (e > b && e[-1] == '\r') --e;
  if (std::memchr(b, '\r', static_cast<size_t>(e - b)) != nullptr) return false;
  const char* f[kFields + 1];
  int n = 0;
  f[n++] = b;
  for (const char* p = b; p < e; ++p) {
    if (*p == '\t') {
      if (n == kFields) return false;
      f[n++] = p + 1;
    }
  }
  if (n != kFields) return false;
  f[kFields] = e + 1;  // each field ends one byte before the next begins
  auto end = [&](int j) { return f[j + 1] - 1; };
  if (end(0) - f[0] != 1 || (f[0][0] != '0' && f[0][0] != '1')) return false;
  *label = static_cast<float>(f[0][0] - '0');
  const float* log_small = log1p_table();
  for (int j = 0; j < kDense; ++j) {
    const char* s = f[1 + j];
    if (s == end(1 + j)) {
      dense[j] = 0.f;
      continue;
    }
    int64_t v;
    if (!parse_int(s, end(1 + j), &v)) return false;
    dense[j] = v <= 0          ? 0.f
               : v < kLogTable ? log_small[v]
                               : static_cast<float>(std::log1p(static_cast<double>(v)));
  }
  for (int j = 0; j < kSparse; ++j) {
    const char* s = f[1 + kDense + j];
    if (s == end(1 + kDense + j)) {
      sparse[j] = 0;
      continue;
    }
    uint64_t v;
    if (!parse_hex(s, end(1 + kDense + j), &v)) return false;
    if (max_ind_range > 0) {
      sparse[j] = static_cast<int64_t>(v % static_cast<uint64_t>(max_ind_range));
      continue;
    }
    // Key mode: the string itself, one to 15 lowercase hex digits, as
    // value << 4 | length (distinct strings, distinct keys; never 0).
    const int64_t len = end(1 + kDense + j) - s;
    if (len > 15 || std::any_of(s, s + len, [](char c) { return c >= 'A' && c <= 'F'; }))
      return false;
    sparse[j] = static_cast<int64_t>(v << 4 | static_cast<uint64_t>(len));
  }
  return true;
}

}  // namespace

ParsedLines parse_criteo(const char* buf, int64_t size, int64_t max_ind_range, int threads) {
  threads = std::max(1, threads);
  log1p_table();  // built before the threads start
  std::vector<int64_t> at = split_points(buf, size, threads);
  int parts = static_cast<int>(at.size()) - 1;
  std::vector<int64_t> first(parts + 1, 0);
  for (int p = 0; p < parts; ++p)
    first[p + 1] = first[p] + count_lines(buf + at[p], buf + at[p + 1]);
  ParsedLines out;
  out.lines = first[parts];
  out.dense.reset(new float[out.lines * kDense]);
  out.sparse.reset(new int64_t[out.lines * kSparse]);
  out.labels.reset(new float[out.lines]);
  std::vector<std::vector<int64_t>> deferred(parts);
  auto work = [&](int p) {
    const char* b = buf + at[p];
    const char* stop = buf + at[p + 1];
    for (int64_t i = first[p]; b < stop; ++i) {
      const void* nl = std::memchr(b, '\n', static_cast<size_t>(stop - b));
      const char* e = nl ? static_cast<const char*>(nl) : stop;
      if (!parse_line(b, e, max_ind_range, &out.dense[i * kDense], &out.sparse[i * kSparse],
                      &out.labels[i])) {
        std::fill_n(&out.dense[i * kDense], kDense, 0.f);
        std::fill_n(&out.sparse[i * kSparse], kSparse, 0);
        out.labels[i] = 0.f;
        deferred[p].push_back(i);
      }
      b = e + 1;
    }
  };
  std::vector<std::thread> pool;
  for (int p = 1; p < parts; ++p) pool.emplace_back(work, p);
  if (parts > 0) work(0);
  for (auto& t : pool) t.join();
  for (auto& d : deferred) out.deferred.insert(out.deferred.end(), d.begin(), d.end());
  return out;
}

}  // namespace dlrm_ops::data
