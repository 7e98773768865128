"""svdkern benchmark suite: the same cases under pytest-benchmark (`pytest bench/`) and the
report script (`python -m bench.report`), each case timed against its alternatives."""
