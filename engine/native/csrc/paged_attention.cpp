// Paged attention on the CPU: the KV-cache write, and causal attention of query rows over their sequences'
// cached context, for decodes (one query row) and prefill chunks alike.
//
// Work is split into tasks of (sequence, KV head, query tile, key range). A task reads each KV tile once for
// all query heads of its group and keeps an online softmax in float32. Decodes with a long context are split
// over their keys; the partial results are merged by log-sum-exp afterwards.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "fp8.h"
#include "kernels.h"
#include "vec_utils.h"

namespace pagedserve {
namespace {

constexpr int64_t kQueryTile = 16;     // query positions per prefill task
constexpr int64_t kTransposedMinRows = 16;  // tasks with this many query rows score a key tile transposed
constexpr int64_t kDecodeSplit = 512;  // context tokens per decode task; longer decodes are split and merged

struct Task {
  int64_t seq;
  int64_t kv_head;
  int64_t query_begin;  // q rows [query_begin, query_end)
  int64_t query_end;
  int64_t key_begin;  // context positions [key_begin, key_end); the last query row sees up to key_end
  int64_t key_end;
  int64_t partial;  // index into the partial results, or -1 when the task writes the output itself
};

struct SplitDecode {
  int64_t seq;
  int64_t kv_head;
  int64_t first_partial;
  int64_t num_partials;
};

struct Layout {
  int64_t num_heads, num_kv_heads, head_dim, group, block_size;
  int64_t q_row_stride, cache_token_stride, cache_block_stride;
  float scale;    // the softmax scale times the key scale
  float v_scale;  // the value scale
};

struct Plan {
  std::vector<Task> tasks;
  std::vector<SplitDecode> splits;
  int64_t num_partials = 0;
};

Plan plan_tasks(const at::Tensor& context_lens, const at::Tensor& query_start_loc, int64_t num_kv_heads) {
  Plan plan;
  const auto* starts = query_start_loc.data_ptr<int64_t>();
  const auto* lens = context_lens.data_ptr<int64_t>();
  for (int64_t seq = 0; seq < context_lens.numel(); ++seq) {
    const int64_t query_len = starts[seq + 1] - starts[seq];
    const int64_t first_key_end = lens[seq] - query_len + 1;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      if (query_len == 1 && lens[seq] > kDecodeSplit) {
        plan.splits.push_back({seq, head, plan.num_partials, 0});
        for (int64_t key = 0; key < lens[seq]; key += kDecodeSplit) {
          plan.tasks.push_back({seq, head, starts[seq], starts[seq] + 1, key, std::min(key + kDecodeSplit, lens[seq]),
                                plan.num_partials++});
          ++plan.splits.back().num_partials;
        }
        continue;
      }
      for (int64_t begin = starts[seq]; begin < starts[seq + 1]; begin += kQueryTile) {
        const int64_t end = std::min(begin + kQueryTile, starts[seq + 1]);
        plan.tasks.push_back({seq, head, begin, end, 0, first_key_end + (end - 1 - starts[seq]), -1});
      }
    }
  }
  return plan;
}

// Float scratch of one task: scaled queries, accumulators, running max and sum, and one tile of at most kVecSize
// keys and values (keys also transposed, [head_dim, kVecSize], for tasks of many rows).
struct Scratch {
  std::vector<float> query, acc, max, sum, scores, keys, keys_t, values;
  Scratch(int64_t rows, const Layout& layout)
      : query(rows * layout.head_dim), acc(rows * layout.head_dim), max(rows), sum(rows), scores(kVecSize),
        keys(kVecSize * layout.head_dim), keys_t(layout.head_dim * kVecSize), values(kVecSize * layout.head_dim) {}
};

#if defined(CPU_CAPABILITY_AVX512)
// The sums of 16 vectors' lanes as one vector: lane j holds the sum of v[j].
inline __m512 lane_sums(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}
#endif

// scores[j] = query . keys[j] for j < n <= kVecSize.
inline void tile_scores(const float* query, const float* keys, int64_t n, int64_t dim, float* scores) {
#if defined(CPU_CAPABILITY_AVX512)
  if (dim % 16 == 0) {
    __m512 partial[16];
    for (int64_t j = 0; j < 16; ++j) {
      __m512 total = _mm512_setzero_ps();
      for (int64_t d = 0; j < n && d < dim; d += 16) {
        total = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), _mm512_loadu_ps(keys + j * dim + d), total);
      }
      partial[j] = total;
    }
    _mm512_storeu_ps(scores, lane_sums(partial));
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) scores[j] = dot(keys + j * dim, query, dim);
}

