"""Namespace of the xLSTM models (mirrors the layout of the documented module path)."""
