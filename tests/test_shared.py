"""The code every algorithm script shares (the scripts duplicate it on purpose), tested in each script:
padding never reaches an exp, chunked log-probs, old log-probs from the update's own micro-batches,
stop tokens, collectives on the training device, precision settings, recorded flags, CLI help,
reward-function output checks, per-row sampling temperature."""

import ast
import contextlib
import copy
import importlib
import inspect
import io
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (ALGORITHMS, FAKE_VLLM, ROOT, build_tiny_model, deepspeed_launcher, logprob_model, make_args,
                      make_rollout, run_script, update_policy, vllm_importable)
from transformers import AutoModelForCausalLM

import eval as ev

MODULES = {name: importlib.import_module(name) for name in ALGORITHMS}
each = pytest.mark.parametrize("algo", list(MODULES.values()), ids=list(MODULES))


class PlainEngine:
    """What update_policy asks of a DeepSpeed engine, on a plain model in one process: gradients accumulate over an
    optimizer step's micro-batches; its step records their norm and the gradient, zeroes them, and leaves the weights
    as they are."""

    def __init__(self, model):
        self.module = model
        self.grad_norms, self.grads, self.boundary = [], [], True

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def set_gradient_accumulation_boundary(self, boundary):
        self.boundary = boundary

    def step(self):
        if self.boundary:
            grad = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                              for p in self.module.parameters()])
            self.grads.append(grad)
            self.grad_norms.append(grad.double().norm().item())
            self.module.zero_grad()

    def get_global_grad_norm(self):
        return self.grad_norms[-1]


def plan_of(algo, rollout, args, seed):
    """The update plan main() makes for this rollout (in a world of one)."""
    return algo.update_plan(rollout, args, torch.Generator().manual_seed(seed), "cpu")


def first_pass(plan):
    """The micro-batches of the update's first pass, as main() hands them to rollout_logprobs."""
    return [ix for micro_batches, *_ in plan[0] for ix in micro_batches]


def rollout_of(algo, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    return make_rollout(
        algo,
        prompt_ids=[torch.randint(5, 200, (3 + i % 4,), generator=g).tolist() for i in range(n)],
        completion_ids=[torch.randint(5, 200, (L,), generator=g).tolist() for L in lengths],
        advantages=torch.randn(n, generator=g),
        loss_mask=algo.completion_mask(lengths),
    )


@each
def test_padded_positions_never_reach_an_exp(algo, tiny_model, world_of_one, monkeypatch):
    """docs/algorithms.md (6.2). The cached ℓref (and ℓold) are 0 on padding; a policy log-prob below
    about −88 there made exp(ℓref − ℓθ) overflow: KL = inf, and the loss and gradient NaN although
    that position's weight is 0. β > 0 and μ = 2 (shuffled micro-batches), through update_policy."""
    real = algo.completion_logprobs

    def very_unlikely_padding(model, batch, temperature, with_entropy=False):
        logp, entropy = real(model, batch, temperature, with_entropy)
        padded = batch["completion_ids"] == 0  # pad id 0; the test's completions never hold token 0
        return logp - 100.0 * padded, entropy  # still a function of the weights there, as in training

    monkeypatch.setattr(algo, "completion_logprobs", very_unlikely_padding)
    args = make_args(algo, micro_batch_size=2, num_iterations=2, beta=0.04, max_completion_length=8)
    engine = PlainEngine(logprob_model(algo, tiny_model))
    rollout = rollout_of(algo, [1, 8, 3, 6])
    plan = plan_of(algo, rollout, args, 0)
    algo.rollout_logprobs(engine, engine, rollout, first_pass(plan), args, "cpu")
    assert rollout.ref_logp[0, 1:].eq(0).all() and rollout.old_logp[0, 1:].eq(0).all()  # padding in the cache
    metrics = algo.Metrics()
    update_policy(algo, engine, rollout, plan, args, metrics)
    assert len(engine.grad_norms) == 2 and all(math.isfinite(g) and g > 0 for g in engine.grad_norms)
    kl_sum, _ = metrics["kl"]
    assert math.isfinite(kl_sum)


@each
def test_loss_is_finite_where_masked_logprobs_are_extreme(algo):
    logp = torch.tensor([[-0.5, -100.0]], requires_grad=True)
    cached = torch.tensor([[-0.4, 0.0]])  # ℓold and ℓref, 0 on the padded second position
    mask = torch.tensor([[1.0, 0.0]])
    loss, kl, *_ = algo.grpo_token_loss(logp, cached, torch.tensor([1.0]), mask, 0.2, 0.2, cached, 0.04)
    (loss * mask).sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] != 0


