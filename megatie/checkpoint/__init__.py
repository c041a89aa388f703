"""Checkpoints: ``store`` writes and verifies them (safetensors weights, pickle-free state, SHA-256 of
every file in ``meta.json``); ``resume`` chooses the one a run continues from and checks it fits."""
