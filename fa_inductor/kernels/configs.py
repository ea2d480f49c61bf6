"""Block-size configurations for the FlashAttention kernels: the candidate space and its pruning.

A config fixes the tile shape of one kernel launch: query rows per program or per step (``block_m``), key rows
per step or per program (``block_n``), warps and software-pipelining depth.  A ``Problem`` is what a config is
chosen for: direction (forward, backward dK/dV pass, backward dQ pass), element width, padded head dims, mask
class and bucketed sequence lengths.

Candidates are generated around the FlashAttention rule (FLASHATTENTION.md): with M elements of on-chip memory,
key blocks of B_c = ceil(M / 4d) rows and query blocks of B_r = min(B_c, d) rows.  The generator spans a factor
of two to four around (B_r, B_c), every warp count and pipeline depth the architecture supports, then cuts the
list with named predicates (``PREDICATES``), each a pure function of (config, problem, arch) with its reason:
nothing that would overflow shared memory or the register file is ever compiled.  ``model_choice`` ranks the
survivors by the rule when nothing was measured.

Everything here is plain data and pure functions: nothing queries a GPU at import.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, NamedTuple

from .arch import Arch

__all__ = ["KernelConfig", "Direction", "Problem", "Predicate", "PREDICATES", "padded_head_dim", "length_bucket",
           "flash_rule", "generate", "candidates", "rejections", "model_choice", "baseline_config",
           "shared_memory_bytes", "registers_per_thread", "INTERPRETER_CONFIG"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, values) -> "KernelConfig":
        block_m, block_n, num_warps, num_stages = (int(v) for v in values)
        cfg = cls(block_m, block_n, num_warps, num_stages)
        if not all(v > 0 and v & (v - 1) == 0 for v in (block_m, block_n, num_warps)) or num_stages < 1:
            raise ValueError(f"not a kernel config: {list(values)}")
        return cfg

    def __str__(self) -> str:
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}"


class Direction:
    """Which kernel a config is for."""

    FORWARD = "fwd"
    BACKWARD_KV = "bwd_kv"  # dK/dV pass: block_n keys per program, block_m queries per step
    BACKWARD_Q = "bwd_q"  # dQ pass: block_m queries per program, block_n keys per step
    ALL = (FORWARD, BACKWARD_KV, BACKWARD_Q)


# The Triton interpreter runs on the CPU: small tiles keep it quick and make short test sequences span
# several blocks, so that the loop and boundary paths are exercised.
INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1)

BLOCK_SIZES = (16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8)
MIN_BUCKET, MAX_BUCKET = 128, 1 << 17


def padded_head_dim(d: int) -> int:
    """Head dims are padded (by masked loads, never by copies) to a power of two of at least 16."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def length_bucket(n) -> int:
    """Sequence lengths in autotune keys: the next power of two, clamped to [128, 131072], so that a handful
    of keys covers every length.  ``n`` may be None (a symbolic length without a hint): the 4k bucket."""
    if n is None:
        return 4096
    n = max(int(n), 1)
    return min(MAX_BUCKET, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a config is chosen for.  ``dtype`` is the element width class ("16bit" for fp16/bf16, "fp32"),
    ``head_d``/``head_dv`` the padded head dims, ``causal`` any causal or sliding-window structure, ``bias``
    a bias or boolean mask tensor read tile by tile; lengths are ``length_bucket`` s."""

    direction: str
    dtype: str
    head_d: int
    head_dv: int
    causal: bool
    bias: bool
    m_bucket: int
    n_bucket: int
    # Dropout, softcapping, block-sparse lists or per-sequence lengths: kernel variants no table entry was
    # measured on.
    extras: bool = False
    # Query heads per key head (``group_bucket``), for the dK/dV kernel only: its programs loop over the group,
    # so the group changes both their length and their number (1 for the other kernels).
    group: int = 1

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def key(self, arch: Arch) -> str:
        mask = ("causal" if self.causal else "full") + ("+bias" if self.bias else "") + (
            "+extras" if self.extras else "")
        return (f"{arch.name}/{self.dtype}/d{self.head_d}/dv{self.head_dv}/{mask}/{self.direction}/"
                f"m{self.m_bucket}/n{self.n_bucket}" + (f"/g{self.group}" if self.group > 1 else ""))


def group_bucket(group: int) -> int:
    """Query heads per key head, rounded down to a power of two in [1, 16]."""
    return min(16, 1 << (max(int(group), 1).bit_length() - 1))


def dtype_class(dtype) -> str:
    return "fp32" if str(dtype).endswith("float32") else "16bit"


def flash_rule(problem: Problem, arch: Arch) -> tuple[int, int]:
    """(B_r, B_c) of the FlashAttention rule for this problem, rounded down to powers of two in [16, 256]."""
    elements = arch.shared_per_block // problem.element_bytes
    d = max(problem.head_d, problem.head_dv)
    b_c = math.ceil(elements / (4 * d))
    b_r = min(b_c, d)

    def pow2(x: int) -> int:
        return min(256, max(16, 1 << (max(x, 1).bit_length() - 1)))

    return pow2(b_r), pow2(b_c)


# --- resource model ---------------------------------------------------------------------------------------

def shared_memory_bytes(cfg: KernelConfig, problem: Problem, arch: Arch) -> int:
    """Shared memory a launch needs: tiles loaded once, the ring of ``num_stages`` buffers the software pipeline
    keeps for the streamed tiles, and one 16-bit score tile through which probabilities are re-laid out as an
    MMA operand."""
    e = problem.element_bytes
    bm, bn, s = cfg.block_m, cfg.block_n, cfg.num_stages
    d, dv = problem.head_d, problem.head_dv
    if problem.direction == Direction.FORWARD:
        resident, streamed = bm * d, bn * (d + dv)  # Q once; K and V per step
    elif problem.direction == Direction.BACKWARD_KV:
        resident, streamed = bn * (d + dv), bm * (d + dv)  # K, V once; Q and dO per step
    else:
        resident, streamed = bm * (d + dv), bn * (d + dv)  # Q, dO once; K and V per step
    bias = s * bm * bn * e if problem.bias else 0
    return e * (resident + s * streamed) + 2 * bm * bn + bias


def registers_per_thread(cfg: KernelConfig, problem: Problem, arch: Arch) -> int:
    """32-bit registers each thread holds: fp32 accumulators and score tiles spread over the warps, MMA operands
    kept in registers where the tensor cores read them from there (mma_v2), and a fixed overhead for indices
    and row statistics."""
    threads = 32 * cfg.num_warps
    bm, bn = cfg.block_m, cfg.block_n
    d, dv = problem.head_d, problem.head_dv
    packed = problem.element_bytes / 4
    if problem.direction == Direction.FORWARD:
        accumulators, tiles, operands = bm * dv, bm * bn, bm * d * packed
    elif problem.direction == Direction.BACKWARD_KV:
        accumulators, tiles, operands = bn * (d + dv), 2 * bm * bn, bn * (d + dv) * packed
    else:
        accumulators, tiles, operands = bm * d, 2 * bm * bn, bm * (d + dv) * packed
    if arch.tensor_cores != "mma_v2":
        operands = 0  # wgmma / tcgen05 read the resident operand from shared memory
    return math.ceil((accumulators + tiles + operands) / threads) + 24


class Predicate(NamedTuple):
    name: str
    reason: str
    test: Callable[[KernelConfig, Problem, Arch], bool]
    # A soft predicate is waived when nothing passes it (the least-bad configs are kept, see ``candidates``).
    soft: bool = False


def _loop_length(cfg: KernelConfig, problem: Problem) -> int:
    if problem.direction == Direction.BACKWARD_KV:
        return max(1, problem.m_bucket // cfg.block_m)
    return max(1, problem.n_bucket // cfg.block_n)


PREDICATES = (
    Predicate("fits_shared_memory", "tiles and pipeline buffers exceed the shared memory one program may use",
              lambda cfg, p, a: shared_memory_bytes(cfg, p, a) <= a.shared_per_block),
    Predicate("fits_registers", "accumulators and score tiles exceed the per-thread register ceiling (spills)",
              lambda cfg, p, a: registers_per_thread(cfg, p, a) <= a.max_registers, soft=True),
    Predicate("score_tile_per_warp", "each warp must own at least one 16x16 MMA fragment of the score tile",
              lambda cfg, p, a: cfg.block_m * cfg.block_n >= 256 * cfg.num_warps),
    Predicate("pipeline_within_loop", "more pipeline stages than inner-loop iterations only cost shared memory",
              lambda cfg, p, a: cfg.num_stages <= max(2, _loop_length(cfg, p))),
    Predicate("tile_within_sequence", "a block longer than the sequence bucket computes only padding",
              lambda cfg, p, a: cfg.block_m <= max(16, p.m_bucket) and cfg.block_n <= max(16, p.n_bucket)),
    Predicate("stages_supported", "deeper pipelines than the architecture's loads can keep in flight",
              lambda cfg, p, a: cfg.num_stages <= a.max_stages),
)


def generate(problem: Problem, arch: Arch) -> list[KernelConfig]:
    """The unpruned candidate space: block sizes from half to twice the rule's B_r for the query block and from a
    quarter to all of B_c for the key block, every warp count and pipeline depth."""
    b_r, b_c = flash_rule(problem, arch)
    rows = [b for b in BLOCK_SIZES if b_r // 2 <= b <= 2 * b_r]
    cols = [b for b in BLOCK_SIZES if b_c // 4 <= b <= b_c]
    stages = range(1, arch.max_stages + 1)
    return [KernelConfig(m, n, w, s) for m, n, w, s in itertools.product(rows, cols, WARPS, stages)]


def rejections(cfg: KernelConfig, problem: Problem, arch: Arch) -> list[Predicate]:
    """The predicates ``cfg`` fails (empty: it is a candidate)."""
    return [p for p in PREDICATES if not p.test(cfg, problem, arch)]


def candidates(problem: Problem, arch: Arch) -> list[KernelConfig]:
    """Generated configs that pass every predicate, best-first by the model (``model_choice`` is the first).
    When no config passes the soft predicates (d=256 backward accumulators exceed the register file at any
    tile), the configs that pass the hard ones are kept, those with the smallest register estimate first."""
    generated = generate(problem, arch)
    kept = [cfg for cfg in generated if not rejections(cfg, problem, arch)]
    if kept:
        return sorted(kept, key=lambda cfg: _model_rank(cfg, problem, arch))
    hard = [cfg for cfg in generated if not any(not p.soft for p in rejections(cfg, problem, arch))]
    return sorted(hard, key=lambda cfg: (registers_per_thread(cfg, problem, arch), _model_rank(cfg, problem, arch)))


def _model_rank(cfg: KernelConfig, problem: Problem, arch: Arch) -> tuple:
    """Closeness to the rule's tile, then enough warps for the tile (one per 16x64 of it), then two stages (three
    with TMA-class loads).  The forward and the dQ pass own query blocks of B_r rows and stream keys in half of
    B_c (room for the pipeline); the dK/dV pass owns key blocks of B_c rows and streams queries in B_r / 2."""
    b_r, b_c = flash_rule(problem, arch)
    b_c = min(b_c, 128)  # past 128 keys a step, score tiles outgrow the registers before shared memory runs out
    if problem.direction == Direction.BACKWARD_KV:
        target_m, target_n = max(16, b_r // 2), b_c
    else:
        target_m, target_n = b_r, max(16, b_c // 2)
    distance = abs(math.log2(cfg.block_m / target_m)) + abs(math.log2(cfg.block_n / target_n))
    warps = min(8, max(4, cfg.block_m * cfg.block_n // 1024))
    stages = 3 if arch.tma else 2
    return distance, abs(cfg.num_warps - warps), abs(cfg.num_stages - stages), cfg.as_list()


def model_choice(problem: Problem, arch: Arch) -> KernelConfig:
    """The model's pick when nothing was measured; a minimal safe tile if the space is empty."""
    kept = candidates(problem, arch)
    return kept[0] if kept else KernelConfig(16, 16, 1, 1)


