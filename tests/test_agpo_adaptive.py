"""agpo_adaptive.py: every statistic and controller on hand-made values (docs/algorithms.md §3), the
reduction to GRPO, per-request temperatures, and end-to-end runs (one process; resume; two ranks)."""

import math
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (FAKE_VLLM, ROOT, logprob_model, make_args, read_metrics, run_and_resume, run_script,
                      run_two_ranks, script_args, tiny_args)

import agpo_adaptive as agpo
import grpo

SCRIPT = os.path.join(ROOT, "agpo_adaptive.py")
needs_vllm = pytest.mark.needs_vllm


def test_defaults_follow_the_authors_code():
    a = agpo.Args()
    assert (a.tau_base, a.tau_min, a.tau_max, a.lambda_temp) == (1.0, 0.5, 1.5, 0.15)
    assert (a.w_r, a.w_e, a.w_k, a.u_bar_rate) == (1.0, 1.0, 0.0, 0.1)
    assert (a.eps_base, a.eps_min, a.eps_max) == (0.2, 0.05, 0.4)
    assert (a.alpha_var, a.gamma_stepkl, a.delta_probe_entropy, a.zeta_skew) == (1.0, 0.5, 0.1, 0.0)
    assert (a.entropy_ratio_min, a.entropy_ratio_max, a.entropy_ref_rate, a.drift_rate) == (0.5, 1.5, 0.01, 0.1)
    assert (a.beta, a.num_iterations, a.dispersion, a.loss_type) == (0.03, 4, "std", "grpo")
    assert a.probe and a.adaptive_temperature and a.adaptive_clip and a.controller_update == "step"


# --- statistics (3.2)–(3.4) ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["std", "mad", "iqr"])
def test_equal_rewards_have_no_spread(mode):
    """(3.2): eight rewards of 0.3 have a float32 std of ~3e-8; that noise would start Ū near 0 and send
    the next τ to τ_max. In float64, with spreads below 1e-6 counted as 0, the spread is exactly 0."""
    r = torch.full((1, 8), 0.3)
    assert 0 < r.float().std().item() < 1e-6 or mode != "std"
    assert agpo.dispersion(r, mode).tolist() == [0.0]


def test_dispersions_by_hand():
    r = torch.tensor([[0.0, 1.0, 2.0, 4.0, 7.0]])
    assert agpo.dispersion(r, "std").item() == pytest.approx(torch.tensor([0.0, 1, 2, 4, 7]).std().item())
    assert agpo.dispersion(r, "mad").item() == pytest.approx(1.4826 * 2)  # median 2, |r − 2| = 2 1 0 2 5
    assert agpo.dispersion(r, "iqr").item() == pytest.approx((4 - 1) / 1.349)  # linear quantiles: q25 1, q75 4
    even = torch.tensor([[1.0, 2.0, 3.0, 10.0]])  # lower median 2 (as torch.median); |r − 2| = 1 0 1 8 → 1
    assert agpo.dispersion(even, "mad").item() == pytest.approx(1.4826)
    one = torch.tensor([[5.0, float("nan"), float("nan"), float("nan")]])  # unscorable rewards leave the statistics
    assert agpo.dispersion(one, "std").tolist() == [0.0]


