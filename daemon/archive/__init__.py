"""Rotation and compression of live log files into archive/, woken by watchdog events on the log tree."""
