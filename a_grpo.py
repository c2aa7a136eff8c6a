"""A-GRPO (Siameh et al., "Adaptive Group Relative Policy Optimization"), OUR RECONSTRUCTION, single file.

The authors published a README only: no code, no equations, and tables that contradict each other. It
names a symmetric KL penalty, an adaptive β_t driven by a moving average of the KL, an adaptive clip ε_t,
an entropy bonus η and "weighted & global" advantage normalisation. Every formula here is our reading
of those words, docs/algorithms.md §4, and each piece is a flag; with all of them off (--adv-mix-lambda 1
--kl-type k3 --entropy-coef 0 --no-adaptive-beta --no-adaptive-epsilon) this script computes exactly
grpo.py's loss. What changes from grpo.py: advantage λ·A_group + (1−λ)·A_global (4.1); symmetric KL
½·Δ·(e^Δ − 1) (4.2); entropy bonus η·H with gradient (4.3); β_t and ε_t moved after every optimizer step
from the KL over all ranks (4.5), (4.6); the defaults of the README's run; μ = 2.

    python a_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k        # the README's run
    deepspeed --num_gpus 8 a_grpo.py --model Qwen/Qwen2.5-7B                   # one node
"""

import os

# The colocated vLLM engine must live in this process, not in a subprocess of its own.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import gc
import json
import math
import random
import shutil
import socket
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
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor
from transformers.generation.logits_process import TopPLogitsWarper
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

import rewards

# DeepSpeed calls torch.distributed's old collective names on every step; the warning is noise here.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (first part of the run name)"""
    seed: int = 1
    """seed of the experiment: data order, sampling and initialisation"""
    track: bool = False
    """log to Weights & Biases (set WANDB_MODE=offline to log without network)"""
    wandb_project_name: str = "grpo"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    output_dir: str = "runs"
    """runs are written to OUTPUT_DIR/<run_name>/ (args.json, metrics.jsonl, checkpoint-<step>/)"""
    save_steps: int = 100
    """save a checkpoint every this many steps (and always at the end); 0 saves only at the end"""
    resume: Optional[str] = None
    """a checkpoint directory, or a run directory (its latest complete checkpoint) to continue from"""
    log_completions: int = 2
    """how many sample completions to print per step"""

    # model and data
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """hub id or local directory of the policy (and of the reference model)"""
    dataset: str = "gsm8k"
    """preset (gsm8k, math), a local .jsonl/.json/.parquet file, or a hub data set name"""
    dataset_split: str = "train"
    """the split to train on (hub data sets)"""
    question_field: Optional[str] = None
    """column of the question (default: the preset's, else the first of question/problem/input/prompt)"""
    answer_field: Optional[str] = None
    """column of the gold answer (default: the preset's, else the first of answer/solution/final_answer)"""
    prompt_template: Literal["chat", "plain"] = "chat"
    """chat: the tokenizer's chat template; plain: 'Question: ...\\nAnswer:' for base models"""
    system_prompt: Optional[str] = None
    """system message of the chat template (none by default)"""
    prompt_suffix: str = " Please reason step by step, and put your final answer within \\boxed{}."
    """appended to every question; it asks for the answer format the correctness reward reads"""
    max_prompt_length: int = 256
    """prompts longer than this many tokens are skipped or truncated (--long-prompts)"""
    long_prompts: Literal["skip", "truncate"] = "skip"
    """skip over-long prompts (counted) or keep their last max_prompt_length tokens"""
    max_completion_length: int = 1024
    """most tokens generated per completion"""

    # batch
    num_generations: int = 8
    """G, completions sampled per prompt (the group)"""
    prompts_per_step: int = 16
    """prompts per step over all ranks; each step trains on prompts_per_step × G completions"""
    micro_batch_size: int = 8
    """completions per forward/backward pass per rank (gradients are accumulated over them)"""
    num_iterations: int = 2
    """μ, passes over each generated batch; with μ = 1 and one mini-batch ρ ≡ 1, so the clip and the ε_t
    controller cannot change anything"""
    num_mini_batches: int = 1
    """optimizer steps per pass over the batch (ρ ≠ 1 and the clip only matter when μ > 1 or this > 1)"""

    # sampling
    temperature: float = 1.0
    """sampling temperature (log-probs are computed at the same temperature)"""
    top_p: float = 1.0
    """nucleus sampling threshold"""

    # optimisation
    learning_rate: float = 5e-7
    """peak learning rate of AdamW"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """learning-rate shape after warm-up (cosine and linear decay to min_lr_ratio × lr)"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent in linear warm-up"""
    min_lr_ratio: float = 0.0
    """final learning rate of the cosine/linear schedules, as a fraction of the peak"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    skip_no_signal: bool = True
    """[ours] make no optimizer step (nor a schedule step) when no completion in it has a non-zero advantage on any
    rank (docs/algorithms.md (6.9))"""
    total_steps: int = 450
    """training steps (one step = generate, score, μ × mini-batches optimizer steps)"""
    max_generated_tokens: int = 0
    """stop once this many tokens have been generated in total (every round, all ranks); 0: no budget"""

    # A-GRPO objective (docs/algorithms.md §4; every piece our reconstruction, each a flag)
    beta: float = 0.001
    """β_0, initial weight of the KL to the reference; 0 skips loading the reference model"""
    epsilon: float = 0.2
    """ε_low, lower clip of the ratio, and ε_0 of the ε_t controller (only binds when μ > 1 or mini-batches > 1)"""
    epsilon_high: Optional[float] = None
    """ε_high, upper clip of the ratio (default: ε_low; only binds when μ > 1 or mini-batches > 1)"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """grpo: sequence mean then batch mean; dapo: token mean over the whole optimizer step;
    dr_grpo: sum / (sequences × max length)"""
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
    """ε_t = clip(ε_0·sqrt(KL_target / m), min, max) after every optimizer step (4.6); with μ = 1 and one
    mini-batch it cannot change anything; --no-adaptive-epsilon keeps --epsilon / --epsilon-high"""
    kl_target: float = 0.01
    """KL_target of both controllers, nats per token"""
    kl_ema_rate: float = 0.1
    """m ← (1 − rate)·m + rate·KL̄, the moving average of the KL that drives both controllers (m starts at the
    first KL̄)"""
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

    # engines
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage of the policy (the reference is ZeRO-3 when this is 3)"""
    zero3_leaf_layers: bool = True
    """ZeRO-3 gathers, releases and hooks each decoder layer as one unit instead of each of its Linear and norm
    modules (the same gradients, far less host time per pass); --no-zero3-leaf-layers: per module"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass (less memory, about 30% more time); auto: on with CUDA"""
    logprob_chunk_size: int = 256
    """positions whose fp32 log-softmax is computed at once (and recomputed in the backward); 0: all"""
    padding_free: bool = True
    """pack each micro-batch's sequences into rows without padding (position ids restart per sequence, attention
    never crosses sequences); the same log-probs as padded rows; --no-padding-free pads"""
    share_prompts: bool = True
    """with --padding-free, the completions of a prompt in a micro-batch follow one copy of it and attend to it (sdpa
    over each prompt and each completion with its prompt), so the prompt is computed once instead of once per
    completion; the same log-probs and gradients; --no-share-prompts: a copy per completion"""
    micro_batch_by_tokens: bool = True
    """form the micro-batches of an optimizer step with balanced token counts instead of equal sequence counts
    (the loss does not depend on the split); --no-micro-batch-by-tokens: consecutive sequences"""
    use_vllm: bool = True
    """generate with a vLLM engine colocated in each rank (else transformers generate)"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory the colocated vLLM engine may take (weights + KV cache)"""
    vllm_sleep: Literal["auto", "on", "off"] = "auto"
    """free vLLM's memory during the update (sleep level 2); auto: on with CUDA (vLLM's CPU build has none)"""
    vllm_tensor_parallel_size: int = 1
    """ranks that share one vLLM engine (tensor parallel), for models that do not fit one GPU; divides ranks"""
    sync_check_steps: int = 0
    """every this many steps, after the weight sync, log how far vLLM's log-probs of a completion are from
    the trainer's (sync/logprob_max_abs_diff); 0 never"""
    sync_bucket_mb: int = 1024
    """weight sync: parameters are gathered from ZeRO-3 and handed to vLLM in buckets of about this size
    (a decoder layer is never split)"""
    local_rank: int = -1
    """set by the deepspeed launcher; do not set by hand"""

    # derived in main(), not options
    world_size: tyro.conf.Suppress[int] = 1
    """number of ranks"""


