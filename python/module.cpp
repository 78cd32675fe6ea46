// dlrm_ops._C: what was built and what the running CPU uses. No tensors here;
// the ops live in the stable-ABI library _kernels.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "data/batch.h"
#include "data/criteo_parser.h"
#include "data/criteo_vocab.h"
#include "kernel_common.h"
#include "optimizers.h"

namespace py = pybind11;

namespace {

// A numpy array that owns the vector it views (no copy).
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owner = new std::vector<T>(std::move(v));
  py::capsule free(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, owner->data(), free);
}

template <typename T>
py::array_t<T> to_numpy(std::unique_ptr<T[]>&& p, std::vector<py::ssize_t> shape) {
  T* data = p.release();
  py::capsule free(data, [](void* q) { delete[] static_cast<T*>(q); });
  return py::array_t<T>(shape, data, free);
}

// A contiguous 1-D buffer of bytes; ValueError naming the function otherwise
// (a strided or wider buffer would be read as something it is not).
std::pair<const char*, int64_t> bytes_of(const py::buffer& buf, const char* fn) {
  py::buffer_info info = buf.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.size > 1 && info.strides[0] != 1))
    throw py::value_error(std::string(fn) + " takes a contiguous 1-D buffer of bytes");
  return {static_cast<const char*>(info.ptr), static_cast<int64_t>(info.size)};
}

