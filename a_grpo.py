"""A-GRPO (Siameh et al., "Adaptive Group Relative Policy Optimization"), OUR RECONSTRUCTION, in one file.

The authors published a README only: no code, no equations, and tables that contradict each other. It names a
symmetric KL penalty, an adaptive β_t driven by a moving average of the KL, an adaptive clip ε_t, an entropy bonus η
and "weighted & global" advantage normalisation. Every formula here is our reading of those words, docs/algorithms.md
§4 (and §6 for every implementation choice), and each piece is a flag; with all of them off (--adv-mix-lambda 1
--kl-type k3 --entropy-coef 0 --no-adaptive-beta --no-adaptive-epsilon) this script computes exactly grpo.py's loss.
What changes from grpo.py: advantage λ·A_group + (1−λ)·A_global (4.1); symmetric KL ½·Δ·(e^Δ − 1) (4.2); entropy
bonus η·H with gradient (4.3); β_t and ε_t moved after every optimizer step from the KL over all ranks (4.5), (4.6);
the defaults of the README's run; μ = 2.

    python a_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct             # the README's run (GSM8K)
    deepspeed --num_gpus 8 a_grpo.py --model Qwen/Qwen2.5-7B        # one node
    deepspeed --hostfile hosts a_grpo.py --model Qwen/Qwen2.5-7B    # many nodes (shared filesystem)
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the colocated engine lives in this process
os.environ.setdefault("VLLM_FLOAT32_MATMUL_PRECISION", "high")  # vLLM sets it for the process: TF32 matmuls (6.3)

import contextlib
import functools
import gc
import json
import logging
import math
import random
import re
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import tyro
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.linear import zero3_linear_wrap
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed
from transformers.integrations import HfDeepSpeedConfig

import rewards

warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (first part of the run name)"""
    seed: int = 1
    """seed of the experiment: data order, sampling and initialisation"""
    track: bool = False
    """log to Weights & Biases (WANDB_ENTITY sets the team; WANDB_MODE=offline logs without network)"""
    wandb_project_name: str = "grpo"
    """the wandb project"""
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/<run_name>/ (args.json, metrics.jsonl, checkpoint-<step>/)"""
    save_steps: int = 100
    """save a checkpoint every this many steps (and always at the end); 0: only at the end"""
    resume: Optional[str] = None
    """a checkpoint directory, or a run directory (its latest complete checkpoint) to continue from"""
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """hub id or local directory of the policy (and of the reference model)"""
    dataset: str = "gsm8k"
    """preset (gsm8k, math), a local .jsonl/.json/.parquet file, or a hub data set name (its train split)"""
    question_field: Optional[str] = None
    """column of the question (default: the preset's, else the first of question/problem/input/prompt/query)"""
    answer_field: Optional[str] = None
    """column of the gold answer (default: the preset's, else the first of answer/solution/final_answer/...)"""
    prompt_suffix: str = " Please reason step by step, and put your final answer within \\boxed{}."
    """appended to every question; it asks for the answer format the correctness reward reads"""
    max_prompt_length: int = 256
    """prompts longer than this many tokens are skipped (and counted)"""
    max_completion_length: int = 1024
    """most tokens generated per completion"""
    num_generations: int = 8
    """G, completions sampled per prompt (the group)"""
    prompts_per_step: int = 16
    """prompts per step over all ranks; each step trains on prompts_per_step × G completions"""
    micro_batch_size: int = 8
    """completions per forward/backward pass per rank (gradients are accumulated over them)"""
    num_iterations: int = 2
    """μ, passes over each generated batch (with μ = 1 and one mini-batch, the clip and ε_t change nothing)"""
    num_mini_batches: int = 1
    """optimizer steps per pass over the batch"""
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    learning_rate: float = 5e-7
    """peak learning rate of AdamW"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """learning-rate shape after the linear warm-up (cosine and linear decay to MIN_LR_RATIO × lr)"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent in linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    skip_no_signal: bool = True
    """[ours] no optimizer step when no completion in it has a non-zero advantage (docs/algorithms.md (6.9))"""
    tis_cap: float = 0.0
    """[ours] C: each token's loss × min(π_old / π_vLLM, C), truncated importance sampling (6.12); 0: off"""
    total_steps: int = 450
    """training steps (one step = generate, score, μ × mini-batches optimizer steps)"""
    max_generated_tokens: int = 0
    """stop once this many tokens have been generated in total (all ranks); 0: no budget (6.6)"""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage of the policy (the reference is ZeRO-3 when this is 3)"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward (less memory, ~30% more time); auto: on with CUDA"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory the colocated vLLM engine may take (weights + KV cache)"""

    # Algorithm specific arguments: the A-GRPO objective (docs/algorithms.md §4; our reconstruction, each piece a flag)
    beta: float = 0.001
    """β_0, initial weight of the KL to the reference; 0 skips loading the reference model"""
    epsilon: float = 0.2
    """ε_low, lower clip of the ratio, and ε_0 of the ε_t controller"""
    epsilon_high: Optional[float] = None
    """ε_high, upper clip of the ratio (default: ε_low)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """grpo: sequence mean, then batch mean; dapo: token mean over the optimizer step; dr_grpo: (1.4)"""
    scale_rewards: Literal["group", "none"] = "group"
    """group: divide the advantage by the group std (GRPO); none: no division (Dr. GRPO)"""
    reward_funcs: list[str] = field(default_factory=lambda: ["correctness"])
    """reward functions by name in rewards.py (or any importable module:function)"""
    reward_weights: Optional[list[float]] = None
    """weight of each reward function (default: 1 each)"""
    adv_mix_lambda: float = 0.5
    """λ: advantage λ·A_group + (1 − λ)·A_global, A_global the z-score over the step's whole batch (4.1); 1: GRPO"""
    kl_type: Literal["symmetric", "k3"] = "symmetric"
    """symmetric: ½·Δ·(e^Δ − 1), half the Jeffreys divergence (4.2); k3: GRPO's estimator of KL(πθ‖πref)"""
    kl_clamp: float = 10.0
    """Δ = ℓref − ℓθ is clamped to ±this in the symmetric KL"""
    entropy_coef: float = 1e-3
    """η, weight of the entropy bonus η·H, H the full-vocabulary entropy of πθ, with gradient (4.3); 0: none"""
    adaptive_beta: bool = True
    """move β_t after every optimizer step towards --kl-target (4.5); --no-adaptive-beta keeps β constant"""
    adaptive_epsilon: bool = True
    """ε_t = clip(ε_0·sqrt(KL_target / m), min, max) after every optimizer step (4.6); off: --epsilon, --epsilon-high"""
    kl_target: float = 0.01
    """KL_target of both controllers, nats per token"""
    kl_ema_rate: float = 0.1
    """m ← (1 − rate)·m + rate·KL̄, the KL average that drives both controllers (m starts at the first KL̄)"""
    beta_rate: float = 0.05
    """β ← β·(1 + rate·e), e = clip(m/KL_target − 1, ±--beta-error-clip)"""
    beta_error_clip: float = 0.2
    """bound of the relative KL error e of the β controller"""
    beta_min: float = 1e-4
    """lower bound of β_t"""
    beta_max: float = 1.0
    """upper bound of β_t"""
    epsilon_min: float = 0.1
    """lower bound of ε_t"""
    epsilon_max: float = 0.5
    """upper bound of ε_t"""


LOGPROB_CHUNK = 256  # positions whose fp32 log-softmax exists at once (6.3)
SYNC_BUCKET_BYTES = 2**30  # weights handed to vLLM per gathered bucket (6.10)
MIN_LR_RATIO = 0.0  # where the cosine and linear schedules end, as a fraction of the peak learning rate


# ---- ALGO LOGIC: the maths (pure functions, imported by the tests) ---------------------------------------------------
def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """docs/algorithms.md (1.1) and (1.6): the group z-score (sample std); NaN rewards get advantage 0."""
    r = rewards.view(-1, num_generations)  # [prompts, G]
    valid = ~torch.isnan(r)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, r, torch.zeros_like(r))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(valid, r - mean, torch.zeros_like(r)) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    adv = r - mean
    if scale == "group":
        adv = adv / (var.sqrt() + 1e-4)
    return torch.where(valid, adv, torch.zeros_like(adv)).view(-1)


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """docs/algorithms.md (1.3): exp(Δ) − Δ − 1 per token, Δ = ℓref − ℓθ."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def symmetric_kl(ref_logp: torch.Tensor, logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """docs/algorithms.md (4.2): ½·Δ·(e^Δ − 1) per token, Δ = clamp(ℓref − ℓθ, ±clamp): on samples from πθ an
    unbiased estimate of half the Jeffreys divergence, ≥ 0, ≈ Δ²/2 near 0 (like k3)."""
    delta = torch.clamp(ref_logp - logp, -clamp, clamp)
    return 0.5 * delta * torch.expm1(delta)


def mixed_advantages(rewards: torch.Tensor, num_generations: int, lam: float, batch_mean: float, batch_std: float,
                     scale: str = "group") -> torch.Tensor:
    """docs/algorithms.md (4.1): λ·A_group + (1 − λ)·A_global, A_global = (r − mean)/(std + 1e-4) over the step's
    whole batch on every rank (batch_mean, batch_std); unscorable completions (NaN) get 0."""
    glob = torch.where(rewards.isnan(), 0.0, (rewards - batch_mean) / (batch_std + 1e-4))
    return lam * group_advantages(rewards, num_generations, scale) + (1 - lam) * glob


def kl_controllers(control: dict, kl_bar: float, args: Args) -> None:
    """docs/algorithms.md (4.5), (4.6): after an optimizer step, from its mean per-token KL over every rank,
    the KL average m, β_t and ε_t, in place (the same on every rank)."""
    rate = args.kl_ema_rate
    m = kl_bar if control["kl_ema"] is None else (1 - rate) * control["kl_ema"] + rate * kl_bar
    control["kl_ema"] = m
    if args.adaptive_beta:
        e = min(max(m / args.kl_target - 1, -args.beta_error_clip), args.beta_error_clip)
        control["beta"] = min(max(control["beta"] * (1 + args.beta_rate * e), args.beta_min), args.beta_max)
    if args.adaptive_epsilon:
        eps = args.epsilon * math.sqrt(args.kl_target / max(m, 1e-8))
        control["epsilon"] = min(max(eps, args.epsilon_min), args.epsilon_max)


def initial_control(args: Args) -> dict:
    """The controllers' state before the first optimizer step: β_0, ε_0, and no KL average yet."""
    return {"beta": args.beta, "epsilon": args.epsilon, "kl_ema": None}


