"""The interpreter's fixes live in the package (:mod:`deep_ep.kernels.interpreter`); the tests' name for it."""

from deep_ep.kernels.interpreter import enabled, install

__all__ = ["enabled", "install"]
