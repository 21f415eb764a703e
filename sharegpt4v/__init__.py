"""ShareGPT4V platform core: config, storage, data, synthetic world, and (later) captioning, training, evaluation."""