@pytest.mark.parametrize(
    "text, balanced, authors",
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "2"),  # nested braces
        ("first \\boxed{3} then \\boxed{ 4 }", "4", "4"),  # the last box
        ("work\n#### 72", "72", "72"),  # GSM8K style; both strip the key
        ("work\n####  7  2\n", "7 2", "7  2"),  # the authors collapse whitespace only in the whole-text key
        ("work\n#### 12,345,678", "12,345,678", "12,345,678"),  # the text after ####: commas stay
        ("\\boxed{ YES }", "yes", "yes"),
        ("so 1,234 apples", "1234", "1234"),  # thousands commas
        ("the point (1,2)", "2", "12"),  # a comma list is not one number
        ("the answer is 3/4", "3/4", "3/4"),  # a fraction is one number
        ("  The Answer  is\n YES ", "the answer is yes", "the answer is yes"),  # plain text, lower-cased
        ("so .5", ".5", ".5"),  # a leading decimal point is part of the number: not the answer 5
        ("so +.5", ".5", "+.5"),
        ("so +5", "5", "+5"),
        ("\\boxed{} 7", "7", "7"),  # an empty box is no answer
        ("\\boxed{3} so \\boxed{\\frac{1}{", "3", "3"),  # a box cut off by the length limit is no answer
        ("\\boxed{3} \\boxed{ } then 4", "3", ""),  # balanced: the last closed box; authors: [^{}]+ takes " ", stripped
    ],
)
def test_answer_keys(text, balanced, authors):
    assert agpo.answer_key(text, "balanced") == balanced
    assert agpo.answer_key(text, "authors") == authors == authors_extract_vote_key(text)


def authors_extract_vote_key(text: str) -> str:
    """wandugu/paper_agpo 11e5596, src/llamafactory/train/agpo/trainer.py lines 371–384, verbatim."""
    stripped = text.strip()
    boxed = re.findall(r"\\boxed\{([^{}]+)\}", stripped)
    if boxed:
        return boxed[-1].strip().lower()
    if "####" in stripped:
        return stripped.rsplit("####", 1)[-1].strip().lower()
    numbers = re.findall(r"[-+]?\d*\.?\d+(?:/[1-9]\d*)?", stripped.replace(",", ""))
    if numbers:
        return numbers[-1].strip().lower()
    return re.sub(r"\s+", " ", stripped).lower()


def test_authors_keys_are_their_function():
    """(3.3): --vote-key authors strips every key as their _extract_vote_key does: "#### 12,345,678" and
    "####12,345,678" vote alike (unstripped, this group's four keys differed: E = ln 4, not 0)."""
    group = ["so\n#### 12,345,678", "so\n####12,345,678", "#### 12,345,678 \n", "\\boxed{ 12,345,678 }"]
    assert agpo.vote_entropy([agpo.answer_key(t, "authors") for t in group]) == 0.0
    assert {agpo.answer_key(t, "authors") for t in ("#### Yes", "####yes ", "\\boxed{ YES }")} == {"yes"}
    for text in group + ["\\boxed{ } #### 5", " #### \n", "\t1,2 and 3\n", " A\n\tB ", "", "\n"]:
        assert agpo.answer_key(text, "authors") == authors_extract_vote_key(text)


@pytest.mark.parametrize("mode", ["balanced", "authors"])
def test_empty_boxes_disagree_and_decimals_do_not_collide(mode):
    """(3.3): "\\boxed{} 7" and "\\boxed{} 8" are two answers (E = ln 2), and ".5" is not "5"."""
    keys = [agpo.answer_key(t, mode) for t in ("\\boxed{} 7", "\\boxed{} 8")]
    assert agpo.vote_entropy(keys) == pytest.approx(math.log(2))
    assert len({agpo.answer_key(t, mode) for t in ("so .5", "so 5", "so 0.5")}) == 3


def test_vote_entropy_extremes_and_a_value():
    assert agpo.vote_entropy(["7"] * 8) == 0.0
    assert agpo.vote_entropy([str(i) for i in range(8)]) == pytest.approx(math.log(8))
    assert agpo.vote_entropy(["a", "a", "a", "b"]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_skewness_value_floor_and_clamp():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0])
    n, z = 4, (r - r.mean()) / r.std()
    assert agpo.skewness(r) == pytest.approx(math.sqrt(n * (n - 1)) / (n - 2) * (z**3).mean().item())
    assert agpo.skewness(torch.tensor([0.0, 0.0, 0.0, -1.0])) == pytest.approx(-agpo.skewness(r))
    # the authors' κ: G1's factor on m3/s³, Bessel s: G1·(7/8)^1.5 = 7·sqrt(7)/8 = 2.315, where G1 = sqrt(8) = 2.828
    assert agpo.skewness(torch.tensor([1.0] + [0.0] * 7)) == pytest.approx(7 * math.sqrt(7) / 8)
    assert agpo.skewness(torch.full((8,), 0.3)) == 0.0  # s < 1e-6
    assert agpo.skewness(torch.tensor([0.0, 1.0])) == 0.0  # n ≤ 2
    assert agpo.skewness(torch.tensor([0.0] * 199 + [1.0])) == 10.0  # clamped


