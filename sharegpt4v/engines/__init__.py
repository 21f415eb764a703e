"""Inference engines that run outside the platform's environment (vLLM: `vllm_client`, `vllm_worker`)."""
