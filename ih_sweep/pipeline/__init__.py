"""One module per kind of job (``job=...``), each a recipe read top to bottom:

- :mod:`.evaluate`: check -> data -> scores -> select -> ablate -> evaluate -> mechanism ->
  write (its stages in :mod:`.stages`, the checkpointed evaluation in :mod:`.checkpoints`,
  several random draws in one job in :mod:`.draws`)
- :mod:`.score`: the head score table alone (and its heatmap)
- :mod:`.scan`: every head ablated on its own, its effects against its scores
- :mod:`.train_tiny`: retrain the bundled tiny model

Each exposes ``run(config, out_dir)``; :mod:`ih_sweep.cli` dispatches on ``config.job``.
"""
