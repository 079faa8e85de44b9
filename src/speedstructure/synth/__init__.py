"""The embedded default data: synthetic velocity models simulated into the challenge's zips."""
