"""The loss of a step does not depend on how it is split: 1 rank × 4 micro-batches and 2 ranks ×
2 micro-batches (ZeRO-3, gloo) give the same update on the same data, for every loss type, β > 0 included. The
two-rank run builds its engine as the scripts do on a GPU (decoder layers as ZeRO-3 leaf modules, gradient
checkpointing, plain F.linear), the one-rank run with DeepSpeed's defaults, so the test also shows those change
nothing. tests/split_check.py, one launch for every script."""

import pytest
import torch
from conftest import ALGORITHMS


@pytest.mark.parametrize("module", ALGORITHMS)
def test_one_rank_four_micro_batches_equals_two_ranks_two(module, tiny_model, split_runs):
    from transformers import AutoModelForCausalLM

    a, b = (run[module] for run in split_runs)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).named_parameters())
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        one, two = a[loss_type]["weights"], b[loss_type]["weights"]
        moved = max((one[n] - initial[n]).abs().max().item() for n in initial)
        assert moved > 1e-3, f"{loss_type}: the step changed nothing"
        for n in initial:
            assert torch.allclose(one[n], two[n], atol=1e-6, rtol=1e-5), f"{loss_type}: {n} differs"
    # the comparison is sharp enough to tell the loss types apart on these unequal lengths
    assert not torch.allclose(a["grpo"]["weights"]["model.embed_tokens.weight"],
                              a["dapo"]["weights"]["model.embed_tokens.weight"], atol=1e-6)


def test_zero3_gathers_the_output_layer_once_each_way(split_runs):
    """docs/algorithms.md (6.3): on two ranks under ZeRO-3, every parameter partitioned, one log-prob forward and its
    backward fetch the output layer's weight as often with the completion in 4 chunks as in 1: once in the forward, and
    in the backward at most once (ZeRO-3 may keep it from the forward), once more for a tied embedding's gradient."""
    _, two = split_runs
    counts = two["output_layer_gathers"]
    for tied in (False, True):
        (forward, backward), one_chunk = counts[tied, 2], counts[tied, 10**9]
        assert (forward, backward) == one_chunk and forward == 1 and backward <= 1 + tied, (tied, counts)
