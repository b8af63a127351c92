"""What both backends share: Hugging Face models driven through the torch API (PyTorch, or mindtorch
under MindSpore). ``backend``: the model-level ``HFBackend``; ``methods``: per-method knowledge (peft
configs, BitFit); ``tiny``: tiny random models. Import only after a framework is active."""
