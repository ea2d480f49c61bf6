"""User settings for the fa_inductor backend: one frozen dataclass, with environment overrides.

  FA_INDUCTOR_MIN_SEQ_LEN   leave attention with fewer keys than this alone (default 0: rewrite everything)
  FA_INDUCTOR_FORMS         comma-separated form families to rewrite (default: all of FORM_FAMILIES)
  FA_INDUCTOR_FOLD_GQA      0 to keep repeated K/V heads instead of folding them into the op (default 1)
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Settings", "FORM_FAMILIES"]

# The spellings the matcher knows, by family; a family can be switched off with ``forms=``.
FORM_FAMILIES = ("sdpa", "matmul", "bmm", "einsum", "baddbmm", "manual_softmax")


@dataclasses.dataclass(frozen=True)
class Settings:
    min_seq_len: int = 0
    forms: frozenset = frozenset(FORM_FAMILIES)
    fold_gqa: bool = True

    def __post_init__(self):
        unknown = set(self.forms) - set(FORM_FAMILIES)
        if unknown:
            raise ValueError(f"fa_inductor: unknown forms {sorted(unknown)}; known: {', '.join(FORM_FAMILIES)}")
        if self.min_seq_len < 0:
            raise ValueError(f"fa_inductor: min_seq_len must be >= 0, got {self.min_seq_len}")
        object.__setattr__(self, "forms", frozenset(self.forms))

    def cache_key(self) -> str:
        """A spelling of these settings that is the same in every process (a frozenset's repr follows string
        hashing, which Python randomises per process), for keys of caches that outlive the process."""
        return f"min_seq_len={self.min_seq_len};forms={','.join(sorted(self.forms))};fold_gqa={self.fold_gqa}"

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then environment variables, then explicit keyword arguments."""
        values: dict = {}
        env = os.environ
        if "FA_INDUCTOR_MIN_SEQ_LEN" in env:
            values["min_seq_len"] = int(env["FA_INDUCTOR_MIN_SEQ_LEN"])
        if "FA_INDUCTOR_FORMS" in env:
            values["forms"] = frozenset(f.strip() for f in env["FA_INDUCTOR_FORMS"].split(",") if f.strip())
        if "FA_INDUCTOR_FOLD_GQA" in env:
            values["fold_gqa"] = env["FA_INDUCTOR_FOLD_GQA"] not in ("0", "false", "False", "")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
