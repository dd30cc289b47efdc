"""Triton kernels for the hot paths, one op per file, each with a pure-torch reference.

Importing this package is cheap and imports no Triton: transformers probes for a package
named `kernels` at import time, and each op module loads Triton only when it is imported.
"""
