#include "data/criteo_vocab.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <thread>

namespace dlrm_ops::data {
namespace {

// Runs work(c) for every column c, the columns spread over `threads` threads.
template <typename F>
void per_column(int columns, int threads, F work) {
  threads = std::max(1, std::min(threads, columns));
  auto run = [&](int first) {
    for (int c = first; c < columns; c += threads) work(c);
  };
  std::vector<std::thread> pool;
  for (int p = 1; p < threads; ++p) pool.emplace_back(run, p);
  run(0);
  for (auto& th : pool) th.join();
}

// Slots for n keys at a load of at most 0.7 (a power of two, at least 16).
size_t slots_for(int64_t n) {
  size_t cap = 16;
  while (static_cast<size_t>(n) * 10 > cap * 7) cap *= 2;
  return cap;
}

}  // namespace

uint64_t key_hash(uint64_t x) {  // splitmix64's finaliser (a bijection): keys are often dense
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

KeyIndex::KeyIndex(int64_t capacity) : slot_key_(slots_for(capacity * 7 / 10), 0) {
  slot_id_.assign(slot_key_.size(), 0);
}

void KeyIndex::grow() {
  std::vector<uint64_t> keys(slot_key_.size() * 2, 0);
  std::vector<uint32_t> ids(keys.size(), 0);
  const uint64_t mask = keys.size() - 1;
  for (size_t s = 0; s < slot_key_.size(); ++s) {
    if (slot_key_[s] == 0) continue;
    uint64_t h = key_hash(slot_key_[s]) & mask;
    while (keys[h] != 0) h = (h + 1) & mask;
    keys[h] = slot_key_[s];
    ids[h] = slot_id_[s];
  }
  slot_key_.swap(keys);
  slot_id_.swap(ids);
}

uint32_t KeyIndex::find_or_add(uint64_t key, bool* added) {
  const uint64_t mask = slot_key_.size() - 1;
  uint64_t h = key_hash(key) & mask;
  *added = false;
  while (slot_key_[h] != 0) {
    if (slot_key_[h] == key) return slot_id_[h];
    h = (h + 1) & mask;
  }
  if (size_ >= 0xFFFFFFFEll) throw std::length_error("over 4 billion categories in a column");
  const auto id = static_cast<uint32_t>(size_++);
  slot_key_[h] = key;
  slot_id_[h] = id;
  *added = true;
  if (static_cast<size_t>(size_) * 10 > slot_key_.size() * 7) grow();
  return id;
}

int64_t KeyIndex::find(uint64_t key) const {
  const uint64_t mask = slot_key_.size() - 1;
  for (uint64_t h = key_hash(key) & mask; slot_key_[h] != 0; h = (h + 1) & mask)
    if (slot_key_[h] == key) return slot_id_[h];
  return -1;
}

Vocabulary::Vocabulary(int columns, bool count)
    : tables_(static_cast<size_t>(columns)), count_(count) {
  if (columns < 1) throw std::invalid_argument("columns must be at least 1");
}

void Vocabulary::map(int64_t* keys, int64_t n, int threads) {
  const int C = columns();
  per_column(C, threads, [&](int c) {
    Table& t = tables_[c];
    for (int64_t i = 0; i < n; ++i) {
      int64_t& k = keys[i * C + c];
      if (k == 0) continue;
      if (frozen_) {  // every key was seen by the counting pass; one not seen maps to 0
        const int64_t id = t.index.find(static_cast<uint64_t>(k));
        k = id < 0 ? 0 : t.remap[id];
        continue;
      }
      bool added;
      const uint32_t id = t.index.find_or_add(static_cast<uint64_t>(k), &added);
      if (added) {
        t.by_id.push_back(static_cast<uint64_t>(k));
        if (count_) t.counts.push_back(0);
      }
      if (count_ && t.counts[id] != UINT32_MAX) ++t.counts[id];
      k = static_cast<int64_t>(id) + 1;
    }
  });
}

void Vocabulary::freeze(int64_t min_count) {
  if (!count_) throw std::logic_error("freeze() needs a Vocabulary that counts");
  for (auto& t : tables_) {
    std::vector<uint32_t> order(t.by_id.size());
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t a, uint32_t b) { return t.counts[a] > t.counts[b]; });
    t.remap.assign(order.size(), 0);
    t.frozen_size = 1;
    for (uint32_t r = 0; r < order.size(); ++r) {
      if (static_cast<int64_t>(t.counts[order[r]]) < min_count) break;
      t.remap[order[r]] = r + 1;
      t.frozen_size = r + 2;
    }
  }
  frozen_ = true;
}

