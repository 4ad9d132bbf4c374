"""The reproduction tooling: `--mixed_precision auto`, data archives (.npz), `--config_overrides`, the time budget
and evaluation interval of capsnet-train, learning curves, and benchmarks/reproduce_paper.py on a tiny budget."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from test_data import write_dataset
from test_train import TINY_MODEL, fresh_accelerate_state, subprocess_env, tiny_args  # noqa: F401

from capsnet_hf.cli import DataError
from capsnet_hf.data.splits import load_splits, save_npz_splits
from capsnet_hf.paper import learning_curve
from capsnet_hf.train import main, train
from capsnet_hf.training import mixed_precision
from capsnet_hf.training.mixed_precision import resolve_mixed_precision


def no_native_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def bf16_speedup(monkeypatch, speedup: float) -> list[int]:
    """Make the start-up probe report `speedup`; returns a list that counts its calls."""
    calls = []
    monkeypatch.setattr(mixed_precision, "cpu_bf16_speedup", lambda: calls.append(1) or speedup)
    return calls


@pytest.mark.parametrize("native, speedup", [(True, 2.1), (True, 1.2), (True, 0.9), (False, 2.1)])
def test_auto_precision_follows_the_cpu(monkeypatch, native, speedup):
    """bf16 only on a CPU with native bf16 whose probe ran it clearly faster; no probe on the others."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    no_native_bf16(monkeypatch, native)
    probes = bf16_speedup(monkeypatch, speedup)
    precision, reason = resolve_mixed_precision("auto", "cpu")
    expected = "bf16" if native and speedup >= mixed_precision.BF16_MIN_SPEEDUP else "no"
    assert precision == expected
    if native:
        assert probes == [1]
        assert reason == (
            f"auto: this CPU has native bf16 (AVX512-BF16) and ran a convolution {speedup:.2f}x faster in bf16"
            if expected == "bf16"
            else "auto: this CPU has native bf16 (AVX512-BF16) but ran a convolution only 0.90x as fast in bf16 as "
            "in float32; float32"
        )
    else:
        assert probes == [] and reason.startswith("auto: this CPU has no native")
    assert resolve_mixed_precision("no", "cpu")[0] == "no" and resolve_mixed_precision("bf16", "cpu")[0] == "bf16"


BROADCAST_PROBE = """
import sys
import torch.distributed as dist
from capsnet_hf.training import mixed_precision

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
mixed_precision.cpu_bf16_speedup = lambda: 2.0 if rank == 0 else 0.5  # the processes' probes disagree
print(mixed_precision._main_process_speedup())
dist.destroy_process_group()
"""


