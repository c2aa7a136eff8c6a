"""Peak memory of one log-prob forward + backward (the update's micro-batch), as grpo.py computes it.

    python bench/logprob_memory.py --model MODEL --chunk-size 0      # the fp32 log-softmax in one piece
    python bench/logprob_memory.py --model MODEL --chunk-size 256    # 256 positions at a time (the default)
    python bench/logprob_memory.py --model MODEL --stage log-softmax # from the model's logits on: the part chunked

Prints one JSON line: the peak of the step above what was resident before it, in MiB (on CUDA the
allocator's peak; on CPU the process's peak resident memory, reset through /proc/self/clear_refs
before the step, so loading the model does not count).
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Args:
    model: str
    """local model directory"""
    chunk_size: int = 256
    """positions per fp32 log-softmax chunk, set as grpo.LOGPROB_CHUNK (grpo.py's is 256; 0: all positions at once)"""
    micro_batch_size: int = 4
    """sequences in the micro-batch"""
    completion_length: int = 1024
    """tokens per completion (random token ids; the prompt is 64 tokens)"""
    stage: str = "micro-batch"
    """micro-batch: the model's forward and backward included; log-softmax: from the model's logits on (computed
    first, outside the measurement), which isolates what the chunk size changes"""


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    args = tyro.cli(Args)
    import grpo
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (64,), generator=g).tolist() for _ in range(args.micro_batch_size)]
    completions = [
        torch.randint(0, vocab, (args.completion_length,), generator=g).tolist() for _ in range(args.micro_batch_size)
    ]
    batch = grpo.collate(prompts, completions, device)
    if args.stage == "log-softmax":  # the model's logits, held as a leaf: only the log-softmax is measured
        with torch.no_grad():
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            logits = model(**inputs, logits_to_keep=args.completion_length + 1).logits
        logits.requires_grad_(True)
        model = lambda **kwargs: type("Output", (), {"logits": logits})  # noqa: E731
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident memory, to the current resident memory
        before, _ = resident_mib()
    t = time.perf_counter()
    grpo.LOGPROB_CHUNK = args.chunk_size or 10**9  # 0: every position at once
    logp, entropy = grpo.completion_logprobs(model, batch, 1.0, with_entropy=True)
    logp.sum().backward()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resident_mib()[1]
    logits_mib = args.micro_batch_size * args.completion_length * vocab * 4 / 2**20
    print(
        json.dumps(
            {
                "stage": args.stage,
                "chunk_size": args.chunk_size,
                "peak_over_before_mib": round(peak - before, 1),
                "fp32_logits_of_the_micro_batch_mib": round(logits_mib, 1),
                "seconds": round(seconds, 3),
                "device": device,
                "micro_batch_size": args.micro_batch_size,
                "completion_length": args.completion_length,
                "vocab": vocab,
            }
        )
    )


if __name__ == "__main__":
    main()
