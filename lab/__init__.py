"""kernel-lab: build patched kernels, boot them under QEMU and test them with pytest."""

__version__ = "0.1.0"
