"""The ensemble: members, Optuna weights, calibrated uncertainty, the registered model."""
