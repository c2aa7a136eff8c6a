"""Equal-budget comparison of every algorithm script on a real small model, the way the papers report:
held-out accuracy and tokens in a table, training curves in figures.

    python bench/compare_algorithms.py --model $(tools/prepare_smollm2.sh) --out bench/results/compare

1. Writes a task the model starts at roughly 15-30%: single-digit additions in three phrasings, split by
   operand pair, so no pair of the held-out split is ever trained on.
2. Trains every arm (a script, or a script and its flags) with each seed, the same batch shape, learning rate
   and schedule, and the same budget of generated tokens (--max-generated-tokens: probes and refill rounds count);
   everything else is each algorithm's own default (μ, β, clip, loss type, ...).
3. Evaluates the base model and every final checkpoint with eval.py on the held-out split (avg@n, pass@k, maj@n,
   tokens), keeps each run's metrics, record and evaluation in OUT/per_run/ (--reuse goes on from there), and
   writes OUT.md / OUT.json (mean ± sd and each seed's value) and one set of plot.py's figures per seed.
"""

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import tyro
from common import ROOT, SCRIPTS, read_metrics, run_dir_of, run_logged, script_command

sys.path.insert(0, ROOT)
from plot import DEFAULT_METRICS  # noqa: E402
PHRASINGS = ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}. What do you get?"]