# --- controllers (3.7), (3.8), (3.11) ----------------------------------------------------------


def test_clip_epsilon_on_the_authors_worked_example():
    """ε = 0.2·1.5·(1 + 0.1·0.7)/(1 + 0.4 + 0.5·0.2 + 0.2·0.3), the entropy-ratio bound set to 2."""
    args = agpo.Args(zeta_skew=0.2, entropy_ratio_max=2.0)
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    eps, h_ref = agpo.clip_epsilons(one(3.0), one(0.7), one(0.4), one(-0.3), 2.0, 0.2, args)
    assert eps.item() == pytest.approx(0.2 * 1.5 * (1 + 0.1 * 0.7) / (1 + 0.4 + 0.5 * 0.2 + 0.2 * 0.3))
    assert h_ref == 2.0  # --controller-update step: the caller moves H_ref once per step
    low, _ = agpo.clip_epsilons(one(3.0), one(0.0), one(50.0), one(0.0), 2.0, 0.0, args)
    high, _ = agpo.clip_epsilons(one(30.0), one(9.0), one(0.0), one(0.0), 2.0, 0.0, args)
    assert (low.item(), high.item()) == (args.eps_min, args.eps_max)
    first, _ = agpo.clip_epsilons(one(3.0), one(0.0), one(0.0), one(0.0), 0.0, 0.0, args)  # H_ref uninitialised
    assert first.item() == args.eps_base  # the entropy ratio is 1, in float64 (a float32 1 gave 0.20000000298)


def test_temperature_goes_up_with_uncertainty_and_starts_at_tau_base():
    args = agpo.Args()
    U = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    tau, c, _ = agpo.temperatures(U, 1.0, args)
    assert tau[0] < tau[1] < tau[2] and tau[1].item() == pytest.approx(args.tau_base)
    assert tau[2].item() == pytest.approx(1.0 * (1 + 0.15 * 0.5), rel=1e-6)
    tau, c, _ = agpo.temperatures(U, 0.0, args)  # the first step: Ū uninitialised, c = 0
    assert c.tolist() == [0.0] * 3 and tau.tolist() == [args.tau_base] * 3
    tau, _, _ = agpo.temperatures(torch.tensor([100.0, 0.0], dtype=torch.float64), 1.0, args)
    assert tau.tolist() == pytest.approx([args.tau_max, args.tau_base * (1 - 0.15)])


def test_permuting_the_prompts_permutes_tau_and_eps_and_changes_nothing_else():
    args = agpo.Args()
    g = torch.Generator().manual_seed(0)
    U, H, E, sigma, kappa = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(5))
    perm = torch.randperm(6, generator=g)
    tau, _, u_bar = agpo.temperatures(U, 0.8, args)
    tau_p, _, u_bar_p = agpo.temperatures(U[perm], 0.8, args)
    eps, h_ref = agpo.clip_epsilons(H, E, sigma, kappa, 0.5, 0.1, args)
    eps_p, h_ref_p = agpo.clip_epsilons(H[perm], E[perm], sigma[perm], kappa[perm], 0.5, 0.1, args)
    assert torch.equal(tau[perm], tau_p) and torch.equal(eps[perm], eps_p)
    assert (u_bar, h_ref) == (u_bar_p, h_ref_p) == (0.8, 0.5)  # the state moves once, from the batch mean
    # the authors' update after each micro-batch (here of one prompt) depends on the order
    authors = agpo.Args(controller_update="microbatch", micro_batch_size=8, num_generations=8)
    assert not torch.allclose(agpo.temperatures(U, 0.8, authors)[0][perm], agpo.temperatures(U[perm], 0.8, authors)[0])


