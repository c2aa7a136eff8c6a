"""a_grpo.py (our reconstruction, docs/algorithms.md §4): each formula on hand-made values, the reduction to
GRPO with every mechanism off, 1 rank = 2 ranks for the global advantage and the controllers, and
end-to-end runs (one process; resume; two ranks with ZeRO-3 + vLLM)."""

import math
import os

import pytest
import torch
from conftest import (FAKE_VLLM, ROOT, logprob_model, make_args, read_metrics, run_and_resume, run_script,
                      run_two_ranks, script_args, tiny_args)

import a_grpo
import grpo

SCRIPT = os.path.join(ROOT, "a_grpo.py")
needs_vllm = pytest.mark.needs_vllm


def test_defaults_are_the_readmes_run():
    a = a_grpo.Args()
    settings = (a.model, a.learning_rate, a.lr_schedule, a.warmup_ratio)
    assert settings == ("Qwen/Qwen2.5-0.5B-Instruct", 5e-7, "cosine", 0.03)
    assert (a.num_generations, a.max_prompt_length, a.max_completion_length, a.total_steps) == (8, 256, 1024, 450)
    assert (a.beta, a.num_iterations, a.adv_mix_lambda, a.entropy_coef, a.kl_target) == (0.001, 2, 0.5, 1e-3, 0.01)
    assert a.kl_type == "symmetric" and a.adaptive_beta and a.adaptive_epsilon


def test_symmetric_kl_is_half_jeffreys_and_quadratic_near_zero():
    ref, logp = torch.tensor([-1.0, -2.0, -0.5, -3.0]), torch.tensor([-1.0, -1.0, -2.0, -3.01])
    d = ref - logp
    assert torch.allclose(a_grpo.symmetric_kl(ref, logp), 0.5 * d * (torch.exp(d) - 1))
    assert (a_grpo.symmetric_kl(torch.randn(1000), torch.randn(1000)) >= 0).all()
    small = torch.tensor([1e-3, -1e-3, 2e-2])
    assert torch.allclose(a_grpo.symmetric_kl(small, torch.zeros(3)), small**2 / 2, rtol=2e-2)
    big = a_grpo.symmetric_kl(torch.tensor([50.0]), torch.tensor([0.0]), clamp=10.0)
    assert big.item() == pytest.approx(0.5 * 10 * math.expm1(10))  # Δ clamped to ±10
    # on samples from πθ, E[D_sym] = ½(KL(πθ‖πref) + KL(πref‖πθ)): check on a 3-token distribution
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())
    assert (p * a_grpo.symmetric_kl(q.log(), p.log())).sum().item() == pytest.approx(exact.item())


def test_mixed_advantage():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    mean, std = r.mean().item(), r.std().item()
    a = a_grpo.mixed_advantages(r, 4, 0.5, mean, std)
    expected = 0.5 * grpo.group_advantages(r, 4) + 0.5 * (r - mean) / (std + 1e-4)
    assert torch.allclose(a, expected)
    assert a[4] > 0  # the all-2 group has no group signal, but beats the batch mean
    assert torch.equal(a_grpo.mixed_advantages(r, 4, 1.0, mean, std), grpo.group_advantages(r, 4))  # λ = 1: GRPO
    nan = torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64)
    assert a_grpo.mixed_advantages(nan, 4, 0.5, 0.3, 0.5)[1] == 0


def test_controllers_bounds_and_direction():
    args = a_grpo.Args()
    high = a_grpo.initial_control(args)
    a_grpo.kl_controllers(high, 0.02, args)  # m starts at the first KL̄, above target
    assert high["kl_ema"] == 0.02 and high["beta"] == pytest.approx(0.001 * (1 + 0.05 * 0.2))  # e clipped to +0.2
    assert high["epsilon"] == pytest.approx(0.2 * math.sqrt(0.01 / 0.02))
    low = a_grpo.initial_control(args)
    a_grpo.kl_controllers(low, 0.005, args)
    assert low["beta"] == pytest.approx(0.001 * (1 - 0.05 * 0.2))
    assert low["epsilon"] == pytest.approx(0.2 * math.sqrt(2))
    a_grpo.kl_controllers(low, 0.015, args)
    assert low["kl_ema"] == pytest.approx(0.9 * 0.005 + 0.1 * 0.015)
    extreme = a_grpo.initial_control(args)
    for _ in range(2000):
        a_grpo.kl_controllers(extreme, 10.0, args)
    assert extreme["beta"] == 1.0 and extreme["epsilon"] == 0.1  # bounds
    for _ in range(2000):
        a_grpo.kl_controllers(extreme, 0.0, args)
    assert extreme["beta"] == pytest.approx(1e-4) and extreme["epsilon"] == 0.5
    fixed = a_grpo.Args(adaptive_beta=False, adaptive_epsilon=False)
    state = a_grpo.initial_control(fixed)
    a_grpo.kl_controllers(state, 1.0, fixed)
    assert (state["beta"], state["epsilon"]) == (0.001, 0.2)


