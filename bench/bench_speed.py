"""Step time of grpo.py with padded, packed and shared-prompt micro-batches, and with and without the CPU allocator and
OpenMP runtime preloaded, on one config, one run after the other; the update's time per real token against a
plain forward + backward + AdamW of the same number of real tokens; and, with --trl-python, TRL's GRPOTrainer on
the same config in the same environment (bench/bench_trl.py, run by the python of a venv that has TRL).

    python bench/bench_speed.py --model $(../shared/tools/prepare_smollm2.sh) --out bench/results/speed_cpu \
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
from dataclasses import asdict, dataclass, field

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
    variants: list[str] = field(default_factory=lambda: ["padded_preload", "packed_preload", "shared_preload"])
    """the grpo.py runs, {padded,packed,shared}_{plain,preload}: --no-padding-free, --padding-free --no-share-prompts,
    --padding-free --share-prompts (the default); with or without the preload"""
    trl_python: str | None = None
    """python of a venv with TRL 1.16 (README, Benchmarks): also run TRL's GRPOTrainer on this config, preloaded"""


def preload_env(on: bool) -> dict:
    libs = [TCMALLOC, os.path.join(sys.prefix, "lib", "libiomp5.so")]
    if on and not all(os.path.exists(p) for p in libs):
        raise SystemExit(f"cannot preload: missing {[p for p in libs if not os.path.exists(p)]} (README, Setup)")
    return dict(os.environ, LD_PRELOAD=":".join(libs) if on else "")


def run_grpo(args: Args, name: str, layout: str, preload: bool) -> dict:
    out = os.path.join(args.out + ".runs", name)
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", args.model, "--dataset", args.dataset,
           "--output-dir", out, "--total-steps", str(args.steps), "--save-steps", "0", "--beta", "0",
           "--loss-type", "dapo", "--no-skip-no-signal", "--prompts-per-step", str(args.prompts_per_step),
           "--num-generations", str(args.num_generations), "--max-completion-length", str(args.max_completion_length),
           "--micro-batch-size", str(args.micro_batch_size), "--log-completions", "0",
           "--padding-free" if layout != "padded" else "--no-padding-free",
           "--share-prompts" if layout == "shared" else "--no-share-prompts"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run.log"), "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=preload_env(preload)).returncode:
            raise SystemExit(f"grpo.py failed; see {log.name}")
    run_dir = os.path.join(out, next(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # step 1: warm-up
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("time/step", "time/generate", "time/update", "time/weight_sync")}
    med["padding_fraction"] = statistics.mean(r["update/padding_fraction"] for r in rows)
    med["real_tokens_per_step"] = statistics.mean(r["update/real_tokens"] for r in rows)
    med["computed_tokens_per_step"] = statistics.mean(r["update/computed_tokens"] for r in rows)
    med["update_s_per_1k_real_tokens"] = 1000 * med["time/update"] / med["real_tokens_per_step"]
    med["reward_per_step"] = [r["reward"] for r in rows]
    return med


def plain_fwd_bwd(args: Args, preload: bool, real_tokens: int) -> dict:
    """The yardstick of the update: a plain transformers model (no DeepSpeed, no log-prob code of ours) doing
    forward + causal-LM loss + backward + AdamW on `real_tokens` random tokens in packed rows of sequences shaped
    like a step's (prompts of 80-160 tokens, completions up to the limit), in a subprocess with the same threads."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {ROOT!r})
import grpo
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
batch = grpo.pack(prompts, comps, 0, 512 + {args.max_completion_length}, "cpu")  # grpo.py's rows
times = []
for _ in range(4):
    t = time.perf_counter()
    out = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"])
    out.loss.backward()
    opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(json.dumps({{"seconds": sorted(times[1:])[1], "real_tokens": total, "threads": torch.get_num_threads()}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=preload_env(preload))
    if proc.returncode:
        raise SystemExit(f"plain forward+backward failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["s_per_1k_real_tokens"] = 1000 * r["seconds"] / r["real_tokens"]
    return r


def run_trl(args: Args) -> dict:
    """bench/bench_trl.py with --trl-python, on this config and in the preloaded environment grpo.py gets."""
    out = os.path.join(args.out + ".runs", "trl_preload")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [args.trl_python, os.path.join(ROOT, "bench", "bench_trl.py"), "--model", args.model,
           "--dataset", args.dataset, "--out", out, "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations),
           "--max-completion-length", str(args.max_completion_length)]
    with open(out + ".log", "w") as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=preload_env(True)).returncode:
            raise SystemExit(f"bench_trl.py failed; see {log.name}")
    with open(out + ".json") as f:
        m = json.load(f)["median"]
    return {"time/step": m["step_s"], "time/generate": m["generate_s"], "time/update": m["update_s"],
            "time/weight_sync": m["weight_sync_s"]}


def main() -> None:
    args = tyro.cli(Args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}, "plain": {}}
    for name in args.variants:
        layout, env = name.split("_")
        if layout not in ("padded", "packed", "shared") or env not in ("plain", "preload"):
            raise SystemExit(f"--variants {name}: expected {{padded,packed,shared}}_{{plain,preload}}")
        result["runs"][name] = run_grpo(args, name, layout, env == "preload")
        if env not in result["plain"]:
            real_tokens = int(result["runs"][name]["real_tokens_per_step"])
            result["plain"][env] = plain_fwd_bwd(args, env == "preload", real_tokens)
    if args.trl_python:
        result["trl"] = run_trl(args)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"Median of steps 2–{args.steps}, grpo.py with vLLM, {args.prompts_per_step} prompts × G "
             f"{args.num_generations}, ≤ {args.max_completion_length} tokens, β 0, dapo, μ 1, micro-batch "
             f"{args.micro_batch_size}, {result['date']}:", "",
             "| run | s/step | generate (s) | weight sync (s) | update (s) | padding in the update | "
             "positions computed / real tokens | update s / 1k real tokens | plain fwd+bwd+AdamW s / 1k real tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        plain = result["plain"][name.split("_")[1]]
        lines.append(f"| grpo.py {name} | {r['time/step']:.1f} | {r['time/generate']:.1f} | "
                     f"{r['time/weight_sync']:.2f} | {r['time/update']:.1f} | {100 * r['padding_fraction']:.0f}% | "
                     f"{r['computed_tokens_per_step'] / r['real_tokens_per_step']:.2f} | "
                     f"{r['update_s_per_1k_real_tokens']:.2f} | {plain['s_per_1k_real_tokens']:.2f} |")
    if "trl" in result:
        t = result["trl"]
        lines.append(f"| TRL 1.16 GRPOTrainer, preload | {t['time/step']:.1f} | {t['time/generate']:.1f} | "
                     f"{t['time/weight_sync']:.2f} | {t['time/update']:.1f} | - | - | - | - |")
        for name in ("shared_preload", "packed_preload", "padded_preload"):
            if name in result["runs"]:
                ratio = result["runs"][name]["time/step"] / t["time/step"]
                lines += ["", f"grpo.py {name} / TRL: {ratio:.2f}× the step time (target ≤ 0.6×)."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