# The configs every kernel variant ran with (and the GPU test suite passed with) before configs were generated:
# (max padded head dim, fwd, bwd_kv, bwd_q) for 16-bit inputs, Hopper-class and other GPUs; fp32 halves them.
# ``select_config`` falls back to these, not to an untimed model pick, when nothing measured covers a problem
# and tuning is off.
_BASELINE = {
    True: ((64, (128, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2)),
           (128, (128, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2)),
           (256, (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2))),
    False: ((64, (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2)),
            (128, (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
            (256, (64, 32, 4, 1), (16, 32, 4, 1), (32, 32, 4, 1))),
}


def baseline_config(problem: Problem, arch: Arch) -> KernelConfig:
    rows = _BASELINE[arch.capability >= (9, 0) and arch.shared_per_block > 200_000]
    width = max(problem.head_d, problem.head_dv)
    _, fwd, bwd_kv, bwd_q = next(row for row in rows if width <= row[0])
    values = {Direction.FORWARD: fwd, Direction.BACKWARD_KV: bwd_kv, Direction.BACKWARD_Q: bwd_q}[problem.direction]
    cfg = KernelConfig(*values)
    if problem.dtype == "fp32":
        cfg = KernelConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps,
                           max(1, cfg.num_stages - 1))
    return cfg