def test_the_authors_update_moves_the_state_after_each_micro_batch_by_its_mean():
    """(3.11) --controller-update microbatch: G 2, micro-batches of 4 completions = runs of 2 prompts; each run
    reads the state as the previous run left it, which then moves once by the run's mean."""
    args = agpo.Args(controller_update="microbatch", num_generations=2, micro_batch_size=4)
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert agpo.controller_runs(5, args) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    tau, c, u_bar = agpo.temperatures(f64(1.0, 2.0, 3.0, 5.0), 0.0, args)
    assert c[:2].tolist() == [0.0, 0.0]  # Ū uninitialised in the first run, then set to its mean 1.5
    assert c[2:].tolist() == pytest.approx([(3 - 1.5) / 1.5, (5 - 1.5) / 1.5])
    assert u_bar == pytest.approx(0.1 * 4.0 + 0.9 * 1.5)
    assert tau[3].item() == pytest.approx(min(1.5, 1 + 0.15 * 3.5 / 1.5))
    zeros = f64(0.0, 0.0, 0.0, 0.0)
    eps, h_ref = agpo.clip_epsilons(f64(2.0, 4.0, 6.0, 6.0), zeros, zeros, zeros, 0.0, 0.0, args)
    assert eps[:2].tolist() == [0.2, 0.2]  # ratio 1 while H_ref is uninitialised; then H_ref = 3
    assert eps[2:].tolist() == pytest.approx([0.2 * 1.5, 0.2 * 1.5])  # 6 / 3 = 2, clipped to 1.5
    assert h_ref == pytest.approx(0.01 * 6.0 + 0.99 * 3.0)
    controller = {"u_bar": 0.0, "h_ref": 0.0, "drift_bar": 0.0}
    agpo.move_controllers(controller, None, None, f64(0.1, 0.3, 0.5, 0.5), u_bar, h_ref, args, "cpu")
    assert controller["drift_bar"] == pytest.approx(0.9 * (0.1 * 0.2) + 0.1 * 0.5)  # D̄ once per run, in order
    assert (controller["u_bar"], controller["h_ref"]) == (u_bar, h_ref)


def test_ema_initialises_from_the_first_value():
    assert agpo.ema(0.0, 2.0, 0.1) == 2.0  # uninitialised (≤ 1e-8): takes the value
    assert agpo.ema(1.0, 2.0, 0.1) == pytest.approx(1.1)
    assert agpo.ema(0.0, 2.0, 0.1, initialise=False) == pytest.approx(0.2)  # D̄ starts at 0 (3.6)


def test_advantage_divides_by_the_dispersion_with_a_floor():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = agpo.adaptive_advantages(r, 4, "std")
    std = torch.tensor([1.0, 0, 0, 1]).double().std()
    assert torch.allclose(a[:4], (r[:4] - 0.5) / std) and a[4:].tolist() == [0.0] * 4
    assert agpo.adaptive_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 4, "std")[1] == 0


