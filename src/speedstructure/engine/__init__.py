"""The training engine, in parts that each read alone.

* :mod:`~speedstructure.engine.loop`: :func:`train_model` (the :class:`Trainer`'s epoch
  loop, the depth-trend baseline's fit), validation, :func:`predict_dataset`;
* :mod:`~speedstructure.engine.checkpoint`: the files a run writes, :class:`TrainState`
  (what ``last.pt`` holds), fingerprints and resuming;
* :mod:`~speedstructure.engine.data`: the fold table, :class:`SampleDataset`, loaders and
  the flip augmentation;
* :mod:`~speedstructure.engine.optim`: :class:`MuonAdamW` and the learning-rate schedule;
* :mod:`~speedstructure.engine.runtime`: device, mixed precision, ranks (DDP), seeds and
  RNG state, progress bars.

The ``train`` stage (:mod:`speedstructure.stages.train`) wraps it for the pipeline.
"""
