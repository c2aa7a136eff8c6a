import functools
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
FAKE_VLLM = os.path.join(TESTS, "fake_vllm")  # vLLM's calls served by transformers: PYTHONPATH=FAKE_VLLM
sys.path[:0] = [ROOT, TESTS]

from tiny import build_tiny_model, write_jsonl  # noqa: E402

# every algorithm script in the repository: the tests of the code they share run on each of them
ALGORITHMS = [m for m in ("grpo", "agpo_mask_clip", "agpo_adaptive", "a_grpo") if os.path.exists(f"{ROOT}/{m}.py")]


def make_args(algo, **overrides):
    """A script's Args with its derived fields set as main() sets them; overrides of fields the script does
    not have (e.g. beta, epsilon in a script whose objective has no such flag; world_size, which is no field: the
    world is dist.get_world_size()) are left out."""
    args = algo.Args(**{k: v for k, v in overrides.items() if k in algo.Args.__dataclass_fields__})
    if hasattr(args, "epsilon_high") and args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    return args


def make_rollout(algo, prompt_ids, completion_ids, advantages, loss_mask):
    """A script's Rollout (vLLM's log-probs 0); in a script with a clip range per prompt, every prompt gets 0.2."""
    rollout = algo.Rollout(prompt_ids=prompt_ids, completion_ids=completion_ids, advantages=advantages,
                           loss_mask=loss_mask, sampler_logp=torch.zeros_like(loss_mask))
    if hasattr(rollout, "epsilon"):
        rollout.epsilon = torch.full((len(completion_ids),), 0.2)
    return rollout


def logprob_model(algo, model_dir: str, dtype=torch.float32):
    """A transformers model that computes log-probs as the scripts' engines do (algo.use_logprob_forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    algo.use_logprob_forward(model)
    return model


def update_policy(algo, engine, rollout, plan, args, metrics, device="cpu"):
    """A script's update_policy, with the controllers' initial state where the script has one (a_grpo.py)."""
    extra = (algo.initial_control(args),) if hasattr(algo, "initial_control") else ()
    return algo.update_policy(engine, rollout, plan, args, metrics, device, *extra)


@functools.cache
def vllm_import_error() -> str | None:
    """Why `import vllm` fails here (not installed, a broken install), or None."""
    try:
        import vllm  # noqa: F401
        from vllm import LLM  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def vllm_importable() -> bool:
    """Whether real vLLM runs here; under REQUIRE_VLLM=1 (CI, .ci/run) a test that asks fails where it does not."""
    error = vllm_import_error()
    if error and os.environ.get("REQUIRE_VLLM") == "1":
        pytest.fail(f"REQUIRE_VLLM=1 and vLLM is not importable ({error})", pytrace=False)
    return error is None


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_vllm: runs real vLLM: skipped where vLLM is not importable, failed "
                            "there under REQUIRE_VLLM=1 (CI)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_vllm") and not vllm_importable():
        pytest.skip(f"vLLM is not importable here ({vllm_import_error()})")


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
# PATH keeps no directory with a `deepspeed` executable, as in an unactivated venv, so that a test that launched
# anything by its name on PATH fails here as it would for such a user. The tests' own process uses it too: DeepSpeed
# JIT-builds its CPU ops with the `ninja` on PATH (the system's, ninja-build, .ci/run), and two ninja versions (the
# venv's, the system's) rebuilt each other's output, 23 s each time, in the scripts' launches and here by turns.
os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                     if not os.path.exists(os.path.join(d, "deepspeed")))


def deepspeed_launcher(num_ranks: int = 2) -> list:
    """The deepspeed launcher, run by the interpreter that runs the tests: an unactivated venv has no
    `deepspeed` on PATH (and every rank it starts runs this interpreter too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks), "--master_port", port]


