"""The fixed cost per micro-batch that DeepSpeed adds to an update, ZeRO-3 and stage 0 against a plain module, on a
deep thin model (Qwen2.5-0.5B's 24 layers, 64 wide) where the arithmetic is small, with and without gradient
checkpointing: 4 micro-batches of 16 packed sequences (100 + 20 tokens) and one AdamW step, seconds per micro-batch
(median of 3 after a warm-up). It is the host-side part of the GPU update's gap to plain transformers
(README, The CUDA path on one GPU).

    python bench/zero3_overhead.py [OUT.json]   # one process; default bench/results/zero3_overhead_<cpu|cuda>.json
"""

import json
import os
import socket
import sys
import time

import deepspeed
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import grpo  # noqa: E402

CONFIG = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=1,
                     num_key_value_heads=1, head_dim=64, tie_word_embeddings=True)


def per_micro_batch(stage, checkpointing: bool, batch: dict) -> float:
    """Seconds per micro-batch of forward + LM loss + backward (+ a quarter of the AdamW step); stage None: no DeepSpeed."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32).to(batch["input_ids"].device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if stage is None:
        forward, backward = model, (lambda loss: loss.backward())

        def step():
            opt.step()
            opt.zero_grad()
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        forward, backward, step = engine, engine.backward, engine.step
    times = []
    for _ in range(4):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):  # micro-batches of one optimizer step
            loss = forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"]).loss
            backward(loss)
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[1] / 4


def main() -> None:
    init_port = socket.socket()
    init_port.bind(("127.0.0.1", 0))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(init_port.getsockname()[1]))
    init_port.close()
    deepspeed.init_distributed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (100,), generator=g).tolist() for _ in range(16)]
    completions = [torch.randint(3, 500, (20,), generator=g).tolist() for _ in range(16)]
    batch = grpo.pack(prompts, completions, 0, 4096, device)
    result = {}
    for checkpointing in (False, True):
        for stage in (None, 0, 3):
            name = ("plain" if stage is None else f"zero{stage}") + (" + checkpointing" if checkpointing else "")
            result[name] = round(per_micro_batch(stage, checkpointing, batch), 4)
            print(name, result[name], flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results", f"zero3_overhead_{device}.json")
    with open(out, "w") as f:
        json.dump({"seconds_per_micro_batch": result, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "deepspeed": deepspeed.__version__}, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
