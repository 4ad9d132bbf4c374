"""The CPU routing kernel: when the model uses it, what it leaves alone, how it fails, the command lines' modes.

Its numbers are checked against the reference formulation in test_routing_reference.py.
"""

import copy
import ctypes
import io

import pytest
import torch
from conftest import small_config
from torch import nn

from capsnet_hf import (
    CapsNetForImageClassification,
    CapsNetModel,
    disable_cpu_routing_kernel,
    enable_cpu_routing_kernel,
)
from capsnet_hf.kernels import cpu_routing as cpu_routing_kernel
from capsnet_hf.kernels.cpu_routing import (
    CpuPrimaryCapsulesKernel,
    CpuRoutingKernel,
    KernelBuildError,
    cpu_routing_kernel_mode,
    load_kernel_library,
    use_cpu_routing_kernel,
)

PIXELS = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(5))


def twin_models(**overrides) -> tuple[CapsNetForImageClassification, CapsNetForImageClassification]:
    """Two models with the same weights, the second with the kernel."""
    torch.manual_seed(0)
    plain = CapsNetForImageClassification(small_config(**overrides)).eval()
    fast = CapsNetForImageClassification(small_config(**overrides)).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, enable_cpu_routing_kernel(fast)


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = CpuRoutingKernel.__call__

    def counting(self, layer, primary_capsules):
        calls.append(primary_capsules.shape[0])
        return original(self, layer, primary_capsules)

    monkeypatch.setattr(CpuRoutingKernel, "__call__", counting)
    return calls


def test_inference_uses_kernel_and_matches_torch_path(kernel_calls):
    plain, fast = twin_models(num_ensemble_members=2, use_decoder=False)
    with torch.inference_mode():
        expected = plain(PIXELS, output_routing_weights=True, output_hidden_states=True)
        actual = fast(PIXELS, output_routing_weights=True, output_hidden_states=True)
    assert kernel_calls == [5, 5]  # one call per ensemble member
    for name in ("logits", "capsule_poses", "routing_weights", "hidden_states"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    disable_cpu_routing_kernel(fast)
    assert all(member.primary_capsules.squash_kernel is None for member in fast.capsnet.members)
    with torch.no_grad():
        fast(PIXELS)
    assert kernel_calls == [5, 5]


@pytest.mark.parametrize("batch_size", [0, 1, 3])
def test_empty_and_small_batches(batch_size, kernel_calls):
    """Fewer examples than threads x examples per block: the blocks shrink so that both threads get work."""
    plain, fast = twin_models()
    with torch.no_grad():
        expected = plain(PIXELS[:batch_size], output_routing_weights=True)
        actual = fast(PIXELS[:batch_size], output_routing_weights=True)
    assert kernel_calls == [batch_size]
    assert actual.logits.shape == (batch_size, 4)
    for name in ("logits", "capsule_poses", "routing_weights"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "threads, overrides",
    [
        (2, {}),
        (3, {"primary_capsule_dim": 8, "primary_kernel_size": 4}),  # 50 inputs: a partial last block
        (5, {"routing_iterations": 1}),  # more threads than the 4 input blocks (with 8 lanes)
        (5, {"leaky_routing": True, "routing_bias": True}),
    ],
)
def test_one_example_is_routed_by_every_thread(threads, overrides, kernel_calls):
    """Batch 1 in inference: the threads split the example's input blocks and add up each pass's s_j."""
    plain, fast = twin_models(**overrides)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = plain(PIXELS[:1], output_routing_weights=True)
            actual = fast(PIXELS[:1], output_routing_weights=True)
    finally:
        torch.set_num_threads(previous)
    assert kernel_calls == [1]
    for name in ("logits", "capsule_poses", "routing_weights"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-5, atol=1e-6)


def training_steps(model, steps: int = 1, **forward_kwargs) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of `steps` Adam steps on fixed data (the loss also reads the routing weights) and the last gradients."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = torch.tensor([0, 1, 2, 3, 1])
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        output = model(PIXELS, labels=labels, output_routing_weights=True, **forward_kwargs)
        loss = output.loss + output.routing_weights.square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses, {name: parameter.grad for name, parameter in model.named_parameters()}


def assert_same_training(plain, fast, steps: int = 1) -> None:
    expected_losses, expected_grads = training_steps(plain, steps)
    losses, grads = training_steps(fast, steps)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides", [{}, {"primary_capsule_dim": 8, "primary_kernel_size": 4}], ids=["dim4-32-inputs", "dim8-50-inputs"]
)
def test_training_uses_kernel_and_matches_torch_path(kernel_calls, overrides):
    """Losses and gradients over three Adam steps: the packed weight follows every optimizer step. With the paper's
    capsule dimension 8 on 50 input capsules (a 5 x 5 grid) the re-layouts take both their paths: whole vectors of
    inputs (transposed 8 x 8 at a time) and a partial last one."""
    plain, fast = twin_models(**overrides)
    assert_same_training(plain, fast, steps=3)
    assert kernel_calls == [5, 5, 5]


