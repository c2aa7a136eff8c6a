"""A stand-in for vLLM, served by transformers: the calls the training scripts make (LLM, generate with one
SamplingParams per prompt, collective_rpc("reload_weights"), sleep, wake_up), so a script runs unchanged where
vLLM is not installed (the GPU machine: `PYTHONPATH=tests/fake_vllm`) and the tiny-model tests run fast.

Sampling follows vLLM's: the request's temperature, then top-p, no top-k, stop at any
stop token (kept), finish_reason "length" when max_tokens ran out; an unseeded request draws from the process's
random state, child j of a request with seed s samples with s + j; `logprobs=0` returns each sampled token's
log-prob, after temperature and top-p (logprobs_mode "processed_logprobs") or before (the default, "raw_logprobs").
The engine holds its own copy of the model;
reload_weights copies the trainer's weights into it, so a test through this engine also checks the sync's names.
"""

import os
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, seed=None, max_tokens=16, stop_token_ids=(), logprobs=None,
                 flat_logprobs=False, **_):
        self.n, self.temperature, self.top_p, self.seed, self.logprobs = n, temperature, top_p, seed, logprobs
        self.flat_logprobs = flat_logprobs
        self.max_tokens, self.stop_token_ids = max_tokens, list(stop_token_ids or [])


class LLM:
    def __init__(self, model: str, dtype=None, logprobs_mode="raw_logprobs", **_):
        self.logprobs_mode = logprobs_mode
        if torch.cuda.is_available():  # as vLLM's GPU worker does, for its whole process
            torch.set_float32_matmul_precision(os.environ.get("VLLM_FLOAT32_MATMUL_PRECISION", "highest"))
        self.device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def generate(self, prompts: list, params, use_tqdm: bool = False) -> list:
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._sample(prompt["prompt_token_ids"], p) for prompt, p in zip(prompts, params)]

    def _sample(self, prompt_ids: list, p: SamplingParams):
        ids = torch.tensor([prompt_ids], device=self.device)  # [1, P]
        if p.seed is None:  # vLLM: unseeded requests draw from the process's random state
            out, logps = self._generate(ids, p, p.n)  # [n, P + new], [n, new]
        else:  # vLLM: child j of a seeded request samples with seed + j, the caller's random state left as it was
            out = []
            for j in range(p.n):
                with torch.random.fork_rng(devices=[self.device] if self.device != "cpu" else []):
                    torch.manual_seed(p.seed + j)
                    out.append(self._generate(ids, p, 1))
            logps = torch.nn.utils.rnn.pad_sequence([lp[0] for _, lp in out], batch_first=True)  # [n, new]
            out = torch.nn.utils.rnn.pad_sequence([o[0] for o, _ in out], batch_first=True)  # [n, P + new]
        completions = []
        for row, row_logps in zip(out[:, len(prompt_ids):].tolist(), logps.tolist()):
            cut = next((j + 1 for j, t in enumerate(row) if t in p.stop_token_ids), None)
            row = row[:cut] if cut else row
            logprobs = [{t: SimpleNamespace(logprob=v)} for t, v in zip(row, row_logps)]
            if p.flat_logprobs:  # vLLM's FlatLogprobs: the sampled tokens' log-probs as one list
                logprobs = SimpleNamespace(logprobs=row_logps[: len(row)])
            completions.append(SimpleNamespace(token_ids=row, finish_reason="stop" if cut else "length",
                                               logprobs=logprobs if p.logprobs is not None else None))
        return SimpleNamespace(outputs=completions)

    def _generate(self, ids, p: SamplingParams, n: int):
        """[n, P + new] token ids and [n, new] the log-prob of each new token (HF's scores: after the warpers)."""
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=p.temperature, top_p=p.top_p, top_k=0, max_new_tokens=p.max_tokens,
                                  num_return_sequences=n, eos_token_id=p.stop_token_ids or None,
                                  pad_token_id=(p.stop_token_ids or [0])[0], return_dict_in_generate=True,
                                  output_scores=True, output_logits=True)
        steps = out.scores if self.logprobs_mode == "processed_logprobs" else out.logits  # new × [n, V]
        new = out.sequences[:, ids.shape[1] :]  # [n, new]
        logps = torch.stack([torch.log_softmax(x.float(), -1) for x in steps], 1)  # [n, new, V]
        return out.sequences, logps.gather(-1, new.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def collective_rpc(self, method, kwargs=None):
        if method == "reload_weights":
            for name, weight in kwargs["weights_iterator"]:
                self.model.get_parameter(name).copy_(weight)
        elif callable(method):  # e.g. a script's CPU-only repack of a tied lm_head: nothing to repack here
            method(SimpleNamespace(model_runner=SimpleNamespace(model=self.model)))

    def reset_prefix_cache(self):
        pass

    def sleep(self, level: int = 1):
        pass

    def wake_up(self, tags=None):
        pass
