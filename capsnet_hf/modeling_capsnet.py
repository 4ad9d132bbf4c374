"""PyTorch CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017).

Equation numbers refer to the paper. Shapes: B batch, C/H/W image, I input (primary) capsules, J output (class)
capsules, A primary-capsule dimension (8), K class-capsule dimension (16), M ensemble members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_capsnet import CapsNetConfig, tf_same_padding

LOGIT_EPSILON = 1e-6


def squash(inputs: torch.Tensor, dim: int = -1, epsilon: float = 1e-9) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, in float32 whatever the input dtype.

    `epsilon` sits under the square root so that the value and the gradient are finite (zero) at s = 0. s is first
    divided by a power of two S >= 1 near its largest entry, and Eq. 1 rewritten in s / S: scaling by a power of two is
    exact, so the result is bitwise the plain formula's, which overflows to NaN once |s|^2 leaves float32's range.
    """
    inputs = inputs.float()
    exponent = torch.log2(inputs.detach().abs().amax(dim, keepdim=True).clamp(min=1.0)).ceil().clamp(max=126.0)
    inverse_square = torch.exp2(-2.0 * exponent)  # 1 / S^2
    scaled = inputs / torch.exp2(exponent)
    squared_norm = scaled.pow(2).sum(dim, keepdim=True)
    return scaled * (
        squared_norm / ((inverse_square + squared_norm) * torch.sqrt(squared_norm + epsilon * inverse_square))
    )


def capsule_length(capsules: torch.Tensor, dim: int = -1, epsilon: float = 1e-9) -> torch.Tensor:
    """|v|: the probability that a capsule's entity is present, in float32, finite gradient at 0."""
    return torch.sqrt(capsules.float().pow(2).sum(dim) + epsilon)


def routing_softmax(logits: torch.Tensor, dim: int, leaky: bool) -> torch.Tensor:
    """Eq. 3, softmax over the parent capsules. With `leaky`, a parent with logit 0 is added and its share dropped."""
    if not leaky:
        return torch.softmax(logits, dim=dim)
    # softmax over [0, logits] without materialising the concatenation; the shift keeps exp() <= 1.
    shift = logits.detach().amax(dim, keepdim=True).clamp(min=0.0)
    exponentials = torch.exp(logits - shift)
    return exponentials / (exponentials.sum(dim, keepdim=True) + torch.exp(-shift))


