"""Generate text from the trained model, streamed to stdout as it is produced.

    python -m stages.generate --prompt "The river" [--model models/final.pt | models/hf]
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--seed 1337]

Temperature 0 (or --top-k 1) is greedy decoding; with sampling, the same --seed gives the same text.
Not a DVC stage: a tool to look at what a run learned.
"""
from __future__ import annotations

import argparse
import sys

import torch

from speedrun.errors import SpeedrunError, stage_main
from speedrun.generate import generate_ids, load, stream_text


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpeedrunError("--device cuda: no CUDA GPU found (use --device cpu)")
    return torch.device(name)


@stage_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--model", default="models/final.pt",
                    help="checkpoint file (models/final.pt) or exported folder (models/hf)")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (0 = all)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0 or args.top_k < 0 or args.temperature < 0:
        raise SpeedrunError("--max-new-tokens, --top-k and --temperature must be >= 0")
    device = _device(args.device)
    # a token holds at least one byte: the prompt's UTF-8 length bounds its token count
    gen = load(args.model, device, max_len=1 + len(args.prompt.encode()) + args.max_new_tokens)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    ids = generate_ids(gen, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                       args.seed, device)
    for piece in stream_text(gen, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
