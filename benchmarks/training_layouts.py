"""Training throughput and memory by layout and by what trains: padded vs packed micro-batches, full
weights vs LoRA, on a mixed-length workload (issue 18, item 4).

    python benchmarks/training_layouts.py               # 20M-param Llama, 64 sequences of 8-256 response tokens
    python benchmarks/training_layouts.py --size 1M --quick

Each variant runs in its own process (peak RSS is per process): the same random Llama, the same batch
(a 32-token prompt, then 8-256 response tokens drawn uniformly, right-padded), micro-batches of
`--micro` sequences, a token-mean cross-entropy over the response, backward and AdamW; packed = the
micro-batch's real tokens as one row (rlhf_ray/packing.py); LoRA = rank 16 on every linear layer
(rlhf_ray/lora.py). Figures: real (non-pad) tokens per second over `--repeats` passes after a
warm-up, and the process's peak RSS. Not a test: it prints figures; JSON to runs/training_layouts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1M": dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
         "20M": dict(hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8)}
VARIANTS = ("padded-full", "packed-full", "padded-lora", "packed-lora")


def measure(variant: str, size: str, sequences: int, micro: int, repeats: int, threads: int) -> dict:
    import torch

    from rlhf_ray.batch import position_ids
    from rlhf_ray.config import LoraConfig
    from rlhf_ray.lora import apply_lora
    from rlhf_ray.packing import packed_forward
    from rlhf_ray.toy import build_char_tokenizer, build_policy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = build_policy(tok, seed=0, max_position_embeddings=320, **SIZES[size])
    if variant.endswith("lora"):
        model, _ = apply_lora(model, LoraConfig(rank=16, alpha=32), sequence_classifier=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    lengths = 32 + torch.randint(8, 257, (sequences,), generator=generator)
    width = int(lengths.max())
    ids = torch.randint(8, len(tok), (sequences, width), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).long()
    loss_mask = mask.clone()
    loss_mask[:, :32] = 0

    def one_pass() -> None:
        for start in range(0, sequences, micro):
            rows = slice(start, start + micro)
            cut = int(mask[rows].sum(-1).max())
            x, m, lm = ids[rows, :cut], mask[rows, :cut], loss_mask[rows, :cut]
            if variant.startswith("packed"):
                logits = packed_forward(model, x, m)
            else:
                logits = model(input_ids=x, attention_mask=m, position_ids=position_ids(m), use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
            loss = -(logp * lm[:, 1:]).sum() / lm[:, 1:].sum()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_pass()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    seconds = (time.perf_counter() - start) / repeats
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": variant, "tokens_per_s": int(mask.sum()) / seconds, "seconds_per_pass": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "trained_params": trained,
            "padded_tokens": sequences * width, "real_tokens": int(mask.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="20M")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.repeats = 16, 1
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.sequences, args.micro, args.repeats, args.threads)))
        return
    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--size", args.size, "--sequences",
                              str(args.sequences), "--micro", str(args.micro), "--repeats", str(args.repeats),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"{variant:12s} {row['tokens_per_s']:9.0f} tokens/s  peak RSS {row['peak_rss_mib']:7.0f} MiB  "
              f"trained params {row['trained_params']:,}", flush=True)
    print(f"({args.size}, {args.sequences} sequences of 40-288 tokens, micro-batches of {args.micro}; "
          f"{results[0]['real_tokens']} real of {results[0]['padded_tokens']} padded tokens)")
    out = ROOT / "runs" / "training_layouts.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
