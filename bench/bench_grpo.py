"""Benchmark grpo.py: time per phase per step and generation tokens/s, against the same work done
directly (raw vLLM `generate`, a plain forward / forward+backward of the same batch), written to
a JSON file and a markdown table.

    python bench/bench_grpo.py --model $(tools/prepare_smollm2.sh) --out bench/results/smollm2_cpu

Targets (issue #2): weight sync < 5% of step time; vLLM generation >= 5x transformers at G = 8;
no phase more than 20% slower than the same work done directly. It also reports the peak memory of
one log-prob forward + backward (issues #9 and #32), measured by bench/logprob_memory.py in a process of its own.
"""

import json
import os
import statistics
import subprocess
import sys
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import tyro
from common import ROOT, RunShape, read_metrics, run_dir_of, run_logged, script_command, with_pythonpath

sys.path.insert(0, ROOT)


@dataclass
class BenchArgs(RunShape):
    out: str = "bench/results/bench"
    """results are written to OUT.json and OUT.md"""
    max_completion_length: int = 128
    """tokens per completion at most"""
    beta: float = 0.04
    """β of the benchmarked run (> 0 includes the reference forward in the log-prob phase)"""
    micro_batch_size: int = 8
    """completions per forward/backward"""
    reuse_runs: bool = False
    """reuse the grpo.py runs already in OUT.runs/ (re-measure only the direct baselines)"""
    steps: int = 3
    """grpo.py steps with vLLM; the first is warm-up and left out of the means"""
    compare: Optional[str] = None
    """another algorithm script (e.g. agpo_adaptive.py): time its steps with the same batch shape, μ = 1 and β as
    grpo.py's, and write both (only this comparison is measured)"""
    hf_steps: int = 1
    """grpo.py steps with transformers generate through tests/fake_vllm (the first is left out if more than one)"""
    memory_completion_length: int = 1024
    """completion length of the log-prob memory measurement (4 sequences; random tokens)"""


def run_grpo(args: BenchArgs, out_dir: str, use_vllm: bool, steps: int, script: str = "grpo.py", extra=()) -> list:
    if not (args.reuse_runs and os.path.isdir(out_dir)):
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = script_command(script, args.model, args.dataset, out_dir, total_steps=steps, save_steps=0,
                             prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                             max_completion_length=args.max_completion_length,
                             micro_batch_size=args.micro_batch_size, beta=args.beta,
                             skip_no_signal=False)  # every step's update is timed, with or without a reward signal
        log = f"{args.out}.{script[:-3]}.{'vllm' if use_vllm else 'transformers'}.log"
        fake = [] if use_vllm else [os.path.join(ROOT, "tests", "fake_vllm")]  # generate served by transformers
        run_logged(cmd + list(extra), log, script, env=with_pythonpath(*fake))
    return read_metrics(run_dir_of(out_dir))


