"""Config generation, pruning, the persistent cache, shipped tables, selection and the ``tune`` command.

CPU tests exercise every architecture through ``FA_INDUCTOR_ARCH``; the GPU test tunes a real kernel."""

import dataclasses
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

from fa_inductor.kernels import autotune
from fa_inductor.kernels.arch import ARCH_ENV, ARCHES, arch_by_name, arch_for_capability, current_arch
from fa_inductor.kernels.configs import (PREDICATES, Direction, KernelConfig, Problem, baseline_config, candidates,
                                         flash_rule, generate, length_bucket, model_choice, rejections,
                                         shared_memory_bytes)

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 160, 256)


def _problem(direction="fwd", d=128, dv=None, causal=False, bias=False, m=4096, n=4096, dtype="16bit"):
    from fa_inductor.kernels.configs import padded_head_dim

    return Problem(direction, dtype, padded_head_dim(d), padded_head_dim(dv or d), causal, bias, length_bucket(m),
                   length_bucket(n))


# --- architectures -----------------------------------------------------------------------------------------

def test_arch_table_covers_the_promised_architectures():
    names = {a.name for a in ARCHES}
    assert {"sm80", "sm86", "sm89", "sm90", "sm100", "sm120"} <= names
    assert arch_by_name("SM90").tma and arch_by_name("sm90").warp_specialization
    assert not arch_by_name("sm80").tma and arch_by_name("sm80").tensor_cores == "mma_v2"
    assert arch_by_name("sm86").shared_per_block < arch_by_name("sm80").shared_per_block


def test_capability_lookup_falls_back_to_the_nearest_older_row():
    assert arch_for_capability((9, 0)).name == "sm90"
    assert arch_for_capability((8, 7)).name == "sm86"  # Orin: same major, newest older row
    assert arch_for_capability((10, 3)).name == "sm100"
    assert arch_for_capability((7, 5)).name == "sm80"  # older than every row: the oldest


def test_env_override_selects_the_architecture(monkeypatch):
    for arch in ARCHES:
        monkeypatch.setenv(ARCH_ENV, arch.name)
        assert current_arch() is arch
    monkeypatch.setenv(ARCH_ENV, "sm999")
    with pytest.raises(ValueError, match="unknown architecture 'sm999'"):
        current_arch()


# --- generator and pruning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [a.name for a in ARCHES])
def test_every_problem_has_candidates_within_hard_limits(name, monkeypatch):
    monkeypatch.setenv(ARCH_ENV, name)  # the architecture comes through the override, as on a CPU-only machine
    arch = current_arch()
    for d in HEAD_DIMS:
        for direction in Direction.ALL:
            for dtype in ("16bit", "fp32"):
                for causal, bias in ((False, False), (True, False), (False, True)):
                    for m, n in ((4096, 4096), (1, 64), (300, 70000)):
                        problem = _problem(direction, d, causal=causal, bias=bias, m=m, n=n, dtype=dtype)
                        kept = candidates(problem, arch)
                        assert kept, problem
                        assert model_choice(problem, arch) == kept[0]
                        for cfg in kept:
                            hard = [p.name for p in rejections(cfg, problem, arch) if not p.soft]
                            assert hard == [], (problem, cfg, hard)
                            assert shared_memory_bytes(cfg, problem, arch) <= arch.shared_per_block


def test_flash_rule_and_the_space_around_it():
    sm90, sm86 = arch_by_name("sm90"), arch_by_name("sm86")
    # M = 232448 B / 2 B; B_c = ceil(M / 4d) = 227 -> 128, B_r = min(B_c, d) = 128.
    assert flash_rule(_problem(d=128), sm90) == (128, 128)
    assert flash_rule(_problem(d=64), sm90) == (64, 256)
    assert flash_rule(_problem(d=128), sm86) == (64, 64)
    assert flash_rule(_problem(d=128, dtype="fp32"), sm90) == (64, 64)
    space = generate(_problem(d=128), sm90)
    assert {c.block_m for c in space} == {64, 128, 256} and {c.block_n for c in space} == {32, 64, 128}