@each
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_logprobs_equal_the_unchunked_ones(algo, tiny_model, with_entropy, monkeypatch):
    """docs/algorithms.md (6.3): chunks of positions (recomputed in the backward) give the same
    log-probs, entropy and gradient as one fp32 log-softmax over all positions."""
    model = logprob_model(algo, tiny_model)
    rollout = rollout_of(algo, [7, 2, 5])
    batch = rollout.micro_batch([0, 1, 2], "cpu")
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (10**9, 3):
        monkeypatch.setattr(algo, "LOGPROB_CHUNK", chunk)
        model.zero_grad()
        logp, entropy = algo.completion_logprobs(model, batch, 0.7, with_entropy=with_entropy)
        (logp * weights * batch["loss_mask"]).sum().backward()
        results.append((logp.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (a, ent_a, grad_a), (b, ent_b, grad_b) = results
    assert torch.allclose(a, b, atol=1e-6)
    if with_entropy:
        assert torch.allclose(ent_a, ent_b, atol=1e-6)
    scale = max(g.abs().max() for g in grad_a)  # the output layer's gradient sums the chunks' (float order)
    assert all(torch.allclose(x, y, atol=1e-6 * scale) for x, y in zip(grad_a, grad_b)) and scale > 0


@each
def test_old_logprobs_come_from_the_first_pass_micro_batches(algo, tiny_model, world_of_one):
    """docs/algorithms.md (6.1): in bf16 a row's log-probs depend on the micro-batch it is padded
    with, so ℓold computed in other micro-batches than the update's first pass would make that
    pass's ratio differ from 1. Computed from the same micro-batches, it is exactly 1."""
    model = logprob_model(algo, tiny_model, torch.bfloat16)
    args = make_args(algo, micro_batch_size=2, num_iterations=2, beta=0.0)
    rollout = rollout_of(algo, [3, 9, 5, 12, 2, 7, 4, 10])
    plan = plan_of(algo, rollout, args, 3)
    update_batches = first_pass(plan)
    assert update_batches != [[0, 1], [2, 3], [4, 5], [6, 7]]  # shuffled
    algo.rollout_logprobs(model, None, rollout, update_batches, args, "cpu")
    in_order = rollout.old_logp.clone()
    algo.rollout_logprobs(model, None, rollout, [[0, 1], [2, 3], [4, 5], [6, 7]], args, "cpu")
    in_order, rollout.old_logp = rollout.old_logp, in_order
    worst_same, worst_other = 0.0, 0.0
    for ix in update_batches:  # the first pass of the update, with gradients as in training
        batch = rollout.micro_batch(ix, "cpu")
        logp, _ = algo.completion_logprobs(model, batch, getattr(args, "temperature", 1.0))
        m = batch["loss_mask"].bool()
        worst_same = max(worst_same, (logp - batch["old_logp"])[m].abs().max().item())
        worst_other = max(worst_other, (logp - in_order[ix, : m.shape[1]])[m].abs().max().item())
    assert worst_same == 0.0
    assert worst_other > 0  # the check is sharp: other micro-batches do change bf16 log-probs


@each
def test_stop_tokens_include_the_chat_templates_end_of_turn(algo, tmp_path):
    """Qwen2.5 base: EOS <|endoftext|>, but its chat template ends a turn with <|im_end|>."""
    from tiny import build_tokenizer

    tok = build_tokenizer(str(tmp_path))
    tok.eos_token = "<|endoftext|>"
    ids = algo.stop_token_ids(str(tmp_path / "no-generation-config"), tok)
    assert ids == sorted({tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")})
    tok.chat_template = None
    assert algo.stop_token_ids(str(tmp_path), tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]
    # eval.py stops where training stops: it uses grpo.py's function, which every script carries unchanged
    assert ev.stop_token_ids.__module__ == "grpo"
    assert inspect.getsource(algo.stop_token_ids) == inspect.getsource(ev.stop_token_ids)


def _collective_args(tree: ast.AST):
    """(function, name of the tensor given to a dist collective) for every dist.<collective>(name) call."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for call in ast.walk(fn):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "dist"
                    and call.func.attr in ("all_reduce", "broadcast", "all_gather", "reduce_scatter")
                    and call.args
                    and isinstance(call.args[0], ast.Name)
                ):
                    yield fn, call.args[0].id


@each
def test_every_tensor_given_to_a_collective_is_made_on_the_training_device(algo):
    """NCCL rejects CPU tensors: a tensor created without device= and handed to dist.all_reduce
    crashes every multi-GPU run (it did, in the --refill loop). Each such tensor is built with
    device=... in the function that reduces it."""
    tree = ast.parse(open(algo.__file__).read())
    checked = 0
    for fn, name in _collective_args(tree):
        makers = [
            node.value
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name) and t.id == name
        ]
        assert makers, f"{fn.name}: {name} is not created in the function that reduces it"
        for value in makers:
            assert isinstance(value, ast.Call) and any(k.arg == "device" for k in value.keywords), (
                f"{algo.__name__}.{fn.name}: {name} = {ast.unparse(value)} is not made on the training device"
            )
        checked += 1
    assert checked >= 2  # the per-step metrics and the loss normalisers, at least


@each
def test_bf16_accumulates_and_reduces_gradients_in_fp32(algo):
    args = algo.Args()
    gpu = algo.deepspeed_config(args, on_gpu=True, grad_accum=4)
    assert gpu["bf16"]["enabled"] and gpu["data_types"]["grad_accum_dtype"] == "fp32"
    assert gpu["communication_data_type"] == "fp32" and gpu["gradient_clipping"] == args.max_grad_norm
    cpu = algo.deepspeed_config(args, on_gpu=False, grad_accum=4)
    assert not cpu["bf16"]["enabled"] and "data_types" not in cpu
    args.zero_stage = 0  # DeepSpeed supports fp32 accumulation of bf16 gradients only under ZeRO
    assert "data_types" not in algo.deepspeed_config(args, on_gpu=True, grad_accum=4)


@each
def test_deepspeeds_switch_never_replaces_f_linear(algo):
    """docs/algorithms.md (6.8): DeepSpeed's memory_efficient_linear replaces F.linear for the whole process, the
    colocated vLLM engine's too, so it is always off; the policy's own Linear layers take its place."""
    for ckpt in ("on", "off"):
        config = algo.deepspeed_config(algo.Args(gradient_checkpointing=ckpt), on_gpu=True, grad_accum=1)
        assert config["zero_optimization"]["memory_efficient_linear"] is False, ckpt


LINEAR_CHECK = """
import sys, torch
import deepspeed
from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3
from conftest import ALGORITHMS, make_args
linear, calls, apply = torch.nn.functional.linear, [], LinearFunctionForZeroStage3.apply
LinearFunctionForZeroStage3.apply = lambda *a: calls.append(1) or apply(*a)
for name in ALGORITHMS:
    algo = __import__(name)
    algo.init_distributed()
    batch = algo.collate([[5, 6, 7]], [[8, 9]], "cpu")
    for ckpt in ("on", "off"):
        args = make_args(algo, model=sys.argv[1], beta=0.04, gradient_checkpointing=ckpt, zero_stage=3,
                         max_prompt_length=32, max_completion_length=8, num_generations=2, prompts_per_step=1)
        engine, ref_engine = algo.setup_models(args, algo.deepspeed_config(args, False, 1), torch.float32, 10)
        for role, model in (("policy", engine), ("reference", ref_engine)):
            if model is not None:
                del calls[:]
                algo.completion_logprobs(model, batch, 1.0)
                print(name, ckpt, role, "memory-efficient" if calls else "plain", torch.nn.functional.linear is linear)
if sys.argv[2:] == ["vllm"]:
    from vllm import SamplingParams
    llm = algo.setup_vllm(args, 0, torch.float32, False)
    del calls[:]
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=8), use_tqdm=False)
    print("vllm", "memory-efficient" if calls else "plain", torch.nn.functional.linear is linear)
"""


def test_only_the_policy_without_checkpointing_runs_the_memory_efficient_linear(tiny_model, tmp_path):
    """docs/algorithms.md (6.8): under ZeRO-3 the policy's Linear layers run DeepSpeed's memory-efficient Linear
    without checkpointing and plain F.linear with it; the reference (β > 0) and vLLM's engine never do, and
    F.linear itself is never replaced (before, DeepSpeed replaced it process-wide when checkpointing was off).
    Every script in one process, in turn: a script that replaced F.linear would show from its own lines on."""
    script = tmp_path / "linear_check.py"
    script.write_text(LINEAR_CHECK)
    with_vllm = ["vllm"] if vllm_importable() else []
    out = run_script([str(script), tiny_model, *with_vllm], cwd=str(tmp_path)).stdout
    for name in ALGORITHMS:
        assert f"{name} on policy plain True" in out and f"{name} off policy memory-efficient True" in out, out
        assert f"{name} on reference plain True" in out and f"{name} off reference plain True" in out, out
    assert not with_vllm or "vllm plain True" in out, out


@each
def test_decoder_layers_become_zero3_leaf_modules(algo, tiny_model):
    """docs/algorithms.md (6.8): under ZeRO-3 each decoder layer is fetched and hooked as one unit."""
    from deepspeed.utils import z3_leaf_module

    model = algo.load_model(make_args(algo, model=tiny_model, zero_stage=3), torch.float32)
    leaves = [type(m).__name__ for m in model.modules() if z3_leaf_module(m)]
    assert leaves == ["Qwen2DecoderLayer"] * model.config.num_hidden_layers
    plain = algo.load_model(make_args(algo, model=tiny_model, zero_stage=2), torch.float32)
    assert not any(z3_leaf_module(m) for m in plain.modules())


@each
def test_help_offers_options_only(algo):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        import tyro

        tyro.cli(algo.Args, args=["--help"])
    text = out.getvalue()
    assert "--learning-rate" in text and "--vllm-gpu-memory-utilization" in text
    assert "--world-size" not in text and "--local-rank" not in text
    assert "epsilon-high_" not in text and "(derived)" not in text


@each
@pytest.mark.parametrize(
    "bad, needle",
    [
        (lambda n: [1.0] * (n - 1), "of length"),
        (lambda n: "1.0", "returned str"),
        (lambda n: [float("nan")] * n, "returned nan"),
        (lambda n: [float("inf")] + [0.0] * (n - 1), "returned inf"),
        (lambda n: ["0.5"] * n, "returned '0.5'"),
    ],
)
def test_reward_function_output_is_checked(algo, bad, needle):
    examples = [{"prompt": "p", "answer": "#### 1"}] * 2

    def broken(prompts, completions, **kwargs):
        return bad(len(completions))

    with pytest.raises(RuntimeError, match="reward 'mine'") as e:
        algo.score([broken], ["mine"], examples, ["a"] * 4, [[1]] * 4, 2)
    assert needle in str(e.value)
    ok = algo.score(
        [lambda prompts, completions, **k: [None, 1, 0.5, True and 2.0]], ["ok"], examples, ["a"] * 4, [[1]] * 4, 2
    )
    assert ok[0, 0].isnan() and ok[0, 1:].tolist() == [1.0, 0.5, 2.0]


def test_the_stand_in_engine_samples_as_vllm_does(tiny_model):
    """tests/fake_vllm: a request's seed fixes its completions (child j samples with seed + j), unseeded requests
    share the process's stream, stop tokens end them (kept), and a completion that reaches max_tokens ends with
    "length"."""
    spec = importlib.util.spec_from_file_location("fake_vllm", os.path.join(FAKE_VLLM, "vllm", "__init__.py"))
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    llm = fake.LLM(model=tiny_model, dtype=torch.float32)
    prompts = [{"prompt_token_ids": [5, 6, 7]}] * 3
    params = [fake.SamplingParams(n=4, temperature=t, seed=s, max_tokens=8) for t, s in ((1.0, 1), (1.0, 1), (1.0, 2))]
    a, b, c = ([o.token_ids for o in out.outputs] for out in llm.generate(prompts, params))
    assert a == b and a != c and all(len(x) == 8 for x in a)
    assert a[1:] == c[:3]  # vLLM's rule: child j + 1 of seed 1 samples as child j of seed 2
    unseeded = [o.token_ids for out in llm.generate(prompts[:2], fake.SamplingParams(n=4, max_tokens=8))
                for o in out.outputs]
    assert len(set(map(tuple, unseeded))) == 8  # one process-wide stream: every completion its own draws
    stop = [a[0][3]]  # a token the seed-1 completions sample at position 3
    out = llm.generate(prompts[:1], [fake.SamplingParams(n=4, seed=1, max_tokens=8, stop_token_ids=stop)])[0].outputs
    assert out[0].token_ids == a[0][: a[0].index(stop[0]) + 1] and out[0].finish_reason == "stop"
    assert all(o.finish_reason == ("stop" if o.token_ids[-1] in stop else "length") for o in out)


@each
def test_scripts_cite_the_repositorys_own_maths(algo):
    text = open(algo.__file__).read()
    assert "ALGORITHMS.md" not in text and "docs/algorithms.md" in text
    assert os.path.isfile(os.path.join(ROOT, "docs", "algorithms.md"))


@each
def test_bad_flags_fail_before_any_model_is_loaded(algo):
    args = make_args(algo, prompts_per_step=6, num_generations=1)
    with pytest.raises(SystemExit, match="multiple of the 4 ranks") as e:
        algo.validate(args, 4)
    assert "--num-generations 1: a group needs at least 2" in str(e.value)  # every problem at once
    algo.validate(make_args(algo, prompts_per_step=8, micro_batch_size=8), 4)  # 2 prompts × 8 per rank: valid


def test_untied_tiny_model_has_its_own_lm_head(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(str(tmp_path), tied=False))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@each
def test_totals_add_up_over_calls_and_ranks(algo, world_of_one):
    """Tokens are generated in several calls in a step (refill rounds, probes): a total, not a mean of them."""
    metrics = algo.Metrics()
    metrics.add_total("tokens", 100)
    metrics.add_total("tokens", 28)
    metrics.add("length", 10, 1)
    metrics.add("length", 20, 1)
    assert metrics.reduce("cpu") == {"tokens": 128.0, "length": 15.0}


@each
def test_padded_rows_give_each_sequence_its_own_logprobs_and_gradient(algo, tiny_model, monkeypatch):
    """A micro-batch of left-padded prompts and right-padded completions gives every sequence the log-probs, entropy
    and gradient it has alone, unpadded; the rows of `micro_batch` are the rollout's."""
    model = logprob_model(algo, tiny_model)
    g = torch.Generator().manual_seed(4)
    lengths = [7, 2, 5, 9, 1, 0, 4, 3]
    prompt_ids = [torch.randint(5, 200, (k,), generator=g).tolist() for k in (5, 5, 3, 6, 1, 4, 5, 2)]
    rollout = make_rollout(algo, prompt_ids=prompt_ids,
                           completion_ids=[torch.randint(5, 200, (L,), generator=g).tolist() for L in lengths],
                           advantages=torch.randn(8, generator=g), loss_mask=algo.completion_mask(lengths))
    weights = torch.randn(8, 9, generator=g)
    monkeypatch.setattr(algo, "LOGPROB_CHUNK", 4)
    results = []
    for parts in ([list(range(8))], [[i] for i in range(8)]):  # one padded micro-batch, or each sequence alone
        model.zero_grad()
        logps, entropies = torch.zeros(8, 9), torch.zeros(8, 9)
        for ix in parts:
            batch = rollout.micro_batch(ix, "cpu")
            assert batch["tokens"] == sum(len(prompt_ids[i]) + lengths[i] for i in ix)
            logp, entropy = algo.completion_logprobs(model, batch, 0.8, with_entropy=True)
            (logp * weights[ix, : logp.shape[1]] * batch["completion_mask"]).sum().backward()
            logps[ix, : logp.shape[1]], entropies[ix, : logp.shape[1]] = logp.detach(), entropy.detach()
        results.append((logps, entropies, [p.grad.clone() for p in model.parameters()]))
    (a, ent_a, grad_a), (b, ent_b, grad_b) = results
    mask = torch.cat([algo.completion_mask(lengths), torch.zeros(8, 9 - max(lengths))], 1).bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-5) and torch.allclose(ent_a[mask], ent_b[mask], atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(grad_a, grad_b))
    assert a[mask].abs().min() > 0  # every completion token has a log-prob


@each
def test_update_plan_cuts_each_pass_into_optimizer_steps_and_micro_batches(algo, world_of_one):
    """plan[pass] → optimizer steps (micro-batches, sequences and tokens in the loss, skipped): each optimizer step a
    run of the pass's order, shuffled per pass only when the policy moves within the step (μ × mini-batches > 1),
    every completion once per pass; within an optimizer step the micro-batches are cut from its rows sorted by
    length (6.13), and the normalisers count its rows (1.4)."""
    rollout = rollout_of(algo, [5, 1, 8, 2, 7, 3, 6, 4])  # every advantage non-zero
    lengths = [len(c) for c in rollout.completion_ids]
    args = make_args(algo, micro_batch_size=2, num_iterations=1, num_mini_batches=1)
    assert plan_of(algo, rollout, args, 0) == [[([[1, 3], [5, 7], [0, 6], [4, 2]], 8, 36, False)]]
    args = make_args(algo, micro_batch_size=2, num_iterations=2, num_mini_batches=2)
    plan = plan_of(algo, rollout, args, 0)
    for p in plan:
        assert sorted(i for micro_batches, *_ in p for ix in micro_batches for i in ix) == list(range(8))
        for micro_batches, num_seqs, num_tokens, skip in p:
            rows = [lengths[i] for ix in micro_batches for i in ix]
            assert [len(ix) for ix in micro_batches] == [2, 2] and rows == sorted(rows)
            assert (num_seqs, num_tokens, skip) == (4, sum(rows), False)
    assert plan[0] != plan[1]  # a new order per pass


@each
def test_micro_batches_grouped_by_length_pad_less(algo, world_of_one):
    """(6.13): completions of 100 to 3,584 tokens, micro-batches of 4 out of 32: cut from the rows sorted by length,
    the micro-batches hold far fewer padded positions than cut in the sampled order."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 3585, (32,), generator=g).tolist()
    rollout = make_rollout(algo, prompt_ids=[[1] * 50] * 32, completion_ids=[[7] * L for L in lengths],
                           advantages=torch.randn(32, generator=g), loss_mask=algo.completion_mask(lengths))
    args = make_args(algo, micro_batch_size=4)

    def padding(micro_batches):
        return sum(len(ix) * max(lengths[i] for i in ix) - sum(lengths[i] for i in ix) for ix in micro_batches)

    grouped = padding(first_pass(plan_of(algo, rollout, args, 0)))
    in_order = padding([list(range(s, s + 4)) for s in range(0, 32, 4)])
    assert grouped < in_order / 4, (grouped, in_order)


OFF = dict(beta=0.0, entropy_coef=0.0, adaptive_beta=False, adaptive_epsilon=False, adaptive_clip=False)  # no KL,
# no entropy bonus, no ε_q statistics: only a row's advantage gives it a gradient


@each
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_rows_without_a_gradient_are_left_out_with_the_same_gradient(algo, tiny_model, world_of_one, loss_type):
    """docs/algorithms.md (6.13): 3 groups of 4, one with signal, one whose advantages are 0, one out of the loss
    (masked), μ 2 with ratios ≠ 1: the plan computes only the first group's rows, every optimizer step's gradient
    equals that of computing all 12 rows (the normalisers unchanged) to 1e-6 relative, and the metrics count the
    computed rows. With β > 0 the zero-advantage rows are computed too (their KL has a gradient)."""
    args = make_args(algo, micro_batch_size=2, num_iterations=2, max_completion_length=8, loss_type=loss_type, **OFF)
    rollout = rollout_of(algo, [3, 8, 1, 6, 5, 2, 7, 4, 2, 6, 3, 5])
    rollout.advantages[4:] = 0.0
    rollout.loss_mask[8:] = 0.0
    plan = plan_of(algo, rollout, args, 0)
    lengths = [len(c) for c in rollout.completion_ids]
    for p in plan:
        ((micro_batches, num_seqs, num_tokens, skip),) = p
        assert sorted(i for ix in micro_batches for i in ix) == [0, 1, 2, 3]
        assert (num_seqs, num_tokens, skip) == (8, sum(lengths[:8]), False)  # the maths counts every row in the loss
    every_row = [[([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]], 8, sum(lengths[:8]), False)]] * 2
    fillers = [[(micro_batches + [[], []], *rest) for micro_batches, *rest in p] for p in plan]  # as on a rank
    # with fewer rows to compute than another: a filler is its shortest row (here row 2, with signal), out of the loss
    shift = 0.3 * torch.randn(rollout.loss_mask.shape, generator=torch.Generator().manual_seed(1))  # ratios ≠ 1
    grads, rows = [], []
    for p in (plan, every_row, fillers):
        engine = PlainEngine(logprob_model(algo, tiny_model))
        algo.rollout_logprobs(engine, None, rollout, first_pass(p), args, "cpu")
        rollout.old_logp = (rollout.old_logp + shift) * rollout.loss_mask
        metrics = algo.Metrics()
        update_policy(algo, engine, rollout, p, args, metrics)
        grads.append(engine.grads)
        rows.append(metrics["update/rows"][0])
    assert rows == [8, 24, 12]
    for left_out, computed, with_fillers in zip(*grads):
        assert computed.norm() > 0 and (left_out - computed).norm() <= 1e-6 * computed.norm()
        assert torch.equal(with_fillers, left_out)
    args.beta = 0.04
    assert sorted(i for ix in first_pass(plan_of(algo, rollout, args, 0)) for i in ix) == list(range(8))


@each
def test_every_row_a_taken_step_computes_has_its_old_and_reference_logprobs(algo, tiny_model, world_of_one):
    """(6.1), (6.13): β > 0, μ 2, 2 mini-batches, 6 of 8 advantages 0. A shuffle whose first pass has an optimizer
    step without signal (skipped) and whose second pass has none: that step's rows come back in the second pass, so
    the ℓold/ℓref pass, over the first pass's micro-batches, must compute them although the first pass skips them."""
    args = make_args(algo, micro_batch_size=2, num_iterations=2, num_mini_batches=2, beta=0.04, max_completion_length=8)
    rollout = rollout_of(algo, [3, 5, 2, 4, 6, 1, 7, 3])
    rollout.advantages = torch.tensor([0.0] * 6 + [0.7, -0.7])
    plans = (plan_of(algo, rollout, args, seed) for seed in range(100))
    plan = next(p for p in plans if any(skip for *_, skip in p[0]) and not any(skip for *_, skip in p[1]))
    engine = PlainEngine(logprob_model(algo, tiny_model))
    algo.rollout_logprobs(engine, engine, rollout, first_pass(plan), args, "cpu")
    for i, completion in enumerate(rollout.completion_ids):  # every row is in a taken step of the second pass
        assert rollout.old_logp[i, : len(completion)].ne(0).all() and rollout.ref_logp[i, : len(completion)].ne(0).all()


@each
@pytest.mark.parametrize("skip", [True, False])
def test_no_row_computed_when_none_carries_a_gradient(algo, tiny_model, world_of_one, skip):
    """(6.9), (6.13): β 0 and every advantage 0, so no row carries a gradient. With the skip: no micro-batch and no
    optimizer step. Without it each optimizer step is still taken, on one filler micro-batch (its row out of the loss:
    a zero gradient), as it was taken on every row before rows without a gradient were left out."""
    args = make_args(algo, micro_batch_size=2, num_iterations=2, max_completion_length=8, skip_no_signal=skip, **OFF)
    rollout = rollout_of(algo, [3, 5, 2, 4])
    rollout.advantages = torch.zeros(4)
    plan = plan_of(algo, rollout, args, 0)
    assert first_pass(plan) == ([] if skip else [[]])
    engine = PlainEngine(logprob_model(algo, tiny_model))
    metrics = algo.Metrics()
    update_policy(algo, engine, rollout, plan, args, metrics)
    assert metrics["update/skipped_steps"] == (2 if skip else 0, 1.0)
    assert engine.grad_norms == ([] if skip else [0.0, 0.0])
    assert metrics.get("update/rows", (0.0, 1.0))[0] == (0 if skip else 2)


@each
@pytest.mark.parametrize("skip", [True, False])
def test_no_optimizer_step_without_signal(algo, tiny_model, world_of_one, skip):
    """docs/algorithms.md (6.9): every advantage 0 → no backward and no optimizer step (nor schedule step), counted
    in update/skipped_steps. Without the skip the steps are taken, and in agpo_adaptive.py (k1 KL) and a_grpo.py
    (entropy bonus) they carry a gradient, which Adam turns into a full-size step. One non-zero advantage: taken."""
    args = make_args(algo, micro_batch_size=2, num_iterations=2, beta=0.04, max_completion_length=8,
                     skip_no_signal=skip)
    noise = torch.full((4,), 1e-13)  # the float noise equal rewards can leave after the group mean: no signal
    for advantages, signal in ((torch.zeros(4), False), (noise, False), (torch.tensor([0.0, 0.0, 0.0, 0.5]), True)):
        engine = PlainEngine(logprob_model(algo, tiny_model))
        rollout = rollout_of(algo, [3, 5, 2, 4])
        rollout.advantages = advantages
        plan = plan_of(algo, rollout, args, 0)  # 2 optimizer steps of 2 micro-batches
        algo.rollout_logprobs(engine, engine, rollout, first_pass(plan), args, "cpu")
        metrics = algo.Metrics()
        update_policy(algo, engine, rollout, plan, args, metrics)
        skipped = 2 if skip and not signal else 0
        assert metrics["update/skipped_steps"] == (skipped, 1.0)
        assert len(engine.grad_norms) == 2 - skipped
        if not signal and not skip and algo.__name__ in ("agpo_adaptive", "a_grpo"):
            assert min(engine.grad_norms) > 0
    rollout.loss_mask = torch.zeros_like(rollout.loss_mask)  # no token in the loss: no step, with or without the flag
    metrics = algo.Metrics()
    update_policy(algo, engine, rollout, plan_of(algo, rollout, args, 0), args, metrics)
    assert metrics["update/skipped_steps"] == (2, 1.0) and len(engine.grad_norms) == 2


@each
def test_resume_drops_the_metrics_rows_past_the_checkpoint(algo, tmp_path):
    """docs/algorithms.md (6.5): a run killed while saving checkpoint-2 had written step 2's row (and maybe part of
    a line); resumed from checkpoint-1, its metrics.jsonl must read as one run."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n{"step": 3, "rew')
    algo.keep_metrics_until(str(path), 1)
    assert path.read_text() == '{"step": 1, "reward": 0.5}\n'
    algo.keep_metrics_until(str(tmp_path / "absent.jsonl"), 1)  # a run that never logged: nothing to do


@each
def test_a_step_with_a_signal_is_the_same_with_or_without_the_skip(algo, tiny_model, world_of_one):
    """(6.9): the flag changes nothing where an advantage is non-zero: the same gradients, bit for bit (so the
    equality of grpo.py's loss and gradient with TRL's on such batches still holds)."""
    norms = []
    for skip in (True, False):
        args = make_args(algo, micro_batch_size=2, num_iterations=2, beta=0.04, max_completion_length=8,
                         skip_no_signal=skip)
        engine = PlainEngine(logprob_model(algo, tiny_model))
        rollout = rollout_of(algo, [3, 5, 2, 4])
        plan = plan_of(algo, rollout, args, 0)
        algo.rollout_logprobs(engine, engine, rollout, first_pass(plan), args, "cpu")
        update_policy(algo, engine, rollout, plan, args, algo.Metrics())
        norms.append(engine.grad_norms)
    assert len(norms[0]) == 2 and norms[0] == norms[1]


class RecordingEngine:
    """vLLM's generate, recorded: each request's sampling parameters, and a draw from the torch and numpy generators
    that vLLM's samplers read for unseeded requests."""

    def generate(self, prompts, params, use_tqdm=False):
        self.params, self.draws = params, (torch.randint(2**62, ()).item(), np.random.randint(2**62))
        out = SimpleNamespace(token_ids=[7], finish_reason="stop", logprobs=SimpleNamespace(logprobs=[-1.0]))
        return [type("R", (), {"outputs": [out] * p.n})() for p in params]

    class Tokenizer:
        def batch_decode(self, ids, skip_special_tokens):
            return ["7"] * len(ids)


@each
def test_every_completion_of_a_run_at_scale_draws_its_own_stream(algo):
    """docs/algorithms.md (6.5): no request carries a seed (vLLM gives child j of a seeded request seed + j, which
    collided with child j − 1 of the next prompt), and every engine call and shuffle of 1,024 ranks × 2 steps, probes
    included, is seeded with a seed of its own; within a call vLLM's one batched draw serves every row."""
    seeds = {algo.stream_seed(1, use, step, rank) for use in algo.STREAMS for step in range(2) for rank in range(1024)}
    assert len(seeds) == len(algo.STREAMS) * 2 * 1024
    engine, args = RecordingEngine(), make_args(algo, num_generations=16, reward_funcs=["zero"])
    examples = [{"prompt": "p", "prompt_ids": [5, 6], "answer": "7"}] * 128
    zero = lambda completions, **_: [0.0] * len(completions)  # noqa: E731
    draws = []
    for seed in (algo.stream_seed(args.seed, "generate", 1, 1023), algo.stream_seed(args.seed, "shuffle", 1, 1023)) * 2:
        algo.sample_and_score(engine, engine.Tokenizer(), [zero], examples, [1.0] * 128, seed, args, [9])
        assert all(p.seed is None and p.n == 16 for p in engine.params)
        draws.append(engine.draws)
    assert draws[0] == draws[2] and draws[1] == draws[3]  # the call's seed sets both generators
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]


