"""Unit tests of grpo.py's maths against docs/algorithms.md §1, on hand-made numbers."""

import functools
import math

import numpy as np
import pytest
import torch

import grpo


def test_group_advantages_zscore_with_sample_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = grpo.group_advantages(r, 4, "group")
    std = np.std([1, 0, 0, 1], ddof=1)  # Bessel-corrected, as torch.std
    expected = [(x - 0.5) / (std + 1e-4) for x in (1, 0, 0, 1)] + [0, 0, 0, 0]
    assert torch.allclose(a, torch.tensor(expected, dtype=torch.float64))


def test_group_advantages_none_is_centered_only():
    r = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert torch.allclose(grpo.group_advantages(r, 2, "none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_unscorable_rewards_get_zero_advantage_and_leave_the_statistics():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0], dtype=torch.float64)
    a = grpo.group_advantages(r, 4, "none")
    assert a[1] == 0
    assert torch.allclose(a[[0, 2, 3]], torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))
    all_nan = grpo.group_advantages(torch.full((4,), float("nan")), 2, "group")
    assert torch.equal(all_nan, torch.zeros(4))


def test_k3_kl_values():
    ref, pol = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    d = ref - pol
    assert torch.allclose(grpo.k3_kl(ref, pol), torch.exp(d) - d - 1)
    assert grpo.k3_kl(ref, pol)[0] == 0  # zero where the policies agree
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()  # exp(x) ≥ 1 + x


def test_surrogate_clips_and_masks():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.1]]))
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, kl, low, high = grpo.grpo_token_loss(logp, old, torch.tensor([2.0]), mask, 0.2, 0.3)
    # A > 0: min(ρA, clip(ρ)A) = [1.3·2, 0.5·2, 1·2, 1.1·2]
    assert torch.allclose(loss, -torch.tensor([[2.6, 1.0, 2.0, 2.2]]))
    assert kl is None
    assert high.tolist() == [[True, False, False, False]] and not low.any()
    loss, _, low, high = grpo.grpo_token_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.3)
    # A < 0: min(-ρ, -clip(ρ)) = [-1.5, -0.8, -1, -1.1]
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.0, 1.1]]))
    assert low.tolist() == [[False, True, False, False]] and not high.any()


def test_kl_term_is_added_with_beta():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    loss, kl, *_ = grpo.grpo_token_loss(
        logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, 0.2, ref, beta=0.5
    )
    assert torch.allclose(kl, grpo.k3_kl(ref, logp))
    assert torch.allclose(loss, 0.5 * kl)


def _grads(loss_type, logp_init, mask, adv, num_seqs, max_len, split):
    """Gradient of the aggregated loss, accumulated over micro-batches as the trainer does."""
    logp = logp_init.clone().requires_grad_(True)
    n_tok = int(mask.sum())
    for ix in split:
        tok, *_ = grpo.grpo_token_loss(logp[ix], logp[ix].detach(), adv[ix], mask[ix], 0.2, 0.2)
        (tok * grpo.token_weights(mask[ix], loss_type, num_seqs, n_tok, max_len)).sum().backward()
    return logp.grad


def test_loss_types_agree_when_all_lengths_are_equal():
    """docs/algorithms.md (1.4): grpo, dapo and dr_grpo give the same gradient when every completion
    has the same length and it is max_completion_length (dr_grpo's constant normaliser)."""
    torch.manual_seed(0)
    n, length = 6, 5
    logp, mask, adv = torch.randn(n, length), torch.ones(n, length), torch.randn(n)
    split = [[0, 1, 2], [3, 4, 5]]
    g = {t: _grads(t, logp, mask, adv, n, length, split) for t in ("grpo", "dapo", "dr_grpo")}
    assert torch.allclose(g["grpo"], g["dapo"]) and torch.allclose(g["grpo"], g["dr_grpo"])
    assert g["grpo"].abs().sum() > 0


