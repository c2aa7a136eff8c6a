"""A tiny random Qwen2 policy and a locally trained tokenizer (with a chat template), built in
seconds without any hub, for the tests and the CPU examples.

    python tests/tiny.py OUT_DIR     # writes a Hugging Face directory that transformers and vLLM load
"""

import json
import os
import sys

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Question: What is 3 + 4? Please reason step by step, and put your final answer within \\boxed{}.",
        "The answer is \\boxed{7}. So 12 apples and 30 pears make 42 fruits in total.",
        "aaaa bbbb abab the a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: str, seed: int = 0, num_layers: int = 2, tied: bool = True) -> str:
    """A random Qwen2 with head_dim 64 (vLLM's CPU attention needs it), with tied embeddings or its own lm_head."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


if __name__ == "__main__":
    print(build_tiny_model(sys.argv[1]))
