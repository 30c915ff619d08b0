"""Low-level kernels behind ``trainer.fipo``.

``reverse_scan`` holds the pure-torch discounted reverse scan (used on every device and
tested in CI); ``triton_scan`` holds an optional Triton kernel for CUDA devices.
"""
