"""Backward kernel time for the Llama-3.2-1B attention shape (1 x 32 heads / 8 KV heads x 16k x 64, causal) per
config: does the shipped table (tuned on MHA shapes) fit grouped-query attention?  The same configs on 32 / 32
heads for contrast.  Each pass is timed alone by the autotuner's own ``kernel_timer``."""

import dataclasses

import torch

from fa_inductor.kernels.autotune import kernel_timer, problem_for
from fa_inductor.kernels.configs import Direction, KernelConfig

KV = [(128, 128, 8, 4), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
      (128, 64, 8, 3)]
Q = [(64, 128, 4, 3), (128, 64, 8, 2), (128, 64, 4, 4), (64, 64, 4, 2), (128, 128, 8, 3)]
HEADS, N, D = 32, 16384, 64

for kv_heads in (8, 32):
    for direction, configs in ((Direction.BACKWARD_KV, KV), (Direction.BACKWARD_Q, Q)):
        problem = problem_for(direction, torch.bfloat16, D, D, True, False, N, N)
        # the group sets the timer's key heads for either pass (problem_for keeps it for the dK/dV class only)
        problem = dataclasses.replace(problem, group=HEADS // kv_heads)
        measure = kernel_timer(problem, torch.device("cuda"), rep_ms=40, shape=(1, HEADS, N, N))
        for values in configs:
            cfg = KernelConfig(*values)
            try:
                print(f"H{HEADS}/HK{kv_heads} {direction} {cfg} {measure(cfg):.3f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                print(f"H{HEADS}/HK{kv_heads} {direction} {cfg} error {type(exc).__name__}", flush=True)
