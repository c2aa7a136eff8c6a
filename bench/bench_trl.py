"""Benchmark TRL's GRPOTrainer on the config bench/bench_speed.py gives grpo.py, for a side-by-side step time.

One process, fp32 on CPU, colocated vLLM (vLLM's CPU build), SmolLM2-135M-Instruct on a jsonl of questions and
`#### gold` answers scored by their last number (data/gsm8k_sample.jsonl, or data/additions.jsonl):
4 prompts × G = 8 = 32 completions per optimizer step (one micro-batch of 32, no accumulation),
≤ 64 completion tokens, β = 0, loss "dapo", μ = 1, temperature 1, constant lr 1e-6.
TRL lives in a venv of its own so that it cannot change the stack grpo.py runs on:

    python -m venv --system-site-packages ../trl_venv
    ../trl_venv/bin/pip install --no-deps trl==1.16.0
    ../trl_venv/bin/python bench/bench_trl.py --model $(tools/prepare_smollm2.sh) --out bench/results/trl_cpu

bench/bench_speed.py --trl-python ../trl_venv/bin/python runs it after grpo.py, in the same environment.

It writes OUT.json and OUT.md: per step the wall time of the whole optimizer step and of its parts
(weight sync, vLLM generation, the rest of the rollout, the update), the rows, real tokens and positions its update
computes, the mean reward and completion length TRL logged, and the medians over steps 2..N (step 1 is warm-up: first
vLLM graphs, allocator).
Run it on a quiet machine, with grpo.py on the same machine and the same number of threads.

The settings that are not flags here (learning rate, temperature, seed, β, loss type, ...) are read from grpo.py:
its defaults (grpo.Args) and common.SPEED_CONFIG, what bench_speed.py runs it with.
Differences from grpo.py that this script cannot remove are listed in OUT.md (see NOT_MATCHED).
"""

import os

# vLLM's CPU build: TRL drives the engine's model from this process (`llm.llm_engine.model_executor`), so
# the engine core must not be moved to a subprocess; and the CPU KV cache is sized by this variable (GiB),
# not by vllm_gpu_memory_utilization. Both must be set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import functools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import tyro
from common import ROOT, SPEED_CONFIG, RunShape, fmt

sys.path.insert(0, ROOT)  # grpo.py, whose settings this run takes

# What TRL 1.16 does differently from grpo.py at this config and offers no setting for; written into OUT.md.
NOT_MATCHED = [
    "no DeepSpeed: TRL runs plain PyTorch AdamW in one process; grpo.py wraps the policy in ZeRO-3 "
    "(gather/partition hooks around every forward and backward, even on one rank)",
    "TRL's loss forward also computes the per-token entropy (for its `entropy` metric); grpo.py computes it in the "
    "first pass only",
    "TRL computes every completion in one padded micro-batch; grpo.py leaves out those that carry no gradient "
    "(zero advantage at β = 0) and cuts the rest into micro-batches by length (docs/algorithms.md (6.13))",
    "TRL asks vLLM for 32 requests with n=1 and logprobs=0 (the 8 copies of a prompt share its prefix "
    "through the prefix cache); grpo.py sends 4 requests with n=8 and logprobs=0",
    "TRL leaves vLLM's chunked prefill on (max_num_batched_tokens=4096); grpo.py turns it off on CPU",
    "TRL's weight sync is patched here (see patch_trl_weight_sync); it then does what grpo.py does, in one "
    "`reload_weights` call instead of grpo.py's buckets (one bucket at this model size)",
]


@dataclass
class BenchArgs(RunShape):
    out: str = "bench/results/trl_cpu"
    """results are written to OUT.json and OUT.md"""
    vllm_importance_sampling_correction: bool = False
    """TRL's default is on, which adds a no-grad forward of the 32 completions every step (old log-probs for
    truncated importance sampling); grpo.py at μ = 1 does no such forward, so it is off to compare like with like"""
    steps: int = 7
    """optimizer steps; the first is warm-up and left out of the medians"""


