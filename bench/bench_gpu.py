"""The CUDA path, on one GPU: every algorithm script for a few steps under DeepSpeed ZeRO-3 in bf16, launched with
`python` and with `deepspeed --num_gpus 1`, on two locally built models (SmolLM2-135M's and Qwen2.5-0.5B's
architecture); then the update's throughput on the 0.5B-shaped model. Writes OUT.json and OUT.md.

    python bench/bench_gpu.py --smollm2 $(tools/prepare_smollm2.sh) --dataset data/gsm8k_sample.jsonl \
        --out bench/results/gpu

Each run is checked for: exit status 0; a finite policy loss and reward at every step; weights of the final
checkpoint that differ from the initial ones; the peak GPU memory (the scripts' memory/peak_gib). Runs
named in --resume-check also restart from their step-1 checkpoint with --resume, and the resumed step 2 is compared
with the uninterrupted one. The throughput is the update's real (non-padding) tokens per second, from the scripts'
own `time/update` and `update/real_tokens`, beside a plain transformers forward + backward + AdamW of the same real
tokens in the same micro-batches (no DeepSpeed, no log-prob code of ours), and bench/update_profile.py on the same
model (the scripts' update_policy under each DeepSpeed setting against a plain model, with a profiler table).

--smollm2 may hold only config.json and the tokenizer: the weights are then random (the checks exercise the
architecture, not what the weights know). The 0.5B-shaped model is always random, with SmolLM2's tokenizer.
Without vLLM, generation goes through tests/fake_vllm (vLLM's calls served by transformers generate). The runs
share the GPU a few at a time (--parallel); the throughput runs go alone, one after the other.

On a GPU machine without network that has torch and transformers but not the rest, the measured run brought
these as wheels (pip install --no-deps --target DIR, then PYTHONPATH=DIR): transformers, tokenizers, datasets,
dill, multiprocess, fsspec, pydantic, pydantic-core, annotated-types, typing-inspection, hjson, tyro,
docstring-parser, typeguard, typing-extensions, math-verify, latex2sympy2-extended, antlr4-python3-runtime (the
versions of requirements.txt), and a DeepSpeed wheel built from its sdist on any machine with
`DS_ACCELERATOR=cuda DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`.
"""

import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import tyro
from common import ROOT, SCRIPTS, flags, with_pythonpath

# a reward a random model earns some of, so that advantages (and updates) are non-zero; AGPO's loss mask wants ±1
REWARD = {"agpo_mask_clip.py": "toy_rewards:parity_pm1"}
# Qwen2.5-0.5B's architecture (its config.json on the hub), random weights
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)


