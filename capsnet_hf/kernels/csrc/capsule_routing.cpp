// Capsule layers on the CPU, forward and backward: the class capsules' votes (Eq. 2) and routing-by-agreement
// (Procedure 1), and the primary capsules' squash after their convolution (at the end of this file).
//
// Built and loaded by capsnet_hf/kernels/cpu_routing.py (plain C ABI through ctypes, no torch headers): each entry
// point takes one argument struct (CapsnetRoutingCall or CapsnetPrimaryCall), mirrored field by field by a
// ctypes.Structure there and checked against capsnet_call_layout() when the library is loaded, and returns null or a
// one-line error (it validates the sizes itself and never lets a C++ exception escape). The torch formulation writes
// the votes of a batch to memory and streams them 2 x iterations - 1 times; here the weight is first re-laid out into
// input blocks (capsnet_pack_weight; the backward does the same to the inputs), then each thread computes the votes of
// a block of examples (two per sweep over the weight) into its own buffer, laid out so that L input capsules fill one
// vector register, and then routes each example with one pass per iteration after the first: agreement with v_j,
// softmax over the parents and the next weighted sum s_j, for L input capsules at a time. A batch of one in inference
// is split the other way: the threads share its input blocks and add up each pass's s_j (route_one_example_on_team).
// Float32 throughout; results differ from the torch path by float rounding only (summation order, a polynomial exp).
// With bf16_votes (under bf16 autocast, in a build with AVX512-BF16) the votes multiply the weight and inputs rounded
// to bfloat16, in pairs of input dimensions (vdpbf16ps, float32 sums), which halves the weight traffic the votes wait
// on; routing and gradients stay float32, and equal the float32 path's for that rounded weight and inputs (a
// straight-through rounding).
//
// For a backward the forward keeps each example's routing record (every iteration's couplings, s_j and v_j); the
// backward (capsnet_route_backward) reads it with the packed weight, recomputes the votes only, then walks the
// iterations back with one pass over the votes each, and writes dL/du_hat as a sum of rank-one terms per parent
// (2T - 1 of them). A second parallel phase, over input blocks instead of examples, turns those terms into dL/du and
// dL/dW, so that no thread needs its own copy of dL/dW.
//
// Layouts (L = kLanes, P = I rounded up to a multiple of L, padding capsules have zero votes):
//   inputs         [B, I, A]           primary capsules u_i
//   packed_inputs  [P / L, B, A, L]    the same, input-block major, zero padded (backward only; scratch)
//   weight         [I, J, K, A]        W[i, j, k, a], the layer's own layout (grad_weight too)
//   packed_weight  [P / L, J, K, A, L] W re-laid out by capsnet_pack_weight (read by both): i = block * L + lane;
//                  with bf16_votes [P / L, J, K, A2 / 2, L] 32-bit words, each the bf16 pair (a = 2m low, 2m + 1
//                  high half; A2 = A rounded up to even, a zero beyond A)
//   bias           [J, K] or null      added to every s_j
//   poses          [B, J, K]           v_j of the last iteration (forward output)
//   coupling       [B, J, I]           c_ij of the last iteration (forward output)
//   record         [B, record floats]  what routing leaves for the backward (RoutingRecord; forward output or null)
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define CAPSNET_BF16_VOTES 1
#else
#define CAPSNET_BF16_VOTES 0
#endif