def script_env(pythonpath: tuple = (), env: dict | None = None) -> dict:
    """The environment of a training script run as a user would run it, with `env` added.

    PATH is this process's, which keeps no directory with a `deepspeed` executable (above).
    """
    # the CPU allocator and OpenMP runtime of the README's setup, when this machine has them
    preload = [p for p in (TCMALLOC, os.path.join(sys.prefix, "lib", "libiomp5.so")) if os.path.exists(p)]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([*pythonpath, ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
        VLLM_CPU_KVCACHE_SPACE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        LD_PRELOAD=":".join(preload),
        **(env or {}),
    )


def run_script(
    args: list,
    cwd: str,
    launcher: list | None = None,
    timeout: int = 900,
    pythonpath: tuple = (),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a training script in a subprocess, as a user would, and fail with its output."""
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(pythonpath, env), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-10000:]}"
        )
    return proc


def script_args(script: str, model: str, dataset: str, out: str | None = None) -> list:
    """The start of a training script's command line: the script, --model, --dataset and --output-dir."""
    return [script, "--model", model, "--dataset", dataset] + (["--output-dir", out] if out else [])


def tiny_args(prompts_per_step=2, num_generations=4, micro_batch_size=4, total_steps=2, learning_rate=None) -> list:
    """The batch of the end-to-end runs on the tiny model: a few prompts, completions of at most 16 tokens."""
    return ["--prompts-per-step", str(prompts_per_step), "--num-generations", str(num_generations),
            "--micro-batch-size", str(micro_batch_size), "--max-completion-length", "16",
            "--total-steps", str(total_steps)] + (["--learning-rate", learning_rate] if learning_rate else [])


def resume_from_step_1(common: list, out: str, cwd: str, launcher: list | None = None, pythonpath: tuple = ()) -> str:
    """`common` continued with --resume from checkpoint-1 of its run in `out`, copied (with step 1's row of
    metrics.jsonl) into a run directory of its own: that run's directory."""
    name = os.listdir(out)[0]
    out2 = os.path.join(cwd, "resumed")
    shutil.copytree(os.path.join(out, name, "checkpoint-1"), os.path.join(out2, name, "checkpoint-1"))
    with open(os.path.join(out2, name, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(read_metrics(out)[0]) + "\n")
    run_script(common + ["--output-dir", out2, "--resume", os.path.join(out2, name, "checkpoint-1")], cwd=cwd,
               launcher=launcher, pythonpath=pythonpath)
    return os.path.join(out2, name)


def assert_same_step(a: dict, b: dict) -> list:
    """Every metric of a step but the timings equal in two runs; the keys compared."""
    compared = [k for k in a if not k.startswith("time/")]
    for k in compared:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    return compared


def load_state(path: str):
    """A checkpoint file's contents: trainer_state.json but the run's name, a safetensors file, or a torch.save."""
    if path.endswith(".json"):
        with open(path) as f:
            return {k: v for k, v in json.load(f).items() if k != "run_name"}
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=False)


def assert_same_tree(a, b, where: str) -> list:
    """Two nested values equal, each tensor within 1e-5 of its largest entry; the tensors' paths."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        return [p for k in a for p in assert_same_tree(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in assert_same_tree(x, y, f"{where}/{i}")]
    if hasattr(a, "__dict__") and not isinstance(a, torch.Tensor):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
        return assert_same_tree(vars(a), vars(b), where)
    if isinstance(a, np.ndarray):
        a, b = torch.from_numpy(a), torch.from_numpy(np.asarray(b))
    if not isinstance(a, torch.Tensor):
        same = a == pytest.approx(b, rel=1e-6) if isinstance(a, float) else a == b
        assert same, f"{where}: {a!r} != {b!r}"
        return []
    assert isinstance(b, torch.Tensor) and (a.shape, a.dtype) == (b.shape, b.dtype), f"{where}: shape or dtype differ"
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{where}: differs"
    elif a.numel():
        diff = (a.double() - b.double()).abs().max().item()
        scale = a.abs().max().item()
        assert diff <= 1e-5 * scale, f"{where}: differs by {diff:.3g}, largest entry {scale:.3g}"
    return [where]


def assert_same_checkpoint(a: str, b: str) -> list:
    """Two checkpoint directories hold the same state: the Hugging Face weights, DeepSpeed's files (the optimizer's
    shards with Adam's moments; module, lr scheduler and step counts), every rank's rank_state_*.pt (the script's
    state, RNG states) and trainer_state.json but the run's name. The tensors compared."""
    kinds = ("*.safetensors", "deepspeed/*/*.pt", "rank_state_*.pt", "trainer_state.json")
    names = sorted(os.path.relpath(p, a) for k in kinds for p in glob.glob(os.path.join(a, k)))
    assert names == sorted(os.path.relpath(p, b) for k in kinds for p in glob.glob(os.path.join(b, k)))
    compared = [p for n in names for p in assert_same_tree(load_state(os.path.join(a, n)),
                                                             load_state(os.path.join(b, n)), n)]
    assert any(p.endswith("exp_avg_sq") for p in compared), f"no Adam state among {compared}"
    return compared


def run_and_resume(common: list, cwd: str, check, pythonpath: tuple = ()) -> list:
    """`common` (saving every step) run for 2 steps in `cwd`/runs, its metrics checked by `check`(out, 2); then
    resumed from checkpoint-1: every metric of step 2, and checkpoint-2 (weights, optimizer, script state), are the
    same. The keys compared."""
    out = os.path.join(cwd, "runs")
    run_script(common + ["--output-dir", out], cwd=cwd, pythonpath=pythonpath)
    full = check(out, 2)
    resumed = resume_from_step_1(common, out, cwd, pythonpath=pythonpath)
    compared = assert_same_step(full[1], read_metrics(os.path.dirname(resumed))[1])
    assert_same_checkpoint(os.path.join(out, os.listdir(out)[0], "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    return compared


def run_two_ranks(script: str, model: str, dataset: str, out: str, args: list, cwd: str) -> None:
    """`script` with `args` on two ranks under the deepspeed launcher, 4 prompts a step."""
    run_script([*script_args(script, model, dataset, out), *args, "--prompts-per-step", "4"], cwd=cwd,
               launcher=deepspeed_launcher(2))


@pytest.fixture(scope="session")
def split_runs(tiny_model, tmp_path_factory) -> tuple:
    """tests/split_check.py in one process and on two ranks under the deepspeed launcher: what each saved."""
    cwd = tmp_path_factory.mktemp("split")
    check = os.path.join(TESTS, "split_check.py")
    run_script([check, tiny_model, str(cwd / "one.pt")], cwd=str(cwd))
    run_script([check, tiny_model, str(cwd / "two.pt"), "leaf"], cwd=str(cwd), launcher=deepspeed_launcher(2))
    return torch.load(cwd / "one.pt"), torch.load(cwd / "two.pt")


def read_metrics(run_root: str) -> list:
    runs = [d for d in os.listdir(run_root) if os.path.isdir(os.path.join(run_root, d))]
    assert len(runs) == 1, runs
    with open(os.path.join(run_root, runs[0], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
