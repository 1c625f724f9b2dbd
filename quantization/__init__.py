"""Tools that turn the project's GGUF model into other formats (e.g. for vLLM).

Nothing here imports the ``gateway`` or ``backends`` packages: these modules run inside
other virtualenvs (the vLLM one has torch/transformers, the project's has llama-cpp-python).
"""