def test_every_mechanism_off_is_grpo(tiny_model, world_of_one):
    """--adv-mix-lambda 1 --kl-type k3 --entropy-coef 0 --no-adaptive-beta --no-adaptive-epsilon: the same
    loss and gradient as grpo.py on the same batch (μ = 2, β > 0 with a reference, ratios ≠ 1)."""
    from test_shared import PlainEngine
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    lengths = [3, 5, 2, 6, 4, 1, 5, 3]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (4,), generator=g).tolist() for _ in range(8)]
    completions = [torch.randint(5, 200, (L,), generator=g).tolist() for L in lengths]
    ref_model = logprob_model(grpo, tiny_model)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in ref_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    grads, losses = {}, {}
    for algo in (grpo, a_grpo):
        args = make_args(algo, micro_batch_size=4, num_iterations=2, beta=0.04, adv_mix_lambda=1.0,
                         kl_type="k3", entropy_coef=0.0, adaptive_beta=False, adaptive_epsilon=False)
        adv = grpo.group_advantages(rewards, 4) if algo is grpo else a_grpo.mixed_advantages(rewards, 4, 1.0, 9.9, 9.9)
        rollout = algo.Rollout(prompt_ids=prompts, completion_ids=completions, advantages=adv.float(),
                               loss_mask=algo.completion_mask(lengths), sampler_logp=torch.zeros(8, max(lengths)))
        model = logprob_model(algo, tiny_model)
        engine = PlainEngine(model)
        engine.step = lambda: engine.grad_norms.append(0.0)  # keeps the gradient of the whole step
        metrics = algo.Metrics()
        plan = algo.update_plan(rollout, args, torch.Generator().manual_seed(1), "cpu")
        algo.rollout_logprobs(engine, ref_model, rollout, [ix for mini, *_ in plan[0] for ix in mini], args, "cpu")
        extra = (a_grpo.initial_control(args),) if algo is a_grpo else ()
        algo.update_policy(engine, rollout, plan, args, metrics, "cpu", *extra)
        grads[algo] = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses[algo] = (metrics["policy_loss"], metrics["kl"])
    assert grads[grpo].abs().max() > 1e-3
    assert torch.equal(grads[a_grpo], grads[grpo]) and losses[a_grpo] == losses[grpo]


def test_one_rank_equals_two_ranks_for_advantages_and_controllers(split_runs):
    """tests/split_check.py: the advantages' z-score over every rank (4.1), and β_t, ε_t and the KL average m after
    an optimizer step of a_grpo.py's own update_policy (4.5), (4.6), the same on both ranks as on one."""
    a, b = split_runs
    assert torch.allclose(a["a_grpo_advantages"]["advantages"], b["a_grpo_advantages"]["advantages"], atol=1e-12)
    assert a["a_grpo_advantages"]["mean_std"] == pytest.approx(b["a_grpo_advantages"]["mean_std"], rel=1e-12)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        (one,), two = a["a_grpo"][loss_type]["controls"], b["a_grpo"][loss_type]["controls"]
        assert one["kl_ema"] > 1e-3 and one["beta"] != 0.04  # the controllers moved, from a KL that is not 0
        assert two == [pytest.approx(one, rel=1e-6)] * 2, loss_type


TINY = tiny_args(learning_rate="1e-2") + ["--reward-funcs", "toy_rewards:letter_a"]
METRICS = ["agrpo/beta", "agrpo/eps", "agrpo/kl_ema", "kl", "kl/forward", "kl/reverse", "kl/symmetric", "entropy",
           "clip_ratio/low_mean", "clip_ratio/high_mean", "reward", "grad_norm", "policy_loss",
           "tokens/generated_total"]


def check_run(out: str, steps: int) -> list:
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert all(k in m and math.isfinite(m[k]) for k in METRICS), [k for k in METRICS if k not in m]
        assert m["kl/symmetric"] == pytest.approx((m["kl/forward"] + m["kl/reverse"]) / 2)
        assert 1e-4 <= m["agrpo/beta"] <= 1 and 0.1 <= m["agrpo/eps"] <= 0.5
    assert metrics[-1]["agrpo/beta"] != 0.001  # β moved
    return metrics


def test_one_process_fake_vllm(tiny_model, add_data, tmp_path):
    out = str(tmp_path / "runs")
    run_script([*script_args(SCRIPT, tiny_model, add_data, out), *TINY],
               cwd=str(tmp_path), pythonpath=(FAKE_VLLM,))
    check_run(out, 2)


@needs_vllm
def test_one_process_vllm_and_resume(tiny_model, add_data, tmp_path):
    """--resume from checkpoint-1 continues exactly: β_t, ε_t, m and every metric of step 2."""
    common = [*script_args(SCRIPT, tiny_model, add_data), *TINY, "--save-steps", "1"]
    compared = run_and_resume(common, str(tmp_path), check_run)
    assert {"agrpo/beta", "agrpo/eps", "agrpo/kl_ema"} <= set(compared)


@needs_vllm
def test_deepspeed_two_ranks_zero3_vllm(tiny_model, add_data, tmp_path):
    out = str(tmp_path / "runs")
    run_two_ranks(SCRIPT, tiny_model, add_data, out, TINY, str(tmp_path))
    check_run(out, 2)
