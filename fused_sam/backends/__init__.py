"""Backends implementing the SAM ops of :mod:`fused_sam.reference` with the same signatures."""
