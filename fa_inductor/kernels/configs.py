"""Block-size configurations for the FlashAttention kernels.

A config fixes the tile shape of one kernel launch: query rows per program (``block_m``), key rows per
inner-loop step (``block_n``), warps and software-pipelining depth.  The defaults below are a small table per
architecture family keyed by (dtype size, padded head dim); the autotuning work replaces it with generated,
measured configs.  Everything here is plain data and pure functions: nothing queries a GPU at import.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["KernelConfig", "Direction", "default_config", "padded_head_dim"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


class Direction:
    """Which kernel a config is for."""

    FORWARD = "fwd"
    BACKWARD_KV = "bwd_kv"  # dK/dV pass: block_n keys per program, block_m queries per step
    BACKWARD_Q = "bwd_q"  # dQ pass: block_m queries per program, block_n keys per step


def padded_head_dim(d: int) -> int:
    """Head dims are padded (by masked loads, never by copies) to a power of two of at least 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


# (direction, max padded head dim) -> config, for 16-bit inputs on Hopper (sm90).  Rows are tried in order
# and the first whose head-dim bound fits is used.
_SM90_16BIT = {
    Direction.FORWARD: ((64, KernelConfig(128, 64, 4, 3)), (128, KernelConfig(128, 64, 8, 3)),
                        (256, KernelConfig(64, 64, 4, 2))),
    Direction.BACKWARD_KV: ((64, KernelConfig(64, 128, 8, 2)), (128, KernelConfig(64, 128, 8, 2)),
                            (256, KernelConfig(32, 64, 4, 2))),
    Direction.BACKWARD_Q: ((64, KernelConfig(128, 64, 8, 2)), (128, KernelConfig(128, 64, 8, 2)),
                           (256, KernelConfig(64, 32, 4, 2))),
}

# Ampere-class and anything unknown: smaller tiles that fit ~100 KB of shared memory.
_GENERIC_16BIT = {
    Direction.FORWARD: ((64, KernelConfig(128, 64, 4, 2)), (128, KernelConfig(64, 64, 4, 2)),
                        (256, KernelConfig(64, 32, 4, 1))),
    Direction.BACKWARD_KV: ((64, KernelConfig(64, 64, 4, 2)), (128, KernelConfig(32, 64, 4, 2)),
                            (256, KernelConfig(16, 32, 4, 1))),
    Direction.BACKWARD_Q: ((64, KernelConfig(64, 64, 4, 2)), (128, KernelConfig(64, 32, 4, 2)),
                           (256, KernelConfig(32, 32, 4, 1))),
}

# The Triton interpreter runs on the CPU: small tiles keep it quick and make short test sequences span
# several blocks, so that the loop and boundary paths are exercised.
_INTERPRETER = KernelConfig(16, 16, 1, 1)


def _halve(cfg: KernelConfig) -> KernelConfig:
    """fp32 operands take twice the shared memory and registers of 16-bit ones."""
    return KernelConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps,
                        max(1, cfg.num_stages - 1))


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def default_config(device: torch.device, dtype: torch.dtype, head_dim: int, value_head_dim: int,
                   direction: str) -> KernelConfig:
    if device.type != "cuda":
        return _INTERPRETER
    major, _ = _device_capability(device.index if device.index is not None else torch.cuda.current_device())
    table = _SM90_16BIT if major >= 9 else _GENERIC_16BIT
    width = padded_head_dim(max(head_dim, value_head_dim))
    cfg = next(c for bound, c in table[direction] if width <= bound)
    return _halve(cfg) if dtype == torch.float32 else cfg
