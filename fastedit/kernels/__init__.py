"""Kernels: one semantics, several backends (reference, C++ CPU, CUDA, Triton) behind a dispatcher."""
from .dispatch import BACKEND_ORDER, BackendError, backends, choose_backend, edit_constraint, forced_backend

__all__ = ["BACKEND_ORDER", "BackendError", "backends", "choose_backend", "edit_constraint", "forced_backend"]
