"""Three steps of agpo_adaptive.py's controllers (docs/algorithms.md (3.7), (3.8), (3.11)) on fixed per-prompt
statistics of 4 prompts, saved to a file, so a test can compare 1 rank with 2 ranks holding 2 prompts each.

    python tests/controller_check.py OUT.pt
    python -m deepspeed.launcher.runner --num_gpus 2 tests/controller_check.py OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

P = 4


def main() -> None:
    out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    import agpo_adaptive as algo

    algo.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    args = algo.Args()
    controller = {"u_bar": 0.0, "h_ref": 0.0, "drift_bar": 0.0}
    g = torch.Generator().manual_seed(0)
    mine = slice(rank * P // world, (rank + 1) * P // world)
    taus, epsilons = [], []
    for _ in range(3):
        U, H, E, sigma, kappa, drift = (torch.rand(P, generator=g, dtype=torch.float64) + 0.1 for _ in range(6))
        tau, _, u_bar = algo.temperatures(U[mine], controller["u_bar"], args)
        eps, h_ref = algo.clip_epsilons(H[mine], E[mine], sigma[mine], kappa[mine], controller["h_ref"],
                                        controller["drift_bar"], args)
        algo.move_controllers(controller, U[mine], H[mine], drift[mine], u_bar, h_ref, args, "cpu")
        for values, into in ((tau, taus), (eps, epsilons)):
            parts = [torch.zeros_like(values) for _ in range(world)]
            dist.all_gather(parts, values)
            into.append(torch.cat(parts))
    if rank == 0:
        torch.save({"controller": controller, "tau": torch.stack(taus), "eps": torch.stack(epsilons)}, out)
    dist.barrier()
    dist.destroy_process_group()  # an exit with gloo's threads still alive can abort (SIGABRT)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
