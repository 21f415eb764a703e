"""Serving: the Triton model repository's core (request checks, the engine adapter), the exporter
from registered MLflow models to a repository under an S3 prefix, the local Triton launcher and
the V2-protocol client. Nothing here imports `triton_python_backend_utils`: the adapters in the
project's `serving/` folder do, and call in here."""
