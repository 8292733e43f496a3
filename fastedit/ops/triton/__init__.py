"""Triton kernels (GPU; on CPU tensors only under TRITON_INTERPRET=1, for tests). Importing this
package does not import triton: each kernel module does, when it is used."""
