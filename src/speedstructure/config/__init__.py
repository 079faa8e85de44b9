"""Configuration: ``params.yaml`` read once into typed, frozen dataclasses; the profiles."""
