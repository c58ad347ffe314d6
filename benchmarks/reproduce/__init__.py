"""The BlockLLM paper's single-GPU pre-training results, reproduced: ``python benchmarks/reproduce/run.py --help``."""
