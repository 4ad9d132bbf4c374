"""The benchmark scripts run end to end on tiny cases and write what they print (no timing assertions: speed
figures belong to the benchmarks, not to the tests)."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import `benchmarks/<name>.py` as its own module (the scripts import each other from their folder)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KERNEL_CASE = ["--threads", "1", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--no-saver"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_capsnet")


@pytest.fixture(scope="module")
def throughput():
    return load_script("bench_training_throughput")


def test_one_small_case_writes_every_timing_and_memory(bench, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["--threads", "1", "--batch-size", "2", "--image-size", "28", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*argv, "--plain-adam", "--cpu-routing-kernel", "--memory", "--json", str(output)]) == 0
    result = json.loads(output.read_text())["results"][0]
    timed = {
        "conv_fwd",
        "conv_fwd_bwd",
        "infer",
        "infer_kernel",
        "train",
        "train_kernel",
        "train_plain_adam",
        "train_saver",
    }
    assert set(result["times"]) == timed
    assert all(t["median_ms"] > 0 for t in result["times"].values())
    for name in ("infer", "infer_kernel", "train", "train_kernel", "train_plain_adam", "train_saver"):
        assert result["ratio_to_conv_bound"][name]["median"] > 0
    assert all(result["memory"][name]["peak_mib"] > 0 for name in ("train", "train_saver", "train_kernel"))
    printed = capsys.readouterr().out
    assert "train_plain_adam" in printed and "kernel MiB" in printed


def test_cpu_keep_freed_memory_sets_the_commands_allocator_before_the_timings(bench, tmp_path, monkeypatch, capsys):
    calls = []

    def keep_freed_cpu_memory(enabled, device):
        calls.append((enabled, device.type))
        return "CPU memory: kept"

    monkeypatch.setattr(bench, "keep_freed_cpu_memory", keep_freed_cpu_memory)
    monkeypatch.setattr(bench, "bench_case", lambda *args: calls.append("timed") or {"times": {}})
    monkeypatch.setattr(bench, "print_table", lambda results: None)
    argv = [*KERNEL_CASE, "--cpu-routing-kernel", "false"]
    assert bench.main(argv) == 0 and calls == ["timed"]
    calls.clear()
    assert bench.main([*argv, "--cpu-keep-freed-memory", "--json", str(tmp_path / "r.json")]) == 0
    assert calls == [(True, "cpu"), "timed"]
    assert "CPU memory: kept" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["args"]["cpu_keep_freed_memory"] == "True"


def test_rounds_are_timed_in_shuffled_orders(bench):
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times, cpu_times = bench.time_interleaved(functions, repeats=6, warmup=1, device=torch.device("cpu"))
    assert all(len(times[name]) == len(cpu_times[name]) == 6 for name in functions)
    rounds = [tuple(calls[start : start + 4]) for start in range(4, len(calls), 4)]  # after the warm-up round
    assert all(sorted(order) == list("abcd") for order in rounds)
    predecessors = set(zip(calls[4:-1], calls[5:], strict=True))
    assert len(predecessors) > 4  # a fixed order would give each function a single predecessor


@pytest.mark.parametrize(
    "argv",
    [["--batch-size", "0"], ["--image-size", "24"], ["--repeats", "0"], ["--device", "cuda", "--cpu-routing-kernel"]],
    ids=["batch", "size", "repeats", "kernel-on-cuda"],
)
def test_bad_flags_are_refused(bench, argv):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(argv)
    assert error.value.code == 2


def test_training_throughput_runs_every_mode_and_profiles(throughput, tmp_path, capsys):
    output = tmp_path / "throughput.json"
    argv = ["--threads", "1", "--synthetic-examples", "12", "--batch-size", "4", "--steps", "2", "--windows", "2"]
    argv += ["--warmup", "1", "--modes", "fp32", "bf16", "fp32-compile", "--compile-backend", "aot_eager"]
    assert throughput.main([*argv, "--profile", "--profile-steps", "1", "--json", str(output)]) == 0
    payload = json.loads(output.read_text())
    assert payload["data"].startswith("synthetic: 12 ")
    results = {r["mode"]: r for r in payload["results"]}
    assert set(results) == {"fp32", "bf16", "fp32-compile"}
    for result in results.values():
        assert result["batch_size"] == 4 and result["steps_timed"] == 4
        assert 0 < result["images_per_s"]["min"] <= result["images_per_s"]["median"] <= result["images_per_s"]["max"]
        assert result["epoch_s"] == pytest.approx(12 / result["images_per_s"]["median"])
        assert 0 < result["loss_last_window"] < 10
        assert "Self CPU" in result["profile"]
    assert results["fp32-compile"]["compile_s"] > 0 and "compile_s" not in results["fp32"]
    assert "fp32-compile" in capsys.readouterr().out


def test_training_throughput_memory_formats_and_compile_mode(throughput, tmp_path):
    """The GPU knobs run on the CPU too: every mode in NCHW and NHWC convolutions in one run, and torch.compile's
    mode passed through."""
    output = tmp_path / "throughput.json"
    argv = ["--threads", "1", "--synthetic-examples", "8", "--batch-size", "4", "--steps", "1", "--windows", "1"]
    argv += ["--warmup", "0", "--modes", "fp32", "fp32-compile", "--compile-backend", "aot_eager"]
    argv += ["--memory-formats", "contiguous", "channels_last", "--compile-mode", "max-autotune-no-cudagraphs"]
    assert throughput.main([*argv, "--json", str(output)]) == 0
    payload = json.loads(output.read_text())
    cases = {(r["mode"], r["memory_format"]) for r in payload["results"]}
    assert cases == {(mode, form) for mode in ("fp32", "fp32-compile") for form in ("contiguous", "channels_last")}
    assert all(0 < r["loss_last_window"] < 10 for r in payload["results"])
    assert payload["args"]["compile_mode"] == "max-autotune-no-cudagraphs"
    args = throughput.parse_args(argv)
    data, _ = throughput.load_data(args, torch.device("cpu"))
    encoder = throughput.TrainingSteps("fp32", data, 4, args, "channels_last").model.capsnet.members[0]
    assert encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert encoder.primary_capsules.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert encoder.class_capsules.weight.is_contiguous()
    with pytest.raises(SystemExit):
        throughput.parse_args(["--compile-mode", "fastest"])


def test_training_throughput_refuses_bad_input(throughput, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        throughput.parse_args(["--modes", "fp16"])
    assert error.value.code == 2
    with pytest.raises(SystemExit):
        throughput.parse_args(["--steps", "0"])
    assert throughput.main(["--synthetic-examples", "4", "--batch-size", "8", "--json", str(tmp_path / "r.json")]) == 2
    assert "batch size 8 exceeds the 4 training images" in capsys.readouterr().err
    assert throughput.main(["--dataset", str(tmp_path / "missing"), "--json", str(tmp_path / "r.json")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_capsnet", "bench_training_throughput"])
def test_cuda_without_cuda_is_a_clear_error(script, tmp_path, capsys):
    assert load_script(script).main(["--device", "cuda", "--json", str(tmp_path / "r.json")]) == 2
    assert "--device cuda requested but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "script, argv",
    [
        ("bench_capsnet", ["--compile", "--no-saver", "--image-size", "28", "--repeats", "1", "--warmup", "0"]),
        ("bench_training_throughput", ["--modes", "fp32-compile", "--synthetic-examples", "4", "--steps", "1"]),
    ],
)
def test_every_compiled_case_gets_its_own_static_graphs(script, argv, tmp_path):
    """A second batch size must not recompile the first one's code with a dynamic batch dimension."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect()
    torch.compiler.reset()  # code compiled by earlier tests must not hide a recompile
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        common = ["--threads", "1", "--batch-size", "1", "2", "--compile-backend", "aot_eager"]
        assert load_script(script).main([*argv, *common, "--json", str(tmp_path / "r.json")]) == 0
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
    assert not [message for message in messages if "Recompiling" in message]