// acc = acc * correction + sum_j p[j] * values[j] for rows of kVectors whole vectors: the accumulator stays in
// registers and its vectors' FMA chains are independent.
template <int64_t kVectors>
inline void accumulate_rows(float* acc, float correction, const float* p, const float* values, int64_t n) {
  Vec total[kVectors];
  for (int64_t c = 0; c < kVectors; ++c) total[c] = Vec::loadu(acc + c * kVecSize) * Vec(correction);
  for (int64_t j = 0; j < n; ++j) {
    const Vec weight(p[j]);
    for (int64_t c = 0; c < kVectors; ++c) {
      total[c] = at::vec::fmadd(weight, Vec::loadu(values + (j * kVectors + c) * kVecSize), total[c]);
    }
  }
  for (int64_t c = 0; c < kVectors; ++c) total[c].store(acc + c * kVecSize);
}

inline void accumulate(float* acc, float correction, const float* p, const float* values, int64_t n, int64_t dim) {
  if (dim == 4 * kVecSize) return accumulate_rows<4>(acc, correction, p, values, n);
  if (dim == 8 * kVecSize) return accumulate_rows<8>(acc, correction, p, values, n);
  for (int64_t d = 0; d < dim; ++d) {
    float total = acc[d] * correction;
    for (int64_t j = 0; j < n; ++j) total += p[j] * values[j * dim + d];
    acc[d] = total;
  }
}

template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; d += kVecSize) {
    const int64_t width = std::min(kVecSize, n - d);
    store_float(dst + d, load_float(src + d, width), width);
  }
}

// One online-softmax update of a query row with the scores of a tile's n keys; lanes past `visible` are masked.
inline void softmax_update(Scratch& s, int64_t row, Vec scores, int64_t visible, int64_t n, int64_t dim) {
  const Vec lanes = Vec::arange(0.f, 1.f);
  scores = Vec::blendv(scores, Vec(-std::numeric_limits<float>::infinity()), lanes >= Vec(static_cast<float>(visible)));
  const float new_max = std::max(s.max[row], lane_max(scores));
  const float correction = std::exp(s.max[row] - new_max);
  const Vec p = (scores - Vec(new_max)).exp_u20();
  p.store(s.scores.data());
  s.max[row] = new_max;
  s.sum[row] = s.sum[row] * correction + lane_sum(p);
  accumulate(s.acc.data() + row * dim, correction, s.scores.data(), s.values.data(), n, dim);
}

// The tile's keys [n, dim] as [dim, kVecSize], zero past n: a row's scores are then dim FMAs over whole vectors.
inline void transpose_keys(Scratch& s, int64_t n, int64_t dim) {
  std::fill(s.keys_t.begin(), s.keys_t.end(), 0.f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < dim; ++d) s.keys_t[d * kVecSize + j] = s.keys[j * dim + d];
  }
}

