"""Speed measurement shared by the benchmark and profiling scripts."""