def direct_baselines(args: BenchArgs, steps: int) -> dict:
    """The same work without the trainer: raw vLLM generate of the same prompts with the same
    sampling settings and seeds, then a plain forward (no grad) and a plain forward+backward +
    AdamW step of those completions in the same micro-batches."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import grpo
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    grpo.init_distributed()
    gargs = grpo.Args(
        model=args.model,
        dataset=args.dataset,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
    )
    tok = grpo.load_tokenizer(gargs)
    ds, q, a = grpo.load_rows(gargs)
    examples, _, _ = grpo.prepare_prompts(ds, q, a, tok, gargs)
    stop = grpo.stop_token_ids(args.model, tok)
    llm = grpo.setup_vllm(gargs, 0, torch.float32, torch.cuda.is_available())  # the trainer's engine settings
    gen_t, gen_tok, fwd_t, upd_t, tokens = [], [], [], [], []
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    grpo.use_logprob_forward(model)  # the scripts' log-probs (docs/algorithms.md (6.3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for step in range(steps):
        idx = grpo.prompt_indices(step * args.prompts_per_step, args.prompts_per_step, len(examples), gargs.seed)
        prompts = [examples[i]["prompt_ids"] for i in idx]
        t = time.perf_counter()
        params = [SamplingParams(n=args.num_generations, temperature=gargs.temperature, top_p=gargs.top_p, logprobs=0,
                                 flat_logprobs=True, max_tokens=args.max_completion_length, stop_token_ids=stop)
                  for _ in prompts]  # the trainer's requests
        seed = grpo.stream_seed(gargs.seed, "generate", step, 0)
        torch.manual_seed(seed)  # the trainer's seeding
        np.random.seed([seed % 2**32, seed >> 32])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        gen_t.append(time.perf_counter() - t)
        comps = [list(o.token_ids) for out in outs for o in out.outputs]
        gen_tok.append(sum(len(c) for c in comps))
        reps = [p for p in prompts for _ in range(args.num_generations)]
        mbs = [range(s, s + args.micro_batch_size) for s in range(0, len(comps), args.micro_batch_size)]
        t = time.perf_counter()
        with torch.no_grad():
            for ix in mbs:
                grpo.completion_logprobs(
                    model, grpo.collate([reps[i] for i in ix], [comps[i] for i in ix], "cpu"), 1.0
                )
        fwd_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for ix in mbs:
            b = grpo.collate([reps[i] for i in ix], [comps[i] for i in ix], "cpu")
            logp, _ = grpo.completion_logprobs(model, b, 1.0, with_entropy=True)
            (logp * b["completion_mask"]).sum().backward()
        opt.step()
        opt.zero_grad()
        upd_t.append(time.perf_counter() - t)
        tokens.append(gen_tok[-1])
    s = slice(1, None) if steps > 1 else slice(None)
    return {
        "generate_s": statistics.mean(gen_t[s]),
        "tokens": statistics.mean(tokens[s]),
        "generate_tok_per_s": sum(gen_tok[s]) / sum(gen_t[s]),
        "forward_s_per_1k_tok": 1000 * sum(fwd_t[s]) / sum(tokens[s]),
        "fwd_bwd_step_s_per_1k_tok": 1000 * sum(upd_t[s]) / sum(tokens[s]),
    }


def logprob_memory(args: BenchArgs) -> dict:
    """Peak memory of one log-prob forward + backward of a micro-batch (bench/logprob_memory.py, a narrow random model
    with Qwen2.5's vocabulary), in fp32 as on CPUs."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "logprob_memory.py"), "--one", "--dtype", "float32",
           "--completion-length", str(args.memory_completion_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=with_pythonpath(ROOT))
    if proc.returncode:
        raise SystemExit(f"logprob_memory.py failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(m: list, skip_first: bool) -> dict:
    """Mean phase times of grpo.py's metrics, and per-token rates (lengths vary between runs)."""
    step_tokens = [
        r["tokens/generated_total"] - (m[i - 1]["tokens/generated_total"] if i else 0) for i, r in enumerate(m)
    ]
    first = 1 if skip_first and len(m) > 1 else 0
    rows, per_step_tokens = m[first:], step_tokens[first:]
    n = len(rows)
    out = {
        k.split("/")[-1] + "_s": sum(r[k] for r in rows) / n
        for k in ("time/generate", "time/logprobs", "time/update", "time/weight_sync", "time/step")
    }
    out["tokens"] = sum(per_step_tokens) / n
    out["generate_tok_per_s"] = sum(per_step_tokens) / sum(r["time/generate"] for r in rows)
    out["logprobs_s_per_1k_tok"] = 1000 * sum(r["time/logprobs"] for r in rows) / sum(per_step_tokens)
    out["update_s_per_1k_tok"] = 1000 * sum(r["time/update"] for r in rows) / sum(per_step_tokens)
    out["weight_sync_frac_of_step"] = sum(r["time/weight_sync"] for r in rows) / sum(r["time/step"] for r in rows)
    return out


def compare_scripts(args: BenchArgs, runs: str) -> None:
    """Phase times per step of grpo.py and of args.compare on the same batch shape, μ = 1, same β and seed."""
    keys = ("time/generate", "time/probe", "time/logprobs", "time/update", "time/weight_sync", "time/step")
    result = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M")}
    for script in ("grpo.py", args.compare):
        extra = ("--num-iterations", "1") if script != "grpo.py" else ()
        m = run_grpo(args, os.path.join(runs, script[:-3]), True, args.steps, script, extra)[1:]  # step 1: warm-up
        tokens = [r["tokens/generated_total"] - p["tokens/generated_total"] for p, r in zip(m, m[1:])] if len(m) > 1 \
            else [m[0]["tokens/generated_total"]]
        result[script] = {k: statistics.mean(r.get(k, 0.0) for r in m) for k in keys}
        result[script]["generated_tokens_per_step"] = statistics.mean(tokens)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    a, b = result["grpo.py"], result[args.compare]
    lines = [f"| per step (mean of steps 2–{args.steps}) | grpo.py | {args.compare} | ratio |", "|---|---|---|---|"]
    for k in keys + ("generated_tokens_per_step",):
        ratio = f"{b[k] / a[k]:.2f}" if a[k] > 0 else "-"
        lines.append(f"| {k} | {a[k]:.2f} | {b[k]:.2f} | {ratio} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = tyro.cli(BenchArgs)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runs = args.out + ".runs"
    if args.compare:
        return compare_scripts(args, runs)
    vllm_run = summarise(run_grpo(args, os.path.join(runs, "vllm"), True, args.steps), skip_first=True)
    hf_run = summarise(
        run_grpo(args, os.path.join(runs, "transformers"), False, args.hf_steps), skip_first=args.hf_steps > 1
    )
    direct = direct_baselines(args, args.steps)
    memory = logprob_memory(args)
    # the log-prob phase is one reference forward per micro-batch (β > 0, μ = 1): compare it to a
    # plain forward; the update is forward+backward+AdamW: compare it to the plain equivalent
    ratios = {
        "weight_sync_frac_of_step": vllm_run["weight_sync_frac_of_step"],
        "vllm_over_hf_generate_speedup": vllm_run["generate_tok_per_s"] / hf_run["generate_tok_per_s"],
        "generate_slowdown_vs_raw_vllm": direct["generate_tok_per_s"] / vllm_run["generate_tok_per_s"],
        "logprobs_slowdown_vs_plain_forward": vllm_run["logprobs_s_per_1k_tok"] / direct["forward_s_per_1k_tok"],
        "update_slowdown_vs_plain_fwd_bwd": vllm_run["update_s_per_1k_tok"] / direct["fwd_bwd_step_s_per_1k_tok"],
    }
    targets = {
        "weight_sync_frac_of_step": ratios["weight_sync_frac_of_step"] < 0.05,
        "vllm_over_hf_generate_speedup": ratios["vllm_over_hf_generate_speedup"] >= 5,
        "generate_slowdown_vs_raw_vllm": ratios["generate_slowdown_vs_raw_vllm"] <= 1.2,
        "logprobs_slowdown_vs_plain_forward": ratios["logprobs_slowdown_vs_plain_forward"] <= 1.2,
        "update_slowdown_vs_plain_fwd_bwd": ratios["update_slowdown_vs_plain_fwd_bwd"] <= 1.2,
    }
    result = {
        "settings": asdict(args),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "grpo_vllm": vllm_run,
        "grpo_transformers": hf_run,
        "direct": direct,
        "logprob_memory": memory,
        "ratios": ratios,
        "targets_met": targets,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = ["| measure | value | target | met |", "|---|---|---|---|"]
    goal = {
        "weight_sync_frac_of_step": "< 0.05",
        "vllm_over_hf_generate_speedup": ">= 5",
        "generate_slowdown_vs_raw_vllm": "<= 1.2",
        "logprobs_slowdown_vs_plain_forward": "<= 1.2",
        "update_slowdown_vs_plain_fwd_bwd": "<= 1.2",
    }
    for k, v in ratios.items():
        lines.append(f"| {k} | {v:.3f} | {goal[k]} | {'yes' if targets[k] else 'NO'} |")
    lines += ["", "| phase (mean per step) | grpo.py + vLLM | grpo.py + transformers | direct |", "|---|---|---|---|"]
    v, h, d = vllm_run, hf_run, direct
    lines.append(f"| generate (s) | {v['generate_s']:.2f} | {h['generate_s']:.2f} | {d['generate_s']:.2f} (raw vLLM) |")
    lines.append(
        f"| generate tokens/s | {v['generate_tok_per_s']:.0f} | {h['generate_tok_per_s']:.0f} "
        f"| {d['generate_tok_per_s']:.0f} |"
    )
    lines.append(
        f"| log-probs (s / 1k tokens) | {v['logprobs_s_per_1k_tok']:.3f} | {h['logprobs_s_per_1k_tok']:.3f} "
        f"| {d['forward_s_per_1k_tok']:.3f} (plain forward) |"
    )
    lines.append(
        f"| update (s / 1k tokens) | {v['update_s_per_1k_tok']:.3f} | {h['update_s_per_1k_tok']:.3f} "
        f"| {d['fwd_bwd_step_s_per_1k_tok']:.3f} (plain fwd+bwd+AdamW) |"
    )
    lines.append(f"| weight sync (s) | {vllm_run['weight_sync_s']:.3f} | - | - |")
    lines.append(f"| step (s) | {vllm_run['step_s']:.2f} | {hf_run['step_s']:.2f} | - |")
    lines += ["", f"Peak memory of one log-prob forward + backward ({memory['micro_batch_size']} × "
              f"{memory['completion_length']} tokens, vocabulary {memory['vocab']:,}, {memory['device']}, "
              f"{memory['dtype']}): {memory['peak_over_before_mib']:,.0f} MiB over resident ({memory['seconds']} s)"]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
