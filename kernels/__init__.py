"""Triton kernels, installed as ``fused_resnet.kernels`` (the top-level name ``kernels`` belongs to another PyPI
package). One file per kernel family, named as in ``fused_resnet.reference`` and ``csrc/``.

Importing a kernel module imports Triton. To run kernels on CPU tensors, set ``TRITON_INTERPRET=1`` before the
first import: Triton decides at decoration time whether a kernel is compiled or interpreted.
"""