def test_each_rejection_names_a_predicate_with_its_reason():
    sm86, sm90 = arch_by_name("sm86"), arch_by_name("sm90")
    problem = _problem("fwd", 128)
    big = KernelConfig(128, 128, 8, 4)
    assert [p.name for p in rejections(big, problem, sm86)] == ["fits_shared_memory"]
    assert "shared memory" in rejections(big, problem, sm86)[0].reason
    assert "fits_shared_memory" not in [p.name for p in rejections(KernelConfig(128, 64, 8, 3), problem, sm90)]
    assert "fits_registers" in [p.name for p in rejections(KernelConfig(256, 128, 4, 2), problem, sm90)]
    assert "score_tile_per_warp" in [p.name for p in rejections(KernelConfig(16, 32, 4, 2), problem, sm90)]
    assert "pipeline_within_loop" in [p.name for p in rejections(KernelConfig(64, 64, 4, 4), _problem(m=128, n=128),
                                                                 sm90)]
    assert "stages_supported" in [p.name for p in rejections(KernelConfig(64, 64, 4, 5), problem, sm86)]
    assert all(p.reason and p.name for p in PREDICATES)
    # The same problem keeps configs on Hopper that Ampere-class shared memory cannot hold.
    assert set(candidates(problem, sm86)) < set(candidates(problem, sm86)) | set(candidates(problem, sm90))
    assert any(shared_memory_bytes(c, problem, sm86) > sm86.shared_per_block for c in candidates(problem, sm90))


def test_d256_backward_keeps_the_least_spilling_configs():
    sm90 = arch_by_name("sm90")
    problem = _problem("bwd_kv", 256)
    kept = candidates(problem, sm90)
    assert kept and all(not any(not p.soft for p in rejections(c, problem, sm90)) for c in kept)


def test_length_buckets():
    assert [length_bucket(n) for n in (1, 128, 129, 4096, 4097, 10 ** 7)] == [128, 128, 256, 4096, 8192, 1 << 17]
    assert length_bucket(None) == 4096


# --- cache ---------------------------------------------------------------------------------------------------

def _cache(tmp_path, gpu="Test GPU"):
    return autotune.ConfigCache(tmp_path, {"format": 1, "gpu": gpu, "torch": "x", "triton": "y", "fa_inductor": "z"})


def test_cache_round_trip_and_atomic_files(tmp_path):
    cache = _cache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", KernelConfig(64, 32, 4, 2), ms=1.5)
    assert _cache(tmp_path).get("k") == KernelConfig(64, 32, 4, 2)  # a fresh reader sees it on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path.name, cache.path.name + ".lock"]
    other = _cache(tmp_path, gpu="Other GPU")  # another GPU name: another file
    assert other.path != cache.path and other.get("k") is None


