"""Ghostloop: self-hosted code completion that learns from what developers keep."""

__version__ = "0.1.0"
