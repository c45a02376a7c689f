"""The runner under torchrun: 2 CPU processes (gloo) agree with one process."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from advframe import checkpoint

SCRIPT = textwrap.dedent("""
    import sys
    from advframe import distributed
    from advframe.runner import Run
    from advframe.testing import make_host, tiny_config

    host = make_host()
    # no BatchNorm (per-rank batch statistics would differ) and a deterministic evaluation attack, so
    # two processes must reproduce one up to float rounding
    config = tiny_config(host, "erm", ["train.epochs=2", "model.args={width: 8, hidden: 32, batch_norm: false}",
                                       "eval.attacks=[{name: test-pgd, random_start: zero, steps: 3}]",
                                       "train.monitor_examples=16"])
    try:
        Run.start(host, config, sys.argv[1]).execute()
    finally:
        distributed.shutdown()
""")


def test_two_processes_agree_with_one(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29631", str(tmp_path / "script.py"), str(tmp_path / "double")], env=env,
                            capture_output=True, text=True, timeout=300)
    results = tmp_path / "double" / "results.json"
    assert results.exists(), double.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "results.json").read_text())
    two = json.loads(results.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("clean_accuracy", "robust_accuracy"):
        assert abs(one["metrics"][key] - two["metrics"][key]) <= 1 / 48 + 1e-9, key  # at most one example in 48
    assert one["cost"]["gradient_evaluations"] == two["cost"]["gradient_evaluations"]  # summed over ranks
    weights_one, _ = checkpoint.load_tensors(tmp_path / "single" / "model.safetensors")
    weights_two, _ = checkpoint.load_tensors(tmp_path / "double" / "model.safetensors")
    for key in weights_one:
        assert torch.allclose(weights_one[key], weights_two[key], atol=1e-4), key
    lines = (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # only rank 0 writes
    assert abs(json.loads(lines[-1])["loss"] - json.loads((tmp_path / "single" / "metrics.jsonl").read_text()
                                                         .splitlines()[-1])["loss"]) < 1e-3
