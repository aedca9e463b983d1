// pybind11 bindings for calm_fast._C. No torch headers: tensors arrive as numpy views
// (torch.Tensor.numpy() shares memory), so nothing is copied and nothing links libtorch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "conv_cpu.h"
#include "decode_step_cpu.h"
#include "gemm_cpu.h"
#include "isa_kernels.h"
#include "kv_manager.h"
#include "paged_attention_cpu.h"
#include "window_attention_cpu.h"

namespace py = pybind11;
using namespace calm_fast;

namespace {

template <typename T>
T* checked(py::array& a, const char* name, int ndim, bool writable) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>())) {
    throw std::invalid_argument(std::string(name) + " has dtype " +
                                std::string(py::str(a.dtype())) + ", expected " +
                                std::string(py::str(py::dtype::of<T>())));
  }
  if (ndim >= 0 && a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                " dims, got " + std::to_string(a.ndim()));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  }
  if (writable && !a.writeable()) {
    throw std::invalid_argument(std::string(name) + " must be writable");
  }
  return static_cast<T*>(a.mutable_data());
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + ")";
}

// Packed weight panels: float32, or int16 holding bf16 bit patterns (numpy has no bf16).
calm_fast::Panels checked_panels(py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<int16_t>())) {
    return {checked<int16_t>(a, name, -1, false), true};
  }
  if (!a.dtype().is(py::dtype::of<float>())) {
    throw std::invalid_argument(std::string(name) + " has dtype " +
                                std::string(py::str(a.dtype())) +
                                ", expected float32 (or int16 holding bf16)");
  }
  return {checked<float>(a, name, -1, false), false};
}

// int8 panels as the tuple (panels int8 (ceil(N / 32), 4 ceil(K / 4), 32), scales float32
// (N), colsum int32 (N)) for a [K, N] projection (gemm_cpu.h); ``keep`` holds the arrays.
calm_fast::Panels checked_i8_panels(py::handle t, const char* name, int64_t K, int64_t N,
                                    std::vector<py::array>& keep) {
  py::tuple tup = t.cast<py::tuple>();
  if (py::len(tup) != 3) {
    throw std::invalid_argument(std::string(name) + ": int8 panels are (panels, scales, colsum)");
  }
  py::array a = tup[0].cast<py::array>(), sc = tup[1].cast<py::array>(),
            cs = tup[2].cast<py::array>();
  const std::string n(name);
  calm_fast::Panels w;
  w.data = checked<int8_t>(a, (n + " panels").c_str(), 3, false);
  w.scales = checked<float>(sc, (n + " scales").c_str(), 1, false);
  w.colsum = checked<int32_t>(cs, (n + " colsum").c_str(), 1, false);
  const int64_t np = (N + kPanel - 1) / kPanel, k4 = 4 * ((K + 3) / 4);
  if (a.shape(0) != np || a.shape(1) != k4 || a.shape(2) != kPanel || sc.shape(0) != N ||
      cs.shape(0) != N) {
    throw std::invalid_argument(n + " int8 panels " + shape_str(a) + ", scales " +
                                shape_str(sc) + ", colsum " + shape_str(cs) + " do not fit a [" +
                                std::to_string(K) + ", " + std::to_string(N) +
                                "] projection (expected (" + std::to_string(np) + ", " +
                                std::to_string(k4) + ", 32), (N), (N))");
  }
  keep.push_back(a);
  keep.push_back(sc);
  keep.push_back(cs);
  return w;
}


// A [B, rows, C] float32 view whose rows are contiguous (row stride C, element stride 1) and
// whose batch stride is free: a slice of a longer buffer (rows after a causal context) or
// of every batch's last row.
struct Rows {
  float* data = nullptr;
  int64_t bstride = 0;
};

Rows rows_view(py::array& a, const char* name, bool writable) {
  if (!a.dtype().is(py::dtype::of<float>())) {
    throw std::invalid_argument(std::string(name) + " has dtype " +
                                std::string(py::str(a.dtype())) + ", expected float32");
  }
  if (a.ndim() != 3) {
    throw std::invalid_argument(std::string(name) + " must be [B, rows, C], got " +
                                std::to_string(a.ndim()) + " dims");
  }
  const auto f = static_cast<py::ssize_t>(sizeof(float));
  if ((a.shape(2) > 1 && a.strides(2) != f) ||
      (a.shape(1) > 1 && a.strides(1) != a.shape(2) * f) || a.strides(0) % f != 0 ||
      (a.shape(0) > 1 && a.strides(0) < a.shape(1) * a.shape(2) * f)) {
    throw std::invalid_argument(std::string(name) +
                                " must have contiguous rows and non-overlapping batches");
  }
  if (writable && !a.writeable()) {
    throw std::invalid_argument(std::string(name) + " must be writable");
  }
  return {static_cast<float*>(a.mutable_data()), a.strides(0) / f};
}

