"""Research benchmarks of pege-hf (not part of the wheel): see benchmarks/README.md."""