def test_kernel_columns_by_default_on_cpu_only_where_it_builds(bench, tmp_path, capsys):
    argv = KERNEL_CASE
    assert bench.parse_args(argv).cpu_routing_kernel == "auto"
    assert bench.parse_args([*argv, "--device", "cuda"]).cpu_routing_kernel == "false"
    assert bench.parse_args([*argv, "--cpu-routing-kernel", "no"]).cpu_routing_kernel == "false"
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--cpu-routing-kernel", "sometimes"])
    assert "--cpu-routing-kernel takes auto, true or false, got 'sometimes'" in capsys.readouterr().err
    for name, extra in (("default", []), ("off", ["--cpu-routing-kernel", "false"])):
        assert bench.main([*argv, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
    times = {
        name: json.loads((tmp_path / f"{name}.json").read_text())["results"][0]["times"] for name in ("default", "off")
    }
    assert {"infer_kernel", "train_kernel"} <= set(times["default"]) and "infer_kernel" not in times["off"]


def test_without_a_compiler_the_default_leaves_the_kernel_columns_out(bench, tmp_path, no_compiler, capsys):
    assert bench.main([*KERNEL_CASE, "--json", str(tmp_path / "r.json")]) == 0
    assert "no CPU routing kernel columns: " in capsys.readouterr().err
    assert "infer_kernel" not in json.loads((tmp_path / "r.json").read_text())["results"][0]["times"]


def test_kernel_that_cannot_be_built_is_a_clear_error(bench, tmp_path, no_compiler, capsys):
    assert bench.main(["--cpu-routing-kernel", "--json", str(tmp_path / "r.json")]) == 2
    assert "needs a C++ compiler" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bench_capsnet_bf16_variants_run_beside_fp32(bench, tmp_path):
    output = tmp_path / "bf16.json"
    assert bench.main([*KERNEL_CASE, "--precision", "fp32", "bf16", "--json", str(output)]) == 0
    times = json.loads(output.read_text())["results"][0]["times"]
    assert {f"{name}_bf16" for name in bench.BF16_VARIANTS} <= set(times) and "train" in times


PEER_SOURCE = """import torch


class Linear(torch.nn.Module):
    def __init__(self, loss=True):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)
        self.loss = loss

    def forward(self, x, labels=None):
        logits = self.fc(x.flatten(1))
        if labels is None:
            return logits
        return torch.nn.functional.cross_entropy(logits, labels) if self.loss else logits
"""


@pytest.fixture
def peer_file(tmp_path):
    """A peer model file as peers.py describes: `Linear()` keeps the contract, `Linear(loss=False)` returns logits
    where a training loss is due."""
    path = tmp_path / "peer.py"
    path.write_text(PEER_SOURCE)
    return path


def test_bench_inference_reports_latency_and_throughput_beside_a_peer(peer_file, tmp_path, capsys):
    inference = load_script("bench_inference")
    output = tmp_path / "inference.json"
    argv = ["--threads", "1", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0", "--precision", "fp32",
            "bf16", "--peer", f"linear={peer_file}:Linear()", "--json", str(output)]  # fmt: skip
    assert inference.main(argv) == 0
    rows = json.loads(output.read_text())["results"]
    names = {row["variant"] for row in rows}
    assert {"torch", "torch_bf16", "peer_linear", "peer_linear_bf16"} <= names
    assert all(row["images_per_second"] > 0 and row["batch_size"] in (1, 2) for row in rows)
    assert "images/s" in capsys.readouterr().out
    assert inference.main(["--peer", "broken"]) == 2


def test_bench_inference_times_the_compiled_model_with_frozen_weights(tmp_path, capsys):
    inference = load_script("bench_inference")
    output = tmp_path / "compiled.json"
    argv = ["--threads", "1", "--batch-sizes", "1", "--repeats", "1", "--warmup", "1", "--no-cpu-routing-kernel",
            "--compile", "--freezing", "--json", str(output)]  # fmt: skip
    assert inference.main(argv) == 0  # the compiled model's class scores equal the eager model's (checked inside)
    rows = {row["variant"]: row for row in json.loads(output.read_text())["results"]}
    assert set(rows) == {"torch", "torch_compiled"}
    assert rows["torch_compiled"]["first_call_s"] > rows["torch_compiled"]["median_ms"] / 1000  # it compiled
    assert "first s" in capsys.readouterr().out
    for bad in (["--freezing"], ["--compile", "--warmup", "0"], ["--compile", "--compile-mode", "fastest"]):
        with pytest.raises(SystemExit) as exit_info:
            inference.main(bad)
        assert exit_info.value.code == 2
    assert "--compile needs --warmup 1 or more" in capsys.readouterr().err


def test_bench_capsnet_times_a_peer_training_step_at_28_px(bench, peer_file, tmp_path, capsys):
    output = tmp_path / "peer.json"
    argv = [*KERNEL_CASE, "--image-size", "28", "30", "--precision", "fp32", "bf16", "--json", str(output)]
    assert bench.main([*argv, "--peer", f"linear={peer_file}:Linear()"]) == 0
    at_28, at_30 = json.loads(output.read_text())["results"]
    assert {"train_peer_linear", "train_peer_linear_bf16"} <= set(at_28["ratio_to_conv_bound"])
    assert not [name for name in at_30["times"] if "peer" in name]
    assert "train_peer_linear_bf16" in capsys.readouterr().out
    output.unlink()
    assert bench.main([*argv, "--peer", f"logits={peer_file}:Linear(loss=False)"]) == 2
    assert "--peer logits: model(pixels, labels) must return the training loss" in capsys.readouterr().err
    assert not output.exists()
    assert bench.main([*argv, "--peer", "broken"]) == 2
    assert bench.main([*argv, "--peer", f"missing={tmp_path / 'missing.py'}:Linear()"]) == 2
    assert "bench_capsnet.py: error: --peer missing: " in capsys.readouterr().err and not output.exists()