py::tuple to_python(const AppendResult& r, std::vector<py::ssize_t> slot_shape) {
  py::array_t<int32_t> slots(slot_shape);
  std::copy(r.slots.begin(), r.slots.end(), slots.mutable_data());
  py::array_t<int32_t> copies({static_cast<py::ssize_t>(r.copies.size()),
                               static_cast<py::ssize_t>(3)});
  auto c = copies.mutable_unchecked<2>();
  for (size_t i = 0; i < r.copies.size(); ++i) {
    c(i, 0) = r.copies[i].src;
    c(i, 1) = r.copies[i].dst;
    c(i, 2) = r.copies[i].rows;
  }
  return py::make_tuple(slots, copies);
}

py::int_ page_table(const KVManager& m, py::array streams, py::array indptr, py::array indices,
                    py::array last_page_len, py::object start) {
  int64_t* ids = checked<int64_t>(streams, "streams", 1, false);
  const int64_t n = streams.shape(0);
  int32_t* ip = checked<int32_t>(indptr, "indptr", 1, true);
  int32_t* ix = checked<int32_t>(indices, "indices", 1, true);
  int32_t* lp = checked<int32_t>(last_page_len, "last_page_len", 1, true);
  int32_t* st = nullptr;
  py::array start_arr;
  if (!start.is_none()) {
    start_arr = start.cast<py::array>();
    st = checked<int32_t>(start_arr, "start", 1, true);
    if (start_arr.shape(0) < n) throw std::invalid_argument("start buffer too small");
  }
  if (indptr.shape(0) < n + 1) {
    throw std::invalid_argument("indptr holds " + std::to_string(indptr.shape(0)) +
                                " entries, needs " + std::to_string(n + 1));
  }
  if (last_page_len.shape(0) < n) {
    throw std::invalid_argument("last_page_len holds " +
                                std::to_string(last_page_len.shape(0)) + " entries, needs " +
                                std::to_string(n));
  }
  return py::int_(m.page_table(ids, n, ip, ix, indices.shape(0), lp, st));
}

// The page table's arrays for a batch of B streams over NB blocks of BS rows. A bad page
// index would be an out-of-bounds read in the kernels: the whole table is checked.
struct Table {
  const int32_t *ip = nullptr, *ix = nullptr, *lp = nullptr, *st = nullptr;
  py::array start_arr;  // keeps `start` referenced while st is in use
};

// min_rows: every stream must hold at least this many live rows (the queries' own rows of a
// windowed step).
Table checked_table(py::array indptr, py::array indices, py::array last_page_len,
                    py::object start, int64_t B, int64_t BS, int64_t NB, int64_t min_rows = 0) {
  Table t;
  const int32_t* ip = t.ip = checked<int32_t>(indptr, "indptr", 1, false);
  const int32_t* ix = t.ix = checked<int32_t>(indices, "indices", 1, false);
  const int32_t* lp = t.lp = checked<int32_t>(last_page_len, "last_page_len", 1, false);
  const int64_t n_indices = indices.shape(0);
  if (indptr.shape(0) < B + 1 || last_page_len.shape(0) < B) {
    throw std::invalid_argument("page table covers fewer streams than the batch of " +
                                std::to_string(B));
  }
  if (!start.is_none()) {
    t.start_arr = start.cast<py::array>();
    t.st = checked<int32_t>(t.start_arr, "start", 1, false);
    if (t.start_arr.shape(0) < B) throw std::invalid_argument("start covers fewer than batch");
  }
  const int32_t* st = t.st;
  if (ip[0] != 0) throw std::invalid_argument("indptr[0] must be 0");
  for (int64_t b = 0; b < B; ++b) {
    if (ip[b + 1] < ip[b] || ip[b + 1] > n_indices) {
      throw std::invalid_argument("indptr is not a non-decreasing offset array into indices");
    }
    const bool any = ip[b + 1] > ip[b];
    const int32_t first = (st != nullptr && any) ? st[b] : 0;
    if (any && (lp[b] < 1 || lp[b] > BS || first < 0 || first >= BS ||
                (ip[b + 1] - ip[b] == 1 && first > lp[b]))) {
      throw std::invalid_argument("stream " + std::to_string(b) +
                                  ": last_page_len/start out of range for block_size " +
                                  std::to_string(BS));
    }
    for (int32_t p = ip[b]; p < ip[b + 1]; ++p) {
      if (ix[p] < 0 || ix[p] >= NB) {
        throw std::invalid_argument("page index " + std::to_string(ix[p]) +
                                    " out of range [0, " + std::to_string(NB) + ")");
      }
    }
    int64_t row0;
    const int64_t n = live_rows(ip, lp, st, BS, b, &row0);
    if (n < min_rows) {
      throw std::invalid_argument("stream " + std::to_string(b) + " has " + std::to_string(n) +
                                  " live rows, fewer than its " + std::to_string(min_rows) +
                                  " queries");
    }
  }
  return t;
}