def test_memory_saver_with_kernel(kernel_calls):
    """With activation checkpointing the kernel routes the whole batch (it saves no votes anyway)."""
    plain, fast = twin_models()
    fast.activation_checkpointing_enable()
    assert_same_training(plain, fast)
    assert kernel_calls == [5]


def test_frozen_weights_and_gradients_of_inputs_only(kernel_calls):
    plain, fast = twin_models(use_decoder=False)
    grads = []
    for model in (plain, fast):
        model.requires_grad_(False)
        pixels = PIXELS.clone().requires_grad_()
        model(pixels).logits.sum().backward()
        grads.append(pixels.grad)
    assert kernel_calls == [5]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_weight_changed_before_backward_is_an_error():
    """As for any autograd op: the backward needs the weight of the forward pass."""
    _, fast = twin_models()
    loss = fast(PIXELS, labels=torch.tensor([0, 1, 2, 3, 1])).loss
    with torch.no_grad():
        fast.capsnet.members[0].class_capsules.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_other_dtypes_keep_torch_path(kernel_calls, kernel_runs):
    plain, fast = twin_models()
    with torch.no_grad():
        expected = plain.to(torch.float64)(PIXELS.double()).logits
        torch.testing.assert_close(fast.to(torch.float64)(PIXELS.double()).logits, expected)
    assert kernel_calls == [] and kernel_runs == []


@pytest.fixture
def kernel_runs(monkeypatch):
    """Names of the C entry points run (the op's forward and backward), however the op was reached."""
    runs = []
    original = cpu_routing_kernel._run

    def counting(entry, call):
        runs.append(entry.__name__)
        return original(entry, call)

    monkeypatch.setattr(cpu_routing_kernel, "_run", counting)
    return runs


def test_compiled_model_runs_the_kernel_op(kernel_runs):
    """torch.compile(fullgraph=True) traces the registered op (its fake implementation) and runs the kernel."""
    torch._dynamo.reset()
    plain, fast = twin_models()
    plain.train(), fast.train()
    labels = torch.tensor([0, 1, 2, 3, 1])
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    expected_loss = plain(PIXELS, labels=labels).loss
    expected_grads = torch.autograd.grad(expected_loss, list(plain.parameters()))
    loss = compiled(PIXELS, labels=labels).loss
    grads = torch.autograd.grad(loss, list(fast.parameters()))
    assert kernel_runs == [
        "capsnet_squash_primary",
        "capsnet_pack_weight",
        "capsnet_route",
        "capsnet_route_backward",
        "capsnet_squash_primary_backward",
    ]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    fast.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(PIXELS).logits, plain(PIXELS).logits, rtol=1e-5, atol=1e-6)
    assert kernel_runs[5:] == ["capsnet_squash_primary", "capsnet_pack_weight", "capsnet_route"]
    torch._dynamo.reset()