def test_robust_dispersions_fall_back_to_the_std_in_the_advantage_only():
    """(3.2), (3.9): with 0/1 rewards the MAD is 0 whenever half the group agrees; dividing by 1e-8 gave ±5e7.
    As in the authors' code, the advantage's divisor falls back to the std and the probes' σ_p does not."""
    assert agpo.adaptive_advantages(torch.tensor([0.0, 1.0]), 2, "mad").tolist() == pytest.approx([-0.5**0.5, 0.5**0.5])
    r = torch.tensor([0.0] + [1.0] * 7)
    assert agpo.adaptive_advantages(r, 8, "iqr")[0].item() == pytest.approx(-0.875 / r.double().std().item())
    for mode, r in (("mad", [0.0] * 5 + [1.0] * 3), ("iqr", [0.0] * 7 + [1.0])):  # lower median 0; q25 = q75 = 0
        r = torch.tensor(r, dtype=torch.float64)
        assert agpo.dispersion(r.view(1, 8), mode).tolist() == [0.0] and r.std() > 0.3  # σ_p: no fallback
        assert agpo.dispersion(r.view(1, 8), mode, fallback_to_std=True).item() == pytest.approx(r.std().item())
        assert agpo.adaptive_advantages(r, 8, mode).tolist() == pytest.approx(((r - r.mean()) / r.std()).tolist())
    # every 0/1 group of 8: finite, moderate advantages (the largest, 4.05: iqr of two 1s among eight, 0.25/1.349)
    for bits in range(256):
        group = torch.tensor([(bits >> i) & 1 for i in range(8)], dtype=torch.float64)
        for mode in ("mad", "iqr"):
            assert agpo.adaptive_advantages(group, 8, mode).abs().max().item() < 4.1


def test_the_1e6_rule_is_for_the_statistics_not_the_advantage():
    """(3.2), (3.9): a spread below 1e-6 is 0 for σ_p (float noise must not start Ū), but the advantage's
    divisor is max(d, 1e-8): [0, 5e-7] gave ±25 while [0, 2e-6] gave ±0.707."""
    for r in ([0.0, 5e-7], [0.0, 2e-6]):
        a = agpo.adaptive_advantages(torch.tensor(r, dtype=torch.float64), 2, "std")
        assert a.tolist() == pytest.approx([-0.5**0.5, 0.5**0.5])
    assert agpo.dispersion(torch.tensor([[0.0, 5e-7]], dtype=torch.float64), "std").tolist() == [0.0]


def test_a_group_without_tokens_has_zero_entropy_and_drift_not_nan():
    """(3.5): a prompt whose G completions are all empty gave 0/0 = NaN, and a NaN drift poisons D̄."""
    values = torch.arange(12, dtype=torch.float32).view(4, 3)  # [n, T], G = 2: two groups
    mask = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    means = agpo.group_token_mean(values, mask, 2)
    assert means.dtype == torch.float64 and means.tolist() == [0.0, pytest.approx((6 + 7 + 9) / 3)]


# --- the whole objective reduces to GRPO --------------------------------------------------------


def test_controllers_off_reduce_to_grpo(tiny_model, world_of_one):
    """No probe, no controllers, β 0: the loss and gradient equal grpo.py's --loss-type grpo on the same
    batch, up to the advantage's floor (max(d, 1e-8) here, d + 1e-4 in GRPO: 1e-4 relative at d ≈ 1)."""
    from test_shared import PlainEngine

    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    lengths = [3, 5, 2, 6, 4, 1, 5, 3]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (4,), generator=g).tolist() for _ in range(8)]
    completions = [torch.randint(5, 200, (L,), generator=g).tolist() for L in lengths]
    grads, losses = {}, {}
    for algo in (grpo, agpo):
        args = make_args(algo, micro_batch_size=4, num_iterations=1, beta=0.0, loss_type="grpo",
                         probe=False, adaptive_temperature=False, adaptive_clip=False)
        adv = (agpo.adaptive_advantages(rewards, 4, "std") if algo is agpo else grpo.group_advantages(rewards, 4))
        rollout = algo.Rollout(prompt_ids=prompts, completion_ids=completions, advantages=adv.float(),
                               loss_mask=algo.completion_mask(lengths), sampler_logp=torch.zeros(8, max(lengths)))
        if algo is agpo:
            rollout.epsilon = torch.full((8,), args.eps_base)
        model = logprob_model(algo, tiny_model)
        engine = PlainEngine(model)
        engine.step = lambda: engine.grad_norms.append(0.0)  # keeps the gradient of the whole optimizer step
        metrics = algo.Metrics()
        plan = algo.update_plan(rollout, args, torch.Generator(), "cpu")
        algo.rollout_logprobs(engine, None, rollout, [ix for mini, *_ in plan[0] for ix in mini], args, "cpu")
        algo.update_policy(engine, rollout, plan, args, metrics, "cpu")
        grads[algo] = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses[algo] = metrics["policy_loss"][0]
    assert grads[grpo].abs().max() > 1e-3
    assert (grads[agpo] - grads[grpo]).norm() <= 1e-3 * grads[grpo].norm()
    assert losses[agpo] == pytest.approx(losses[grpo], rel=1e-3, abs=1e-6)  # ≈ 0 at ρ = 1: A has mean 0


