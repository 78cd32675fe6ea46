// The raw Criteo click-log format, parsed natively: one line is
// label \t I1..I13 \t C1..C26 (empty fields allowed). No tensors here: the
// parser fills plain buffers that dlrm_ops._C hands to numpy.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dlrm_ops::data {

constexpr int kDense = 13;
constexpr int kSparse = 26;
constexpr int kFields = 1 + kDense + kSparse;

// Every element of the arrays is written by the parser (left unset by
// allocation: the threads fill their own lines, no serial zeroing first).
struct ParsedLines {
  std::unique_ptr<float[]> dense;     // [lines x 13], log(x+1), 0 for empty or <= 0
  std::unique_ptr<int64_t[]> sparse;  // [lines x 26], hex value % max_ind_range (or key), 0 empty
  std::unique_ptr<float[]> labels;    // [lines]
  std::vector<int64_t> deferred;      // lines (0-based in the buffer) left to the Python reference
  int64_t lines = 0;
};

// Parses the lines of buf[0, size) (the last one may lack its newline) with
// `threads` threads, lines in order. A line the fast path cannot prove it
// reads exactly as the Python reference does (a field count other than 40,
// a label other than 0/1, a number with signs, spaces, underscores or over
// 15 digits, a hex category over 16 digits, a carriage return inside) is
// listed in `deferred`, its row left zero. max_ind_range 0 is key mode:
// each category becomes its string's key for a Vocabulary (criteo_vocab.h),
// value << 4 | digits, for 1 to 15 lowercase hex digits (others: deferred).
ParsedLines parse_criteo(const char* buf, int64_t size, int64_t max_ind_range, int threads);

// Whether buf holds a carriage return not followed by a newline (Python's
// text mode ends a line there, the parser does not).
bool has_lone_cr(const char* buf, int64_t size);

}  // namespace dlrm_ops::data
