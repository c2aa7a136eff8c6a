"""Every completion draws its own random stream (docs/algorithms.md (6.5)): one engine on the tiny model, and each
script's `sample_and_score` on 4 identical prompts × G 4 at temperature 1; the completions' token ids, per script;
grpo.py's call again with the same seed; and the engine asked directly for 4 × 4 with a seed per request (100 + i), the
rule vLLM follows for seeded requests (child j samples with seed + j), which the stand-in engine must follow too.

    python tests/stream_check.py MODEL OUT.json                                   # real vLLM
    PYTHONPATH=tests/fake_vllm python tests/stream_check.py MODEL OUT.json        # the stand-in engine
"""

import importlib
import json
import sys

import torch

SCRIPTS = ("grpo", "agpo_mask_clip", "agpo_adaptive", "a_grpo")


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    grpo = importlib.import_module("grpo")
    from vllm import SamplingParams
    grpo.init_distributed()
    args = grpo.Args(model=model, max_prompt_length=64, max_completion_length=16, num_generations=4,
                     prompts_per_step=4, seed=3)
    tokenizer = grpo.load_tokenizer(args)
    llm = grpo.setup_vllm(args, 0, torch.float32, False)
    stops = grpo.stop_token_ids(model, tokenizer)
    prompt = grpo.build_prompt(tokenizer, "What is 3 + 4?", args.prompt_suffix)
    examples = [{"prompt": prompt, "prompt_ids": tokenizer(prompt)["input_ids"], "answer": "7"}] * 4
    zero = lambda completions, **_: [0.0] * len(completions)  # noqa: E731
    out = {}
    for name in SCRIPTS:
        algo = importlib.import_module(name)
        algo_args = algo.Args(**{k: getattr(args, k) for k in ("model", "max_completion_length", "num_generations",
                                                                 "seed")}, reward_funcs=["zero"])
        generated, _, _, _ = algo.sample_and_score(llm, tokenizer, [zero], examples, [1.0] * 4, 5, algo_args, stops)
        out[name] = [ids for ids, *_ in generated]
    generated, _, _, _ = grpo.sample_and_score(llm, tokenizer, [zero], examples, [1.0] * 4, 5, args, stops)
    out["grpo_again"] = [ids for ids, *_ in generated]
    params = [SamplingParams(n=4, temperature=1.0, max_tokens=16, seed=100 + i) for i in range(4)]
    outs = llm.generate([{"prompt_token_ids": e["prompt_ids"]} for e in examples], params, use_tqdm=False)
    out["seeded"] = [list(o.token_ids) for r in outs for o in r.outputs]
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