@pytest.mark.needs_vllm
def test_identical_prompts_get_distinct_completions_and_the_stand_in_samples_as_vllm(tiny_model, tmp_path):
    """tests/stream_check.py, on real vLLM and on tests/fake_vllm: with 4 identical prompts × G 4, 16 distinct
    completions in every script, and the same 16 again for the same call seed (--resume). Asked for a seed per request,
    both engines repeat a completion exactly where vLLM's rule (child j samples with seed + j) says: completion j of
    prompt i equals completion j − 1 of prompt i + 1 (the collision every request's seed caused before)."""
    streams = {}
    for engine, pythonpath in (("vllm", ()), ("stand-in", (FAKE_VLLM,))):
        out = str(tmp_path / f"{engine}.json")
        run_script([os.path.join(ROOT, "tests", "stream_check.py"), tiny_model, out], cwd=str(tmp_path),
                   pythonpath=pythonpath)
        with open(out) as f:
            completions = json.load(f)
        assert set(completions) == {*ALGORITHMS, "grpo_again", "seeded"}, engine
        for name in ALGORITHMS:
            ids = completions[name]
            assert len(ids) == 16 and all(len(c) > 0 for c in ids), (engine, name)
            assert len({tuple(c) for c in ids}) == 16, (engine, name)
        assert completions["grpo_again"] == completions["grpo"], engine
        seeded = completions["seeded"]  # [prompt i × 4 + completion j]
        streams[engine] = {(a, b) for a in range(16) for b in range(a + 1, 16) if seeded[a] == seeded[b]}
    rule = {(a, b) for a in range(16) for b in range(a + 1, 16) if a // 4 + a % 4 == b // 4 + b % 4}
    assert streams["vllm"] == rule and streams["stand-in"] == rule


@pytest.mark.needs_vllm
@pytest.mark.parametrize("model", ["tiny_model", "tiny_untied_model"])
def test_weight_sync_reaches_vllm_bucket_by_bucket(model, request, tmp_path):
    """docs/algorithms.md (6.10), tests/sync_check.py: on 2 ranks under ZeRO-3, with buckets of 4 KB (the embedding,
    each decoder layer, the final norm and an untied lm_head each a bucket of its own, gathered from the shards in
    turn),
    vLLM's log-probs differ from the trainer's after an optimizer step until sync_weights_to_vllm, and equal them after
    it, on every rank and in every script; with a tied lm_head (repacked on CPU) and an untied one."""
    out = str(tmp_path / "sync.json")
    run_script([os.path.join(ROOT, "tests", "sync_check.py"), request.getfixturevalue(model), out], cwd=str(tmp_path),
               launcher=deepspeed_launcher(2))
    with open(out) as f:
        result = json.load(f)
    assert list(result) == ALGORITHMS
    for name, ranks in result.items():
        assert len(ranks) == 2, name
        assert all(r["buckets"] == 4 + (model == "tiny_untied_model") for r in ranks), (name, ranks)
        assert all(r["before_sync"] > 1e-2 for r in ranks), (name, ranks)  # the step moved vLLM's log-probs away
        assert all(r["after_sync"] < 1e-4 for r in ranks), (name, ranks)  # fp32 on CPU: agree to ~5e-7


@each
def test_truncated_importance_weights_by_hand(algo):
    """docs/algorithms.md (6.12): min(exp(ℓold − ℓsampler), C) per token, 1 outside the loss, exactly 1 where the
    sampler's log-prob equals the trainer's, and never a gradient."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -2.5, -0.1, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = algo.tis_weights(old, sampler, mask, 2.0)
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(0.5), math.exp(-0.4), 1.0]])) and not w.requires_grad
    assert algo.tis_weights(old, sampler, mask, 1.5)[0, 1] == 1.5  # capped
    assert torch.equal(algo.tis_weights(old, old.detach(), mask, 3.0), torch.ones(1, 4))


@each
def test_tis_cap_scales_each_tokens_loss_by_its_weight(algo, tiny_model, world_of_one):
    """docs/algorithms.md (6.12), through update_policy (μ 2, β 0): with the sampler's log-probs ℓold − log 2 on every
    token, --tis-cap 3 doubles every optimizer step's loss and gradient and --tis-cap 1.5 multiplies them by 1.5; with
    the sampler's log-probs equal to ℓold they are those of --tis-cap 0, bit for bit."""
    args = make_args(algo, micro_batch_size=2, num_iterations=2, beta=0.0, max_completion_length=8,
                     adaptive_beta=False, adaptive_epsilon=False)
    runs = {}
    for cap, shift in ((0.0, 0.0), (3.0, math.log(2)), (1.5, math.log(2)), (3.0, 0.0)):
        args.tis_cap = cap
        engine = PlainEngine(logprob_model(algo, tiny_model))  # its step leaves the weights as they are
        rollout = rollout_of(algo, [3, 5, 2, 4])
        plan = plan_of(algo, rollout, args, 0)
        algo.rollout_logprobs(engine, None, rollout, first_pass(plan), args, "cpu")
        rollout.sampler_logp = (rollout.old_logp - shift) * rollout.loss_mask
        metrics = algo.Metrics()
        update_policy(algo, engine, rollout, plan, args, metrics)
        runs[cap, shift] = torch.tensor(engine.grad_norms), metrics["policy_loss"][0]
        if shift:
            assert metrics["mismatch/abs_diff_mean"][0] / metrics["mismatch/abs_diff_mean"][1] == pytest.approx(shift)
    (norms, loss), (norms2, loss2), (norms15, loss15), (norms1, loss1) = runs.values()
    assert len(norms) == 2 and norms.min() > 0
    assert torch.allclose(norms2, 2 * norms, rtol=1e-5) and loss2 == pytest.approx(2 * loss, rel=1e-5)
    assert torch.allclose(norms15, 1.5 * norms, rtol=1e-5) and loss15 == pytest.approx(1.5 * loss, rel=1e-5)
    assert torch.equal(norms1, norms) and loss1 == loss


@each
def test_a_model_whose_logits_are_more_than_its_output_layer_is_refused(algo, tiny_model):
    """docs/algorithms.md (6.3): a final soft-cap (Gemma 2), a logit scale (Cohere) or a bias on the output layer would
    be left out of the chunked fp32 log-probs: such a model is refused, with the reason, before any step."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)
    biased = AutoModelForCausalLM.from_pretrained(tiny_model)
    biased.lm_head = torch.nn.Linear(128, biased.config.vocab_size, bias=True)
    for model in (AutoModelForCausalLM.from_config(Gemma2Config(**small, final_logit_softcapping=30.0)),
                  AutoModelForCausalLM.from_config(CohereConfig(**small, logit_scale=0.125)), biased):
        with pytest.raises(SystemExit, match="logits are more than its output layer"):
            algo.use_logprob_forward(model)
    algo.use_logprob_forward(AutoModelForCausalLM.from_config(Gemma2Config(**small, final_logit_softcapping=None)))


@each
def test_bf16_logprobs_from_an_fp32_output_layer_are_closer_to_fp32(algo, tiny_model):
    """docs/algorithms.md (6.3): a bf16 model's log-probs against the same weights' in fp32. Before, the output layer
    gave bf16 logits (one near 16 rounded to a multiple of 1/16) and only the log-softmax ran in fp32; now the output
    layer runs in fp32 on the bf16 final hidden states, so only the decoder's bf16 error is left (in this random tiny
    model, of the same order). An untied output layer of std 1: logits of std ~ 11, a trained model's range."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    bf16 = model.to(torch.bfloat16)
    model = copy.deepcopy(bf16).float()  # the same weights, every operation in fp32
    rollout = rollout_of(algo, [40, 25, 33, 12])
    batch = rollout.micro_batch([0, 1, 2, 3], "cpu")
    ids, T, m = batch["completion_ids"], batch["completion_ids"].shape[1], batch["loss_mask"].bool()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = bf16(**inputs, logits_to_keep=T + 1).logits[:, :-1]  # [B, T, V] in bf16: the code before
        before = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        algo.use_logprob_forward(model)
        algo.use_logprob_forward(bf16)
        exact, _ = algo.completion_logprobs(model, batch, 0.7)
        after, _ = algo.completion_logprobs(bf16, batch, 0.7)
    assert logits.float().std() > 8
    err_before, err_after = ((x - exact)[m].abs().mean().item() for x in (before, after))
    print(f"{algo.__name__}: mean |ℓ − ℓfp32| bf16 logits {err_before:.3e}, fp32 output layer {err_after:.3e}")
    assert err_after < 0.85 * err_before