def test_frozen_compiled_model_packs_the_weight_once(kernel_runs):
    """With inductor's freezing the weight is a constant of the graph: its re-layout runs at compile time only."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    plain, fast = twin_models()
    compiled = torch.compile(fast)
    with torch.inference_mode(), inductor_config.patch(freezing=True):
        compiled(PIXELS)
        kernel_runs.clear()
        actual = [compiled(PIXELS).logits for _ in range(3)]
        expected = plain(PIXELS).logits
    assert kernel_runs == ["capsnet_squash_primary", "capsnet_route"] * 3
    for logits in actual:
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_exported_model_calls_the_kernel_op(kernel_runs):
    """torch.export keeps the op in the graph (an opaque node with a fake implementation) and runs it."""
    plain, fast = twin_models(use_decoder=False)
    exported = torch.export.export(fast.capsnet, (PIXELS,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.capsnet_hf.pack_class_capsule_weight.default in targets
    assert torch.ops.capsnet_hf.route_class_capsules.default in targets
    assert torch.ops.capsnet_hf.squash_primary_capsules.default in targets
    kernel_runs.clear()
    with torch.no_grad():
        actual = exported.module()(PIXELS).capsule_lengths
        torch.testing.assert_close(actual, plain.capsnet(PIXELS).capsule_lengths, rtol=1e-5, atol=1e-6)
    assert kernel_runs == ["capsnet_squash_primary", "capsnet_pack_weight", "capsnet_route"]


def route_op(capsules, weight, bias, *settings):
    """The packed weight and the outputs of `route_class_capsules` on `weight` and its `pack_class_capsule_weight`,
    as `CpuRoutingKernel` calls them; settings: iterations, leaky, epsilon, detach_inner_votes, keep_for_backward,
    bf16_votes, library."""
    *_, bf16_votes, library = settings
    packed_weight = torch.ops.capsnet_hf.pack_class_capsule_weight(weight.detach(), bf16_votes, library)
    return packed_weight, torch.ops.capsnet_hf.route_class_capsules(capsules, weight, packed_weight, bias, *settings)


@pytest.mark.parametrize(
    "leaky, bias, detach_inner_votes, bf16_votes",
    [(True, True, False, False), (False, False, True, False), (True, True, False, True)],
)
def test_registered_op_passes_torch_opcheck(leaky, bias, detach_inner_votes, bf16_votes):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library checks them."""
    if bf16_votes and not BF16_VOTES:
        pytest.skip("this CPU or compiler has no AVX512-BF16")
    generator = torch.Generator().manual_seed(0)
    capsules = torch.rand(3, 10, 4, generator=generator).requires_grad_()
    weight = (0.1 * torch.randn(10, 3, 5, 4, generator=generator)).requires_grad_()
    bias = torch.zeros(3, 5, requires_grad=True) if bias else None
    library = CpuRoutingKernel().library_path
    torch.library.opcheck(
        torch.ops.capsnet_hf.pack_class_capsule_weight.default, (weight.detach(), bf16_votes, library)
    )
    packed_weight = torch.ops.capsnet_hf.pack_class_capsule_weight(weight.detach(), bf16_votes, library)
    arguments = (capsules, weight, packed_weight, bias, 3, leaky, 1e-9, detach_inner_votes, True, bf16_votes, library)
    torch.library.opcheck(torch.ops.capsnet_hf.route_class_capsules.default, arguments)


BF16_VOTES = CpuRoutingKernel().bf16_votes
needs_bf16_votes = pytest.mark.skipif(not BF16_VOTES, reason="this CPU or compiler has no AVX512-BF16")


def routed_with_gradients(capsules, weight, bias, bf16_votes, leaky=True, iterations=3, detach_inner_votes=False):
    """The op's outputs and the gradients of a fixed function of them w.r.t. capsules, weight and bias."""
    leaves = [tensor.detach().requires_grad_() for tensor in (capsules, weight) + (() if bias is None else (bias,))]
    library = CpuRoutingKernel().library_path
    bias = leaves[2] if bias is not None else None
    _, (poses, coupling, _) = route_op(
        *leaves[:2], bias, iterations, leaky, 1e-9, detach_inner_votes, True, bf16_votes, library
    )
    mix = torch.linspace(-1, 1, poses[0].numel()).view(poses.shape[1:])
    loss = (poses * mix).sum() + (coupling * coupling).sum()
    return [poses.detach(), coupling.detach(), *torch.autograd.grad(loss, leaves)]


