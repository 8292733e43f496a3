"""Triton kernels of fastedit (GPU; on the CPU only through ``TRITON_INTERPRET=1``, for tests).

Importing a kernel module imports triton; the modules are imported lazily by the dispatcher."""
