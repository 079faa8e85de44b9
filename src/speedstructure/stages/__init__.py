"""The pipeline stages: one module per ``dvc.yaml`` stage, named as the stage.

``ingest`` -> ``folds`` -> ``train`` (one DVC stage per run) -> ``tune`` -> ``register`` ->
``predict`` -> ``evaluate``.  Each module holds the stage (a ``run_<stage>`` function taking the
typed :class:`~speedstructure.config.Params`) and its command (``add_commands``); the reusable
parts live in the library modules beside this package.
"""
