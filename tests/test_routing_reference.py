"""The optimised capsule layers against a plain, literal formulation of the paper and the official code.

The reference below is written from the equations only (Eq. 1 squash, Eq. 2 votes and weighted sum, Eq. 3 softmax,
Procedure 1, the official primary-capsule scale 1/N or 1/(N+1) before the bias, TF "same" padding) with einsum and
explicit loops over iterations; it lives only here. The model must match it in outputs AND gradients (w.r.t. every
parameter and the pixels) to float32 tolerance, with and without the memory saver, and under torch.compile.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from transformers.modeling_layers import GradientCheckpointingLayer

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, CapsNetModel, enable_cpu_routing_kernel

EPS = 1e-9


def tf_pad(images: torch.Tensor, kernel: int, stride: int, padding: str) -> torch.Tensor:
    """TensorFlow padding: "same" pads to ceil(n / stride) outputs, the odd extra pixel after (bottom/right)."""
    if padding == "valid":
        return images
    pads = []
    for size in (images.shape[-1], images.shape[-2]):  # F.pad order: last dim first
        outputs = -(-size // stride)
        total = max((outputs - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(images, pads)


def squash_reference(s: torch.Tensor) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s| (epsilon under the root, as the model)."""
    squared = (s * s).sum(-1, keepdim=True)
    return squared / (1 + squared) * s / torch.sqrt(squared + EPS)


def reference_capsnet(member: torch.nn.Module, config, pixels: torch.Tensor):
    """Pixels [B, C, H, W] -> (class capsules v [B, J, K], last couplings c [B, I, J], primary capsules [B, I, A])."""
    conv1 = member.conv1
    primary = member.primary_capsules
    digits = member.class_capsules
    k1, k2, stride = config.conv1_kernel_size, config.primary_kernel_size, config.primary_stride
    features = F.relu(F.conv2d(tf_pad(pixels, k1, 1, config.padding), conv1.weight, conv1.bias))
    hidden = F.conv2d(tf_pad(features, k2, stride, config.padding), primary.conv.weight, stride=stride)
    types, atoms = config.primary_capsule_types, config.primary_capsule_dim
    # Official code: PrimaryCaps go through one routing step with zero logits -> softmax weight 1/N (1/(N+1) leaky).
    if config.primary_routing_scale:
        hidden = hidden / (types + (1 if config.leaky_routing else 0))
    batch, _, height, width = hidden.shape
    hidden = hidden.reshape(batch, types, atoms, height, width) + primary.bias[None, :, :, None, None]
    # i = type * H * W + y * W + x
    u = squash_reference(hidden.permute(0, 1, 3, 4, 2).reshape(batch, types * height * width, atoms))

    # Eq. 2: u_hat_{j|i} = W_ij u_i, W stored [I, J, K, A]
    u_hat = torch.einsum("ijka,bia->bijk", digits.weight, u)
    num_inputs, num_classes = u_hat.shape[1], u_hat.shape[2]
    logits = torch.zeros(batch, num_inputs, num_classes)
    for iteration in range(config.routing_iterations):  # Procedure 1
        last = iteration == config.routing_iterations - 1
        votes = u_hat if (last or not config.detach_inner_votes) else u_hat.detach()
        if config.leaky_routing:
            with_leak = torch.cat([torch.zeros(batch, num_inputs, 1), logits], dim=-1)
            coupling = torch.softmax(with_leak, dim=-1)[..., 1:]
        else:
            coupling = torch.softmax(logits, dim=-1)  # Eq. 3, over the parents j
        s = torch.einsum("bij,bijk->bjk", coupling, votes)
        if digits.bias is not None:
            s = s + digits.bias
        v = squash_reference(s)
        if not last:
            logits = logits + torch.einsum("bijk,bjk->bij", votes, v)
    return v, coupling, u


def outputs_and_gradients(model: CapsNetModel, forward, pixels: torch.Tensor):
    """Outputs of `forward(pixels)` and the gradients of a fixed random functional of them (params, pixels)."""
    pixels = pixels.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    poses, coupling, primary = forward(pixels)
    generator = torch.Generator().manual_seed(7)
    weights = [torch.randn(t.shape, generator=generator) for t in (poses, coupling, primary)]
    lengths = torch.sqrt((poses * poses).sum(-1) + EPS)
    loss = sum((t * w).sum() for t, w in zip((poses, coupling, primary), weights, strict=True)) + lengths.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["pixel_values"] = pixels.grad.clone()
    return {"poses": poses.detach(), "coupling": coupling.detach(), "primary": primary.detach()}, grads


