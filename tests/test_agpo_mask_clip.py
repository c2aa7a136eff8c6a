"""agpo_mask_clip.py: the length bonus, the loss mask and the loss on hand-made groups
(docs/algorithms.md §2), and end-to-end runs (one process; two ranks with ZeRO-3 + vLLM)."""

import os

import pytest
import torch
from conftest import FAKE_VLLM, ROOT, read_metrics, run_and_resume, run_script, run_two_ranks, script_args, tiny_args

import agpo_mask_clip as agpo

SCRIPT = os.path.join(ROOT, "agpo_mask_clip.py")
G = 4


def test_defaults_follow_the_authors():
    a = agpo.Args()
    assert (a.beta, a.epsilon, a.epsilon_high, a.length_bonus) == (0.0, 0.2, 0.28, 0.1)
    assert (a.lr_schedule, agpo.MIN_LR_RATIO, a.warmup_ratio, a.learning_rate) == ("cosine", 0.1, 0.0, 1e-6)
    assert (a.num_generations, a.max_prompt_length, a.max_completion_length) == (8, 512, 3584)
    assert a.reward_funcs == ["correctness"] and a.loss_type == "dapo" and a.zero_variance == "mask"


def test_loss_mask_keeps_only_mixed_groups():
    correct = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    r = torch.where(correct, 1.0, -1.0).double()
    adv, keep = agpo.agpo_advantages(r, correct, G, "mask")
    assert keep.tolist() == [True] * 4 + [False] * 8
    std = torch.tensor([1.0, -1, -1, 1]).std()
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1, -1, 1], dtype=torch.float64) / (std + 1e-4))


def test_zero_variance_sign_is_the_papers_v1():
    correct = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    r = torch.where(correct, 1.0, -1.0).double()
    adv, keep = agpo.agpo_advantages(r, correct, G, "sign")
    assert keep.all()
    assert adv[4:8].tolist() == [1.0] * 4 and adv[8:].tolist() == [-1.0] * 4


def test_unscorable_groups_are_never_kept():
    r = torch.tensor([float("nan")] * 4 + [1.0, -1, -1, -1], dtype=torch.float64)
    correct = torch.tensor([False] * 4 + [True, False, False, False])
    for mode in ("mask", "sign"):
        adv, keep = agpo.agpo_advantages(r, correct, G, mode)
        assert not keep[:4].any() and (adv[:4] == 0).all() and keep[4:].all()


def test_length_bonus_goes_before_the_advantage():
    """A shorter correct completion gets the bigger bonus, so the bigger advantage."""
    correct = [True, True, False, False]
    lengths = [10, 30, 20, 20]
    bonus = agpo.agpo_length_bonus(torch.tensor(correct), lengths, G, 0.1)
    assert bonus[0] == pytest.approx(0.1) and bonus[1] == pytest.approx(0.0, abs=1e-6) and bonus[2:].tolist() == [0, 0]
    r = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64) + bonus
    adv, _ = agpo.agpo_advantages(r, torch.tensor(correct), G)
    assert adv[0] > adv[1] > 0 > adv[2]
    assert agpo.agpo_length_bonus(torch.tensor(correct), lengths, G, 0.0).tolist() == [0.0] * 4  # 0 disables it


def test_length_bonus_only_for_correct_completions_of_mixed_groups():
    correct = torch.tensor([True, True, False, False, True, True, True, True])
    lengths = [10, 20, 5, 5, 10, 20, 30, 40]
    b = agpo.agpo_length_bonus(correct, lengths, 4, 0.1)
    assert b[0] == pytest.approx(0.1) and b[1] == pytest.approx(0.1 * 1e-6 / (10 + 1e-6))
    assert b[2:].tolist() == [0.0] * 6  # wrong completions, and the all-correct group


def test_masked_groups_leave_numerator_and_denominator():
    """Loss = −Σ_kept S / Σ_kept |o|: equal to the loss of the kept completions alone."""
    torch.manual_seed(0)
    lengths = torch.tensor([3, 5, 2, 4, 6, 1, 2, 3])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    keep = torch.tensor([True] * 4 + [False] * 4)
    logp = torch.randn(8, 6, requires_grad=True)
    adv = torch.randn(8)

    def loss_of(rows, mask_rows):
        tok, *_ = agpo.grpo_token_loss(logp[rows], logp[rows].detach(), adv[rows], mask_rows, 0.2, 0.28)
        n_tok = int(mask_rows.sum())
        return (tok * agpo.token_weights(mask_rows, "dapo", int(mask_rows.any(1).sum()), n_tok, 6)).sum()

    masked = mask * keep.unsqueeze(-1)
    full = loss_of(list(range(8)), masked)
    kept_only = loss_of(list(range(4)), mask[:4])
    assert torch.allclose(full, kept_only)
    hand = -(adv[:4, None] * mask[:4]).sum() / lengths[:4].sum()  # ρ = 1: S = A per token
    assert torch.allclose(full, hand)
    full.backward()
    assert logp.grad[4:].abs().sum() == 0 and logp.grad[:4].abs().sum() > 0