def grpo_token_loss(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp=None, beta=0.0, entropy=None,
                    entropy_coef=0.0, kl_type="symmetric", kl_clamp=10.0):
    """docs/algorithms.md (4.4): per-token loss −(min(ρA, clip(ρ)A) − β_t·D + η·H), D the symmetric KL (4.2) or k3
    (1.3), H the entropy [B, T] (with gradient) when η > 0; the loss, KL, and low/high clip masks, each [B, T]."""
    m = mask.bool()
    ratio = torch.exp(torch.where(m, logp - old_logp, 0.0))  # [B, T]; (6.2): no exp of padding
    adv = advantages.unsqueeze(-1)  # [B, 1]
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta > 0:
        ref = torch.where(m, ref_logp, logp.detach())  # [B, T]
        kl = symmetric_kl(ref, logp, kl_clamp) if kl_type == "symmetric" else k3_kl(ref, logp)  # [B, T], 0 off mask
        loss = loss + beta * kl
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy  # [B, T]
    clipped_low = (ratio < 1 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, kl, clipped_low, clipped_high


def token_weights(mask: torch.Tensor, loss_type: str, num_seqs: int, num_tokens: int, max_len: int) -> torch.Tensor:
    """docs/algorithms.md (1.4): each token's weight [B, T]; the normalisers count the whole optimizer step."""
    mask = mask.float()
    if loss_type == "grpo":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    if loss_type == "dapo":
        return mask / max(num_tokens, 1)
    return mask / (num_seqs * max_len)  # dr_grpo


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float, step: int) -> float:
    """The learning rate's factor at optimizer step `step`: linear warm-up, then constant, cosine or linear decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 if schedule == "constant" else min_ratio + (1 - min_ratio) * (1 - progress)


def tis_weights(old_logp, sampler_logp, mask, cap: float) -> torch.Tensor:
    """docs/algorithms.md (6.12): min(exp(ℓold − ℓsampler), C) per token [B, T], 1 outside the mask."""
    return torch.exp(torch.where(mask.bool(), old_logp - sampler_logp, 0.0)).clamp(max=cap).detach()


class OutputLogprobs(torch.autograd.Function):
    """(6.3): ℓ of ids [B, T] and their entropy (with grad, (4.3)) from W [V, H] and hidden states [B, T, H], fp32."""

    @staticmethod
    def forward(ctx, weight, hidden, ids, temperature: float, with_entropy: bool):
        ctx.save_for_backward(weight, hidden, ids)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an entropy outside the loss: no gradient, and no work for it
        w = weight.float()  # [V, H]; a copy only when the weights are bf16
        logps, entropies = [], []
        for s in range(0, ids.shape[1], LOGPROB_CHUNK):
            x = (hidden[:, s : s + LOGPROB_CHUNK].float() @ w.T).div_(temperature)  # [B, c, V]
            lse = torch.logsumexp(x, dim=-1)  # [B, c]
            logps.append(x.gather(-1, ids[:, s : s + LOGPROB_CHUNK, None]).squeeze(-1) - lse)  # [B, c]
            if with_entropy:
                entropies.append(lse - (torch.softmax(x, dim=-1) * x).sum(-1))  # [B, c]
        return torch.cat(logps, 1), (torch.cat(entropies, 1) if with_entropy else None)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        weight, hidden, ids = ctx.saved_tensors  # ZeRO-3 has the weight gathered for this backward (6.3)
        w = weight.float()  # [V, H]
        grad_weight, grad_hidden = torch.zeros_like(w), torch.empty_like(hidden)
        for s in range(0, ids.shape[1], LOGPROB_CHUNK):
            h = hidden[:, s : s + LOGPROB_CHUNK].float()  # [B, c, H]
            g = grad_logp[:, s : s + LOGPROB_CHUNK, None]  # [B, c, 1]
            logits = (h @ w.T).div_(ctx.temperature)  # [B, c, V]
            p = torch.softmax(logits, dim=-1)  # [B, c, V]
            x = p * -g  # ∂ℓ/∂x = onehot − p
            if grad_entropy is not None:  # ∂H/∂x = −p (log p + H)
                logp_all = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, c, V]
                entropy = -(p * logp_all).sum(-1, keepdim=True)  # [B, c, 1]
                x -= grad_entropy[:, s : s + LOGPROB_CHUNK, None] * p * (logp_all + entropy)
            x.scatter_add_(-1, ids[:, s : s + LOGPROB_CHUNK, None], g).div_(ctx.temperature)  # ∂L/∂logits
            grad_weight.addmm_(x.flatten(0, 1).T, h.flatten(0, 1))  # [V, H], summed over the chunks in fp32
            grad_hidden[:, s : s + LOGPROB_CHUNK] = x @ w
        return grad_weight.to(weight.dtype), grad_hidden, None, None, None


def use_logprob_forward(model) -> None:
    """(6.3): `model`'s forward becomes its decoder, then OutputLogprobs through its output layer (so ZeRO-3 gathers the
    weight once each way); a model whose logits are more than that (a soft-cap, a scale, a bias) is refused."""
    head, seen = model.get_output_embeddings(), []
    with torch.no_grad(), model.get_decoder().register_forward_hook(lambda module, inputs, out: seen.append(out[0])):
        logits = model(input_ids=torch.tensor([[1, 2, 3]], device=head.weight.device), use_cache=False).logits
        if getattr(head, "bias", None) is not None or not torch.equal(head(seen[0]).to(logits.dtype), logits):
            raise SystemExit(f"--model: a {type(model).__name__}'s logits are more than its output layer of the final "
                             "hidden states (a soft-cap, a scale, a bias): unsupported, docs/algorithms.md (6.3)")

    def forward(completion_ids, temperature, with_entropy, **inputs):  # inputs: input_ids, attention and position ids
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [B, P + T, H]
        return head(hidden[:, -completion_ids.shape[1] - 1 : -1], completion_ids, temperature, with_entropy)

    head.forward = functools.partial(OutputLogprobs.apply, head.weight)
    model.forward = forward


def completion_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Log-probs [B, T] of collate's completions (and their entropy), from a model set up by use_logprob_forward."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "completion_ids")}
    return model(**inputs, temperature=temperature, with_entropy=with_entropy)


# ---- Data ------------------------------------------------------------------------------------------------------------
DATASET_PRESETS = {
    "gsm8k": dict(path="openai/gsm8k", name="main", question="question", answer="answer"),
    "math": dict(path="DigitalLearningGmbH/MATH-lighteval", name=None, question="problem", answer="solution"),
}
QUESTION_FIELDS = ("question", "problem", "input", "prompt", "query")
ANSWER_FIELDS = ("answer", "solution", "final_answer", "target", "gold")


def load_rows(args: Args):
    """The training rows (a `datasets.Dataset`) and their question and answer columns."""
    import datasets

    preset = DATASET_PRESETS.get(args.dataset, {})
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(args.dataset)[1])
    if kind and not os.path.isfile(args.dataset):
        raise SystemExit(f"--dataset {args.dataset}: no such file")
    try:  # a preset, a local file, or a hub data set
        ds = datasets.load_dataset(preset.get("path") or kind or args.dataset, preset.get("name"),
                                   data_files=args.dataset if kind else None, split="train")
    except Exception as e:  # hub unreachable, unknown name, unreadable file
        raise SystemExit(f"--dataset {args.dataset}: cannot load it ({type(e).__name__}: {str(e)[:300]}).\n"
                         "Without a reachable hub, give a local .jsonl/.parquet file, e.g. data/gsm8k_sample.jsonl")
    cols = ds.column_names
    q = args.question_field or preset.get("question") or next((c for c in QUESTION_FIELDS if c in cols), None)
    a = args.answer_field or preset.get("answer") or next((c for c in ANSWER_FIELDS if c in cols), None)
    for flag, name, known in (("--question-field", q, QUESTION_FIELDS), ("--answer-field", a, ANSWER_FIELDS)):
        if name not in cols:
            missing = f"no column {name!r}" if name else f"none of the columns {'/'.join(known)}"
            raise SystemExit(f"--dataset {args.dataset}: {missing}; its columns are {cols}: name one with {flag}")
    return ds, q, a


def build_prompt(tokenizer, question: str, suffix: str) -> str:
    """The prompt of every script and of eval.py: the chat template if the tokenizer has one, else plain."""
    text = question.strip() + suffix
    if not getattr(tokenizer, "chat_template", None):
        return f"Question: {text}\nAnswer:"
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def prepare_prompts(ds, q_field: str, a_field: str, tokenizer, args: Args):
    """Tokenised prompts with their gold answers; rows without a question or gold, and over-long prompts, skipped."""
    rows = [(r[q_field], r[a_field]) for r in ds]
    texts = [build_prompt(tokenizer, str(q), args.prompt_suffix) if q else "" for q, _ in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples, n_missing, n_long = [], 0, 0
    for (_, gold), text, prompt_ids in zip(rows, texts, ids):
        if not text or rewards.extract_gold(gold) is None:
            n_missing += 1
        elif len(prompt_ids) > args.max_prompt_length:
            n_long += 1
        else:
            examples.append({"prompt": text, "prompt_ids": prompt_ids, "answer": gold})
    return examples, n_missing, n_long


def prompt_indices(start: int, count: int, num_examples: int, seed: int) -> list[int]:
    """Example indices at data positions [start, start + count): a permutation per (seed, epoch), so resume is exact."""
    positions = range(start, start + count)
    epochs = {p // num_examples for p in positions}
    perms = {epoch: np.random.default_rng([seed, epoch]).permutation(num_examples) for epoch in epochs}
    return [int(perms[p // num_examples][p % num_examples]) for p in positions]


def score(reward_funcs: list, names: list, examples: list, completions: list, completion_ids: list, G: int):
    """[F, n] float64 rewards, a row per reward function; NaN where it cannot score (returns None)."""
    columns = dict(prompts=[e["prompt"] for e in examples for _ in range(G)], completions=completions,
                   answer=[e["answer"] for e in examples for _ in range(G)], completion_ids=completion_ids,
                   num_generations=G)
    values = [rewards.checked(name, fn(**columns), len(completions)) for name, fn in zip(names, reward_funcs)]
    return torch.tensor(values, dtype=torch.float64)


# ---- Generation and weight sync --------------------------------------------------------------------------------------
STREAMS = ("generate", "shuffle")  # what draws random numbers; each use has streams of its own (6.5)


def stream_seed(seed: int, use: str, round_id: int, rank: int) -> int:
    """(6.5): a 64-bit seed per (seed, use, round, rank), hashed: distinct keys give unrelated random streams."""
    return int(np.random.SeedSequence([seed, STREAMS.index(use), round_id, rank]).generate_state(1, np.uint64)[0])


def sample_and_score(llm, tokenizer, reward_funcs: list, examples: list, temperatures: list, seed: int,
                     args: Args, stop_ids: list):
    """G completions per example in one engine call, each example at its own temperature: (token ids, hit the length
    limit, vLLM's ℓ of each) triples, their text, the rewards [F, n] (NaN: cannot score), the seconds generating."""
    from vllm import SamplingParams

    t0 = time.perf_counter()
    params = [SamplingParams(n=args.num_generations, temperature=t, top_p=args.top_p, logprobs=0, flat_logprobs=True,
                             max_tokens=args.max_completion_length, stop_token_ids=stop_ids) for t in temperatures]
    torch.manual_seed(seed)  # (6.5): no request has a seed; vLLM draws every row's noise (V1 runner) or seed
    np.random.seed([seed % 2**32, seed >> 32])  # (V2 runner, GPUs) from these generators, seeded per call
    outs = llm.generate([{"prompt_token_ids": e["prompt_ids"]} for e in examples], params, use_tqdm=False)
    generated = [(list(o.token_ids), o.finish_reason == "length", o.logprobs.logprobs)  # (6.12): one ℓ per token
                 for out in outs for o in out.outputs]
    seconds = time.perf_counter() - t0
    completion_ids = [c for c, *_ in generated]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    values = score(reward_funcs, args.reward_funcs, examples, completions, completion_ids, args.num_generations)
    return generated, completions, values, seconds


def sync_weights_to_vllm(model: torch.nn.Module, llm) -> None:
    """The policy's weights to vLLM from the ZeRO-3 shards, a bucket of whole decoder layers at a time (6.10)."""
    buckets, current, size, last_layer = [], [], 0, None
    for name, p in model.named_parameters():
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()  # an ungathered ZeRO-3 parameter has numel 0
        layer = re.sub(r"^((.*?\.)?(layers|h|blocks)\.\d+)\..*", r"\1", name)  # "model.layers.3" for its weights
        if current and size + nbytes > SYNC_BUCKET_BYTES and layer != last_layer:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size, last_layer = size + nbytes, layer
    buckets.append(current)

    def weights():
        for bucket in buckets:
            with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
                yield from ((name, p.data) for name, p in bucket)

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})  # one call: vLLM finalises once
    llm.collective_rpc(repack_tied_lm_head)
    llm.reset_prefix_cache()


