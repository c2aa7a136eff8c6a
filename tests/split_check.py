"""What every training script reduces over ranks, on fixed data, saved to a file, so that a test can compare one rank
with two: one optimizer step of each script's `update_policy` on a fixed rollout, a_grpo.py's advantages (4.1) and
three steps of agpo_adaptive.py's controllers (3.7), (3.8), (3.11), and how often ZeRO-3 gathers the output layer's
weight for one log-prob forward and backward (6.3). One launch checks every script.

    python tests/split_check.py MODEL OUT.pt                                                 # 1 rank, 4 micro-batches
    python -m deepspeed.launcher.runner --num_gpus 2 tests/split_check.py MODEL OUT.pt leaf  # 2 ranks, 2 each

The 8 completions (2 groups of 4, lengths 1..8, the second group out of the loss) are the same in every launch; rank r
trains on its contiguous share, in micro-batches of 2. SGD with lr 1 and no clipping makes the weight change equal to
the gradient, so any error in how the loss is normalised across micro-batches or ranks shows (Adam would hide a
constant factor). β = 0.04 against fixed reference log-probs: the KL term is normalised as the loss is, and a_grpo.py's
β and ε controllers move from the KL of every rank, on every rank. With `leaf`, the engine is built as the scripts build
it on a GPU: decoder layers as ZeRO-3 leaf modules, gradient checkpointing, DeepSpeed's memory-efficient Linear off.
"""

import importlib
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from conftest import ALGORITHMS, make_args, make_rollout  # tests/ is on every launch's path

N, G, MICRO = 8, 4, 2


def fixed_rollout(algo):
    """2 groups of 4 completions (lengths 1..8); the second group is out of the loss (a masked group),
    which every script's update must handle (AGPO masks groups; GRPO's code path is the same)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (3 + i % 3,), generator=g).tolist() for i in range(N)]
    completions = [torch.randint(5, 200, (i + 1,), generator=g).tolist() for i in range(N)]
    keep = torch.tensor([1.0] * G + [0.0] * G)
    lengths = algo.completion_mask([len(c) for c in completions])  # [N, T]
    loss_mask = lengths * keep.unsqueeze(1)
    ref_logp = -3 * torch.rand(lengths.shape, generator=g) * lengths  # [N, T], 0 on padding
    return dict(prompt_ids=prompts, completion_ids=completions, advantages=torch.randn(N, generator=g),
                loss_mask=loss_mask, ref_logp=ref_logp)


def one_step(algo, model_dir: str, leaf: bool, mine: slice) -> dict:
    """Per loss type: the weights after one SGD step of the script's update_policy on this rank's share, and the
    controllers' state on every rank where the script has controllers."""
    results = {}
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        args = make_args(algo, micro_batch_size=MICRO, loss_type=loss_type, beta=0.04, max_completion_length=8,
                         num_iterations=1, num_mini_batches=1)
        full = fixed_rollout(algo)
        ref_logp = full.pop("ref_logp")
        rollout = make_rollout(algo, **{k: v[mine] for k, v in full.items()})
        rollout.ref_logp = ref_logp[mine]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if leaf:  # the scripts' model: each decoder layer a ZeRO-3 leaf module
            model = algo.load_model(make_args(algo, model=model_dir, zero_stage=3), torch.float32)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers checkpoints only in training mode
        share = len(rollout.completion_ids)
        config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": share // MICRO,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "memory_efficient_linear": not leaf},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
        )
        control = algo.initial_control(args) if hasattr(algo, "initial_control") else None
        plan = algo.update_plan(rollout, args, torch.Generator(), "cpu")
        extra = (control,) if control is not None else ()
        algo.use_logprob_forward(engine.module)
        algo.update_policy(engine, rollout, plan, args, algo.Metrics(), torch.device("cpu"), *extra)
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            weights = {n: p.detach().clone() for n, p in params}
        controls = [None] * dist.get_world_size()
        dist.all_gather_object(controls, control)
        results[loss_type] = {"weights": weights, "controls": controls}
    return results


def a_grpo_advantages(mine: slice) -> dict:
    """a_grpo.py's advantages: the z-score over every rank's completions (4.1), on 4 prompts × 4 rewards."""
    import a_grpo

    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (16,), generator=g).double()
    rewards[5] = float("nan")  # an unscorable completion
    args = a_grpo.Args()
    mean, std = a_grpo.global_reward_stats(rewards[mine], "cpu")
    adv = a_grpo.mixed_advantages(rewards[mine], G, args.adv_mix_lambda, mean, std)
    return {"advantages": gather(adv), "mean_std": (mean, std)}


def agpo_adaptive_controllers(rank: int, world: int) -> dict:
    """Three steps of agpo_adaptive.py's controllers on fixed per-prompt statistics of 4 prompts."""
    import agpo_adaptive as algo

    P = 4
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
        taus.append(gather(tau))
        epsilons.append(gather(eps))
    return {"controller": controller, "tau": torch.stack(taus), "eps": torch.stack(epsilons)}


def output_layer_gathers(model_dir: str) -> dict:
    """(tied, chunk) → how many all-gathers of ZeRO-3 fetch the output layer's weight in one log-prob forward and in its
    backward, for a completion of 8 tokens in 1 chunk and in 4 (every parameter partitioned, however small)."""
    import grpo

    counts, default = {}, grpo.LOGPROB_CHUNK
    for tied in (True, False):
        for chunk in (10**9, 2):
            grpo.LOGPROB_CHUNK = chunk
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tie_word_embeddings=tied)
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                              config=config)
            grpo.use_logprob_forward(engine.module)
            weight, fetched = engine.module.get_output_embeddings().weight, []
            for p in engine.module.parameters():  # ZeRO-3 fetches a group of parameters with its first one's method
                p.all_gather_coalesced = (lambda gather: lambda group, **kw: fetched.append(
                    any(q is weight for q in group)) or gather(group, **kw))(p.all_gather_coalesced)
            batch = grpo.collate([[5, 6, 7], [8, 9]], [list(range(10, 18)), list(range(20, 27))], "cpu")
            logp, _ = grpo.completion_logprobs(engine, batch, 1.0)
            forward = sum(fetched)
            engine.backward(logp.sum())
            counts[tied, chunk] = (forward, sum(fetched) - forward)
    grpo.LOGPROB_CHUNK = default
    return counts


def gather(values: torch.Tensor) -> torch.Tensor:
    """Every rank's `values`, concatenated in rank order."""
    parts = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.cat(parts)


def main() -> None:
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
    model_dir, out, leaf = positional[0], positional[1], positional[2:] == ["leaf"]
    modules = {name: importlib.import_module(name) for name in ALGORITHMS}
    modules["grpo"].init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    results = {name: one_step(algo, model_dir, leaf, mine) for name, algo in modules.items()}
    results["a_grpo_advantages"] = a_grpo_advantages(slice(rank * 16 // world, (rank + 1) * 16 // world))
    results["agpo_adaptive_controllers"] = agpo_adaptive_controllers(rank, world)
    results["output_layer_gathers"] = output_layer_gathers(model_dir)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()  # an exit with gloo's threads still alive can abort (SIGABRT)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