int64_t Vocabulary::size(int c) const {
  const Table& t = tables_[c];
  return frozen_ ? t.frozen_size : static_cast<int64_t>(t.by_id.size()) + 1;
}

int64_t Vocabulary::memory_bytes() const {
  int64_t b = 0;
  for (const auto& t : tables_)
    b += static_cast<int64_t>(t.index.capacity() * KeyIndex::slot_bytes() + t.by_id.capacity() * 8 +
                              t.counts.capacity() * 4 + t.remap.capacity() * 4);
  return b;
}

KeyRange::KeyRange(const std::vector<uint64_t>& lo, const std::vector<bool>& active,
                   int64_t budget_bytes)
    : tables_(lo.size()), budget_(budget_bytes) {
  if (lo.empty() || active.size() != lo.size())
    throw std::invalid_argument("lo and active need one entry per column");
  for (size_t c = 0; c < lo.size(); ++c) {
    tables_[c].lo = lo[c];
    tables_[c].active = active[c];
    if (!reserve(16 * slot_bytes()))
      throw std::length_error("the budget does not hold an empty table per column");
    resize(tables_[c], 16);
  }
}

bool KeyRange::reserve(int64_t bytes) {
  int64_t now = used_.load();
  while (now + bytes <= budget_)
    if (used_.compare_exchange_weak(now, now + bytes)) return true;
  return false;
}

void KeyRange::Table::place(uint64_t k, int64_t f, uint32_t n) {
  const uint64_t mask = key.size() - 1;
  uint64_t h = key_hash(k) & mask;
  while (key[h] != 0) h = (h + 1) & mask;
  key[h] = k;
  first[h] = f;
  count[h] = n;
}

void KeyRange::resize(Table& t, size_t capacity) {
  Table grown;
  grown.key.assign(capacity, 0);
  grown.first.assign(capacity, 0);
  grown.count.assign(capacity, 0);
  for (size_t s = 0; s < t.key.size(); ++s)
    if (t.key[s] != 0) grown.place(t.key[s], t.first[s], t.count[s]);
  t.key.swap(grown.key);
  t.first.swap(grown.first);
  t.count.swap(grown.count);
}

void KeyRange::halve(Table& t) {
  t.hi = t.lo + (t.hi - t.lo) / 2;
  // In place (no second table): start after a free slot, so no probe run
  // crosses the start; take every entry out and put the kept ones back.
  const size_t cap = t.key.size(), mask = cap - 1;
  size_t start = 0;
  while (t.key[start] != 0) ++start;
  t.size = 0;
  for (size_t j = 1; j < cap; ++j) {
    const size_t s = (start + j) & mask;
    const uint64_t k = t.key[s];
    if (k == 0) continue;
    t.key[s] = 0;
    if (key_hash(k) > t.hi) continue;
    t.place(k, t.first[s], t.count[s]);
    ++t.size;
  }
}

void KeyRange::insert(Table& t, uint64_t key, int64_t row) {
  const uint64_t hash = key_hash(key);
  if (hash < t.lo || hash > t.hi) return;
  const uint64_t mask = t.key.size() - 1;
  uint64_t h = hash & mask;
  for (; t.key[h] != 0; h = (h + 1) & mask) {
    if (t.key[h] == key) {
      if (t.count[h] != UINT32_MAX) ++t.count[h];
      return;
    }
  }
  if (static_cast<size_t>(t.size + 1) * 10 > t.key.size() * 7) {
    // Growing holds the old and the doubled table at once.
    const int64_t now = static_cast<int64_t>(t.key.size()) * slot_bytes();
    if (reserve(2 * now)) {
      resize(t, t.key.size() * 2);
      used_ -= now;
    } else {
      halve(t);  // at most one key in a range that cannot be halved: it never grows
    }
    return insert(t, key, row);
  }
  t.key[h] = key;
  t.first[h] = row;
  t.count[h] = 1;
  ++t.size;
}

