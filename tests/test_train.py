"""capsnet-train end to end on CPU: accuracy on real MNIST, exact resume after SIGKILL, 2-process evaluation, the
saved folder (Auto classes, pipeline, model card) and every bad input refused before training."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATASETS
from safetensors.torch import load_file
from test_data import write_dataset

from capsnet_hf.cli import UsageError
from capsnet_hf.train import main, train
from capsnet_hf.training.arguments import parse_args
from capsnet_hf.training.checkpoints import list_checkpoints
from capsnet_hf.training.optimization import create_optimizer

# A CapsNet small enough for 16x16 CPU tests (18 primary capsules).
TINY_MODEL = [
    "--conv1_channels", "8", "--conv1_kernel_size", "5", "--primary_capsule_types", "2",
    "--primary_capsule_dim", "4", "--primary_kernel_size", "5", "--capsule_dim", "6",
    "--decoder_hidden_sizes", "16", "32",
]  # fmt: skip
MNIST_ACCURACY_FLOOR = 0.87


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_dataset(tmp_path / "data", {"train": 64, "test": 37}, size=(16, 16))


def tiny_args(dataset, output_dir, *extra):
    return [
        "--dataset_name", dataset, "--output_dir", str(output_dir), *TINY_MODEL,
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--report_to", "none",
        "--logging_steps", "2", *extra,
    ]  # fmt: skip


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """150 steps of a small CapsNet on 2,000 real MNIST training digits, evaluated on 500 test digits."""
    from accelerate.state import AcceleratorState, GradientState

    dataset = SHARED_DATASETS / "mnist"
    if not dataset.is_dir():
        pytest.skip(f"the shared MNIST copy is not at {dataset}")
    output_dir = tmp_path_factory.mktemp("mnist") / "capsnet-mnist"
    argv = [
        "--dataset_name", str(dataset), "--dataset_hub_id", "ylecun/mnist", "--output_dir", str(output_dir),
        "--max_train_samples", "2000", "--max_eval_samples", "500", "--max_train_steps", "150",
        "--per_device_train_batch_size", "32", "--learning_rate", "0.003", "--conv1_channels", "16",
        "--primary_capsule_types", "4", "--capsule_dim", "8", "--decoder_hidden_sizes", "64", "128",
        "--seed", "0", "--report_to", "none",
    ]  # fmt: skip
    results = train(argv)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return output_dir, results


def test_mnist_subset_reaches_the_accuracy_floor(mnist_run):
    output_dir, results = mnist_run
    assert results["eval_num_examples"] == 500
    assert results["eval_accuracy"] >= MNIST_ACCURACY_FLOOR
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] == results["eval_accuracy"]
    assert sum(map(sum, eval_results["eval_confusion_matrix"])) == 500
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["train_steps"] == 150 and train_results["train_examples_seen"] == 150 * 32
    log = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    assert any("train_loss" in entry for entry in log) and any("eval_accuracy" in entry for entry in log)


def test_saved_folder_loads_with_auto_classes_and_pipeline(mnist_run, mnist_fixture_images):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    output_dir, _ = mnist_run
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "reconstructions.png").is_file()
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert model.config.id2label[7] == "7" and list(model.config.image_size) == [28, 28]
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    predictions = [classifier(image, top_k=1)[0]["label"] for image, _ in mnist_fixture_images]
    assert predictions == [str(label) for _, label in mnist_fixture_images]
    assert Image.open(output_dir / "reconstructions.png").size[0] > 100


def test_model_card_holds_the_measured_accuracy(mnist_run):
    from huggingface_hub import ModelCard

    output_dir, results = mnist_run
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["ylecun/mnist"]
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == round(results["eval_accuracy"], 6)
    assert "trust_remote_code=True" in card.text and "reconstructions.png" in card.text
    assert f"{results['eval_accuracy']:.4f}" in card.text


def checkpoint_steps(output_dir) -> list[int]:
    """Steps of the complete checkpoints in `output_dir`; the run rotates them, so poll this rather than one name."""
    return [int(os.path.basename(path)[5:]) for path in list_checkpoints(str(output_dir))]


def test_resume_after_sigkill_reproduces_the_uninterrupted_weights(tmp_path, tiny_dataset):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run uses one thread too: same float reductions
    try:
        killed_dir = tmp_path / "killed"
        command = [sys.executable, "-m", "capsnet_hf.train", *tiny_args(tiny_dataset, killed_dir)]
        command += ["--max_train_steps", "100000", "--checkpointing_steps", "3", "--seed", "3"]
        log_path = tmp_path / "killed.log"
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the run
            process = subprocess.Popen(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 240
                while not checkpoint_steps(killed_dir) or max(checkpoint_steps(killed_dir)) < 6:
                    assert process.poll() is None, log_path.read_text()[-2000:]
                    assert time.time() < deadline, "no checkpoint after 240 s"
                    time.sleep(0.05)
            finally:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        assert process.returncode == -signal.SIGKILL
        steps = checkpoint_steps(killed_dir)
        assert len(steps) <= 2 and steps[-1] >= 6  # --checkpoints_total_limit 2 (default)
        total = str(steps[-1] + 5)

        train(tiny_args(tiny_dataset, killed_dir, "--max_train_steps", total, "--seed", "3",
                       "--resume_from_checkpoint", "latest"))  # fmt: skip
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        reference_dir = tmp_path / "reference"
        train(tiny_args(tiny_dataset, reference_dir, "--max_train_steps", total, "--seed", "3"))
    finally:
        torch.set_num_threads(torch_threads)
    resumed, reference = load_file(killed_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    initial = load_file(killed_dir / "checkpoints" / f"step_{steps[-1]}" / "model.safetensors")
    assert not all(torch.equal(initial[name], reference[name]) for name in reference)  # training went on


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_or_dump_stacks(command, env, timeout: float) -> subprocess.CompletedProcess:
    """Run `command`; past `timeout`, fail with the Python stacks of it and its child processes (faulthandler dumps
    them on SIGABRT), since a hang of a multi-process run otherwise shows only the output before it."""
    import psutil  # an accelerate dependency

    process = subprocess.Popen(
        command, env=dict(env, PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        family = [*launcher.children(recursive=True), launcher]  # torchrun starts its workers in sessions of their own
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGABRT)
        psutil.wait_procs(family, timeout=10)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s; stacks:\n{stderr[-12000:]}\nstdout:\n{stdout[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_process_cpu_runs_count_every_test_example_once(tmp_path, tiny_dataset):
    """capsnet-train and then capsnet-eval on two gloo processes, each ending without a hang (cli.end_processes)."""
    output_dir, metrics_file = tmp_path / "ddp", tmp_path / "metrics.json"
    launch = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    train_args = tiny_args(tiny_dataset, output_dir, "--max_train_steps", "4")
    done = run_or_dump_stacks([*launch, "--main_process_port", str(free_port()), "-m", "capsnet_hf.train", *train_args],
                              env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["num_processes"] == 2 and train_results["train_examples_seen"] == 4 * 8 * 2
    assert eval_results["eval_num_examples"] == 37  # 37 = 2 x 18 + 1: the padded duplicate is dropped
    assert sum(map(sum, eval_results["eval_confusion_matrix"])) == 37

    eval_args = ["--model_name_or_path", str(output_dir), "--dataset_name", tiny_dataset, "--split", "test",
                 "--per_device_eval_batch_size", "8", "--output_file", str(metrics_file)]  # fmt: skip
    done = run_or_dump_stacks([*launch, "--main_process_port", str(free_port()), "-m", "capsnet_hf.evaluate", *eval_args],
                              env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_examples"] == 37
    assert metrics["confusion_matrix"] == eval_results["eval_confusion_matrix"]


def test_recipe_config_file_and_command_line_precedence(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("learning_rate: 0.01\nmax_shift: 1\nrouting_iterations: 2\n")
    args = parse_args(["--dataset_name", "x", "--output_dir", "y", "--recipe", "mnist", "--config_file", str(config),
                       "--routing_iterations", "4"])  # fmt: skip
    assert args.augmentation == "shift" and args.lr_decay_steps == 2000 and args.per_device_train_batch_size == 128
    assert args.learning_rate == 0.01 and args.max_shift == 1 and args.routing_iterations == 4
    cifar = parse_args(["--dataset_name", "x", "--output_dir", "y", "--recipe", "cifar10", "--use_decoder", "true"])
    assert cifar.leaky_routing and cifar.padding == "same" and cifar.primary_capsule_types == 64
    assert cifar.image_size == [24, 24] and cifar.do_standardize and cifar.use_decoder
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_flag": 1}))
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", "--output_dir", "y", "--config_file", str(bad)])


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_dataset", "cannot load dataset"),
        ("unknown_split", "no split 'validation'"),
        ("missing_column", "no image column"),
        ("ambiguous_column", "ambiguous label column"),
        ("labels_out_of_range", r"must lie in \[0, 4\)"),
        ("mixed_sizes", "mixed sizes"),
        ("different_model", "holds a different model"),
        ("stale_checkpoints", "holds checkpoints of an earlier run"),
        ("missing_resume_path", "does not exist"),
        ("no_checkpoint", "no checkpoint"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, case, message):
    from capsnet_hf import CapsNetConfig

    data = tmp_path / "data"
    data.mkdir()
    output_dir = tmp_path / "out"
    extra = []
    if case == "unknown_dataset":
        dataset = str(tmp_path / "nowhere")
    elif case == "missing_column":
        dataset = write_dataset(data, {"train": 8, "test": 4}, columns=("pixels", "label"))
    elif case == "ambiguous_column":
        import datasets

        dataset = write_dataset(data, {"train": 8, "test": 4})
        for split in ("train", "test"):
            table = datasets.Dataset.from_parquet(str(data / f"{split}.parquet"))
            table.add_column("labels", table["label"]).to_parquet(str(data / f"{split}.parquet"))
    elif case == "labels_out_of_range":
        dataset = write_dataset(data, {"train": 8, "test": 2}, labels={"train": [0, 1, 2, 3] * 2, "test": [1, 4]})
    elif case == "mixed_sizes":
        dataset = write_dataset(data, {"train": 8, "test": 2}, size=[(16, 16)] * 7 + [(18, 16)])
    else:
        dataset = write_dataset(data, {"train": 8, "test": 4})
    if case == "unknown_split":
        extra = ["--eval_split_name", "validation"]
    elif case == "different_model":
        CapsNetConfig(num_labels=7).save_pretrained(output_dir)
    elif case == "stale_checkpoints":
        (output_dir / "checkpoints" / "step_5").mkdir(parents=True)
    elif case == "missing_resume_path":
        extra = ["--resume_from_checkpoint", str(tmp_path / "no_such_checkpoint")]
    elif case == "no_checkpoint":
        extra = ["--resume_from_checkpoint", "latest"]
    with pytest.raises(UsageError, match=message):
        train(tiny_args(dataset, output_dir, "--max_train_steps", "1", *extra))
    if case == "unknown_dataset":  # the console entry point prints the same message and exits with status 2
        assert main(tiny_args(dataset, output_dir, *extra)) == 2
    if case == "stale_checkpoints":
        assert os.listdir(output_dir) == ["checkpoints"] and os.listdir(output_dir / "checkpoints") == ["step_5"]
    elif case == "different_model":
        assert "model.safetensors" not in os.listdir(output_dir) and "checkpoints" not in os.listdir(output_dir)
    else:
        assert not output_dir.exists()  # nothing written


def test_cpu_routing_kernel_is_the_default_and_trains_like_the_torch_path(tmp_path, tiny_dataset, monkeypatch, capsys):
    from capsnet_hf.kernels.cpu_routing import CpuRoutingKernel

    calls = []
    original = CpuRoutingKernel.__call__
    monkeypatch.setattr(
        CpuRoutingKernel, "__call__", lambda self, *a: calls.append(torch.is_grad_enabled()) or original(self, *a)
    )
    weights = []
    for name, flags in (("torch", ["--cpu_routing_kernel", "false"]), ("kernel", [])):
        # float32: under bf16 autocast the two paths round the votes differently
        train(tiny_args(tiny_dataset, tmp_path / name, "--max_train_steps", "3", "--mixed_precision", "no", *flags))
        weights.append(load_file(tmp_path / name / "model.safetensors"))
        if name == "torch":
            assert calls == []
    assert calls.count(True) == 3 and calls.count(False) > 0  # the default run: its 3 training steps and evaluation
    assert "class capsules: CPU routing kernel" in capsys.readouterr().out
    for name, expected in weights[0].items():
        torch.testing.assert_close(weights[1][name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_without_a_compiler_the_default_trains_on_the_torch_path_and_true_is_refused(
    tmp_path, tiny_dataset, no_compiler, capsys
):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", "--output_dir", "y", "--model_type", "baseline_cnn",
                    "--cpu_routing_kernel", "true"])  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", "--output_dir", "y", "--cpu_routing_kernel", "sometimes"])
    assert "--cpu_routing_kernel takes auto, true or false, got 'sometimes'" in capsys.readouterr().err
    config_file = tmp_path / "config.json"
    config_file.write_text('{"cpu_routing_kernel": false}')
    assert parse_args(["--dataset_name", "x", "--output_dir", "y", "--config_file", str(config_file)]
                      ).cpu_routing_kernel == "false"  # fmt: skip
    assert parse_args(["--dataset_name", "x", "--output_dir", "y"]).cpu_routing_kernel == "auto"
    refused = tmp_path / "refused"
    with pytest.raises(UsageError, match="--cpu_routing_kernel: .*needs a C\\+\\+ compiler"):
        train(tiny_args(tiny_dataset, refused, "--max_train_steps", "1", "--cpu_routing_kernel", "true"))
    assert not refused.exists()
    train(tiny_args(tiny_dataset, tmp_path / "auto", "--max_train_steps", "1"))
    assert (tmp_path / "auto" / "model.safetensors").is_file()
    assert "class capsules: torch path, the CPU routing kernel is unavailable (" in capsys.readouterr().out


def test_multimnist_two_hot_training_with_accumulation_and_bf16(tmp_path):
    """The generated MultiMNIST set (two-hot labels, per-digit reconstruction targets) goes through the same loop."""
    source = SHARED_DATASETS / "mnist"
    if not source.is_dir():
        pytest.skip(f"the shared MNIST copy is not at {source}")
    output_dir = tmp_path / "multimnist"
    results = train([
        "--dataset_name", "multimnist", "--source_dataset_name", str(source), "--output_dir", str(output_dir),
        "--max_train_samples", "64", "--max_eval_samples", "20", "--variants_per_digit", "1", *TINY_MODEL,
        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
        "--mixed_precision", "bf16", "--report_to", "none",
    ])  # fmt: skip
    assert results["eval_num_examples"] == 20 and results["eval_metric"].startswith("both digits correct")
    assert results["train_examples_seen"] == 2 * 8 * 2
    config = json.loads((output_dir / "config.json").read_text())
    assert config["image_size"] == [36, 36] and config["num_channels"] == 1


def test_cifar10_recipe_on_rgb_images(tmp_path):
    """The CIFAR-10 preset: 32x32 RGB stored, random 24x24 crops + flip/brightness/contrast + standardization in
    training, centre crop at test time; SAME padding, leaky routing, no decoder; the processor saved to match."""
    dataset = write_dataset(tmp_path / "data", {"train": 32, "test": 9}, size=(32, 32), mode="RGB")
    output_dir = tmp_path / "cifar"
    tiny = [value for value in TINY_MODEL if value not in ("--decoder_hidden_sizes", "16", "32")]
    results = train(["--recipe", "cifar10", "--dataset_name", dataset, "--output_dir", str(output_dir), *tiny,
                     "--per_device_train_batch_size", "8", "--max_train_steps", "2", "--report_to", "none"])  # fmt: skip
    assert results["eval_num_examples"] == 9
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["image_size"], config["num_channels"]) == ([24, 24], 3)
    assert config["padding"] == "same" and config["leaky_routing"] and not config["use_decoder"]
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["resize_mode"] == "crop_or_pad" and processor["do_standardize"] and not processor["do_rescale"]
    assert processor["size"] == {"height": 24, "width": 24}
    assert not (output_dir / "reconstructions.png").exists()


def test_overwrite_output_dir_starts_afresh(tmp_path, tiny_dataset):
    from capsnet_hf import CapsNetConfig

    output_dir = tmp_path / "out"
    CapsNetConfig(num_labels=7).save_pretrained(output_dir)
    (output_dir / "checkpoints" / "step_500").mkdir(parents=True)
    train(tiny_args(tiny_dataset, output_dir, "--max_train_steps", "2", "--checkpointing_steps", "1",
                    "--overwrite_output_dir"))  # fmt: skip
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["step_1", "step_2"]
    assert json.loads((output_dir / "config.json").read_text())["id2label"] == {str(i): str(i) for i in range(4)}


def test_optimizer_is_fused_adam_on_cpu_and_matches_plain_adam():
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    plain_parameters = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    fused = create_optimizer(parameters, 1e-2, "cpu")
    plain = torch.optim.Adam(plain_parameters, lr=1e-2)
    assert fused.defaults["fused"] is True
    assert create_optimizer([torch.nn.Parameter(torch.zeros(1))], 1e-2, "meta").defaults["fused"] is False
    for _ in range(3):
        for group in (parameters, plain_parameters):
            for p in group:
                p.grad = torch.cos(p.detach() * 3)
        fused.step()
        plain.step()
    for p, q in zip(parameters, plain_parameters, strict=True):
        torch.testing.assert_close(p, q)
