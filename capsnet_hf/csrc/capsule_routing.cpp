// Class capsules for CPU inference: votes (Eq. 2) and routing-by-agreement (Procedure 1) in one pass per iteration.
//
// Built and loaded by capsnet_hf/cpu_routing_kernel.py (plain C ABI through ctypes, no torch headers). The torch
// formulation writes the votes of a batch to memory and streams them 2 x iterations - 1 times; here each thread
// computes the votes of a few examples into its own buffer, laid out so that 8 input capsules fill one vector
// register, and then routes each example with one pass per iteration after the first: agreement with v_j,
// softmax over the parents and the next weighted sum s_j, for 8 input capsules at a time. Float32 throughout;
// results differ from the torch path by float rounding only (summation order, a polynomial exp).
//
// Layouts (L = 8 lanes, P = I rounded up to a multiple of L, padding capsules have zero votes):
//   inputs    [B, I, A]          primary capsules u_i
//   weight    [P / L, J, K, A, L] W[i, j, k, a] with i = block * L + lane
//   bias      [J, K] or null     added to every s_j
//   poses     [B, J, K]          v_j of the last iteration (output)
//   coupling  [B, J, I]          c_ij of the last iteration (output)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* source) {
  Vec value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

inline void store(float* target, Vec value) { std::memcpy(target, &value, sizeof(value)); }

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

struct Problem {
  const float* inputs;
  const float* weight;
  const float* bias;
  float* poses;
  float* coupling;
  int64_t batch, inputs_per_example, input_dim, parents, pose_dim, padded_inputs, iterations;
  bool leaky;
  float epsilon;
  int64_t examples_per_block;
};

// Adds the bias to s (in place) and writes v = squash(s) (Eq. 1), for every parent.
void squash(const Problem& p, float* preactivation, float* poses) {
  for (int64_t j = 0; j < p.parents; ++j) {
    float* s = preactivation + j * p.pose_dim;
    float squared_norm = 0.0f;
    for (int64_t k = 0; k < p.pose_dim; ++k) {
      if (p.bias) s[k] += p.bias[j * p.pose_dim + k];
      squared_norm += s[k] * s[k];
    }
    const float scale = squared_norm / ((1.0f + squared_norm) * std::sqrt(squared_norm + p.epsilon));
    for (int64_t k = 0; k < p.pose_dim; ++k) poses[j * p.pose_dim + k] = s[k] * scale;
  }
}

// Votes of kLanes input capsules: out[jk] = sum_a weight[jk, a] u[a] for jk < count, also added to first_sum[jk].
// kInputDim > 0 fixes the input capsules' dimension at compile time (8 in the paper), which keeps u in registers.
template <int64_t kInputDim>
void capsule_votes(const float* weight, const float* u, int64_t input_dim, int64_t count, float* out,
                   Vec* first_sum) {
  const int64_t A = kInputDim > 0 ? kInputDim : input_dim;
  Vec inputs[kInputDim > 0 ? kInputDim : 1];
  if constexpr (kInputDim > 0)
    for (int64_t a = 0; a < kInputDim; ++a) inputs[a] = load(u + a * kLanes);
  for (int64_t jk = 0; jk < count; ++jk) {
    const float* w = weight + jk * A * kLanes;
    Vec vote{};
    if constexpr (kInputDim > 0) {
      for (int64_t a = 0; a < kInputDim; ++a) vote += load(w + a * kLanes) * inputs[a];
    } else {
      for (int64_t a = 0; a < A; ++a) vote += load(w + a * kLanes) * load(u + a * kLanes);
    }
    store(out + jk * kLanes, vote);
    first_sum[jk] += vote;
  }
}