@dataclass
class Args:
    model: str
    """local directory of the model (e.g. the output of tools/prepare_smollm2.sh)"""
    out: str = "bench/results/compare"
    """results: OUT.md, OUT.json, OUT/ (per_run: what each finished run keeps; figures; data, runs, eval)"""
    arms: list[str] = field(default_factory=lambda: [*SCRIPTS, "grpo.py --no-skip-no-signal"])
    """what to compare: a script, or a script and its flags in one string"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """one training run per arm and seed"""
    max_generated_tokens: int = 32000
    """the budget of every run: training stops once this many tokens have been generated"""
    prompts_per_step: int = 4
    """prompts per step (every script)"""
    num_generations: int = 8
    """G (every script)"""
    max_completion_length: int = 64
    """tokens per completion, in training and evaluation"""
    learning_rate: float = 2e-5
    """constant learning rate without warm-up (every script)"""
    micro_batch_size: int = 16
    """completions per forward/backward pass"""
    reward: str = "correctness_last_number"
    """reward function (the small model rarely writes \\boxed{}: the last number is its answer)"""
    eval_n: int = 4
    """samples per held-out problem (avg@n, pass@k)"""
    eval_temperature: float = 1.0
    """sampling temperature of the evaluation"""
    held_out_pairs: int = 30
    """operand pairs (of 100) kept out of training"""
    reuse: bool = False
    """keep the runs and evaluations already in OUT/per_run/ (resume an interrupted comparison)"""
    report_only: bool = False
    """train and evaluate nothing: the table and figures of the runs already in OUT/per_run/ (a comparison in parts)"""


def write_task(data_dir: str, held_out_pairs: int) -> tuple[str, str]:
    """Single-digit additions in three phrasings, split by operand pair (seeded)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for name, split in (("train", pairs[held_out_pairs:]), ("test", pairs[:held_out_pairs])):
        path = os.path.join(data_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            for a, b in split:
                for p in PHRASINGS:
                    f.write(json.dumps({"question": p.format(a=a, b=b), "answer": f"#### {a + b}"}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def run(cmd: list, log: str) -> float:
    """Run a command with its output in a log file; its wall time, or a clear error naming the log."""
    return run_logged(cmd, log, cwd=ROOT)


def name_of(arm: str) -> str:
    """A run's directory name: "grpo.py --no-skip-no-signal" gives "grpo_no-skip-no-signal"."""
    script, *extra = arm.split()
    return "_".join([script.removesuffix(".py"), *(f.lstrip("-") for f in extra)])


def train(args: Args, arm: str, seed: int, train_path: str, work: str) -> dict:
    """Train one arm with one seed; its metrics.jsonl and run.json are kept in OUT/per_run/NAME_seedS/."""
    name = f"{name_of(arm)}_seed{seed}"
    out, per_run = os.path.join(work, "runs", name), os.path.join(work, "per_run", name)
    script, *extra = arm.split()
    cmd = script_command(script, args.model, train_path, out, seed=seed, reward_funcs=args.reward,
                         learning_rate=args.learning_rate, lr_schedule="constant", warmup_ratio=0,
                         prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                         micro_batch_size=args.micro_batch_size, max_completion_length=args.max_completion_length,
                         max_prompt_length=128, total_steps=1000, max_generated_tokens=args.max_generated_tokens,
                         save_steps=0) + extra
    shutil.rmtree(out, ignore_errors=True)
    seconds = run(cmd, os.path.join(out, "train.log"))
    run_dir = run_dir_of(out)
    metrics = read_metrics(run_dir)
    os.makedirs(per_run, exist_ok=True)
    shutil.copy(os.path.join(run_dir, "metrics.jsonl"), per_run)
    return {"arm": arm, "seed": seed, "seconds": seconds, "steps": metrics[-1]["step"],
            "tokens": metrics[-1]["tokens/generated_total"],
            "checkpoint": os.path.join(run_dir, f"checkpoint-{metrics[-1]['step']}")}


def evaluate(args: Args, model: str, name: str, test_path: str, work: str) -> dict:
    """eval.py on the held-out split; its results are kept in OUT/per_run/NAME/eval.json."""
    out = os.path.join(work, "eval", name)
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, "--datasets", test_path,
           "--n", str(args.eval_n), "--temperature", str(args.eval_temperature),
           "--max-tokens", str(args.max_completion_length), "--last-number-fallback", "--output-dir", out]
    os.makedirs(out, exist_ok=True)
    run(cmd, os.path.join(out, "eval.log"))
    with open(os.path.join(out, "results.json")) as f:
        result = next(iter(json.load(f)["results"].values()))["test.jsonl"]
    keep(work, name, "eval.json", result)
    return result


def keep(work: str, name: str, file: str, value) -> None:
    """Write OUT/per_run/NAME/FILE whole or not at all (a temporary name, then renamed): --reuse trusts it."""
    path = os.path.join(work, "per_run", name, file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def kept(work: str, name: str, file: str):
    """OUT/per_run/NAME/FILE (a finished run or evaluation), or None."""
    path = os.path.join(work, "per_run", name, file)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_accuracy(work: str, name: str, reward: str) -> tuple:
    """The reward function's own mean (the fraction correct) at the first step and over the last three: comparable
    across arms, where `reward` is not (AGPO maps correctness to ±1 and adds a length bonus)."""
    with open(os.path.join(work, "per_run", name, "metrics.jsonl")) as f:
        values = [json.loads(line)[f"rewards/{reward}/mean"] for line in f]
    return values[0], statistics.mean(values[-3:])


def spread(values: list, scale: float = 100, digits: int = 1) -> str:
    """mean ± sample standard deviation over seeds, then the per-seed values, scaled (% by default)."""
    values = [scale * v for v in values]
    each = " / ".join(f"{v:.{digits}f}" for v in values)
    if len(values) == 1:
        return each
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({each})"


def main() -> None:
    args = tyro.cli(Args)
    t0 = time.perf_counter()
    work = args.out
    train_path, test_path = write_task(os.path.join(work, "data"), args.held_out_pairs)
    n, k = args.eval_n, args.eval_n
    reuse = args.reuse or args.report_only
    base = kept(work, "base", "eval.json") if reuse else None
    base = base or evaluate(args, args.model, "base", test_path, work)
    rows = {}
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{name_of(arm)}_seed{seed}"
            r = kept(work, name, "run.json") if reuse else None
            if r is None and args.report_only:
                continue
            if r is None:
                print(f"training {arm} seed {seed}", flush=True)
                r = train(args, arm, seed, train_path, work)
                r["eval"] = evaluate(args, r.pop("checkpoint"), name, test_path, work)
                shutil.rmtree(os.path.join(work, "runs", name))  # checkpoints: the kept files are in per_run/
                keep(work, name, "run.json", r)
            rows.setdefault(arm, []).append({**r, "name": name})
    wall = time.perf_counter() - t0
    protocol = (f"SmolLM2-135M-Instruct; single-digit addition, {100 - args.held_out_pairs} operand pairs × "
                f"{len(PHRASINGS)} phrasings for training, {args.held_out_pairs} held-out pairs × {len(PHRASINGS)} "
                f"for evaluation; chat template; reward {args.reward}; {args.prompts_per_step} prompts × G "
                f"{args.num_generations} per step, ≤ {args.max_completion_length} tokens, lr {args.learning_rate} "
                f"constant, budget {args.max_generated_tokens} generated tokens per run (probes and refills count); "
                f"seeds {args.seeds}; evaluation: n {n}, temperature {args.eval_temperature}, last-number answer")
    when = "runs and evaluations reused from earlier invocations" if reuse else f"wall time {wall / 60:.0f} min"
    lines = [f"Protocol: {protocol}. {when}. Cells: mean ± sample standard deviation over seeds (per-seed values).",
             "", f"| arm | seeds | avg@{n} (%) | pass@{k} (%) | maj@{n} (%) | tokens / completion | steps | "
             "train min / run | train accuracy (%), step 1 → last 3 |", "|---|---|---|---|---|---|---|---|---|",
             f"| base model | - | {100 * base[f'avg@{n}']:.1f} | {100 * base[f'pass@{k}']:.1f} | "
             f"{100 * base[f'maj@{n}']:.1f} | {base['tokens_mean']:.0f} | - | - | - |"]
    for arm, rs in rows.items():
        first, last = zip(*(train_accuracy(work, r["name"], args.reward) for r in rs))
        lines.append(f"| {arm} | {' '.join(str(r['seed']) for r in rs)} | " + " | ".join([
            *(spread([r["eval"][key] for r in rs]) for key in (f"avg@{n}", f"pass@{k}", f"maj@{n}")),
            spread([r["eval"]["tokens_mean"] for r in rs], scale=1, digits=0),
            spread([r["steps"] for r in rs], scale=1, digits=0),
            spread([r["seconds"] / 60 for r in rs], scale=1),
            f"{100 * statistics.mean(first):.0f} → {100 * statistics.mean(last):.0f}"]) + " |")
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": asdict(args), "protocol": protocol, "base": base, "runs": rows}, f, indent=2)
    for seed in args.seeds:  # one figure per seed: every arm's curves against steps and generated tokens
        runs = [(arm, r) for arm, rs in rows.items() for r in rs if r["seed"] == seed]
        if not runs:
            continue
        subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"),
                        *[os.path.join(work, "per_run", r["name"]) for _, r in runs],
                        "--labels", *[name_of(arm) for arm, _ in runs],
                        "--out", os.path.join(work, "figures", f"seed{seed}"),
                        "--title", f"equal generated-token budget, seed {seed}",
                        "--metrics", f"rewards/{args.reward}/mean", *DEFAULT_METRICS], check=True)


if __name__ == "__main__":
    main()