def test_loss_types_differ_with_unequal_lengths():
    torch.manual_seed(0)
    logp, adv = torch.randn(2, 4), torch.tensor([1.0, 1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    g_grpo = _grads("grpo", logp, mask, adv, 2, 4, [[0, 1]])
    g_dapo = _grads("dapo", logp, mask, adv, 2, 4, [[0, 1]])
    # grpo: each sequence weighs 1/2 in total, its tokens 1/(2|o|); dapo: every token 1/5
    assert torch.allclose(g_grpo[0, 0] / g_grpo[1, 0], torch.tensor(0.25))
    assert torch.allclose(g_dapo[0, 0] / g_dapo[1, 0], torch.tensor(1.0))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_does_not_depend_on_the_micro_batch_split(loss_type):
    torch.manual_seed(1)
    logp, adv = torch.randn(8, 6), torch.randn(8)
    mask = (torch.rand(8, 6) > 0.3).long()
    mask[:, 0] = 1
    whole = _grads(loss_type, logp, mask, adv, 8, 6, [list(range(8))])
    parts = _grads(loss_type, logp, mask, adv, 8, 6, [[0, 1], [2, 3, 4], [5, 6, 7]])
    assert torch.allclose(whole, parts, atol=1e-7)


def test_lr_schedules():
    f = functools.partial(grpo.lr_multiplier, "constant", 2, 10, grpo.MIN_LR_RATIO)
    assert [round(f(s), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 1.0]
    assert f(10) == 1.0  # constant: no decay
    # the scripts' cosine and linear schedules decay to 0 (MIN_LR_RATIO, no longer a flag) at the last update
    assert grpo.MIN_LR_RATIO == 0.0
    c = functools.partial(grpo.lr_multiplier, "cosine", 0, 10, grpo.MIN_LR_RATIO)
    assert c(0) == pytest.approx(1.0) and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0, abs=1e-12)
    lin = functools.partial(grpo.lr_multiplier, "linear", 2, 12, grpo.MIN_LR_RATIO)
    assert lin(2) == pytest.approx(1.0) and lin(7) == pytest.approx(0.5) and lin(12) == pytest.approx(0.0, abs=1e-12)
    assert lin(20) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at 0
    floor = functools.partial(grpo.lr_multiplier, "cosine", 0, 10, 0.1)  # the floor it takes when it is not 0
    assert floor(10) == pytest.approx(0.1) and floor(5) == pytest.approx(0.55)


def test_prompt_indices_are_a_seeded_permutation_per_epoch():
    n = 10
    first_epoch = grpo.prompt_indices(0, 5, n, seed=3) + grpo.prompt_indices(5, 5, n, seed=3)
    assert sorted(first_epoch) == list(range(n))
    assert grpo.prompt_indices(0, 15, n, 3)[:10] == first_epoch  # any split of the stream is the same stream
    assert sorted(grpo.prompt_indices(10, 10, n, 3)) == list(range(n))  # the next epoch, reshuffled
    assert grpo.prompt_indices(10, 10, n, 3) != first_epoch
    assert grpo.prompt_indices(0, 5, n, 3) != grpo.prompt_indices(0, 5, n, 4)


def test_collate_pads_prompts_left_and_completions_right():
    b = grpo.collate([[1, 2, 3], [4]], [[5], [6, 7]], device="cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert b["position_ids"][1].tolist()[2:] == [0, 1, 2]
    assert b["completion_ids"].tolist() == [[5, 0], [6, 7]]
    assert b["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert grpo.completion_mask([1, 2]).tolist() == [[1, 0], [1, 1]]


def test_completion_logprobs_match_a_full_forward(tiny_model):
    """Left padding and the output layer on the completion's positions only must not change their log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompts, completions = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]]
    full = [model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] for p, c in zip(prompts, completions)]
    grpo.use_logprob_forward(model)
    logp, ent = grpo.completion_logprobs(model, grpo.collate(prompts, completions, "cpu"), 1.0, with_entropy=True)
    for i, (c, logits) in enumerate(zip(completions, full)):
        ref = torch.log_softmax(logits, -1)[range(len(c)), c]
        assert torch.allclose(logp[i, : len(c)], ref, atol=1e-5)
        probs = torch.softmax(logits, -1)
        assert torch.allclose(ent[i, : len(c)], -(probs * probs.log()).sum(-1), atol=1e-4)
    assert ent.max() <= math.log(model.config.vocab_size) + 1e-4
