"""Full AdamW from torch: the memory and quality reference."""

import torch


def build_adamw(model, lr, betas, eps, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
