"""GPU memory and speed benchmarks (``python benchmarks/memory.py --help``) and the memory model that
predicts them (``benchmarks/memory_model.py``). Results go to ``benchmarks/results/``."""