@dataclass
class Args:
    smollm2: str
    """SmolLM2-135M-Instruct directory (tools/prepare_smollm2.sh); config.json and tokenizer suffice"""
    dataset: str
    """training data, a local .jsonl"""
    out: str = "bench/results/gpu"
    """results are written to OUT.json and OUT.md"""
    work: str = "/tmp/bench_gpu"
    """models and runs (checkpoints are deleted once checked)"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """the algorithm scripts to run"""
    models: list[str] = field(default_factory=lambda: ["smollm2", "qwen0.5b"])
    """the models to run them on"""
    launchers: list[str] = field(default_factory=lambda: ["python", "deepspeed"])
    """`python script.py` and `deepspeed --num_gpus 1 script.py`"""
    resume_check: list[str] = field(default_factory=lambda: ["smollm2"])
    """models whose runs also resume from their step-1 checkpoint"""
    steps: int = 2
    """steps per check run"""
    learning_rate: float = 1e-4
    """of the check runs: large enough that one step moves bf16 weights"""
    parallel: int = 8
    """check runs sharing the GPU at a time"""
    parallel_large: int = 2
    """of which runs of the 0.5B-shaped model at most (each final checkpoint with its optimizer state is ~8 GB)"""
    throughput: list[str] = field(default_factory=lambda: ["padded"])
    """grpo.py update throughput runs on the 0.5B-shaped model: padded (ZeRO-3), or padded_zeroN for --zero-stage N;
    the plain yardstick runs right after the first"""
    throughput_steps: int = 4
    """steps per throughput run; figures are medians over steps 2..N"""
    throughput_prompts: int = 8
    """prompts per step of the throughput runs"""
    throughput_model: str = "qwen0.5b"
    """the model of the throughput runs (one of --models)"""
    deadline: float = 0
    """seconds after the start past which no new stage begins (0: none), so that a lease's time limit is never hit
    blind"""
    throughput_generations: int = 8
    """G of the throughput runs"""
    throughput_completion_length: int = 256
    """--max-completion-length of the throughput runs"""
    update_profile: bool = True
    """also run bench/update_profile.py on the throughput model, after the first throughput run (writes
    OUT_update_profile.{json,md})"""
    throughput_micro_batch: int = 16
    """--micro-batch-size of the throughput runs"""
    timeout: int = 400
    """seconds per run"""


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
         "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
        v["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return v


def build_models(args: Args) -> dict:
    """model name → local directory; random weights where none are given."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(args.smollm2)
    paths = {}
    for name in args.models:
        if name == "smollm2" and os.path.isfile(os.path.join(args.smollm2, "model.safetensors")):
            paths[name] = args.smollm2
            continue
        out = os.path.join(args.work, "models", name)
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            if name == "smollm2":
                config = AutoConfig.from_pretrained(args.smollm2)
            elif name == "qwen0.5b":
                config = Qwen2Config(**QWEN05B, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            else:
                raise SystemExit(f"--models: unknown {name!r}; choose from smollm2, qwen0.5b")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(out)
        paths[name] = out
    return paths


def command(script: str, launcher: str, port: int, argv: list) -> list:
    path = os.path.join(ROOT, script)
    if launcher == "deepspeed":  # what the `deepspeed` command runs
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                path, *argv]
    return [sys.executable, path, *argv]