def test_bf16_probe_of_the_main_process_decides_for_every_process(tmp_path):
    init_method = (tmp_path / "rendezvous").as_uri()
    command = [sys.executable, "-c", BROADCAST_PROBE]
    processes = [
        subprocess.Popen([*command, str(rank), init_method], stdout=subprocess.PIPE, text=True, env=subprocess_env())
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert [output.strip() for output in outputs] == ["2.0", "2.0"]


def test_bf16_probe_measures_without_touching_the_global_generator():
    state = torch.get_rng_state()
    speedup = mixed_precision.cpu_bf16_speedup(repeats=1)
    assert 0 < speedup < float("inf")
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_precision_on_cuda_and_from_the_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    for supported, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_mixed_precision("auto", "cuda")[0] == expected
    assert resolve_mixed_precision("auto", "mps")[0] == "no"
    no_native_bf16(monkeypatch, False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default is not a choice
    assert resolve_mixed_precision("auto", "cpu")[0] == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto", "cpu") == ("fp16", "auto: set by accelerate launch or its config")
    assert resolve_mixed_precision("no", "cpu")[0] == "no"
    with pytest.raises(ValueError, match="--mixed_precision must be one of"):
        resolve_mixed_precision("fp8", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_capsnet_train_and_eval_report_the_chosen_precision(tmp_path, monkeypatch, capsys, native):
    from accelerate.state import AcceleratorState, GradientState

    from capsnet_hf.evaluate import evaluate

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    no_native_bf16(monkeypatch, native)
    bf16_speedup(monkeypatch, 2.0)
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(16, 16))
    results = train(tiny_args(dataset, tmp_path / "out", "--max_train_steps", "1"))
    expected = "bf16" if native else "no"
    assert results["mixed_precision"] == expected
    out = capsys.readouterr().out
    assert ("precision: bf16 autocast (auto: this CPU has native bf16" in out) == native
    assert ("precision: float32 (auto: this CPU has no native bf16" in out) == (not native)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| mixed precision | {expected} |" in card
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    evaluate(["--model_name_or_path", str(tmp_path / "out"), "--dataset_name", dataset])
    assert ("precision: bf16 autocast" in capsys.readouterr().err) == native


def test_npz_archive_round_trip_and_training_without_datasets_folder(tmp_path):
    dataset = write_dataset(tmp_path / "data", {"train": 24, "test": 8}, size=(16, 16), class_names=list("abcd"))
    splits = load_splits(dataset, "train", "test")
    archive = str(tmp_path / "archive" / "digits.npz")
    save_npz_splits(splits, archive)
    loaded = load_splits(archive, "train", "auto")
    assert loaded.eval_split == "test" and loaded.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert torch.equal(loaded.train.images, splits.train.images) and torch.equal(
        loaded.eval.labels, splits.eval.labels
    )
    subset = load_splits(archive, "train", None, max_train_samples=5, seed=1)
    assert len(subset.train) == 5 and subset.eval is None
    results = train(tiny_args(archive, tmp_path / "out", "--max_train_steps", "2"))
    assert results["eval_num_examples"] == 8
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"}


def test_npz_archive_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(str(tmp_path / "missing.npz"), "train", "test")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read data archive"):
        load_splits(str(broken), "train", "test")
    no_names = tmp_path / "no_names.npz"
    np.savez(no_names, train_images=np.zeros((2, 1, 4, 4), np.uint8), train_labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="no class_names"):
        load_splits(str(no_names), "train", None)
    good = tmp_path / "good.npz"
    np.savez(good, train_images=np.zeros((2, 1, 4, 4), np.uint8), train_labels=np.array([0, 1]), class_names=["x"])
    with pytest.raises(DataError, match=r"labels of split 'train'.*\[0, 1\)"):
        load_splits(str(good), "train", None)
    with pytest.raises(DataError, match="no split 'test'"):
        load_splits(str(good), None, "test")
    with pytest.raises(DataError, match="holds \\[4, 4\\] images, not \\[8, 8\\]"):
        np.savez(good, train_images=np.zeros((2, 1, 4, 4), np.uint8), train_labels=np.array([0, 0]), class_names=["x"])
        load_splits(str(good), "train", None, image_size=[8, 8])


def test_config_overrides_set_any_field_and_are_checked(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(16, 16))
    train(
        tiny_args(
            dataset,
            tmp_path / "out",
            "--max_train_steps",
            "1",
            "--config_overrides",
            "initializer_range=0.02,bias_init=0.0",
        )
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["initializer_range"] == 0.02 and config["bias_init"] == 0.0
    for overrides, message in (
        ("no_such_field=1", "isn't in the original config"),
        ("routing_iterations=0", "routing_iterations must be a positive integer"),
        ("capsule_dim=abc", "invalid literal"),
    ):
        code = main(tiny_args(dataset, tmp_path / "bad", "--max_train_steps", "1", "--config_overrides", overrides))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith("capsnet-train: error: --config_overrides") and message in err
        assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_max_train_minutes_stops_the_run_and_eval_steps_sets_the_interval(tmp_path):
    dataset = write_dataset(tmp_path / "data", {"train": 32, "test": 8}, size=(16, 16))
    results = train(
        tiny_args(dataset, tmp_path / "timed", "--num_train_epochs", "1000", "--max_train_minutes", "1e-9")
    )
    assert results["train_steps"] == 1 and results["eval_step"] == 1
    train_results = json.loads((tmp_path / "timed" / "train_results.json").read_text())
    assert train_results["train_steps"] == 1 and train_results["epochs"] == 0.25
    assert train_results["train_loss_last"] is not None  # the last step's window is logged
    assert "| training steps | 1 |" in (tmp_path / "timed" / "README.md").read_text()

    train(tiny_args(dataset, tmp_path / "every3", "--max_train_steps", "7", "--eval_steps", "3"))
    log = [json.loads(line) for line in (tmp_path / "every3" / "training_log.jsonl").read_text().splitlines()]
    evaluations = [(entry["step"], entry["epoch"]) for entry in log if "eval_accuracy" in entry]
    assert evaluations == [(3, 0.75), (6, 1.5), (7, 1.75)]
    for flag in ("--eval_steps", "--max_train_minutes"):
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_args(dataset, tmp_path / "bad", flag, "0"))
        assert exit_info.value.code == 2


def test_learning_curve_table_plot_and_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 10, "train_loss": 0.5, "epoch": 1.0},
        {"step": 10, "eval_accuracy": 0.981, "eval_error_percent": 1.9, "epoch": 1.0},
        {"step": 20, "eval_accuracy": 0.99, "epoch": 2.0},
        {"step": 20, "eval_accuracy": 0.9912, "epoch": 2.0},  # a resumed run evaluated step 20 again
    ]
    (run / "training_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert learning_curve.read_curve(str(run)) == pytest.approx({1.0: 98.1, 2.0: 99.12})
    table = learning_curve.markdown_table({"ours": {1.0: 98.1, 2.0: 99.12}}, {"peer": {1: 99.0, 5: 99.3}})
    assert table.splitlines()[0] == "| epoch | ours | peer |"
    assert "| 1 | 98.10 | 99.00 |" in table and "| 2 | 99.12 |  |" in table
    png = tmp_path / "figures" / "curve.png"
    assert learning_curve.main([str(run), "--output", str(png), "--markdown"]) == 0
    assert "XifengGuo/CapsNet-Pytorch" in capsys.readouterr().out
    assert Image.open(png).size[0] > 300
    with pytest.raises(SystemExit) as exit_info:
        learning_curve.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "has no training_log.jsonl" in capsys.readouterr().err
    (run / "training_log.jsonl").write_text('{"step": 1, "train_loss": 0.1}\n')
    with pytest.raises(SystemExit):
        learning_curve.main([str(run)])
    assert "holds no evaluation" in capsys.readouterr().err


def run_reproduction(*args, timeout=600):
    script = REPO_ROOT / "benchmarks" / "reproduce_paper.py"
    return subprocess.run(
        [sys.executable, str(script), *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def mnist_archive(tmp_path_factory):
    """A 10-class 28x28 archive written by the script's --prepare_data from a tiny datasets folder."""
    folder = tmp_path_factory.mktemp("mnist-like")
    labels = {"train": [index % 10 for index in range(40)], "test": [index % 10 for index in range(20)]}
    dataset = write_dataset(folder / "data", {"train": 40, "test": 20}, size=(28, 28), labels=labels,
                            class_names=[str(digit) for digit in range(10)])  # fmt: skip
    archive = folder / "mnist.npz"
    result = run_reproduction("--prepare_data", dataset, "--data", str(archive))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "40 training and 20 test images" in result.stdout
    return archive


REPRODUCTION_MODEL = [
    "--conv1_channels", "8", "--primary_capsule_types", "2", "--capsule_dim", "4",
    "--decoder_hidden_sizes", "16", "32", "--per_device_eval_batch_size", "16",
]  # fmt: skip


def test_reproduce_paper_dry_run_writes_the_model_folder_and_report(tmp_path, mnist_archive):
    output = tmp_path / "paper"
    result = run_reproduction(
        "--data", str(mnist_archive), "--output_dir", str(output), "--minutes", "0.05", "--batch_size", "8",
        "--commit", "abc123", *REPRODUCTION_MODEL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output / "reproduction.json").read_text())
    assert report["commit"] == "abc123" and report["batch_size"] == 8 and report["torch_compile"] is False
    assert report["machine"]["torch"] == torch.__version__ and report["paper"]["mnist_test_error_percent"] == 0.25
    mnist = report["stages"]["mnist"]
    assert mnist["train_steps"] >= 1 and mnist["eval_num_examples"] == 20 and 0 <= mnist["test_accuracy_fp32"] <= 1
    folder = output / "capsnet-mnist"
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "reconstructions.png"):
        assert (folder / name).is_file(), name
    assert Image.open(folder / "perturbation.png").size[0] > 100
    config = json.loads((folder / "config.json").read_text())
    assert config["conv1_channels"] == 8 and config["margin_loss_reduction"] == "official"  # the mnist recipe
    assert "eval_accuracy" in (folder / "README.md").read_text() or "accuracy" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_reproduce_paper_with_the_paper_experiments(tmp_path, mnist_archive):
    output = tmp_path / "paper"
    result = run_reproduction(
        "--data", str(mnist_archive), "--output_dir", str(output), "--minutes", "0.05", "--batch_size", "4",
        "--paper_experiments", "--max_eval_samples", "4", "--variants_per_digit", "1", *REPRODUCTION_MODEL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((output / "reproduction.json").read_text())["stages"]
    assert list(stages) == ["mnist", "multimnist", "expanded_capsnet", "expanded_baseline"]
    assert stages["multimnist"]["metric"].startswith("both digits")
    for name in ("expanded_capsnet", "expanded_baseline"):
        assert stages[name]["train_steps"] >= 1 and 0 <= stages[name]["affnist_style_accuracy"] <= 1
    baseline = json.loads((output / "expanded-baseline" / "config.json").read_text())
    assert baseline["model_type"] != "capsnet"  # CapsNet options went to the CapsNet runs only


def test_reproduce_paper_bad_input_is_one_line(tmp_path):
    result = run_reproduction("--data", str(tmp_path / "none.npz"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"reproduce_paper.py: error: --data {str(tmp_path / 'none.npz')!r} does not exist (write it with --prepare_data)"
    )
    assert not (tmp_path / "out").exists()


def test_torch_compile_trains_through_dynamo(tmp_path):
    """--torch_compile traces the training forward (eager backend here: dynamo's graph capture without a compiler)."""
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(16, 16))
    argv = tiny_args(dataset, tmp_path / "out", "--max_train_steps", "2", "--mixed_precision", "no")
    compiled = train([*argv, "--torch_compile", "--torch_compile_backend", "eager", "--cpu_routing_kernel", "false"])
    assert compiled["train_steps"] == 2 and compiled["eval_num_examples"] == 8
    # The CPU kernel is a registered op: dynamo traces it too.
    argv = tiny_args(dataset, tmp_path / "kernel", "--max_train_steps", "2", "--mixed_precision", "no")
    with_kernel = train([*argv, "--torch_compile", "--torch_compile_backend", "eager", "--cpu_routing_kernel", "true"])
    assert with_kernel["train_steps"] == 2


def test_reproduce_paper_stops_with_the_failing_stage_line(tmp_path, mnist_archive):
    result = run_reproduction(
        "--data", str(mnist_archive), "--output_dir", str(tmp_path / "out"), "--minutes", "0.05", "--learning_rate=-1"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "reproduce_paper.py: error: capsnet_hf.train failed: capsnet-train: error: --learning_rate must lie in "
        "(0.0, inf), got -1.0"
    )
    assert not (tmp_path / "out" / "reproduction.json").exists()


def test_gpu_reproduction_script_without_arguments_is_one_line():
    script = REPO_ROOT / "benchmarks" / "gpu_reproduction.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "gpu_reproduction.sh: error: usage: gpu_reproduction.sh RESULTS_DIR COMMIT [reproduce_paper.py options]"
    )


def test_reproduce_paper_keeps_the_finished_stages_when_a_later_one_fails(tmp_path, mnist_archive, monkeypatch):
    """The report is rewritten after every stage: a failure (or the call's time limit) later keeps what finished."""
    from test_benchmark import load_script

    script = load_script("reproduce_paper")
    trained = []

    def run_training(argv):
        if trained:
            raise script.UsageError("capsnet_hf.train failed: out of memory")
        trained.append(argv)
        return {"train_steps": 3, "eval_accuracy": 0.5, "eval_error_percent": 50.0, "eval_num_examples": 20}

    monkeypatch.setattr(script, "run_training", run_training)
    monkeypatch.setattr(script, "save_perturbation_figure", lambda *args: None)
    monkeypatch.setattr(script, "evaluate", lambda *args: {"accuracy": 0.5, "error_percent": 50.0})
    output = tmp_path / "out"
    argv = ["--data", str(mnist_archive), "--output_dir", str(output), "--paper_experiments", "--commit", "abc"]
    assert script.main(argv) == 2
    report = json.loads((output / "reproduction.json").read_text())
    assert list(report["stages"]) == ["mnist"] and report["stages"]["mnist"]["train_steps"] == 3
    assert report["stages"]["mnist"]["test_accuracy_fp32"] == 0.5
    assert report["failed"] == "capsnet_hf.train failed: out of memory" and report["wall_seconds"] >= 0
    assert not (output / "reproduction.json.partial").exists()
