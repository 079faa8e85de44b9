"""Tools beside the pipeline: benchmarks, the doctor, the parallel training launcher."""
