"""MLflow "models from code" entry of the registered versions (copied into each MLflow model; see
`sharegpt4v.serving.pyfunc`): MLflow runs this file to get the model object, no pickle involved.
The code itself is the installed `sharegpt4v` package's; the weights are the checkpoint that
`model_config["checkpoint"]` names."""

import mlflow

from sharegpt4v.serving.pyfunc import ShareGPT4VModel

mlflow.models.set_model(ShareGPT4VModel())
