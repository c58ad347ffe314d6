"""torchao's low-bit AdamW: 8-bit (block 256) or 4-bit (block 128) moments with fp32 block scales, for
tensors of at least 4096 elements whose size is a multiple of the block (others keep full moments).
Each parameter's update is a ``torch.compile``d kernel, compiled once per shape: seconds per shape on
a GPU, tens of seconds on a CPU. Works on FSDP2's DTensors, unlike bitsandbytes."""

from blockllm_scale.config import ConfigError


def _build(class_name: str, model, lr, betas, eps, weight_decay):
    try:
        import torchao.optim
    except ImportError:
        raise ConfigError(f"torchao's {class_name} needs torchao: pip install torchao") from None
    params = [p for p in model.parameters() if p.requires_grad]
    return getattr(torchao.optim, class_name)(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_torchao_adamw8bit(model, lr, betas, eps, weight_decay):
    return _build("AdamW8bit", model, lr, betas, eps, weight_decay)


def build_torchao_adamw4bit(model, lr, betas, eps, weight_decay):
    return _build("AdamW4bit", model, lr, betas, eps, weight_decay)
