"""Evaluate checkpoints or hub models on math benchmarks: accuracy (avg@n, pass@k, maj@n) and the
tokens spent, with vLLM, the training scripts' prompt template, and rewards.py's correctness.

    python eval.py --model runs/grpo__1__1795308138/checkpoint-200 --model Qwen/Qwen2.5-0.5B-Instruct \
        --datasets gsm8k math500 --n 4 --temperature 0.6
    python eval.py --model $MODEL --datasets gsm8k aime24 --data-dir DIR    # no hub: DIR holds gsm8k_test.jsonl, ...
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in the process that makes it

import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Annotated, Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

import rewards
from grpo import build_prompt, stop_token_ids  # the training scripts' prompt and stops


@dataclass
class Args:
    model: Annotated[list[str], tyro.conf.UseAppendAction]
    """a checkpoint directory or hub id; repeat --model to compare models"""
    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "math500"])
    """presets (gsm8k math500 aime24 amc23 minerva olympiadbench svamp multiarith) or .jsonl/.parquet files"""
    data_dir: Optional[str] = None
    """load presets from this directory, a directory of <name>_test.jsonl files (gsm8k_test.jsonl, ...), instead
    of the hub"""
    question_field: Optional[str] = None
    """question column of .jsonl/.parquet files that are not presets"""
    answer_field: Optional[str] = None
    """gold-answer column of .jsonl/.parquet files that are not presets"""
    limit: Optional[int] = None
    """evaluate only the first K problems of each data set"""
    n: int = 1
    """samples per problem (avg@n, pass@k for k ≤ n, maj@n)"""
    temperature: float = 0.0
    """sampling temperature (0: greedy)"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    max_tokens: int = 1024
    """most tokens per completion (the budget)"""
    prompt_suffix: str = " Please reason step by step, and put your final answer within \\boxed{}."
    """appended to every question (as the training scripts' --prompt-suffix)"""
    last_number_fallback: bool = False
    """score the last number of a completion that has no \\boxed{} answer (for small models that do not box)"""
    seed: int = 0
    """sampling seed"""
    use_vllm: bool = True
    """generate with vLLM (else transformers generate)"""
    vllm_gpu_memory_utilization: Optional[float] = None
    """fraction of GPU memory vLLM may take (default 0.85; on CPU vLLM checks it against main memory: default 0.3)"""
    hf_batch_size: int = 8
    """prompts per transformers generate call (fallback only)"""
    output_dir: str = "eval_results"
    """results.json, results.md and one completions JSONL per model × data set go here"""
    track: bool = False
    """log the results to Weights & Biases"""
    wandb_project_name: str = "grpo-eval"
    """the wandb project"""


# Where each benchmark lives and which fields hold question and gold (first match wins; hub
# copies and local files name them differently). SVAMP's question is Body + " " + Question.
PRESETS = {
    "gsm8k": dict(hub=("openai/gsm8k", "main", "test"), file="gsm8k_test.jsonl", q=("question",), a=("answer",)),
    "math500": dict(
        hub=("HuggingFaceH4/MATH-500", None, "test"),
        file="math500_test.jsonl",
        q=("problem",),
        a=("answer", "solution"),
    ),
    "aime24": dict(
        hub=("HuggingFaceH4/aime_2024", None, "train"), file="aime24_test.jsonl", q=("problem",), a=("answer",)
    ),
    "amc23": dict(
        hub=("math-ai/amc23", None, "test"), file="amc23_test.jsonl", q=("problem", "question"), a=("answer",)
    ),
    "minerva": dict(
        hub=("math-ai/minervamath", None, "test"),
        file="minerva_math_test.jsonl",
        q=("problem", "question"),
        a=("solution", "answer"),
    ),
    "olympiadbench": dict(
        hub=("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
        file="olympiadbench_test.jsonl",
        q=("question",),
        a=("final_answer",),
    ),
    "svamp": dict(hub=("ChilleD/SVAMP", None, "test"), file="svamp_test.jsonl", q=("Body+Question",), a=("Answer",)),
    "multiarith": dict(
        hub=("ChilleD/MultiArith", None, "test"),
        file="multiarith_test.jsonl",
        q=("input", "question"),
        a=("target", "final_ans"),
    ),
}


# --- metrics (pure, tested) -----------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021: 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_key(completion: str, last_number_fallback: bool = False) -> Optional[str]:
    r"""The voted answer of a completion: its last \boxed{} content (or last number, with the
    fallback), whitespace-normalised."""
    ans = rewards.extract_answer(completion, last_number_fallback)
    return None if ans is None else " ".join(ans.split())


def majority_correct(completions: list, gold: str, last_number_fallback: bool = False) -> bool:
    r"""maj@n: the most frequent answer is correct. Answers vote in classes of equal ones: an answer joins the first
    class whose first answer rewards.is_correct holds equal to it (0.5 and \frac{1}{2}; one over
    MAX_ANSWER_CHARS only by its text, unparsed); the first seen wins ties; no answer never wins."""
    votes = {}  # a class's first answer -> its size
    for key in (answer_key(c, last_number_fallback) for c in completions):
        if key is not None:
            same = (f for f in votes if key == f or (len(f) <= rewards.MAX_ANSWER_CHARS and rewards.is_correct(key, f)))
            first = next(same, key)
            votes[first] = votes.get(first, 0) + 1
    return bool(votes) and rewards.is_correct(max(votes, key=votes.get), gold)


def ks_for(n: int) -> list[int]:
    return sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n} | {n})


