"""Peak memory of one log-prob forward + backward of a micro-batch, as the scripts' update computes it.

    python bench/logprob_memory.py --before OLD_CHECKOUT   # B 4 × T 1,024 and 3,584, V 151,936: before and after
    python bench/logprob_memory.py --one --code DIR ...    # one measurement (the grid: each in a process of its own)

The model is a narrow random Qwen2 (2 layers, width 64) with Qwen2.5's vocabulary of 151,936 entries, so the output
layer's logits are what the measurement sees. `--code` is a checkout whose grpo.py computes the log-probs (this
repository by default; `--before` adds an older checkout to the grid). The peak is over what was resident before the
forward: on CPU the process's peak resident memory, reset through /proc/self/clear_refs; on CUDA the allocator's.
Writes bench/results/logprob_memory_<device>.json and .md.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    before: Optional[str] = None
    """an older checkout to measure beside this one (e.g. a `git worktree` of the commit before issue #32)"""
    one: bool = False
    """measure one configuration in this process and print it as a JSON line"""
    code: str = ROOT
    """(--one) the checkout whose grpo.py computes the log-probs"""
    completion_length: int = 1024
    """(--one) T, tokens per completion (random ids; the prompt is 64 tokens)"""
    micro_batch_size: int = 4
    """(--one) B, sequences in the micro-batch"""
    dtype: str = "bfloat16"
    """(--one) the model's weights: bfloat16 (as on GPUs) or float32 (as on CPUs)"""
    vocab: int = 151936
    """(--one) V, entries of the vocabulary (Qwen2.5's)"""
    tied: bool = True
    """(--one) output layer tied to the embedding (Qwen2.5 up to 3B) or its own (7B)"""


def resident_mib() -> tuple:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(args: Args) -> dict:
    sys.path.insert(0, args.code)
    import grpo
    from transformers import AutoModelForCausalLM, Qwen2Config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    T, B = args.completion_length, args.micro_batch_size
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T + 64,
                         tie_word_embeddings=args.tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(device)
    if hasattr(grpo, "use_logprob_forward"):  # the output layer in fp32 chunks (issue #32)
        grpo.use_logprob_forward(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (64,), generator=g).tolist() for _ in range(B)]
    completions = [torch.randint(3, args.vocab, (T,), generator=g).tolist() for _ in range(B)]
    batch = grpo.collate(prompts, completions, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
        before, _ = resident_mib()
    t = time.perf_counter()
    logp, entropy = grpo.completion_logprobs(model, batch, 1.0, with_entropy=True)  # the update's first pass
    logp.sum().backward()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resident_mib()[1]
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    return {"code": args.code, "device": device, "dtype": args.dtype, "tied": args.tied, "micro_batch_size": B,
            "completion_length": T, "vocab": args.vocab, "peak_over_before_mib": round(peak - before, 1),
            "logits_of_the_micro_batch_mib": round(B * (T + 1) * args.vocab * element / 2**20, 1),
            "seconds": round(seconds, 2)}


def main() -> None:
    args = tyro.cli(Args)
    if args.one:
        print(json.dumps(measure(args)))
        return
    codes = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    grid = [("bfloat16", 1024), ("bfloat16", 3584), ("float32", 1024)]
    rows = []
    for dtype, T in grid:
        for name, code in codes:  # each in a process of its own: one peak per process
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--code", code, "--dtype", dtype,
                   "--completion-length", str(T)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            rows.append({"version": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    out = os.path.join(ROOT, "bench", "results", f"logprob_memory_{rows[0]['device']}")
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| weights | B × T | logits [B, T + 1, V] | version | peak over resident (MiB) | seconds |",
             "|---" * 6 + "|"]
    lines += [f"| {r['dtype']} | {r['micro_batch_size']} × {r['completion_length']:,} | "
              f"{r['logits_of_the_micro_batch_mib']:,.0f} MiB | {r['version']} | {r['peak_over_before_mib']:,.0f} | "
              f"{r['seconds']} |" for r in rows]
    with open(out + ".md", "w") as f:
        f.write(f"Log-prob forward + backward, V {rows[0]['vocab']:,}, narrow random Qwen2 (bench/logprob_memory.py)"
                f"\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
