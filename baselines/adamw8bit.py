"""8-bit AdamW from bitsandbytes: block-wise quantized moments, one byte each, for every tensor of at
least 4096 elements (smaller ones keep fp32 moments). Runs on CPU and CUDA."""


def build_adamw8bit(model, lr, betas, eps, weight_decay):
    import bitsandbytes as bnb  # deferred: importing it probes for CUDA libraries

    params = [p for p in model.parameters() if p.requires_grad]
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
