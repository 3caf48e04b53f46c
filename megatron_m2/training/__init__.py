"""Pretraining: flags, optimizer and schedule, checkpoints, logging, and the loop that ties them together."""