def run(cmd: list, out: str, timeout: int, threads: int = 0) -> dict:
    os.makedirs(out, exist_ok=True)
    fake = [] if vllm_ok() else [os.path.join(ROOT, "tests", "fake_vllm")]  # vLLM's calls served by transformers
    env = with_pythonpath(*fake, os.path.join(ROOT, "tests"))
    if threads:  # runs that share the machine: no CPU oversubscription
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    with open(os.path.join(out, "run.log"), "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "rows": []}
    runs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
    if runs:
        result["run_dir"] = os.path.join(out, runs[0])
        path = os.path.join(result["run_dir"], "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                result["rows"] = [json.loads(line) for line in f]
    if rc != 0:
        with open(os.path.join(out, "run.log")) as f:
            result["log_tail"] = f.read()[-4000:]
    return result


def weight_change(initial: str, checkpoint: str) -> dict:
    """Largest |Δw| and the share of tensors that moved, final checkpoint against the initial weights."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(initial, "model.safetensors")), load_file(os.path.join(checkpoint, "model.safetensors"))
    shared = [k for k in a if k in b]
    moved = [k for k in shared if not a[k].float().equal(b[k].float())]
    return {"tensors": len(shared), "tensors_moved": len(moved),
            "max_abs_change": max((b[k].float() - a[k].float()).abs().max().item() for k in shared) if shared else 0.0}


def check(args: Args, name: str, script: str, launcher: str, model: str, path: str, port: int) -> dict:
    out = os.path.join(args.work, "runs", name)
    shutil.rmtree(out, ignore_errors=True)
    resume = model in args.resume_check
    argv = flags(model=path, dataset=args.dataset, total_steps=args.steps, save_steps=1 if resume else args.steps,
                 prompts_per_step=4, num_generations=4, max_completion_length=32, micro_batch_size=8,
                 learning_rate=args.learning_rate, reward_funcs=REWARD.get(script, "toy_rewards:letter_a"),
                 zero_stage=3, skip_no_signal=False)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    r = run(command(script, launcher, port, argv + ["--output-dir", out]), out, args.timeout, threads)
    rows = r.pop("rows")
    r.update(script=script, launcher=launcher, model=model, steps_logged=len(rows))
    r["finite"] = bool(rows) and all(math.isfinite(m.get("policy_loss", float("nan"))) and math.isfinite(m["reward"])
                                     for m in rows)
    r["policy_loss"] = [m.get("policy_loss") for m in rows]
    r["memory_gib"] = {k.split("/")[1]: round(max(m[k] for m in rows), 3) for k in (rows[0] if rows else {})
                       if k.startswith("memory/")}
    r["time_step_s"] = [round(m["time/step"], 2) for m in rows]
    final = os.path.join(r.get("run_dir", ""), f"checkpoint-{args.steps}")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        r["weights"] = weight_change(path, final)
    if resume and r["rc"] == 0 and len(rows) == args.steps:
        out2 = out + "_resumed"
        shutil.rmtree(out2, ignore_errors=True)
        run_dir2 = os.path.join(out2, os.path.basename(r["run_dir"]))
        os.makedirs(run_dir2)
        shutil.move(os.path.join(r["run_dir"], "checkpoint-1"), os.path.join(run_dir2, "checkpoint-1"))
        shutil.rmtree(out, ignore_errors=True)
        with open(os.path.join(run_dir2, "metrics.jsonl"), "w") as f:
            f.write(json.dumps(rows[0]) + "\n")
        r2 = run(command(script, launcher, port, argv + ["--output-dir", out2, "--resume", run_dir2]), out2,
                 args.timeout, threads)
        rows2 = r2.pop("rows")
        res = {"rc": r2["rc"], "steps": [m["step"] for m in rows2]}
        if r2["rc"] != 0:
            res["log_tail"] = r2.get("log_tail", "")
        if len(rows2) == 2:
            a, b = rows[1], rows2[1]
            keys = [k for k in a if k in b and not k.startswith(("time/", "memory/"))]
            rel = {k: abs(a[k] - b[k]) / max(abs(a[k]), 1e-8) for k in keys
                   if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))}
            res["compared"] = len(rel)
            res["max_rel_diff"] = max(rel.values()) if rel else None
            res["worst"] = sorted(rel, key=rel.get)[-3:]
            res["reward"] = [a["reward"], b["reward"]]
        r["resume"] = res
        shutil.rmtree(out2, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # checkpoints of the larger model are several GB
    r.pop("run_dir", None)
    return r


def plain_update(model: str, real_tokens: int, completion_length: int, micro_batches: int, checkpointing: bool) -> dict:
    """The yardstick: a plain transformers model in bf16, forward + causal-LM loss + backward over `micro_batches`
    padding-free micro-batches holding `real_tokens` random tokens in sequences shaped like a step's, then one AdamW
    step; median of 3 after a warm-up, in a subprocess of its own."""
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {os.path.join(ROOT, "bench")!r})
from common import padding_free_rows
from transformers import AutoModelForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16).to(dev)
if {checkpointing}:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-7)
g = torch.Generator().manual_seed(0)
hi = min(40000, m.config.vocab_size)
prompts, comps, total = [], [], 0
while total < {real_tokens}:
    p = torch.randint(3, hi, (int(torch.randint(80, 161, (1,), generator=g)),), generator=g).tolist()
    c = torch.randint(3, hi, ({completion_length},), generator=g).tolist()
    prompts.append(p); comps.append(c); total += len(p) + len(c)
k = -(-len(prompts) // {micro_batches})
batches = [{{n: torch.tensor(v, device=dev) for n, v in padding_free_rows(prompts[s:s + k], comps[s:s + k]).items()}}
           for s in range(0, len(prompts), k)]  # padding-free rows
times = []
for _ in range(4):
    torch.cuda.synchronize() if dev == "cuda" else None; t = time.perf_counter()
    for b in batches:
        out = m(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["input_ids"])
        out.loss.backward()
    opt.step(); opt.zero_grad()
    torch.cuda.synchronize() if dev == "cuda" else None; times.append(time.perf_counter() - t)
print(json.dumps({{"seconds": sorted(times[1:])[1], "real_tokens": total}}))  # median of 3
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["tokens_per_s"] = round(r["real_tokens"] / r["seconds"])
    return r


def throughput(args: Args, path: str, variant: str, port: int) -> dict:
    out = os.path.join(args.work, "runs", f"throughput_{variant}")
    shutil.rmtree(out, ignore_errors=True)
    if variant.split("_zero")[0] != "padded":
        raise SystemExit(f"--throughput {variant}: expected padded or padded_zeroN")
    argv = flags(model=path, dataset=args.dataset, output_dir=out, total_steps=args.throughput_steps, save_steps=0,
                 beta=0, loss_type="dapo", skip_no_signal=False, prompts_per_step=args.throughput_prompts,
                 num_generations=args.throughput_generations, max_completion_length=args.throughput_completion_length,
                 micro_batch_size=args.throughput_micro_batch, learning_rate="1e-6", reward_funcs="toy_rewards:letter_a")
    if "_zero" in variant:
        argv += ["--zero-stage", variant.split("_zero")[1]]
    r = run(command("grpo.py", "deepspeed", port, argv), out, args.timeout)
    rows = r.pop("rows")[1:]  # step 1: warm-up
    shutil.rmtree(out, ignore_errors=True)
    r.pop("run_dir", None)
    if not rows:
        return r
    med = {k: statistics.median(m[k] for m in rows) for k in ("time/step", "time/generate", "time/logprobs",
                                                              "time/update", "time/weight_sync", "update/real_tokens",
                                                              "update/padding_fraction")}
    r.update({k.replace("/", "_"): round(v, 4) for k, v in med.items()})
    r["steps_measured"] = [m["step"] for m in rows]
    r["update_tokens_per_s"] = round(med["update/real_tokens"] / med["time/update"])
    r["memory_gib"] = {k.split("/")[1]: round(max(m[k] for m in rows), 3) for k in rows[0] if k.startswith("memory/")}
    return r


@functools.cache
def vllm_ok() -> bool:
    return subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode == 0


def write(args: Args, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    v = result["versions"]
    lines = [f"# CUDA path: {v.get('gpu', 'no GPU')}", "",
             f"torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, deepspeed {v['deepspeed']}, "
             f"python {v['python']}, driver {v.get('driver', '?')}; generation: "
             f"{'vLLM' if result['vllm'] else 'transformers (no vLLM)'}; ZeRO-3, bf16.", "",
             "| script | launcher | model | exit | steps | loss finite | tensors moved | max abs Δw | resume (max rel diff of step 2) "
             "| peak GiB generate / logprobs / update / sync | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["checks"]:
        w = r.get("weights", {})
        res = r.get("resume")
        if res is None:
            res_s = "-"
        elif res.get("max_rel_diff") is None:
            res_s = f"rc {res['rc']}"
        else:
            res_s = f"rc {res['rc']}, steps {res['steps']}, {res['max_rel_diff']:.2g}"
        mem = r["memory_gib"]
        mem_s = " / ".join(f"{mem[k + '_peak_gib']:.2f}" for k in ("generate", "logprobs", "update", "weight_sync")
                           if k + "_peak_gib" in mem) or f"{mem.get('peak_gib', float('nan')):.2f}"  # older runs: per phase
        lines.append(f"| {r['script']} | {r['launcher']} | {r['model']} | {r['rc']} | {r['steps_logged']} | "
                     f"{r['finite']} | {w.get('tensors_moved', '-')}/{w.get('tensors', '-')} | "
                     f"{w.get('max_abs_change', float('nan')):.3g} | {res_s} | {mem_s} | "
                     f"{', '.join(str(s) for s in r['time_step_s'])} |")
    if result.get("throughput"):
        lines += ["", f"## Update throughput, grpo.py, {args.throughput_model}, {args.throughput_prompts} prompts × G "
                      f"{args.throughput_generations}, ≤ {args.throughput_completion_length} tokens, micro-batch "
                      f"{args.throughput_micro_batch}, β 0, dapo, `deepspeed --num_gpus 1`, median over the steps listed (1 is "
                      "warm-up)", "",
                  "| run | steps | s/step | generate | logprobs | update | real tokens/step | padding | update "
                  "tokens/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in result["throughput"].items():
            if "time_step" not in r:
                lines.append(f"| {name} | failed (rc {r['rc']}) | | | | | | | | |")
                continue
            lines.append(f"| {name} | {r.get('steps_measured')} | {r['time_step']:.2f} | {r['time_generate']:.2f} | {r['time_logprobs']:.2f} | "
                         f"{r['time_update']:.2f} | {r['update_real_tokens']:.0f} | {r['update_padding_fraction']:.1%} | "
                         f"{r['update_tokens_per_s']} | {r['memory_gib'].get('peak_gib', r['memory_gib'].get('update_peak_gib', float('nan'))):.2f} |")
        for name, r in result.get("plain", {}).items():
            lines.append(f"| {name} | | | | | {r.get('seconds', float('nan')):.2f} | {r.get('real_tokens', 0)} | | "
                         f"{r.get('tokens_per_s', 'failed')} | |")
    profile = result.get("update_profile", {}).get("variants")
    if profile:
        lines += ["", "`bench/update_profile.py`, seconds per update of the same rollout: "
                  + ", ".join(f"{k} {v.get('seconds', 'failed')}" for k, v in profile.items())]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    args = tyro.cli(Args)
    t_start = time.perf_counter()
    late = lambda: args.deadline and time.perf_counter() - t_start > args.deadline  # noqa: E731
    result = {"args": asdict(args), "versions": versions(), "vllm": vllm_ok(), "checks": [], "throughput": {},
              "plain": {}, "skipped": []}
    paths = build_models(args)
    print(f"models built in {time.perf_counter() - t_start:.0f} s: {paths}", flush=True)
    jobs = [(f"{m}_{s[:-3]}_{launcher}", s, launcher, m) for m in args.models for s in args.scripts
            for launcher in args.launchers]
    large = threading.Semaphore(args.parallel_large)

    def job(i, name, s, launcher, m):
        if m != "qwen0.5b":
            return check(args, name, s, launcher, m, paths[m], 29600 + i)
        with large:
            return check(args, name, s, launcher, m, paths[m], 29600 + i)

    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(job, i, *j) for i, j in enumerate(jobs)]
        for f in futures:
            r = f.result()
            result["checks"].append(r)
            print(f"{r['script']} {r['launcher']} {r['model']}: rc {r['rc']} in {r['seconds']} s, "
                  f"finite {r['finite']}, weights {r.get('weights')}, resume {r.get('resume')}", flush=True)
            write(args, result)
    for variant in args.throughput:
        if late():
            result["skipped"].append(f"throughput {variant}")
            continue
        r = result["throughput"][variant] = throughput(args, paths[args.throughput_model], variant, 29590)
        print(f"throughput {variant}: {r}", flush=True)
        write(args, result)
        if r.get("update_real_tokens") and not result["plain"]:
            micro = args.throughput_prompts * args.throughput_generations // args.throughput_micro_batch
            for ckpt in (True, False):
                name = f"plain transformers{' + checkpointing' if ckpt else ''}"
                result["plain"][name] = plain_update(paths[args.throughput_model], int(r["update_real_tokens"]),
                                                     args.throughput_completion_length, micro, ckpt)
                print(f"{name}: {result['plain'][name]}", flush=True)
                write(args, result)
        if args.update_profile and "update_profile" not in result and not late():
            out = args.out + "_update_profile"
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "update_profile.py"), "--model",
                                   paths[args.throughput_model], "--out", out], capture_output=True, text=True,
                                  cwd=ROOT, timeout=4 * args.timeout)
            if proc.returncode == 0:
                with open(out + ".json") as f:
                    result["update_profile"] = json.load(f)
            else:
                result["update_profile"] = {"error": proc.stderr[-3000:]}
            print(f"update_profile: {proc.stdout[-2000:]}", flush=True)
            write(args, result)
    write(args, result)
    print(open(args.out + ".md").read())
    bad = [r for r in result["checks"] if r["rc"] != 0 or not r["finite"] or r.get("resume", {}).get("rc", 0) != 0]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
