"""Equal-budget comparison of every algorithm script on a real small model, the way the papers report:
held-out accuracy and tokens in a table, training curves in figures.

    python bench/compare_algorithms.py --model $(tools/prepare_smollm2.sh) --out bench/results/compare

1. Writes a task the model starts at roughly 15-30%: single-digit additions in three phrasings, split by
   operand pair, so no pair of the held-out split is ever trained on.
2. Trains every script in SCRIPTS with the same seed, batch shape, learning rate and schedule, and the same
   budget of generated tokens (--max-generated-tokens: probes and refill rounds count), for each seed;
   everything else is each algorithm's own default (μ, β, clip, loss type, ...).
3. Evaluates the base model and every final checkpoint with eval.py on the held-out split (avg@n, pass@k,
   tokens), and writes OUT.md / OUT.json (mean and spread over seeds) and the figures of plot.py.
"""

import json
import os
import random
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
    """results: OUT.md, OUT.json, OUT/ (data, runs, evaluation, figures)"""
    scripts: list[str] = field(default_factory=lambda: [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))])
    """the algorithm scripts to compare"""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """one training run per script and seed"""
    max_generated_tokens: int = 16000
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
    """keep runs and evaluations already complete in OUT/ (resume an interrupted comparison)"""


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


def train(args: Args, script: str, seed: int, train_path: str, runs_dir: str) -> dict:
    out = os.path.join(runs_dir, f"{script[:-3]}_seed{seed}")
    done = os.path.join(out, "done.json")
    if args.reuse and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    cmd = script_command(script, args.model, train_path, out, seed=seed, reward_funcs=args.reward,
                         learning_rate=args.learning_rate, lr_schedule="constant", warmup_ratio=0,
                         prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                         micro_batch_size=args.micro_batch_size, max_completion_length=args.max_completion_length,
                         max_prompt_length=128, total_steps=1000, max_generated_tokens=args.max_generated_tokens,
                         save_steps=0)
    seconds = run(cmd, os.path.join(out, "train.log"))
    run_dir = run_dir_of(out)
    metrics = read_metrics(run_dir)
    checkpoint = os.path.join(run_dir, f"checkpoint-{metrics[-1]['step']}")
    result = {"script": script, "seed": seed, "run_dir": run_dir, "checkpoint": checkpoint, "seconds": seconds,
              "steps": metrics[-1]["step"], "tokens": metrics[-1]["tokens/generated_total"],
              "train_reward_first": metrics[0]["reward"], "train_reward_last": metrics[-1]["reward"]}
    with open(done, "w") as f:
        json.dump(result, f, indent=2)
    return result


def evaluate(args: Args, model: str, name: str, test_path: str, eval_dir: str) -> dict:
    out = os.path.join(eval_dir, name)
    results = os.path.join(out, "results.json")
    if not (args.reuse and os.path.isfile(results)):
        cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--model", model, "--datasets", test_path,
               "--n", str(args.eval_n), "--temperature", str(args.eval_temperature),
               "--max-tokens", str(args.max_completion_length), "--last-number-fallback", "--output-dir", out]
        os.makedirs(out, exist_ok=True)
        run(cmd, os.path.join(out, "eval.log"))
    with open(results) as f:
        return next(iter(json.load(f)["results"].values()))["test.jsonl"]


def train_accuracy(run_dir: str, reward: str) -> tuple:
    """The reward function's own mean (the fraction correct) at the first step and over the last three: comparable
    across scripts, where `reward` is not (AGPO maps correctness to ±1 and adds a length bonus)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        values = [json.loads(line)[f"rewards/{reward}/mean"] for line in f]
    return values[0], statistics.mean(values[-3:])


def spread(values: list) -> str:
    """mean ± half the range over seeds, in %, or the one value."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def main() -> None:
    args = tyro.cli(Args)
    t0 = time.perf_counter()
    work = args.out
    train_path, test_path = write_task(os.path.join(work, "data"), args.held_out_pairs)
    eval_dir, runs_dir = os.path.join(work, "eval"), os.path.join(work, "runs")
    n, k = args.eval_n, args.eval_n
    base = evaluate(args, args.model, "base", test_path, eval_dir)
    rows, trained = {}, []
    for seed in args.seeds:
        for script in args.scripts:
            print(f"training {script} seed {seed}", flush=True)
            r = train(args, script, seed, train_path, runs_dir)
            r["eval"] = evaluate(args, r["checkpoint"], f"{script[:-3]}_seed{seed}", test_path, eval_dir)
            rows.setdefault(script, []).append(r)
            trained.append(r)
    wall = time.perf_counter() - t0
    protocol = (f"SmolLM2-135M-Instruct; single-digit addition, {100 - args.held_out_pairs} operand pairs × "
                f"{len(PHRASINGS)} phrasings for training, {args.held_out_pairs} held-out pairs × {len(PHRASINGS)} "
                f"for evaluation; chat template; reward {args.reward}; {args.prompts_per_step} prompts × G "
                f"{args.num_generations} per step, ≤ {args.max_completion_length} tokens, lr {args.learning_rate} "
                f"constant, budget {args.max_generated_tokens} generated tokens per run (probes and refills count); "
                f"seeds {args.seeds}; evaluation: n {n}, temperature {args.eval_temperature}, last-number answer")
    when = "runs and evaluations reused from an earlier invocation" if args.reuse else f"wall time {wall / 60:.0f} min"
    lines = [f"Protocol: {protocol}. {when}.", "",
             f"| model | seeds | steps | avg@{n} (%) | pass@{k} (%) | tokens / completion | "
             "train accuracy (%), step 1 → last 3 | train min / run |", "|---|---|---|---|---|---|---|---|",
             f"| base model | - | - | {100 * base[f'avg@{n}']:.1f} | {100 * base[f'pass@{k}']:.1f} | "
             f"{base['tokens_mean']:.0f} | - | - |"]
    for script, rs in rows.items():
        steps = "/".join(str(r["steps"]) for r in rs)
        tokens = statistics.mean(r["eval"]["tokens_mean"] for r in rs)
        first, last = zip(*(train_accuracy(r["run_dir"], args.reward) for r in rs))
        reward = f"{100 * statistics.mean(first):.0f} → {100 * statistics.mean(last):.0f}"
        lines.append(f"| {script} | {len(rs)} | {steps} | {spread([r['eval'][f'avg@{n}'] for r in rs])} | "
                     f"{spread([r['eval'][f'pass@{k}'] for r in rs])} | {tokens:.0f} | {reward} | "
                     f"{statistics.mean(r['seconds'] for r in rs) / 60:.1f} |")
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": asdict(args), "protocol": protocol, "wall_seconds": wall, "base": base,
                   "runs": trained}, f, indent=2)
    subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *[r["run_dir"] for r in trained],
                    "--labels", *[f"{r['script'][:-3]} s{r['seed']}" for r in trained],
                    "--out", os.path.join(work, "figures"), "--title", "equal generated-token budget",
                    "--metrics", f"rewards/{args.reward}/mean", *DEFAULT_METRICS], check=True)


if __name__ == "__main__":
    main()
