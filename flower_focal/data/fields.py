"""Datalist field names shared by every data source, transform and consumer.

This module owns the names of the fields of a datalist item (a ``dict``) and of a batch
produced by the datasets of :mod:`flower_focal.data`. Import these constants instead of
spelling the strings, so a rename is one edit.
"""

from __future__ import annotations

IMAGE = "image"
"""Image: a path (file sources), an ``HxWxC`` uint8 array (array sources) or, after the
transforms, a ``float32`` tensor ``(C, H, W)``."""

LABEL = "label"
"""Class index: a Python ``int`` in a datalist, a ``torch.long`` scalar after the transforms."""

SITE = "site"
"""Optional site / hospital identifier (CSV sources with a site column); used by ``by-site``."""

__all__ = ["IMAGE", "LABEL", "SITE"]
