"""LLaVA-1.5 modelling: tokenizer, model builders, image preprocessing, templates, batched inference.

Submodules import only torch / transformers / tokenizers / safetensors / PIL / numpy at module
level; object storage (`sharegpt4v.storage`) is imported inside the functions that need it.
"""