def _squash_backward(preactivations: torch.Tensor, grad_poses: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gradient of Eq. 1 (`squash` over the last dim) w.r.t. s, given the gradient w.r.t. v; float32.

    v = f(n) s with n = |s|^2 and f(n) = n / ((1 + n) sqrt(n + eps)), so
    dL/ds = f(n) dL/dv + 2 f'(n) (dL/dv . s) s with f'(n) = (1 / (1 + n) - n / (2 (n + eps))) / ((1 + n) sqrt(n + eps)).
    """
    preactivations = preactivations.float()
    squared_norm = preactivations.pow(2).sum(-1, keepdim=True)
    inverse = 1.0 / ((1.0 + squared_norm) * torch.sqrt(squared_norm + epsilon))
    slope = inverse * (1.0 / (1.0 + squared_norm) - 0.5 * squared_norm / (squared_norm + epsilon))
    radial = (grad_poses * preactivations).sum(-1, keepdim=True)
    return (squared_norm * inverse) * grad_poses + (2.0 * slope * radial) * preactivations


class _DynamicRouting(torch.autograd.Function):
    """Procedure 1 with a hand-written backward; see `dynamic_routing` for the arguments.

    Every routing step reads the votes [B, J, I, K] once with a batched vector-matrix product, so the forward is
    2 x iterations - 1 passes over them. Autograd would write a votes-sized gradient (and add it up) for each of
    those products; here every term of dL/du_hat is rank one per (example, parent), c_ij g_j or G_ij v_j, so the
    backward keeps the [B, J, I] and [B, J, K] factors and writes dL/du_hat with a single batched matmul.
    """

    @staticmethod
    def forward(ctx, votes, bias, num_iterations, leaky, detach_inner_votes, epsilon):
        batch_size, num_parents, num_children, dim = votes.shape
        flat_votes = votes.view(batch_size * num_parents, num_children, dim)
        couplings, preactivations, poses = [], [], []
        # Zero logits (first iteration) give uniform couplings, 1/J or 1/(J + 1) with the leak.
        coupling = votes.new_full(
            (batch_size, num_parents, num_children), 1.0 / (num_parents + int(leaky)), dtype=torch.float32
        )
        logits = None
        for iteration in range(num_iterations):
            if logits is not None:
                coupling = routing_softmax(logits, dim=1, leaky=leaky)
            # s_j = sum_i c_ij u_hat_{j|i} (Eq. 2): [BJ, 1, I] @ [BJ, I, K]
            preactivation = torch.bmm(coupling.view(-1, 1, num_children).to(votes.dtype), flat_votes)
            preactivation = preactivation.view(batch_size, num_parents, dim)
            if bias is not None:
                preactivation = preactivation + bias
            pose = squash(preactivation, epsilon=epsilon)
            couplings.append(coupling)
            preactivations.append(preactivation)
            poses.append(pose)
            if iteration < num_iterations - 1:
                # b_ij += u_hat_{j|i} . v_j: [BJ, 1, K] @ [BJ, K, I] (a row vector first: the fast BLAS form)
                agreement = torch.bmm(pose.view(-1, 1, dim).to(votes.dtype), flat_votes.transpose(1, 2))
                agreement = agreement.view(batch_size, num_parents, num_children)
                logits = agreement if logits is None else logits + agreement
        ctx.save_for_backward(votes, *couplings, *preactivations, *poses)
        ctx.num_iterations = num_iterations
        ctx.detach_inner_votes = detach_inner_votes
        ctx.epsilon = epsilon
        ctx.bias_dtype = None if bias is None else bias.dtype
        return pose, coupling

    @staticmethod
    def backward(ctx, grad_poses, grad_coupling):
        num_iterations = ctx.num_iterations
        votes, *saved = ctx.saved_tensors
        couplings = saved[:num_iterations]
        preactivations = saved[num_iterations : 2 * num_iterations]
        poses = saved[2 * num_iterations :]
        batch_size, num_parents, num_children, dim = votes.shape
        flat_votes = votes.view(batch_size * num_parents, num_children, dim)
        # dL/du_hat[b, j, i, :] = sum_r left_r[b, j, i] right_r[b, j, :]
        left, right = [], []
        grad_bias = None
        grad_logits = None  # dL/d(logits of the iteration being undone), summed over the later iterations
        for iteration in reversed(range(num_iterations)):
            is_last = iteration == num_iterations - 1
            grad_preactivation = _squash_backward(preactivations[iteration], grad_poses, ctx.epsilon)
            if ctx.bias_dtype is not None:
                step_grad = grad_preactivation.sum(0)
                grad_bias = step_grad if grad_bias is None else grad_bias + step_grad
            if is_last or not ctx.detach_inner_votes:
                left.append(couplings[iteration])
                right.append(grad_preactivation)
            if iteration == 0:
                break  # the first couplings come from constant zero logits
            coupling = couplings[iteration]
            grad_c = torch.bmm(grad_preactivation.view(-1, 1, dim).to(votes.dtype), flat_votes.transpose(1, 2))
            grad_c = grad_c.view_as(coupling).float()
            if is_last:
                grad_c = grad_c + grad_coupling
            # Softmax backward over the parents; the leak's share gets no gradient, so the same form holds.
            step_grad = coupling * (grad_c - (coupling * grad_c).sum(1, keepdim=True))
            grad_logits = step_grad if grad_logits is None else grad_logits + step_grad
            # The logits of this iteration hold u_hat . v_t for every earlier t: route their gradient to v_(t-1).
            grad_poses = torch.bmm(grad_logits.view(-1, 1, num_children).to(votes.dtype), flat_votes)
            grad_poses = grad_poses.view(batch_size, num_parents, dim).float()
            if not ctx.detach_inner_votes:
                left.append(grad_logits)
                right.append(poses[iteration - 1])
        grad_votes = None
        if ctx.needs_input_grad[0]:
            lhs = torch.stack(left, dim=-1).view(-1, num_children, len(left)).to(votes.dtype)
            rhs = torch.stack(right, dim=-2).view(-1, len(right), dim).to(votes.dtype)
            grad_votes = torch.bmm(lhs, rhs).view_as(votes)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_votes, grad_bias, None, None, None, None


def dynamic_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    num_iterations: int,
    leaky: bool = False,
    detach_inner_votes: bool = False,
    epsilon: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing-by-agreement (Procedure 1) on votes u_hat laid out parent-major.

    Args:
        votes: [B, J, I, K], u_hat_{j|i} (Eq. 2).
        bias: [J, K] or None, added to every s_j before the squash in every iteration (official code).
    Returns:
        poses v_j [B, J, K] (float32) and the coupling coefficients c_ij of the last iteration [B, J, I].
    With `detach_inner_votes`, only the last iteration's s_j passes gradients to the votes (the couplings and the
    bias still get theirs through every iteration).
    """
    return _DynamicRouting.apply(votes, bias, num_iterations, leaky, detach_inner_votes, epsilon)


def margin_loss(
    capsule_lengths: torch.Tensor,
    targets: torch.Tensor,
    margin_positive: float = 0.9,
    margin_negative: float = 0.1,
    downweight: float = 0.5,
    reduction: str = "official",
) -> torch.Tensor:
    """Eq. 4 on lengths [B, J] and multi-hot targets [B, J]; averaged over the batch.

    `reduction="paper"` sums over classes as in Eq. 4; `"official"` takes 0.5 x the mean over classes, as the
    official code that trained the released models.
    """
    targets = targets.to(capsule_lengths.dtype)
    present = targets * F.relu(margin_positive - capsule_lengths).pow(2)
    absent = downweight * (1.0 - targets) * F.relu(capsule_lengths - margin_negative).pow(2)
    per_class = present + absent
    if reduction == "paper":
        return batch_mean(per_class.sum(-1))
    return 0.5 * batch_mean(per_class.mean(-1))


def reconstruction_loss(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared errors, averaged over the batch (section 4.1). Any shape [B, ...]."""
    return batch_mean((reconstructions.float() - targets.float()).pow(2).flatten(1).sum(-1))


def batch_mean(per_example: torch.Tensor) -> torch.Tensor:
    """Mean of per-example values [B]; 0 for an empty batch (whose loss then adds nothing), not NaN."""
    return per_example.sum() / max(per_example.shape[0], 1)


@dataclass
class CapsNetModelOutput(ModelOutput):
    """
    Args:
        capsule_poses (`torch.FloatTensor` of shape `(batch_size, num_labels, capsule_dim)`):
            The class capsules' activity vectors v_j (an ensemble adds a member axis at dim 1).
        capsule_lengths (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            |v_j|, the paper's class scores (an ensemble's mean over its members).
        primary_capsules (`torch.FloatTensor` of shape `(batch_size, num_primary_capsules, primary_capsule_dim)`):
            Squashed primary capsules, returned with `output_primary_capsules=True`.
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_primary_capsules, num_labels)`):
            Coupling coefficients c_ij of the last routing iteration, returned with `output_routing_weights=True`.
        hidden_states (`tuple(torch.FloatTensor)`): with `output_hidden_states=True`, one tensor per stage: the
            ReLU conv1 feature map `(batch_size, conv1_channels, height, width)`, the squashed primary capsules
            `(batch_size, num_primary_capsules, primary_capsule_dim)` and the class capsules `(batch_size,
            num_labels, capsule_dim)` (an ensemble stacks its members' at dim 1: copies, so only the class capsules
            lie on the path to the logits there).
    """

    capsule_poses: torch.FloatTensor | None = None
    capsule_lengths: torch.FloatTensor | None = None
    primary_capsules: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CapsNetImageClassifierOutput(ImageClassifierOutput):
    """
    Args:
        loss: margin loss + reconstruction_loss_weight x reconstruction loss, when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            log(l) - log(1 - l) of the capsule lengths l (clamped to [1e-6, 1 - 1e-6]): `sigmoid(logits)` equals the
            capsule lengths and ranking by logits is ranking by length.
        capsule_lengths (`torch.FloatTensor` of shape `(batch_size, num_labels)`): the paper's class scores.
        capsule_poses (`torch.FloatTensor` of shape `(batch_size, num_labels, capsule_dim)`): class capsules.
        reconstructions (`torch.FloatTensor`): decoder output, `(batch_size, channels, height, width)` masked by the
            label (or the predicted class without labels); with multi-hot labels `(batch_size, K, channels, height,
            width)`, one per present class in increasing class order (K = most classes present in one example;
            missing slots are zeros).
        margin_loss, reconstruction_loss: the two loss terms (reconstruction_loss unweighted), when `labels` is given.
        primary_capsules, routing_weights, hidden_states: as in [`CapsNetModelOutput`], on request.
    """

    capsule_lengths: torch.FloatTensor | None = None
    capsule_poses: torch.FloatTensor | None = None
    reconstructions: torch.FloatTensor | None = None
    margin_loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    primary_capsules: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None


class CapsNetConv2d(nn.Conv2d):
    """Conv2d with TensorFlow padding: "valid", or "same" with the odd extra row/column at the bottom/right."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: str, bias: bool = True
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        self.tf_padding = padding

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.tf_padding == "same":
            kernel_size, stride = self.kernel_size[0], self.stride[0]
            top, bottom = tf_same_padding(hidden_states.shape[-2], kernel_size, stride)
            left, right = tf_same_padding(hidden_states.shape[-1], kernel_size, stride)
            hidden_states = F.pad(hidden_states, (left, right, top, bottom))
        return super().forward(hidden_states)


class CapsNetPrimaryCapsules(nn.Module):
    """PrimaryCaps: a strided conv whose N*A channels form N capsule types of dimension A, squashed.

    As in the official code (which routes them once with all-zero logits), the conv output is multiplied by the
    softmax weight 1/N (1/(N+1) with leaky routing) before the unscaled bias [N, A] is added; with
    `primary_routing_scale=False` that factor `official_scale` is in the conv's initial weights instead.
    [B, C1, H1, W1] -> [B, N*H*W, A], flattened type-major: i = type*H*W + y*W + x.

    Everything after the conv is done by the `squash_kernel` when one is attached and `supports(conv output)` (None
    by default; `capsnet_hf.enable_cpu_routing_kernel` attaches the compiled CPU kernel), else by torch ops.
    """

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.num_types = config.primary_capsule_types
        self.capsule_dim = config.primary_capsule_dim
        self.epsilon = config.squash_epsilon
        self.conv = CapsNetConv2d(
            config.conv1_channels,
            self.num_types * self.capsule_dim,
            config.primary_kernel_size,
            config.primary_stride,
            config.padding,
            bias=False,
        )
        self.bias = nn.Parameter(torch.empty(self.num_types, self.capsule_dim))
        self.official_scale = 1.0 / (self.num_types + int(config.leaky_routing))
        self.routing_scale = self.official_scale if config.primary_routing_scale else 1.0
        self.squash_kernel = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(features)
        if self.squash_kernel is not None and self.squash_kernel.supports(hidden_states):
            return self.squash_kernel(self, hidden_states)
        hidden_states = hidden_states * self.routing_scale
        batch_size, _, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, self.num_types, self.capsule_dim, height, width)
        hidden_states = hidden_states + self.bias[None, :, :, None, None]
        num_capsules = self.num_types * height * width
        hidden_states = hidden_states.permute(0, 1, 3, 4, 2).reshape(batch_size, num_capsules, self.capsule_dim)
        return squash(hidden_states, epsilon=self.epsilon)


class CapsNetChunkRouting(GradientCheckpointingLayer):
    """Votes (Eq. 2) and Procedure 1 of one chunk of a class-capsule layer's batch, from its arguments alone: the unit
    the memory saver (activation checkpointing) recomputes in the backward pass, one chunk at a time.

    It holds no parameters: the layer passes its weight and bias positionally, so that reentrant checkpointing sees
    that they need gradients even when the primary capsules do not.
    """

    def forward(
        self,
        primary_capsules: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        iterations: int,
        leaky: bool,
        detach_inner_votes: bool,
        epsilon: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, I, A] and W [I, J, K, A] -> poses [B, J, K] and coupling coefficients [B, J, I]."""
        votes = self.compute_votes(primary_capsules, weight)
        return dynamic_routing(votes, bias, iterations, leaky, detach_inner_votes, epsilon)

    @staticmethod
    def compute_votes(primary_capsules: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[B, I, A] -> votes [B, J, I, K], one batched matmul over the input capsules (no per-example weights)."""
        num_inputs, num_classes, capsule_dim, input_dim = weight.shape
        batch_size = primary_capsules.shape[0]
        weight = weight.permute(0, 3, 1, 2).reshape(num_inputs, input_dim, -1)  # [I, A, J*K]
        inputs = primary_capsules.transpose(0, 1).to(weight.dtype)  # [I, B, A]
        if not torch.is_grad_enabled():
            inputs = inputs.contiguous()  # faster in inference only (docs/performance.md)
        votes = torch.bmm(inputs, weight)  # [I, B, J*K]
        votes = votes.view(num_inputs, batch_size, num_classes, capsule_dim)
        return votes.permute(1, 2, 0, 3).contiguous()


class CapsNetClassCapsules(nn.Module):
    """DigitCaps: one [K, A] transformation matrix per (input capsule, class) and routing-by-agreement.

    Weight W [I, J, K, A] gives the votes u_hat[b, i, j, k] = sum_a u[b, i, a] W[i, j, k, a] (Eq. 2).

    Two implementations, chosen in `forward`: the `routing_kernel` when one is attached and it `supports(primary
    capsules, weight)`, called as `routing_kernel(layer, primary capsules)` (None by default;
    `capsnet_hf.enable_cpu_routing_kernel` attaches the compiled CPU kernel), otherwise the torch path: `routing` (a
    `CapsNetChunkRouting`) per chunk of the batch. On CPU a chunk holds at most
    `votes_per_chunk` vote elements and `max_examples_per_chunk` examples (at least one), so that the votes stay in
    memory the allocator recycles and in the last-level cache; GPUs route the whole batch. With the memory saver
    (`model.activation_checkpointing_enable()` / `gradient_checkpointing_enable()`) each chunk is recomputed in the
    backward pass instead of saved, so one chunk's votes are alive at a time; off the CPU its chunks hold up to
    `gpu_saver_votes_per_chunk` votes. Why these sizes: docs/performance.md.
    """

    votes_per_chunk = 2**22
    max_examples_per_chunk = 11
    gpu_saver_votes_per_chunk = 2**26

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.routing_kernel = None
        self.routing = CapsNetChunkRouting()
        self.num_classes = config.num_labels
        self.capsule_dim = config.capsule_dim
        self.routing_iterations = config.routing_iterations
        self.leaky_routing = config.leaky_routing
        self.detach_inner_votes = config.detach_inner_votes
        self.epsilon = config.squash_epsilon
        self.weight = nn.Parameter(
            torch.empty(config.num_primary_capsules, self.num_classes, self.capsule_dim, config.primary_capsule_dim)
        )
        self.bias = nn.Parameter(torch.empty(self.num_classes, self.capsule_dim)) if config.routing_bias else None

    def examples_per_chunk(self, on_cpu: bool, checkpointing: bool) -> int | None:
        """How many examples one routing chunk holds (at least one), or None for the whole batch (GPUs, no saver)."""
        votes_per_example = self.weight.shape[0] * self.num_classes * self.capsule_dim
        if not on_cpu:
            return max(1, self.gpu_saver_votes_per_chunk // votes_per_example) if checkpointing else None
        return max(1, min(self.max_examples_per_chunk, self.votes_per_chunk // votes_per_example))

    def forward(self, primary_capsules: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, I, A] -> poses [B, J, K] and coupling coefficients [B, J, I]."""
        if self.routing_kernel is not None and self.routing_kernel.supports(primary_capsules, self.weight):
            return self.routing_kernel(self, primary_capsules)
        checkpointing = self.routing.gradient_checkpointing and self.training and torch.is_grad_enabled()
        chunk_size = self.examples_per_chunk(primary_capsules.device.type == "cpu", checkpointing)
        chunks = [primary_capsules] if chunk_size is None else primary_capsules.split(chunk_size)
        settings = (self.routing_iterations, self.leaky_routing, self.detach_inner_votes, self.epsilon)
        routed = [self.routing(chunk, self.weight, self.bias, *settings) for chunk in chunks]
        if len(routed) == 1:
            return routed[0]
        poses, coupling = (torch.cat(parts) for parts in zip(*routed, strict=True))
        return poses, coupling


class CapsNetEncoder(nn.Module):
    """One CapsNet from pixels to class capsules: Conv1 (ReLU) -> PrimaryCaps -> DigitCaps (Figure 1)."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        self.conv1 = CapsNetConv2d(
            config.num_channels, config.conv1_channels, config.conv1_kernel_size, 1, config.padding
        )
        self.primary_capsules = CapsNetPrimaryCapsules(config)
        self.class_capsules = CapsNetClassCapsules(config)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C, H, W] -> poses [B, J, K], primary capsules [B, I, A], coupling coefficients [B, J, I], and the
        ReLU conv1 features [B, conv1_channels, H', W']."""
        # In place: conv1's output is a fresh tensor its backward does not need, and a second one (52 MB at batch
        # 128) would be fresh pages on every call on CPU.
        features = F.relu(self.conv1(pixel_values), inplace=True)
        primary_capsules = self.primary_capsules(features)
        poses, coupling = self.class_capsules(primary_capsules)
        return poses, primary_capsules, coupling, features


class CapsNetDecoder(nn.Module):
    """Reconstruction network (Figure 2): masked class capsules [B, J*K] -> FC ReLU ... -> FC sigmoid -> image."""

    def __init__(self, config: CapsNetConfig):
        super().__init__()
        sizes = [config.num_labels * config.capsule_dim, *config.decoder_hidden_sizes, config.decoder_output_size]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))
        self.image_shape = (config.num_channels, *config.image_size)

    def forward(self, masked_poses: torch.Tensor) -> torch.Tensor:
        hidden_states = masked_poses.flatten(1)
        for layer in self.layers[:-1]:
            hidden_states = F.relu(layer(hidden_states))
        pixels = torch.sigmoid(self.layers[-1](hidden_states))
        return pixels.view(-1, *self.image_shape)


class CapsNetPreTrainedModel(PreTrainedModel):
    config_class = CapsNetConfig
    config: CapsNetConfig
    base_model_prefix = "capsnet"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    input_modalities = ("image",)
    # device_map="auto" may place whole encoders and the decoder, never split one.
    _no_split_modules = ["CapsNetEncoder", "CapsNetDecoder"]
    # The loss is a mean over the batch that ignores Trainer's num_items_in_batch: Trainer must scale it itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official initialisation: truncated normal (cut at 2 std), biases constant."""

        def truncated_normal(tensor: torch.Tensor, std: float) -> None:
            init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)

        config = self.config
        if isinstance(module, CapsNetConv2d) and module.bias is not None:
            # conv1; the bias-free primary conv is initialised with its capsule layer below.
            truncated_normal(module.weight, config.conv1_initializer_range)
            init.constant_(module.bias, config.bias_init)
        elif isinstance(module, CapsNetPrimaryCapsules):
            # Without the scale in the forward, its factor goes into the weights: the same initial model either way.
            std = config.initializer_range * module.official_scale / module.routing_scale
            truncated_normal(module.conv.weight, std)
            init.constant_(module.bias, config.bias_init)
        elif isinstance(module, CapsNetClassCapsules):
            truncated_normal(module.weight, config.initializer_range)
            if module.bias is not None:
                init.constant_(module.bias, config.bias_init)
        elif isinstance(module, nn.Linear):
            truncated_normal(module.weight, config.initializer_range)
            init.constant_(module.bias, config.bias_init)


class CapsNetModel(CapsNetPreTrainedModel):
    """CapsNet without the decoder: pixels -> class capsules. Holds `num_ensemble_members` independent encoders."""

    def __init__(self, config: CapsNetConfig):
        super().__init__(config)
        self.members = nn.ModuleList(CapsNetEncoder(config) for _ in range(config.num_ensemble_members))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_primary_capsules: bool = False,
        output_routing_weights: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CapsNetModelOutput | tuple:
        """
        pixel_values [B, C, H, W] -> capsule_poses [B, J, K] ([B, M, J, K] for an ensemble), capsule_lengths
        [B, J]; optionally primary_capsules [B, I, A] and routing_weights [B, I, J] (member axis at dim 1 likewise).
        """
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor of values in 0..1 (as CapsNetImageProcessor makes), "
                f"got {pixel_values.dtype}"
            )
        expected = (self.config.num_channels, *self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] for this model, "
                f"got {list(pixel_values.shape)} (use CapsNetImageProcessor to prepare images)"
            )
        pixel_values = pixel_values.to(self.members[0].conv1.weight.dtype)  # float64 inputs, for example
        if len(self.members) == 1:  # no member axis, and no stacked copies of the outputs
            poses, primary, coupling, features = self.members[0](pixel_values)
            lengths = capsule_length(poses, epsilon=self.config.squash_epsilon)
        else:
            results = [member(pixel_values) for member in self.members]
            poses, primary, coupling, features = (torch.stack(parts, dim=1) for parts in zip(*results, strict=True))
            lengths = capsule_length(poses, epsilon=self.config.squash_epsilon).mean(1)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        output = CapsNetModelOutput(
            capsule_poses=poses,
            capsule_lengths=lengths,
            primary_capsules=primary if output_primary_capsules else None,
            routing_weights=coupling.transpose(-1, -2) if output_routing_weights else None,
            hidden_states=(features, primary, poses) if output_hidden_states else None,
        )
        use_return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if use_return_dict else output.to_tuple()


class CapsNetForImageClassification(CapsNetPreTrainedModel):
    """CapsNet with the reconstruction decoder and the margin + reconstruction loss (section 4.1)."""

    def __init__(self, config: CapsNetConfig):
        super().__init__(config)
        self.capsnet = CapsNetModel(config)
        self.decoder = CapsNetDecoder(config) if config.use_decoder else None
        self.post_init()

    def reconstruct(self, capsule_poses: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        """Decode class capsules [B, J, K] kept by a one-/multi-hot mask [B, J] into images [B, C, H, W]."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (config.use_decoder=False)")
        masked = capsule_poses * class_mask.to(capsule_poses.dtype).unsqueeze(-1)
        return self.decoder(masked.to(self.decoder.layers[0].weight.dtype))

    def _reconstruct_each_class(self, capsule_poses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One reconstruction per present class of multi-hot targets [B, J], in class order: [B, K, C, H, W]."""
        num_classes = targets.shape[-1]
        present = targets > 0.5
        slots = max(int(present.sum(-1).max()), 1)
        # Rank present classes first, lower class index first, to pick them in increasing class order.
        rank = present * (num_classes - torch.arange(num_classes, device=targets.device))
        rank_values, classes = rank.topk(slots, dim=-1)
        valid = (rank_values > 0).to(capsule_poses.dtype)
        images = [
            self.reconstruct(capsule_poses, F.one_hot(classes[:, k], num_classes) * valid[:, k, None])
            * valid[:, k, None, None, None]
            for k in range(slots)
        ]
        return torch.stack(images, dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        reconstruction_targets: torch.Tensor | None = None,
        output_primary_capsules: bool = False,
        output_routing_weights: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CapsNetImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)` or multi-hot `(batch_size, num_labels)`, *optional*):
            Class indices, or multi-hot targets for several objects per image (MultiMNIST).
        reconstruction_targets (`torch.FloatTensor`, *optional*):
            What the decoder must reproduce: `(batch_size, C, H, W)` for class-index labels (default: `pixel_values`);
            `(batch_size, K, C, H, W)` for multi-hot labels, one image per present class in increasing class order
            (default: the sum of the per-class reconstructions, clipped to 1, is compared with `pixel_values`).
        """
        outputs = self.capsnet(
            pixel_values,
            output_primary_capsules=output_primary_capsules,
            output_routing_weights=output_routing_weights,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        lengths = outputs.capsule_lengths
        num_classes = lengths.shape[-1]
        multi_hot = labels is not None and labels.dim() == 2
        if labels is None:
            targets = None
        elif multi_hot:
            targets = labels.to(lengths.dtype)
        else:
            targets = F.one_hot(labels.long(), num_classes).to(lengths.dtype)

        reconstructions = None
        if self.decoder is not None:
            if multi_hot:
                reconstructions = self._reconstruct_each_class(outputs.capsule_poses, targets)
            else:
                mask = targets if targets is not None else F.one_hot(lengths.argmax(-1), num_classes)
                reconstructions = self.reconstruct(outputs.capsule_poses, mask)

        loss = margin = recon_loss = None
        if targets is not None:
            config = self.config
            margin = margin_loss(
                lengths,
                targets,
                config.margin_positive,
                config.margin_negative,
                config.margin_downweight,
                config.margin_loss_reduction,
            )
            loss = margin
            if reconstructions is not None:
                if reconstruction_targets is not None:
                    recon_loss = reconstruction_loss(reconstructions, reconstruction_targets)
                elif multi_hot:
                    recon_loss = reconstruction_loss(reconstructions.sum(1).clamp(max=1.0), pixel_values)
                else:
                    recon_loss = reconstruction_loss(reconstructions, pixel_values)
                loss = margin + config.reconstruction_loss_weight * recon_loss

        output = CapsNetImageClassifierOutput(
            loss=loss,
            logits=torch.logit(lengths, eps=LOGIT_EPSILON),
            capsule_lengths=lengths,
            capsule_poses=outputs.capsule_poses,
            reconstructions=reconstructions,
            margin_loss=margin,
            reconstruction_loss=recon_loss,
            primary_capsules=outputs.primary_capsules,
            routing_weights=outputs.routing_weights,
            hidden_states=outputs.hidden_states,
        )
        use_return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if use_return_dict else output.to_tuple()


__all__ = [
    "CapsNetForImageClassification",
    "CapsNetModel",
    "CapsNetPreTrainedModel",
    "CapsNetModelOutput",
    "CapsNetImageClassifierOutput",
]
