"""Step time of grpo.py with the CPU allocator and OpenMP runtime preloaded, on one config; the update's time per real
token against a plain forward + backward + AdamW of the same number of real tokens; and, with --trl-python, TRL's
GRPOTrainer on the same config in the same environment (bench/bench_trl.py, run by the python of a venv that has TRL).

    python bench/bench_speed.py --model $(tools/prepare_smollm2.sh) --out bench/results/speed_cpu \
        --trl-python /path/to/trl_venv/bin/python

Writes OUT.json and OUT.md. Figures are medians over steps 2..--steps (step 1 is warm-up). Run it on a quiet
machine: the runs go one after the other and any other load shows up in every figure.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import tyro
from common import ROOT, SPEED_CONFIG, RunShape, flags, preload_env, read_metrics, run_dir_of, run_logged, script_command

RUN = "padded_preload"  # grpo.py's micro-batches (padded rows), preloaded


@dataclass
class Args(RunShape):
    out: str = "bench/results/speed_cpu"
    """results are written to OUT.json and OUT.md, runs to OUT.runs/"""
    micro_batch_size: int = 32
    """completions per micro-batch"""
    trl_python: str | None = None
    """python of a venv with TRL 1.16 (README, Benchmarks): also run TRL's GRPOTrainer on this config, preloaded"""
    steps: int = 7
    """grpo.py (and TRL) steps; the median is over steps 2..steps"""


def run_grpo(args: Args) -> dict:
    out = os.path.join(args.out + ".runs", RUN)
    cmd = script_command("grpo.py", args.model, args.dataset, out, total_steps=args.steps, save_steps=0,
                         skip_no_signal=False, prompts_per_step=args.prompts_per_step,
                         num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                         micro_batch_size=args.micro_batch_size, **SPEED_CONFIG)
    run_logged(cmd, os.path.join(out, "run.log"), "grpo.py", env=preload_env(True))
    rows = read_metrics(run_dir_of(out))[1:]  # step 1: warm-up
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("time/step", "time/generate", "time/update", "time/weight_sync")}
    med["padding_fraction"] = statistics.mean(r["update/padding_fraction"] for r in rows)
    med["real_tokens_per_step"] = statistics.mean(r["update/real_tokens"] for r in rows)
    med["update_s_per_1k_real_tokens"] = 1000 * med["time/update"] / med["real_tokens_per_step"]
    med["reward_per_step"] = [r["reward"] for r in rows]
    return med


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
    """bench/bench_trl.py with --trl-python, on this config and in the preloaded environment grpo.py gets."""
    out = os.path.join(args.out + ".runs", "trl_preload")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [args.trl_python, os.path.join(ROOT, "bench", "bench_trl.py"),
           *flags(model=args.model, dataset=args.dataset, out=out, steps=args.steps,
                  prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                  max_completion_length=args.max_completion_length)]
    run_logged(cmd, out + ".log", "bench_trl.py", env=preload_env(True))
    with open(out + ".json") as f:
        m = json.load(f)["median"]
    return {"time/step": m["step_s"], "time/generate": m["generate_s"], "time/update": m["update_s"],
            "time/weight_sync": m["weight_sync_s"]}


def main() -> None:
    args = tyro.cli(Args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}, "plain": {}}
    result["runs"][RUN] = run_grpo(args)
    result["plain"]["preload"] = plain_fwd_bwd(args, int(result["runs"][RUN]["real_tokens_per_step"]))
    if args.trl_python:
        result["trl"] = run_trl(args)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Median of steps 2–{args.steps}, grpo.py with vLLM, {args.prompts_per_step} prompts × G "
             f"{args.num_generations}, ≤ {args.max_completion_length} tokens, β 0, dapo, μ 1, micro-batch "
             f"{args.micro_batch_size}, {result['date']}:", "",
             "| run | s/step | generate (s) | weight sync (s) | update (s) | padding in the update | "
             "update s / 1k real tokens | plain fwd+bwd+AdamW s / 1k real tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        plain = result["plain"][name.split("_")[1]]
        lines.append(f"| grpo.py {name} | {r['time/step']:.1f} | {r['time/generate']:.1f} | "
                     f"{r['time/weight_sync']:.2f} | {r['time/update']:.1f} | {100 * r['padding_fraction']:.0f}% | "
                     f"{r['update_s_per_1k_real_tokens']:.2f} | {plain['s_per_1k_real_tokens']:.2f} |")
    if "trl" in result:
        t = result["trl"]
        lines.append(f"| TRL 1.16 GRPOTrainer, preload | {t['time/step']:.1f} | {t['time/generate']:.1f} | "
                     f"{t['time/weight_sync']:.2f} | {t['time/update']:.1f} | - | - | - |")
        ratio = result["runs"][RUN]["time/step"] / t["time/step"]
        lines += ["", f"grpo.py {RUN} / TRL: {ratio:.2f}× the step time (target ≤ 0.6×)."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