@pytest.mark.parametrize("content", ["{not json", '{"fingerprint": {}, "entries": {}}',
                                     '{"fingerprint": FP, "entries": {"k": {"config": [3, 1, 1, 1]}}}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog, content):
    cache = _cache(tmp_path)
    cache.path.write_text(content.replace("FP", json.dumps(cache.fingerprint)))
    with caplog.at_level(logging.WARNING, logger="fa_inductor"):
        assert cache.get("k") is None
    assert "corrupt" in caplog.text
    cache.put("j", KernelConfig(16, 16, 1, 1))
    data = json.loads(cache.path.read_text())
    assert data["entries"] == {"j": {"config": [16, 16, 1, 1]}}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions as a non-root user")
def test_unwritable_and_unreadable_cache_are_survived(tmp_path, caplog):
    locked = tmp_path / "ro"
    locked.mkdir()
    cache = _cache(locked)
    locked.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="fa_inductor"):
            cache.put("k", KernelConfig(32, 32, 4, 2))
        assert "unwritable" in caplog.text
        assert cache.get("k") == KernelConfig(32, 32, 4, 2)  # kept in memory
    finally:
        locked.chmod(0o700)
    cache2 = _cache(tmp_path)
    cache2.put("k", KernelConfig(32, 32, 4, 2))
    cache2.path.chmod(0o000)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fa_inductor"):
            assert _cache(tmp_path).get("k") is None
        assert "unreadable" in caplog.text
    finally:
        cache2.path.chmod(0o600)


def _writer(directory, worker, count):
    cache = _cache(directory)
    for i in range(count):
        cache.put(f"w{worker}/{i}", KernelConfig(16 << (i % 3), 16, 4, 1 + i % 3))


def test_concurrent_writers_lose_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(tmp_path, w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    entries = _cache(tmp_path).entries()
    assert len(entries) == 60 and entries["w3/14"]["config"] == [16 << 2, 16, 4, 3]


# --- tables and selection ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, measured", [("sm90", True), ("sm80", False)])
def test_shipped_tables_load_and_respect_their_architecture(name, measured):
    table = autotune.shipped_table(name)
    assert table["arch"] == name and table["measured"] is measured
    arch = arch_by_name(name)
    for problem, cfg in table["entries"].items():
        assert not [p.name for p in rejections(cfg, problem, arch) if not p.soft], (problem, cfg)
    covered = {(p.direction, p.head_d, p.causal) for p in table["entries"]}
    for d in (64, 128, 256):
        for direction in Direction.ALL:
            assert {(direction, d, False), (direction, d, True)} <= covered


def test_grouped_query_attention_is_its_own_dkdv_class():
    """The dK/dV kernel loops over the query heads of a key head: grouped problems get their own entries (an
    H100 check found the MHA winner 2.4x slower at 32/8 heads), the other kernels do not depend on the group."""
    sm90 = arch_by_name("sm90")
    kv4 = autotune.problem_for("bwd_kv", torch.bfloat16, 64, 64, True, False, 16384, 16384, group=4)
    kv1 = autotune.problem_for("bwd_kv", torch.bfloat16, 64, 64, True, False, 16384, 16384)
    assert kv4.group == 4 and kv1.group == 1 and kv4.key(sm90).endswith("/g4") and "/g" not in kv1.key(sm90)
    assert autotune.problem_for("bwd_kv", torch.bfloat16, 64, 64, True, False, 512, 512, group=6).group == 4
    assert autotune.problem_for("fwd", torch.bfloat16, 64, 64, True, False, 512, 512, group=4).group == 1
    assert autotune.problem_for("bwd_q", torch.bfloat16, 64, 64, True, False, 512, 512, group=4).group == 1
    table = autotune.shipped_table("sm90")
    assert autotune.table_lookup(table, kv4, sm90) == KernelConfig(64, 64, 4, 3)
    mha = autotune.table_lookup(table, kv1, sm90)
    assert mha is not None and mha != KernelConfig(64, 64, 4, 3)  # the MHA shape keeps its own winner
    # a group with no measured entry is not served by the MHA entries
    kv8 = dataclasses.replace(kv4, group=8)
    assert autotune.table_lookup(table, kv8, sm90) is None


def test_table_lookup_nearest_bucket_and_kernel_class():
    exact, other = _problem("fwd", 128, m=4096, n=4096), _problem("fwd", 128, m=32768, n=32768)
    table = {"arch": "sm90", "measured": True,
             "entries": {exact: KernelConfig(128, 64, 8, 3), other: KernelConfig(128, 128, 8, 2)}}
    assert autotune.table_lookup(table, _problem("fwd", 128, m=2048, n=2048)) == KernelConfig(128, 64, 8, 3)
    assert autotune.table_lookup(table, _problem("fwd", 128, m=65536, n=65536)) == KernelConfig(128, 128, 8, 2)
    # Entries serve the kernel class they were measured on only: no bias tensor, no extra features.
    assert autotune.table_lookup(table, _problem("fwd", 128, bias=True)) is None
    assert autotune.table_lookup(table, dataclasses.replace(_problem("fwd", 128), extras=True)) is None
    assert autotune.table_lookup(table, _problem("fwd", 64)) is None
    # Entries a problem's hard predicates reject are passed over: a 256-row tile for a 100-token sequence.
    sm90 = arch_by_name("sm90")
    big = {"arch": "sm90", "measured": True, "entries": {exact: KernelConfig(256, 64, 8, 4)}}
    assert autotune.table_lookup(big, _problem("fwd", 128, m=100, n=100), sm90) is None
    assert autotune.table_lookup(big, _problem("fwd", 128), sm90) == KernelConfig(256, 64, 8, 4)
    assert autotune.table_lookup(table, _problem("bwd_q", 128)) is None


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("FA_INDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    autotune.clear_memo()
    autotune._default_cache.cache_clear()
    counters.clear()
    yield counters["fa_inductor"]
    autotune.clear_memo()
    autotune._default_cache.cache_clear()


def test_selection_order_memo_cache_table_tune_baseline(fresh, monkeypatch):
    sm90 = arch_by_name("sm90")
    calls = []

    def factory():
        def measure(cfg):
            calls.append(cfg)
            return cfg.block_n / cfg.block_m + cfg.num_stages * 1e-3  # the tallest, shallowest tile wins
        return measure

    # A problem the shipped table has: no tuning.
    table_problem = _problem("fwd", 128)
    assert autotune.select_config(table_problem, sm90, "GPU", factory) == autotune.table_lookup(
        autotune.shipped_table("sm90"), table_problem, sm90)
    assert fresh["config_table"] == 1 and not calls
    # A problem it lacks: tuned over every candidate (ample budget), cached, then memoised.
    odd = _problem("fwd", 32, m=512, n=512)
    best = autotune.select_config(odd, sm90, "GPU", factory)
    assert fresh["config_tuned"] == 1 and len(calls) == len(candidates(odd, sm90))
    assert best == min(candidates(odd, sm90), key=lambda c: (c.block_n / c.block_m + c.num_stages * 1e-3))
    assert autotune.select_config(odd, sm90, "GPU", factory) == best and fresh["config_tuned"] == 1
    # A new process (empty memo) finds it in the cache.
    autotune.clear_memo()
    assert autotune.select_config(odd, sm90, "GPU", factory) == best and fresh["config_cache"] == 1
    # Tuning switched off: the verified baseline, not an untimed model pick.
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    other = _problem("bwd_q", 32, m=512, n=512)
    assert autotune.select_config(other, sm90, "GPU", factory) == baseline_config(other, sm90)
    assert fresh["config_baseline"] == 1


def test_a_tuner_that_cannot_start_leaves_the_baseline(fresh, caplog):
    sm90 = arch_by_name("sm90")
    problem = _problem("fwd", 32, m=512, n=512)

    def factory():
        raise RuntimeError("no memory for the tuning tensors")

    with caplog.at_level(logging.WARNING, logger="fa_inductor"):
        assert autotune.select_config(problem, sm90, "GPU", factory) == baseline_config(problem, sm90)
    assert "could not set up tuning" in caplog.text and fresh["config_baseline"] == 1


def test_tuning_budget_and_failing_configs(fresh):
    sm90 = arch_by_name("sm90")
    problem = _problem("fwd", 32, m=512, n=512)
    seen = []

    def measure(cfg):
        seen.append(cfg)
        if len(seen) == 1:
            raise RuntimeError("out of resource: shared memory")
        time.sleep(0.05)
        return 1.0 / len(seen)

    result = autotune.tune(problem, sm90, measure, budget_s=0.12)
    assert 2 <= len(result["timings"]) < len(candidates(problem, sm90)) and not result["complete"]
    assert result["timings"][0][1] is None and "shared memory" in result["timings"][0][2]
    assert result["best"] == seen[-1]


# --- explain shapes and the tune command -------------------------------------------------------------------

def make_model():
    """A factory for ``fa-inductor tune --model``: one causal attention, head dim 48, lengths 96."""
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 96, 48)
    return Attn(), (q, torch.randn(1, 2, 96, 48), torch.randn(1, 2, 96, 48))


def make_dropout_model():
    """As ``make_model``, with attention dropout: a kernel variant the tables do not cover."""
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    return Attn(), make_model()[1]


def test_problems_from_a_models_explain_report():
    from fa_inductor.tune import problems_from_model

    problems = problems_from_model(f"{__name__}:make_model", ["fwd", "bwd_q"])
    assert problems == [Problem("fwd", "fp32", 64, 64, True, False, 128, 128),
                        Problem("bwd_q", "fp32", 64, 64, True, False, 128, 128)]
    # Dropout sites are tuned under the key the op looks up at run time (extras).
    problems = problems_from_model(f"{__name__}:make_dropout_model", ["fwd"])
    assert problems == [Problem("fwd", "fp32", 64, 64, True, False, 128, 128, extras=True)]


def test_tune_command_writes_a_model_table(tmp_path):
    out = tmp_path / "sm86.json"
    subprocess.run([sys.executable, "-m", "fa_inductor.cli", "tune", "--model-only", "--arch", "sm86",
                    "--head-dims", "64", "96", "--causal", "yes", "--table", str(out)], check=True,
                   capture_output=True)
    table = autotune.load_table(out)
    assert table["arch"] == "sm86" and table["measured"] is False and len(table["entries"]) == 6
    sm86 = arch_by_name("sm86")
    for problem, cfg in table["entries"].items():
        assert cfg == model_choice(problem, sm86)


# --- GPU -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuning_on_the_gpu_picks_a_config_that_computes_the_same(fresh, monkeypatch):
    from fa_inductor import scaled_dot_product_attention as fa_sdpa

    monkeypatch.setenv(autotune.BUDGET_ENV, "20")
    q, k, v = (torch.randn(2, 3, 200, 24, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fa_sdpa(q, k, v, is_causal=True)  # d=24 pads to 32: no shipped table has head dim 32
    out.sum().backward()
    assert fresh["config_tuned"] == 3  # forward and both backward passes
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v)),
                                                           is_causal=True)
    assert (out.double() - ref).abs().max() < 2e-2
    cache = autotune.default_cache(torch.cuda.get_device_name())
    assert len(cache.entries()) == 3