# ---------------------------------------------------------------------------------------------
# The maths (pure functions, imported by the tests)
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """docs/algorithms.md (1.1): A_i = (r_i − mean(r)) / (std(r) + 1e-4) per group (sample std).

    `scale="none"` gives r_i − mean(r) (Dr. GRPO). NaN rewards (unscorable completions) leave their
    group's statistics and get advantage 0 (1.6).
    """
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
    """docs/algorithms.md (1.3): k3 estimator of KL(πθ‖πref) per token: exp(Δ) − Δ − 1, Δ = ℓref − ℓθ."""
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
    m = kl_bar if control["kl_ema"] is None else (1 - args.kl_ema_rate) * control["kl_ema"] + args.kl_ema_rate * kl_bar
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
    """Per-token loss −(min(ρA, clip(ρ, 1−ε, 1+ε)A) − β_t·D + η·H) of docs/algorithms.md (4.4), D the symmetric
    KL (4.2) or k3 (1.3), H the entropy (with gradient) when η > 0.

    logp, old_logp, ref_logp, mask, entropy: [B, T]; advantages: [B]. Returns (loss, kl or None, clipped_low,
    clipped_high), each [B, T]; the clip masks follow TRL: the low clip binds when ρ < 1−ε_low with
    A < 0, the high clip when ρ > 1+ε_high with A > 0.
    """
    m = mask.bool()
    # (6.2): log-prob differences are zeroed outside the mask before any exp, so a padded position
    # (whose ℓθ can be below −88) can neither overflow nor turn the loss into 0·inf = NaN
    ratio = torch.exp(torch.where(m, logp - old_logp, 0.0))  # [B, T]
    adv = advantages.unsqueeze(-1)  # [B, 1]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    loss = -surrogate
    kl = None
    if beta > 0:
        ref = torch.where(m, ref_logp, logp.detach())
        kl = symmetric_kl(ref, logp, kl_clamp) if kl_type == "symmetric" else k3_kl(ref, logp)  # [B, T], 0 off mask
        loss = loss + beta * kl
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    clipped_low = (ratio < 1 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, kl, clipped_low, clipped_high


def token_weights(mask: torch.Tensor, loss_type: str, num_seqs: int, num_tokens: int, max_len: int) -> torch.Tensor:
    """Weight of each token's loss, [B, T], so that the sum over one optimizer step's micro-batches
    and ranks is the loss of docs/algorithms.md (1.4) (`mask`: one micro-batch's loss mask).

    num_seqs / num_tokens: sequences / tokens in the loss over the whole optimizer step, all ranks.
    """
    mask = mask.float()
    if loss_type == "grpo":  # mean over each sequence's tokens, then mean over sequences
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    if loss_type == "dapo":  # token mean over the whole step (micro-batches and ranks)
        return mask / max(num_tokens, 1)
    if loss_type == "dr_grpo":  # constant normaliser: sequences × max_completion_length
        return mask / (num_seqs * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def _chunk_logprobs(logits, ids, temperature: float, with_entropy: bool):
    """ℓ of `ids` [B, c] under fp32 logits [B, c, V] at `temperature`, and their entropy (with gradient: the
    entropy bonus (4.3) trains on it)."""
    x = logits.to(torch.float32, copy=True).div_(temperature)  # [B, c, V], the only fp32 copy
    lse = torch.logsumexp(x, dim=-1)  # [B, c]
    logp = x.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse  # [B, c]
    entropy = None
    if with_entropy:
        entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1)  # [B, c]
    return logp, entropy


def completion_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False, chunk_size: int = 256):
    """Log-probs of the completion tokens, [B, T], and optionally their full-vocabulary entropy.

    Only the completion positions' logits are computed (`logits_to_keep`). docs/algorithms.md (6.3):
    they are turned into fp32 log-softmax `chunk_size` positions at a time, and with gradients each
    chunk is recomputed in the backward pass rather than stored, so one chunk of fp32 logits exists
    at a time instead of several full copies (≈ 10 GiB at 4 × 1024 tokens × 152k vocabulary).
    """
    ids = batch["completion_ids"]  # [B, T]
    T = ids.shape[1]
    if "logit_index" in batch:  # packed rows (pack): only the positions that predict a completion token reach lm_head
        index = batch["logit_index"]  # [N]
        inner = getattr(model, "module", model)  # the DeepSpeed engine's model, or the model
        shared = {"shared_prompts": batch["shared_prompts"]} if "shared_prompts" in batch else {}
        if shared and inner.config._attn_implementation != SHARED_PROMPT_ATTENTION:  # sdpa would ignore the segments
            raise RuntimeError("shared-prompt rows need the model's attention set to shared_prompt_attention: "
                               "model.set_attn_implementation(SHARED_PROMPT_ATTENTION) (setup_models does)")
        keep = inner.get_output_embeddings().register_forward_pre_hook(
            lambda _, inputs: (inputs[0].flatten(0, 1)[index].unsqueeze(0),))
        try:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"], logits_to_keep=0, use_cache=False,
                           **shared).logits  # [1, N, V]: the N completion tokens, sequence by sequence
        finally:
            keep.remove()
        mask = batch["completion_mask"].bool()  # [B, T]
        flat = completion_logprobs_of(logits, ids[mask].unsqueeze(0), temperature, with_entropy, chunk_size)
        return tuple(None if x is None else torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(
            mask, x[0]) for x in flat)  # [B, T] each
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        logits_to_keep=T + 1, use_cache=False,
    ).logits[:, :-1]  # [B, T, V] in the model's dtype
    return completion_logprobs_of(logits, ids, temperature, with_entropy, chunk_size)


def completion_logprobs_of(logits, ids, temperature: float, with_entropy: bool, chunk_size: int):
    """Log-probs of `ids` [B, T] under the model's logits [B, T, V], fp32 log-softmax in chunks (6.3)."""
    T = ids.shape[1]
    step = chunk_size if chunk_size > 0 else T
    recompute = torch.is_grad_enabled() and logits.requires_grad and step < T
    logps, entropies = [], []
    for s in range(0, T, step):
        part = (logits[:, s : s + step], ids[:, s : s + step], temperature, with_entropy)
        logp, entropy = checkpoint(_chunk_logprobs, *part, use_reentrant=False) if recompute else _chunk_logprobs(*part)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps, 1), (torch.cat(entropies, 1) if with_entropy else None)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float):
    """Learning-rate multiplier per optimizer step: linear warm-up, then constant/cosine/linear."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


@dataclass
class Rollout:
    """One rank's batch of a step: G consecutive completions per prompt, and what the loss needs."""

    prompt_ids: list  # n token-id lists, the prompt of each completion
    completion_ids: list  # n token-id lists
    advantages: torch.Tensor  # [n]
    loss_mask: torch.Tensor  # [n, T] 1 on the completion tokens that enter the loss; T = longest completion
    pad_id: int
    old_logp: Optional[torch.Tensor] = None  # [n, T] ℓold, when the policy moves within the step; 0 on padding
    ref_logp: Optional[torch.Tensor] = None  # [n, T] ℓref, when β > 0; 0 on padding
    pack_rows: int = 0  # micro-batches as padding-free rows of at most this many tokens; 0: padded
    share_prompts: bool = False  # packed rows hold each prompt once, followed by its completions

    def micro_batch(self, ix: list, device) -> dict:
        """Rows `ix` as model inputs (collate, or pack into rows of at most pack_rows tokens), with their rows of the
        [n, T] tensors cut to their longest completion."""
        prompts, completions = [self.prompt_ids[i] for i in ix], [self.completion_ids[i] for i in ix]
        batch = collate(prompts, completions, self.pad_id, device) if not self.pack_rows else \
            pack(prompts, completions, self.pad_id, self.pack_rows, device, self.share_prompts)
        width = batch["completion_ids"].shape[1]
        cut = {"loss_mask": self.loss_mask, "old_logp": self.old_logp, "ref_logp": self.ref_logp}
        batch.update({k: None if v is None else v[ix, :width].to(device) for k, v in cut.items()})
        batch["advantages"] = self.advantages[ix].to(device)
        return batch


