"""The loss of a step does not depend on how it is split: 1 rank × 4 micro-batches and 2 ranks ×
2 micro-batches (ZeRO-3, gloo) give the same update on the same data, for every loss type. The two-rank run
builds its engine as the scripts do on a GPU (decoder layers as ZeRO-3 leaf modules, gradient checkpointing,
plain F.linear), the one-rank run with DeepSpeed's defaults, so the test also shows those change nothing."""

import os

import pytest
import torch
from conftest import ALGORITHMS, TESTS, deepspeed_launcher, run_script


@pytest.mark.parametrize("module", ALGORITHMS)
def test_one_rank_four_micro_batches_equals_two_ranks_two(module, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    check = os.path.join(TESTS, "split_check.py")
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    run_script([check, module, tiny_model, one, "2"], cwd=str(tmp_path))
    run_script([check, module, tiny_model, two, "2", "leaf"], cwd=str(tmp_path), launcher=deepspeed_launcher(2))
    a, b = torch.load(one), torch.load(two)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).named_parameters())
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        moved = max((a[loss_type][n] - initial[n]).abs().max().item() for n in initial)
        assert moved > 1e-3, f"{loss_type}: the step changed nothing"
        for n in initial:
            assert torch.allclose(a[loss_type][n], b[loss_type][n], atol=1e-6, rtol=1e-5), f"{loss_type}: {n} differs"
    # the comparison is sharp enough to tell the loss types apart on these unequal lengths
    assert not torch.allclose(a["grpo"]["model.embed_tokens.weight"], a["dapo"]["model.embed_tokens.weight"], atol=1e-6)
