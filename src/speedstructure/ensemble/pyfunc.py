"""The registered ensemble as an MLflow pyfunc model ("models from code").

MLflow executes this file when the model is loaded: it defines the model and
hands it to ``mlflow.models.set_model``.  The artifacts are the ensemble file
(members, folds, weights) and every member's checkpoint, whose variant config
rebuilds the network; the preprocessing is part of the network itself.
``predict`` takes gathers ``(B, 5, 10001, 31)`` float32 and returns velocities
``(B, 300, 1259)`` float32 in km/s (the signature enforces the shapes).
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from speedstructure.ensemble.members import ENSEMBLE_ARTIFACT, read_spec


class EnsembleModel(PythonModel):
    def load_context(self, context) -> None:
        from speedstructure.ensemble.members import Ensemble

        spec = read_spec(context.artifacts[ENSEMBLE_ARTIFACT])
        ckpts = {k: v for k, v in context.artifacts.items() if k != ENSEMBLE_ARTIFACT}
        self.ensemble = Ensemble(spec, ckpts)

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # a named-tensor caller: the one tensor it holds
            (model_input,) = model_input.values()
        return self.ensemble.predict(np.asarray(model_input, dtype=np.float32))


mlflow.models.set_model(EnsembleModel())