@needs_bf16_votes
@pytest.mark.parametrize(
    "batch_size, num_inputs, input_dim, leaky, iterations, bias, detach_inner_votes",
    [(9, 50, 8, True, 3, True, False), (1, 40, 5, False, 1, False, False), (6, 33, 8, False, 2, True, True)],
)
def test_bf16_votes_are_the_float32_kernel_of_the_rounded_operands(
    batch_size, num_inputs, input_dim, leaky, iterations, bias, detach_inner_votes
):
    """bf16 votes (vdpbf16ps on bf16 pairs of input dimensions, an odd one padded) route exactly as the float32 kernel
    does on bf16-rounded capsules and weight, and their gradients are the float32 kernel's w.r.t. those rounded
    operands (straight-through); 50 and 33 inputs are not whole 16-lane blocks, 9 and 6 examples fill sweeps of 4, 2
    and 1."""
    generator = torch.Generator().manual_seed(0)
    capsules = torch.rand(batch_size, num_inputs, input_dim, generator=generator) - 0.5
    weight = 0.3 * torch.randn(num_inputs, 3, 5, input_dim, generator=generator)
    routing_bias = 0.1 * torch.randn(3, 5, generator=generator) if bias else None
    options = dict(leaky=leaky, iterations=iterations, detach_inner_votes=detach_inner_votes)
    actual = routed_with_gradients(capsules, weight, routing_bias, True, **options)
    rounded = [tensor.bfloat16().float() for tensor in (capsules, weight)]
    expected = routed_with_gradients(*rounded, routing_bias, False, **options)
    for name, got, wanted in zip(["poses", "coupling", "capsules", "weight", "bias"], actual, expected, strict=False):
        torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6, msg=name)
    unrounded = routed_with_gradients(capsules, weight, routing_bias, False, **options)
    assert not torch.equal(actual[0], unrounded[0])  # the rounding did happen


@needs_bf16_votes
def test_bf16_votes_follow_cpu_bf16_autocast(monkeypatch):
    """The model asks for bf16 votes under CPU bf16 autocast only; the outputs stay within bf16 rounding of the
    torch path's under the same autocast."""
    asked = []
    original = cpu_routing_kernel._run

    def recording(entry, call):
        if entry.__name__ in ("capsnet_route", "capsnet_route_backward"):
            asked.append(bool(call.bf16_votes))
        return original(entry, call)

    monkeypatch.setattr(cpu_routing_kernel, "_run", recording)
    plain, fast = twin_models()
    fast.train(), plain.train()
    labels = torch.tensor([0, 1, 2, 3, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fast(PIXELS, labels=labels).loss
        expected = plain(PIXELS, labels=labels).loss
    loss.backward()
    with torch.autocast("cpu", dtype=torch.float16):
        fast(PIXELS)
    fast(PIXELS)
    assert asked == [True, True, False, False]
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-3)


def test_bf16_votes_are_refused_by_a_build_without_them():
    library = load_kernel_library()
    call = cpu_routing_kernel.RoutingCall(  # 16 inputs: whole blocks of 8 or 16 lanes
        batch=1, inputs_per_example=16, padded_inputs=16, input_dim=2, parents=1, pose_dim=1, iterations=1
    )
    call.examples_per_block, call.threads, call.bf16_votes = 1, 1, 1
    refusal = library.capsnet_route(call)
    if library.capsnet_bf16_votes():
        assert refusal == b"the weight or its packed buffer is missing"  # past the bf16 check
    else:
        assert refusal == b"this build has no bf16 votes (they need AVX-512 and AVX512-BF16)"


def primary_layer_twins(**overrides):
    """A primary-capsule layer and a copy with the kernel's squash."""
    torch.manual_seed(0)
    plain = CapsNetModel(small_config(**overrides)).members[0].primary_capsules
    fast = copy.deepcopy(plain)
    fast.squash_kernel = CpuPrimaryCapsulesKernel()
    return plain, fast


@pytest.mark.parametrize("magnitude", [0.0, 1.0, 1e30])
def test_primary_capsules_squash_matches_torch_path(magnitude):
    """Outputs and gradients (features, conv weight, bias), also where |s|^2 leaves float32's range (the torch path
    scales by a power of two, the kernel sums in double) and at s = 0 (the gradient stays finite)."""
    plain, fast = primary_layer_twins()
    features = (magnitude * torch.randn(3, 8, 9, 9, generator=torch.Generator().manual_seed(1))).requires_grad_()
    grad_output = torch.randn(plain(features).shape, generator=torch.Generator().manual_seed(2))
    assert grad_output.shape[1] > plain.num_types  # several positions per capsule type
    results = []
    for layer in (plain, fast):
        features.grad = None
        capsules = layer(features)
        capsules.backward(grad_output)
        results.append((capsules, features.grad, layer.conv.weight.grad, layer.bias.grad))
    for actual, expected in zip(results[1], results[0], strict=True):
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_primary_capsules_squash_under_bf16_autocast(kernel_runs):
    """The bf16 conv output is squashed in float32, as the torch path does; gradients reach the bf16 conv."""
    plain, fast = primary_layer_twins()
    features = torch.rand(2, 8, 9, 9, generator=torch.Generator().manual_seed(3))
    outputs = []
    for layer in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            capsules = layer(features)
        capsules.square().sum().backward()
        outputs.append((capsules, layer.conv.weight.grad, layer.bias.grad))
    assert kernel_runs == ["capsnet_squash_primary", "capsnet_squash_primary_backward"]
    assert outputs[1][0].dtype == torch.float32
    for actual, expected in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-3)


