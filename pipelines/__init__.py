"""Kubeflow Pipelines DAGs (`definitions`), their compiled IR YAML (`compiled/`, checked by `compile`)
and the runner (`runner`: local runs with kfp.local, submission to a KFP endpoint)."""
