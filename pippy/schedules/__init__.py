"""Pipeline schedules as data: IR, generators, validation, lowering and CSV."""