def model_forward(model: CapsNetModel):
    def forward(pixels):
        out = model(pixels, output_primary_capsules=True, output_routing_weights=True)
        return out.capsule_poses, out.routing_weights, out.primary_capsules

    return forward


def assert_close_dicts(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(actual[name] / scale, expected[name] / scale, rtol=0, atol=2e-5, msg=name)


def build(mode: str = "whole", **overrides) -> tuple[CapsNetModel, object]:
    """mode: "whole" (one routing call), "chunked" (batch routed 2 + 2 + 1), "saver" (chunked, recomputed),
    "kernel" (the opt-in C++ CPU kernel)."""
    torch.manual_seed(0)
    config = small_config(**overrides)
    model = CapsNetModel(config)
    if mode in ("chunked", "saver"):
        layer = model.members[0].class_capsules
        layer.votes_per_chunk = 2 * layer.weight.shape[0] * layer.weight.shape[1] * layer.weight.shape[2]
    if mode == "saver":
        model.activation_checkpointing_enable()
    if mode == "kernel":
        enable_cpu_routing_kernel(model)
    model.train()
    return model, config


PIXELS = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["whole", "chunked", "saver", "kernel"])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_model_matches_reference_outputs_and_gradients(padding, leaky, iterations, mode):
    model, config = build(mode, padding=padding, leaky_routing=leaky, routing_iterations=iterations)
    member = model.members[0]
    actual = outputs_and_gradients(model, model_forward(model), PIXELS)
    expected = outputs_and_gradients(model, lambda x: reference_capsnet(member, config, x), PIXELS)
    assert_close_dicts(actual[0], expected[0])
    assert_close_dicts(actual[1], expected[1])
    # Coupling coefficients are a distribution over the parents (minus the leak's share when leaky).
    totals = actual[0]["coupling"].sum(-1)
    assert torch.all(totals <= 1 + 1e-5) and (leaky or torch.allclose(totals, torch.ones_like(totals), atol=1e-5))


