"""`benchmarks/bench_capsnet.py` runs end to end on a tiny case and writes what it prints (no timing assertions:
speed figures belong to the benchmark, not to the tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_capsnet.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_capsnet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_small_case_writes_every_timing_and_memory(bench, tmp_path, capsys):
    output = tmp_path / "results.json"
    argv = ["--threads", "1", "--batch-size", "2", "--image-size", "28", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*argv, "--plain-adam", "--memory", "--json", str(output)]) == 0
    result = json.loads(output.read_text())["results"][0]
    assert set(result["times"]) == {"conv_fwd", "conv_fwd_bwd", "infer", "train", "train_plain_adam", "train_saver"}
    assert all(t["median_ms"] > 0 for t in result["times"].values())
    for name in ("infer", "train", "train_plain_adam", "train_saver"):
        assert result["ratio_to_conv_bound"][name]["median"] > 0
    assert result["memory"]["train"]["peak_mib"] > 0 and result["memory"]["train_saver"]["peak_mib"] > 0
    assert "train_plain_adam" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--batch-size", "0"], ["--image-size", "24"], ["--repeats", "0"]], ids=["batch", "size", "repeats"]
)
def test_bad_flags_are_refused(bench, argv):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(argv)
    assert error.value.code == 2
