"""Checkpoint conversion for Transfusion."""
