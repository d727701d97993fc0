"""Compute kernels: plain PyTorch references and Triton implementations, with dispatchers.

Per operator (``biwkv``: LALIC's bidirectional WKV; ``selective_scan``: MambaIC's SS2D core):

* ``<op>.py`` -- the public dispatcher (``biwkv``; ``selective_scan``, ``cross_scan``,
  ``cross_merge`` and ``fused_cross_scan_kernel``): Triton on CUDA tensors, the PyTorch paths
  elsewhere; ``LALIC_FORCE_REFERENCE=1`` forces the PyTorch reference (``_dispatch.py``);
* ``<op>_ref.py`` -- the PyTorch reference (differentiable, O(T) memory; the fallback and the
  comparison for the fast paths), with the operator's constants and shape checks;
* ``<op>_naive.py`` -- the naive oracle, straight from the definition (slow; tests only);
* ``<op>_triton.py`` -- the Triton kernels (forward, backward; imports triton);
* ``biwkv_cpu.py`` -- BiWKV's fast CPU path.

``depthwise.py`` is the depthwise convolution of LALIC's OmniShift with a faster CPU backward
(its forward is ``F.conv2d``; cuDNN serves CUDA, so it has no Triton kernel).  ``_compile.py``
lets a training run fuse the CPU fast paths with ``torch.compile`` (``codec train run
--compile``); inference never compiles.

``_triton_common.py`` holds the host-side helpers the Triton modules share.
"""