def grpo_settings() -> dict:
    """What grpo.py's benchmarked run uses and TRL is set to: grpo.py's defaults with common.SPEED_CONFIG."""
    import grpo

    g = grpo.Args(**SPEED_CONFIG)
    keys = ("prompt_suffix", "max_prompt_length", "learning_rate", "beta", "loss_type", "temperature", "seed",
            "vllm_gpu_memory_utilization")
    return {k: getattr(g, k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Data and reward
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """'1,234' → 1234.0, '3.50' → 3.5; None if not a number."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number written in a completion (its final answer, \\boxed or not)."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def last_number_reward(completions, gold, **kwargs) -> list[float]:
    """1.0 if the completion's last number equals the gold number, else 0.0.

    TRL calls reward functions with the completions and every other dataset column as keyword arguments;
    conversational completions arrive as [{"role": "assistant", "content": ...}]."""
    rewards = []
    for completion, g in zip(completions, gold):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        pred = last_number(text)
        rewards.append(1.0 if pred is not None and g is not None and pred == g else 0.0)
    return rewards


def load_gsm8k(path: str, prompt_suffix: str):
    """GSM8K jsonl → a datasets.Dataset with a chat `prompt` (TRL applies the model's chat template, as
    grpo.py does) and the gold number."""
    from datasets import Dataset

    rows = []
    with open(path) as f:
        for line in f:
            ex = json.loads(line)
            rows.append({
                "prompt": [{"role": "user", "content": ex["question"] + prompt_suffix}],
                "gold": parse_number(ex["answer"].rsplit("####", 1)[1].strip()),
            })
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# TRL patch: colocated weight sync on vLLM's CPU build
# ---------------------------------------------------------------------------------------------


def patch_trl_weight_sync() -> None:
    """Replace `trl.generation.vllm_generation.VLLMGeneration.sync_weights` for vllm_mode="colocate".

    TRL 1.16 pushes each parameter with
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])
    i.e. the model's raw `load_weights`, skipping vLLM's post-load processing. vLLM 0.32's CPU build, once the
    model is loaded, computes each linear layer from a packed copy / oneDNN handle made at load time
    (`dispatch_cpu_unquantized_gemm` in vllm/model_executor/layers/utils.py) and replaces the layer's `weight`
    by an empty tensor, so raw `load_weights` has nothing of the right shape to write into, and even where it
    could write, the kernels would not read it. vLLM's public in-place path, `reload_weights` (worker → model
    runner → model_loader/reload/inplace.py), wraps `load_weights` in the layer-wise restore/re-process steps
    that rebuild those packed copies; we call it through `llm.collective_rpc`, with TRL's own
    `_iter_named_params()` (the trainer's parameters under vLLM's names, gathered one at a time if sharded),
    then rebuild the tied lm_head's packed copy as grpo.py does, then reset the prefix cache as TRL does.
    Server mode is left to TRL's original method."""
    from grpo import repack_tied_lm_head  # vLLM's CPU build: a tied lm_head's packed copy is rebuilt after the sync
    from trl.generation.vllm_generation import VLLMGeneration, empty_cache

    original = VLLMGeneration.sync_weights

    @functools.wraps(original)
    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        if self.enable_sleep_mode:  # as TRL: map the weights back before writing them (no sleep mode on CPU)
            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.collective_rpc(repack_tied_lm_head)
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def patch_trl_vllm_dtype(dtype: str = "float32") -> None:
    """Make TRL's colocated engine run in the trainer's dtype, as grpo.py's does (`LLM(..., dtype=dtype)`).

    `VLLMGeneration._init_vllm` builds `LLM(model=..., ...)` without a dtype, and vLLM 0.32's "auto" dtype
    downcasts an fp32 checkpoint to bf16 ("Downcasting torch.float32 to torch.bfloat16" in its log), so TRL
    would sample from a bf16 copy of an fp32 policy: different arithmetic from grpo.py, and an off-policy gap.
    `vllm_generation` imports the class by name, so rebinding that module attribute changes only TRL's call."""
    from trl.generation import vllm_generation

    llm_class = vllm_generation.LLM

    @functools.wraps(llm_class)
    def llm_in_dtype(*a, **kw):
        kw.setdefault("dtype", dtype)
        return llm_class(*a, **kw)

    vllm_generation.LLM = llm_in_dtype


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class PhaseClock:
    """Seconds spent in named methods during the current optimizer step.

    TRL's own `profiling_context` timings go only to wandb/mlflow/trackio, so the methods that bound each
    phase are wrapped here instead (the wrappers add a perf_counter call each, nothing else)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.counts = defaultdict(int)  # what the step's update computes (count_update_inputs)

    def wrap(self, cls, method: str, phase: str) -> None:
        inner = getattr(cls, method)
        clock = self

        @functools.wraps(inner)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                clock.seconds[phase] += time.perf_counter() - t0

        setattr(cls, method, timed)


def count_update_inputs(trainer_class, clock: PhaseClock) -> None:
    """Rows, real tokens and positions of the batch each step's loss forward and backward compute: the padded prompts
    and completions `_generate_and_score_completions` returns (TRL's loss concatenates them), in clock.counts."""
    inner = trainer_class._generate_and_score_completions

    @functools.wraps(inner)
    def counted(self, *a, **kw):
        out = inner(self, *a, **kw)
        clock.counts["rows"] += out["completion_ids"].shape[0]
        clock.counts["real_tokens"] += int(out["prompt_mask"].sum() + out["completion_mask"].sum())
        clock.counts["positions"] += out["prompt_ids"].numel() + out["completion_ids"].numel()
        return out

    trainer_class._generate_and_score_completions = counted


def make_step_callback(clock: PhaseClock, records: list):
    """A TrainerCallback: wall time of each optimizer step (on_step_begin → on_step_end, which brackets the
    rollout, forward/backward and optimizer step but not logging), its phases, and what TRL logged for it."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.seconds.clear()
            clock.counts.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - self.t0
            ph = dict(clock.seconds)
            rollout = ph.get("rollout", 0.0)
            sync, gen = ph.get("weight_sync", 0.0), ph.get("generate", 0.0)
            records.append({
                "step": state.global_step,
                "step_s": step_s,
                "weight_sync_s": sync,
                "generate_s": gen,
                # tokenising, decoding, reward, advantages (and the old-log-prob forward if IS correction is on)
                "rollout_other_s": rollout - sync - gen,
                # loss forward + backward + clip + optimizer step + scheduler
                "update_s": step_s - rollout,
                **clock.counts,  # rows, real_tokens, positions
            })

        def on_log(self, args, state, control, logs=None, **kwargs):
            # logging_steps=1: each log holds the metrics of the step that just ended
            if records and logs and "reward" in logs and records[-1]["step"] == state.global_step:
                records[-1]["reward"] = logs["reward"]
                records[-1]["completion_mean_length"] = logs.get("completions/mean_length")
                records[-1]["loss"] = logs.get("loss")

    return StepTimer()


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def grpo_config(args: BenchArgs, g: dict, output_dir: str):
    """GRPOConfig at grpo.py's benchmark config `g` (grpo_settings()); every TRL default that differs from it is set
    explicitly."""
    from trl import GRPOConfig

    batch = args.prompts_per_step * args.num_generations
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        # one optimizer step = one generation batch = one micro-batch of all 32 completions
        per_device_train_batch_size=batch,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        num_iterations=1,
        max_completion_length=args.max_completion_length,
        temperature=g["temperature"],
        top_p=1.0,
        beta=g["beta"],
        loss_type=g["loss_type"],
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=g["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        # fp32 on CPU: GRPOConfig defaults to bf16=True and gradient_checkpointing=True, grpo.py on CPU uses neither
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=g["vllm_gpu_memory_utilization"],
        vllm_max_model_length=g["max_prompt_length"] + args.max_completion_length,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        seed=g["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def run(args: BenchArgs, g: dict) -> list:
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    patch_trl_weight_sync()
    patch_trl_vllm_dtype("float32")
    clock = PhaseClock()
    clock.wrap(VLLMGeneration, "sync_weights", "weight_sync")
    clock.wrap(VLLMGeneration, "generate", "generate")
    clock.wrap(GRPOTrainer, "_generate_and_score_completions", "rollout")
    count_update_inputs(GRPOTrainer, clock)
    records = []
    output_dir = tempfile.mkdtemp(prefix="bench_trl_")
    try:
        trainer = GRPOTrainer(
            model=args.model,
            reward_funcs=last_number_reward,
            args=grpo_config(args, g, output_dir),
            train_dataset=load_gsm8k(args.dataset, g["prompt_suffix"]),
            callbacks=[make_step_callback(clock, records)],
        )
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return records


def versions() -> dict:
    import transformers
    import trl
    import vllm

    return {"trl": trl.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def median(records: list, key: str) -> float | None:
    """Median of `key` over steps 2..N (all steps if there is only one)."""
    values = [r[key] for r in (records[1:] or records) if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(args: BenchArgs, g: dict, records: list) -> dict:
    keys = ["step_s", "weight_sync_s", "generate_s", "rollout_other_s", "update_s", "completion_mean_length", "rows",
            "real_tokens", "positions"]
    return {
        "script": "TRL GRPOTrainer",
        "settings": {**asdict(args), **g, "completions_per_step": args.prompts_per_step * args.num_generations,
                     "micro_batch_size": args.prompts_per_step * args.num_generations,
                     "gradient_accumulation_steps": 1, "num_iterations": 1, "dtype": "float32", "device": "cpu",
                     "vllm_mode": "colocate", "torch_threads": torch.get_num_threads(),
                     "env": {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                                                           "OMP_NUM_THREADS")}},
        "versions": versions(),
        "median_steps": f"2..{len(records)}" if len(records) > 1 else "1",
        "median": {k: median(records, k) for k in keys},
        "rewards": [r.get("reward") for r in records],
        "steps": records,
        "not_matched": NOT_MATCHED,
        "patched": ["trl.generation.vllm_generation.VLLMGeneration.sync_weights → "
                    "llm.collective_rpc('reload_weights') + repack of the tied lm_head",
                    "trl.generation.vllm_generation.LLM → LLM(..., dtype='float32') (TRL passes no dtype)"],
    }


def markdown(result: dict) -> str:
    s, v, m = result["settings"], result["versions"], result["median"]
    lines = [
        f"# TRL GRPOTrainer, {os.path.basename(s['model'])}, CPU fp32, colocated vLLM",
        "",
        f"TRL {v['trl']}, vLLM {v['vllm']}, torch {v['torch']}, transformers {v['transformers']}; "
        f"{s['torch_threads']} torch threads.",
        f"{s['prompts_per_step']} prompts × G = {s['num_generations']} = {s['completions_per_step']} completions per "
        f"step (one micro-batch), ≤ {s['max_completion_length']} tokens, β = {s['beta']}, loss {s['loss_type']}, "
        f"μ = 1, T = {s['temperature']}, lr {s['learning_rate']} constant, seed {s['seed']}, "
        f"IS correction {'on' if s['vllm_importance_sampling_correction'] else 'off'}.",
        "",
        f"| median over steps {result['median_steps']} | seconds |",
        "|---|---|",
        f"| whole step | {fmt(m['step_s'])} |",
        f"| weight sync | {fmt(m['weight_sync_s'], 3)} |",
        f"| vLLM generate | {fmt(m['generate_s'])} |",
        f"| rest of rollout (reward, tokenising, …) | {fmt(m['rollout_other_s'], 3)} |",
        f"| update (forward, backward, optimizer) | {fmt(m['update_s'])} |",
        f"| mean completion length (tokens) | {fmt(m['completion_mean_length'], 1)} |",
        "",
        "| step | step s | sync s | generate s | rollout other s | update s | reward | mean length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        lines.append(f"| {r['step']} | {fmt(r['step_s'])} | {fmt(r['weight_sync_s'], 3)} | {fmt(r['generate_s'])} | "
                     f"{fmt(r['rollout_other_s'], 3)} | {fmt(r['update_s'])} | {fmt(r.get('reward'), 3)} | "
                     f"{fmt(r.get('completion_mean_length'), 1)} |")
    lines += ["", "Patched at runtime (bench_trl.py, not site-packages):"] + [f"- {x}" for x in result["patched"]]
    lines += ["", "Not matched with grpo.py:"]
    lines += [f"- {x}" for x in result["not_matched"]]
    return "\n".join(lines) + "\n"


def main(args: BenchArgs) -> None:
    g = grpo_settings()
    records = run(args, g)
    result = summarize(args, g, records)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
