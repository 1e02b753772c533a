"""Modules that compute with packed weights."""

from anybit.nn.linear import AnybitLinear

__all__ = ["AnybitLinear"]
