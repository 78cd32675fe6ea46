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

// The fields are read in one pass over the line: each parse stops at the
// tab that ends its field (or at the line's end), and any byte a field may
// not hold (a sign, a space, a carriage return, a letter) sends the line to
// the Python reference.

// A decimal integer of at most 15 digits (exact in a double), optionally
// negative, up to the next tab or e; false otherwise. *p ends on the tab.
bool parse_int(const char*& p, const char* e, int64_t* v) {
  bool neg = false;
  if (p < e && *p == '-') {
    neg = true;
    ++p;
  }
  const char* start = p;
  int64_t x = 0;
  for (; p < e && *p != '\t'; ++p) {
    const unsigned d = static_cast<unsigned>(*p - '0');
    if (d > 9) return false;
    x = x * 10 + d;
  }
  if (p == start || p - start > 15) return false;
  *v = neg ? -x : x;
  return true;
}

// Hex digit values by byte: 0-15 for 0-9 and a-f, 16-31 for A-F (the value
// plus 16), -1 otherwise. A table, not branches: the digits of a hash are
// letters or numbers at random, which defeats branch prediction.
struct HexTable {
  int8_t v[256];
  constexpr HexTable() : v() {
    for (int c = 0; c < 256; ++c) v[c] = -1;
    for (int c = 0; c < 10; ++c) v['0' + c] = static_cast<int8_t>(c);
    for (int c = 0; c < 6; ++c) {
      v['a' + c] = static_cast<int8_t>(10 + c);
      v['A' + c] = static_cast<int8_t>(26 + c);
    }
  }
};
constexpr HexTable kHex;

// Hex digits up to the next tab or e: at most 16 of them; *len is how many
// and *upper whether any is A-F.
bool parse_hex(const char*& p, const char* e, uint64_t* v, int64_t* len, bool* upper) {
  const char* start = p;
  uint64_t x = 0;
  int flags = 0;
  for (; p < e; ++p) {
    const int d = kHex.v[static_cast<unsigned char>(*p)];
    if (d < 0) break;
    x = x << 4 | static_cast<uint64_t>(d & 15);
    flags |= d;
  }
  if (p < e && *p != '\t') return false;
  *len = p - start;
  if (*len > 16) return false;
  *v = x;
  *upper = (flags & 16) != 0;
  return true;
}

// One line [b, e) without its newline into row i; false: leave it to Python.
bool parse_line(const char* b, const char* e, int64_t max_ind_range, float* dense, int64_t* sparse,
                float* label) {
  if (e > b && e[-1] == '\r') --e;
  const char* p = b;
  if (e - p < 2 || (p[0] != '0' && p[0] != '1') || p[1] != '\t') return false;
  *label = static_cast<float>(p[0] - '0');
  p += 2;
  const float* log_small = log1p_table();
  for (int j = 0; j < kDense; ++j) {
    if (p >= e) return false;  // too few fields
    if (*p == '\t') {
      dense[j] = 0.f;
    } else {
      int64_t v;
      if (!parse_int(p, e, &v) || p >= e) return false;
      dense[j] = v <= 0          ? 0.f
                 : v < kLogTable ? log_small[v]
                                 : static_cast<float>(std::log1p(static_cast<double>(v)));
    }
    ++p;  // the tab
  }
  for (int j = 0; j < kSparse; ++j) {
    const bool last = j == kSparse - 1;
    if (p > e) return false;  // too few fields
    if (p == e || *p == '\t') {
      if (p == e && !last) return false;
      sparse[j] = 0;
    } else {
      uint64_t v;
      int64_t len;
      bool upper;
      if (!parse_hex(p, e, &v, &len, &upper)) return false;
      if (max_ind_range > 0) {
        sparse[j] = static_cast<int64_t>(v % static_cast<uint64_t>(max_ind_range));
      } else {
        // Key mode: the string itself, one to 15 lowercase hex digits, as
        // value << 4 | length (distinct strings, distinct keys; never 0).
        if (len > 15 || upper) return false;
        sparse[j] = static_cast<int64_t>(v << 4 | static_cast<uint64_t>(len));
      }
    }
    if (last) return p == e;  // a tab here: more than 40 fields
    if (p >= e) return false;
    ++p;  // the tab
  }
  return true;
}

}  // namespace

bool has_lone_cr(const char* buf, int64_t size) {
  const char* end = buf + size;
  for (const char* p = buf; p < end; ++p) {
    p = static_cast<const char*>(std::memchr(p, '\r', static_cast<size_t>(end - p)));
    if (p == nullptr) return false;
    if (p + 1 == end || p[1] != '\n') return true;
  }
  return false;
}

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