# --- generation: one temperature per prompt, in one engine call ---------------------------------


def test_each_training_request_reaches_vllm_with_its_own_temperature(world_of_one):
    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=False):
            self.prompts, self.params = prompts, params
            out = SimpleNamespace(token_ids=[7], finish_reason="stop", logprobs=SimpleNamespace(logprobs=[-1.0]))
            return [type("R", (), {"outputs": [out] * 2})() for _ in prompts]

    class Tokenizer:
        def batch_decode(self, ids, skip_special_tokens):
            return ["7"] * len(ids)

    llm = FakeLLM()
    args = agpo.Args(num_generations=2, reward_funcs=["zero"])
    examples = [{"prompt": "p", "prompt_ids": p, "answer": "7"} for p in ([1, 2], [3], [4, 5, 6])]
    zero = lambda completions, **_: [0.0] * len(completions)  # noqa: E731
    generated, texts, values, _ = agpo.sample_and_score(llm, Tokenizer(), [zero], examples, [0.7, 1.0, 1.3], 5,
                                                        args, [9])
    assert [p.temperature for p in llm.params] == [0.7, 1.0, 1.3] and len(llm.prompts) == 3  # one call
    assert all(p.seed is None for p in llm.params)  # (6.5): the call is seeded, not its requests
    assert all(p.n == 2 and p.stop_token_ids == [9] for p in llm.params)
    assert len(generated) == len(texts) == 6 and values.shape == (1, 6)


# --- state across ranks: 2 ranks move the controllers as 1 rank does ---------------------------


def test_two_ranks_move_the_controllers_as_one_rank(split_runs):
    """tests/split_check.py: three steps of the controllers (3.7), (3.8), (3.11) on 4 prompts, split over 2 ranks."""
    a, b = (run["agpo_adaptive_controllers"] for run in split_runs)
    assert a["controller"] == pytest.approx(b["controller"], rel=1e-12)
    assert torch.allclose(a["tau"], b["tau"]) and torch.allclose(a["eps"], b["eps"])
    assert a["controller"]["u_bar"] > 0 and a["controller"]["h_ref"] > 0 and a["controller"]["drift_bar"] > 0


# --- end to end ------------------------------------------------------------------------------------

TINY = tiny_args(learning_rate="1e-2") + ["--reward-funcs", "toy_rewards:letter_a"]
METRICS = ["agpo/tau_mean", "agpo/tau_min", "agpo/tau_max", "agpo/eps_mean", "agpo/eps_min", "agpo/eps_max",
           "agpo/probe_reward", "agpo/probe_std", "agpo/vote_entropy", "agpo/skew", "agpo/u", "agpo/u_bar", "agpo/h",
           "agpo/h_ref", "agpo/drift", "agpo/drift_ema", "tokens/probe_total", "time/probe", "reward", "kl", "entropy",
           "grad_norm", "tokens/generated_total"]


