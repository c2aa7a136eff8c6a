"""Where the update's time goes: grpo.py's own `update_policy` on one fixed rollout, under each DeepSpeed setting
against the same code on a plain model (no DeepSpeed), and a torch.profiler table of one update. Writes OUT.json
and OUT.md.

    python bench/update_profile.py --model DIR [--out bench/results/update_profile]

The rollout is shaped like bench_gpu.py's throughput runs: 64 sequences (prompts of 80–160 random tokens,
completions of 256), 4 padded micro-batches of 16, one optimizer step, β 0, dapo, μ 1. Each variant runs in a
process of its own (its DeepSpeed engine, its CUDA context): one warm-up update, then the median of --repeats,
in seconds per update and real tokens per second. Variants:

  plain           update_policy on the bare transformers model and torch AdamW (no DeepSpeed)
  zeroN           the scripts' DeepSpeed setup at --zero-stage N: bf16 weights; with ZeRO, fp32 gradient
                  accumulation and reduction; at stage 3 decoder layers as leaf modules and, with gradient
                  checkpointing, plain F.linear (docs/algorithms.md (6.8))
  _dsdefault      ZeRO-3 with DeepSpeed's defaults instead: hooks on every module, its memory-efficient Linear
  _noleaf         decoder layers not made leaf modules (hooks on every module), set here by stubbing DeepSpeed's
                  set_z3_leaf_modules in the variant's process
  _mel            DeepSpeed's memory-efficient Linear on
  _bf16grad       DeepSpeed's default bf16 gradient accumulation and reduction
  _persist        stage3_param_persistence_threshold above the largest tensor: nothing partitioned, so no
                  gather or release per module (the fetch machinery's share)
  _ckpt / _nockpt gradient checkpointing on / off (the scripts' default on GPU is on)
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import tyro
from common import ROOT, with_pythonpath

VARIANTS = ["plain_ckpt", "zero3_ckpt", "zero3_dsdefault_ckpt", "zero3_noleaf_ckpt", "zero3_mel_ckpt", "zero2_ckpt",
            "zero0_ckpt", "plain_nockpt", "zero3_nockpt", "zero3_dsdefault_nockpt"]


@dataclass
class Args:
    model: str
    """a local model directory (e.g. bench_gpu.py's /tmp/bench_gpu/models/qwen0.5b)"""
    out: str = "bench/results/update_profile"
    """results go to OUT.json and OUT.md"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """which settings to time (see the module docstring)"""
    profile: list[str] = field(default_factory=lambda: ["zero3_ckpt", "zero3_dsdefault_ckpt", "plain_ckpt"])
    """variants of which one update is also recorded by torch.profiler"""
    repeats: int = 3
    """timed updates per variant (after one warm-up)"""
    sequences: int = 64
    """sequences in the rollout"""
    completion_length: int = 256
    """tokens per completion"""
    micro_batch: int = 16
    """sequences per micro-batch"""
    timeout: int = 300
    """seconds per variant"""
    deadline: float = 0
    """seconds after the start past which no new variant begins (0: none)"""
    variant: str = ""
    """internal: run this one variant in this process and print its result"""


class PlainEngine:
    """What update_policy asks of a DeepSpeed engine: forward, backward, and an optimizer step at the end of each
    optimizer step's micro-batches (the accumulation boundary update_policy sets), with the last one's gradient norm."""

    def __init__(self, model, optimizer):
        self.module, self.optimizer, self.boundary, self.norm = model, optimizer, True, None

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def set_gradient_accumulation_boundary(self, boundary):
        self.boundary = boundary

    def step(self):
        if self.boundary:
            self.norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.norm


def one_variant(args: Args) -> dict:
    """Time grpo.update_policy under args.variant, in this process."""
    import torch.distributed as dist

    import grpo

    grpo.init_distributed()  # a world of one (and, on CPU, no shared-memory file left behind)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = args.variant
    stage = None if name.startswith("plain") else int(name[4])
    accumulation = args.sequences // args.micro_batch
    gargs = grpo.Args(model=args.model, beta=0.0, loss_type="dapo", micro_batch_size=args.micro_batch,
                      max_completion_length=args.completion_length, zero_stage=stage if stage is not None else 3,
                      gradient_checkpointing="on" if name.endswith("_ckpt") else "off", learning_rate=1e-6)
    gargs.epsilon_high = gargs.epsilon
    if "_noleaf" in name or "_dsdefault" in name:  # DeepSpeed's hooks on every module: no decoder layer made a leaf
        grpo.deepspeed.utils.set_z3_leaf_modules = lambda model, classes: None
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if stage is None:
        model = grpo.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        grpo.use_logprob_forward(model)  # the scripts' log-probs (docs/algorithms.md (6.3))
        if gargs.gradient_checkpointing == "on":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        engine = PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-6))
    else:
        config = grpo.deepspeed_config(gargs, on_gpu, accumulation)
        if "_bf16grad" in name:
            config.pop("data_types", None)
            config.pop("communication_data_type", None)
        if "_persist" in name:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 10**10
        if "_mel" in name or "_dsdefault" in name:
            config["zero_optimization"]["memory_efficient_linear"] = True
        engine, _ = grpo.setup_models(gargs, config, dtype, total_updates=10)
    g = torch.Generator().manual_seed(0)
    hi = min(30000, grpo.AutoConfig.from_pretrained(args.model).vocab_size)
    prompts = [torch.randint(3, hi, (int(torch.randint(80, 161, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.sequences)]
    completions = [torch.randint(3, hi, (args.completion_length,), generator=g).tolist()
                   for _ in range(args.sequences)]
    rollout = grpo.Rollout(prompt_ids=prompts, completion_ids=completions,
                           advantages=torch.randn(args.sequences, generator=g),
                           loss_mask=grpo.completion_mask([len(c) for c in completions]),
                           sampler_logp=torch.zeros(args.sequences, args.completion_length))
    plan = grpo.update_plan(rollout, gargs, g, device)
    real = sum(len(p) + len(c) for p, c in zip(prompts, completions))

    def update():
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        grpo.update_policy(engine, rollout, plan, gargs, grpo.Metrics(), device)
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    update()  # warm-up
    times = [update() for _ in range(args.repeats)]
    norm = engine.get_global_grad_norm()
    seconds = statistics.median(times)
    result = {"seconds": round(seconds, 4), "all_seconds": [round(t, 4) for t in times],
              "grad_norm": None if norm is None else float(norm), "real_tokens": real,
              "tokens_per_s": round(real / seconds),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}
    if name in args.profile:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            update()
        events = prof.key_averages()
        result["profile_cpu"] = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        if on_gpu:
            result["profile_cuda"] = events.table(sort_by="self_device_time_total", row_limit=25,
                                                  max_name_column_width=60)
        # the operators' self times summed, as the table's totals (a kernel counts once, under the op that launched it)
        ops = [e for e in events if e.device_type == DeviceType.CPU]
        device_ms = sum(e.self_device_time_total for e in ops) / 1e3
        result["profile_total_ms"] = {"cpu": round(sum(e.self_cpu_time_total for e in ops) / 1e3, 1),
                                      "device": round(device_ms, 1) if on_gpu else None}
    dist.destroy_process_group()
    return result


def write(args: Args, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# grpo.update_policy, {result['device']}", "",
             f"{args.sequences} sequences × (80–160 + {args.completion_length}) tokens, "
             f"micro-batch {args.micro_batch}, padded, one optimizer step, β 0; "
             f"median of {args.repeats} after a warm-up", "",
             *([result["note"], ""] if result.get("note") else []),
             "| variant | s/update | real tokens/s | × plain, same checkpointing | peak GiB "
             "| profiler: CPU ms, GPU kernel ms (self times) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        if "seconds" not in r:
            lines.append(f"| {name} | failed | | | | |")
            continue
        p = r.get("profile_total_ms")
        prof = f"{p['cpu']}, {p['device']}" if p else ""
        base = result["variants"].get("plain_" + name.rsplit("_", 1)[1], {}).get("seconds")  # same checkpointing
        ratio = f"{r['seconds'] / base:.2f}" if base else ""
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']} | {ratio} | {r['peak_gib']} | {prof} |")
    for name, r in result["variants"].items():
        for key in ("profile_cpu", "profile_cuda"):
            if key in r:
                lines += ["", f"## {name}: {key.replace('profile_', '')} time, top 25 ops", "", "```", r[key], "```"]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    args = tyro.cli(Args)
    if args.variant:
        print("RESULT " + json.dumps(one_variant(args)), flush=True)
        return
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              "torch": torch.__version__, "args": vars(args), "variants": {}, "skipped": []}
    for name in args.variants:
        if args.deadline and time.perf_counter() - start > args.deadline:
            result["skipped"].append(name)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--variant", name,
               "--repeats", str(args.repeats), "--sequences", str(args.sequences), "--completion-length",
               str(args.completion_length), "--micro-batch", str(args.micro_batch), "--profile", *args.profile]
        try:
            env = with_pythonpath(ROOT)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"rc": proc.returncode, "error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {args.timeout} s"}
        result["variants"][name] = r
        print(name, {k: v for k, v in r.items() if not k.startswith("profile_")}, flush=True)
        write(args, result)
    write(args, result)
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
