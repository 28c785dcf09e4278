"""The pyfunc model MLflow loads by running this file (train/served.py says why): it opens the
registered model's bundle and answers `predict` with the signature's rows. Imported only by
MLflow, in an environment where shardtrain is installed (`--env-manager local`, or the image
scripts/deploy/Dockerfile builds)."""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.models import set_model

from train.served import BUNDLE, columns, row


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from train.bundle import load_bundle

        self.model = load_bundle(context.artifacts[BUNDLE])
        self.task, self.good = self.model.spec.task, self.model.spec.good

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # MLflow's schema enforcement has turned a base64 request column into bytes already.
        from mlflow.exceptions import MlflowException

        images = [bytes(x) for x in model_input["image"]]
        try:
            results = self.model.predict(images) if images else []
        except (OSError, ValueError) as e:  # not an image: the client's mistake, answered with 400
            raise MlflowException.invalid_parameter_value(
                f"column image: {e}; send each image's encoded file bytes (JPEG, PNG, TIFF), base64 in JSON"
            ) from None
        names = [name for name, _ in columns(self.task)]
        return pd.DataFrame([row(r, self.task, self.good) for r in results], columns=names)


set_model(BundlePyfunc())
