import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path[:0] = [ROOT, TESTS]

from tiny import build_tiny_model, write_jsonl  # noqa: E402

# every algorithm script in the repository: the tests of the code they share run on each of them
ALGORITHMS = [m for m in ("grpo", "agpo_mask_clip", "agpo_adaptive", "a_grpo") if os.path.exists(f"{ROOT}/{m}.py")]


def make_args(algo, **overrides):
    """A script's Args with its derived fields set as main() sets them; overrides of fields the script does
    not have (e.g. beta, epsilon in a script whose objective has no such flag) are left out."""
    args = algo.Args(**{k: v for k, v in overrides.items() if k in algo.Args.__dataclass_fields__})
    if hasattr(args, "epsilon_high") and args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    return args


def make_rollout(algo, prompt_ids, completion_ids, advantages, loss_mask, pad_id=0):
    """A script's Rollout; in a script with a clip range per prompt, every prompt gets 0.2."""
    rollout = algo.Rollout(prompt_ids=prompt_ids, completion_ids=completion_ids, advantages=advantages,
                           loss_mask=loss_mask, pad_id=pad_id)
    if hasattr(rollout, "epsilon"):
        rollout.epsilon = torch.full((len(completion_ids),), 0.2)
    return rollout


def update_policy(algo, engine, rollout, plan, args, metrics, device="cpu"):
    """A script's update_policy, with the controllers' initial state where the script has one (a_grpo.py)."""
    extra = (algo.initial_control(args),) if hasattr(algo, "initial_control") else ()
    return algo.update_policy(engine, rollout, plan, args, metrics, device, *extra)


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def world_of_one():
    """A gloo process group of one, for the collectives of a script's update run in the test process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_untied_model(tmp_path_factory) -> str:
    """With its own lm_head, as Qwen2.5-7B (the tied tiny model shares the embedding)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_untied")), tied=False)


@pytest.fixture(scope="session")
def add_data(tmp_path_factory) -> str:
    """GSM8K-format rows of single-digit additions."""
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a in range(10)
        for b in range(10)
    ]
    return write_jsonl(str(tmp_path_factory.mktemp("data") / "add.jsonl"), rows)


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def deepspeed_launcher(num_ranks: int = 2) -> list:
    """The deepspeed launcher, run by the interpreter that runs the tests: an unactivated venv has no
    `deepspeed` on PATH (and every rank it starts runs this interpreter too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks), "--master_port", port]


def run_script(
    args: list,
    cwd: str,
    launcher: list | None = None,
    timeout: int = 900,
    pythonpath: tuple = (),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a training script in a subprocess, as a user would, and fail with its output.

    PATH keeps no directory with a `deepspeed` executable in it, as in an unactivated venv, so a test
    that launched anything by its name on PATH would fail here as it fails for such a user.
    """
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if not os.path.exists(os.path.join(d, "deepspeed"))]
    # the CPU allocator and OpenMP runtime of the README's setup, when this machine has them
    preload = [p for p in (TCMALLOC, os.path.join(sys.prefix, "lib", "libiomp5.so")) if os.path.exists(p)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([*pythonpath, ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
        PATH=os.pathsep.join(path),
        VLLM_CPU_KVCACHE_SPACE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        LD_PRELOAD=":".join(preload),
        **(env or {}),
    )
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-10000:]}"
        )
    return proc


def read_metrics(run_root: str) -> list:
    runs = [d for d in os.listdir(run_root) if os.path.isdir(os.path.join(run_root, d))]
    assert len(runs) == 1, runs
    with open(os.path.join(run_root, runs[0], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
