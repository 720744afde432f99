"""Log-probs (+ entropy) of a rollout-shaped batch: the LM head in chunks of positions
(aqn's default, ``aqn.rollout.forward.LOGIT_CHUNK``) vs all positions at once ([batch,
length, vocab] logits, as a plain ``model(...).logits`` pass), in the same run.

Without gradients this is the old-log-prob pass, the engine's recompute and the reference
pass; ``--grad`` times the training forward + backward instead (a fused, chunked head
against autograd through the full logits). Each side runs in its own subprocess, so each
has its own peak RSS (VmHWM, reset after the model is loaded: it covers the passes alone).
Both must give the same log-prob bits (checked); the table shows the time (median of
--repeats) and the peak added over the loaded model.

    python bench/bench_logprobs.py [--model smollm2-135m-instruct|tiny] [--batch 32]
                                   [--prompt 48] [--response 64] [--repeats 3]
                                   [--threads 1] [--grad]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MARK = "LOGPROBS-RESULT "


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_side(args) -> dict:
    import torch

    import aqn.rollout.forward as forward
    from aqn.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype="float32", seed=0)
    model.eval()
    if args.side == "full":
        forward.LOGIT_CHUNK = args.response  # one chunk: the [batch, length, vocab] logits
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(10, vocab, (args.batch, args.prompt + args.response), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, : args.prompt // 2] = 0  # some left padding

    def once():
        if not args.grad:
            with torch.no_grad():
                return forward.response_logprobs(model, ids, mask, args.response, 1.0,
                                                 with_entropy=True)
        model.zero_grad(set_to_none=True)
        out = forward.response_logprobs(model, ids, mask, args.response, 1.0,
                                        with_entropy=True, entropy_grad=False,
                                        fused_head=args.side == "chunked")
        out.log_probs.sum().backward()  # the training forward + backward
        return forward.TokenLogProbs(out.log_probs.detach(), out.entropy)

    Path("/proc/self/clear_refs").write_text("5")  # the peak from here: the passes only
    base = _kb("VmRSS") / 1024
    once()  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t)
    bits = hashlib.sha256(out.log_probs.numpy().tobytes() + out.entropy.numpy().tobytes())
    return {"side": args.side, "s": statistics.median(times),
            "peak_over_model_mb": _kb("VmHWM") / 1024 - base, "sha": bits.hexdigest(),
            "vocab": vocab}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grad", action="store_true",
                        help="time forward + backward (the training forward) instead")
    parser.add_argument("--side", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(MARK + json.dumps(run_side(args)), flush=True)
        return
    res = {}
    for side in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[side] = json.loads(next(line for line in out.splitlines() if line.startswith(MARK))
                               .removeprefix(MARK))
    c, f = res["chunked"], res["full"]
    what = "forward + backward" if args.grad else "no gradients"
    print(f"{args.model} (vocab {c['vocab']}), batch {args.batch} x ({args.prompt} prompt + "
          f"{args.response} response) tokens, {args.threads} thread(s), {what}\n")
    print("| | chunked (aqn) | full logits | chunked/full |\n|---|---:|---:|---:|")
    print(f"| s / pass | {c['s']:.3f} | {f['s']:.3f} | {c['s'] / f['s']:.2f} |")
    print(f"| peak RSS over the model, MB | {c['peak_over_model_mb']:.0f} | "
          f"{f['peak_over_model_mb']:.0f} | "
          f"{c['peak_over_model_mb'] / max(f['peak_over_model_mb'], 1e-9):.2f} |")
    print(f"\nsame bits (log-probs and entropy): {c['sha'] == f['sha']}")
    if args.grad:
        print("(the gradients are the same sums in another order: tests/test_sampling.py)")


if __name__ == "__main__":
    main()
