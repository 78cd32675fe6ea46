// Per-column vocabularies of Criteo categories, native. A key is a nonzero
// 64-bit code of a category's string (the parser's key mode, or Python's for
// lines it reads); 0 is the empty field.
//
// In memory (Vocabulary): each distinct key of a column gets an id, 1, 2, ...
// in order of first appearance. 12 bytes per slot at a load of 0.35 to 0.7,
// plus 8 bytes per distinct key (its key by id) and 4 more when counting: 25
// to 42 (counting: 29 to 46) bytes per distinct category.
//
// Larger than memory (KeyRange, IdMap): scans over the keys already written
// to disk, each collecting the keys of a range of hash values per column
// with the row they first appear at and their count, within a byte budget;
// ids are ranks computed from those runs, and IdMap writes them back.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace dlrm_ops::data {

// The hash that places a key in a table, and in a KeyRange's range.
uint64_t key_hash(uint64_t key);

// Open addressing: key -> its index 0, 1, ... in order of insertion.
class KeyIndex {
 public:
  explicit KeyIndex(int64_t capacity = 1024);
  // The key's index; a new key takes the next one (and *added is set).
  uint32_t find_or_add(uint64_t key, bool* added);
  // The key's index, or -1.
  int64_t find(uint64_t key) const;
  int64_t size() const { return size_; }
  int64_t capacity() const { return static_cast<int64_t>(slot_key_.size()); }
  static int64_t slot_bytes() { return 12; }

 private:
  void grow();
  std::vector<uint64_t> slot_key_;  // 0: free
  std::vector<uint32_t> slot_id_;
  int64_t size_ = 0;
};

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
  // Keys of column c in first-appearance order.
  const std::vector<uint64_t>& keys(int c) const { return tables_[c].by_id; }
  int64_t memory_bytes() const;

 private:
  struct Table {
    KeyIndex index;  // key -> first-appearance id - 1
    std::vector<uint64_t> by_id;
    std::vector<uint32_t> counts;  // empty unless counting
    std::vector<uint32_t> remap;   // after freeze: first-appearance id - 1 -> id
    int64_t frozen_size = 0;
  };
  std::vector<Table> tables_;
  bool count_;
  bool frozen_ = false;
};

// One scan of a vocabulary larger than memory: per column, the keys whose
// key_hash lies in [lo, hi], with the row each first appears at and its
// count (saturating). hi starts at the top of the hash range; when a column's
// table would have to grow past the byte budget shared by all columns, that
// column halves its range instead, dropping the keys above (a later scan
// takes them). Tables take 20 bytes per slot, a load of 0.35 to 0.7 (29 to
// 57 bytes per key), and the budget bounds them, growth included.
class KeyRange {
 public:
  // lo[c]: where column c's range starts; an inactive column is skipped.
  KeyRange(const std::vector<uint64_t>& lo, const std::vector<bool>& active, int64_t budget_bytes);
  // keys[n x columns], row-major; row i is row first_row + i of the data.
  // Columns are spread over `threads` threads.
  void add(const int64_t* keys, int64_t n, int64_t first_row, int threads);
  int columns() const { return static_cast<int>(tables_.size()); }
  uint64_t lo(int c) const { return tables_[c].lo; }
  uint64_t hi(int c) const { return tables_[c].hi; }
  // Column c's keys, their first rows and counts, in order of first row,
  // made from its table in place (the table is gone after).
  void take(int c, std::vector<uint64_t>* keys, std::vector<int64_t>* first,
            std::vector<uint32_t>* counts);
  int64_t memory_bytes() const { return used_.load(); }
  static int64_t slot_bytes() { return 20; }

 private:
  struct Table {
    uint64_t lo = 0, hi = ~uint64_t{0};
    bool active = true;
    int64_t size = 0;
    std::vector<uint64_t> key;  // 0: free
    std::vector<int64_t> first;
    std::vector<uint32_t> count;
    void place(uint64_t k, int64_t f, uint32_t n);
  };
  void insert(Table& t, uint64_t key, int64_t row);
  bool reserve(int64_t bytes);
  void resize(Table& t, size_t capacity);
  void halve(Table& t);
  std::vector<Table> tables_;
  int64_t budget_;
  std::atomic<int64_t> used_{0};
};

// Keys -> ids for some keys of each column: writes the ids of the keys it
// holds, leaves every other element of the output alone.
class IdMap {
 public:
  explicit IdMap(int columns);
  // Room for n keys in column c (before its first add): no growing.
  void reserve(int c, int64_t n);
  void add(int c, const int64_t* keys, const int64_t* ids, int64_t n);
  // out[i, c] = id of keys[i, c] where it holds that key; both [n x columns].
  void apply(const int64_t* keys, int64_t* out, int64_t n, int threads) const;
  int columns() const { return static_cast<int>(index_.size()); }
  int64_t memory_bytes() const;
  // What a map of n keys in one column may take.
  static int64_t bytes_for(int64_t n);

 private:
  std::vector<KeyIndex> index_;
  std::vector<std::vector<int64_t>> ids_;
};

}  // namespace dlrm_ops::data