def check_run(out: str, steps: int, completions: int = 8) -> list:
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        assert all(k in m and math.isfinite(m[k]) for k in METRICS), [k for k in METRICS if k not in m]
        assert 0.5 <= m["agpo/tau_min"] <= m["agpo/tau_mean"] <= m["agpo/tau_max"] <= 1.5
        assert 0.05 <= m["agpo/eps_min"] <= m["agpo/eps_mean"] <= m["agpo/eps_max"] <= 0.4
    # probes count in the budget: the total minus the probes is the training groups' tokens
    training = sum(m["completions/mean_length"] * completions for m in metrics)
    assert metrics[-1]["tokens/generated_total"] - metrics[-1]["tokens/probe_total"] == pytest.approx(training)
    assert metrics[-1]["tokens/probe_total"] > 0
    return metrics


def test_one_process_fake_vllm_and_the_ablations(tiny_model, add_data, tmp_path):
    out = str(tmp_path / "runs")
    run_script([*script_args(SCRIPT, tiny_model, add_data, out), *TINY],
               cwd=str(tmp_path), pythonpath=(FAKE_VLLM,))
    metrics = check_run(out, 2)
    assert metrics[0]["agpo/tau_min"] == metrics[0]["agpo/tau_max"] == 1.0  # c = 0 in the first step
    assert metrics[0]["agpo/drift_ema"] == pytest.approx(0.1 * metrics[0]["agpo/drift"])
    off = str(tmp_path / "off")
    run_script([*script_args(SCRIPT, tiny_model, add_data, off), *TINY,
                "--no-probe", "--no-adaptive-temperature", "--no-adaptive-clip"],
               cwd=str(tmp_path), pythonpath=(FAKE_VLLM,))
    for m in read_metrics(off):
        assert m["agpo/tau_mean"] == 1.0 and m["agpo/eps_mean"] == pytest.approx(0.2) and m["tokens/probe_total"] == 0
        assert "agpo/vote_entropy" not in m and "agpo/drift" not in m


def test_robust_dispersion_without_gradient_clipping_does_not_diverge(tiny_model, add_data, tmp_path):
    """(3.2): ±1 rewards with --dispersion mad: a 2-2 group of 4 has MAD 0, which divided advantages by 1e-8;
    without clipping the gradient norm was ~1e8 times a normal one. With the std fallback it stays normal."""
    out = str(tmp_path / "runs")
    run_script([*script_args(SCRIPT, tiny_model, add_data, out), *TINY[:-2],
                "--reward-funcs", "toy_rewards:has_a_pm1", "--dispersion", "mad", "--max-grad-norm", "0"],
               cwd=str(tmp_path), pythonpath=(FAKE_VLLM,))
    norms = [m["grad_norm"] for m in read_metrics(out) if "grad_norm" in m]
    assert norms and all(math.isfinite(g) and g < 1e3 for g in norms), norms


def test_no_probe_needs_both_controllers_off(monkeypatch, add_data, tiny_model):
    monkeypatch.setattr(sys, "argv", ["agpo_adaptive.py", "--model", tiny_model, "--dataset", add_data, "--no-probe"])
    with pytest.raises(SystemExit) as e:
        agpo.main()
    assert "--no-adaptive-temperature --no-adaptive-clip" in str(e.value.code)


@needs_vllm
def test_one_process_vllm_and_resume(tiny_model, add_data, tmp_path):
    """--resume from checkpoint-1 continues exactly: step 2's τ, ε and every other metric as uninterrupted."""
    common = [*script_args(SCRIPT, tiny_model, add_data), *TINY, "--save-steps", "1"]
    compared = run_and_resume(common, str(tmp_path), check_run)
    assert {"agpo/tau_mean", "agpo/eps_mean", "agpo/u_bar", "agpo/h_ref", "agpo/drift_ema"} <= set(compared)


@needs_vllm
def test_deepspeed_two_ranks_zero3_vllm(tiny_model, add_data, tmp_path):
    out = str(tmp_path / "runs")
    run_two_ranks(SCRIPT, tiny_model, add_data, out, TINY, str(tmp_path))
    check_run(out, 2, completions=16)
