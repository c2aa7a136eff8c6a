"""What sampling seeds cost vLLM: one engine call of the trainer's shape (grpo.setup_vllm's engine), timed three ways,
every completion forced to --max-tokens (ignore_eos) so each way generates the same tokens:

- per-request seeds, the scripts' sampling before docs/algorithms.md (6.5) changed: vLLM samples every seeded row on
  its own, a loop over the batch at every token;
- one seed per call, the scripts' sampling now (grpo.sample_and_score): the torch and numpy generators seeded, no
  request seeded;
- unseeded, as TRL calls vLLM.

    python bench/generation_seeds.py --model $(tools/prepare_smollm2.sh) --out bench/results/seeds_cpu_32
    python bench/generation_seeds.py --model ... --prompts 128 --max-tokens 16 --out bench/results/seeds_cpu_1024

Writes OUT.json and OUT.md: the median seconds per call over --repeats rounds (the ways interleaved, after one
warm-up call each). Run it on a quiet machine.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import tyro
from common import GSM8K_SAMPLE, ROOT

sys.path.insert(0, ROOT)
import grpo  # noqa: E402


@dataclass
class Args:
    model: str
    """local model directory (e.g. the output of tools/prepare_smollm2.sh)"""
    dataset: str = GSM8K_SAMPLE
    """prompts, a local .jsonl"""
    prompts: int = 4
    """prompts per call"""
    num_generations: int = 8
    """G, completions per prompt (sequences per call: prompts × G)"""
    max_tokens: int = 64
    """tokens per completion (every completion runs to it)"""
    repeats: int = 3
    """timed calls per way"""
    out: str = "bench/results/seeds_cpu"
    """results are written to OUT.json and OUT.md"""


def main() -> None:
    args = tyro.cli(Args)
    from vllm import SamplingParams

    grpo.init_distributed()
    gargs = grpo.Args(model=args.model, dataset=args.dataset, prompts_per_step=args.prompts,
                      num_generations=args.num_generations, max_completion_length=args.max_tokens)
    tokenizer = grpo.load_tokenizer(gargs)
    ds, q, a = grpo.load_rows(gargs)
    examples, _, _ = grpo.prepare_prompts(ds, q, a, tokenizer, gargs)
    prompts = [{"prompt_token_ids": examples[i % len(examples)]["prompt_ids"]} for i in range(args.prompts)]
    llm = grpo.setup_vllm(gargs, 0, torch.float32, torch.cuda.is_available())

    def params(seed):
        return SamplingParams(n=args.num_generations, max_tokens=args.max_tokens, ignore_eos=True, seed=seed)

    def per_request(call):
        return [params((gargs.seed * 1_000_003 + call * 10_007 + i) % 2**31) for i in range(args.prompts)]

    def per_call(call):
        seed = grpo.stream_seed(gargs.seed, "generate", call, 0)
        torch.manual_seed(seed)
        np.random.seed([seed % 2**32, seed >> 32])
        return [params(None)] * args.prompts

    ways = {"per-request seeds (before)": per_request, "one seed per call (now)": per_call,
            "unseeded (TRL)": lambda call: [params(None)] * args.prompts}
    seconds = {name: [] for name in ways}
    for call in range(args.repeats + 1):  # call 0: warm-up
        for name, make in ways.items():
            t = time.perf_counter()
            outs = llm.generate(prompts, make(call), use_tqdm=False)
            if call:
                seconds[name].append(time.perf_counter() - t)
            assert sum(len(o.token_ids) for out in outs for o in out.outputs) == len(prompts) * args.num_generations \
                * args.max_tokens
    result = {"args": asdict(args), "sequences_per_call": args.prompts * args.num_generations,
              "median_s": {k: statistics.median(v) for k, v in seconds.items()}, "seconds": seconds}
    base = result["median_s"]["unseeded (TRL)"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"{result['sequences_per_call']} sequences × {args.max_tokens} tokens per call, median of "
             f"{args.repeats} calls", "", "| sampling | s per call | × unseeded |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / base:.2f} |" for k, v in result["median_s"].items()]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
