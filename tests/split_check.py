"""One optimizer step of a training script's `update_policy` on a fixed rollout, saved to a file,
so that a test can compare ways of splitting the same step across ranks and micro-batches.

    python tests/split_check.py grpo MODEL OUT.pt MICRO_BATCH_SIZE
    python -m deepspeed.launcher.runner --num_gpus 2 tests/split_check.py grpo MODEL OUT.pt MICRO_BATCH_SIZE [leaf]

The 8 completions (2 groups of 4, lengths 1..8, the second group out of the loss) are the same in
every launch; rank r trains on its contiguous share. SGD with lr 1 and no clipping makes the weight change equal to the
gradient, so any error in how the loss is normalised across micro-batches or ranks shows
(Adam would hide a constant factor). With `leaf`, the engine is built as the scripts build it on a GPU: decoder
layers as ZeRO-3 leaf modules, gradient checkpointing, DeepSpeed's memory-efficient Linear off.
"""

import importlib
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from conftest import make_args, make_rollout, update_policy  # tests/ is on every launch's path (run_script)

N, G = 8, 4


def fixed_rollout(algo):
    """2 groups of 4 completions (lengths 1..8); the second group is out of the loss (a masked group),
    which every script's update must handle (AGPO masks groups; GRPO's code path is the same)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (3 + i % 3,), generator=g).tolist() for i in range(N)]
    completions = [torch.randint(5, 200, (i + 1,), generator=g).tolist() for i in range(N)]
    keep = torch.tensor([1.0] * G + [0.0] * G)
    loss_mask = algo.completion_mask([len(c) for c in completions]) * keep.unsqueeze(1)
    return dict(
        prompt_ids=prompts, completion_ids=completions, advantages=torch.randn(N, generator=g), loss_mask=loss_mask
    )


def main() -> None:
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    module_name, model_dir, out, micro = positional[0], positional[1], positional[2], int(positional[3])
    leaf = positional[4:] == ["leaf"]
    algo = importlib.import_module(module_name)
    algo.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        args = make_args(algo, micro_batch_size=micro, loss_type=loss_type, beta=0.0, max_completion_length=8,
                         num_iterations=1, num_mini_batches=1)
        full = fixed_rollout(algo)
        share = N // world
        mine = slice(rank * share, (rank + 1) * share)
        rollout = make_rollout(algo, **{k: v[mine] for k, v in full.items()})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if leaf:  # the scripts' model: each decoder layer a ZeRO-3 leaf module
            model = algo.load_model(make_args(algo, model=model_dir, zero_stage=3), torch.float32)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers checkpoints only in training mode
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": share // micro,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "memory_efficient_linear": not leaf},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
        )
        plan = algo.update_plan(share, args, torch.Generator())
        update_policy(algo, engine, rollout, plan, args, algo.Metrics(), torch.device("cpu"))
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            results[loss_type] = {n: p.detach().clone() for n, p in params}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()  # an exit with gloo's threads still alive can abort (SIGABRT)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
