"""The zero-code opt-in: ``FA_INDUCTOR=1`` makes plain ``torch.compile`` rewrite attention (subprocesses, since
the hook runs inside ``import torch``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from fa_inductor.config import Settings
from fa_inductor.integrations.inductor_pass import AttentionPass, install, uninstall

PROGRAM = textwrap.dedent("""
    import sys
    import torch
    from torch._dynamo.utils import counters

    print("modules:", sorted(m for m in sys.modules if m.startswith("fa_inductor")))
    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v

    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    out = torch.compile(attn)(q, k, v)
    out.sum().backward()
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = attn(*ref)
    expected.sum().backward()
    assert (out - expected).abs().max() < 1e-4
    assert all((a.grad - b.grad).abs().max() < 1e-4 for a, b in zip((q, k, v), ref))
    print("replaced:", counters["fa_inductor"]["replaced"])
""")


def run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA_INDUCTOR") and k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=600)


def test_unset_loads_nothing_and_changes_nothing():
    result = run({})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "modules: ['fa_inductor_autoload']" in result.stdout
    assert "replaced: 0" in result.stdout


def test_opt_in_rewrites_plain_torch_compile():
    result = run({"FA_INDUCTOR": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replaced: 1" in result.stdout


def test_explain_prints_a_report():
    result = run({"FA_INDUCTOR": "explain"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fa_inductor explain: 1 replaced, 0 kept" in result.stdout and "matmul+scale" in result.stdout


def test_a_failing_hook_never_breaks_import_torch():
    result = run({"FA_INDUCTOR": "1", "FA_INDUCTOR_FORMS": "no_such_form"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opt-in failed and is disabled" in result.stderr
    assert "replaced: 0" in result.stdout


def test_install_is_explicit_and_reversible():
    from torch._inductor import config
    assert config.pre_grad_custom_pass is None
    installed = install()
    try:
        assert config.pre_grad_custom_pass is installed
        assert installed.uuid() == AttentionPass(Settings.from_env()).uuid()
        assert installed.uuid() != AttentionPass(Settings(min_seq_len=128)).uuid()
    finally:
        uninstall()
    assert config.pre_grad_custom_pass is None
