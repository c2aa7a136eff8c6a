import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path[:0] = [ROOT, TESTS]

from tiny import build_tiny_model, write_jsonl  # noqa: E402


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def add_data(tmp_path_factory) -> str:
    """GSM8K-format rows of single-digit additions."""
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(10) for b in range(10)]
    return write_jsonl(str(tmp_path_factory.mktemp("data") / "add.jsonl"), rows)


def run_script(args: list, cwd: str, launcher: list | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a training script in a subprocess, as a user would, and fail with its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-10000:]}")
    return proc


def read_metrics(run_root: str) -> list:
    runs = [d for d in os.listdir(run_root) if os.path.isdir(os.path.join(run_root, d))]
    assert len(runs) == 1, runs
    with open(os.path.join(run_root, runs[0], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
