"""Step time of grpo.py with and without padding-free micro-batches, and with and without the CPU allocator and
OpenMP runtime preloaded, on one config, one run after the other; and the update's time per real token
against a plain forward + backward + AdamW of the same real tokens.

    python bench/bench_speed.py --model $(../shared/tools/prepare_smollm2.sh) --out bench/results/speed_cpu

Writes OUT.json and OUT.md. Figures are medians over steps 2..--steps (step 1 is warm-up).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@dataclass
class Args:
    model: str
    """local model directory (e.g. the output of ../shared/tools/prepare_smollm2.sh)"""
    dataset: str = "../shared/data/gsm8k_train.jsonl"
    """training data (a local file)"""
    out: str = "bench/results/speed_cpu"
    """results are written to OUT.json and OUT.md, runs to OUT.runs/"""
    steps: int = 7
    """grpo.py steps per variant; the median is over steps 2..steps"""
    prompts_per_step: int = 4
    """prompts per step"""
    num_generations: int = 8
    """G"""
    max_completion_length: int = 64
    """tokens per completion at most"""
    micro_batch_size: int = 32
    """completions per micro-batch"""


def preload_env(on: bool) -> dict:
    libs = [TCMALLOC, os.path.join(sys.prefix, "lib", "libiomp5.so")]
    if on and not all(os.path.exists(p) for p in libs):
        raise SystemExit(f"cannot preload: missing {[p for p in libs if not os.path.exists(p)]} (README, Setup)")
    return dict(os.environ, LD_PRELOAD=":".join(libs) if on else "")


def run_grpo(args: Args, name: str, padding_free: bool, preload: bool) -> dict:
    out = os.path.join(args.out + ".runs", name)
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", args.model, "--dataset", args.dataset,
           "--output-dir", out, "--total-steps", str(args.steps), "--save-steps", "0", "--beta", "0",
           "--loss-type", "dapo", "--prompts-per-step", str(args.prompts_per_step),
           "--num-generations", str(args.num_generations), "--max-completion-length", str(args.max_completion_length),
           "--micro-batch-size", str(args.micro_batch_size), "--log-completions", "0",
           "--padding-free" if padding_free else "--no-padding-free"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run.log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=preload_env(preload)).returncode:
            raise SystemExit(f"grpo.py failed; see {log.name}")
    run_dir = os.path.join(out, next(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # step 1: warm-up
    med = {k: statistics.median(r[k] for r in rows) for k in ("time/step", "time/generate", "time/update")}
    med["padding_fraction"] = statistics.mean(r["update/padding_fraction"] for r in rows)
    med["real_tokens_per_step"] = statistics.mean(r["update/real_tokens"] for r in rows)
    med["update_s_per_1k_real_tokens"] = 1000 * med["time/update"] / med["real_tokens_per_step"]
    med["reward_per_step"] = [r["reward"] for r in rows]
    return med


def plain_fwd_bwd(args: Args, preload: bool) -> dict:
    """A plain model (no DeepSpeed) doing forward + backward + AdamW on one packed micro-batch of random tokens
    shaped like a step's (prompts of 80-160 tokens, completions up to the limit), in a subprocess."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {ROOT!r})
import grpo
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({args.model!r}, dtype=torch.float32)
opt = torch.optim.AdamW(m.parameters(), lr=1e-7)
g = torch.Generator().manual_seed(0)
n = {args.prompts_per_step * args.num_generations}
prompts = [torch.randint(100, 40000, (int(torch.randint(80, 161, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]  # GSM8K prompts in the chat template: 80-160 tokens
comps = [torch.randint(100, 40000, (int(torch.randint(30, {args.max_completion_length} + 1, (1,), generator=g)),),
                       generator=g).tolist() for _ in range(n)]
batch = grpo.pack(prompts, comps, 0, 4096, "cpu")
times = []
for _ in range(4):
    t = time.perf_counter()
    logp, ent = grpo.completion_logprobs(m, batch, 1.0, with_entropy=True)
    logp.sum().backward()
    opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
real = sum(len(p) + len(c) for p, c in zip(prompts, comps))
print(json.dumps({{"seconds": sorted(times[1:])[1], "real_tokens": real}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=preload_env(preload))
    if proc.returncode:
        raise SystemExit(f"plain forward+backward failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["s_per_1k_real_tokens"] = 1000 * r["seconds"] / r["real_tokens"]
    return r


def main() -> None:
    args = tyro.cli(Args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}, "plain": {}}
    for preload in (False, True):
        for padding_free in (False, True):
            name = f"{'packed' if padding_free else 'padded'}_{'preload' if preload else 'plain'}"
            result["runs"][name] = run_grpo(args, name, padding_free, preload)
        result["plain"]["preload" if preload else "plain"] = plain_fwd_bwd(args, preload)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Median of steps 2–{args.steps}, grpo.py with vLLM, {args.prompts_per_step} prompts × G "
             f"{args.num_generations}, ≤ {args.max_completion_length} tokens, β 0, dapo, μ 1, micro-batch "
             f"{args.micro_batch_size}:", "",
             "| run | s/step | generate (s) | update (s) | padding in the update | update s / 1k real tokens | "
             "plain fwd+bwd+AdamW s / 1k real tokens |", "|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        plain = result["plain"]["preload" if name.endswith("preload") else "plain"]
        lines.append(f"| {name} | {r['time/step']:.1f} | {r['time/generate']:.1f} | {r['time/update']:.1f} | "
                     f"{100 * r['padding_fraction']:.0f}% | {r['update_s_per_1k_real_tokens']:.2f} | "
                     f"{plain['s_per_1k_real_tokens']:.2f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
