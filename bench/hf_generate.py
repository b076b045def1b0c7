"""The baseline: transformers ``generate`` on the same model folder, static batches.

    python -m bench.hf_generate --model DIR --batch 1 256 --prompt-len 512 --max-tokens 128

Prints output tok/s per batch size (and writes them with ``--result-json``). This is
what a plain transformers loop makes on the device, to set beside the mesh.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch


def measure(model: torch.nn.Module, vocab: int, batch: int, prompt_len: int,
            max_tokens: int, device: str) -> dict[str, float]:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=generator).to(device)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": max_tokens,
              "min_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
    model.generate(ids[:, :16], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - prompt_len) * batch
    return {"batch": batch, "output_tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--result-json", default="")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM  # a test dependency, not the runtime's

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            row = measure(model, vocab, batch, args.prompt_len, args.max_tokens, args.device)
            print(f"transformers generate batch {batch}: {row['throughput_tok_s']:,.0f} tok/s "
                  f"({row['wall_s']:.2f} s)", flush=True)
            rows.append(row)
    if args.result_json:
        gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
        Path(args.result_json).write_text(json.dumps(
            {"benchmark": "bench.hf_generate",
             "command": shlex.join(["python", "-m", "bench.hf_generate", *sys.argv[1:]]),
             "gpu": gpu, "model": Path(args.model).name,
             "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "runs": rows},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
