"""The synthetic dataset: velocity models (:mod:`.velocity`), their simulated shot gathers
(:mod:`.simulate`) and the generator of the challenge's four zips (:mod:`.dataset`,
``speedstructure synth``), configured by the ``synth`` section of ``params.yaml``."""
