"""Checkpoint mappings from peer implementations (Pocket TTS) onto calm_fast modules."""
