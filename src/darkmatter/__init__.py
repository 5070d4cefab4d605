"""sae-darkmatter: measure, decompose and reduce the dark matter of sparse autoencoders."""

from __future__ import annotations

__version__ = "0.1.0"
