"""Zero-code opt-in: ``FA_INDUCTOR=1 python train.py`` (or ``FA_INDUCTOR=explain``).

torch imports this module at the end of ``import torch`` through its plugin autoload entry point (group
``torch.backends``).  It is deliberately outside the ``fa_inductor`` package: with the variable unset, nothing
else of ours is imported.  With it set, ``fa_inductor.integrations.inductor_pass.install`` registers the
attention rewrite as Inductor's pre-grad custom pass, so every plain ``torch.compile(model)`` (also Trainer's
and ``generate``'s) gets it.  Nothing here may break ``import torch``: any failure is logged and the opt-in
disables itself.
"""

import os

_OFF = ("", "0", "false", "off", "no")


def autoload() -> None:
    mode = os.environ.get("FA_INDUCTOR", "").strip().lower()
    if mode in _OFF:
        return
    try:
        from fa_inductor.integrations.inductor_pass import install

        install(explain=mode == "explain")
    except Exception:  # noqa: BLE001 - a plugin must never break `import torch`
        import logging

        logging.getLogger("fa_inductor").exception(
            "fa_inductor: the FA_INDUCTOR=%s opt-in failed and is disabled; torch.compile runs unchanged", mode)