inline Vec transposed_scores(const float* query, const float* keys_t, int64_t dim) {
  Vec a(0.f), b(0.f), c(0.f), e(0.f);  // four independent FMA chains, in registers
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    a = at::vec::fmadd(Vec(query[d]), Vec::loadu(keys_t + d * kVecSize), a);
    b = at::vec::fmadd(Vec(query[d + 1]), Vec::loadu(keys_t + (d + 1) * kVecSize), b);
    c = at::vec::fmadd(Vec(query[d + 2]), Vec::loadu(keys_t + (d + 2) * kVecSize), c);
    e = at::vec::fmadd(Vec(query[d + 3]), Vec::loadu(keys_t + (d + 3) * kVecSize), e);
  }
  for (; d < dim; ++d) a = at::vec::fmadd(Vec(query[d]), Vec::loadu(keys_t + d * kVecSize), a);
  return (a + b) + (c + e);
}

template <typename scalar_t>
void load_queries(const scalar_t* q, const Task& task, const Layout& layout, Scratch& s) {
  const int64_t dim = layout.head_dim;
  for (int64_t pos = task.query_begin; pos < task.query_end; ++pos) {
    for (int64_t g = 0; g < layout.group; ++g) {
      const int64_t row = (pos - task.query_begin) * layout.group + g;
      const scalar_t* src = q + pos * layout.q_row_stride + (task.kv_head * layout.group + g) * dim;
      for (int64_t d = 0; d < dim; ++d) s.query[row * dim + d] = static_cast<float>(src[d]) * layout.scale;
    }
  }
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  std::fill(s.max.begin(), s.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.sum.begin(), s.sum.end(), 0.f);
}

// Keys [first, first + n) of one cache block, converted to float.
template <typename cache_t>
void load_kv_tile(const cache_t* k_cache, const cache_t* v_cache, int64_t block, int64_t first, int64_t n,
                  int64_t kv_head, const Layout& layout, Scratch& s) {
  const int64_t dim = layout.head_dim;
  const int64_t offset = block * layout.cache_block_stride + kv_head * dim;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t token = offset + (first + j) * layout.cache_token_stride;
    to_float(k_cache + token, s.keys.data() + j * dim, dim);
    to_float(v_cache + token, s.values.data() + j * dim, dim);
  }
}

inline void attend_tile(Scratch& s, const Task& task, const Layout& layout, int64_t key, int64_t n) {
  const int64_t dim = layout.head_dim;
  const int64_t num_positions = task.query_end - task.query_begin;
  const bool transposed = num_positions * layout.group >= kTransposedMinRows;
  if (transposed) transpose_keys(s, n, dim);
  for (int64_t pos = 0; pos < num_positions; ++pos) {
    const int64_t visible = std::min(n, task.key_end - (num_positions - 1 - pos) - key);
    if (visible <= 0) continue;
    for (int64_t g = 0; g < layout.group; ++g) {
      const int64_t row = pos * layout.group + g;
      const float* query = s.query.data() + row * dim;
      if (transposed) {
        softmax_update(s, row, transposed_scores(query, s.keys_t.data(), dim), visible, n, dim);
      } else {
        tile_scores(query, s.keys.data(), visible, dim, s.scores.data());
        softmax_update(s, row, Vec::loadu(s.scores.data()), visible, n, dim);
      }
    }
  }
}

template <typename scalar_t, typename cache_t>
void run_task(const Task& task, const Layout& layout, const scalar_t* q, const cache_t* k_cache,
              const cache_t* v_cache, const int64_t* block_table, Scratch& s) {
  load_queries(q, task, layout, s);
  for (int64_t key = task.key_begin; key < task.key_end;) {
    const int64_t first = key % layout.block_size;
    const int64_t n = std::min({layout.block_size - first, task.key_end - key, kVecSize});
    load_kv_tile(k_cache, v_cache, block_table[key / layout.block_size], first, n, task.kv_head, layout, s);
    attend_tile(s, task, layout, key, n);
    key += n;
  }
}