def stop_token_ids(model: str, tokenizer) -> list[int]:
    """The tokenizer's and generation config's EOS, and the chat template's end of turn (`<|im_end|>`) (6.5)."""
    ids, marker, tail = {tokenizer.eos_token_id}, "MARKER_6b1f", ""
    with contextlib.suppress(Exception):  # no generation_config.json: the tokenizer's EOS is all there is
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    with contextlib.suppress(Exception):  # no chat template, or one that rejects this conversation: no end of turn
        turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        tail = tokenizer.apply_chat_template(turn, tokenize=False).split(marker)[-1].lstrip()
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids.update(set(tokenizer(tail, add_special_tokens=False)["input_ids"][:1]) & special)  # if special: the end of turn
    return sorted(i for i in ids if i is not None)


# ---- The update ------------------------------------------------------------------------------------------------------
def collate(prompt_ids: list, completion_ids: list, device) -> dict:
    """Left-padded prompts + right-padded completions [B, P + T] (padding: token 0), completions, their mask [B, T]."""
    p_len = max(len(p) for p in prompt_ids)
    c_len = max(max(len(c) for c in completion_ids), 1)
    input_ids = torch.zeros((len(prompt_ids), p_len + c_len), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, p_len - len(p) : p_len + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, p_len - len(p) : p_len + len(c)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                 completion_ids=input_ids[:, p_len:], completion_mask=attention[:, p_len:])
    return {k: v.to(device) for k, v in batch.items()} | {"tokens": int(attention.sum())}


