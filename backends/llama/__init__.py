"""The embedded llama.cpp engine: continuous batching over llama-cpp-python's C API."""