def global_reward_stats(rewards: torch.Tensor, device) -> tuple[float, float]:
    """Mean and sample std of the step's scorable rewards over every rank (docs/algorithms.md (4.1))."""
    r = rewards[~rewards.isnan()]
    t = torch.tensor([r.sum().item(), (r**2).sum().item(), float(len(r))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total, squares, n = t.tolist()
    mean = total / max(n, 1)
    return mean, math.sqrt(max(squares - n * mean**2, 0.0) / max(n - 1, 1))


def completion_mask(lengths: list) -> torch.Tensor:
    """[n, T] mask of the first lengths[i] positions of row i; T = the longest completion."""
    return (torch.arange(max(max(lengths), 1))[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

# Presets know where a data set lives and which fields hold the question and the gold answer;
# rewards.extract_gold reads the gold out of GSM8K's "#### 72" and MATH's "\boxed{...}" alike.
DATASET_PRESETS = {
    "gsm8k": dict(path="openai/gsm8k", name="main", question="question", answer="answer"),
    "math": dict(path="DigitalLearningGmbH/MATH-lighteval", name=None, question="problem", answer="solution"),
}
QUESTION_FIELDS = ("question", "problem", "input", "prompt", "query")
ANSWER_FIELDS = ("answer", "solution", "final_answer", "target", "gold")


def load_rows(args: Args):
    """The training rows as a `datasets.Dataset`, with a clear error for every way it can fail."""
    import datasets

    preset = DATASET_PRESETS.get(args.dataset)
    local = os.path.splitext(args.dataset)[1] in (".jsonl", ".json", ".parquet")
    try:
        if preset is not None:
            ds = datasets.load_dataset(preset["path"], preset["name"], split=args.dataset_split)
        elif local:
            if not os.path.isfile(args.dataset):
                raise SystemExit(f"--dataset {args.dataset}: no such file")
            kind = "parquet" if args.dataset.endswith(".parquet") else "json"
            ds = datasets.load_dataset(kind, data_files=args.dataset, split="train")
        else:
            ds = datasets.load_dataset(args.dataset, split=args.dataset_split)
    except SystemExit:
        raise
    except Exception as e:  # hub unreachable, unknown name, unreadable file
        raise SystemExit(
            f"--dataset {args.dataset}: cannot load it ({type(e).__name__}: {str(e)[:300]}).\n"
            "Without a reachable Hugging Face hub, point --dataset at a local .jsonl/.parquet file, "
            "e.g. --dataset ../shared/data/gsm8k_train.jsonl (fields are found by name, or give "
            "--question-field/--answer-field)."
        ) from None
    cols = ds.column_names
    q = args.question_field or (preset or {}).get("question") or next((c for c in QUESTION_FIELDS if c in cols), None)
    a = args.answer_field or (preset or {}).get("answer") or next((c for c in ANSWER_FIELDS if c in cols), None)
    for flag, name in (("--question-field", q), ("--answer-field", a)):
        if name is None or name not in cols:
            raise SystemExit(f"--dataset {args.dataset}: no column {name!r} for {flag}; its columns are {cols}")
    if len(ds) == 0:
        raise SystemExit(f"--dataset {args.dataset}: the data set is empty")
    return ds, q, a


def build_prompt(tokenizer, question: str, args: Args) -> str:
    """The prompt text every script (and eval.py) uses: chat template or plain."""
    text = question.strip() + args.prompt_suffix
    if args.prompt_template == "plain":
        return f"Question: {text}\nAnswer:"
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_prompts(ds, q_field, a_field, tokenizer, args: Args):
    """Tokenised prompts with their gold answers; over-long prompts skipped or truncated, rows
    without a question or gold answer skipped, and both counted."""
    examples, n_missing, n_long = [], 0, 0
    rows = [(r[q_field], r[a_field]) for r in ds]
    texts = [build_prompt(tokenizer, str(q), args) if q else None for q, _ in rows]
    ids = tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
    for (q, gold), text, prompt_ids in zip(rows, texts, ids):
        if not text or rewards.extract_gold(gold) is None:
            n_missing += 1
            continue
        if len(prompt_ids) > args.max_prompt_length:
            n_long += 1
            if args.long_prompts == "skip":
                continue
            prompt_ids = prompt_ids[-args.max_prompt_length :]  # keep the end: the assistant header
        examples.append({"prompt": text, "prompt_ids": prompt_ids, "answer": gold})
    return examples, n_missing, n_long


def prompt_indices(start: int, count: int, num_examples: int, seed: int) -> list[int]:
    """Example indices at positions start … start+count−1 of the data stream: a fresh seeded
    permutation per epoch, so the data order is a pure function of (seed, position) and
    `--resume` continues it exactly."""
    perms, out = {}, []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, num_examples)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_examples)
        out.append(int(perms[epoch][i]))
    return out


def collate(prompt_ids: list, completion_ids: list, pad_id: int, device) -> dict:
    """Left-padded prompts + right-padded completions ([B, P + T]), with attention mask and position ids,
    and the completion tokens with their mask ([B, T])."""
    p_len = max(len(p) for p in prompt_ids)
    c_len = max(max(len(c) for c in completion_ids), 1)
    n = len(prompt_ids)
    input_ids = torch.full((n, p_len + c_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + c_len), dtype=torch.long)
    comp = torch.full((n, c_len), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((n, c_len), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        input_ids[i, p_len : p_len + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, p_len - len(p) : p_len + len(c)] = 1
        comp[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        comp_mask[i, : len(c)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = dict(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, completion_ids=comp,
                 completion_mask=comp_mask)
    return {k: v.to(device) for k, v in batch.items()} | {"tokens": int(attention.sum())}


def pack(prompt_ids: list, completion_ids: list, pad_id: int, row_len: int, device, share_prompts: bool = False) -> dict:
    """A padding-free micro-batch: each sequence (prompt + completion) goes into the first row with room, rows of at
    most row_len tokens and no longer than the longest sequence ([R, L]). Position ids restart at each sequence, and
    with no attention mask transformers builds a block-causal mask from them, so attention never crosses sequences.
    share_prompts: the completions of one prompt follow a single copy of it ([prompt, c1, c2, ...]: a unit), each
    completion's positions continuing the prompt's; the units go end to end in one row, and `shared_prompts` holds
    the attention segments shared_prompt_attention computes (attention_segments): each prompt over itself, each
    completion over its prompt and itself, never a sibling.
    logit_index: the flat positions of [R, L] whose logits predict the completion tokens, sequence by sequence;
    tokens: the positions holding a token; completion_ids and completion_mask as collate's ([B, T])."""
    if share_prompts:  # docs/algorithms.md (6.7): one copy of each prompt, all its completions after it
        by_prompt = {}
        for i, p in enumerate(prompt_ids):
            by_prompt.setdefault(tuple(p), []).append(i)
        units = [[prompt_ids[m[0]], m, len(prompt_ids[m[0]]) + sum(len(completion_ids[i]) for i in m)]
                 for m in by_prompt.values()]
        row_len = sum(n for _, _, n in units)  # (6.7): attention is per segment, a row's width costs nothing
    else:
        units = [[p, [i], len(p) + len(c)] for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
        # (6.7): rows no wider than the longest sequence, so packing never computes more positions than padding,
        # and a row's dense attention (CPU, sdpa: L² per row) never spans more than its longest sequence's
        row_len = min(row_len, max(n for _, _, n in units))
    rows, seq_pos, index, prompt_segments, completion_segments = [], [], {}, [], []
    for p, members, n in units:
        r = next((k for k, row in enumerate(rows) if len(row) + n <= row_len), len(rows))
        if r == len(rows):
            rows.append([])
            seq_pos.append([])
        start = len(rows[r])
        rows[r] += p
        seq_pos[r] += list(range(len(p)))
        prompt = list(range(start, start + len(p)))  # row positions (shared prompts: one row, so flat ones)
        if share_prompts and p:
            prompt_segments.append((prompt, prompt))
        for i in members:
            c = completion_ids[i]
            own = list(range(len(rows[r]), len(rows[r]) + len(c)))
            # its first token is predicted at the prompt's last position, each later one at the token before it
            index[i] = (r, ([start + len(p) - 1] + own[:-1])[: len(c)])
            if share_prompts and c:
                completion_segments.append((own, prompt + own))
            rows[r] += c
            seq_pos[r] += list(range(len(p), len(p) + len(c)))
    L = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)
    for r, (row, pos) in enumerate(zip(rows, seq_pos)):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        position_ids[r] = torch.tensor(pos + list(range(L - len(row))))
    logit_index = torch.tensor([index[i][0] * L + x for i in range(len(completion_ids)) for x in index[i][1]],
                               dtype=torch.long)
    batch = collate([[]] * len(completion_ids), completion_ids, pad_id, "cpu")  # completion ids and mask, [B, T]
    batch.update(input_ids=input_ids, position_ids=position_ids, logit_index=logit_index, attention_mask=None,
                 tokens=sum(len(row) for row in rows))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if share_prompts:
        # a 4D mask is taken as given, so transformers builds no [L, L] mask of its own: this one-element mask stands
        # in, unread; shared_prompt_attention masks each segment itself
        batch["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        batch["shared_prompts"] = [attention_segments(s, device) for s in (prompt_segments, completion_segments) if s]
    return batch


def attention_segments(segments: list, device) -> tuple:
    """One sdpa call over S segments, each (query positions, key positions) with the queries the last of the keys
    and each query seeing the keys up to itself: [S, Lq] query and [S, Lk] key positions (padded with their first),
    the [S, 1, Lq, Lk] mask (True: attend) and [S, Lq] which query slots are real (docs/algorithms.md (6.7))."""
    n_q = torch.tensor([len(q) for q, _ in segments], device=device)  # [S]
    n_k = torch.tensor([len(k) for _, k in segments], device=device)  # [S]
    Lq, Lk = int(n_q.max()), int(n_k.max())
    q_index = torch.tensor([q + q[:1] * (Lq - len(q)) for q, _ in segments], device=device)  # [S, Lq]
    kv_index = torch.tensor([k + k[:1] * (Lk - len(k)) for _, k in segments], device=device)  # [S, Lk]
    j = torch.arange(Lq, device=device)
    # query j is key n_k - n_q + j: it sees the keys up to there (a padded query sees every key: never an empty row)
    mask = torch.arange(Lk, device=device)[None, None, :] <= (n_k - n_q)[:, None, None] + j[None, :, None]
    return q_index, kv_index, mask.unsqueeze(1), j[None, :] < n_q[:, None]  # ..., [S, 1, Lq, Lk], [S, Lq]


SHARED_PROMPT_ATTENTION = "grpo_shared_prompts"


def shared_prompt_attention(module, query, key, value, attention_mask, shared_prompts=None, **kwargs):
    """The attention of a model trained with --share-prompts (a transformers attention function): sdpa over each of
    pack's attention segments, so a completion attends to its prompt and its own earlier tokens only and no position
    pair outside a segment is computed (docs/algorithms.md (6.7)); any other call (e.g. transformers generate) is
    plain sdpa. query [R, H, L, D], key and value [R, H_kv, L, D]; returns [R, L, H, D] as sdpa's."""
    if shared_prompts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    R, H, L, D = query.shape
    flat = [x.transpose(1, 2).flatten(0, 1) for x in (query, key, value)]  # [R·L, heads, D] each
    out = query.new_zeros(R * L, H, D)
    for q_index, kv_index, mask, real in shared_prompts:
        q, k, v = (x[i].transpose(1, 2) for x, i in zip(flat, (q_index, kv_index, kv_index)))  # [S, heads, len, D]
        o, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)  # [S, Lq, H, D]
        out = out.index_put((q_index[real],), o[real])
    return out.view(R, L, H, D), None


AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)
AttentionMaskInterface.register(SHARED_PROMPT_ATTENTION, sdpa_mask)  # the masks of sdpa for every other call


def score(reward_funcs: list, names: list, examples: list, completions: list, completion_ids: list, G: int):
    """[F, n] float64 rewards, one row per reward function; NaN where a function cannot score (None).

    A reward function is outside code: anything but one real number or None per completion is an error
    that names the function.
    """
    prompts = [e["prompt"] for e in examples for _ in range(G)]
    answers = [e["answer"] for e in examples for _ in range(G)]
    rows = []
    for name, fn in zip(names, reward_funcs):
        values = fn(prompts=prompts, completions=completions, answer=answers, completion_ids=completion_ids,
                    num_generations=G)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}"
            raise RuntimeError(f"reward {name!r} returned {got} for {len(completions)} completions; "
                               "it must return one float or None per completion")
        bad = [(i, v) for i, v in enumerate(values) if v is not None and not (
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v))]
        if bad:
            i, v = bad[0]
            raise RuntimeError(f"reward {name!r} returned {v!r} for completion {i} ({len(bad)} such values); "
                               "a reward is a finite number, or None for 'cannot score'")
        rows.append(torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# Generation and weight sync
# ---------------------------------------------------------------------------------------------


def request_seed(seed: int, round_id: int, rank: int, i: int) -> int:
    """Per-request sampling seed: generation is a pure function of (weights, seed, round), which
    is what lets --resume reproduce an uninterrupted run (docs/algorithms.md (6.5))."""
    return (seed * 1_000_003 + round_id * 10_007 + rank * 101 + i) % (2**31)


def sample_and_score(llm, engine, tokenizer, reward_funcs: list, examples: list, temperatures: list, round_id: int,
                     args: Args, stop_ids: list, tp_group=None):
    """G completions per example, each example at its own temperature, decoded and scored.

    Returns the (token ids, hit max length) pairs, their text, the rewards [F, n] of every reward
    function (NaN where it cannot score) and the seconds spent generating.
    """
    t0 = time.perf_counter()
    prompt_ids = [e["prompt_ids"] for e in examples]
    seeds = [request_seed(args.seed, round_id, dist.get_rank(), i) for i in range(len(prompt_ids))]
    if llm is not None:
        generated = vllm_generate(llm, prompt_ids, temperatures, seeds, args, stop_ids, tp_group)
    else:
        synced = args.zero_stage == 3 and dist.get_world_size() > 1  # every rank runs the ZeRO-3 forward together
        generated = hf_generate(engine.module, prompt_ids, temperatures, seeds[0], args, stop_ids,
                                tokenizer.pad_token_id, synced)
    seconds = time.perf_counter() - t0
    completion_ids = [c for c, _ in generated]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    values = score(reward_funcs, args.reward_funcs, examples, completions, completion_ids, args.num_generations)
    return generated, completions, values, seconds


def vllm_generate(llm, prompt_ids: list, temperatures: list, seeds: list, args: Args, stop_ids: list, tp_group):
    """The colocated engine: one batched call, one SamplingParams (temperature, seed) per prompt.

    With tensor parallelism the ranks of one engine must submit the same requests: they submit the
    union of theirs and each keeps its own share of the outputs.
    """
    from vllm import SamplingParams

    requests, first = tp_union(list(zip(prompt_ids, temperatures, seeds)), tp_group)
    params = [SamplingParams(n=args.num_generations, temperature=t, top_p=args.top_p, seed=s,
                             max_tokens=args.max_completion_length, stop_token_ids=stop_ids) for _, t, s in requests]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in requests], params, use_tqdm=False)
    outs = outs[first : first + len(prompt_ids)]
    return [(list(o.token_ids), o.finish_reason == "length") for out in outs for o in out.outputs]


def tp_union(requests: list, tp_group) -> tuple[list, int]:
    """The requests of every rank that shares this rank's tensor-parallel vLLM engine (which must all
    submit the same requests), and where this rank's own start among them."""
    if tp_group is None:
        return requests, 0
    gathered = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(gathered, requests, group=tp_group)
    return [r for g in gathered for r in g], sum(len(g) for g in gathered[: dist.get_rank(tp_group)])


class RowTemperatureTopP(LogitsProcessor):
    """Per-row temperature, then top-p: vLLM's order of the two, with one temperature per prompt."""

    def __init__(self, temperatures: torch.Tensor, top_p: float):
        self.temperatures = temperatures.unsqueeze(-1)  # [rows, 1]
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        scores = scores / self.temperatures
        return self.top_p(input_ids, scores) if self.top_p is not None else scores


@torch.no_grad()
def hf_generate(model, prompt_ids: list, temperatures: list, seed: int, args: Args, stop_ids: list, pad_id: int,
                synced: bool):
    """The transformers fallback with the same sampling (per-prompt temperature, top-p, no top-k, same stops)."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    p_len = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (p_len - len(p)) + p for p in prompt_ids], device=device)
    attn = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    row_temperatures = torch.tensor(temperatures, device=device).repeat_interleave(args.num_generations)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=attn,
        # temperature and top-p live in the processor, so that each row gets its own temperature
        generation_config=GenerationConfig(
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_completion_length,
            num_return_sequences=args.num_generations, eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True),
        logits_processor=[RowTemperatureTopP(row_temperatures, args.top_p)],
        synced_gpus=synced,
    )
    model.train(was_training)
    result = []
    for row in out[:, p_len:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_ids), None)
        result.append((row[:cut] if cut else row, cut is None))
    return result


def sync_weights_to_vllm(model: torch.nn.Module, llm, bucket_bytes: int) -> None:
    """Hand the policy's weights to vLLM in bounded buckets, straight from the ZeRO-3 shards.

    A bucket of parameters is gathered, handed to vLLM and released before the next one, so no
    rank ever holds a second full copy of the model. Buckets are sized with `ds_numel` (an
    ungathered ZeRO-3 parameter reports numel 0) and never split a decoder layer, because vLLM
    fuses q/k/v and gate/up into one kernel tensor that must receive all its parts in one go.
    One reload call consumes the whole generator, so vLLM finalises the reload exactly once.
    """

    def layer_of(name: str) -> str:
        parts = name.split(".")
        for j, p in enumerate(parts[:-1]):
            if p in ("layers", "h", "blocks") and parts[j + 1].isdigit():
                return ".".join(parts[: j + 2])
        return name

    buckets, current, size, last_layer = [], [], 0, None
    for name, p in model.named_parameters():
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
        layer = layer_of(name)
        if current and size + nbytes > bucket_bytes and layer != last_layer:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
        last_layer = layer
    if current:
        buckets.append(current)

    def weights():
        for bucket in buckets:
            with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
                yield from ((name, p.data) for name, p in bucket)

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
    llm.collective_rpc(_repack_tied_lm_head)
    llm.reset_prefix_cache()


def _repack_tied_lm_head(worker) -> None:
    """vLLM's CPU backend multiplies by a packed copy of lm_head made at load time. A tied lm_head
    receives no weights of its own in `reload_weights`, so its packed copy would keep the first
    weights (measured: log-probs off by up to 40 nats); rebuild it from the synced embedding."""
    head = getattr(worker.model_runner.model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear") and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def sync_logprob_diff(engine, llm, prompt_ids: list, completion_ids: list, pad_id: int, device, tp_group) -> float:
    """Largest |ℓ_vLLM − ℓ_trainer| over one completion's tokens, at temperature 1: a check that
    the weights vLLM samples from are the ones being trained (a broken sync shows up here)."""
    from vllm import SamplingParams

    requests, first = tp_union([prompt_ids + completion_ids], tp_group)
    outs = llm.generate([{"prompt_token_ids": r} for r in requests], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    out = outs[first]
    ours = [out.prompt_logprobs[len(prompt_ids) + j][t].logprob for j, t in enumerate(completion_ids)]
    with torch.no_grad():
        trainer = completion_logprobs(engine, collate([prompt_ids], [completion_ids], pad_id, device), 1.0)[0][0]
    return (torch.tensor(ours) - trainer.float().cpu()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or a run directory's latest complete checkpoint."""
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    done = [d for d in os.listdir(path) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()] \
        if os.path.isdir(path) else []
    done = [d for d in done if os.path.isfile(os.path.join(path, d, "trainer_state.json"))]
    if not done:
        raise SystemExit(f"--resume {path}: no complete checkpoint there (a directory with trainer_state.json, "
                         "or a run directory holding checkpoint-<step>/)")
    return os.path.join(path, max(done, key=lambda d: int(d.split("-")[-1])))


def keep_metrics_until(path: str, step: int) -> None:
    """On --resume: drop the rows of metrics.jsonl past the checkpoint's step (a run killed while saving wrote
    them), so that the file reads as one run."""
    if not os.path.isfile(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError):  # a line cut short by the kill
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def save_checkpoint(engine, tokenizer, run_dir: str, step: int, state: dict, rank: int, rank_state: dict) -> str:
    """A Hugging Face directory (weights, config, tokenizer) plus everything --resume needs
    (`rank_state`: this rank's own, with its RNG states), written under a temporary name and
    renamed once complete."""
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    module = engine.module
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather a consolidated copy on rank 0
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = module.state_dict()
    if rank == 0:
        module.save_pretrained(tmp, state_dict=state_dict)
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


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


def validate(args: Args) -> None:
    """Bad flags fail here, before any model is loaded."""
    G, W = args.num_generations, args.world_size
    problems = []
    if G < 2:
        problems.append(f"--num-generations {G}: a group needs at least 2 completions")
    if args.prompts_per_step < 1 or args.prompts_per_step % W:
        problems.append(f"--prompts-per-step {args.prompts_per_step} must be a positive multiple of the {W} ranks")
    else:
        local = args.prompts_per_step // W * G
        if args.num_mini_batches < 1 or local % args.num_mini_batches:
            problems.append(f"each rank's {local} completions per step do not split into "
                            f"--num-mini-batches {args.num_mini_batches}")
        elif args.micro_batch_size < 1 or (local // args.num_mini_batches) % args.micro_batch_size:
            problems.append(f"each rank's mini-batch of {local // args.num_mini_batches} completions is not a "
                            f"multiple of --micro-batch-size {args.micro_batch_size}")
    if args.num_iterations < 1:
        problems.append("--num-iterations must be at least 1")
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward_funcs):
        problems.append(f"--reward-weights has {len(args.reward_weights)} values for "
                        f"{len(args.reward_funcs)} --reward-funcs")
    if not args.reward_funcs:
        problems.append("--reward-funcs is empty")
    if not 0 < args.temperature:
        problems.append(f"--temperature {args.temperature} must be > 0 (greedy decoding gives G identical "
                        "completions, so every advantage would be 0)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p} must be in (0, 1]")
    if not (0 <= args.epsilon < 1 and args.epsilon_high >= 0):
        problems.append("--epsilon must be in [0, 1) and --epsilon-high >= 0")
    if args.beta < 0 or args.learning_rate <= 0:
        problems.append("--beta must be >= 0 and --learning-rate > 0")
    if (args.adaptive_beta or args.adaptive_epsilon) and args.beta == 0:
        problems.append("--beta 0 loads no reference model, so there is no KL for the β_t and ε_t controllers: "
                        "give --beta > 0, or --no-adaptive-beta --no-adaptive-epsilon")
    if not (0 <= args.adv_mix_lambda <= 1 and args.kl_target > 0 and 0 < args.kl_ema_rate <= 1 and args.kl_clamp > 0):
        problems.append("need --adv-mix-lambda in [0, 1], --kl-target > 0, --kl-ema-rate in (0, 1], --kl-clamp > 0")
    if not (0 < args.beta_min <= args.beta_max and 0 <= args.epsilon_min <= args.epsilon_max < 1):
        problems.append("need 0 < --beta-min <= --beta-max and 0 <= --epsilon-min <= --epsilon-max < 1")
    if args.max_prompt_length < 1 or args.max_completion_length < 1 or args.total_steps < 1:
        problems.append("--max-prompt-length, --max-completion-length and --total-steps must be >= 1")
    if not 0 <= args.warmup_ratio < 1:
        problems.append(f"--warmup-ratio {args.warmup_ratio} must be in [0, 1)")
    if min(args.save_steps, args.log_completions, args.max_generated_tokens, args.logprob_chunk_size,
           args.sync_check_steps, args.sync_bucket_mb) < 0:
        problems.append("--save-steps, --log-completions, --max-generated-tokens, --logprob-chunk-size, "
                        "--sync-check-steps and --sync-bucket-mb must be >= 0")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        problems.append(f"--vllm-gpu-memory-utilization {args.vllm_gpu_memory_utilization} must be in (0, 1]")
    if args.vllm_tensor_parallel_size < 1 or W % args.vllm_tensor_parallel_size:
        problems.append(f"--vllm-tensor-parallel-size {args.vllm_tensor_parallel_size} must divide the {W} ranks")
    if problems:
        raise SystemExit("invalid arguments:\n  " + "\n  ".join(problems))


def resolve_engine_flags(args: Args, on_gpu: bool, vllm_importable: bool) -> list[str]:
    """Settle --use-vllm, --vllm-sleep and --gradient-checkpointing for this machine (before they are
    recorded in args.json and wandb); returns what was changed, to be logged."""
    notes = []
    if args.use_vllm and not vllm_importable:
        args.use_vllm = False
        notes.append("vLLM is not importable: generating with transformers instead")
    if args.vllm_sleep == "on" and not (on_gpu and args.use_vllm):
        notes.append("--vllm-sleep on: " + ("no vLLM engine" if on_gpu else "vLLM's CPU build has no sleep mode")
                     + "; off")
    args.vllm_sleep = "on" if args.vllm_sleep in ("on", "auto") and on_gpu and args.use_vllm else "off"
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = "on" if on_gpu else "off"
    return notes


def prompt_sharing_unsupported(config) -> Optional[str]:
    """Why the model's attention cannot be computed by shared_prompt_attention, or None. Its segments replace the
    mask the model would build, so they are exact only where that one is plain causal: no sliding window
    (docs/algorithms.md (6.7)). A multimodal model's text config holds its layers."""
    config = config.get_text_config()
    windows = [t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"]
    if windows or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        return f"{config.model_type} has sliding-window attention layers"
    return None


def vllm_is_importable() -> tuple[bool, str]:
    try:
        from vllm import LLM  # noqa: F401
    except Exception as e:  # not installed, or a broken install (e.g. a mismatched torchvision)
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def deepspeed_config(args: Args, on_gpu: bool, grad_accum: int) -> dict:
    """The DeepSpeed config of the policy: ZeRO stage, micro-batching, clipping, precision."""
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": args.max_grad_norm,  # DeepSpeed 0.19 clips to 1.0 when this is unset
        "zero_optimization": {
            "stage": args.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
            # docs/algorithms.md (6.8): with checkpointing a plain F.linear keeps one layer's gathered weights
            # until that layer's backward, so DeepSpeed's slower memory-efficient Linear buys nothing
            "memory_efficient_linear": args.gradient_checkpointing != "on",
        },
        "bf16": {"enabled": on_gpu},  # bf16 on GPU; CPU kernels train in fp32
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if on_gpu and args.zero_stage > 0:
        # bf16 weights, but gradients accumulated over micro-batches and reduced over ranks in fp32
        # (DeepSpeed's default is bf16 for both; without ZeRO it supports only bf16)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def setup_models(args: Args, ds_config: dict, dtype, total_updates: int):
    """The policy as a DeepSpeed engine (AdamW, schedule), and the frozen reference when β > 0."""
    if args.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  weights are partitioned while loading
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.share_prompts and policy.config._attn_implementation != "sdpa":
        raise SystemExit(f"--share-prompts computes attention with sdpa; {args.model} loaded "
                         f"{policy.config._attn_implementation!r}: pass --no-share-prompts")
    if args.share_prompts:  # docs/algorithms.md (6.7): pack's shared-prompt rows, attention segment by segment
        policy.set_attn_implementation(SHARED_PROMPT_ATTENTION)
    if args.gradient_checkpointing == "on":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.zero_stage == 3 and args.zero3_leaf_layers:
        zero3_leaf_layers(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, warmup, total_updates, args.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    engine.train()
    ref_engine = None
    if args.beta > 0:  # docs/algorithms.md (1.5): with β = 0 the reference is never loaded
        keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16")
        ref_config = {k: ds_config[k] for k in keys}
        # no autograd graph in the reference's forward: nothing for DeepSpeed's memory-efficient Linear to save
        ref_config["zero_optimization"] = {"stage": 3 if args.zero_stage == 3 else 0, "memory_efficient_linear": False}
        ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        if args.share_prompts:
            ref_model.set_attn_implementation(SHARED_PROMPT_ATTENTION)
        if args.zero_stage == 3 and args.zero3_leaf_layers:
            zero3_leaf_layers(ref_model)
        ref_engine, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
        ref_engine.eval()
    return engine, ref_engine


def zero3_leaf_layers(model) -> list:
    """Mark the model's decoder layers (transformers' `_no_split_modules`) as ZeRO-3 leaf modules, before
    deepspeed.initialize: docs/algorithms.md (6.8), one fetch, release and hook per layer and pass instead of one
    per Linear and norm. Returns the classes marked (none: the model names no layer class; hooks stay per module)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    return classes


def setup_vllm(args: Args, rank: int, dtype, on_gpu: bool):
    """The colocated vLLM engine of this rank (one per --vllm-tensor-parallel-size ranks), and the
    process group of the ranks that share it (None without tensor parallelism)."""
    from vllm import LLM

    tp = args.vllm_tensor_parallel_size
    tp_group = None
    if tp > 1:  # consecutive ranks form one engine, as vLLM's external launcher expects
        tp_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(s, s + tp)) for s in range(0, dist.get_world_size(), tp)])
    max_len = args.max_prompt_length + args.max_completion_length
    # vLLM's CPU build sizes its KV cache as a fraction of the node's RAM minus what this process already
    # holds, which fails once the trainer's models are loaded: there it holds the step's batch instead
    # (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides this)
    sequences = tp * args.prompts_per_step // dist.get_world_size() * args.num_generations
    kv_bytes = None if on_gpu else max(2 * kv_cache_bytes(args.model, sequences, max_len, 4), 2**28)  # 2×: blocks
    llm = LLM(
        model=args.model, seed=args.seed + rank // tp, dtype=dtype,
        distributed_executor_backend="external_launcher", tensor_parallel_size=tp,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization, kv_cache_memory_bytes=kv_bytes,
        max_model_len=max_len, enable_sleep_mode=args.vllm_sleep == "on",
        generation_config="vllm",  # our sampling settings, not the model's defaults
        # vLLM 0.32's CPU build crashes on a seeded request whose prefill is chunked ("CPU
        # Generator does not use offset"), and the per-request seeds are what make --resume exact
        enable_chunked_prefill=None if on_gpu else False,
    )
    return llm, tp_group


def kv_cache_bytes(model: str, sequences: int, length: int, dtype_bytes: int) -> int:
    """Bytes of keys and values for `sequences` sequences of `length` tokens of `model`."""
    config = AutoConfig.from_pretrained(model)
    config = getattr(config, "text_config", config)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes * sequences * length


def peak_gpu_memory_gib(on_gpu: bool) -> float:
    """GPU memory held by tensors at most since the previous call, in GiB, and restart the count (0 on CPU).
    Called between the phases of a step, it gives each phase's own peak (what it held and added)."""
    if not on_gpu:
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def init_distributed() -> None:
    """One process (`python grpo.py`) is a world of one; `deepspeed` sets these for every rank."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU all-reduce maps one ~70 MB shared-memory file per rank and never unlinks it: every run
        # would leave that much RAM taken in /dev/shm. Once every rank has mapped its peers' (during
        # init_distributed), the names can go; the mappings stay.
        dist.barrier()
        env = os.environ
        shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
        if os.path.exists(shm):
            os.remove(shm)


def load_tokenizer(args: Args):
    """The tokenizer, after checking that --model names a loadable model (config and tokenizer) whose
    positions hold a prompt and a completion."""
    model = args.model
    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        hint = "no such directory" if model.startswith((".", "/", "~")) else \
            "not a local directory, and the hub is unreachable or has no such id"
        raise SystemExit(
            f"--model {model}: cannot load it ({hint}; {type(e).__name__}).\n"
            "Point --model at a local directory with config.json, weights and tokenizer files, e.g. "
            "the one printed by ../shared/tools/prepare_smollm2.sh."
        ) from None
    longest = args.max_prompt_length + args.max_completion_length
    positions = getattr(config, "max_position_embeddings", None)
    if positions and longest > positions and not getattr(config, "rope_scaling", None):
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length} + --max-completion-length "
                         f"{args.max_completion_length} = {longest} tokens, more than the {positions} positions of "
                         f"--model {model} (vLLM refuses it): lower one of the two")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def end_of_turn_token_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant message (`<|im_end|>`
    for Qwen2.5), or None: base models end their turn with it, not with their EOS."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKER_6b1f"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that rejects this conversation has no end-of-turn token to find
        return None
    tail = text.split(marker)[-1].lstrip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(model: str, tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS, the generation config's EOS ids and the
    chat template's end-of-turn token (docs/algorithms.md (6.5))."""
    ids = {tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)}
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    except Exception:  # no generation_config.json: the tokenizer's EOS is all there is
        pass
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Log-probs and the update (the trainer side of a step)
# ---------------------------------------------------------------------------------------------


class Metrics:
    """Per-step sums and counts, averaged over ranks at the end of the step."""

    def __init__(self):
        self.sums: dict[str, tuple[float, float]] = {}

    def add(self, name: str, value_sum, count=1.0) -> None:
        s, c = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + float(value_sum), c + float(count))

    def add_total(self, name: str, value) -> None:
        """A quantity summed over ranks and over every call of the step (e.g. tokens generated), not averaged."""
        s, _ = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + float(value), 1.0 / dist.get_world_size())  # the counts of all ranks add up to 1

    def reduce(self, device) -> dict:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {k: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, k in enumerate(keys)}


def update_plan(n: int, args: Args, shuffle_generator: torch.Generator, sizes: Optional[list] = None,
                prompts: Optional[list] = None) -> list:
    """plan[pass][optimizer step][micro-batch] → completion indices of this rank's rollout (sizes: each sequence's
    tokens, for micro-batches of balanced token counts; prompts: each sequence's prompt, when shared in a row).

    Shuffled per pass when the policy moves within a step (μ > 1 or mini-batches > 1); the first
    pass's micro-batches are also those of the old log-probs (docs/algorithms.md (6.1)).
    """
    shuffle = args.num_iterations * args.num_mini_batches > 1
    mini_size, micro = n // args.num_mini_batches, args.micro_batch_size
    plan = []
    for _ in range(args.num_iterations):
        order = torch.randperm(n, generator=shuffle_generator).tolist() if shuffle else list(range(n))
        minis = [order[s : s + mini_size] for s in range(0, n, mini_size)]
        if sizes is not None and args.micro_batch_by_tokens:
            plan.append([balanced_split(mini, sizes, mini_size // micro, prompts) for mini in minis])
        else:
            plan.append([[mini[k : k + micro] for k in range(0, mini_size, micro)] for mini in minis])
    return plan


def balanced_split(ix: list, sizes: list, parts: int, prompts: Optional[list] = None) -> list:
    """`ix` in `parts` groups of about equal total size, so no micro-batch of long sequences runs out of memory
    while short ones waste a pass. The loss's normalisers count the whole optimizer step (1.4), so the split
    does not change the loss. Without prompts: the longest first, each to the lightest group. With prompts (shared
    in packed rows, 6.7), a prompt is computed once per micro-batch: the sequences, ordered prompt by prompt, are
    cut into `parts` consecutive runs whose largest cost (a prompt counted once per run) is the least possible,
    so a prompt's completions share a micro-batch except where a cut falls inside them."""
    if prompts is None:
        groups, load = [[] for _ in range(parts)], [0] * parts
        for i in sorted(ix, key=lambda i: -sizes[i]):
            g = min(range(parts), key=lambda g: (load[g], len(groups[g])))
            groups[g].append(i)
            load[g] += sizes[i]
        return [sorted(g) for g in groups]
    key, first = {i: tuple(prompts[i]) for i in ix}, {}
    for i in ix:
        first.setdefault(key[i], len(first))
    order = sorted(ix, key=lambda i: (first[key[i]], -sizes[i]))

    def runs(bound: int) -> list:  # consecutive runs, each as long as its cost stays within bound
        out, cost, held = [], 0, set()
        for i in order:
            add = sizes[i] - (len(key[i]) if key[i] in held else 0)
            if out and cost + add <= bound:
                out[-1].append(i)
                cost += add
            else:
                out.append([i])
                cost, held = sizes[i], set()
            held.add(key[i])
        return out

    lo, hi = max(sizes[i] for i in ix), sum(sizes[i] for i in ix)
    while lo < hi:  # the least bound that needs no more than `parts` runs
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(runs(mid)) <= parts else (mid + 1, hi)
    groups = runs(lo)
    while len(groups) < parts:  # fewer runs than micro-batches: halve the run of most sequences
        k = max(range(len(groups)), key=lambda k: len(groups[k]))
        groups[k : k + 1] = [groups[k][: len(groups[k]) // 2], groups[k][len(groups[k]) // 2 :]]
    return [sorted(g) for g in groups]


@torch.no_grad()
def rollout_logprobs(engine, ref_engine, rollout: Rollout, micro_batches: list, args: Args, device) -> None:
    """Fill rollout.old_logp and rollout.ref_logp ([n, T], 0 on padding).

    docs/algorithms.md (6.1): with μ = 1 and one mini-batch the policy has not moved when each
    micro-batch is trained on, so ℓold = ℓθ exactly: the update uses the detached training log-probs
    and this pass is skipped. Otherwise ℓold comes from the same micro-batches (same composition,
    same padding) as the update's first pass, so that pass's ratio is exactly 1, in bf16 too.
    """
    need_old = args.num_iterations * args.num_mini_batches > 1
    n, T = rollout.loss_mask.shape
    rollout.old_logp = torch.zeros(n, T, device=device) if need_old else None
    rollout.ref_logp = torch.zeros(n, T, device=device) if ref_engine is not None else None
    for ix in micro_batches:
        batch = rollout.micro_batch(ix, device)
        width = batch["completion_ids"].shape[1]
        for model, out in ((engine, rollout.old_logp), (ref_engine, rollout.ref_logp)):
            if out is not None:
                logp, _ = completion_logprobs(model, batch, args.temperature, chunk_size=args.logprob_chunk_size)
                out[ix, :width] = logp * batch["completion_mask"]


def update_policy(engine, rollout: Rollout, plan: list, args: Args, metrics: Metrics, device, control: dict) -> None:
    """μ passes over this rank's rollout, each split into optimizer steps, gradients accumulated
    over micro-batches (docs/algorithms.md (1.4)); β_t and ε_t move after every optimizer step (4.5), (4.6)."""
    world, skipped = dist.get_world_size(), 0
    for it, optimizer_steps in enumerate(plan):
        for micro_batches in optimizer_steps:
            # (1.4): the normalisers count the sequences and tokens in the loss of the whole optimizer
            # step, over every micro-batch and every rank
            rows = [i for ix in micro_batches for i in ix]
            in_loss = rollout.loss_mask[rows]  # [rows, T]
            seqs = in_loss.any(1)  # [rows]
            # [rows]: in the loss with A ≠ 0 (|A| ≤ 1e-6 is the float noise of equal rewards: 1e-13 after a mean)
            signal = seqs & (rollout.advantages[rows].abs() > 1e-6)
            counts = torch.tensor([seqs.sum().item(), in_loss.sum().item(), signal.sum().item()],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            num_seqs, num_tokens, num_signal = (int(c) for c in counts.tolist())
            # no token in the loss, or (6.9) no non-zero advantage in it: no step (else a KL or entropy term alone
            # would get a full-size Adam step)
            if num_tokens == 0 or (num_signal == 0 and args.skip_no_signal):
                skipped += 1
                continue
            loss_sum, kl_sum, kl_tokens = 0.0, 0.0, 0.0
            eps_low, eps_high = (control["epsilon"],) * 2 if args.adaptive_epsilon else \
                (args.epsilon, args.epsilon_high)
            for ix in micro_batches:
                batch = rollout.micro_batch(ix, device)
                mask = batch["loss_mask"]  # [b, t]
                real = sum(len(rollout.prompt_ids[i]) + len(rollout.completion_ids[i]) for i in ix)
                positions = batch["input_ids"].numel()
                metrics.add("update/padding_fraction", positions - batch["tokens"], positions)
                metrics.add_total("update/real_tokens", real)  # the sequences' tokens, a shared prompt counted each time
                metrics.add_total("update/computed_tokens", positions)
                logp, entropy = completion_logprobs(engine, batch, args.temperature,
                                                    with_entropy=it == 0 or args.entropy_coef > 0,
                                                    chunk_size=args.logprob_chunk_size)
                old = batch["old_logp"] if batch["old_logp"] is not None else logp.detach()
                # ALGO LOGIC: the per-token loss with this optimizer step's β_t and ε_t (docs/algorithms.md (4.4))
                tok_loss, kl, low, high = grpo_token_loss(logp, old, batch["advantages"], mask, eps_low, eps_high,
                                                          batch["ref_logp"], control["beta"], entropy,
                                                          args.entropy_coef, args.kl_type, args.kl_clamp)
                weights = token_weights(mask, args.loss_type, num_seqs, num_tokens, args.max_completion_length)
                # DeepSpeed averages gradients over ranks and we undo its 1/GAS: scale by world
                loss = (tok_loss * weights).sum() * world
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
                        delta = torch.clamp(batch["ref_logp"] - logp, -args.kl_clamp, args.kl_clamp)[m]
                        forward, reverse = torch.expm1(delta) - delta, delta * torch.exp(delta) - torch.expm1(delta)
                    for name, v in (("forward", forward), ("reverse", reverse), ("symmetric", (forward + reverse) / 2)):
                        metrics.add(f"kl/{name}", v.sum(), tokens)
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
    metrics.add("update/skipped_steps", skipped, 1.0)  # the same on every rank


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = tyro.cli(Args)
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    validate(args)
    reward_funcs = [rewards.get_reward_func(n) for n in args.reward_funcs]
    reward_weights = torch.tensor(args.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float64)
    tokenizer = load_tokenizer(args)
    stop_ids = stop_token_ids(args.model, tokenizer)
    ds, q_field, a_field = load_rows(args)
    examples, n_missing, n_long = prepare_prompts(ds, q_field, a_field, tokenizer, args)
    if len(examples) < args.prompts_per_step:
        raise SystemExit(
            f"--dataset {args.dataset}: only {len(examples)} usable prompts ({n_missing} without question/gold, "
            f"{n_long} longer than --max-prompt-length {args.max_prompt_length}), fewer than --prompts-per-step"
        )

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if on_gpu:
        accel.set_device(local_rank)
    device = torch.device(accel.device_name(local_rank) if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # CPU kernels train in fp32
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    if not on_gpu and "libtcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        log("CPU: preloading tcmalloc and Intel OpenMP makes a step 30-40% faster (README, Setup): "
            "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$(python -c "
            "'import sys; print(sys.prefix)')/lib/libiomp5.so")
    vllm_ok, vllm_error = vllm_is_importable() if args.use_vllm else (False, "")
    for note in resolve_engine_flags(args, on_gpu, vllm_ok):
        log(note + (f" ({vllm_error})" if "importable" in note else ""))
    unshared = prompt_sharing_unsupported(AutoConfig.from_pretrained(args.model)) if args.share_prompts else None
    if unshared and args.padding_free:
        log(f"--share-prompts off: {unshared}")
    args.share_prompts = args.share_prompts and args.padding_free and not unshared

    # run name, resume state, tracking (every flag is settled by now: what is recorded is what runs)
    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    state = {"step": 0, "data_pos": 0, "tokens_generated": 0, "wandb_id": None, "control": initial_control(args),
             "run_name": f"{args.exp_name}__{args.seed}__{int(time.time())}"}
    if resume_dir:
        with open(os.path.join(resume_dir, "trainer_state.json")) as f:
            state = json.load(f)
        if state["world_size"] != world:
            raise SystemExit(f"--resume {resume_dir}: saved with {state['world_size']} ranks, now {world}; "
                             "resume with the same number of ranks")
    obj = [state["run_name"]]
    dist.broadcast_object_list(obj, src=0)  # every rank uses rank 0's clock
    run_name = state["run_name"] = obj[0]
    run_dir = os.path.join(args.output_dir, run_name)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    log(f"run {run_name}: {len(examples)} prompts ({n_missing} rows without question/gold skipped, {n_long} over "
        f"{args.max_prompt_length} tokens {'skipped' if args.long_prompts == 'skip' else 'truncated'})")
    wandb_run = None
    if args.track and rank == 0:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                               id=state.get("wandb_id"), resume="allow", config=asdict(args))
        state["wandb_id"] = wandb_run.id  # saved in checkpoints: --resume continues the same wandb run

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # policy and reference (DeepSpeed), then the colocated vLLM engine
    G = args.num_generations
    local_prompts = args.prompts_per_step // world
    local_completions = local_prompts * G
    grad_accum = local_completions // args.num_mini_batches // args.micro_batch_size
    total_updates = args.total_steps * args.num_iterations * args.num_mini_batches
    engine, ref_engine = setup_models(args, deepspeed_config(args, on_gpu, grad_accum), dtype, total_updates)
    # vLLM's engine reseeds Python's, NumPy's and torch's RNGs when it starts: start it before they are restored
    llm, tp_group = setup_vllm(args, rank, dtype, on_gpu) if args.use_vllm else (None, None)
    if resume_dir:
        engine.load_checkpoint(os.path.join(resume_dir, "deepspeed"), tag="state")
        rank_state = torch.load(os.path.join(resume_dir, f"rank_state_{rank}.pt"), weights_only=False)
        rng = rank_state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        log(f"resumed from {resume_dir} at step {state['step']}")
    if llm is not None and resume_dir:  # vLLM loaded the initial weights from disk
        sync_weights_to_vllm(engine.module, llm, args.sync_bucket_mb * 2**20)
    if llm is None:
        log("generating with transformers generate (no vLLM)")

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if resume_dir and rank == 0:
        keep_metrics_until(metrics_path, state["step"])
    progress = tqdm(range(state["step"], args.total_steps), initial=state["step"], total=args.total_steps,
                    disable=rank != 0)
    for step in progress:
        t_step = time.perf_counter()
        step_metrics = Metrics()
        add = step_metrics.add
        peak_gpu_memory_gib(on_gpu)  # each phase's peak GPU memory is counted from here

        # 1. generation and 2. rewards (docs/algorithms.md §5): this rank's share of the step's prompts, G
        # completions each, with one row of rewards per reward function (NaN where it cannot score)
        round_id = state["data_pos"] // args.prompts_per_step
        idx = prompt_indices(state["data_pos"] + rank * local_prompts, local_prompts, len(examples), args.seed)
        state["data_pos"] += args.prompts_per_step
        batch_examples = [examples[i] for i in idx]
        generated, completions, values, time_generate = sample_and_score(  # values: [F, n]
            llm, engine, tokenizer, reward_funcs, batch_examples, [args.temperature] * local_prompts, round_id, args,
            stop_ids, tp_group)
        step_metrics.add_total("tokens/generated_step", sum(len(c) for c, _ in generated))
        if args.vllm_sleep == "on":
            llm.sleep(level=2)  # weights are re-sent after the update anyway
        memory = {"generate": peak_gpu_memory_gib(on_gpu)}  # GiB: the peak of each phase of the step
        prompt_ids = [e["prompt_ids"] for e in batch_examples]
        completion_ids = [c for c, _ in generated]
        truncated = [t for _, t in generated]
        lengths = [len(c) for c in completion_ids]

        # ALGO LOGIC: reward, advantages and the tokens in the loss (docs/algorithms.md (4.1))
        total = (reward_weights.unsqueeze(1) * values).sum(0)  # [n], NaN if any function cannot score
        batch_mean, batch_std = global_reward_stats(total, device)  # over every rank's completions
        advantages = mixed_advantages(total, G, args.adv_mix_lambda, batch_mean, batch_std, args.scale_rewards)  # [n]
        loss_mask = completion_mask(lengths)  # [n, T]: every completion token

        for name, v in zip(args.reward_funcs, values):
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

        # 3. log-probs of the batch under the old policy and the reference (no grad)
        t0 = time.perf_counter()
        rollout = Rollout(prompt_ids=[p for p in prompt_ids for _ in range(G)], completion_ids=completion_ids,
                          advantages=advantages.float(), loss_mask=loss_mask, pad_id=tokenizer.pad_token_id,
                          pack_rows=args.max_prompt_length + args.max_completion_length if args.padding_free else 0,
                          share_prompts=args.share_prompts)
        shuffle_generator = torch.Generator().manual_seed(request_seed(args.seed, step, rank, 7))
        sizes = [len(p) + len(c) for p, c in zip(rollout.prompt_ids, completion_ids)]
        plan = update_plan(len(completion_ids), args, shuffle_generator, sizes,
                           rollout.prompt_ids if args.share_prompts else None)
        rollout_logprobs(engine, ref_engine, rollout, [ix for mini in plan[0] for ix in mini], args, device)
        time_logprobs = time.perf_counter() - t0
        memory["logprobs"] = peak_gpu_memory_gib(on_gpu)

        # 4. update: μ passes, each split into mini-batches; one optimizer step per mini-batch
        t0 = time.perf_counter()
        update_policy(engine, rollout, plan, args, step_metrics, device, state["control"])
        for name, key in (("beta", "beta"), ("eps", "epsilon"), ("kl_ema", "kl_ema")):
            if state["control"][key] is not None:
                add(f"agrpo/{name}", state["control"][key], 1.0)  # the same on every rank
        lr = engine.get_lr()[0]
        time_update = time.perf_counter() - t0
        memory["update"] = peak_gpu_memory_gib(on_gpu)

        # 5. weight sync: the new policy reaches vLLM before the next generation
        t0 = time.perf_counter()
        if llm is not None:
            if args.vllm_sleep == "on":
                gc.collect()  # the update's cached blocks go back to the GPU, or waking can run out of memory
                accel.empty_cache()
                llm.wake_up(tags=["weights"])
            sync_weights_to_vllm(engine.module, llm, args.sync_bucket_mb * 2**20)
            if args.vllm_sleep == "on":
                llm.wake_up(tags=["kv_cache"])
        time_weight_sync = time.perf_counter() - t0
        memory["weight_sync"] = peak_gpu_memory_gib(on_gpu)
        if llm is not None and args.sync_check_steps and (step + 1) % args.sync_check_steps == 0:
            diff = sync_logprob_diff(engine, llm, prompt_ids[0], completion_ids[0], tokenizer.pad_token_id, device,
                                     tp_group)
            add("sync/logprob_max_abs_diff", diff, 1.0)

        # 6. logging
        for name, value in (("time/generate", time_generate), ("time/logprobs", time_logprobs),
                            ("time/update", time_update), ("time/weight_sync", time_weight_sync),
                            ("time/step", time.perf_counter() - t_step)):
            add(name, value, 1.0)  # mean over ranks
        metrics = step_metrics.reduce(device)
        if on_gpu:  # the largest rank's peak of each phase: the rank that runs out of memory first
            peaks = torch.tensor(list(memory.values()), device=device)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            metrics.update({f"memory/{k}_peak_gib": v for k, v in zip(memory, peaks.tolist())})
        step_tokens = metrics.pop("tokens/generated_step")
        state["tokens_generated"] += int(round(step_tokens))
        metrics.update(step=step + 1, lr=lr, **{"tokens/generated_total": state["tokens_generated"]})
        metrics["tokens/per_second_generate"] = step_tokens / max(metrics["time/generate"], 1e-9) / world
        state["step"] = step + 1
        budget_spent = 0 < args.max_generated_tokens <= state["tokens_generated"]
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if wandb_run is not None:
                wandb_run.log(metrics, step=step + 1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['completions/mean_length']:.0f}")
            for i in range(min(args.log_completions, len(completions))):
                log(f"[step {step + 1}] reward={total[i].item():.2f} completion: {completions[i][-300:]!r}")
            if metrics["completions/clipped_ratio"] == 1.0:
                log(f"WARNING step {step + 1}: every completion hit --max-completion-length "
                    f"{args.max_completion_length}")
            if metrics["frac_reward_zero_std"] == 1.0:
                log(f"WARNING step {step + 1}: every group has zero reward variance, so every advantage is 0 "
                    "and this step learns nothing")
            if budget_spent:
                log(f"--max-generated-tokens {args.max_generated_tokens} reached after {step + 1} steps "
                    f"({state['tokens_generated']} tokens)")

        # 7. checkpoint
        done = step + 1 == args.total_steps or budget_spent
        if (args.save_steps and (step + 1) % args.save_steps == 0) or done:
            state["world_size"] = world
            path = save_checkpoint(engine, tokenizer, run_dir, step + 1, state, rank, rank_state={})
            log(f"saved {path}")
        if done:
            break

    if wandb_run is not None:
        wandb_run.finish()
    dist.barrier()


if __name__ == "__main__":
    main()
