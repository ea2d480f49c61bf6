"""``fa-inductor demo``: a small decoder-only transformer whose layers spell attention in different ways,
compiled with default Inductor and with ``backend="fa_inductor"``; prints what was replaced, the error against
eager, time per training step (forward + backward) and peak memory.  No download: weights are random."""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    seq_len: int
    batch: int
    vocab: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attention(nn.Module):
    """One of three spellings: "sdpa" (F.scaled_dot_product_attention, causal), "eager_gqa" (hand-written,
    fp32 softmax, causal mask built with masked_fill, repeat_kv), "einsum" (einsum products, where-mask)."""

    def __init__(self, cfg: DemoConfig, spelling: str):
        super().__init__()
        self.cfg, self.spelling = cfg, spelling
        self.q = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x):
        cfg = self.cfg
        b, n, _ = x.shape
        q = self.q(x).view(b, n, cfg.heads, cfg.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, cfg.kv_heads, cfg.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        group = cfg.heads // cfg.kv_heads
        if self.spelling == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif self.spelling == "eager_gqa":
            k, v = _repeat_kv(k, group), _repeat_kv(v, group)
            scores = q @ k.transpose(-2, -1) / cfg.head_dim ** 0.5
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * cfg.head_dim ** -0.5
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            scores = torch.where(keep, scores, float("-inf"))
            out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        return self.o(out.transpose(1, 2).reshape(b, n, cfg.dim))


class Block(nn.Module):
    def __init__(self, cfg: DemoConfig, spelling: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg, spelling)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    SPELLINGS = ("sdpa", "eager_gqa", "einsum")

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, self.SPELLINGS[i % 3]) for i in range(cfg.layers))
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, tokens):
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    loss.backward()
    return logits.detach()


def _measure(model, tokens, device, repeat):
    for p in model.parameters():
        p.grad = None
    _train_step(model, tokens)  # compile + warm-up
    _sync(device)
    times = []
    for _ in range(repeat):
        for p in model.parameters():
            p.grad = None
        start = time.perf_counter()
        _train_step(model, tokens)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = None
    if device.type == "cuda":
        for p in model.parameters():
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _train_step(model, tokens)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def run_demo(device: str | None = None, seq_len: int | None = None, repeat: int = 5) -> list[dict]:
    from torch._dynamo.utils import counters

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        cfg = DemoConfig(layers=6, dim=1024, heads=16, kv_heads=4, seq_len=seq_len or 4096, batch=2)
        dtype = torch.bfloat16
    else:
        cfg = DemoConfig(layers=3, dim=128, heads=4, kv_heads=2, seq_len=seq_len or 128, batch=2)
        dtype = torch.float32
    torch.manual_seed(0)
    model = TinyDecoder(cfg).to(dev, dtype)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), device=dev)
    print(f"fa_inductor demo on {dev} ({dtype}): {cfg.layers} layers (attention spelled "
          f"{', '.join(TinyDecoder.SPELLINGS)}), dim {cfg.dim}, {cfg.heads} heads / {cfg.kv_heads} KV heads, "
          f"batch {cfg.batch}, sequence {cfg.seq_len}")
    with torch.no_grad():
        reference = model(tokens).float()
    rows = []
    for name, backend in (("eager", None), ("default inductor", "inductor"), ("fa_inductor", "fa_inductor")):
        torch._dynamo.reset()
        counters.clear()
        runner = model if backend is None else torch.compile(model, backend=backend)
        with torch.no_grad():
            err = (runner(tokens).float() - reference).abs().max().item()
        counters.clear()  # count the training graph's sites only
        try:
            ms, peak = _measure(runner, tokens, dev, repeat)
        except torch.OutOfMemoryError:
            ms, peak = float("nan"), float("nan")
            torch.cuda.empty_cache()
        replaced = counters["fa_inductor"]["replaced"] if backend == "fa_inductor" else None
        rows.append({"run": name, "replaced": replaced, "max_err_vs_eager": err, "train_step_ms": ms,
                     "peak_mib": peak})
    print(f"{'run':<17} {'attention replaced':>18} {'max |err| vs eager':>19} {'train step ms':>14} {'peak MiB':>9}")
    for r in rows:
        replaced = "-" if r["replaced"] is None else f"{r['replaced']}/{cfg.layers}"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['run']:<17} {replaced:>18} {r['max_err_vs_eager']:>19.2e} {r['train_step_ms']:>14.1f} {peak:>9}")
    return rows