void paged_attention(py::array q, py::array k, py::array v, py::array indptr, py::array indices,
                     py::array last_page_len, py::object start, py::array out, double scale) {
  const float* qp = checked<float>(q, "q", 3, false);
  const float* kp = checked<float>(k, "k_cache", 4, false);
  const float* vp = checked<float>(v, "v_cache", 4, false);
  float* op = checked<float>(out, "out", 3, true);
  const int64_t B = q.shape(0), H = q.shape(1), D = q.shape(2);
  const int64_t NB = k.shape(0), BS = k.shape(1), HKV = k.shape(2);
  if (k.shape(3) != D || shape_str(k) != shape_str(v)) {
    throw std::invalid_argument("k_cache " + shape_str(k) + " and v_cache " + shape_str(v) +
                                " must both be (num_blocks, block_size, kv_heads, " +
                                std::to_string(D) + ")");
  }
  if (HKV <= 0 || H % HKV != 0) {
    throw std::invalid_argument("query heads " + std::to_string(H) +
                                " must be a multiple of kv heads " + std::to_string(HKV));
  }
  if (shape_str(out) != shape_str(q)) {
    throw std::invalid_argument("out " + shape_str(out) + " must match q " + shape_str(q));
  }
  const Table t = checked_table(indptr, indices, last_page_len, start, B, BS, NB);
  py::gil_scoped_release nogil;
  kernels().paged_decode_attention(qp, kp, vp, t.ip, t.ix, t.lp, t.st, B, H, HKV, D, BS,
                             static_cast<float>(scale), op);
}


// q [B, T, H, D] and out; k/v caches [blocks, block_size, kv_heads, D] (one layer); the page
// table of the B streams, each with at least T live rows (the queries' own, last).
void window_attention(py::array q, py::array k_cache, py::array v_cache, py::array indptr,
                      py::array indices, py::array last_page_len, py::object start,
                      int64_t window, double scale, py::array out, int threads) {
  const float* qp = checked<float>(q, "q", 4, false);
  const float* kp = checked<float>(k_cache, "k_cache", 4, false);
  const float* vp = checked<float>(v_cache, "v_cache", 4, false);
  float* op = checked<float>(out, "out", 4, true);
  const int64_t B = q.shape(0), T = q.shape(1), H = q.shape(2), D = q.shape(3);
  const int64_t NB = k_cache.shape(0), BS = k_cache.shape(1), HKV = k_cache.shape(2);
  if (shape_str(k_cache) != shape_str(v_cache) || k_cache.shape(3) != D) {
    throw std::invalid_argument("k_cache " + shape_str(k_cache) + " and v_cache " +
                                shape_str(v_cache) + " must both be (num_blocks, block_size, "
                                "kv_heads, " + std::to_string(D) + ")");
  }
  if (HKV <= 0 || H % HKV != 0) {
    throw std::invalid_argument("query heads " + std::to_string(H) +
                                " must be a multiple of kv heads " + std::to_string(HKV));
  }
  if (shape_str(out) != shape_str(q)) {
    throw std::invalid_argument("out " + shape_str(out) + " must match q " + shape_str(q));
  }
  if (window < 1 || T < 1) throw std::invalid_argument("window and T must be >= 1");
  if (!window_attention_dim_ok(D)) {
    throw std::invalid_argument("window attention takes head_dim 16, 32, 64 or 128, got " +
                                std::to_string(D));
  }
  const Table t = checked_table(indptr, indices, last_page_len, start, B, BS, NB, T);
  py::gil_scoped_release nogil;
  kernels().paged_window_attention(qp, kp, vp, t.ip, t.ix, t.lp, t.st, B, T, H, HKV, D, BS, window,
                             static_cast<float>(scale), op, threads);
}

