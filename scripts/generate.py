#!/usr/bin/env python3
"""Greedy generation, original vs FP8, with tokens/s: `fp8linear generate` from a checkout.

    python scripts/generate.py --model PATH [--prompt TEXT] [--max-new-tokens N] [--device cuda]

PATH is a local Hugging Face model folder: a plain one is quantized on the fly (quantize_model); an FP8
checkpoint (config.json with quantization_config) is loaded with load_quantized and compared with its
own weights dequantized to bf16. The logic lives in fp8linear.cli (cmd_generate) over fp8linear.hf.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fp8linear.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["generate", *sys.argv[1:]]))