void KeyRange::add(const int64_t* keys, int64_t n, int64_t first_row, int threads) {
  const int C = columns();
  per_column(C, threads, [&](int c) {
    Table& t = tables_[c];
    if (!t.active) return;
    for (int64_t i = 0; i < n; ++i) {
      const auto k = static_cast<uint64_t>(keys[i * C + c]);
      if (k != 0) insert(t, k, first_row + i);
    }
  });
}

void KeyRange::take(int c, std::vector<uint64_t>* keys, std::vector<int64_t>* first,
                    std::vector<uint32_t>* counts) {
  // In place, so that a column's run costs little more than its table: the
  // entries moved to the front, then permuted into first-row order.
  Table& t = tables_[c];
  size_t n = 0;
  for (size_t s = 0; s < t.key.size(); ++s) {
    if (t.key[s] == 0) continue;
    t.key[n] = t.key[s];
    t.first[n] = t.first[s];
    t.count[n] = t.count[s];
    ++n;
  }
  if (n >= UINT32_MAX) throw std::length_error("over 4 billion categories in a column");
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(),
            [&](uint32_t a, uint32_t b) { return t.first[a] < t.first[b]; });
  for (size_t i = 0; i < n; ++i) {  // entry i takes entry order[i], cycle by cycle
    if (order[i] == UINT32_MAX) continue;
    const uint64_t k = t.key[i];
    const int64_t f = t.first[i];
    const uint32_t m = t.count[i];
    size_t j = i;
    while (true) {
      const size_t from = order[j];
      order[j] = UINT32_MAX;
      if (from == i) break;
      t.key[j] = t.key[from];
      t.first[j] = t.first[from];
      t.count[j] = t.count[from];
      j = from;
    }
    t.key[j] = k;
    t.first[j] = f;
    t.count[j] = m;
  }
  used_ -= static_cast<int64_t>(t.key.size()) * slot_bytes();
  t.key.resize(n);
  t.first.resize(n);
  t.count.resize(n);
  *keys = std::move(t.key);
  *first = std::move(t.first);
  *counts = std::move(t.count);
  const uint64_t lo = t.lo, hi = t.hi;
  t = Table{};
  t.lo = lo;
  t.hi = hi;
  t.active = false;
}

IdMap::IdMap(int columns) : index_(static_cast<size_t>(columns), KeyIndex(16)), ids_(columns) {
  if (columns < 1) throw std::invalid_argument("columns must be at least 1");
}

int64_t IdMap::bytes_for(int64_t n) {
  return static_cast<int64_t>(slots_for(n)) * KeyIndex::slot_bytes() + 8 * n;
}

void IdMap::reserve(int c, int64_t n) {
  if (index_[c].size() == 0) index_[c] = KeyIndex(static_cast<int64_t>(slots_for(n)));
  ids_[c].reserve(n);
}

void IdMap::add(int c, const int64_t* keys, const int64_t* ids, int64_t n) {
  KeyIndex& index = index_[c];
  auto& out = ids_[c];
  for (int64_t i = 0; i < n; ++i) {
    bool added;
    const uint32_t at = index.find_or_add(static_cast<uint64_t>(keys[i]), &added);
    if (added)
      out.push_back(ids[i]);
    else
      out[at] = ids[i];
  }
}

void IdMap::apply(const int64_t* keys, int64_t* out, int64_t n, int threads) const {
  const int C = columns();
  per_column(C, threads, [&](int c) {
    const KeyIndex& index = index_[c];
    if (index.size() == 0) return;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = keys[i * C + c];
      if (k == 0) continue;
      const int64_t at = index.find(static_cast<uint64_t>(k));
      if (at >= 0) out[i * C + c] = ids_[c][at];
    }
  });
}

int64_t IdMap::memory_bytes() const {
  int64_t b = 0;
  for (int c = 0; c < columns(); ++c)
    b += index_[c].capacity() * KeyIndex::slot_bytes() +
         static_cast<int64_t>(ids_[c].capacity()) * 8;
  return b;
}

}  // namespace dlrm_ops::data
