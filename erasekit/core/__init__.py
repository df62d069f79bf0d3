"""The core layer: what methods, attacks, compose, audit and bench share, depending on none of them.

- :mod:`erasekit.core.sd` — Stable Diffusion plumbing: encoders, prompt encoding (SD 1/2/XL), ε prediction,
  generation, the model's id.
- :mod:`erasekit.core.lora` — ΔW on ``nn.Linear`` / ``nn.Conv2d`` modules: ``ModuleDelta`` (a stored delta), the one
  forward-hook applier (used by training's hooks and by ``erasekit.compose``), trainable low-rank deltas, saved deltas
  applied for evaluation.
- :mod:`erasekit.core.files` — atomic writes with the user's umask, advisory folder locks.
- :mod:`erasekit.core.config` — config fields shared by several configs, declared once (``shared_fields``).
- :mod:`erasekit.core.provenance` — the run record (date, commit, machine, versions) stamped on results; peak memory.

See ``docs/architecture.md``.
"""
