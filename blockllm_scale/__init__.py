"""blockllm-scale: BlockLLM, a drop-in optimizer that trains a small, greedily chosen set of
parameters per step, with DeepSpeed ZeRO, FSDP2 and accelerate backends."""

from .config import BlockLLMConfig
from .optim import BlockLLM

__all__ = ["BlockLLM", "BlockLLMConfig"]
__version__ = "0.1.0"