void linear(py::array x, py::array panels, py::object bias, py::array y, int threads) {
  const float* xp = checked<float>(x, "x", 2, false);
  const calm_fast::Panels wp = checked_panels(panels, "panels");
  float* yp = checked<float>(y, "y", 2, true);
  const int64_t M = x.shape(0), K = x.shape(1), N = y.shape(1);
  if (panels.ndim() != 3 || panels.shape(0) != (N + kPanel - 1) / kPanel || panels.shape(1) != K ||
      panels.shape(2) != kPanel || y.shape(0) != M) {
    throw std::invalid_argument("linear shapes: x " + shape_str(x) + ", panels " +
                                shape_str(panels) + ", y " + shape_str(y) +
                                " (panels must be (ceil(N / 32), K, 32))");
  }
  const float* bp = nullptr;
  py::array b_arr;
  if (!bias.is_none()) {
    b_arr = bias.cast<py::array>();
    bp = checked<float>(b_arr, "bias", 1, false);
    if (b_arr.shape(0) != N) throw std::invalid_argument("bias must have N entries");
  }
  py::gil_scoped_release nogil;
  calm_fast::gemm_panels_any(xp, M, K, wp, N, bp, yp, threads);
}

void linear_i8(py::array x, py::tuple panels, py::array y, int threads) {
  const float* xp = checked<float>(x, "x", 2, false);
  float* yp = checked<float>(y, "y", 2, true);
  const int64_t M = x.shape(0), K = x.shape(1), N = y.shape(1);
  if (y.shape(0) != M) throw std::invalid_argument("linear_i8: x and y rows differ");
  std::vector<py::array> keep;
  const calm_fast::Panels wp = checked_i8_panels(panels, "linear_i8", K, N, keep);
  py::gil_scoped_release nogil;
  calm_fast::gemm_panels_any(xp, M, K, wp, N, nullptr, yp, threads);
}

// A causal conv over channels-last rows (conv_cpu.h). x [B, >= T + (taps - 1) dil, cin];
// panels [ceil(N / 32), >= taps cin, 32]; y / e [B, T, N] (either may be None; not both);
// bias [bias_n] with N % bias_n == 0; add0 [B, N]; res [B, T, N].
void conv_rows(py::array x, py::array panels, int64_t taps, int64_t dil, int64_t T,
               py::object bias, py::object add0, py::object res, py::object y, py::object e,
               py::object pair_panels, int threads) {
  ConvCall c;
  const Rows xv = rows_view(x, "x", false);
  c.x = xv.data;
  c.x_bstride = xv.bstride;
  c.B = x.shape(0);
  c.cin = x.shape(2);
  c.taps = taps;
  c.dil = dil;
  c.T = T;
  if (taps < 1 || dil < 1 || T < 0 || x.shape(1) < T + (taps - 1) * dil) {
    throw std::invalid_argument("conv_rows: x " + shape_str(x) + " has too few rows for " +
                                std::to_string(T) + " outputs of " + std::to_string(taps) +
                                " taps at dilation " + std::to_string(dil));
  }
  if (y.is_none() && e.is_none()) throw std::invalid_argument("conv_rows: no output");
  py::array ya, ea, ra, ba, aa;
  int64_t N = -1;
  auto out_view = [&](py::object o, py::array& arr, const char* name) -> Rows {
    if (o.is_none()) return {};
    arr = o.cast<py::array>();
    const Rows v = rows_view(arr, name, true);
    if (arr.shape(0) != c.B || arr.shape(1) != T || (N >= 0 && arr.shape(2) != N)) {
      throw std::invalid_argument(std::string("conv_rows: ") + name + " " + shape_str(arr) +
                                  " must be [" + std::to_string(c.B) + ", " +
                                  std::to_string(T) + ", N]");
    }
    N = arr.shape(2);
    return v;
  };
  const Rows yv = out_view(y, ya, "y"), ev = out_view(e, ea, "e");
  c.y = yv.data;
  c.y_bstride = yv.bstride;
  c.e = ev.data;
  c.e_bstride = ev.bstride;
  c.N = N;
  c.panels = checked<float>(panels, "panels", 3, false);
  if (panels.shape(0) != (N + kPanel - 1) / kPanel || panels.shape(1) < taps * c.cin ||
      panels.shape(2) != kPanel) {
    throw std::invalid_argument("conv_rows: panels " + shape_str(panels) + " do not fit " +
                                std::to_string(taps) + " taps x " + std::to_string(c.cin) +
                                " inputs -> " + std::to_string(N) + " outputs");
  }
  c.panel_stride = panels.shape(1) * kPanel;
  if (!bias.is_none()) {
    ba = bias.cast<py::array>();
    c.bias = checked<float>(ba, "bias", 1, false);
    c.bias_n = ba.shape(0);
    if (c.bias_n < 1 || N % c.bias_n != 0) {
      throw std::invalid_argument("conv_rows: bias of " + std::to_string(c.bias_n) +
                                  " does not divide N = " + std::to_string(N));
    }
  }
  if (!add0.is_none()) {
    aa = add0.cast<py::array>();
    c.add0 = checked<float>(aa, "add0", 2, false);
    if (aa.shape(0) != c.B || aa.shape(1) != N) {
      throw std::invalid_argument("conv_rows: add0 " + shape_str(aa) + " must be [B, N]");
    }
  }
  if (!res.is_none()) {
    ra = res.cast<py::array>();
    const Rows rv = rows_view(ra, "res", false);
    if (ra.shape(0) != c.B || ra.shape(1) != T || ra.shape(2) != N) {
      throw std::invalid_argument("conv_rows: res " + shape_str(ra) + " must be [B, T, N]");
    }
    c.res = rv.data;
    c.res_bstride = rv.bstride;
  }
  const float* sum = nullptr;
  py::array sa;
  if (!pair_panels.is_none()) {  // two rows at a time (conv2_pairs_f32 / conv3_pairs_f32)
    sa = pair_panels.cast<py::array>();
    sum = checked<float>(sa, "pair_panels", 3, false);
    const int64_t rows = taps == 2 ? c.cin : 4 * c.cin;
    if ((taps != 2 && taps != 3) || dil != 1 || T % 2 != 0 ||
        sa.shape(0) != panels.shape(0) || sa.shape(1) != rows || sa.shape(2) != kPanel) {
      throw std::invalid_argument("conv_rows: pair_panels " + shape_str(sa) + " need 2 or 3 "
                                  "taps at dilation 1, an even T and (ceil(N / 32), cin or "
                                  "4 cin, 32)");
    }
  }
  py::gil_scoped_release nogil;
  if (sum != nullptr && taps == 2) {
    kernels().conv2_pairs(c, sum, threads);
  } else if (sum != nullptr) {
    kernels().conv3_pairs(c, sum, threads);
  } else {
    kernels().conv_rows(c, threads);
  }
}

