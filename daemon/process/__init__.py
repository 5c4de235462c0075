"""The running process: the drain loop, start/stop/status, the instance lock, notify, metrics, repair, the units."""
