"""Time to the first compiled training step, cold and warm, in fresh processes that share Inductor's cache.

    python benchmarks/warm_start.py [--backends fa_inductor inductor] [--processes 3] [--layers 4] [--device cpu]

Each backend gets a new, empty cache directory (``TORCHINDUCTOR_CACHE_DIR``); its first process compiles from
nothing and fills the cache, the next ones start warm.  A process builds a Llama-shaped model (Hugging Face
``LlamaForCausalLM``, sdpa attention, grouped query heads), compiles one training step and reports the wall time of
that first step (compilation included), what AOTAutograd's cache did (``miss``/``saved``, ``hit`` or ``bypass``),
how many attention sites the rewrite replaced, and the loss (the same in every process of a backend when nothing
else changed).  Needs transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from harness import PlotSpec, write_results

PROGRAM = textwrap.dedent("""
    import json, sys, time
    import torch, transformers
    from torch._dynamo.utils import counters
    layers, hidden, seqlen, backend, device = sys.argv[1:6]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=int(hidden), intermediate_size=2 * int(hidden),
                                      num_hidden_layers=int(layers), num_attention_heads=int(hidden) // 64,
                                      num_key_value_heads=max(int(hidden) // 256, 1), attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    ids = torch.randint(0, 1024, (2, int(seqlen)), device=device)
    step = torch.compile(lambda: model(input_ids=ids, labels=ids).loss, backend=backend)
    start = time.perf_counter()
    loss = step()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    aot = sorted(k.replace("autograd_cache_", "") for k, n in counters["aot_autograd"].items()
                 if n and k.startswith("autograd_cache_"))
    print(json.dumps({"seconds": seconds, "aot_cache": "/".join(aot), "replaced": counters["fa_inductor"]["replaced"],
                      "loss": float(loss)}))
""")


def run_process(args, backend: str, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(args.layers), str(args.hidden), str(args.seqlen),
                             backend, args.device], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{backend}: the process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["fa_inductor", "inductor"])
    parser.add_argument("--processes", type=int, default=3, help="per backend: one cold, the rest warm")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="model width (head dim 64)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--stem", default="warm_start")
    args = parser.parse_args()

    rows = []
    for backend in args.backends:
        with tempfile.TemporaryDirectory(prefix="warm_start_") as cache_dir:
            for index in range(args.processes):
                result = run_process(args, backend, cache_dir)
                rows.append({"backend": backend, "process": index, "start": "cold" if index == 0 else "warm",
                             "layers": args.layers, "seqlen": args.seqlen, "device": args.device, **result})
                print(f"{backend} process {index}: {result['seconds']:.1f} s, AOTAutograd cache "
                      f"{result['aot_cache'] or '-'}, replaced {result['replaced']}", flush=True)
    spec = PlotSpec(x="process", y="seconds", series="backend", panels=("device",), xlabel="process (0 = cold)",
                    ylabel="first step, s", log2_x=False)
    write_results(rows, Path(args.out_dir), args.stem, "Time to the first compiled training step", spec)


if __name__ == "__main__":
    main()
