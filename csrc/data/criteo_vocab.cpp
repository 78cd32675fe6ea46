#include "data/criteo_vocab.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <thread>

namespace dlrm_ops::data {
namespace {

uint64_t mix(uint64_t x) {  // splitmix64's finaliser: keys are often small and dense
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

Vocabulary::Vocabulary(int columns, bool count)
    : tables_(static_cast<size_t>(columns)), count_(count) {
  if (columns < 1) throw std::invalid_argument("columns must be at least 1");
  for (auto& t : tables_) {
    t.slot_key.assign(1024, 0);
    t.slot_id.assign(1024, 0);
  }
}

void Vocabulary::Table::grow() {
  std::vector<uint64_t> keys(slot_key.size() * 2, 0);
  std::vector<uint32_t> ids(keys.size(), 0);
  const uint64_t mask = keys.size() - 1;
  for (size_t s = 0; s < slot_key.size(); ++s) {
    if (slot_key[s] == 0) continue;
    uint64_t h = mix(slot_key[s]) & mask;
    while (keys[h] != 0) h = (h + 1) & mask;
    keys[h] = slot_key[s];
    ids[h] = slot_id[s];
  }
  slot_key.swap(keys);
  slot_id.swap(ids);
}

uint32_t Vocabulary::Table::find_or_add(uint64_t key) {
  uint64_t mask = slot_key.size() - 1;
  uint64_t h = mix(key) & mask;
  while (slot_key[h] != 0) {
    if (slot_key[h] == key) return slot_id[h];
    h = (h + 1) & mask;
  }
  if (by_id.size() >= 0xFFFFFFFEu) throw std::length_error("over 4 billion categories in a column");
  const auto id = static_cast<uint32_t>(by_id.size());
  slot_key[h] = key;
  slot_id[h] = id;
  by_id.push_back(key);
  if (by_id.size() * 10 > slot_key.size() * 7) grow();
  return id;
}

void Vocabulary::map(int64_t* keys, int64_t n, int threads) {
  const int C = columns();
  auto work = [&](int first) {
    for (int c = first; c < C; c += threads) {
      Table& t = tables_[c];
      for (int64_t i = 0; i < n; ++i) {
        int64_t& k = keys[i * C + c];
        if (k == 0) continue;
        if (frozen_) {
          // Every key was seen by the counting pass; one not seen maps to 0.
          uint64_t mask = t.slot_key.size() - 1;
          uint64_t h = mix(static_cast<uint64_t>(k)) & mask;
          int64_t id = 0;
          while (t.slot_key[h] != 0) {
            if (t.slot_key[h] == static_cast<uint64_t>(k)) {
              id = t.remap[t.slot_id[h]];
              break;
            }
            h = (h + 1) & mask;
          }
          k = id;
          continue;
        }
        uint32_t id = t.find_or_add(static_cast<uint64_t>(k));
        if (count_) {
          if (id == t.counts.size()) t.counts.push_back(0);
          if (t.counts[id] != UINT32_MAX) ++t.counts[id];
        }
        k = static_cast<int64_t>(id) + 1;
      }
    }
  };
  threads = std::max(1, std::min(threads, C));
  std::vector<std::thread> pool;
  for (int p = 1; p < threads; ++p) pool.emplace_back(work, p);
  work(0);
  for (auto& th : pool) th.join();
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
    b += static_cast<int64_t>(t.slot_key.capacity() * 8 + t.slot_id.capacity() * 4 +
                              t.by_id.capacity() * 8 + t.counts.capacity() * 4 +
                              t.remap.capacity() * 4);
  return b;
}

}  // namespace dlrm_ops::data