template <typename scalar_t>
void write_rows(const Task& task, const Layout& layout, const Scratch& s, scalar_t* out) {
  const int64_t dim = layout.head_dim;
  for (int64_t pos = task.query_begin; pos < task.query_end; ++pos) {
    for (int64_t g = 0; g < layout.group; ++g) {
      const int64_t row = (pos - task.query_begin) * layout.group + g;
      scalar_t* dst = out + (pos * layout.num_heads + task.kv_head * layout.group + g) * dim;
      const float inverse = layout.v_scale / s.sum[row];
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(s.acc[row * dim + d] * inverse);
    }
  }
}

// Partial results of split decodes: accumulators [partials, group, D], maxima and sums [partials, group].
struct Partials {
  std::vector<float> acc, max, sum;
  Partials(int64_t count, const Layout& layout)
      : acc(count * layout.group * layout.head_dim), max(count * layout.group), sum(count * layout.group) {}

  void save(int64_t index, const Scratch& s, const Layout& layout) {
    std::copy(s.acc.begin(), s.acc.end(), acc.begin() + index * layout.group * layout.head_dim);
    std::copy(s.max.begin(), s.max.end(), max.begin() + index * layout.group);
    std::copy(s.sum.begin(), s.sum.end(), sum.begin() + index * layout.group);
  }
};

template <typename scalar_t>
void merge_split(const SplitDecode& split, const Partials& partials, const Layout& layout, int64_t row_of_seq,
                 scalar_t* out) {
  const int64_t dim = layout.head_dim;
  std::vector<float> merged(dim);
  for (int64_t g = 0; g < layout.group; ++g) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < split.num_partials; ++i) top = std::max(top, partials.max[(split.first_partial + i) * layout.group + g]);
    float total = 0.f;
    std::fill(merged.begin(), merged.end(), 0.f);
    for (int64_t i = 0; i < split.num_partials; ++i) {
      const int64_t at = (split.first_partial + i) * layout.group + g;
      const float weight = std::exp(partials.max[at] - top);
      total += partials.sum[at] * weight;
      for (int64_t d = 0; d < dim; ++d) merged[d] += partials.acc[at * dim + d] * weight;
    }
    scalar_t* dst = out + (row_of_seq * layout.num_heads + split.kv_head * layout.group + g) * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(merged[d] / total * layout.v_scale);
  }
}

template <typename scalar_t, typename cache_t>
void run_plan(const Plan& plan, const Layout& layout, const at::Tensor& q, const at::Tensor& k_cache,
              const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& query_start_loc,
              at::Tensor& out) {
  const auto* q_ptr = q.data_ptr<scalar_t>();
  const auto* k_ptr = k_cache.data_ptr<cache_t>();
  const auto* v_ptr = v_cache.data_ptr<cache_t>();
  const auto* tables = block_tables.data_ptr<int64_t>();
  const int64_t table_width = block_tables.size(1);
  auto* out_ptr = out.data_ptr<scalar_t>();
  Partials partials(plan.num_partials, layout);
  at::parallel_for(0, static_cast<int64_t>(plan.tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(kQueryTile * layout.group, layout);
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = plan.tasks[i];
      const int64_t rows = (task.query_end - task.query_begin) * layout.group;
      scratch.acc.resize(rows * layout.head_dim);
      scratch.max.resize(rows);
      scratch.sum.resize(rows);
      run_task(task, layout, q_ptr, k_ptr, v_ptr, tables + task.seq * table_width, scratch);
      if (task.partial < 0) {
        write_rows(task, layout, scratch, out_ptr);
      } else {
        partials.save(task.partial, scratch, layout);
      }
    }
  });
  const auto* starts = query_start_loc.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(plan.splits.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) merge_split(plan.splits[i], partials, layout, starts[plan.splits[i].seq], out_ptr);
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              name, " must be [T, heads, D] with contiguous heads");
}

