"""The weight sync reaches vLLM bucket by bucket: after an optimizer step and `sync_weights_to_vllm` with buckets of
4 KB (each decoder layer a bucket of its own), vLLM's log-probs of a completion equal the trainer's (docs/algorithms.md
(6.10)); before the sync they do not. Every script in turn, each with its own engine, syncs into one vLLM engine.

    python tests/sync_check.py MODEL OUT.json                                            # one process
    python -m deepspeed.launcher.runner --num_gpus 2 tests/sync_check.py MODEL OUT.json  # ZeRO-3 on 2 ranks
"""

import importlib
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from conftest import ALGORITHMS, make_args  # tests/ is on every launch's path

ARGV = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
BUCKET_BYTES = 4096  # less than any weight matrix of the tiny model
from vllm import SamplingParams  # noqa: E402


def vllm_vs_trainer(algo, engine, llm, prompt: list, completion: list, device) -> float:
    """Largest |ℓ_vLLM − ℓ_trainer| over the completion's tokens, at temperature 1."""
    out = llm.generate([{"prompt_token_ids": prompt + completion}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ours = [out.prompt_logprobs[len(prompt) + j][t].logprob for j, t in enumerate(completion)]
    with torch.no_grad():
        trainer = algo.completion_logprobs(engine, algo.collate([prompt], [completion], device), 1.0)[0][0]
    return (torch.tensor(ours) - trainer.cpu()).abs().max().item()


def main() -> None:
    model = ARGV[0]
    modules = [importlib.import_module(name) for name in ALGORITHMS]
    device, _, _ = modules[0].init_distributed()
    gathered = deepspeed.zero.GatheredParameters
    buckets = []
    deepspeed.zero.GatheredParameters = lambda params, *a, **k: buckets.append(len(params)) or gathered(params, *a, **k)
    prompt, completion = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]
    llm, results = None, {}
    for k, algo in enumerate(modules):
        algo.SYNC_BUCKET_BYTES = BUCKET_BYTES
        args = make_args(algo, model=model, max_prompt_length=32, max_completion_length=16, num_generations=2,
                         prompts_per_step=dist.get_world_size(), micro_batch_size=2, learning_rate=1e-2, seed=3)
        engine, _ = algo.setup_models(args, algo.deepspeed_config(args, False, 1), torch.float32, 10)
        llm = llm or algo.setup_vllm(args, dist.get_rank(), torch.float32, False)
        # one Adam step that moves every weight: the log-prob of the completion up, down in every other script, so
        # that the weights differ from those the script before synced
        logp, _ = algo.completion_logprobs(engine, algo.collate([prompt], [completion], device), 1.0)
        engine.backward((-1) ** (k + 1) * logp.sum())
        engine.step()
        before = vllm_vs_trainer(algo, engine, llm, prompt, completion, device)
        del buckets[:]
        algo.sync_weights_to_vllm(engine.module, llm)
        after = vllm_vs_trainer(algo, engine, llm, prompt, completion, device)
        results[algo.__name__] = [None] * dist.get_world_size()
        dist.all_gather_object(results[algo.__name__], {"before_sync": before, "after_sync": after,
                                                         "buckets": len(buckets)})
    if dist.get_rank() == 0:
        with open(ARGV[1], "w") as f:
            json.dump(results, f)
    dist.barrier()


if __name__ == "__main__":
    main()
