"""Compute kernels: plain PyTorch references and Triton implementations, with dispatchers."""