@pytest.mark.parametrize("mode", ["whole", "chunked"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_inference_matches_reference(padding, leaky, mode):
    """Without autograd the votes GEMM takes a contiguous copy of its operand: the same numbers."""
    model, config = build(mode, padding=padding, leaky_routing=leaky, routing_iterations=3)
    model.eval()
    names = ("poses", "coupling", "primary")
    with torch.no_grad():
        actual = dict(zip(names, model_forward(model)(PIXELS), strict=True))
        expected = dict(zip(names, reference_capsnet(model.members[0], config, PIXELS), strict=True))
    assert_close_dicts(actual, expected)


@pytest.mark.parametrize("routing_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_cpu_routing_kernel_matches_reference(padding, leaky, iterations, routing_bias):
    """The opt-in C++ kernel; 17 px gives I = 50 (valid) or 162 (same), not multiples of its 8 or 16 lanes."""
    model, config = build(
        "kernel",
        image_size=17,
        padding=padding,
        leaky_routing=leaky,
        routing_iterations=iterations,
        routing_bias=routing_bias,
    )
    member = model.members[0]
    pixels = torch.rand(5, 1, 17, 17, generator=torch.Generator().manual_seed(4))
    actual = outputs_and_gradients(model, model_forward(model), pixels)
    expected = outputs_and_gradients(model, lambda x: reference_capsnet(member, config, x), pixels)
    assert_close_dicts(actual[0], expected[0])
    assert_close_dicts(actual[1], expected[1])
    names = ("poses", "coupling", "primary")
    with torch.no_grad():  # inference: the same numbers without autograd
        inferred = dict(zip(names, model_forward(model)(pixels), strict=True))
    assert_close_dicts(inferred, actual[0])


@pytest.mark.parametrize("mode", ["whole", "saver", "kernel"])
@pytest.mark.parametrize("routing_bias", [True, False], ids=["bias", "no_bias"])
def test_detached_inner_votes_and_no_bias_match_reference(routing_bias, mode):
    model, config = build(mode, detach_inner_votes=True, routing_bias=routing_bias, routing_iterations=3)
    member = model.members[0]
    actual = outputs_and_gradients(model, model_forward(model), PIXELS)
    expected = outputs_and_gradients(model, lambda x: reference_capsnet(member, config, x), PIXELS)
    assert_close_dicts(actual[0], expected[0])
    assert_close_dicts(actual[1], expected[1])


@pytest.mark.parametrize("mode", ["whole", "kernel"])
@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
def test_unscaled_primary_capsules_match_reference(leaky, mode):
    """`primary_routing_scale=False`: no 1/N on the primary conv's output, on the torch path and in the kernel."""
    model, config = build(mode, primary_routing_scale=False, leaky_routing=leaky, routing_iterations=3)
    assert model.members[0].primary_capsules.routing_scale == 1.0
    member = model.members[0]
    actual = outputs_and_gradients(model, model_forward(model), PIXELS)
    expected = outputs_and_gradients(model, lambda x: reference_capsnet(member, config, x), PIXELS)
    assert_close_dicts(actual[0], expected[0])
    assert_close_dicts(actual[1], expected[1])


def test_memory_saver_training_step_matches_plain_step():
    """The transformers switch (activation checkpointing) changes neither the loss nor any gradient."""
    torch.manual_seed(0)
    plain = CapsNetForImageClassification(small_config()).train()
    saver = CapsNetForImageClassification(small_config()).train()
    saver.load_state_dict(plain.state_dict())
    saver.activation_checkpointing_enable()
    saver.capsnet.members[0].class_capsules.votes_per_chunk = 1  # one example per chunk
    labels = torch.tensor([0, 1, 2, 3, 1])
    results = []
    for model in (plain, saver):
        loss = model(PIXELS, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert_close_dicts(results[1][1], results[0][1])


@pytest.mark.parametrize("frozen_convolutions", [False, True], ids=["all_trained", "frozen_convolutions"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_as_transformers_common_tests_drive_it(use_reentrant, frozen_convolutions):
    """`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ...})` checkpoints the routing
    layer (a `GradientCheckpointingLayer`) once per chunk, and the loss and every gradient equal the plain step's;
    with frozen convolutions too, where reentrant checkpointing sees a gradient only through the weight it is given."""
    torch.manual_seed(0)
    plain = CapsNetForImageClassification(small_config()).train()
    saver = CapsNetForImageClassification(small_config()).train()
    saver.load_state_dict(plain.state_dict())
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
        saver.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    layer = saver.capsnet.members[0].class_capsules
    assert isinstance(layer.routing, GradientCheckpointingLayer) and layer.routing.gradient_checkpointing
    layer.votes_per_chunk = 2 * layer.weight.shape[0] * layer.weight.shape[1] * layer.weight.shape[2]  # 2 + 2 + 1
    checkpoints = []
    checkpoint = layer.routing._gradient_checkpointing_func
    layer.routing._gradient_checkpointing_func = lambda *args, **kwargs: (
        checkpoints.append(1) or checkpoint(*args, **kwargs)
    )
    labels = torch.tensor([0, 1, 2, 3, 1])
    results = []
    for model in (plain, saver):
        if frozen_convolutions:
            member = model.capsnet.members[0]
            member.conv1.requires_grad_(False)
            member.primary_capsules.requires_grad_(False)
        loss = model(PIXELS, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert len(checkpoints) == 3
    torch.testing.assert_close(results[1][0], results[0][0])
    assert_close_dicts(results[1][1], results[0][1])


def test_memory_saver_chunks_are_cpu_sized_on_cpu_and_memory_sized_elsewhere():
    """On a GPU the saver routes in large chunks (few kernel launches); the CPU keeps its cache-sized ones."""
    layer = CapsNetForImageClassification(CapsNetConfig(image_size=64)).capsnet.members[0].class_capsules
    votes_per_example = 18432 * 10 * 16
    assert layer.examples_per_chunk(on_cpu=True, checkpointing=True) == 1
    assert layer.examples_per_chunk(on_cpu=True, checkpointing=False) == 1
    assert layer.examples_per_chunk(on_cpu=False, checkpointing=True) == 2**26 // votes_per_example == 22
    assert layer.examples_per_chunk(on_cpu=False, checkpointing=False) is None  # the whole batch
    mnist = CapsNetForImageClassification(CapsNetConfig()).capsnet.members[0].class_capsules
    assert mnist.examples_per_chunk(on_cpu=True, checkpointing=True) == mnist.max_examples_per_chunk
    assert mnist.examples_per_chunk(on_cpu=False, checkpointing=True) == 2**26 // (1152 * 10 * 16)


def test_fullgraph_compile_training_and_inference_match_eager():
    """torch.compile(fullgraph=True) traces the whole model, routing Function included, with no graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CapsNetForImageClassification(small_config(leaky_routing=True)).train()
    layer = model.capsnet.members[0].class_capsules
    layer.votes_per_chunk = 2 * layer.weight.shape[0] * layer.weight.shape[1] * layer.weight.shape[2]  # 3 chunks
    labels = torch.tensor([0, 1, 2, 3, 1])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_loss = model(PIXELS, labels=labels).loss
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(PIXELS, labels=labels).loss
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager, compiled_grad in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager, rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(PIXELS).logits, model(PIXELS).logits)
    torch._dynamo.reset()