def test_primary_capsules_op_passes_torch_opcheck():
    generator = torch.Generator().manual_seed(0)
    conv = torch.randn(2, 3 * 4, 2, 3, generator=generator).requires_grad_()
    bias = torch.randn(3, 4, generator=generator).requires_grad_()
    library = CpuPrimaryCapsulesKernel().library_path
    for bias_ in (bias, None):
        arguments = (conv, bias_, 3, 0.1, 1e-9, library)
        torch.library.opcheck(torch.ops.capsnet_hf.squash_primary_capsules.default, arguments)


def test_primary_capsules_op_refuses_what_does_not_fit():
    library = CpuPrimaryCapsulesKernel().library_path
    conv, bias = torch.rand(2, 12, 2, 2), torch.rand(3, 4)
    mismatches = {
        "takes a float32 CPU conv output": (conv.double(), bias, 3),
        r"conv output \[B, 5 \* A, H, W\]": (conv, bias, 5),
        r"bias torch.float32 \(4, 3\) is not float32 \[N, A\]": (conv, bias.T, 3),
    }
    for message, (conv_, bias_, types) in mismatches.items():
        with pytest.raises(ValueError, match=message):
            torch.ops.capsnet_hf.squash_primary_capsules(conv_, bias_, types, 0.1, 1e-9, library)
    with pytest.raises(ValueError, match="gradient .* does not fit the outputs"):
        torch.ops.capsnet_hf.squash_primary_capsules_backward(conv, bias, torch.rand(2, 4, 4), 3, 0.1, 1e-9, library)


def test_empty_batch_trains_to_zero_gradients():
    """No example: nothing to route, and the weight's gradient is zero (written by the kernel, not left unset)."""
    plain, fast = twin_models()
    for model in (plain, fast):
        output = model(PIXELS[:0], labels=torch.zeros(0, dtype=torch.long), output_routing_weights=True)
        (output.loss + output.routing_weights.sum()).backward()
    layers = [model.capsnet.members[0].class_capsules for model in (plain, fast)]
    for name in ("weight", "bias"):
        grads = [getattr(layer, name).grad for layer in layers]
        torch.testing.assert_close(grads[1], grads[0])
        assert not grads[1].any()