// Routes blocks first_block, first_block + stride, ... of examples_per_block examples each.
void route_blocks(const Problem& p, int64_t first_block, int64_t stride) {
  const int64_t I = p.inputs_per_example, A = p.input_dim, J = p.parents, K = p.pose_dim, JK = J * K;
  const int64_t vectors = p.padded_inputs / kLanes, block = p.examples_per_block;
  const float uniform = 1.0f / static_cast<float>(J + (p.leaky ? 1 : 0));
  // Per example: inputs [P / L, A, L], votes [P / L, J, K, L], first weighted sum [J * K] (lanes not yet added).
  std::vector<float> inputs(block * A * p.padded_inputs, 0.0f);
  std::unique_ptr<float[]> votes(new float[block * JK * p.padded_inputs]);  // written before read: not zeroed
  std::vector<Vec> first_sums(block * JK), sums(JK), broadcast_poses(JK), couplings(J);
  std::vector<float> logits(J * p.padded_inputs), preactivation(JK), poses(JK);
  const int64_t num_blocks = (p.batch + block - 1) / block;
  for (int64_t block_index = first_block; block_index < num_blocks; block_index += stride) {
    const int64_t first = block_index * block, count = std::min(block, p.batch - first);
    for (int64_t e = 0; e < count; ++e) {
      const float* source = p.inputs + (first + e) * I * A;
      float* target = inputs.data() + e * A * p.padded_inputs;
      for (int64_t i = 0; i < I; ++i)
        for (int64_t a = 0; a < A; ++a) target[((i / kLanes) * A + a) * kLanes + i % kLanes] = source[i * A + a];
    }
    // Votes u_hat[i, j, k] = sum_a W[i, j, k, a] u[i, a] (Eq. 2); each weight vector serves the whole block.
    std::fill(first_sums.begin(), first_sums.end(), Vec{});
    for (int64_t v = 0; v < vectors; ++v) {
      const float* weight = p.weight + v * JK * A * kLanes;
      for (int64_t e = 0; e < count; ++e) {
        const float* u = inputs.data() + e * A * p.padded_inputs + v * A * kLanes;
        float* out = votes.get() + e * JK * p.padded_inputs + v * JK * kLanes;
        Vec* first_sum = first_sums.data() + e * JK;
        if (A == 8)
          capsule_votes<8>(weight, u, A, JK, out, first_sum);
        else
          capsule_votes<0>(weight, u, A, JK, out, first_sum);
      }
    }
    for (int64_t e = 0; e < count; ++e) {
      const float* example_votes = votes.get() + e * JK * p.padded_inputs;
      float* coupling = p.coupling + (first + e) * J * I;
      // First iteration: zero logits, uniform couplings 1/J (1/(J + 1) with the leak).
      for (int64_t jk = 0; jk < JK; ++jk) preactivation[jk] = lane_sum(first_sums[e * JK + jk]) * uniform;
      squash(p, preactivation.data(), poses.data());
      if (p.iterations == 1) std::fill(coupling, coupling + J * I, uniform);
      for (int64_t iteration = 1; iteration < p.iterations; ++iteration) {
        const bool last = iteration == p.iterations - 1;
        for (int64_t jk = 0; jk < JK; ++jk) {
          broadcast_poses[jk] = broadcast(poses[jk]);
          sums[jk] = Vec{};
        }
        for (int64_t v = 0; v < vectors; ++v) {
          const float* block_votes = example_votes + v * JK * kLanes;
          // b_ij += u_hat_{j|i} . v_j, then Eq. 3 over the parents (with the leak: a parent with logit 0).
          Vec maximum = p.leaky ? Vec{} : broadcast(-INFINITY);
          for (int64_t j = 0; j < J; ++j) {
            const float* vote = block_votes + j * K * kLanes;
            Vec agreement = load(vote) * broadcast_poses[j * K];
            for (int64_t k = 1; k < K; ++k) agreement += load(vote + k * kLanes) * broadcast_poses[j * K + k];
            float* logit = logits.data() + j * p.padded_inputs + v * kLanes;
            const Vec updated = iteration == 1 ? agreement : load(logit) + agreement;
            store(logit, updated);
            couplings[j] = updated;
            maximum = updated > maximum ? updated : maximum;
          }
          Vec total = p.leaky ? exp_nonpositive(-maximum) : Vec{};
          for (int64_t j = 0; j < J; ++j) {
            couplings[j] = exp_nonpositive(couplings[j] - maximum);
            total += couplings[j];
          }
          const Vec inverse = 1.0f / total;
          // s_j += c_ij u_hat_{j|i} (Eq. 2)
          for (int64_t j = 0; j < J; ++j) {
            const Vec c = couplings[j] * inverse;
            const float* vote = block_votes + j * K * kLanes;
            for (int64_t k = 0; k < K; ++k) sums[j * K + k] += c * load(vote + k * kLanes);
            if (last) {
              const int64_t lanes = std::min(kLanes, I - v * kLanes);
              for (int64_t lane = 0; lane < lanes; ++lane) coupling[j * I + v * kLanes + lane] = c[lane];
            }
          }
        }
        for (int64_t jk = 0; jk < JK; ++jk) preactivation[jk] = lane_sum(sums[jk]);
        squash(p, preactivation.data(), poses.data());
      }
      std::memcpy(p.poses + (first + e) * JK, poses.data(), JK * sizeof(float));
    }
  }
}

}  // namespace

extern "C" int capsnet_lanes() { return kLanes; }

extern "C" int capsnet_threaded() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

extern "C" void capsnet_route(const float* inputs, const float* weight, const float* bias, float* poses,
                              float* coupling, int64_t batch, int64_t inputs_per_example, int64_t input_dim,
                              int64_t parents, int64_t pose_dim, int64_t padded_inputs, int64_t iterations,
                              int leaky, float epsilon, int64_t examples_per_block, int threads) {
  const Problem problem{inputs,    weight,     bias,          poses,         coupling,   batch,
                        inputs_per_example, input_dim, parents, pose_dim, padded_inputs, iterations,
                        leaky != 0, epsilon, examples_per_block};
#ifdef _OPENMP
  // Built with -fopenmp, this shares the process's OpenMP runtime (torch's libgomp on Linux) and its threads.
#pragma omp parallel num_threads(threads)
  route_blocks(problem, omp_get_thread_num(), omp_get_num_threads());
#else
  (void)threads;
  route_blocks(problem, 0, 1);
#endif
}