def test_clip_higher_is_asymmetric():
    logp = torch.log(torch.tensor([[1.25, 1.35, 0.75]]))
    loss, _, low, high = agpo.grpo_token_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), 0.2, 0.28)
    assert torch.allclose(loss, -torch.tensor([[1.25, 1.28, 0.75]]))
    assert high.tolist() == [[False, True, False]]


ARGS = tiny_args(learning_rate="1e-2")


def test_one_process_every_group_masked_is_not_an_error(tiny_model, add_data, tmp_path):
    """The default ±1 correctness: a random tiny model solves nothing, every group is all-wrong,
    so every group is masked: no update, a warning, and the step is still logged."""
    out = str(tmp_path / "runs")
    proc = run_script(
        [*script_args(SCRIPT, tiny_model, add_data, out), *ARGS],
        cwd=str(tmp_path), pythonpath=(FAKE_VLLM,),
    )
    assert "every group is masked" in proc.stdout + proc.stderr
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["agpo/masked_group_frac"] == 1.0 and m["agpo/kept_tokens"] == 0 for m in metrics)
    assert all(m["reward"] == -1.0 for m in metrics)
    # the reward function's own metric is its own output (0 = wrong), not AGPO's ±1 (2.1)
    assert all(m["rewards/correctness/mean"] == 0.0 for m in metrics)
    assert "grad_norm" not in metrics[0] and "policy_loss" not in metrics[0]


def test_one_process_refill(tiny_model, add_data, tmp_path):
    """--refill generates extra rounds until the kept groups fill the batch; the counts add up."""
    out = str(tmp_path / "runs")
    run_script(
        [*script_args(SCRIPT, tiny_model, add_data, out), *ARGS, "--reward-funcs",
         "toy_rewards:has_a_pm1", "--refill", "--max-refill-rounds", "3"],
        cwd=str(tmp_path), pythonpath=(FAKE_VLLM,),
    )
    metrics = read_metrics(out)
    for m in metrics:
        for k in (
            "completions/correct_mean_length",
            "completions/wrong_mean_length",
            "agpo/length_bonus_mean",
            "agpo/refill_rounds",
        ):
            assert k in m
        assert 0 <= m["agpo/refill_rounds"] <= 3
        # a batch is all kept unless the rounds ran out
        assert m["agpo/masked_group_frac"] == 0 or m["agpo/refill_rounds"] == 3
    assert any(m["agpo/kept_tokens"] > 0 and m["grad_norm"] > 0 for m in metrics)


def refilled(out: str, steps: int) -> list:
    """The metrics of a run whose step 1 generated extra rounds and left a kept group in the pool, and whose step 2
    generated extra rounds again."""
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[0]["agpo/refill_rounds"] > 0 and metrics[0]["agpo/refill_pool"] > 0, metrics[0]
    assert metrics[1]["agpo/refill_rounds"] > 0, metrics[1]
    return metrics


def test_one_process_refill_resume(tiny_model, add_data, tmp_path):
    """--resume with --refill: checkpoint-1's data position, moved by the extra rounds, and its pool of kept groups
    are restored exactly: step 2's metrics and checkpoint-2 (weights, optimizer, data position, pool) as uninterrupted.
    Groups of 2 and seed 3: groups are often all wrong or all right, so rounds are refilled (checked)."""
    common = [*script_args(SCRIPT, tiny_model, add_data), *tiny_args(num_generations=2, learning_rate="1e-2"),
              "--reward-funcs", "toy_rewards:has_a_pm1", "--refill", "--seed", "3", "--save-steps", "1"]
    compared = run_and_resume(common, str(tmp_path), refilled, pythonpath=(FAKE_VLLM,))
    assert {"agpo/refill_rounds", "agpo/refill_pool", "agpo/masked_group_frac"} <= set(compared)


@pytest.mark.needs_vllm
def test_deepspeed_two_ranks_vllm(tiny_model, add_data, tmp_path):
    out = str(tmp_path / "runs")
    run_two_ranks(SCRIPT, tiny_model, add_data, out, [*ARGS, "--reward-funcs", "toy_rewards:has_a_pm1"], str(tmp_path))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(0 <= m["agpo/masked_group_frac"] < 1 for m in metrics)
    assert "kl" not in metrics[0]  # β = 0: no reference model, no KL