def summarise(problems: list, n: int) -> dict:
    """Every reported number for one model × data set."""
    lengths = [L for p in problems for L in p["lengths"]]
    correct_lengths = [L for p in problems for L, ok in zip(p["lengths"], p["correct"]) if ok]
    out = {f"avg@{n}": statistics.mean(sum(p["correct"]) / n for p in problems)}
    for k in ks_for(n):
        out[f"pass@{k}"] = statistics.mean(pass_at_k(n, sum(p["correct"]), k) for p in problems)
    out[f"maj@{n}"] = statistics.mean(float(p["majority_correct"]) for p in problems)
    out["tokens_mean"] = statistics.mean(lengths)
    out["tokens_median"] = statistics.median(lengths)
    out["tokens_correct_mean"] = statistics.mean(correct_lengths) if correct_lengths else float("nan")
    out["problems"] = len(problems)
    return out


# --- data --------------------------------------------------------------------------------------


def _field(row: dict, names) -> Optional[object]:
    for name in names:
        if name == "Body+Question" and "Body" in row and "Question" in row:
            return f"{str(row['Body']).strip()} {str(row['Question']).strip()}"
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def load_problems(name: str, args: Args) -> tuple[list, int]:
    """(problems with question and gold, rows skipped for a missing field or an unparseable gold)."""
    import datasets

    preset = PRESETS.get(name)
    try:
        if preset and args.data_dir:
            path = os.path.join(args.data_dir, preset["file"])
            if not os.path.isfile(path):
                raise SystemExit(f"--data-dir {args.data_dir}: no {preset['file']} for {name}")
            ds = datasets.load_dataset("json", data_files=path, split="train")
        elif preset:
            path, config, split = preset["hub"]
            ds = datasets.load_dataset(path, config, split=split)
        elif os.path.splitext(name)[1] in (".jsonl", ".json", ".parquet"):
            if not os.path.isfile(name):
                raise SystemExit(f"--datasets {name}: no such file")
            ds = datasets.load_dataset(
                "parquet" if name.endswith(".parquet") else "json", data_files=name, split="train"
            )
        else:
            raise SystemExit(f"--datasets {name}: not a preset ({', '.join(PRESETS)}) nor a .jsonl/.parquet file")
    except SystemExit:
        raise
    except Exception as e:
        raise SystemExit(
            f"--datasets {name}: cannot load it ({type(e).__name__}: {str(e)[:200]}). Without a hub, "
            "give --data-dir DIR, a directory of <name>_test.jsonl files (gsm8k_test.jsonl, math500_test.jsonl, ...)."
        ) from None
    q_names = (
        (args.question_field,) if args.question_field else (preset["q"] if preset else ("question", "problem", "input"))
    )
    a_names = (
        (args.answer_field,)
        if args.answer_field
        else (preset["a"] if preset else ("answer", "solution", "final_answer"))
    )
    problems, skipped = [], 0
    for i, row in enumerate(ds):
        if args.limit is not None and len(problems) >= args.limit:
            break
        question, gold = _field(row, q_names), rewards.extract_gold(_field(row, a_names))
        if question is None or not rewards.gold_is_scorable(gold):
            skipped += 1
            continue
        problems.append({"index": i, "question": str(question), "gold": gold})
    return problems, skipped


