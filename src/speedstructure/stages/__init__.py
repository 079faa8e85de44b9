"""The pipeline stages: one module per ``dvc.yaml`` stage, named as the stage.

``ingest`` -> ``folds`` -> ``train`` (one DVC stage per run) -> ``tune`` -> ``register`` ->
``predict`` -> ``evaluate`` -> ``qc`` (-> ``refine``).  Each module is the stage's story: it
reads the typed :class:`~speedstructure.config.schema.Params`, calls the layers below and writes
the stage's outputs (a ``run_<stage>`` function), and defines its command (``add_commands``).
No stage imports another.
"""