def test_kernel_refuses_bad_calls_with_an_error_instead_of_crashing():
    """The C++ side checks its sizes and buffers itself (a zero capsule dimension once crashed the process); the op
    checks what the C side cannot see (dtypes, devices, shapes that do not fit)."""
    library = load_kernel_library()
    assert library.capsnet_route(None) == b"no arguments"
    assert library.capsnet_pack_weight(None) == b"no arguments"
    assert library.capsnet_squash_primary(None) == b"no arguments"
    no_positions = cpu_routing_kernel.PrimaryCall(batch=1, types=2, capsule_dim=3)
    assert library.capsnet_squash_primary_backward(no_positions) == (
        b"the capsule types, their dimension and the positions must be positive"
    )
    assert library.capsnet_route_backward(cpu_routing_kernel.RoutingCall()) == b"there are no input capsules"
    path = CpuRoutingKernel().library_path
    capsules, weight = torch.rand(2, 10, 4), torch.rand(10, 3, 5, 4)
    refusals = {
        "the class capsules' dimension is not positive": (capsules, torch.rand(10, 3, 0, 4), None, 3),
        "there are no class capsules": (capsules, torch.rand(10, 0, 5, 4), None, 3),
        "the input capsules' dimension is not positive": (torch.rand(2, 10, 0), torch.rand(10, 3, 5, 0), None, 3),
        "there are no input capsules": (torch.rand(2, 0, 4), torch.rand(0, 3, 5, 4), None, 3),
        "routing needs at least one iteration": (capsules, weight, None, 0),
    }
    for message, (capsules_, weight_, bias, iterations) in refusals.items():
        with pytest.raises(RuntimeError, match=f"refused the call: {message}"):
            route_op(capsules_, weight_, bias, iterations, False, 1e-9, False, False, False, path)
    mismatches = {
        "float32 CPU tensors": (capsules.double(), weight.double(), None),
        r"do not fit the weight \(10, 3, 5, 4\)": (torch.rand(2, 9, 4), weight, None),
        r"the bias \(5, 3\) does not fit": (capsules, weight, torch.rand(5, 3)),
        r"must be \[I, J, K, A\]": (capsules, torch.rand(10, 3, 5), None),
    }
    for message, (capsules_, weight_, bias) in mismatches.items():
        with pytest.raises(ValueError, match=message):
            route_op(capsules_, weight_, bias, 3, False, 1e-9, False, False, False, path)
    with pytest.raises(ValueError, match=r"the packed weight \(10, 3, 5, 4\) is not pack_class_capsule_weight's"):
        torch.ops.capsnet_hf.route_class_capsules(
            capsules, weight, weight, None, 3, False, 1e-9, False, False, False, path
        )
    backward_refusals = {
        True: ("gradients .* do not fit the outputs", torch.rand(2, 3, 4)),  # poses' gradient of the wrong size
        False: ("not what route_class_capsules kept for this backward", torch.rand(2, 3, 5)),
    }
    for keep_for_backward, (message, grad_poses) in backward_refusals.items():
        packed_weight, (_, _, record) = route_op(
            capsules, weight, None, 3, False, 1e-9, False, keep_for_backward, False, path
        )
        assert record.shape == (2, 3 * (2 * 16 + 2 * 3 * 5) if keep_for_backward else 0)  # J ((T - 1) P + 2 T K)
        with pytest.raises(ValueError, match=message):
            torch.ops.capsnet_hf.route_class_capsules_backward(
                capsules,
                weight,
                packed_weight,
                record,
                None,
                grad_poses,
                torch.rand(2, 3, 10),
                3,
                False,
                1e-9,
                False,
                False,
                path,
            )


def test_argument_struct_layouts_must_agree():
    """The ctypes mirror of the C argument struct is checked against the built library's layout when it is loaded."""
    library = load_kernel_library()
    for structure in (cpu_routing_kernel.RoutingCall, cpu_routing_kernel.PrimaryCall):
        cpu_routing_kernel.check_call_layout(library, structure)

        class Reordered(ctypes.Structure):
            c_name = structure.c_name
            _fields_ = [structure._fields_[1], structure._fields_[0], *structure._fields_[2:]]

        with pytest.raises(KernelBuildError, match="takes another argument layout than Reordered describes"):
            cpu_routing_kernel.check_call_layout(library, Reordered)

    class Unknown(ctypes.Structure):
        c_name = "CapsnetUnknownCall"
        _fields_ = cpu_routing_kernel.PrimaryCall._fields_

    with pytest.raises(KernelBuildError, match="C: no such struct"):
        cpu_routing_kernel.check_call_layout(library, Unknown)