@dataclass
class Rollout:
    """One rank's batch of a step: G consecutive completions per prompt, and what the loss needs."""

    prompt_ids: list  # n token-id lists, the prompt of each completion
    completion_ids: list  # n token-id lists
    advantages: torch.Tensor  # [n]
    loss_mask: torch.Tensor  # [n, T] 1 on the completion tokens in the loss; T = the longest completion
    old_logp: Optional[torch.Tensor] = None  # [n, T] ℓold when the policy moves within the step; 0 on padding
    ref_logp: Optional[torch.Tensor] = None  # [n, T] ℓref when β > 0; 0 on padding
    sampler_logp: Optional[torch.Tensor] = None  # [n, T] vLLM's ℓ of the tokens it sampled (6.12); 0 on padding

    def micro_batch(self, ix: list, device) -> dict:
        """Rows `ix` as model inputs, their rows of the [n, T] tensors cut to their longest completion; []: a filler."""
        rows = ix or [min(range(len(self.completion_ids)), key=lambda i: len(self.completion_ids[i]))]  # (6.13)
        batch = collate([self.prompt_ids[i] for i in rows], [self.completion_ids[i] for i in rows], device)
        width = batch["completion_ids"].shape[1]
        for k in ("loss_mask", "old_logp", "ref_logp", "sampler_logp"):  # [n, T] → [b, width]
            batch[k] = None if getattr(self, k) is None else getattr(self, k)[rows, :width].to(device)
        batch["loss_mask"] = batch["loss_mask"] * bool(ix)  # a filler's row adds nothing to the loss
        return batch | {"advantages": self.advantages[rows].to(device)}


def completion_mask(lengths: list) -> torch.Tensor:
    """[n, T] mask of the first lengths[i] positions of row i; T = the longest completion."""
    return (torch.arange(max(max(lengths), 1))[None, :] < torch.tensor(lengths)[:, None]).float()


