"""a_grpo.py's advantages (the global z-score over every rank's completions, docs/algorithms.md (4.1)) and
five optimizer steps of its β and ε controllers (4.5), (4.6) from per-rank KL sums, on fixed data of 4
prompts × 4 completions, saved to a file, so a test can compare 1 rank with 2 ranks holding half each.

    python tests/a_grpo_check.py OUT.pt
    python -m deepspeed.launcher.runner --num_gpus 2 tests/a_grpo_check.py OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

N, G = 16, 4


def main() -> None:
    out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    import a_grpo as algo

    algo.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (N,), generator=g).double()
    rewards[5] = float("nan")  # an unscorable completion
    mine = slice(rank * N // world, (rank + 1) * N // world)
    args = algo.Args()
    mean, std = algo.global_reward_stats(rewards[mine], "cpu")
    adv = algo.mixed_advantages(rewards[mine], G, args.adv_mix_lambda, mean, std)
    parts = [torch.zeros_like(adv) for _ in range(world)]
    dist.all_gather(parts, adv)
    control, history = algo.initial_control(args), []
    for _ in range(5):  # per-token KL values of one optimizer step, split over the ranks as the tokens are
        kl = torch.rand(N, generator=g, dtype=torch.float64) * 0.05
        step_kl = torch.tensor([kl[mine].sum().item(), float(kl[mine].numel())], dtype=torch.float64)
        dist.all_reduce(step_kl)
        algo.kl_controllers(control, (step_kl[0] / step_kl[1]).item(), args)
        history.append(dict(control))
    if rank == 0:
        torch.save({"advantages": torch.cat(parts), "controls": history, "mean_std": (mean, std)}, out)
    dist.barrier()
    dist.destroy_process_group()  # an exit with gloo's threads still alive can abort (SIGABRT)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