// The data of a C-contiguous int64 array [n, columns], read in place; ValueError
// naming it otherwise.
const int64_t* rows_of(const py::array& a, int columns, const char* name) {
  if (!a.dtype().is(py::dtype::of<int64_t>()) || a.ndim() != 2 || a.shape(1) != columns ||
      !(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be a C-contiguous int64 array [n, " +
                          std::to_string(columns) + "]");
  return static_cast<const int64_t*>(a.data());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dlrm_ops build information";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = DLRM_OPS_VERSION;
        info["torch_built_with"] = DLRM_OPS_TORCH_VERSION;
        info["build_type"] = DLRM_OPS_BUILD_TYPE;
        info["cuda"] = static_cast<bool>(DLRM_OPS_WITH_CUDA);
        info["cpu_capability"] = dlrm_ops::cpu::capability_name(dlrm_ops::cpu::capability());
#ifdef __VERSION__
        info["compiler"] = __VERSION__;
#endif
        return info;
      },
      "Version, torch it was built against, CPU instruction set in use, CUDA or not.");
  m.def(
      "parse_criteo",
      [](py::buffer buf, int64_t max_ind_range, int threads) {
        if (max_ind_range < 0)
          throw py::value_error("max_ind_range must be at least 1 (or 0: keys for a Vocabulary)");
        auto [data, size] = bytes_of(buf, "parse_criteo");
        dlrm_ops::data::ParsedLines r;
        {
          py::gil_scoped_release release;
          r = dlrm_ops::data::parse_criteo(data, size, max_ind_range, threads);
        }
        const py::ssize_t n = r.lines;
        using dlrm_ops::data::kDense;
        using dlrm_ops::data::kSparse;
        return py::make_tuple(
            to_numpy(std::move(r.dense), {n, kDense}), to_numpy(std::move(r.sparse), {n, kSparse}),
            to_numpy(std::move(r.labels), {n}),
            to_numpy(std::move(r.deferred), {static_cast<py::ssize_t>(r.deferred.size())}));
      },
      py::arg("buffer"), py::arg("max_ind_range"), py::arg("threads") = 1,
      "Raw Criteo lines, hashed: (dense [n,13] log(x+1), sparse [n,26], labels [n], lines "
      "left to the Python reference); max_ind_range 0: sparse holds keys for a Vocabulary.");
  m.def(
      "has_lone_cr",
      [](py::buffer buf) {
        auto [data, size] = bytes_of(buf, "has_lone_cr");
        py::gil_scoped_release release;
        return dlrm_ops::data::has_lone_cr(data, size);
      },
      py::arg("buffer"), "Whether the bytes hold a carriage return not followed by a newline.");
  m.def(
      "count_newlines",
      [](py::buffer buf) {
        auto [data, size] = bytes_of(buf, "count_newlines");
        py::gil_scoped_release release;
        return static_cast<int64_t>(std::count(data, data + size, '\n'));
      },
      py::arg("buffer"));
  using dlrm_ops::data::Vocabulary;
  py::class_<Vocabulary>(m, "Vocabulary",
                         "Per-column category ids by first appearance (csrc/data/criteo_vocab.h).")
      .def(py::init<int, bool>(), py::arg("columns"), py::arg("count") = false)
      .def(
          "map",
          [](Vocabulary& v, py::array keys, int threads) {
            // Updated in place: a converted copy would take the ids and be lost.
            if (!keys.dtype().is(py::dtype::of<int64_t>()) || keys.ndim() != 2 ||
                keys.shape(1) != v.columns() || !(keys.flags() & py::array::c_style) ||
                !keys.writeable())
              throw py::value_error(
                  "keys must be a writeable C-contiguous int64 array [n, columns]");
            int64_t* data = static_cast<int64_t*>(keys.mutable_data());
            const int64_t n = keys.shape(0);
            py::gil_scoped_release release;
            v.map(data, n, threads);
          },
          py::arg("keys"), py::arg("threads") = 1, "Keys replaced in place by their ids.")
      .def("freeze", &Vocabulary::freeze, py::arg("min_count"),
           "Ids by descending count from now on; keys seen fewer than min_count times: 0.")
      .def("sizes",
           [](const Vocabulary& v) {
             py::list out;
             for (int c = 0; c < v.columns(); ++c) out.append(v.size(c));
             return out;
           })
      .def("keys",
           [](const Vocabulary& v, int c) {
             if (c < 0 || c >= v.columns()) throw py::index_error("no such column");
             std::vector<uint64_t> k = v.keys(c);
             return to_numpy(std::move(k), {static_cast<py::ssize_t>(v.keys(c).size())});
           })
      .def("memory_bytes", &Vocabulary::memory_bytes);
  using dlrm_ops::data::KeyRange;
  py::class_<KeyRange>(m, "KeyRange",
                       "One scan of a vocabulary larger than memory (csrc/data/criteo_vocab.h).")
      .def(py::init([](const std::vector<uint64_t>& lo, const std::vector<bool>& active,
                       int64_t budget) {
             try {
               return std::make_unique<KeyRange>(lo, active, budget);
             } catch (const std::length_error& e) {
               throw py::value_error(std::string("budget_bytes: ") + e.what());
             }
           }),
           py::arg("lo"), py::arg("active"), py::arg("budget_bytes"))
      .def(
          "add",
          [](KeyRange& r, py::array keys, int64_t first_row, int threads) {
            const int64_t* data = rows_of(keys, r.columns(), "keys");
            const int64_t n = keys.shape(0);
            py::gil_scoped_release release;
            r.add(data, n, first_row, threads);
          },
          py::arg("keys"), py::arg("first_row"), py::arg("threads") = 1)
      .def("lo", &KeyRange::lo)
      .def("hi", &KeyRange::hi)
      .def(
          "take",
          [](KeyRange& r, int c) {
            if (c < 0 || c >= r.columns()) throw py::index_error("no such column");
            std::vector<uint64_t> keys;
            std::vector<int64_t> first;
            std::vector<uint32_t> counts;
            r.take(c, &keys, &first, &counts);
            const auto n = static_cast<py::ssize_t>(keys.size());
            return py::make_tuple(to_numpy(std::move(keys), {n}), to_numpy(std::move(first), {n}),
                                  to_numpy(std::move(counts), {n}));
          },
          py::arg("column"),
          "(keys, first rows, counts) of a column in order of first row; frees its table.")
      .def("memory_bytes", &KeyRange::memory_bytes);
  using dlrm_ops::data::IdMap;
  py::class_<IdMap>(m, "IdMap", "Keys -> ids for some keys of each column.")
      .def(py::init<int>(), py::arg("columns"))
      .def(
          "add",
          [](IdMap& m, int c, py::array_t<int64_t, py::array::c_style | py::array::forcecast> keys,
             py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids) {
            if (c < 0 || c >= m.columns()) throw py::index_error("no such column");
            if (keys.ndim() != 1 || ids.ndim() != 1 || keys.shape(0) != ids.shape(0))
              throw py::value_error("keys and ids must be 1-D arrays of one length");
            m.add(c, keys.data(), ids.data(), keys.shape(0));
          },
          py::arg("column"), py::arg("keys"), py::arg("ids"))
      .def(
          "reserve",
          [](IdMap& m, int c, int64_t n) {
            if (c < 0 || c >= m.columns()) throw py::index_error("no such column");
            m.reserve(c, n);
          },
          py::arg("column"), py::arg("n"))
      .def(
          "apply",
          [](const IdMap& m, py::array keys, py::array out, int threads) {
            const int64_t* k = rows_of(keys, m.columns(), "keys");
            if (!out.dtype().is(py::dtype::of<int64_t>()) || out.ndim() != 2 ||
                out.shape(0) != keys.shape(0) || out.shape(1) != m.columns() ||
                !(out.flags() & py::array::c_style) || !out.writeable())
              throw py::value_error("out must be a writeable C-contiguous int64 array like keys");
            int64_t* o = static_cast<int64_t*>(out.mutable_data());
            const int64_t n = keys.shape(0);
            py::gil_scoped_release release;
            m.apply(k, o, n, threads);
          },
          py::arg("keys"), py::arg("out"), py::arg("threads") = 1,
          "out[i, c] = the id of keys[i, c] where the map holds that key.")
      .def("memory_bytes", &IdMap::memory_bytes)
      .def_static("bytes_for", &IdMap::bytes_for, py::arg("n"));
  m.def(
      "gather_rows",
      [](const std::vector<py::tuple>& parts, py::array_t<int64_t, py::array::c_style> starts,
         py::array_t<int64_t, py::array::c_style> lows,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> rows,
         const std::vector<int64_t>& columns, int64_t modulo, py::object dense, py::object indices,
         py::object labels) {
        using dlrm_ops::data::kDense;
        using dlrm_ops::data::kSparse;
        const auto P = static_cast<py::ssize_t>(parts.size());
        if (starts.ndim() != 1 || starts.shape(0) != P + 1 || lows.ndim() != 1 ||
            lows.shape(0) != P)
          throw py::value_error("starts needs one entry per part and one more, lows one per part");
        for (py::ssize_t p = 0; p < P; ++p)
          if (starts.at(p) > starts.at(p + 1) || lows.at(p) < 0)
            throw py::value_error("starts must not decrease and lows must be >= 0");
        if (starts.at(0) != 0) throw py::value_error("starts must begin at 0");
        if (rows.ndim() != 1) throw py::value_error("rows must be 1-D");
        for (int64_t c : columns)
          if (c < 0 || c >= kSparse) throw py::value_error("columns must be in [0, 26)");
        // The parts are read in place (memory maps): no converted copies.
        std::vector<py::array> keep;
        std::vector<dlrm_ops::data::DayArrays> days(parts.size());
        for (py::ssize_t p = 0; p < P; ++p) {
          if (parts[p].size() != 3) throw py::value_error("a part is (dense, sparse, labels)");
          auto d = parts[p][0].cast<py::array>(), s = parts[p][1].cast<py::array>(),
               l = parts[p][2].cast<py::array>();
          const bool s32 = s.dtype().is(py::dtype::of<int32_t>()),
                     l32 = l.dtype().is(py::dtype::of<int32_t>());
          if (!(l32 || l.dtype().is(py::dtype::of<float>())) || l.ndim() != 1 ||
              (l.shape(0) > 1 && l.strides(0) != 4))
            throw py::value_error("a part's labels must be contiguous float32 or int32 [n]");
          const int64_t n = l.shape(0);
          if (!d.dtype().is(py::dtype::of<float>()) || d.ndim() != 2 || d.shape(0) != n ||
              d.shape(1) != kDense || !(d.flags() & py::array::c_style))
            throw py::value_error("a part's dense must be C-contiguous float32 [n, 13]");
          if (!(s32 || s.dtype().is(py::dtype::of<int64_t>())) || s.ndim() != 2 ||
              s.shape(0) != n || s.shape(1) != kSparse || !(s.flags() & py::array::c_style))
            throw py::value_error("a part's sparse must be C-contiguous int32 or int64 [n, 26]");
          days[p] = {static_cast<const float*>(d.data()), s.data(), l.data(), s32, l32, n};
          keep.insert(keep.end(), {d, s, l});
        }
        const int64_t n = rows.shape(0);
        auto out = [&](py::object o, const py::dtype& dt, py::ssize_t size, const char* name) {
          if (o.is_none()) return static_cast<void*>(nullptr);
          auto a = o.cast<py::array>();
          if (!a.dtype().is(dt) || a.size() != size || !(a.flags() & py::array::c_style) ||
              !a.writeable())
            throw py::value_error(std::string(name) +
                                  " must be a writeable C-contiguous array of " +
                                  std::to_string(size) + " elements of its dtype");
          return a.mutable_data();
        };
        auto* dn = static_cast<float*>(out(dense, py::dtype::of<float>(), n * kDense, "dense"));
        auto* ix = static_cast<int64_t*>(out(indices, py::dtype::of<int64_t>(),
                                             n * static_cast<int64_t>(columns.size()), "indices"));
        auto* lb = static_cast<float*>(out(labels, py::dtype::of<float>(), n, "labels"));
        try {
          py::gil_scoped_release release;
          dlrm_ops::data::gather_rows(days, starts.data(), lows.data(), rows.data(), n, columns,
                                      modulo, dn, ix, lb);
        } catch (const std::out_of_range& e) {
          throw py::index_error(e.what());
        }
      },
      py::arg("parts"), py::arg("starts"), py::arg("lows"), py::arg("rows"), py::arg("columns"),
      py::arg("modulo"), py::arg("dense"), py::arg("indices"), py::arg("labels"),
      "Rows of memory-mapped day arrays gathered in order into a batch: dense [n, 13], "
      "labels [n], indices table-major [len(columns) * n] (csrc/data/batch.h).");
  m.def("cpu_capability",
        [] { return dlrm_ops::cpu::capability_name(dlrm_ops::cpu::capability()); });
  // The kernels' enums and optimizer table, for the check that Python's
  // mirrors (dlrm_ops/ops.py, dlrm_ops/optimizers.py) agree.
  m.def("enums", [] {
    using namespace dlrm_ops;
    py::dict e;
    e["pooling"] = py::dict(py::arg("sum") = int64_t{kSum}, py::arg("mean") = int64_t{kMean});
    e["order"] = py::dict(py::arg("tril") = int64_t{kTril}, py::arg("triu") = int64_t{kTriu});
    e["check"] = py::dict(py::arg("deferred") = int64_t{kDeferred},
                          py::arg("immediate") = int64_t{kImmediate},
                          py::arg("warn") = int64_t{kWarn}, py::arg("off") = int64_t{kOff});
    e["error_kind"] =
        py::dict(py::arg("tables") = int64_t{kTables}, py::arg("offsets") = int64_t{kOffsets},
                 py::arg("index") = int64_t{kIndex}, py::arg("state_rows") = int64_t{kStateRows});
    e["hparam"] = py::dict(py::arg("lr") = int{kLr}, py::arg("eps") = int{kEps},
                           py::arg("beta1") = int{kBeta1}, py::arg("beta2") = int{kBeta2},
                           py::arg("weight_decay") = int{kWeightDecay});
    return e;
  });
  m.def(
      "optimizers",
      [] {
        using namespace dlrm_ops;
        py::list out;
        for (int64_t o = kFirstOptimizer; o <= kLastOptimizer; ++o) {
          with_rule(o, [&](auto r) {
            using R = decltype(r);
            out.append(py::dict(py::arg("name") = R::kName, py::arg("id") = int64_t{R::kId},
                                py::arg("momentum1") = static_cast<int>(R::kM1),
                                py::arg("momentum2") = static_cast<int>(R::kM2),
                                py::arg("hparams") = R::kHParams));
          });
        }
        return out;
      },
      "The fused optimizers: name, id, state layouts (0 none, 1 element, 2 row), "
      "hyperparameters read (bits of 1 << HParam).");
}
