"""Synthetic patients with exact ground truth: anatomy, breathing, CT-to-U/S rendering."""
