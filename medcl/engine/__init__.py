"""What the jobs share: checkpoint I/O, seeding, plots, the Lightning trainer factory."""