def global_reward_stats(rewards: torch.Tensor, device) -> tuple[float, float]:
    """Mean and sample std of the step's scorable rewards over every rank (docs/algorithms.md (4.1))."""
    r = rewards[~rewards.isnan()]
    t = torch.tensor([r.sum().item(), (r**2).sum().item(), float(len(r))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total, squares, n = t.tolist()
    mean = total / max(n, 1)
    return mean, math.sqrt(max(squares - n * mean**2, 0.0) / max(n - 1, 1))


def update_plan(rollout: Rollout, args: Args, shuffle_generator: torch.Generator, device) -> list:
    """plan[pass] → optimizer steps: (micro-batches, sequences and tokens in the loss, skipped); (1.4), (6.1), (6.13)"""
    n, micro = len(rollout.completion_ids), args.micro_batch_size
    mini, shuffle = n // args.num_mini_batches, args.num_iterations * args.num_mini_batches > 1
    in_loss = rollout.loss_mask.any(1)  # [n]
    signal = in_loss & (rollout.advantages.abs() > 1e-6)  # [n]; (6.9): 1e-6 is float noise
    computed = (in_loss if args.beta > 0 or args.entropy_coef > 0 else signal).tolist()  # [n]; (6.13): KL, entropy
    orders = [torch.randperm(n, generator=shuffle_generator).tolist() if shuffle else list(range(n))
              for _ in range(args.num_iterations)]  # a pass's order
    steps = [order[s : s + mini] for order in orders for s in range(0, n, mini)]  # each optimizer step's rows
    totals = torch.tensor([[in_loss[r].sum(), rollout.loss_mask[r].sum(), signal[r].sum()] for r in steps],
                          dtype=torch.float64, device=device)  # [steps, 3]: sequences, tokens, rows with signal
    dist.all_reduce(totals)  # (1.4): the normalisers count every row of the optimizer step, on every rank
    rows = [sorted((i for i in r if computed[i]), key=lambda i: len(rollout.completion_ids[i])) for r in steps]
    widths = torch.tensor([-(-len(r) // micro) for r in rows], device=device)  # [steps]: micro-batches on this rank
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)  # (6.13): ZeRO-3 gathers collectively, so as many on every rank
    plan = []
    for r, (num_seqs, num_tokens, num_signal), width in zip(rows, totals.tolist(), widths.tolist()):
        skip = num_tokens == 0 or (num_signal == 0 and args.skip_no_signal)  # (6.9)
        micro_batches = [r[k * micro : (k + 1) * micro] for k in range(width if skip else max(width, 1))]
        plan.append(([] if skip and args.num_iterations == 1 else micro_batches, int(num_seqs), int(num_tokens), skip))
    return [plan[s : s + args.num_mini_batches] for s in range(0, len(plan), args.num_mini_batches)]


class Metrics(dict):
    """Per-step (sum, count) by name, averaged over ranks at the end of the step."""

    def add(self, name: str, value_sum, count=1.0) -> None:
        s, c = self.get(name, (0.0, 0.0))
        self[name] = (s + float(value_sum), c + float(count))

    def add_total(self, name: str, value) -> None:  # a quantity summed over ranks (e.g. tokens generated)
        s, _ = self.get(name, (0.0, 0.0))
        self[name] = (s + float(value), 1.0 / dist.get_world_size())  # the counts of all ranks add up to 1

    def reduce(self, device) -> dict:
        keys = sorted(self)
        t = torch.tensor([self[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(keys)}


@torch.no_grad()
def rollout_logprobs(engine, ref_engine, rollout: Rollout, micro_batches: list, args: Args, device) -> None:
    """Fill rollout.old_logp (when the policy moves in the step (6.1)) and ref_logp [n, T] on the first pass's rows."""
    moves = args.num_iterations * args.num_mini_batches > 1
    rollout.old_logp = torch.zeros_like(rollout.loss_mask, device=device) if moves else None  # [n, T]
    rollout.ref_logp = torch.zeros_like(rollout.loss_mask, device=device) if ref_engine is not None else None
    for ix in micro_batches:
        batch = rollout.micro_batch(ix, device)
        for model, out in ((engine, rollout.old_logp), (ref_engine, rollout.ref_logp)):
            if out is not None:
                logp, _ = completion_logprobs(model, batch, args.temperature)
                out[ix, : logp.shape[1]] = logp * batch["completion_mask"]  # [b, width] of [n, T]; a filler: none


def update_policy(engine, rollout: Rollout, plan: list, args: Args, metrics: Metrics, device, control: dict) -> None:
    """μ passes over this rank's rollout, each split into optimizer steps accumulated over micro-batches (1.4);
    β_t and ε_t move after every optimizer step (4.5), (4.6)."""
    world, gap_max = dist.get_world_size(), -1.0  # gap_max: (6.12), −1 until a token is measured
    for it, optimizer_steps in enumerate(plan):
        for micro_batches, num_seqs, num_tokens, skip in optimizer_steps:
            if skip:  # (6.9)
                continue
            loss_sum, kl_sum, kl_tokens = 0.0, 0.0, 0.0
            eps_low, eps_high = ((control["epsilon"],) * 2 if args.adaptive_epsilon  # ε_t of (4.6), or the flags
                                 else (args.epsilon, args.epsilon_high))
            for k, ix in enumerate(micro_batches):
                engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)  # (6.13): its last micro-batch
                batch = rollout.micro_batch(ix, device)
                mask = batch["loss_mask"]  # [b, t]
                positions = batch["input_ids"].numel()
                metrics.add("update/padding_fraction", positions - batch["tokens"], positions)
                metrics.add_total("update/rows", len(batch["advantages"]))  # summed over micro-batches, passes, ranks
                metrics.add_total("update/real_tokens", batch["tokens"])
                with_entropy = it == 0 or args.entropy_coef > 0
                logp, entropy = completion_logprobs(engine, batch, args.temperature, with_entropy=with_entropy)
                old = batch["old_logp"] if batch["old_logp"] is not None else logp.detach()
                # ALGO LOGIC: the per-token loss with this optimizer step's β_t and ε_t (docs/algorithms.md (4.4))
                tok_loss, kl, low, high = grpo_token_loss(logp, old, batch["advantages"], mask, eps_low, eps_high,
                                                          batch["ref_logp"], control["beta"], entropy,
                                                          args.entropy_coef, args.kl_type, args.kl_clamp)
                if args.tis_cap > 0:  # (6.12)
                    tok_loss = tok_loss * tis_weights(old, batch["sampler_logp"], mask, args.tis_cap)
                weights = token_weights(mask, args.loss_type, num_seqs, num_tokens, args.max_completion_length)
                loss = (tok_loss * weights).sum() * world  # DeepSpeed averages over ranks; we undo its 1/GAS
                engine.backward(loss, scale_wrt_gas=False)
                engine.step()
                loss_sum += loss.item() / world
                m = mask.bool()
                tokens = m.sum().item()
                if entropy is not None and it == 0:
                    metrics.add("entropy", entropy.detach()[m].sum(), tokens)
                if kl is not None:
                    kl_sum, kl_tokens = kl_sum + kl.detach()[m].sum().item(), kl_tokens + tokens
                    metrics.add("kl", kl.detach()[m].sum(), tokens)
                    with torch.no_grad():  # (4.2): D_sym = ½(forward + reverse), each ≥ 0 on samples from πθ
                        delta = torch.clamp(batch["ref_logp"] - logp, -args.kl_clamp, args.kl_clamp)[m]  # [tokens]
                        forward, reverse = torch.expm1(delta) - delta, delta * torch.exp(delta) - torch.expm1(delta)
                    for name, v in (("forward", forward), ("reverse", reverse), ("symmetric", (forward + reverse) / 2)):
                        metrics.add(f"kl/{name}", v.sum(), tokens)
                if it == 0:  # (6.12): the sampler's ℓ against the trainer's before any update
                    gap = (old - batch["sampler_logp"]).abs()[m]  # [tokens]
                    metrics.add("mismatch/abs_diff_mean", gap.sum(), tokens)
                    gap_max = max(gap_max, gap.max().item() if tokens else -1.0)
                    metrics.add("mismatch/ratio_outside_frac", (gap > math.log(2)).sum(), tokens)  # ∉ [1/2, 2]
                metrics.add("clip_ratio/low_mean", low[m].sum(), tokens)
                metrics.add("clip_ratio/high_mean", high[m].sum(), tokens)
            metrics.add("policy_loss", loss_sum, 1.0 / world)  # summed over ranks = this optimizer step's loss
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics.add("grad_norm", float(grad_norm), 1.0)
            if args.adaptive_beta or args.adaptive_epsilon:  # ALGO LOGIC: (4.5), (4.6), from the KL of every rank
                step_kl = torch.tensor([kl_sum, kl_tokens], dtype=torch.float64, device=device)
                dist.all_reduce(step_kl)
                kl_controllers(control, (step_kl[0] / step_kl[1].clamp(min=1)).item(), args)
    metrics.add("update/skipped_steps", sum(skip for steps in plan for *_, skip in steps), 1.0)  # the same on all ranks
    metrics.add("mismatch/abs_diff_max", max(gap_max, 0.0), float(gap_max >= 0))  # (6.12): averaged over ranks


def log_rollout(add, values, total: torch.Tensor, names: list, G: int, lengths: list, truncated: list) -> None:
    """The step's reward and completion metrics (docs/algorithms.md §7)."""
    for name, v in zip(names, values):
        add(f"rewards/{name}/mean", torch.nansum(v), (~v.isnan()).sum())
        add(f"rewards/{name}/unscorable", v.isnan().sum(), len(v))
    add("reward", torch.nansum(total), (~total.isnan()).sum())
    grouped = total.view(-1, G)  # [prompts, G]
    group_std = torch.stack([g[~g.isnan()].std() if (~g.isnan()).sum() > 1 else torch.zeros((), dtype=g.dtype)
                             for g in grouped])  # [prompts]
    add("reward_std", group_std.sum(), len(grouped))
    add("frac_reward_zero_std", (group_std < 1e-6).sum(), len(grouped))
    add("completions/mean_length", sum(lengths), len(lengths))
    add("completions/clipped_ratio", sum(truncated), len(truncated))


# ---- Checkpoints -----------------------------------------------------------------------------------------------------
def latest_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or a run directory's latest complete checkpoint."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    done = [d for d in (os.listdir(path) if os.path.isdir(path) else []) if d.split("-")[-1].isdigit()
            and d.startswith("checkpoint-") and os.path.isfile(os.path.join(path, d, "trainer_state.json"))]
    if not done:
        raise SystemExit(f"--resume {path}: no complete checkpoint there (a directory with trainer_state.json, "
                         "or a run directory holding checkpoint-<step>/)")
    return os.path.join(path, max(done, key=lambda d: int(d.split("-")[-1])))


def keep_metrics_until(path: str, step: int) -> None:
    """On --resume: drop the metrics.jsonl rows past the checkpoint's step, and a last line cut short by a kill."""
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


def save_checkpoint(engine, tokenizer, run_dir: str, step: int, state: dict, rank: int, rank_state: dict) -> str:
    """A Hugging Face directory plus what --resume needs, written under a temporary name and renamed once complete."""
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    partitioned = engine.zero_optimization_partition_weights()  # ZeRO-3: a consolidated copy on rank 0
    state_dict = engine._zero3_consolidated_16bit_state_dict() if partitioned else engine.module.state_dict()
    if rank == 0:
        engine.module.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    del state_dict
    engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**rank_state, "rng": rng}, os.path.join(tmp, f"rank_state_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # its presence marks "complete"
            json.dump(state, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


# ---- Set-up ----------------------------------------------------------------------------------------------------------
def validate(args: Args, world: int) -> None:
    """Bad flags fail here, before any model is loaded."""
    G, problems = args.num_generations, []
    local = args.prompts_per_step // world * G  # completions per rank and step
    if G < 2:
        problems.append(f"--num-generations {G}: a group needs at least 2 completions")
    if args.prompts_per_step < 1 or args.prompts_per_step % world:
        problems.append(f"--prompts-per-step {args.prompts_per_step} must be a positive multiple of the {world} ranks")
    elif args.num_mini_batches < 1 or local % args.num_mini_batches:
        problems.append(f"each rank's {local} completions do not split into --num-mini-batches {args.num_mini_batches}")
    elif args.micro_batch_size < 1 or (local // args.num_mini_batches) % args.micro_batch_size:
        problems.append(f"each rank's mini-batch of {local // args.num_mini_batches} completions is not a multiple "
                        f"of --micro-batch-size {args.micro_batch_size}")
    if not args.reward_funcs or len(args.reward_weights or args.reward_funcs) != len(args.reward_funcs):
        problems.append("--reward-funcs must be non-empty, with one --reward-weights value each")
    if not (0 < args.temperature and 0 < args.top_p <= 1):  # greedy decoding makes every advantage 0
        problems.append(f"--temperature {args.temperature} must be > 0 and --top-p {args.top_p} in (0, 1]")
    if not (0 <= args.epsilon < 1 and args.epsilon_high >= 0):
        problems.append("--epsilon must be in [0, 1) and --epsilon-high >= 0")
    if args.beta < 0 or args.learning_rate <= 0 or not 0 <= args.warmup_ratio < 1 or 0 != args.tis_cap < 1:
        problems.append("--beta must be >= 0, --learning-rate > 0, --warmup-ratio in [0, 1) and --tis-cap 0 or >= 1")
    if min(args.max_prompt_length, args.max_completion_length, args.total_steps, args.num_iterations) < 1:
        problems.append("--max-prompt-length, --max-completion-length, --total-steps and --num-iterations must be >= 1")
    if min(args.seed, args.save_steps, args.max_generated_tokens) < 0:
        problems.append("--seed, --save-steps and --max-generated-tokens must be >= 0")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        problems.append(f"--vllm-gpu-memory-utilization {args.vllm_gpu_memory_utilization} must be in (0, 1]")
    if (args.adaptive_beta or args.adaptive_epsilon) and args.beta == 0:
        problems.append("--beta 0 loads no reference model, so there is no KL for the β_t and ε_t controllers: "
                        "give --beta > 0, or --no-adaptive-beta --no-adaptive-epsilon")
    if not (0 <= args.adv_mix_lambda <= 1 and args.kl_target > 0 and 0 < args.kl_ema_rate <= 1 and args.kl_clamp > 0):
        problems.append("need --adv-mix-lambda in [0, 1], --kl-target > 0, --kl-ema-rate in (0, 1], --kl-clamp > 0")
    if not (0 < args.beta_min <= args.beta_max and 0 <= args.epsilon_min <= args.epsilon_max < 1):
        problems.append("need 0 < --beta-min <= --beta-max and 0 <= --epsilon-min <= --epsilon-max < 1")
    if problems:
        raise SystemExit("invalid arguments:\n  " + "\n  ".join(problems))


def load_tokenizer(args: Args):
    """The tokenizer, after checking that --model loads and holds a prompt and a completion."""
    try:
        config = AutoConfig.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as e:
        raise SystemExit(f"--model {args.model}: cannot load it ({type(e).__name__}). Give a hub id, or a local "
                         "directory with config, weights and tokenizer (tools/prepare_smollm2.sh builds one)") from None
    longest = args.max_prompt_length + args.max_completion_length
    positions = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_scaling", None) or {}  # transformers 5 fills it for every model: rope_type "default"
    kinds = {r.get("rope_type", r.get("type", "default")) for r in [rope, *rope.values()] if isinstance(r, dict)}
    if positions and longest > positions and kinds <= {"default"}:  # per layer type in Gemma 3: one dict each
        raise SystemExit(f"--max-prompt-length + --max-completion-length = {longest} tokens, more than the "
                         f"{positions} positions of --model {args.model}: lower one of the two")
    return tokenizer


def deepspeed_config(args: Args, on_gpu: bool, grad_accum: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": args.max_grad_norm,  # DeepSpeed clips to 1.0 when this is unset
        "zero_optimization": {
            "stage": args.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            "memory_efficient_linear": False,  # (6.8): DeepSpeed's switch replaces F.linear for vLLM too
        },
        "bf16": {"enabled": on_gpu},  # CPU kernels train in fp32
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if on_gpu and args.zero_stage > 0:  # bf16 weights; gradients accumulated and reduced in fp32
        config.update(data_types={"grad_accum_dtype": "fp32"}, communication_data_type="fp32")
    return config


def load_model(args: Args, dtype):
    """The model for DeepSpeed, ZeRO-3 hooks per decoder layer (6.8)."""
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    layers = set(getattr(model, "_no_split_modules", None) or [])
    classes = sorted({type(m) for m in model.modules() if type(m).__name__ in layers}, key=lambda c: c.__name__)
    if args.zero_stage == 3 and classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    return model


def setup_models(args: Args, ds_config: dict, dtype, total_updates: int):
    """The policy as a DeepSpeed engine (AdamW, schedule), and the frozen reference when β > 0 (1.5)."""
    if args.zero_stage == 3:
        _keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  weights are partitioned while loading
    policy = load_model(args, dtype)
    if args.zero_stage == 3 and args.gradient_checkpointing != "on":  # (6.8): the memory-efficient Linear, policy only
        for m in (m for m in policy.modules() if type(m) is torch.nn.Linear):
            m.forward = lambda x, m=m: zero3_linear_wrap(x, m.weight, m.bias)
    if args.gradient_checkpointing == "on":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = functools.partial(lr_multiplier, args.lr_schedule, int(args.warmup_ratio * total_updates), total_updates,
                                 MIN_LR_RATIO)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.train()
    use_logprob_forward(engine.module)
    if args.beta == 0:
        return engine, None
    ref_config = {k: ds_config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16")}
    ref_config["zero_optimization"] = {"stage": 3 if args.zero_stage == 3 else 0, "memory_efficient_linear": False}
    ref_engine, *_ = deepspeed.initialize(model=load_model(args, dtype), config=ref_config)
    ref_engine.eval()
    use_logprob_forward(ref_engine.module)
    return engine, ref_engine


def setup_vllm(args: Args, rank: int, dtype, on_gpu: bool):
    from vllm import LLM

    # expected at each weight sync: rotary has no weights, a tied lm_head gets the embedding's (CPU: repacked, 6.11)
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(lambda r: r.getMessage() not in (
        "RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights"))

    max_len = args.max_prompt_length + args.max_completion_length
    sequences = args.prompts_per_step // dist.get_world_size() * args.num_generations
    return LLM(model=args.model, seed=args.seed + rank, dtype=dtype, distributed_executor_backend="external_launcher",
               gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_model_len=max_len,
               enable_sleep_mode=on_gpu, generation_config="vllm",  # our sampling settings, not the model's
               logprobs_mode="processed_logprobs",  # (6.12): ℓ after temperature and top-p, as sampled
               **({} if on_gpu else cpu_vllm_kwargs(args.model, sequences, max_len)))


def start_run(args: Args, world: int, rank: int) -> tuple:
    """The run's state (fresh, or the checkpoint's for --resume), its directory with args.json, and wandb."""
    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    state = {"step": 0, "data_pos": 0, "tokens_generated": 0, "wandb_id": None, "world_size": world,
             "run_name": f"{args.exp_name}__{args.seed}__{int(time.time())}"}
    if resume_dir:
        with open(os.path.join(resume_dir, "trainer_state.json")) as f:
            state = json.load(f)
        if state["world_size"] != world:
            raise SystemExit(f"--resume {resume_dir}: saved with {state['world_size']} ranks, now {world}; "
                             "resume with the same number of ranks")
    obj = [state["run_name"]]
    dist.broadcast_object_list(obj, src=0)  # every rank uses rank 0's clock
    state["run_name"] = obj[0]
    run_dir = os.path.join(args.output_dir, state["run_name"])
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        if resume_dir:
            keep_metrics_until(os.path.join(run_dir, "metrics.jsonl"), state["step"])
    wandb_run = None
    if args.track and rank == 0:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project_name, name=state["run_name"], id=state.get("wandb_id"),
                               resume="allow", config=asdict(args))
        state["wandb_id"] = wandb_run.id  # saved in checkpoints: --resume continues the same wandb run
    return state, resume_dir, run_dir, wandb_run


def setup(args: Args, on_gpu: bool, log):
    """Everything before the first step: data, settled flags, run directory, models, vLLM, --resume."""
    world, rank = dist.get_world_size(), dist.get_rank()
    tokenizer = load_tokenizer(args)
    ds, q_field, a_field = load_rows(args)
    examples, n_missing, n_long = prepare_prompts(ds, q_field, a_field, tokenizer, args)
    if len(examples) < args.prompts_per_step:
        raise SystemExit(f"--dataset {args.dataset}: only {len(examples)} usable prompts ({n_missing} without question "
                         f"or gold, {n_long} longer than --max-prompt-length {args.max_prompt_length}), fewer than "
                         "--prompts-per-step")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # not installed, or a broken install
        raise SystemExit(f"vLLM is not importable ({type(e).__name__}: {e}): install it (README, setup)") from None
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "on" if on_gpu else "off"
    state, resume_dir, run_dir, wandb_run = start_run(args, world, rank)  # after every flag is settled
    log(f"run {state['run_name']}: {len(examples)} prompts ({n_missing} without question/gold, {n_long} over "
        f"{args.max_prompt_length} tokens skipped)")
    set_seed(args.seed)  # Python's, numpy's and torch's generators
    dtype = torch.bfloat16 if on_gpu else torch.float32  # CPU kernels train in fp32
    grad_accum = args.prompts_per_step // world * args.num_generations // args.num_mini_batches // args.micro_batch_size
    total_updates = args.total_steps * args.num_iterations * args.num_mini_batches
    engine, ref_engine = setup_models(args, deepspeed_config(args, on_gpu, grad_accum), dtype, total_updates)
    llm = setup_vllm(args, rank, dtype, on_gpu)  # it reseeds the RNGs: before --resume
    rank_state = {}
    if resume_dir:
        engine.load_checkpoint(os.path.join(resume_dir, "deepspeed"), tag="state")
        rank_state = torch.load(os.path.join(resume_dir, f"rank_state_{rank}.pt"), weights_only=False)
        random.setstate(rank_state["rng"]["python"])
        np.random.set_state(rank_state["rng"]["numpy"])
        torch.set_rng_state(rank_state["rng"]["torch"])
        log(f"resumed from {resume_dir} at step {state['step']}")
        sync_weights_to_vllm(engine.module, llm)  # vLLM loaded the initial weights from disk
    return tokenizer, examples, engine, ref_engine, llm, state, rank_state, run_dir, wandb_run


def init_distributed():
    """The process group (`python grpo.py`: a world of one), this rank's device, whether it is a GPU, and its log."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    on_gpu = get_accelerator().device_name() == "cuda"
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if on_gpu else "cpu")
    log = tqdm.write if dist.get_rank() == 0 else (lambda *a, **k: None)
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        unlink_shm_buffer()
    return device, on_gpu, log


# ---- CPU-only workarounds (vLLM's and DeepSpeed's CPU builds; none of this runs on GPU) ------------------------------
def unlink_shm_buffer() -> None:
    """DeepSpeed's /dev/shm all-reduce file, unlinked once every rank has mapped it (6.11)."""
    dist.barrier()
    env = os.environ
    shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
    if os.path.exists(shm):
        os.remove(shm)


def cpu_vllm_kwargs(model: str, sequences: int, length: int) -> dict:
    """vLLM's CPU engine: a KV cache sized for the step's sequences, not from free RAM; no chunked prefill (6.11)."""
    config = AutoConfig.from_pretrained(model).get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * heads * head_dim * 4 * sequences * length  # keys and values, fp32
    return dict(kv_cache_memory_bytes=max(2 * kv_bytes, 2**28), enable_chunked_prefill=False)


def repack_tied_lm_head(worker) -> None:
    """vLLM's CPU copy of a tied lm_head, packed at load time and left stale by `reload_weights`, rebuilt (6.11)."""
    head = getattr(worker.model_runner.model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear") and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


# ---- Main: the training loop -----------------------------------------------------------------------------------------
def main() -> None:
    args = tyro.cli(Args, args=[a for a in sys.argv[1:] if not a.startswith("--local_rank")])  # the launcher's
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    validate(args, world)
    reward_funcs = [rewards.get_reward_func(n) for n in args.reward_funcs]
    device, on_gpu, log = init_distributed()
    tokenizer, examples, engine, ref_engine, llm, state, rank_state, run_dir, wandb_run = setup(args, on_gpu, log)
    rank, G, local_prompts = dist.get_rank(), args.num_generations, args.prompts_per_step // world
    reward_weights = torch.tensor(args.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float64)
    stop_ids = stop_token_ids(args.model, tokenizer)
    control = rank_state.setdefault("control", initial_control(args))  # β_t, ε_t, m: saved in every checkpoint (4.5)
    progress = tqdm(range(state["step"], args.total_steps), initial=state["step"], total=args.total_steps,
                    disable=rank != 0)
    for step in progress:
        t_step = time.perf_counter()
        step_metrics = Metrics()
        add = step_metrics.add

        # 1. generation and rewards (docs/algorithms.md §5): this rank's prompts, G completions each
        round_id = state["data_pos"] // args.prompts_per_step
        idx = prompt_indices(state["data_pos"] + rank * local_prompts, local_prompts, len(examples), args.seed)
        state["data_pos"] += args.prompts_per_step
        batch_examples = [examples[i] for i in idx]
        generated, completions, values, time_generate = sample_and_score(  # values: [F, n]
            llm, tokenizer, reward_funcs, batch_examples, [args.temperature] * local_prompts,
            stream_seed(args.seed, "generate", round_id, rank), args, stop_ids)
        step_metrics.add_total("tokens/generated_step", sum(len(c) for c, *_ in generated))
        add("time/generate", time_generate)  # the mean over ranks, as every time/*
        if on_gpu:
            llm.sleep(level=2)  # frees vLLM's memory for the update; the weights are re-sent after it
        lengths = [len(c) for c, *_ in generated]

        # ALGO LOGIC: reward, advantages and the tokens in the loss (docs/algorithms.md (4.1))
        total = (reward_weights.unsqueeze(1) * values).sum(0)  # [n], NaN if any function cannot score
        batch_mean, batch_std = global_reward_stats(total, device)  # over every rank's completions
        advantages = mixed_advantages(total, G, args.adv_mix_lambda, batch_mean, batch_std, args.scale_rewards)  # [n]
        loss_mask = completion_mask(lengths)  # [n, T]: every completion token
        log_rollout(add, values, total, args.reward_funcs, G, lengths, [t for _, t, _ in generated])

        # 2. log-probs of the batch under the old policy and the reference (no grad)
        t0 = time.perf_counter()
        rollout = Rollout(prompt_ids=[e["prompt_ids"] for e in batch_examples for _ in range(G)],
                          completion_ids=[c for c, *_ in generated], advantages=advantages.float(),
                          loss_mask=loss_mask, sampler_logp=torch.zeros_like(loss_mask))
        rollout.sampler_logp[completion_mask(lengths).bool()] = torch.cat([torch.tensor(lp) for *_, lp in generated])
        shuffle_generator = torch.Generator().manual_seed(stream_seed(args.seed, "shuffle", step, rank))
        plan = update_plan(rollout, args, shuffle_generator, device)
        rollout_logprobs(engine, ref_engine, rollout, [ix for mini, *_ in plan[0] for ix in mini], args, device)
        add("time/logprobs", time.perf_counter() - t0)

        # 3. update: μ passes, each split into mini-batches; one optimizer step per mini-batch
        t0 = time.perf_counter()
        update_policy(engine, rollout, plan, args, step_metrics, device, control)
        add("time/update", time.perf_counter() - t0)
        for name, key in (("beta", "beta"), ("eps", "epsilon"), ("kl_ema", "kl_ema")):
            if control[key] is not None:
                add(f"agrpo/{name}", control[key], 1.0)  # the same on every rank

        # 4. weight sync: the new policy reaches vLLM before the next generation
        t0 = time.perf_counter()
        if on_gpu:
            gc.collect()  # the update's cached blocks go back to the GPU, or waking can run out of memory
            torch.cuda.empty_cache()
            llm.wake_up(tags=["weights"])
        sync_weights_to_vllm(engine.module, llm)
        if on_gpu:
            torch.cuda.empty_cache()  # the sync's gathered buckets go back before vLLM maps its KV cache
            llm.wake_up(tags=["kv_cache"])
        add("time/weight_sync", time.perf_counter() - t0)

        # 5. logging
        add("time/step", time.perf_counter() - t_step)
        metrics = step_metrics.reduce(device)
        if on_gpu:  # the largest rank's peak: the rank that runs out of memory first
            peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            metrics["memory/peak_gib"] = peak.item()
            torch.cuda.reset_peak_memory_stats()
        state["tokens_generated"] += int(round(metrics.pop("tokens/generated_step")))
        metrics.update(step=step + 1, lr=engine.get_lr()[0], **{"tokens/generated_total": state["tokens_generated"]})
        state["step"] = step + 1
        budget_spent = 0 < args.max_generated_tokens <= state["tokens_generated"]
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if wandb_run is not None:
                wandb_run.log(metrics, step=step + 1)
            log(f"[step {step + 1}] mean reward {metrics['reward']:.3f}; completion 0: {completions[0][-300:]!r}")
            if budget_spent:
                log(f"--max-generated-tokens {args.max_generated_tokens} reached after {step + 1} steps")

        # 6. checkpoint
        done = step + 1 == args.total_steps or budget_spent
        if (args.save_steps and (step + 1) % args.save_steps == 0) or done:
            log(f"saved {save_checkpoint(engine, tokenizer, run_dir, step + 1, state, rank, rank_state)}")
        if done:
            break

    if wandb_run is not None:
        wandb_run.finish()
    dist.barrier()


if __name__ == "__main__":
    main()
