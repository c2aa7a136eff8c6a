"""Step time of grpo.py and agpo_mask_clip.py, with the CPU allocator and OpenMP runtime preloaded, on one config and
task, and, with --trl-python, of TRL's GRPOTrainer on grpo.py's config in the same environment (bench/bench_trl.py,
run by a python that has TRL 1.16); with --before DIR, the same two scripts of an older checkout, in the same call.

    python bench/bench_speed.py --model $(tools/prepare_smollm2.sh) --task additions \
        --out bench/results/speed_additions_1 --trl-python ./trl-python --before ../older_checkout

Per run: the step, generation and update times; the rows and real tokens the update computed per step and the padded
positions it computed with them; the update's time per 1,000 real tokens, against a plain forward + backward + AdamW of
as many real tokens (the yardstick); the mean reward. --task additions trains on data/additions.jsonl, scored by its
last number: SmolLM2-135M-Instruct is right about a fifth of the time, so most groups are all wrong (no signal) and some
are mixed. --task gsm8k trains on data/gsm8k_sample.jsonl, where it scores 0: no group has a signal, so those runs pass
--no-skip-no-signal (the earlier figures' config), or every step would be skipped.

Writes OUT.json and OUT.md. Figures are medians over steps 2..--steps (step 1 is warm-up). Run it on a quiet
machine: the runs go one after the other and any other load shows up in every figure.
"""

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import tyro
from common import (ADDITIONS, GSM8K_SAMPLE, ROOT, SPEED_CONFIG, flags, fmt, preload_env, read_metrics, run_dir_of,
                    run_logged)

TASKS = {  # data set, grpo.py's reward, and whether a step without signal is skipped
    "additions": (ADDITIONS, "correctness_last_number", True),
    "gsm8k": (GSM8K_SAMPLE, "correctness", False),
}
SCRIPTS = {"grpo.py": SPEED_CONFIG, "agpo_mask_clip.py": {}}  # agpo_mask_clip.py: its own defaults (β 0, dapo, ...)


@dataclass
class Args:
    model: str
    """local model directory (e.g. the output of tools/prepare_smollm2.sh)"""
    task: Literal["additions", "gsm8k"] = "additions"
    """additions: data/additions.jsonl, ~1/5 right at the start; gsm8k: data/gsm8k_sample.jsonl, 0 right"""
    out: str = "bench/results/speed_additions"
    """results are written to OUT.json and OUT.md, runs to OUT.runs/"""
    prompts_per_step: int = 4
    """prompts per step"""
    num_generations: int = 8
    """G, completions per prompt"""
    max_completion_length: int = 64
    """tokens per completion at most"""
    micro_batch_size: int = 32
    """completions per micro-batch"""
    steps: int = 6
    """steps of every run; the medians are over steps 2..steps"""
    trl_python: Optional[str] = None
    """python of an environment with TRL 1.16 (docs/benchmarks.md): also run TRL's GRPOTrainer on grpo.py's config"""
    before: Optional[str] = None
    """an older checkout of this repository: also run its grpo.py and agpo_mask_clip.py, on the same flags"""


def run_script(args: Args, root: str, script: str, name: str) -> dict:
    """`script` of the checkout `root` on the task, preloaded; the medians of its metrics.jsonl over steps 2..N."""
    dataset, reward, skip = TASKS[args.task]
    out = os.path.join(args.out + ".runs", name.replace(" ", "_").replace(".py", ""))
    cmd = [sys.executable, os.path.join(root, script),
           *flags(model=args.model, dataset=dataset, output_dir=out, reward_funcs=reward, total_steps=args.steps,
                  save_steps=0, skip_no_signal=skip, prompts_per_step=args.prompts_per_step,
                  num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                  micro_batch_size=args.micro_batch_size, **SCRIPTS[script])]
    run_logged(cmd, os.path.join(out, "run.log"), name, env=preload_env(True))
    rows = read_metrics(run_dir_of(out))[1:]  # step 1: warm-up
    for checkpoint in glob.glob(os.path.join(run_dir_of(out), "checkpoint-*")):  # the final save: GBs, not needed
        shutil.rmtree(checkpoint)
    med = {k: statistics.median(r[k] for r in rows) for k in ("time/step", "time/generate", "time/update")}
    if any("update/rows" in r for r in rows):
        med["rows"] = statistics.mean(r.get("update/rows", 0.0) for r in rows)  # none in a step the update skipped
    else:  # the code before #33 logged no update/rows: it computed every row of every step it did not skip
        med["rows"] = statistics.mean(args.prompts_per_step * args.num_generations * ("update/real_tokens" in r)
                                      for r in rows)
    med["real_tokens"] = statistics.mean(r.get("update/real_tokens", 0.0) for r in rows)
    med["padded_positions"] = statistics.mean(padded_positions(r) for r in rows)
    med["update_s_per_1k_real_tokens"] = 1000 * med["time/update"] / med["real_tokens"] if med["real_tokens"] else None
    med["skipped_steps"] = int(sum(r.get("update/skipped_steps", 0) for r in rows))
    med["reward_per_step"] = [r.get(f"rewards/{reward}/mean") for r in rows]
    return med


def padded_positions(row: dict) -> float:
    """The padded positions the update computed in the step of a metrics.jsonl row (none in a step it skipped)."""
    fraction = row.get("update/padding_fraction", 0.0)  # padded / computed positions
    return row.get("update/real_tokens", 0.0) * fraction / (1 - fraction)