# --- checks before any model loads --------------------------------------------------------------


def flag_errors(args: Args) -> list[str]:
    """What vLLM or transformers would reject about these flags, each naming the flag and the fix.

    They would raise only at generation, after minutes of model loading, and in their own words
    (``n must be 1 when using greedy sampling``); here the run stops before anything loads.
    """
    errors = []
    if args.n < 1:
        errors.append(f"--n {args.n}: samples per problem must be >= 1 (e.g. --n 1)")
    elif args.n > 1 and args.temperature == 0:
        errors.append(
            f"--n {args.n} with --temperature 0: greedy decoding gives n identical samples (vLLM and "
            "transformers refuse it); sample with e.g. --temperature 0.6, or evaluate greedily with --n 1"
        )
    if not args.temperature >= 0:  # also catches nan
        errors.append(f"--temperature {args.temperature}: must be >= 0 (0: greedy; e.g. --temperature 0.6 to sample)")
    elif args.use_vllm and args.temperature > 2:
        errors.append(
            f"--temperature {args.temperature}: vLLM accepts at most 2; give --temperature 2 or less, "
            "or generate with transformers (--no-use-vllm)"
        )
    if not 0 < args.top_p <= 1:
        errors.append(f"--top-p {args.top_p}: must be in (0, 1] (1 keeps every token; e.g. --top-p 0.95)")
    if args.max_tokens < 1:
        errors.append(f"--max-tokens {args.max_tokens}: the completion budget must be >= 1 (e.g. --max-tokens 1024)")
    if args.limit is not None and args.limit < 1:
        errors.append(f"--limit {args.limit}: must be >= 1 (leave it out to evaluate every problem)")
    memory = args.vllm_gpu_memory_utilization
    if memory is not None and not 0 < memory <= 1:
        errors.append(
            f"--vllm-gpu-memory-utilization {memory}: a fraction of the memory, must be in (0, 1] "
            "(e.g. 0.85; leave it out for the default)"
        )
    if args.hf_batch_size < 1:
        errors.append(
            f"--hf-batch-size {args.hf_batch_size}: prompts per generate call must be >= 1 (e.g. --hf-batch-size 8)"
        )
    return errors


def max_positions(config, tokenizer) -> tuple[Optional[int], str]:
    """The longest sequence (prompt + completion) a model takes, and the setting that says so: as vLLM
    derives its default max_model_len (and refuses a longer one), max_position_embeddings (n_positions for
    GPT-2) times a linear/dynamic RoPE scaling factor, capped by the tokenizer's model_max_length."""
    key = next((k for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None)
    if key is None:
        return None, ""
    limit, name = getattr(config, key), f"{key} ({getattr(config, key)})"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    scaled = isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("linear", "dynamic")
    if scaled and rope.get("factor"):
        limit, name = int(limit * rope["factor"]), f"{name} x RoPE factor {rope['factor']}"
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max_length, int) and model_max_length < limit:
        limit, name = model_max_length, f"the tokenizer's model_max_length ({model_max_length})"
    return limit, name


def length_error(model: str, config, tokenizer, longest: dict, args: Args) -> Optional[str]:
    """Whether each data set's longest prompt plus --max-tokens fits the model (None) or what to change.

    Past it vLLM refuses the prompt or silently cuts the budget, and transformers runs positions the
    model never saw, so the reported token budget would not be the one used.
    """
    limit, name = max_positions(config, tokenizer)
    if limit is None:
        return None
    for data_name, prompt_tokens in longest.items():
        if prompt_tokens + args.max_tokens > limit:
            room = limit - prompt_tokens
            fix = f"lower --max-tokens to {room} or less" if room >= 1 else "the prompt alone is too long"
            return (
                f"--max-tokens {args.max_tokens}: the longest prompt of {data_name} has {prompt_tokens} tokens, "
                f"and {prompt_tokens} + {args.max_tokens} exceeds {model}'s {name}, which vLLM does not go past; "
                f"{fix}, or leave out the longest prompts (--limit, a shorter --prompt-suffix)"
            )
    return None


# --- generation ---------------------------------------------------------------------------------


