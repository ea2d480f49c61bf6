"""GPU architectures as data: the limits the config generator prunes against.

Each row is one compute capability family.  ``shared_per_block`` is the largest dynamic shared memory one
program may opt into (bytes), ``registers_per_sm`` the 32-bit register file of one SM, ``max_registers`` the
per-thread ceiling before the compiler spills.  ``tensor_cores`` names the MMA generation Triton emits
(``mma_v2``: Ampere/Ada warp-level mma.sync; ``wgmma``: Hopper warp-group MMA; ``tcgen05``: Blackwell
datacenter MMA with tensor memory), ``tma`` whether tensor-memory-accelerator descriptors exist, and
``warp_specialization`` whether Triton can split producer and consumer warps there.

The current device is read once per device index and cached; ``FA_INDUCTOR_ARCH=sm80`` (any name below)
overrides it, so CPU-only tests can exercise every architecture's choices.  Nothing here touches a GPU at
import.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

__all__ = ["Arch", "ARCHES", "ARCH_ENV", "arch_by_name", "arch_for_capability", "current_arch", "device_capability"]

ARCH_ENV = "FA_INDUCTOR_ARCH"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    capability: tuple[int, int]
    shared_per_block: int
    shared_per_sm: int
    registers_per_sm: int
    max_registers: int
    max_warps_per_sm: int
    tensor_cores: str
    tma: bool
    warp_specialization: bool
    example: str

    @property
    def max_stages(self) -> int:
        """Deepest software pipeline worth generating: cp.async rings on Ampere-class parts stop paying past 4,
        TMA-fed Hopper/Blackwell loops can use 5."""
        return 5 if self.tma else 4


# Published per-capability limits (CUDA programming guide, "Technical Specifications per Compute Capability").
ARCHES = (
    Arch("sm80", (8, 0), shared_per_block=166912, shared_per_sm=167936, registers_per_sm=65536, max_registers=255,
         max_warps_per_sm=64, tensor_cores="mma_v2", tma=False, warp_specialization=False, example="A100"),
    Arch("sm86", (8, 6), shared_per_block=101376, shared_per_sm=102400, registers_per_sm=65536, max_registers=255,
         max_warps_per_sm=48, tensor_cores="mma_v2", tma=False, warp_specialization=False, example="A10, RTX 3090"),
    Arch("sm89", (8, 9), shared_per_block=101376, shared_per_sm=102400, registers_per_sm=65536, max_registers=255,
         max_warps_per_sm=48, tensor_cores="mma_v2", tma=False, warp_specialization=False, example="L4, RTX 4090"),
    Arch("sm90", (9, 0), shared_per_block=232448, shared_per_sm=233472, registers_per_sm=65536, max_registers=255,
         max_warps_per_sm=64, tensor_cores="wgmma", tma=True, warp_specialization=True, example="H100, H200"),
    Arch("sm100", (10, 0), shared_per_block=232448, shared_per_sm=233472, registers_per_sm=65536,
         max_registers=255, max_warps_per_sm=64, tensor_cores="tcgen05", tma=True, warp_specialization=True,
         example="B200"),
    Arch("sm120", (12, 0), shared_per_block=101376, shared_per_sm=102400, registers_per_sm=65536,
         max_registers=255, max_warps_per_sm=48, tensor_cores="mma_v2", tma=True, warp_specialization=False,
         example="RTX 5090"),
)


def arch_by_name(name: str) -> Arch:
    for arch in ARCHES:
        if arch.name == name.strip().lower():
            return arch
    raise ValueError(f"fa_inductor: unknown architecture {name!r} in {ARCH_ENV}; known: "
                     f"{', '.join(a.name for a in ARCHES)}")


def arch_for_capability(capability: tuple[int, int]) -> Arch:
    """The row for ``capability``: an exact match, else the newest known one of the same major version, else the
    newest older one (a new GPU inherits the limits of its predecessor until it gets its own row)."""
    exact = [a for a in ARCHES if a.capability == tuple(capability)]
    if exact:
        return exact[0]
    older = [a for a in ARCHES if a.capability <= tuple(capability)]
    same_major = [a for a in older if a.capability[0] == capability[0]]
    pool = same_major or older or [ARCHES[0]]
    return max(pool, key=lambda a: a.capability)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device_index: Optional[int] = None) -> tuple[int, int]:
    """The CUDA device's compute capability, read once per device (``FA_INDUCTOR_ARCH`` does not change it)."""
    import torch

    if device_index is None:
        device_index = torch.cuda.current_device()
    return _capability(device_index)


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> Arch:
    return arch_for_capability(_capability(index))


def current_arch(device_index: Optional[int] = None) -> Arch:
    """The architecture configs are generated for: ``FA_INDUCTOR_ARCH`` when set, else the CUDA device's."""
    override = os.environ.get(ARCH_ENV, "").strip()
    if override:
        return arch_by_name(override)
    import torch

    if device_index is None:
        device_index = torch.cuda.current_device()
    return _device_arch(device_index)