def plain_fwd_bwd(args: Args, real_tokens: int) -> dict:
    """The yardstick of the update: a plain transformers model (no DeepSpeed, no log-prob code of ours) doing
    forward + causal-LM loss + backward + AdamW on `real_tokens` random tokens in padding-free rows of sequences shaped
    like a step's (prompts of 80-160 tokens, completions up to the limit), --micro-batch-size sequences per forward and
    backward, in a subprocess with the same threads."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {os.path.join(ROOT, "bench")!r})
from common import padding_free_rows
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({args.model!r}, dtype=torch.float32)
opt = torch.optim.AdamW(m.parameters(), lr=1e-7)
g = torch.Generator().manual_seed(0)
prompts, comps, total = [], [], 0
while total < {real_tokens}:  # sequences until the step's real tokens are reached
    p = torch.randint(100, 40000, (int(torch.randint(80, 161, (1,), generator=g)),), generator=g).tolist()
    c = torch.randint(100, 40000, (int(torch.randint(30, {args.max_completion_length} + 1, (1,), generator=g)),),
                      generator=g).tolist()
    prompts.append(p); comps.append(c); total += len(p) + len(c)
mb = {args.micro_batch_size}  # sequences per forward + backward, as in grpo.py's update
batches = [{{k: torch.tensor(v) for k, v in padding_free_rows(prompts[s : s + mb], comps[s : s + mb]).items()}}
           for s in range(0, len(prompts), mb)]  # padding-free rows
times = []
for _ in range(4):
    t = time.perf_counter()
    for batch in batches:
        out = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"])
        out.loss.backward()
    opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(json.dumps({{"seconds": sorted(times[1:])[1], "real_tokens": total, "threads": torch.get_num_threads()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=preload_env(True))
    if proc.returncode:
        raise SystemExit(f"plain forward+backward failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["s_per_1k_real_tokens"] = 1000 * r["seconds"] / r["real_tokens"]
    return r


def run_trl(args: Args) -> dict:
    """bench/bench_trl.py with --trl-python, on grpo.py's config and task, in the preloaded environment."""
    out = os.path.join(args.out + ".runs", "trl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [args.trl_python, os.path.join(ROOT, "bench", "bench_trl.py"),
           *flags(model=args.model, dataset=TASKS[args.task][0], out=out, steps=args.steps,
                  prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                  max_completion_length=args.max_completion_length)]
    run_logged(cmd, out + ".log", "bench_trl.py", env=preload_env(True))
    with open(out + ".json") as f:
        trl = json.load(f)
    m = trl["median"]
    return {"time/step": m["step_s"], "time/generate": m["generate_s"], "time/update": m["update_s"],
            "rows": m["rows"], "real_tokens": m["real_tokens"], "padded_positions": m["positions"] - m["real_tokens"],
            "update_s_per_1k_real_tokens": 1000 * m["update_s"] / m["real_tokens"],
            "reward_per_step": trl["rewards"][1:]}


def main() -> None:
    args = tyro.cli(Args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    for script in SCRIPTS:
        result["runs"][script] = run_script(args, ROOT, script, script)
        if args.before:
            result["runs"][f"{script} before"] = run_script(args, os.path.abspath(args.before), script,
                                                             f"{script} before")
    grpo = result["runs"]["grpo.py"]
    result["plain"] = plain_fwd_bwd(args, int(grpo["real_tokens"])) if grpo["real_tokens"] else None
    if args.trl_python:
        result["runs"]["TRL 1.16 GRPOTrainer"] = run_trl(args)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Median of steps 2–{args.steps} ({args.task}), {args.prompts_per_step} prompts × G "
             f"{args.num_generations}, ≤ {args.max_completion_length} tokens, μ 1, micro-batch "
             f"{args.micro_batch_size}; grpo.py and TRL at β 0, dapo; agpo_mask_clip.py at its defaults; "
             f"{result['date']}:", "",
             "| run | s/step | generate (s) | update (s) | rows computed / step | real tokens / step | "
             "padded positions / step | update s / 1k real tokens | skipped steps | mean reward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        reward = statistics.mean(x for x in r["reward_per_step"] if x is not None)  # the fraction right
        lines.append(f"| {name} | {r['time/step']:.1f} | {r['time/generate']:.1f} | {r['time/update']:.1f} | "
                     f"{fmt(r['rows'], 1)} | {fmt(r['real_tokens'], 0)} | {fmt(r['padded_positions'], 0)} | "
                     f"{fmt(r['update_s_per_1k_real_tokens'], 2)} | {r.get('skipped_steps', '–')} | "
                     f"{fmt(reward, 3)} |")
    if result["plain"]:
        lines += ["", f"Plain forward + backward + AdamW of grpo.py's real tokens: "
                      f"{result['plain']['s_per_1k_real_tokens']:.2f} s / 1k real tokens."]
    if args.before:
        for script in SCRIPTS:
            ratio = result["runs"][script]["time/step"] / result["runs"][f"{script} before"]["time/step"]
            lines.append(f"{script} / {script} before: {ratio:.2f}× the step time.")
    if args.trl_python:
        ratio = grpo["time/step"] / result["runs"]["TRL 1.16 GRPOTrainer"]["time/step"]
        lines += ["", f"grpo.py / TRL: {ratio:.2f}× the step time (target ≤ 0.6×)."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
