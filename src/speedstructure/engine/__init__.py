"""The training engine: trains any torch module on one fold, in parts that each read alone.

* :mod:`~speedstructure.engine.loop`: :func:`train_model` and the :class:`Trainer`'s epoch loop;
* :mod:`~speedstructure.engine.results`: the run's setting (:class:`Run`), validation,
  :func:`predict_dataset`, the depth-trend baseline's fit and the run's result files;
* :mod:`~speedstructure.engine.checkpoint`: the files a run writes, :class:`TrainState`
  (what ``last.pt`` holds), fingerprints and resuming;
* :mod:`~speedstructure.engine.data`: the fold table, :class:`SampleDataset`, loaders, the
  flip augmentation and the input cache;
* :mod:`~speedstructure.engine.optim`: :class:`MuonAdamW` and the learning-rate schedule;
* :mod:`~speedstructure.engine.runtime`: device, mixed precision, ranks (DDP), threads, the
  seed rule and RNG state, progress bars.

The engine imports nothing from the models above it: what it needs of a model (its Muon
parameters, its input preparation) it asks the model object it is given.  The ``train`` stage
(:mod:`speedstructure.stages.train`) wraps it for the pipeline.
"""
