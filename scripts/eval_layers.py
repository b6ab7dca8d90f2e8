#!/usr/bin/env python3
"""Per-layer FP8 accuracy against the original: `fp8linear eval` from a checkout.

    python scripts/eval_layers.py --model PATH|minilm|demo-llama [--out DIR]
        [--skip-below-db 30] [--target-cosine 0.999] [--skip NAME_OR_REGEX ...] [--skip-file FILE]

Hooks every FP8Linear on a calibration batch (eight mixed sentences for encoders; a few paragraphs or
seeded random ids for causal LMs) and reports, per layer, relative error, cosine and SNR (dB) of the FP8
output against the original layer on the same input, plus the model-level metric (logit KL, top-1
agreement and logits cosine for causal LMs; mean-pooled sentence-embedding cosine for encoders).
Writes DIR/layers.csv and DIR/snr.png. --skip-below-db re-evaluates with the layers under that SNR kept
in high precision; --target-cosine searches the fewest such layers for a model-level cosine target.
On a GPU it also times a forward of each variant. Logic: fp8linear.cli (cmd_eval) over fp8linear.accuracy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp8linear.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
