"""What the benchmark scripts share: the repository's paths and default data, the CPU allocator and OpenMP runtime
preload, and running a training script (or any command) in a subprocess with its output in a log file.

The scripts run as `python bench/X.py`, so this directory is on sys.path and `import common` finds this file.
The model of the offline benchmarks is SmolLM2-135M-Instruct, built by `tools/prepare_smollm2.sh [OUT_DIR]`
(it prints the model directory).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K_SAMPLE = os.path.join(ROOT, "data", "gsm8k_sample.jsonl")  # 256 GSM8K train rows, in the repository
ADDITIONS = os.path.join(ROOT, "data", "additions.jsonl")  # 210 single-digit additions, in the repository
SCRIPTS = ["grpo.py", "agpo_mask_clip.py", "agpo_adaptive.py", "a_grpo.py"]  # every algorithm script
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
# the objective of the CPU speed comparison, where it differs from grpo.py's defaults: bench_speed.py runs grpo.py
# with these flags and bench_trl.py sets TRL to them (grpo.py's defaults give the rest: lr, temperature, seed, ...)
SPEED_CONFIG = {"beta": 0.0, "loss_type": "dapo"}


@dataclass
class RunShape:
    """The flags every benchmark of a training run has: the model, the data, the batch shape."""

    model: str
    """local model directory (e.g. the output of tools/prepare_smollm2.sh)"""
    dataset: str = GSM8K_SAMPLE
    """training data, a local .jsonl (default: the repository's 256 GSM8K train rows, data/gsm8k_sample.jsonl)"""
    prompts_per_step: int = 4
    """prompts per step"""
    num_generations: int = 8
    """G, completions per prompt"""
    max_completion_length: int = 64
    """tokens per completion at most"""


def preload_env(on: bool) -> dict:
    """This environment with the README's CPU allocator and OpenMP runtime preloaded (on), or with none (off)."""
    libs = [TCMALLOC, os.path.join(sys.prefix, "lib", "libiomp5.so")]
    if on and not all(os.path.exists(p) for p in libs):
        raise SystemExit(f"cannot preload: missing {[p for p in libs if not os.path.exists(p)]} (README, Setup)")
    return dict(os.environ, LD_PRELOAD=":".join(libs) if on else "")


def with_pythonpath(*dirs: str, env: dict | None = None) -> dict:
    """`env` (default: this environment) with `dirs` put first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([*dirs, env.get("PYTHONPATH", "")])
    return env


def flags(**values) -> list:
    """Command-line flags of a training script: flags(total_steps=3, track=False) gives
    ["--total-steps", "3", "--no-track"]; a list gives its values after the flag."""
    out = []
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(name if value else "--no-" + name[2:])
        elif isinstance(value, (list, tuple)):
            out += [name, *map(str, value)]
        else:
            out += [name, str(value)]
    return out


def script_command(script: str, model: str, dataset: str, out: str, **values) -> list:
    """A training script of this repository, run by this interpreter, on `model` and `dataset`, writing to `out`."""
    return [sys.executable, os.path.join(ROOT, script), *flags(model=model, dataset=dataset, output_dir=out, **values)]


def run_logged(cmd: list, log: str, what: str = "", **kwargs) -> float:
    """Run `cmd` with its output in the file `log`; its wall time, or SystemExit naming the log when it fails.
    kwargs go to subprocess.run (env, cwd, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs).returncode
    if rc:
        raise SystemExit(f"{what or ' '.join(map(str, cmd[:3])) + ' ...'} failed (exit {rc}); see {log}")
    return time.perf_counter() - t


def fmt(x, digits: int = 2) -> str:
    """A table cell: x with `digits` decimals and thousands commas, or "–" for None."""
    return "–" if x is None else f"{x:,.{digits}f}"


def run_dir_of(out: str) -> str:
    """The one run directory a training script wrote under its --output-dir `out`."""
    return os.path.join(out, next(d for d in sorted(os.listdir(out)) if os.path.isdir(os.path.join(out, d))))


def read_metrics(run_dir: str) -> list:
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def padding_free_rows(prompt_ids: list, completion_ids: list, pad_id: int = 0) -> dict:
    """The plain baselines' micro-batch (padding-free packing, as in TRL's padding_free): each sequence
    (prompt + completion) in the first row with room, rows no wider than the longest sequence, position ids restarting
    at each sequence (with no attention mask, transformers builds a block-causal mask from them). input_ids and
    position_ids [R, L], as lists; the model's `labels=input_ids` gives the causal-LM loss."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    rows, positions = [], []
    for s in seqs:
        r = next((k for k, row in enumerate(rows) if len(row) + len(s) <= width), len(rows))
        if r == len(rows):
            rows.append([])
            positions.append([])
        rows[r] += s
        positions[r] += list(range(len(s)))
    L = max(len(row) for row in rows)
    return {"input_ids": [row + [pad_id] * (L - len(row)) for row in rows],
            "position_ids": [pos + [0] * (L - len(pos)) for pos in positions]}
