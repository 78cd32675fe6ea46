// Per-column vocabularies of Criteo categories, native: each distinct key of a
// column gets an id, 1, 2, ... in order of first appearance (0 stays "empty").
// A key is a nonzero 64-bit code of the category's string (the parser's
// key mode, or Python's for lines it reads). Open-addressing tables: 12 bytes
// per slot at a load of 0.35 to 0.7, plus 8 bytes per distinct key (its key by
// id) and 4 more when counting: 25 to 42 (counting: 29 to 46) bytes per
// distinct category.
#pragma once

#include <cstdint>
#include <vector>

namespace dlrm_ops::data {

class Vocabulary {
 public:
  // With `count`, how often each key is seen is kept, for freeze().
  Vocabulary(int columns, bool count);

  // keys[n x columns], row-major, replaced in place by their ids, rows in
  // order; new keys take the next id (and are counted, saturating). After
  // freeze(), ids are the frozen ones and unseen keys map to 0. Columns are
  // spread over `threads` threads.
  void map(int64_t* keys, int64_t n, int threads);

  // Ids by count instead (descending, ties by first appearance); keys seen
  // fewer than min_count times map to 0 with the empty field. Needs `count`.
  void freeze(int64_t min_count);

  int columns() const { return static_cast<int>(tables_.size()); }
  // Ids in use in column c, 0 included (the table size the model needs).
  int64_t size(int c) const;
  // Keys of column c in first-appearance order, and their counts.
  const std::vector<uint64_t>& keys(int c) const { return tables_[c].by_id; }
  const std::vector<uint32_t>& counts(int c) const { return tables_[c].counts; }
  int64_t memory_bytes() const;

 private:
  struct Table {
    std::vector<uint64_t> slot_key;  // 0: free
    std::vector<uint32_t> slot_id;   // first-appearance id - 1
    std::vector<uint64_t> by_id;
    std::vector<uint32_t> counts;  // empty unless counting
    std::vector<uint32_t> remap;   // after freeze: first-appearance id - 1 -> id
    int64_t frozen_size = 0;
    uint32_t find_or_add(uint64_t key);
    void grow();
  };
  std::vector<Table> tables_;
  bool count_;
  bool frozen_ = false;
};

}  // namespace dlrm_ops::data