namespace {

// L: one vector register of floats. AVX-512 doubles it; measured against 8 lanes on the same CPU in
// docs/performance.md.
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t WordVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Vec load(const float* source) {
  Vec value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

inline void store(float* target, Vec value) { std::memcpy(target, &value, sizeof(value)); }

// Every lane's bfloat16, rounded to nearest even as torch rounds (a NaN stays a NaN), in the low half of its word.
inline WordVec bf16_bits(Vec x) {
  WordVec bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const WordVec rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40u : rounded;
}

inline Vec round_to_bf16(Vec x) {
  const WordVec bits = bf16_bits(x) << 16;
  Vec rounded;
  std::memcpy(&rounded, &bits, sizeof(rounded));
  return rounded;
}

// Words of bf16 pairs: `low` in the low half (the pair's first element, as vdpbf16ps reads it).
inline WordVec bf16_pairs(Vec low, Vec high) { return bf16_bits(low) | (bf16_bits(high) << 16); }

#if defined(__AVX__)
// Eight rows of eight floats (row r at rows + r * stride) transposed: dimension a of the eight rows at target + a *
// step, for a < 8 (an AVX 8 x 8 transpose: unpack pairs, shuffle quads, swap 128-bit halves).
inline void transpose_8x8(const float* rows, int64_t stride, float* target, int64_t step) {
  __m256 r[8], t[8], q[8];
  for (int64_t row = 0; row < 8; ++row) r[row] = _mm256_loadu_ps(rows + row * stride);
  for (int64_t pair = 0; pair < 4; ++pair) {
    t[2 * pair] = _mm256_unpacklo_ps(r[2 * pair], r[2 * pair + 1]);
    t[2 * pair + 1] = _mm256_unpackhi_ps(r[2 * pair], r[2 * pair + 1]);
  }
  for (int64_t quad = 0; quad < 2; ++quad) {
    __m256* in = t + 4 * quad;
    q[4 * quad] = _mm256_shuffle_ps(in[0], in[2], 0x44);
    q[4 * quad + 1] = _mm256_shuffle_ps(in[0], in[2], 0xee);
    q[4 * quad + 2] = _mm256_shuffle_ps(in[1], in[3], 0x44);
    q[4 * quad + 3] = _mm256_shuffle_ps(in[1], in[3], 0xee);
  }
  for (int64_t a = 0; a < 4; ++a) {
    _mm256_storeu_ps(target + a * step, _mm256_permute2f128_ps(q[a], q[a + 4], 0x20));
    _mm256_storeu_ps(target + (a + 4) * step, _mm256_permute2f128_ps(q[a], q[a + 4], 0x31));
  }
}
#endif

// Stores L capsules' A floats (capsule l's at rows + l * stride for l < lanes, zeros beyond) lane-minor, as A
// vectors [A, L] (dimension a of every lane in one vector), or with `pairs` as ceil(A / 2) vectors of bf16 pair words.
inline void pack_tile(const float* rows, int64_t stride, int64_t lanes, int64_t A, bool pairs, float* target) {
#if defined(__AVX__)
  // the common case (the paper's A = 8, whole vectors) as transposes, which the weight's re-layout waits on at small
  // batches (docs/performance.md)
  if (A == 8 && lanes == kLanes) {
    float dims[8 * kLanes];  // [A, L] before the bf16 pairs
    float* floats = pairs ? dims : target;
    for (int64_t half = 0; half < kLanes / 8; ++half)  // lanes 8 half .. 8 half + 7
      transpose_8x8(rows + half * 8 * stride, stride, floats + half * 8, kLanes);
    if (pairs)
      for (int64_t m = 0; m < 4; ++m) {
        const WordVec words = bf16_pairs(load(dims + 2 * m * kLanes), load(dims + (2 * m + 1) * kLanes));
        std::memcpy(target + m * kLanes, &words, sizeof(words));
      }
    return;
  }
#endif
  if (!pairs) {
    for (int64_t a = 0; a < A; ++a)
      for (int64_t lane = 0; lane < kLanes; ++lane) target[a * kLanes + lane] = lane < lanes ? rows[lane * stride + a] : 0.0f;
    return;
  }
  for (int64_t m = 0; 2 * m < A; ++m) {
    Vec low{}, high{};
    for (int64_t lane = 0; lane < lanes; ++lane) {
      low[lane] = rows[lane * stride + 2 * m];
      high[lane] = 2 * m + 1 < A ? rows[lane * stride + 2 * m + 1] : 0.0f;
    }
    const WordVec words = bf16_pairs(low, high);
    std::memcpy(target + m * kLanes, &words, sizeof(words));
  }
}

// One half of L pair words as floats (half 0: the low elements, 1: the high ones): exact, bf16 is a float's high half.
inline Vec load_pair_half(const uint32_t* words, int64_t half) {
  WordVec bits;
  std::memcpy(&bits, words, sizeof(bits));
  bits = half ? (bits & 0xffff0000u) : (bits << 16);
  Vec value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline Vec broadcast(float value) { return Vec{} + value; }

inline float lane_sum(Vec value) {
  float total = 0.0f;
  for (int64_t lane = 0; lane < kLanes; ++lane) total += value[lane];
  return total;
}

// exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n p(r) with r = x - n ln 2 in [-ln2/2, ln2/2] and a
// degree-6 polynomial (Cephes' expf coefficients); relative error at most 8.4e-8 on [-87, 0] against double exp
// (every 8e-5); inputs below -87 give exp(-87).
inline Vec exp_nonpositive(Vec x) {
  x = x < -87.0f ? broadcast(-87.0f) : x;
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;             // ln 2 split in two for precision
  Vec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

}  // namespace

// The arguments of both entry points (B = batch, I = inputs_per_example, A = input_dim, J = parents, K = pose_dim,
// P = padded_inputs, T = iterations; layouts at the top of this file); fields a call does not use may be null.
struct CapsnetRoutingCall {
  const float* inputs;
  float* packed_inputs;
  const float* weight;
  float* packed_weight;
  const float* bias;
  float* poses;
  float* coupling;
  float* record;
  const float* grad_poses;     // [B, J, K]
  const float* grad_coupling;  // [B, J, I] or null
  float* grad_inputs;          // [B, I, A]
  float* grad_weight;          // [I, J, K, A]
  float* grad_bias;            // [B, J, K]: each example's sum over the iterations of dL/ds_t
  float* left;                 // scratch [P / L, B, J, terms, L], terms = 2T - 1 (1 with detach_inner_votes)
  float* right;                // scratch [B, terms, J, K]
  int64_t batch, inputs_per_example, input_dim, parents, pose_dim, padded_inputs, iterations, examples_per_block;
  int32_t leaky, detach_inner_votes, bf16_votes, threads;
  float epsilon;
};

namespace {

using Problem = CapsnetRoutingCall;

// dL/du_hat[b, j, i, :] = sum_r left_r[b, j, i] right_r[b, j, :] (rank one per term and parent: left = c_t with
// right = dL/ds_t, and left = the accumulated dL/dlogits with right = v_(t-1)); the votes are never written out.
int64_t gradient_terms(const Problem& p) { return p.detach_inner_votes ? 1 : 2 * p.iterations - 1; }

// Words per (block, j, k) of a bf16_votes packed weight, and per (block, example) of its packed inputs.
int64_t pair_words(const Problem& p) { return (p.input_dim + 1) / 2; }

// What routing one example leaves behind for its backward pass (per iteration t), in p.record.
struct RoutingRecord {
  float* couplings;       // [T - 1, J, P]: c_t for t >= 1 (c_0 is uniform)
  float* preactivations;  // [T, J, K]: s_t with the bias
  float* poses;           // [T, J, K]: v_t
};

int64_t record_floats(int64_t parents, int64_t pose_dim, int64_t padded_inputs, int64_t iterations) {
  return parents * ((iterations - 1) * padded_inputs + 2 * iterations * pose_dim);
}

RoutingRecord example_record(const Problem& p, int64_t b) {
  const int64_t J = p.parents, JK = J * p.pose_dim, T = p.iterations;
  float* base = p.record + b * record_floats(J, p.pose_dim, p.padded_inputs, T);
  float* preactivations = base + (T - 1) * J * p.padded_inputs;
  return RoutingRecord{base, preactivations, preactivations + T * JK};
}

// Eq. 1 as v = f(n) s with n = |s|^2: f(n) = n / ((1 + n) sqrt(n + eps)), finite at n = 0 for eps > 0. Shared by the
// class capsules (float) and the primary capsules (double).
template <typename T>
T squash_factor(T n, T epsilon) {
  return n / ((T(1) + n) * std::sqrt(n + epsilon));
}

// What dL/ds = f(n) dL/dv + 2 f'(n) (dL/dv . s) s needs: f(n) and f'(n) = (1 / (1 + n) - n / (2 (n + eps))) /
// ((1 + n) sqrt(n + eps)).
template <typename T>
struct SquashSlopes {
  T factor, derivative;
};

template <typename T>
SquashSlopes<T> squash_slopes(T n, T epsilon) {
  const T inverse = T(1) / ((T(1) + n) * std::sqrt(n + epsilon));
  return {n * inverse, inverse * (T(1) / (T(1) + n) - T(0.5) * n / (n + epsilon))};
}

// Adds the bias to s (in place) and writes v = squash(s) (Eq. 1), for every parent.
void squash(const Problem& p, float* preactivation, float* poses) {
  for (int64_t j = 0; j < p.parents; ++j) {
    float* s = preactivation + j * p.pose_dim;
    float squared_norm = 0.0f;
    for (int64_t k = 0; k < p.pose_dim; ++k) {
      if (p.bias) s[k] += p.bias[j * p.pose_dim + k];
      squared_norm += s[k] * s[k];
    }
    const float factor = squash_factor(squared_norm, p.epsilon);
    for (int64_t k = 0; k < p.pose_dim; ++k) poses[j * p.pose_dim + k] = s[k] * factor;
  }
}

// dL/ds from dL/dv through Eq. 1 (squash_slopes), for every parent.
void squash_backward(const Problem& p, const float* preactivation, const float* grad_poses, float* grad_preactivation) {
  for (int64_t j = 0; j < p.parents; ++j) {
    const float* s = preactivation + j * p.pose_dim;
    const float* g = grad_poses + j * p.pose_dim;
    float squared_norm = 0.0f, radial = 0.0f;
    for (int64_t k = 0; k < p.pose_dim; ++k) {
      squared_norm += s[k] * s[k];
      radial += g[k] * s[k];
    }
    const SquashSlopes<float> slopes = squash_slopes(squared_norm, p.epsilon);
    for (int64_t k = 0; k < p.pose_dim; ++k)
      grad_preactivation[j * p.pose_dim + k] = slopes.factor * g[k] + 2.0f * slopes.derivative * radial * s[k];
  }
}

// Votes of kLanes input capsules for kExamples examples in one sweep over the weight: out[e][jk] = sum_a
// weight[jk, a] u[e][a] for jk < count, and with kFirstSums also added to first_sum[e][jk] (the forward's first
// iteration). kInputDim > 0 fixes the input capsules' dimension at compile time (8 in the paper), which keeps every
// example's u in registers, so that each weight vector loaded serves all kExamples (the weight, not the arithmetic,
// is what the votes wait for: docs/performance.md).
template <int64_t kInputDim, int64_t kExamples, bool kFirstSums>
void capsule_votes(const float* weight, const float* const* u, int64_t input_dim, int64_t count, float* const* out,
                   Vec* const* first_sum) {
  static_assert(kInputDim > 0 || kExamples == 1, "a runtime input dimension takes one example at a time");
  const int64_t A = kInputDim > 0 ? kInputDim : input_dim;
  Vec inputs[kExamples][kInputDim > 0 ? kInputDim : 1];
  if constexpr (kInputDim > 0)
    for (int64_t e = 0; e < kExamples; ++e)
      for (int64_t a = 0; a < kInputDim; ++a) inputs[e][a] = load(u[e] + a * kLanes);
  for (int64_t jk = 0; jk < count; ++jk) {
    const float* w = weight + jk * A * kLanes;
    Vec vote[kExamples] = {};
    if constexpr (kInputDim > 0) {
      for (int64_t a = 0; a < kInputDim; ++a) {
        const Vec weight_vector = load(w + a * kLanes);
        for (int64_t e = 0; e < kExamples; ++e) vote[e] += weight_vector * inputs[e][a];
      }
    } else {
      for (int64_t a = 0; a < A; ++a) vote[0] += load(w + a * kLanes) * load(u[0] + a * kLanes);
    }
    for (int64_t e = 0; e < kExamples; ++e) {
      store(out[e] + jk * kLanes, vote[e]);
      if constexpr (kFirstSums) first_sum[e][jk] += vote[e];
    }
  }
}

#if CAPSNET_BF16_VOTES
inline __m512bh load_pairs(const uint32_t* words) {
  __m512bh value;
  std::memcpy(&value, words, sizeof(value));
  return value;
}

// capsule_votes with bf16 pairs: weight [count, pairs, L] and u[e] [pairs, L] words, one vdpbf16ps per pair
// (kPairs > 0 fixes their number, as kInputDim does above).
template <int64_t kPairs, int64_t kExamples, bool kFirstSums>
void capsule_votes_bf16(const uint32_t* weight, const uint32_t* const* u, int64_t pairs, int64_t count,
                        float* const* out, Vec* const* first_sum) {
  static_assert(kPairs > 0 || kExamples == 1, "a runtime input dimension takes one example at a time");
  const int64_t M = kPairs > 0 ? kPairs : pairs;
  __m512bh inputs[kExamples][kPairs > 0 ? kPairs : 1];
  if constexpr (kPairs > 0)
    for (int64_t e = 0; e < kExamples; ++e)
      for (int64_t m = 0; m < kPairs; ++m) inputs[e][m] = load_pairs(u[e] + m * kLanes);
  for (int64_t jk = 0; jk < count; ++jk) {
    const uint32_t* w = weight + jk * M * kLanes;
    __m512 vote[kExamples];
    for (int64_t e = 0; e < kExamples; ++e) vote[e] = _mm512_setzero_ps();
    if constexpr (kPairs > 0) {
      for (int64_t m = 0; m < kPairs; ++m) {
        const __m512bh weight_pairs = load_pairs(w + m * kLanes);
        for (int64_t e = 0; e < kExamples; ++e) vote[e] = _mm512_dpbf16_ps(vote[e], weight_pairs, inputs[e][m]);
      }
    } else {
      for (int64_t m = 0; m < M; ++m)
        vote[0] = _mm512_dpbf16_ps(vote[0], load_pairs(w + m * kLanes), load_pairs(u[0] + m * kLanes));
    }
    for (int64_t e = 0; e < kExamples; ++e) {
      Vec value;
      std::memcpy(&value, &vote[e], sizeof(value));
      store(out[e] + jk * kLanes, value);
      if constexpr (kFirstSums) first_sum[e][jk] += value;
    }
  }
}
#endif

// One thread's buffers: a block of examples' inputs [P / L, A, L] (with bf16_votes [P / L, A2 / 2, L] pair words)
// and votes [P / L, J, K, L], and one example's routing state (the logits in the forward only).
struct Workspace {
  Workspace(const Problem& p, bool forward)
      : inputs(p.bf16_votes ? 0 : p.examples_per_block * p.input_dim * p.padded_inputs, 0.0f),
        input_pairs(p.bf16_votes ? p.examples_per_block * pair_words(p) * p.padded_inputs : 0, 0u),
        votes(new float[p.examples_per_block * p.parents * p.pose_dim * p.padded_inputs]),  // written before read
        first_sums(forward ? p.examples_per_block * p.parents * p.pose_dim : 0),
        sums(p.parents * p.pose_dim),
        broadcast_poses(p.parents * p.pose_dim),
        couplings(p.parents),
        logits(forward ? p.parents * p.padded_inputs : 0),
        preactivation(p.parents * p.pose_dim),
        poses(p.parents * p.pose_dim) {}

  const float* example_votes(const Problem& p, int64_t e) const {
    return votes.get() + e * p.parents * p.pose_dim * p.padded_inputs;
  }

  std::vector<float> inputs;
  std::vector<uint32_t> input_pairs;
  std::unique_ptr<float[]> votes;
  std::vector<Vec> first_sums, sums, broadcast_poses, couplings;
  std::vector<float> logits, preactivation, poses;
};

// sweep(e, n) for the count examples of a block in sweeps of n = kWidest, then 2, then 1 examples (n a
// std::integral_constant, so that each sweep's register tile is fixed at compile time); only sweeps of one example
// where `tiled` is false (an input dimension that is not fixed at compile time).
template <int64_t kWidest, typename Sweep>
void in_sweeps(int64_t count, bool tiled, const Sweep& sweep) {
  int64_t e = 0;
  if (tiled) {
    if constexpr (kWidest >= 4)
      for (; e + 3 < count; e += 4) sweep(e, std::integral_constant<int64_t, 4>{});
    for (; e + 1 < count; e += 2) sweep(e, std::integral_constant<int64_t, 2>{});
  }
  for (; e < count; ++e) sweep(e, std::integral_constant<int64_t, 1>{});
}

// One input block's votes for a block's count examples, in sweeps of up to kWidest (in_sweeps): u[slot] points at
// example e + slot's words of the block (inputs + (e + slot) * stride), and votes(fixed, examples, u) runs a
// capsule_votes-like sweep with `fixed` words per input capsule compiled in (kFixed where width is that, else 0, one
// example at a time) and `examples` examples.
template <int64_t kWidest, int64_t kFixed, typename Word, typename PointAt, typename Votes>
void sweep_block(int64_t count, int64_t width, const Word* inputs, int64_t stride, const PointAt& point_at,
                 const Votes& votes) {
  in_sweeps<kWidest>(count, width == kFixed, [&](int64_t e, auto examples) {
    constexpr int64_t kExamples = decltype(examples)::value;
    const Word* u[kWidest];
    for (int64_t slot = 0; slot < kExamples; ++slot) {
      point_at(slot, e + slot);
      u[slot] = inputs + (e + slot) * stride;
    }
    if (width == kFixed || kExamples > 1)
      votes(std::integral_constant<int64_t, kFixed>{}, examples, u);
    else
      votes(std::integral_constant<int64_t, 0>{}, std::integral_constant<int64_t, 1>{}, u);
  });
}

// Input blocks [begin, end) (of kLanes capsules each): all of them, or one thread's share of one example's.
struct BlockRange {
  int64_t begin, end;
};

BlockRange all_blocks(const Problem& p) { return {0, p.padded_inputs / kLanes}; }

// Votes u_hat[i, j, k] = sum_a W[i, j, k, a] u[i, a] (Eq. 2) of examples first .. first + count - 1, for the input
// blocks in `blocks`, into the workspace, and with kFirstSums their sums over those i (the first iteration's s_j
// without the 1/J); each weight vector serves the block.
template <bool kFirstSums>
void compute_block_votes(const Problem& p, Workspace& ws, int64_t first, int64_t count, BlockRange blocks) {
  const int64_t I = p.inputs_per_example, A = p.input_dim, JK = p.parents * p.pose_dim, P = p.padded_inputs;
  const int64_t width = p.bf16_votes ? pair_words(p) : A;  // words per input capsule in the packed layouts
  for (int64_t e = 0; e < count; ++e) {
    float* target = p.bf16_votes ? reinterpret_cast<float*>(ws.input_pairs.data() + e * width * P)
                                 : ws.inputs.data() + e * A * P;
    for (int64_t v = blocks.begin; v < blocks.end; ++v) {
      const int64_t lanes = std::min(kLanes, I - v * kLanes);
      pack_tile(p.inputs + ((first + e) * I + v * kLanes) * A, A, lanes, A, p.bf16_votes, target + v * width * kLanes);
    }
  }
  if constexpr (kFirstSums) std::fill(ws.first_sums.begin(), ws.first_sums.end(), Vec{});
  for (int64_t v = blocks.begin; v < blocks.end; ++v) {
    float* out[4];  // a sweep's examples: up to 2 in float32, 4 with bf16 pairs (16 registers of inputs either way)
    Vec* first_sum[4] = {};
    const auto point_at = [&](int64_t slot, int64_t e) {
      out[slot] = ws.votes.get() + e * JK * P + v * JK * kLanes;
      if constexpr (kFirstSums) first_sum[slot] = ws.first_sums.data() + e * JK;
    };
    const int64_t block = v * width * kLanes;  // words before this block: packed inputs per example, weight per jk
#if CAPSNET_BF16_VOTES
    if (p.bf16_votes) {
      const uint32_t* weight = reinterpret_cast<const uint32_t*>(p.packed_weight) + JK * block;
      sweep_block<4, 4>(count, width, ws.input_pairs.data() + block, width * P, point_at,
                        [&](auto pairs, auto examples, const uint32_t* const* u) {
                          capsule_votes_bf16<decltype(pairs)::value, decltype(examples)::value, kFirstSums>(
                              weight, u, width, JK, out, first_sum);
                        });
      continue;
    }
#endif
    const float* weight = p.packed_weight + JK * block;
    sweep_block<2, 8>(count, width, ws.inputs.data() + block, width * P, point_at,
                      [&](auto dims, auto examples, const float* const* u) {
                        capsule_votes<decltype(dims)::value, decltype(examples)::value, kFirstSums>(
                            weight, u, width, JK, out, first_sum);
                      });
  }
}

// Procedure 1 for example e of the workspace's block: poses v_j into ws.poses, the last couplings into coupling
// [J, I] (if not null), and every iteration's c_t, s_t, v_t into record (if not null). Only the input blocks in
// `blocks` are routed here: sum_over_team(s) turns their share of each s_j (ws.preactivation, before the 1/J of the
// first iteration and the bias) into the whole sum, where a team of threads routes one example together; with all
// blocks it does nothing.
template <typename SumOverTeam>
void route_example(const Problem& p, Workspace& ws, int64_t e, float* coupling, RoutingRecord* record,
                   BlockRange blocks, const SumOverTeam& sum_over_team) {
  const int64_t I = p.inputs_per_example, J = p.parents, K = p.pose_dim, JK = J * K, P = p.padded_inputs;
  const float uniform = 1.0f / static_cast<float>(J + (p.leaky ? 1 : 0));
  const float* example_votes = ws.example_votes(p, e);
  const auto keep = [&](int64_t iteration) {
    if (!record) return;
    std::memcpy(record->preactivations + iteration * JK, ws.preactivation.data(), JK * sizeof(float));
    std::memcpy(record->poses + iteration * JK, ws.poses.data(), JK * sizeof(float));
  };
  // First iteration: zero logits, uniform couplings 1/J (1/(J + 1) with the leak).
  for (int64_t jk = 0; jk < JK; ++jk) ws.preactivation[jk] = lane_sum(ws.first_sums[e * JK + jk]);
  sum_over_team(ws.preactivation.data());
  for (int64_t jk = 0; jk < JK; ++jk) ws.preactivation[jk] *= uniform;
  squash(p, ws.preactivation.data(), ws.poses.data());
  keep(0);
  if (p.iterations == 1 && coupling)
    for (int64_t j = 0; j < J; ++j)
      std::fill(coupling + j * I + blocks.begin * kLanes, coupling + j * I + std::min(I, blocks.end * kLanes), uniform);
  for (int64_t iteration = 1; iteration < p.iterations; ++iteration) {
    const bool last = iteration == p.iterations - 1;
    float* kept_couplings = record ? record->couplings + (iteration - 1) * J * P : nullptr;
    for (int64_t jk = 0; jk < JK; ++jk) {
      ws.broadcast_poses[jk] = broadcast(ws.poses[jk]);
      ws.sums[jk] = Vec{};
    }
    for (int64_t v = blocks.begin; v < blocks.end; ++v) {
      const float* block_votes = example_votes + v * JK * kLanes;
      // b_ij += u_hat_{j|i} . v_j, then Eq. 3 over the parents (with the leak: a parent with logit 0).
      Vec maximum = p.leaky ? Vec{} : broadcast(-INFINITY);
      for (int64_t j = 0; j < J; ++j) {
        const float* vote = block_votes + j * K * kLanes;
        Vec agreement = load(vote) * ws.broadcast_poses[j * K];
        for (int64_t k = 1; k < K; ++k) agreement += load(vote + k * kLanes) * ws.broadcast_poses[j * K + k];
        float* logit = ws.logits.data() + j * P + v * kLanes;
        const Vec updated = iteration == 1 ? agreement : load(logit) + agreement;
        store(logit, updated);
        ws.couplings[j] = updated;
        maximum = updated > maximum ? updated : maximum;
      }
      Vec total = p.leaky ? exp_nonpositive(-maximum) : Vec{};
      for (int64_t j = 0; j < J; ++j) {
        ws.couplings[j] = exp_nonpositive(ws.couplings[j] - maximum);
        total += ws.couplings[j];
      }
      const Vec inverse = 1.0f / total;
      // s_j += c_ij u_hat_{j|i} (Eq. 2)
      for (int64_t j = 0; j < J; ++j) {
        const Vec c = ws.couplings[j] * inverse;
        const float* vote = block_votes + j * K * kLanes;
        for (int64_t k = 0; k < K; ++k) ws.sums[j * K + k] += c * load(vote + k * kLanes);
        if (kept_couplings) store(kept_couplings + j * P + v * kLanes, c);
        if (last && coupling) {
          const int64_t lanes = std::min(kLanes, I - v * kLanes);
          for (int64_t lane = 0; lane < lanes; ++lane) coupling[j * I + v * kLanes + lane] = c[lane];
        }
      }
    }
    for (int64_t jk = 0; jk < JK; ++jk) ws.preactivation[jk] = lane_sum(ws.sums[jk]);
    sum_over_team(ws.preactivation.data());
    squash(p, ws.preactivation.data(), ws.poses.data());
    keep(iteration);
  }
}

const auto alone = [](float*) {};  // route_example's sum_over_team for a thread that routes all of an example

// Routes blocks first_block, first_block + stride, ... of examples_per_block examples each.
void route_blocks(const Problem& p, int64_t first_block, int64_t stride) {
  const int64_t J = p.parents, JK = J * p.pose_dim, block = p.examples_per_block;
  Workspace ws(p, true);
  const int64_t num_blocks = (p.batch + block - 1) / block;
  for (int64_t block_index = first_block; block_index < num_blocks; block_index += stride) {
    const int64_t first = block_index * block, count = std::min(block, p.batch - first);
    compute_block_votes<true>(p, ws, first, count, all_blocks(p));
    for (int64_t e = 0; e < count; ++e) {
      RoutingRecord record = p.record ? example_record(p, first + e) : RoutingRecord{};
      route_example(p, ws, e, p.coupling + (first + e) * J * p.inputs_per_example, p.record ? &record : nullptr,
                    all_blocks(p), alone);
      std::memcpy(p.poses + (first + e) * JK, ws.poses.data(), JK * sizeof(float));
    }
  }
}

// Waits for every thread of the calling OpenMP team (a no-op in a build without OpenMP, whose team is one thread).
inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// What the threads of a team routing one example share: every pass's partial s_j [2][threads][J * K], alternating
// between passes so that one barrier per pass suffices, and whether a thread could not allocate its buffers.
struct TeamSums {
  explicit TeamSums(const Problem& p) : partial(2 * p.threads * p.parents * p.pose_dim) {}
  std::vector<float> partial;
  std::atomic<bool> failed{false};
};

// The one example of a batch of one, without a record (inference), on a team of `count` threads: each computes the
// votes of its share of the input blocks and routes them, and every pass's s_j is summed over the team in thread
// order (the same result whatever the timing). At batch 1 the example would otherwise route on one thread.
void route_one_example_on_team(const Problem& p, int thread, int count, TeamSums& team) {
  const int64_t JK = p.parents * p.pose_dim, blocks = p.padded_inputs / kLanes;
  const BlockRange mine{blocks * thread / count, blocks * (thread + 1) / count};
  std::unique_ptr<Workspace> ws;
  try {
    ws = std::make_unique<Workspace>(p, true);
  } catch (const std::bad_alloc&) {
    team.failed = true;
  }
  team_barrier();
  if (team.failed) {
    if (!ws) throw std::bad_alloc();  // the others return: none waits at a barrier for this thread
    return;
  }
  compute_block_votes<true>(p, *ws, 0, 1, mine);
  int64_t pass = 0;
  const auto sum_over_team = [&](float* preactivation) {
    float* partial = team.partial.data() + (pass++ % 2) * count * JK;
    std::memcpy(partial + thread * JK, preactivation, JK * sizeof(float));
    team_barrier();
    for (int64_t jk = 0; jk < JK; ++jk) {
      float total = partial[jk];
      for (int other = 1; other < count; ++other) total += partial[other * JK + jk];
      preactivation[jk] = total;
    }
  };
  route_example(p, *ws, 0, p.coupling, nullptr, mine, sum_over_team);
  if (thread == 0) std::memcpy(p.poses, ws->poses.data(), JK * sizeof(float));
}

// Backward of Procedure 1 for example e of the workspace's block (b in the batch), given its routing record: the
// left/right factors of dL/du_hat and dL/dbias. One pass over the votes per iteration after the first: dL/dc,
// softmax backward, and dL/dv_(t-1) = sum_i dL/dlogits u_hat.
void backprop_example(const Problem& p, Workspace& ws, int64_t e, int64_t b,
                      const RoutingRecord& record, std::vector<float>& grad_poses,
                      std::vector<float>& grad_preactivation, std::vector<float>& grad_logits) {
  const int64_t I = p.inputs_per_example, J = p.parents, K = p.pose_dim, JK = J * K, P = p.padded_inputs;
  const float uniform = 1.0f / static_cast<float>(J + (p.leaky ? 1 : 0));
  const float* example_votes = ws.example_votes(p, e);
  const int64_t terms = gradient_terms(p), vectors = P / kLanes;
  float* left = p.left + b * J * terms * kLanes;  // term r, parent j, block v at ((v * B * J + j) * terms + r) * L
  float* right = p.right + b * terms * JK;
  float* grad_bias = p.grad_bias + b * JK;
  std::memcpy(grad_poses.data(), p.grad_poses + b * JK, JK * sizeof(float));
  std::fill(grad_bias, grad_bias + JK, 0.0f);
  std::fill(grad_logits.begin(), grad_logits.end(), 0.0f);
  int64_t term = 0;
  const auto add_term = [&](const float* left_factor, float left_constant, const float* right_factor) {
    for (int64_t v = 0; v < vectors; ++v)
      for (int64_t j = 0; j < J; ++j) {
        const Vec factor = left_factor ? load(left_factor + j * P + v * kLanes) : broadcast(left_constant);
        store(left + ((v * p.batch * J + j) * terms + term) * kLanes, factor);
      }
    std::memcpy(right + term * JK, right_factor, JK * sizeof(float));
    ++term;
  };
  for (int64_t iteration = p.iterations - 1; iteration >= 0; --iteration) {
    const bool last = iteration == p.iterations - 1;
    squash_backward(p, record.preactivations + iteration * JK, grad_poses.data(), grad_preactivation.data());
    for (int64_t jk = 0; jk < JK; ++jk) grad_bias[jk] += grad_preactivation[jk];
    const float* coupling = iteration > 0 ? record.couplings + (iteration - 1) * J * P : nullptr;
    if (last || !p.detach_inner_votes) add_term(coupling, uniform, grad_preactivation.data());
    if (iteration == 0) break;  // the first couplings come from constant zero logits
    // The forward's buffers, reused: broadcast_poses holds dL/ds_j, couplings dL/dc_ij, sums dL/dv_(t-1).
    for (int64_t jk = 0; jk < JK; ++jk) {
      ws.broadcast_poses[jk] = broadcast(grad_preactivation[jk]);
      ws.sums[jk] = Vec{};
    }
    const float* grad_coupling = last && p.grad_coupling ? p.grad_coupling + b * J * I : nullptr;
    for (int64_t v = 0; v < vectors; ++v) {
      const float* block_votes = example_votes + v * JK * kLanes;
      // dL/dc_ij = u_hat_{j|i} . dL/ds_j (+ the couplings' own gradient in the last iteration)
      Vec weighted{};  // sum_j c_ij dL/dc_ij
      for (int64_t j = 0; j < J; ++j) {
        const float* vote = block_votes + j * K * kLanes;
        Vec grad_c = load(vote) * ws.broadcast_poses[j * K];
        for (int64_t k = 1; k < K; ++k) grad_c += load(vote + k * kLanes) * ws.broadcast_poses[j * K + k];
        if (grad_coupling) {
          const int64_t lanes = std::min(kLanes, I - v * kLanes);
          for (int64_t lane = 0; lane < lanes; ++lane) grad_c[lane] += grad_coupling[j * I + v * kLanes + lane];
        }
        ws.couplings[j] = grad_c;
        weighted += load(coupling + j * P + v * kLanes) * grad_c;
      }
      // Softmax backward over the parents (the leak's share gets no gradient, so the same form holds), added to
      // the logits' gradient: the logits of iteration t hold u_hat . v_s for every s < t.
      for (int64_t j = 0; j < J; ++j) {
        float* grad_logit = grad_logits.data() + j * P + v * kLanes;
        const Vec updated = load(grad_logit) + load(coupling + j * P + v * kLanes) * (ws.couplings[j] - weighted);
        store(grad_logit, updated);
        const float* vote = block_votes + j * K * kLanes;
        for (int64_t k = 0; k < K; ++k) ws.sums[j * K + k] += updated * load(vote + k * kLanes);
      }
    }
    // dL/dv_(t-1) = sum_i dL/dlogits_ij u_hat_{j|i}: v_(t-1) enters every later iteration's logits.
    for (int64_t jk = 0; jk < JK; ++jk) grad_poses[jk] = lane_sum(ws.sums[jk]);
    if (!p.detach_inner_votes) add_term(grad_logits.data(), 0.0f, record.poses + (iteration - 1) * JK);
  }
}

// Recomputes the votes of blocks first_block, first_block + stride, ... and backpropagates through their routing.
void backprop_blocks(const Problem& p, int64_t first_block, int64_t stride) {
  const int64_t J = p.parents, JK = J * p.pose_dim, P = p.padded_inputs, block = p.examples_per_block;
  Workspace ws(p, false);
  std::vector<float> grad_poses(JK), grad_preactivation(JK), grad_logits(J * P);
  const int64_t num_blocks = (p.batch + block - 1) / block;
  for (int64_t block_index = first_block; block_index < num_blocks; block_index += stride) {
    const int64_t first = block_index * block, count = std::min(block, p.batch - first);
    compute_block_votes<false>(p, ws, first, count, all_blocks(p));
    for (int64_t e = 0; e < count; ++e)
      backprop_example(p, ws, e, first + e, example_record(p, first + e), grad_poses, grad_preactivation,
                       grad_logits);
  }
}

// The second phase works through the batch kChunk examples at a time and, within a chunk, parent by parent, so that
// the chunk's dL/du_hat and inputs and the parent's weight stay in L1 and the block's dL/dW [J, K, A] in L2, and the
// factors are read in their order in memory; kTile* are how many k (or examples) one register tile spans: with
// AVX-512's 32 registers twice what AVX2's 16 allow.
constexpr int64_t kChunk = 8;
constexpr int64_t kTileVote = kLanes == 16 ? 16 : 8;   // k of dL/du_hat per register tile
constexpr int64_t kTileWeight = kLanes == 16 ? 2 : 1;  // k of dL/dW per register tile (x A)
constexpr int64_t kTileInput = kLanes == 16 ? 2 : 1;   // examples of dL/du per register tile (x A)

// dL/du and dL/dW of input block v (kLanes input capsules) from the factors of dL/du_hat: with gv[b, j, k] =
// dL/du_hat[b, j, i, k] = sum_r left_r[b, j, i] right_r[b, j, k], dL/du[b, i, a] = sum_jk W[i, j, k, a] gv[b, j, k]
// and dL/dW[i, j, k, a] = sum_b gv[b, j, k] u[b, i, a]. grad_vote [kChunk, K], grad_u [B, A] and grad_w [J, K, A]
// are scratch. kInputDim as in capsule_votes: with it, every tile's A accumulators are registers. kPairedWeight: the
// packed weight holds bf16 pairs (bf16_votes), read back as floats.
template <int64_t kInputDim, bool kPairedWeight>
void block_input_and_weight_gradients(const Problem& p, int64_t v, Vec* grad_vote, Vec* grad_u, Vec* grad_w) {
  const int64_t B = p.batch, I = p.inputs_per_example, J = p.parents, K = p.pose_dim;
  const int64_t A = kInputDim > 0 ? kInputDim : p.input_dim, R = gradient_terms(p);
  constexpr int64_t width = kInputDim > 0 ? kInputDim : 1;  // a per register tile
  const float* inputs = p.packed_inputs + v * B * A * kLanes;  // u[b, a] at (b * A + a) * kLanes
  std::fill(grad_w, grad_w + J * K * A, Vec{});
  for (int64_t first = 0; first < B; first += kChunk) {
    const int64_t count = std::min(kChunk, B - first);
    Vec* chunk_grad_u = grad_u + first * A;
    std::fill(chunk_grad_u, chunk_grad_u + count * A, Vec{});
    for (int64_t j = 0; j < J; ++j) {
      const int64_t words = kPairedWeight ? pair_words(p) : A;  // per k
      const float* weight = p.packed_weight + (v * J + j) * K * words * kLanes;
      const auto weight_vector_at = [&](int64_t k, int64_t a) {
        if constexpr (kPairedWeight)
          return load_pair_half(reinterpret_cast<const uint32_t*>(weight) + (k * words + a / 2) * kLanes, a % 2);
        else
          return load(weight + (k * A + a) * kLanes);
      };
      Vec* parent_grad_w = grad_w + j * K * A;
      for (int64_t e = 0; e < count; ++e) {
        const float* left = p.left + ((v * B + first + e) * J + j) * R * kLanes;  // term r at left + r * kLanes
        const float* right = p.right + ((first + e) * R * J + j) * K;            // term r at right + r * J * K
        for (int64_t k0 = 0; k0 < K; k0 += kTileVote) {
          Vec sum[kTileVote] = {};
          for (int64_t r = 0; r < R; ++r) {
            const Vec factor = load(left + r * kLanes);
            for (int64_t t = 0; t < kTileVote; ++t)
              if (k0 + t < K) sum[t] += factor * right[r * J * K + k0 + t];
          }
          for (int64_t t = 0; t < kTileVote; ++t)
            if (k0 + t < K) grad_vote[e * K + k0 + t] = sum[t];
        }
      }
      for (int64_t k0 = 0; k0 < K; k0 += kTileWeight)
        for (int64_t a0 = 0; a0 < A; a0 += width) {
          Vec total[kTileWeight][width] = {};
          for (int64_t e = 0; e < count; ++e) {
            const float* u = inputs + ((first + e) * A + a0) * kLanes;
            for (int64_t w = 0; w < width; ++w) {
              const Vec input = load(u + w * kLanes);
              for (int64_t t = 0; t < kTileWeight; ++t)
                if (k0 + t < K) total[t][w] += grad_vote[e * K + k0 + t] * input;
            }
          }
          for (int64_t t = 0; t < kTileWeight; ++t)
            if (k0 + t < K)
              for (int64_t w = 0; w < width; ++w) parent_grad_w[(k0 + t) * A + a0 + w] += total[t][w];
        }
      for (int64_t e0 = 0; e0 < count; e0 += kTileInput)
        for (int64_t a0 = 0; a0 < A; a0 += width) {
          Vec total[kTileInput][width] = {};
          for (int64_t k = 0; k < K; ++k)
            for (int64_t w = 0; w < width; ++w) {
              const Vec weight_vector = weight_vector_at(k, a0 + w);
              for (int64_t t = 0; t < kTileInput; ++t)
                if (e0 + t < count) total[t][w] += weight_vector * grad_vote[(e0 + t) * K + k];
            }
          for (int64_t t = 0; t < kTileInput; ++t)
            if (e0 + t < count)
              for (int64_t w = 0; w < width; ++w) chunk_grad_u[(e0 + t) * A + a0 + w] += total[t][w];
        }
    }
  }
  // lane by lane into W's and u's own layouts: dW[i, j] is K * A floats in a row, dL/du[b, i] A floats
  const int64_t lanes = std::min(kLanes, I - v * kLanes);
  for (int64_t lane = 0; lane < lanes; ++lane) {
    float* row = p.grad_weight + (v * kLanes + lane) * J * K * A;
    for (int64_t jka = 0; jka < J * K * A; ++jka) row[jka] = grad_w[jka][lane];
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t a = 0; a < A; ++a)
      for (int64_t lane = 0; lane < lanes; ++lane)
        p.grad_inputs[(b * I + v * kLanes + lane) * A + a] = grad_u[b * A + a][lane];
}

// Input blocks first_vector, first_vector + stride, ... of block_input_and_weight_gradients.
void input_and_weight_gradients(const Problem& p, int64_t first_vector, int64_t stride) {
  std::vector<Vec> grad_vote(kChunk * p.pose_dim), grad_u(p.batch * p.input_dim);
  std::vector<Vec> grad_w(p.parents * p.pose_dim * p.input_dim);
  const auto run = [&](auto block_gradients) {
    for (int64_t v = first_vector; v < p.padded_inputs / kLanes; v += stride)
      block_gradients(p, v, grad_vote.data(), grad_u.data(), grad_w.data());
  };
  if (p.input_dim == 8)
    run(p.bf16_votes ? block_input_and_weight_gradients<8, true> : block_input_and_weight_gradients<8, false>);
  else
    run(p.bf16_votes ? block_input_and_weight_gradients<0, true> : block_input_and_weight_gradients<0, false>);
}

// packed_weight of input blocks first_vector, first_vector + stride, ... from weight (capsnet_pack_weight), as floats
// or bf16 pairs; the padding capsules' lanes are zero.
void pack_weight_blocks(const Problem& p, int64_t first_vector, int64_t stride) {
  const int64_t I = p.inputs_per_example, A = p.input_dim, JK = p.parents * p.pose_dim, JKA = JK * A;
  const int64_t words = p.bf16_votes ? pair_words(p) : A;  // per (block, jk) and lane
  for (int64_t v = first_vector; v < p.padded_inputs / kLanes; v += stride) {
    const int64_t lanes = std::min(kLanes, I - v * kLanes);
    const float* rows = p.weight + v * kLanes * JKA;  // lane's row at rows + lane * JKA
    for (int64_t jk = 0; jk < JK; ++jk)
      pack_tile(rows + jk * A, JKA, lanes, A, p.bf16_votes, p.packed_weight + (v * JK + jk) * words * kLanes);
  }
}

// packed_inputs of input blocks first_vector, first_vector + stride, ... from inputs (the backward's), rounded to
// bf16 with bf16_votes (dL/dW = dL/du_hat times the inputs the votes used); the padding capsules' lanes are zero.
void pack_input_blocks(const Problem& p, int64_t first_vector, int64_t stride) {
  const int64_t I = p.inputs_per_example, A = p.input_dim;
  for (int64_t v = first_vector; v < p.padded_inputs / kLanes; v += stride) {
    const int64_t lanes = std::min(kLanes, I - v * kLanes);
    for (int64_t b = 0; b < p.batch; ++b) {
      float* target = p.packed_inputs + (v * p.batch + b) * A * kLanes;
      pack_tile(p.inputs + (b * I + v * kLanes) * A, A, lanes, A, false, target);
      if (p.bf16_votes)
        for (int64_t a = 0; a < A; ++a) store(target + a * kLanes, round_to_bf16(load(target + a * kLanes)));
    }
  }
}

constexpr const char* kOutOfMemory = "out of memory for the kernel's per-thread buffers";

// Runs body(thread, threads) on `threads` OpenMP threads; returns what one of them threw, or null. An exception must
// not leave an OpenMP region (nor the C ABI): either ends the process.
template <typename Body>
const char* run_parallel(int threads, Body body) {
  std::atomic<const char*> error{nullptr};
  const auto guarded = [&](int thread, int count) {
    try {
      body(thread, count);
    } catch (const std::bad_alloc&) {
      error = kOutOfMemory;
    } catch (...) {
      error = "unexpected C++ exception in the kernel";
    }
  };
#ifdef _OPENMP
  // Built with -fopenmp, this shares the process's OpenMP runtime (torch's libgomp on Linux) and its threads.
#pragma omp parallel num_threads(threads)
  guarded(omp_get_thread_num(), omp_get_num_threads());
#else
  (void)threads;
  guarded(0, 1);
#endif
  return error;
}

// Why the kernel cannot run this call, or null. Sizes zero or below would index empty buffers; an empty batch is
// fine (nothing to route, the weight's gradient is zero).
const char* invalid_call(const Problem* p, bool backward) {
  if (!p) return "no arguments";
  if (p->batch < 0) return "the batch size is negative";
  if (p->inputs_per_example < 1) return "there are no input capsules";
  if (p->input_dim < 1) return "the input capsules' dimension is not positive";
  if (p->parents < 1) return "there are no class capsules";
  if (p->pose_dim < 1) return "the class capsules' dimension is not positive";
  if (p->padded_inputs != (p->inputs_per_example + kLanes - 1) / kLanes * kLanes)
    return "padded_inputs is not the number of input capsules rounded up to whole vectors";
  if (p->iterations < 1) return "routing needs at least one iteration";
  if (p->examples_per_block < 1 || p->threads < 1) return "examples_per_block and threads must be positive";
  if (!(p->epsilon >= 0.0f)) return "epsilon must be zero or positive";
  if (p->bf16_votes && !CAPSNET_BF16_VOTES) return "this build has no bf16 votes (they need AVX-512 and AVX512-BF16)";
  if (!p->weight || !p->packed_weight) return "the weight or its packed buffer is missing";
  if (!backward) {
    if (p->batch > 0 && (!p->inputs || !p->poses || !p->coupling)) return "an input or output buffer is missing";
  } else {
    if (!p->grad_weight) return "the weight's gradient buffer is missing";
    if (p->batch > 0 && (!p->inputs || !p->packed_inputs || !p->grad_poses || !p->grad_inputs || !p->grad_bias ||
                         !p->left || !p->right))
      return "an input, gradient or scratch buffer is missing";
    if (p->batch > 0 && !p->record) return "the forward's routing record is missing";
  }
  return nullptr;
}

}  // namespace

// The primary capsules' arguments (B = batch, N = types, A = capsule_dim, M = positions, the conv grid's H * W).
struct CapsnetPrimaryCall {
  const float* conv;           // [B, N * A, M]: the primary convolution's output, without bias
  const float* bias;           // [N, A] or null
  float* capsules;             // [B, N * M, A]: u = squash(scale * conv + bias) (Eq. 1), type-major: i = n * M + m
  const float* grad_capsules;  // [B, N * M, A]
  float* grad_conv;            // [B, N * A, M]
  float* grad_bias;            // [B, N, A]: each example's share, or null
  int64_t batch, types, capsule_dim, positions;
  int32_t threads;
  float scale, epsilon;
};

namespace {

// One capsule type of one example (a group: M capsules of dimension A) at a time, in loops over the M positions
// that the compiler vectorises: s [A, M] = scale * conv + bias in float (maybe fused, so not bitwise the torch
// path's), then |s|^2 per position in double, which no float32 input overflows (the torch path scales by a power
// of two instead).
struct PrimaryGroup {
  explicit PrimaryGroup(const CapsnetPrimaryCall& p)
      : A(p.capsule_dim), M(p.positions), s(A * M), squared_norm(M) {}

  void load(const CapsnetPrimaryCall& p, int64_t group) {
    const int64_t n = group % p.types;
    for (int64_t a = 0; a < A; ++a) {
      const float* conv = p.conv + (group * A + a) * M;
      const float bias = p.bias ? p.bias[n * A + a] : 0.0f;
      for (int64_t m = 0; m < M; ++m) s[a * M + m] = conv[m] * p.scale + bias;
    }
    std::fill(squared_norm.begin(), squared_norm.end(), 0.0);
    for (int64_t a = 0; a < A; ++a)
      for (int64_t m = 0; m < M; ++m) squared_norm[m] += static_cast<double>(s[a * M + m]) * s[a * M + m];
  }

  const int64_t A, M;
  std::vector<float> s;               // [A, M]
  std::vector<double> squared_norm;  // [M]
};

// Eq. 1, v = f(n) s with n = |s|^2 and f(n) = n / ((1 + n) sqrt(n + eps)), for groups first, first + stride, ...
void squash_primary_groups(const CapsnetPrimaryCall& p, int64_t first, int64_t stride) {
  PrimaryGroup work(p);
  const int64_t A = work.A, M = work.M;
  std::vector<double> factor(M);
  for (int64_t group = first; group < p.batch * p.types; group += stride) {
    work.load(p, group);
    for (int64_t m = 0; m < M; ++m) factor[m] = squash_factor<double>(work.squared_norm[m], p.epsilon);
    float* capsules = p.capsules + group * M * A;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t a = 0; a < A; ++a) capsules[m * A + a] = static_cast<float>(work.s[a * M + m] * factor[m]);
  }
}

// dL/dconv and each example's dL/dbias from dL/du, as squash_backward above (in double).
void squash_primary_groups_backward(const CapsnetPrimaryCall& p, int64_t first, int64_t stride) {
  PrimaryGroup work(p);
  const int64_t A = work.A, M = work.M;
  std::vector<float> g(A * M);  // the capsules' gradient, transposed to [A, M]
  std::vector<double> radial(M), along_grad(M), along_s(M);
  for (int64_t group = first; group < p.batch * p.types; group += stride) {
    work.load(p, group);
    const float* grad_capsules = p.grad_capsules + group * M * A;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t a = 0; a < A; ++a) g[a * M + m] = grad_capsules[m * A + a];
    std::fill(radial.begin(), radial.end(), 0.0);
    for (int64_t a = 0; a < A; ++a)
      for (int64_t m = 0; m < M; ++m) radial[m] += static_cast<double>(g[a * M + m]) * work.s[a * M + m];
    // dL/ds = f(n) dL/dv + 2 f'(n) (dL/dv . s) s = along_grad dL/dv + along_s s
    for (int64_t m = 0; m < M; ++m) {
      const SquashSlopes<double> slopes = squash_slopes<double>(work.squared_norm[m], p.epsilon);
      along_grad[m] = slopes.factor;
      along_s[m] = 2.0 * slopes.derivative * radial[m];
    }
    float* grad_bias = p.grad_bias ? p.grad_bias + group * A : nullptr;
    for (int64_t a = 0; a < A; ++a) {
      float* grad_conv = p.grad_conv + (group * A + a) * M;
      double bias_sum = 0.0;
      for (int64_t m = 0; m < M; ++m) {
        const double grad_s = along_grad[m] * g[a * M + m] + along_s[m] * work.s[a * M + m];
        grad_conv[m] = static_cast<float>(grad_s * p.scale);
        bias_sum += grad_s;
      }
      if (grad_bias) grad_bias[a] = static_cast<float>(bias_sum);
    }
  }
}

const char* invalid_primary_call(const CapsnetPrimaryCall* p, bool backward) {
  if (!p) return "no arguments";
  if (p->batch < 0) return "the batch size is negative";
  if (p->types < 1 || p->capsule_dim < 1 || p->positions < 1)
    return "the capsule types, their dimension and the positions must be positive";
  if (p->threads < 1) return "threads must be positive";
  if (!(p->epsilon >= 0.0f)) return "epsilon must be zero or positive";
  if (p->batch > 0 && !p->conv) return "the convolution's output is missing";
  if (p->batch > 0 && !backward && !p->capsules) return "the capsules' buffer is missing";
  if (p->batch > 0 && backward && (!p->grad_capsules || !p->grad_conv))
    return "a gradient buffer is missing";
  return nullptr;
}

}  // namespace

extern "C" int capsnet_lanes() { return kLanes; }

// Floats of one example's routing record (the forward's record is [B, this]).
extern "C" int64_t capsnet_record_floats(int64_t parents, int64_t pose_dim, int64_t padded, int64_t iterations) {
  return record_floats(parents, pose_dim, padded, iterations);
}

// 1 if this build computes bf16 votes (bf16_votes), else 0.
extern "C" int capsnet_bf16_votes() { return CAPSNET_BF16_VOTES; }

extern "C" int capsnet_threaded() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// "name:offset:size" of every field of an argument struct, then "size:<sizeof>": the loader compares it with its
// ctypes mirror, so that the two cannot drift apart silently. Null for an unknown struct name.
#define CAPSNET_FIELD(type, name) \
  #name ":" + std::to_string(offsetof(type, name)) + ":" + std::to_string(sizeof(type::name)) + ";"
extern "C" const char* capsnet_call_layout(const char* struct_name) {
#define F(name) CAPSNET_FIELD(CapsnetRoutingCall, name)
  static const std::string routing =
      std::string() + F(inputs) + F(packed_inputs) + F(weight) + F(packed_weight) + F(bias) + F(poses) +
      F(coupling) + F(record) + F(grad_poses) + F(grad_coupling) + F(grad_inputs) + F(grad_weight) + F(grad_bias) +
      F(left) + F(right) + F(batch) + F(inputs_per_example) + F(input_dim) + F(parents) + F(pose_dim) +
      F(padded_inputs) + F(iterations) + F(examples_per_block) + F(leaky) + F(detach_inner_votes) + F(bf16_votes) + F(threads) +
      F(epsilon) + "size:" + std::to_string(sizeof(CapsnetRoutingCall));
#undef F
#define F(name) CAPSNET_FIELD(CapsnetPrimaryCall, name)
  static const std::string primary =
      std::string() + F(conv) + F(bias) + F(capsules) + F(grad_capsules) + F(grad_conv) + F(grad_bias) + F(batch) +
      F(types) + F(capsule_dim) + F(positions) + F(threads) + F(scale) + F(epsilon) +
      "size:" + std::to_string(sizeof(CapsnetPrimaryCall));
#undef F
  const std::string name = struct_name ? struct_name : "";
  if (name == "CapsnetRoutingCall") return routing.c_str();
  if (name == "CapsnetPrimaryCall") return primary.c_str();
  return nullptr;
}
#undef CAPSNET_FIELD

// The weight re-laid out for capsnet_route and capsnet_route_backward (weight -> packed_weight; the batch and the
// other buffers are not read). An entry point of its own, so that a compiled graph with a constant weight can run it
// once. Null, or why it did not run.
extern "C" const char* capsnet_pack_weight(const CapsnetRoutingCall* call) {
  if (const char* error = invalid_call(call, false)) return error;
  return run_parallel(call->threads, [&](int thread, int count) { pack_weight_blocks(*call, thread, count); });
}

// Poses and last couplings of a batch (inputs, packed_weight, bias -> poses, coupling, and with record not null what
// its backward reads). Null, or why it did not run.
extern "C" const char* capsnet_route(const CapsnetRoutingCall* call) {
  if (const char* error = invalid_call(call, false)) return error;
  if (call->batch == 1 && !call->record && call->threads > 1) {
    std::unique_ptr<TeamSums> team;
    try {
      team = std::make_unique<TeamSums>(*call);
    } catch (const std::bad_alloc&) {
      return kOutOfMemory;
    }
    return run_parallel(call->threads,
                        [&](int thread, int count) { route_one_example_on_team(*call, thread, count, *team); });
  }
  return run_parallel(call->threads, [&](int thread, int count) { route_blocks(*call, thread, count); });
}

// Gradients of capsnet_route's poses and couplings (grad_poses, grad_coupling) w.r.t. the inputs, the weight and the
// bias (per example), from inputs, bias, packed_weight (capsnet_pack_weight) and the forward's record; recomputes the
// votes. Null, or why it did not run.
extern "C" const char* capsnet_route_backward(const CapsnetRoutingCall* call) {
  if (const char* error = invalid_call(call, true)) return error;
  if (const char* error =
          run_parallel(call->threads, [&](int thread, int count) { pack_input_blocks(*call, thread, count); }))
    return error;
  if (const char* error = run_parallel(call->threads, [&](int thread, int count) {
        backprop_blocks(*call, thread, count);
      }))
    return error;
  return run_parallel(call->threads,
                      [&](int thread, int count) { input_and_weight_gradients(*call, thread, count); });
}

// The primary capsules u [B, N * M, A] from the convolution's output (conv, bias -> capsules). Null, or why not.
extern "C" const char* capsnet_squash_primary(const CapsnetPrimaryCall* call) {
  if (const char* error = invalid_primary_call(call, false)) return error;
  return run_parallel(call->threads, [&](int thread, int count) { squash_primary_groups(*call, thread, count); });
}

// Gradients of capsnet_squash_primary's capsules (grad_capsules) w.r.t. conv and, if grad_bias is set, the bias (per
// example). Null, or why it did not run.
extern "C" const char* capsnet_squash_primary_backward(const CapsnetPrimaryCall* call) {
  if (const char* error = invalid_primary_call(call, true)) return error;
  return run_parallel(call->threads,
                      [&](int thread, int count) { squash_primary_groups_backward(*call, thread, count); });
}
