"""Serving: the Triton model repository's core (request checks, the engine adapter), the exporter
from registered MLflow models to a repository under an S3 prefix, the local Triton launcher and
the V2-protocol client. Only `triton_model` (the Triton adapter, which the `model.py` files of the
repository import inside Triton's Python stub) imports `triton_python_backend_utils`; nothing else in
the package imports `triton_model`."""