def test_routing_record_is_kept_only_for_a_backward(monkeypatch):
    """The forward writes the routing record its backward reads only where autograd will need it."""
    kept = []
    original = cpu_routing_kernel._run

    def recording(entry, call):
        if entry.__name__ == "capsnet_route":
            kept.append(bool(call.record))
        return original(entry, call)

    monkeypatch.setattr(cpu_routing_kernel, "_run", recording)
    plain, fast = twin_models()
    with torch.no_grad():
        fast(PIXELS)
    fast(PIXELS)  # parameters that require grad: a backward may follow
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    fast(PIXELS)
    fast(PIXELS.clone().requires_grad_())  # only the pixels' gradient wanted
    assert kept == [False, True, False, True]


def test_changed_weights_are_repacked():
    plain, fast = twin_models()
    with torch.no_grad():
        fast(PIXELS)  # packs the weight
        for model in (plain, fast):
            model.capsnet.members[0].class_capsules.weight.mul_(-1.5)
        torch.testing.assert_close(fast(PIXELS).logits, plain(PIXELS).logits, rtol=1e-5, atol=1e-6)
        fast.load_state_dict(CapsNetForImageClassification(small_config()).state_dict())
        plain.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(PIXELS).logits, plain(PIXELS).logits, rtol=1e-5, atol=1e-6)


def test_weights_updated_without_a_version_bump_are_seen():
    """torch's fused Adam updates parameters in place without bumping their version: nothing may be cached on it."""
    plain, fast = twin_models()
    for model in (plain, fast):
        with torch.no_grad():
            model(PIXELS)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
        model(PIXELS, labels=torch.tensor([0, 1, 2, 3, 1])).loss.backward()
        weight = model.capsnet.members[0].class_capsules.weight
        version = weight._version
        optimizer.step()
        assert weight._version == version
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(PIXELS).logits, plain(PIXELS).logits, rtol=1e-4, atol=1e-5)


def test_copies_pickles_and_saved_models(tmp_path):
    plain, fast = twin_models()
    with torch.no_grad():
        expected = plain(PIXELS).logits
        fast(PIXELS)
        copied = copy.deepcopy(fast)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        unpickled = torch.load(buffer, weights_only=False)
        for model in (copied, unpickled):
            assert model.capsnet.members[0].class_capsules.routing_kernel is not None
            assert model.capsnet.members[0].primary_capsules.squash_kernel is not None
            torch.testing.assert_close(model(PIXELS).logits, expected, rtol=1e-5, atol=1e-6)
    fast.save_pretrained(tmp_path)  # the kernel is not part of the model's files
    reloaded = CapsNetForImageClassification.from_pretrained(tmp_path)
    assert reloaded.capsnet.members[0].class_capsules.routing_kernel is None
    assert reloaded.capsnet.members[0].primary_capsules.squash_kernel is None


def test_capsules_that_do_not_fit_the_weight_are_refused():
    _, fast = twin_models()
    layer = fast.capsnet.members[0].class_capsules
    with torch.no_grad(), pytest.raises(ValueError, match=r"do not fit .* expected \(batch, 32, 4\)"):
        layer(torch.rand(2, 31, 4))


def test_model_without_capsule_layers_is_refused():
    with pytest.raises(ValueError, match="no CapsNet class-capsule layer"):
        enable_cpu_routing_kernel(torch.nn.Linear(2, 2))


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-for-capsnet")
    model = CapsNetModel(small_config())
    with pytest.raises(KernelBuildError, match="needs a C\\+\\+ compiler.*no-such-compiler-for-capsnet"):
        enable_cpu_routing_kernel(model, cache_dir=str(tmp_path / "cache"))
    assert model.members[0].class_capsules.routing_kernel is None
    assert not (tmp_path / "cache").exists()