def seed_call(args: Args, index: int) -> None:
    """Seeds the generation call of data set `index` (a seed per data set, a function of --seed): requests carry no
    seed (vLLM gave child j of every request seed + j, one stream per sample index), so vLLM's V1 model runner draws
    every row's noise from this process's torch generator and the V2 runner every request's seed from numpy's."""
    seed = int(np.random.SeedSequence([args.seed, index]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)


def generate_vllm(llm, prompt_ids: list, args: Args, stop_ids: list, index: int) -> list:
    """One batched call for data set `index`: n completions per prompt as (token ids, text). A completion
    that ends at a stop id keeps it among its token ids (vLLM treats stop_token_ids as it does EOS:
    the id is counted, only its text is left out), as generate_hf does."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        stop_token_ids=stop_ids,
    )
    seed_call(args, index)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=True)
    return [[(list(o.token_ids), o.text) for o in out.outputs] for out in outs]


def vllm_samples(model_name: str, prompt_ids: dict, args: Args, stop_ids: list) -> dict:
    """Every data set's samples from one vLLM engine of the model. main() runs it in a child process per model: an
    engine released in-process leaves memory behind, and vLLM's CPU build then sizes the next model's KV cache from
    what is left (RAM × utilization − this process's memory), too small to start."""
    from vllm import LLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    memory = args.vllm_gpu_memory_utilization or (0.85 if torch.cuda.is_available() else 0.3)
    engine = LLM(model=model_name, dtype=dtype, seed=args.seed, generation_config="vllm", gpu_memory_utilization=memory)
    return {name: generate_vllm(engine, ids, args, stop_ids, i) for i, (name, ids) in enumerate(prompt_ids.items())}


def hf_samples(model_name: str, tokenizer, prompt_ids: dict, args: Args, stop_ids: list) -> dict:
    """As vllm_samples, with transformers, in this process."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    model.to(device).eval()
    return {
        name: generate_hf(model, tokenizer, ids, args, stop_ids, i) for i, (name, ids) in enumerate(prompt_ids.items())
    }


@torch.no_grad()
def generate_hf(model, tokenizer, prompt_ids: list, args: Args, stop_ids: list, index: int) -> list:
    """As generate_vllm, with transformers (every row its own draws from one stream): a completion is cut after its
    first stop id."""
    seed_call(args, index)
    pad = tokenizer.pad_token_id
    greedy = args.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else args.temperature,
        top_p=None if greedy else args.top_p,
        top_k=None if greedy else 0,
        max_new_tokens=args.max_tokens,
        num_return_sequences=args.n,
        eos_token_id=stop_ids,
        pad_token_id=pad,
    )
    results = []
    for s in tqdm(range(0, len(prompt_ids), args.hf_batch_size), desc="generate", leave=False):
        chunk = prompt_ids[s : s + args.hf_batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        attn = (
            (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None])
            .long()
            .to(model.device)
        )
        rows = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)[:, width:].tolist()
        for j in range(len(chunk)):
            samples = []
            for row in rows[j * args.n : (j + 1) * args.n]:
                cut = next((t + 1 for t, tok in enumerate(row) if tok in stop_ids), len(row))
                samples.append((row[:cut], tokenizer.decode(row[:cut], skip_special_tokens=True)))
            results.append(samples)
    return results


# --- main -----------------------------------------------------------------------------------------


def write_results(results: dict, args: Args) -> tuple[list, str]:
    """results.json and results.md (the table a paper would print, with the protocol next to the numbers), written
    under temporary names and renamed; returns the table's columns and text."""
    n = args.n
    cols = (
        [f"avg@{n}"]
        + [f"pass@{k}" for k in ks_for(n) if k > 1]
        + [f"maj@{n}", "tokens_mean", "tokens_median", "tokens_correct_mean", "problems", "rows_skipped"]
    )
    lines = [
        f"Protocol: the training prompt, temperature={args.temperature}, top_p={args.top_p}, n={n}, "
        f"max_tokens={args.max_tokens}, seed={args.seed}"
        + (f", limit={args.limit}" if args.limit else "")
        + (", last-number fallback" if args.last_number_fallback else ""),
        "",
        "| model | data set | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for model_name, per_data in results["results"].items():
        for name, s in per_data.items():
            cells = [
                f"{100 * s[c]:.1f}"
                if c.startswith(("avg@", "pass@", "maj@"))
                else (f"{s[c]:.0f}" if isinstance(s[c], (int, float)) and not math.isnan(s[c]) else "-")
                for c in cols
            ]
            lines.append(f"| {model_name} | {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    for name, text in (("results.json", json.dumps(results, indent=2)), ("results.md", table + "\n")):
        path = os.path.join(args.output_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return cols, table


def main() -> None:
    args = tyro.cli(Args)
    errors = flag_errors(args)
    if errors:
        raise SystemExit("\n".join(errors))
    configs = {}
    for m in args.model:  # every model is checked before any work starts
        try:
            configs[m] = AutoConfig.from_pretrained(m)
        except Exception as e:
            raise SystemExit(
                f"--model {m}: cannot load it ({type(e).__name__}); give a checkpoint directory "
                "(config.json, weights, tokenizer) or a hub id with the hub reachable"
            ) from None
    data = {name: load_problems(name, args) for name in args.datasets}
    for name, (problems, skipped) in data.items():
        if not problems:
            raise SystemExit(f"--datasets {name}: no usable problems ({skipped} rows skipped)")
    # per model: tokenizer, stop ids, and every prompt, so that the length check comes before any weights load
    prepared = {}
    for model_name in args.model:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = {
            name: [build_prompt(tokenizer, p["question"], args.prompt_suffix) for p in problems]
            for name, (problems, _) in data.items()
        }
        prompt_ids = {name: tokenizer(texts, add_special_tokens=False)["input_ids"] for name, texts in prompts.items()}
        longest = {name: max(len(ids) for ids in per_data) for name, per_data in prompt_ids.items()}
        error = length_error(model_name, configs[model_name], tokenizer, longest, args)
        if error:
            raise SystemExit(error)
        prepared[model_name] = (tokenizer, stop_token_ids(model_name, tokenizer), prompts, prompt_ids)
    if args.use_vllm:
        try:
            import vllm  # noqa: F401
        except Exception as e:
            print(f"vLLM is not importable ({type(e).__name__}: {e}); generating with transformers instead")
            args.use_vllm = False
    os.makedirs(args.output_dir, exist_ok=True)
    results = {"settings": asdict(args), "date": time.strftime("%Y-%m-%d %H:%M"), "results": {}}
    for model_name in tqdm(args.model, desc="models"):
        tokenizer, stop_ids, model_prompts, model_prompt_ids = prepared[model_name]
        if args.use_vllm:  # a child process per model gives all of its engine's memory back when it ends
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                samples = child.submit(vllm_samples, model_name, model_prompt_ids, args, stop_ids).result()
        else:
            samples = hf_samples(model_name, tokenizer, model_prompt_ids, args, stop_ids)
        for name, (problems, skipped) in data.items():
            rows = []
            for p, prompt, outs in zip(problems, model_prompts[name], samples[name]):
                texts = [t for _, t in outs]
                rows.append(
                    {
                        **p,
                        "prompt": prompt,
                        "completions": texts,
                        "lengths": [len(ids) for ids, _ in outs],
                        "answers": [answer_key(t, args.last_number_fallback) for t in texts],
                        "correct": [
                            rewards.is_correct(answer_key(t, args.last_number_fallback), p["gold"]) for t in texts
                        ],
                        "majority_correct": majority_correct(texts, p["gold"], args.last_number_fallback),
                    }
                )
            summary = summarise(rows, args.n)
            summary["rows_skipped"] = skipped
            label = name if name in PRESETS else os.path.basename(name)
            results["results"].setdefault(model_name, {})[label] = summary
            safe = model_name.strip("/").replace("/", "__")
            with open(os.path.join(args.output_dir, f"{safe}__{label}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        cols, table = write_results(results, args)  # after every model: a later failure loses nothing
    print(table)
    if args.track:
        import wandb

        run = wandb.init(project=args.wandb_project_name, config=asdict(args), job_type="eval")
        run.log(
            {f"{m}/{d}/{k}": v for m, per in results["results"].items() for d, s in per.items() for k, v in s.items()}
        )
        run.log(
            {
                "results": wandb.Table(
                    columns=["model", "data set"] + cols,
                    data=[
                        [m, d] + [s[c] for c in cols] for m, per in results["results"].items() for d, s in per.items()
                    ],
                )
            }
        )
        run.finish()


if __name__ == "__main__":
    main()