void check_metadata(const at::Tensor& block_tables, const at::Tensor& context_lens,
                    const at::Tensor& query_start_loc) {
  for (const at::Tensor* t : {&block_tables, &context_lens, &query_start_loc}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "attention metadata must be contiguous int64");
  }
  TORCH_CHECK(query_start_loc.numel() == context_lens.numel() + 1, "query_start_loc needs one entry per sequence + 1");
}

void check_cache_dtype(const at::Tensor& x, const at::Tensor& cache) {
  TORCH_CHECK(cache.scalar_type() == x.scalar_type() || is_fp8(cache.scalar_type()),
              "a cache must be in the model's dtype or in fp8");
}

// Rows t of x [T, Hkv, D] (rows may be strided) to cache slots[t] as value / scale in fp8; negative slots skipped.
template <typename scalar_t, typename fp8_t>
void write_fp8_rows(const at::Tensor& x, at::Tensor& cache, const int64_t* slots, float scale) {
  const int64_t row = x.size(1) * x.size(2);
  const auto* src = x.data_ptr<scalar_t>();
  auto* dst = cache.data_ptr<fp8_t>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] >= 0) store_fp8(src + t * x.stride(0), dst + slots[t] * row, row, scale);
    }
  });
}

void copy_rows(const at::Tensor& x, at::Tensor& cache, const int64_t* slots) {
  const int64_t row = x.size(1) * x.size(2) * x.element_size();
  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < x.size(0); ++t) {
    if (slots[t] >= 0) std::memcpy(dst + slots[t] * row, src + t * x.stride(0) * x.element_size(), row);
  }
}

void write_rows_to_cache(const at::Tensor& x, at::Tensor& cache, const int64_t* slots, float scale) {
  if (!is_fp8(cache.scalar_type())) return copy_rows(x, cache, slots);
  PAGEDSERVE_DISPATCH(x.scalar_type(), "write_kv_cache", [&] {
    dispatch_cache<scalar_t>(cache.scalar_type(), [&](auto fp8) {
      write_fp8_rows<scalar_t, decltype(fp8)>(x, cache, slots, scale);
    });
  });
}

}  // namespace

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  RECORD_FUNCTION("pagedserve::write_kv_cache", c10::ArrayRef<const c10::IValue>{});
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k and v, and the two caches, must share a dtype");
  check_cache_dtype(k, k_cache);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == k.size(0), "one int64 slot per token");
  const at::Tensor slots = slot_mapping.contiguous();
  write_rows_to_cache(k, k_cache, slots.data_ptr<int64_t>(), scale_value(k_scale));
  write_rows_to_cache(v, v_cache, slots.data_ptr<int64_t>(), scale_value(v_scale));
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& query_start_loc,
                     double scale, at::Tensor& out, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  RECORD_FUNCTION("pagedserve::paged_attention", c10::ArrayRef<const c10::IValue>{});
  check_rows(q, "q");
  check_metadata(block_tables, context_lens, query_start_loc);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(), "caches must be contiguous [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the caches must share a dtype");
  check_cache_dtype(q, k_cache);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(q.size(1) % num_kv_heads == 0 && q.size(2) == k_cache.size(3), "q heads do not match the cache");
  const Layout layout{q.size(1), num_kv_heads, q.size(2), q.size(1) / num_kv_heads, k_cache.size(1), q.stride(0),
                      num_kv_heads * q.size(2), k_cache.size(1) * num_kv_heads * q.size(2),
                      static_cast<float>(scale) * scale_value(k_scale), scale_value(v_scale)};
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "out must be a contiguous tensor shaped like q");
  const Plan plan = plan_tasks(context_lens, query_start_loc, num_kv_heads);
  PAGEDSERVE_DISPATCH(q.scalar_type(), "paged_attention", [&] {
    dispatch_cache<scalar_t>(k_cache.scalar_type(), [&](auto cache) {
      run_plan<scalar_t, decltype(cache)>(plan, layout, q, k_cache, v_cache, block_tables, query_start_loc, out);
    });
  });
}

}  // namespace pagedserve