def test_compile_error_leaves_nothing_behind(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text('extern "C" int capsnet_lanes() { return }\n')
    monkeypatch.setattr(cpu_routing_kernel, "KERNEL_SOURCE", broken)
    cache = tmp_path / "cache"
    with pytest.raises(KernelBuildError, match="compiling the CPU routing kernel with .* failed:\n.*error"):
        load_kernel_library(str(cache))
    assert list(cache.iterdir()) == []


def test_compiler_without_openmp_builds_a_single_threaded_kernel(tmp_path, monkeypatch, caplog):
    assert load_kernel_library().capsnet_threaded() == 1  # the default build has OpenMP
    torch.manual_seed(0)
    plain = CapsNetForImageClassification(small_config()).eval()
    fast = copy.deepcopy(plain)
    monkeypatch.setattr(cpu_routing_kernel, "OPENMP_FLAGS", ("-fno-such-openmp-option",))
    with caplog.at_level("WARNING", logger="capsnet_hf.kernels.cpu_routing"):
        enable_cpu_routing_kernel(fast, cache_dir=str(tmp_path / "cache"))
    assert "built it single-threaded" in caplog.text
    assert load_kernel_library(str(tmp_path / "cache")).capsnet_threaded() == 0
    with torch.no_grad():
        torch.testing.assert_close(fast(PIXELS).logits, plain(PIXELS).logits, rtol=1e-5, atol=1e-6)


def test_corrupt_cached_library_is_a_clear_error(tmp_path):
    built = tmp_path / "built"
    load_kernel_library(str(built))
    (library,) = built.iterdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / library.name).write_bytes(b"not a shared library")  # a new file: the loaded one stays mapped
    with pytest.raises(KernelBuildError, match="cannot load the CPU routing kernel .*delete it to rebuild"):
        load_kernel_library(str(corrupt))
    (corrupt / library.name).unlink()
    load_kernel_library.cache_clear()
    assert load_kernel_library(str(corrupt)).capsnet_lanes() in (8, 16)  # rebuilt


def test_command_line_modes(tmp_path, monkeypatch):
    """`--cpu_routing_kernel` of capsnet-train / capsnet-eval: auto keeps the torch path where the kernel would be
    slower (a build without OpenMP on several threads) or cannot run; true insists; false never attaches it."""

    def kernel_in_use(model):
        return model.capsnet.members[0].class_capsules.routing_kernel is not None

    assert [cpu_routing_kernel_mode(v) for v in ("AUTO", "yes", "0", True, False)] == [
        "auto", "true", "false", "true", "false"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--cpu_routing_kernel takes auto, true or false, got 'sometimes'"):
        cpu_routing_kernel_mode("sometimes")
    model = CapsNetForImageClassification(small_config())
    assert use_cpu_routing_kernel(model, "false", "cpu") is None and not kernel_in_use(model)
    assert use_cpu_routing_kernel(model, "auto", "cuda") is None and not kernel_in_use(model)
    assert "no effect on cuda" in use_cpu_routing_kernel(model, "true", "cuda") and not kernel_in_use(model)
    assert use_cpu_routing_kernel(nn.Linear(2, 2), "auto", "cpu") is None  # no class capsules: nothing to do
    with pytest.raises(ValueError, match="no CapsNet class-capsule layer"):
        use_cpu_routing_kernel(nn.Linear(2, 2), "true", "cpu")
    monkeypatch.setenv("CAPSNET_HF_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_routing_kernel, "OPENMP_FLAGS", ("-fno-such-openmp-option",))
    load_kernel_library.cache_clear()
    try:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert "built without OpenMP (1 thread, not 2)" in use_cpu_routing_kernel(model, "auto", "cpu")
        assert not kernel_in_use(model)
        assert "CPU routing kernel" in use_cpu_routing_kernel(model, "true", "cpu") and kernel_in_use(model)
        disable_cpu_routing_kernel(model)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        assert "CPU routing kernel" in use_cpu_routing_kernel(model, "auto", "cpu") and kernel_in_use(model)
    finally:
        load_kernel_library.cache_clear()


def test_command_line_modes_without_a_compiler(no_compiler):
    model = CapsNetForImageClassification(small_config())
    assert "torch path, the CPU routing kernel is unavailable (" in use_cpu_routing_kernel(model, "auto", "cpu")
    assert model.capsnet.members[0].class_capsules.routing_kernel is None
    with pytest.raises(KernelBuildError, match="needs a C\\+\\+ compiler"):
        use_cpu_routing_kernel(model, "true", "cpu")
