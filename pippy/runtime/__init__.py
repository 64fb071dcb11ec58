"""Runtime: stages, point-to-point communication, the executor and the schedule classes."""
