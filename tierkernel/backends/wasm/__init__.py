"""The ``wasm`` tier: CPython on wasmtime, no network and no host files (see backend.py)."""