// The one-output-channel conv: x [B, >= T + (taps - 1) dil, cin], w [taps * cin], y [B, T].
void conv_rows_to_one(py::array x, py::array w, double bias, int64_t taps, int64_t dil,
                      int64_t T, py::array y, int threads) {
  const Rows xv = rows_view(x, "x", false);
  const float* wp = checked<float>(w, "w", 1, false);
  const int64_t B = x.shape(0), cin = x.shape(2);
  if (taps < 1 || dil < 1 || T < 0 || x.shape(1) < T + (taps - 1) * dil ||
      w.shape(0) != taps * cin) {
    throw std::invalid_argument("conv_rows_to_one: x " + shape_str(x) + ", w " +
                                shape_str(w) + " do not fit " + std::to_string(T) +
                                " outputs of " + std::to_string(taps) + " taps");
  }
  if (y.ndim() != 2 || y.shape(0) != B || y.shape(1) != T || !y.writeable() ||
      !y.dtype().is(py::dtype::of<float>()) || (T > 1 && y.strides(1) != sizeof(float))) {
    throw std::invalid_argument("conv_rows_to_one: y must be a writable float32 [B, T] "
                                "with contiguous rows, got " + shape_str(y));
  }
  float* yp = static_cast<float*>(y.mutable_data());
  const int64_t ys = y.strides(0) / static_cast<int64_t>(sizeof(float));
  py::gil_scoped_release nogil;
  kernels().conv_rows_to_one(xv.data, xv.bstride, B, T, cin, taps, dil, wp, static_cast<float>(bias),
                       yp, ys, threads);
}

