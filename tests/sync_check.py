"""The weight sync reaches vLLM: after an optimizer step and `sync_weights_to_vllm`, vLLM's log-probs of a
completion equal the trainer's (docs/algorithms.md (6.10)); before the sync they do not.

    python tests/sync_check.py SCRIPT MODEL OUT.json                                            # one process
    python -m deepspeed.launcher.runner --num_gpus 2 tests/sync_check.py SCRIPT MODEL OUT.json  # ZeRO-3 on 2 ranks
"""

import importlib
import json
import sys

import torch
import torch.distributed as dist

ARGV = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
algo = importlib.import_module(ARGV[0])
from vllm import SamplingParams  # noqa: E402


def vllm_vs_trainer(engine, llm, prompt: list, completion: list, device) -> float:
    """Largest |ℓ_vLLM − ℓ_trainer| over the completion's tokens, at temperature 1."""
    out = llm.generate([{"prompt_token_ids": prompt + completion}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    ours = [out.prompt_logprobs[len(prompt) + j][t].logprob for j, t in enumerate(completion)]
    with torch.no_grad():
        trainer = algo.completion_logprobs(engine, algo.collate([prompt], [completion], device), 1.0)[0][0]
    return (torch.tensor(ours) - trainer.cpu()).abs().max().item()


def main() -> None:
    model, out_path = ARGV[1], ARGV[2]
    device, _, _ = algo.init_distributed()
    args = algo.Args(model=model, max_prompt_length=32, max_completion_length=16, num_generations=2,
                     prompts_per_step=dist.get_world_size(), micro_batch_size=2, learning_rate=1e-2, seed=3)
    engine, _ = algo.setup_models(args, algo.deepspeed_config(args, False, 1), torch.float32, 10)
    llm = algo.setup_vllm(args, dist.get_rank(), torch.float32, False)
    prompt, completion = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]
    # one Adam step that moves every weight: raise the log-prob of the completion
    logp, _ = algo.completion_logprobs(engine, algo.collate([prompt], [completion], device), 1.0)
    engine.backward(-logp.sum())
    engine.step()
    before = vllm_vs_trainer(engine, llm, prompt, completion, device)
    algo.sync_weights_to_vllm(engine.module, llm)
    after = vllm_vs_trainer(engine, llm, prompt, completion, device)
    result = [None] * dist.get_world_size()
    dist.all_gather_object(result, {"before_sync": before, "after_sync": after})
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
