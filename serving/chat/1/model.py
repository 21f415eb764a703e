"""Triton Python-backend model: the class is `sharegpt4v.serving.triton_model.TritonPythonModel`."""

from sharegpt4v.serving.triton_model import TritonPythonModel  # noqa: F401  (Triton looks it up here)