// layers: one tuple per layer (ln1_w, ln1_b, w_qkv, w_o, ln2_w, ln2_b, w1, w2, ls1, ls2),
// projections as panels (gemm_cpu.h), layer scales or None. Every shape is checked here,
// once per call.
void decode_step(py::list layers, int64_t heads, int64_t kv_heads, double eps, py::array x,
                 py::array cos, py::array sin, py::array k_cache, py::array v_cache,
                 py::array slots, py::array indptr, py::array indices, py::array last_page_len,
                 py::object start, int64_t queries, int64_t window, bool last_kv_only,
                 bool last_rows_only, int threads) {
  float* xp = checked<float>(x, "x", 2, true);
  const int64_t B = x.shape(0), d = x.shape(1);
  if (B < 1) throw std::invalid_argument("decode_step needs at least one row");
  if (queries < 1 || B % queries != 0 || window < 0) {
    throw std::invalid_argument("decode_step: " + std::to_string(B) + " rows are not streams "
                                "of " + std::to_string(queries) + " queries (window " +
                                std::to_string(window) + ")");
  }
  if (last_rows_only && (last_kv_only || window > 0)) {
    throw std::invalid_argument("decode_step: last_rows_only takes neither last_kv_only nor a "
                                "window");
  }
  float* kp = checked<float>(k_cache, "k_cache", 5, true);
  float* vp = checked<float>(v_cache, "v_cache", 5, true);
  if (shape_str(k_cache) != shape_str(v_cache)) {
    throw std::invalid_argument("k_cache " + shape_str(k_cache) + " and v_cache " +
                                shape_str(v_cache) + " differ");
  }
  const int64_t NL = k_cache.shape(0), NB = k_cache.shape(1), BS = k_cache.shape(2);
  const int64_t D = k_cache.shape(4);
  if (kv_heads < 1 || heads % kv_heads != 0 || k_cache.shape(3) != kv_heads || D % 2) {
    throw std::invalid_argument("k_cache " + shape_str(k_cache) + " does not fit " +
                                std::to_string(heads) + " heads / " + std::to_string(kv_heads) +
                                " kv heads of even width");
  }
  if (static_cast<int64_t>(py::len(layers)) != NL) {
    throw std::invalid_argument(std::to_string(py::len(layers)) + " layers for a cache of " +
                                std::to_string(NL));
  }
  const float* cp = checked<float>(cos, "cos", 2, false);
  const float* sp = checked<float>(sin, "sin", 2, false);
  if (cos.shape(0) != B || cos.shape(1) != D / 2 || shape_str(cos) != shape_str(sin)) {
    throw std::invalid_argument("cos/sin must be (" + std::to_string(B) + ", " +
                                std::to_string(D / 2) + "), got " + shape_str(cos));
  }
  const int64_t* sl = checked<int64_t>(slots, "slots", 1, false);
  if (slots.shape(0) != B) throw std::invalid_argument("one slot per row is needed");
  for (int64_t b = 0; b < B; ++b) {
    if (sl[b] < 0 || sl[b] >= NB * BS) throw std::invalid_argument("slot out of range");
  }
  if ((queries > 1 || window > 0) && !window_attention_dim_ok(D)) {
    throw std::invalid_argument("windowed steps take head_dim 16, 32, 64 or 128, got " +
                                std::to_string(D));
  }
  const int64_t streams = B / queries;
  // windowed: each stream's queries are its last rows (a one-query step may hold padding
  // streams without rows: they read nothing and get zeros, frame_step's buckets)
  const Table t = checked_table(indptr, indices, last_page_len, start, streams, BS, NB,
                                (queries > 1 || window > 0) ? queries : 0);

  const int64_t attn = heads * D, nqkv = (heads + 2 * kv_heads) * D;
  std::vector<py::array> keep;  // the arrays stay referenced until the call returns
  std::vector<DecodeLayerWeights> ws;
  int64_t ff = -1;
  auto get = [&](py::handle t, size_t i, const char* name, int64_t r, int64_t c) -> const float* {
    py::object o = t.cast<py::tuple>()[i];
    if (o.is_none()) {
      if (std::string(name).rfind("ls", 0) == 0) return nullptr;  // no layer scale
      throw std::invalid_argument(std::string(name) + " is missing");
    }
    py::array a = o.cast<py::array>();
    const float* p = checked<float>(a, name, 1, false);
    if (a.shape(0) != r) {
      throw std::invalid_argument(std::string(name) + " has shape " + shape_str(a) +
                                  ", expected (" + std::to_string(r) + ")");
    }
    keep.push_back(a);
    return p;
  };
  // a projection [r, c] packed as panels [ceil(c / 32), r, 32]: fp32, or int16 holding bf16
  auto panels = [&](py::handle t, size_t i, const char* name, int64_t r, int64_t c) -> Panels {
    py::object o = t.cast<py::tuple>()[i];
    if (py::isinstance<py::tuple>(o)) return checked_i8_panels(o, name, r, c, keep);
    py::array a = o.cast<py::array>();
    const Panels w = checked_panels(a, name);
    const int64_t np = (c + kPanel - 1) / kPanel;
    if (a.ndim() != 3 || a.shape(0) != np || a.shape(1) != r || a.shape(2) != kPanel) {
      throw std::invalid_argument(std::string(name) + " has shape " + shape_str(a) +
                                  ", expected (" + std::to_string(np) + ", " +
                                  std::to_string(r) + ", " + std::to_string(kPanel) + ")");
    }
    keep.push_back(a);
    return w;
  };
  for (py::handle t : layers) {
    if (py::len(t) != 10) throw std::invalid_argument("a layer is a tuple of 10 arrays");
    py::object w1o = t.cast<py::tuple>()[6], w2o = t.cast<py::tuple>()[7];
    if (py::isinstance<py::tuple>(w1o) && py::len(w1o) == 3) {  // int8: ff = w1's columns
      if (ff < 0) ff = w1o.cast<py::tuple>()[1].cast<py::array>().shape(0);
    } else {
      py::array w2 = w2o.cast<py::array>();
      if (w2.ndim() != 3) throw std::invalid_argument("w2 must be panels (ceil(d / 32), ff, 32)");
      if (ff < 0) ff = w2.shape(1);
    }
    DecodeLayerWeights L{get(t, 0, "ln1_w", d, -1), get(t, 1, "ln1_b", d, -1),
                         panels(t, 2, "w_qkv", d, nqkv), panels(t, 3, "w_o", attn, d),
                         get(t, 4, "ln2_w", d, -1), get(t, 5, "ln2_b", d, -1),
                         panels(t, 6, "w1", d, ff), panels(t, 7, "w2", ff, d),
                         get(t, 8, "ls1", d, -1), get(t, 9, "ls2", d, -1)};
    ws.push_back(L);
  }
  const DecodeShape shape{d, heads, kv_heads, D, ff, BS, static_cast<float>(eps)};
  py::gil_scoped_release nogil;
  kernels().decode_step(ws, shape, xp, B, cp, sp, kp, vp, NB, sl, t.ip, t.ix, t.lp, t.st, queries,
                  window, last_kv_only, last_rows_only, threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "calm_fast native part: paged KV-cache manager and CPU decode attention";

  // Errors are raised as calm_fast.errors classes so the C++ manager and its Python twin
  // raise the very same exception types.
  py::module_ errors = py::module_::import("calm_fast.errors");
  static py::object cache_full = errors.attr("CacheFullError");
  static py::object unknown_stream = errors.attr("UnknownStreamError");
  // A bad argument (shape, range, dtype) is calm_fast.errors.ArgumentError: a ValueError
  // that callers can also catch as CalmFastError, like every error raised in Python.
  static py::object argument_error = errors.attr("ArgumentError");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CacheFullError& e) {
      PyErr_SetString(cache_full.ptr(), e.what());
    } catch (const UnknownStreamError& e) {
      PyErr_SetString(unknown_stream.ptr(), e.what());
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(argument_error.ptr(), e.what());
    } catch (const std::out_of_range& e) {
      PyErr_SetString(argument_error.ptr(), e.what());
    }
  });

  m.def("linear_i8", &linear_i8, py::arg("x"), py::arg("panels"), py::arg("y"),
        py::arg("threads") = 0,
        "y = x W for fp32 rows, W as int8 panels (panels, scales, colsum): rows quantized "
        "per row, exact integer sums (gemm_cpu.h)");
  m.def("linear", &linear, py::arg("x"), py::arg("panels"), py::arg("bias"), py::arg("y"),
        py::arg("threads") = 0,
        "y = x W (+ bias) for fp32 rows, W packed as panels (ceil(N / 32), K, 32): fp32, or "
        "int16 holding bf16 (fp32 products and sums)");


  m.def("conv_rows", &conv_rows, py::arg("x"), py::arg("panels"), py::arg("taps"),
        py::arg("dil"), py::arg("T"), py::arg("bias"), py::arg("add0"), py::arg("res"),
        py::arg("y"), py::arg("e"), py::arg("pair_panels") = py::none(),
        py::arg("threads") = 0,
        "Causal conv over channels-last fp32 rows as an implicit GEMM over packed panels, "
        "with bias, row-0 add, residual, and raw and / or ELU outputs; with pair_panels, "
        "2 or 3 taps two rows at a time (Winograd F(2, 2) / F(2, 3))");
  m.def("conv_rows_to_one", &conv_rows_to_one, py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("taps"), py::arg("dil"), py::arg("T"), py::arg("y"), py::arg("threads") = 0,
        "Causal conv over channels-last fp32 rows to one output channel");

  m.def("window_attention", &window_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("indptr"), py::arg("indices"), py::arg("last_page_len"),
        py::arg("start"), py::arg("window"), py::arg("scale"), py::arg("out"),
        py::arg("threads") = 0,
        "Causal sliding-window attention of T new rows per stream over paged fp32 K/V "
        "(writes `out`)");

  m.def("decode_step", &decode_step, py::arg("layers"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("eps"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), py::arg("indptr"), py::arg("indices"),
        py::arg("last_page_len"), py::arg("start"), py::arg("queries") = 1,
        py::arg("window") = 0, py::arg("last_kv_only") = false,
        py::arg("last_rows_only") = false, py::arg("threads") = 0,
        "Every layer of a pre-LN Transformer for a batch of fp32 rows (x updated in place); "
        "writes the rows' K/V at `slots` and attends over the page table (one query per "
        "stream, or `queries` rows per stream over its last `window` rows; last_kv_only: "
        "the last layer stops after its K/V; last_rows_only: it finishes only each stream's "
        "last row)");

  // precision="bf16" linears run on AVX512-BF16 dot products on this CPU (else: the same
  // rounded rows and weights through fp32 multiply-adds)
  m.attr("has_bf16_dot") = calm_fast::has_bf16_dot();
  m.attr("has_int8_dot") = calm_fast::has_int8_dot();
  // the instruction set the fp32 GEMM, attention, conv and decode-step kernels run with
  // (isa_kernels.h), the built sets this CPU can run, and whether "build" is -march=native
  m.attr("isa") = kernels().isa;
  m.attr("runnable_isas") = runnable_isas();
  m.attr("native_build") = native_build();

#ifdef CALM_FAST_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif

  py::class_<KVManager>(m, "KVManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("new_stream", &KVManager::new_stream)
      .def("fork", &KVManager::fork, py::arg("stream"))
      .def(
          "append",
          [](KVManager& self, int64_t stream, int64_t n) {
            return to_python(self.append(stream, n), {static_cast<py::ssize_t>(n)});
          },
          py::arg("stream"), py::arg("n"))
      .def(
          "append_batch",
          [](KVManager& self, py::array streams, int64_t n) {
            const int64_t* ids = checked<int64_t>(streams, "streams", 1, false);
            const py::ssize_t s = streams.shape(0);
            AppendResult r = self.append_batch(ids, s, n);
            return to_python(r, {s, static_cast<py::ssize_t>(n)});
          },
          py::arg("streams"), py::arg("n"),
          "n rows for every stream, all or nothing; slots shaped [len(streams), n]")
      .def("blocks_needed", &KVManager::blocks_needed, py::arg("stream"), py::arg("n"))
      .def("trim_front", &KVManager::trim_front, py::arg("stream"), py::arg("keep_last"))
      .def("truncate", &KVManager::truncate, py::arg("stream"), py::arg("n"))
      .def("free", &KVManager::free, py::arg("stream"))
      .def("page_table", &page_table, py::arg("streams"), py::arg("indptr"),
           py::arg("indices"), py::arg("last_page_len"), py::arg("start") = py::none())
      .def("blocks", [](const KVManager& s, int64_t id) { return s.stream(id).blocks; })
      .def("length", [](const KVManager& s, int64_t id) { return s.stream(id).length; })
      .def("start", [](const KVManager& s, int64_t id) { return s.stream(id).start; })
      .def("position", [](const KVManager& s, int64_t id) { return s.stream(id).position; })
      .def("has_stream", &KVManager::has_stream)
      .def("streams", &KVManager::stream_ids)
      .def("refcount", &KVManager::refcount, py::arg("block"))
      .def_property_readonly("num_blocks", &KVManager::num_blocks)
      .def_property_readonly("block_size", &KVManager::block_size)
      .def_property_readonly("num_free_blocks", &KVManager::num_free_blocks)
      .def_property_readonly("num_streams", &KVManager::num_streams);

  m.def("paged_decode_attention", &paged_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("indptr"), py::arg("indices"), py::arg("last_page_len"),
        py::arg("start"), py::arg("out"), py::arg("scale"),
        "Single-query attention of a ragged batch over paged fp32 K/V (writes `out`).");
}
