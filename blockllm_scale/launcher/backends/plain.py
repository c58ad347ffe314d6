"""One process on one device (a GPU if there is one, else the CPU): the reference backend."""

from __future__ import annotations

from pathlib import Path

import torch


class PlainBackend:
    rank = 0
    world_size = 1
    keeps_master_weights = False  # the optimizer keeps fp32 copies of bf16 weights itself (--dtype bf16)
    owns_gradients = False  # every gradient is the optimizer's: it may step inside backward

    def __init__(self, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.optimizer = self.scheduler = None

    def resolve_settings(self, train, blockllm):
        return train, blockllm  # nothing to adopt: the flags are the settings

    def prepare(self, model, optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model, optimizer, scheduler

    def forward(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device, non_blocking=True)
        return model(input_ids=input_ids, labels=input_ids).loss

    def backward(self, loss: torch.Tensor, accumulation_steps: int) -> None:
        (loss / accumulation_steps).backward()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: str | Path, client_state: dict) -> None:
        directory = Path(directory)
        torch.save(self.model.state_dict(), directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save({"scheduler": self.scheduler.state_dict(), **client_state}, directory / "trainer.pt")

    def load(self, directory: str | Path) -> dict:
        directory = Path(directory)
        self.model.load_state_dict(torch.load(directory / "model.pt", map_location=self.device))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=False))
        trainer = torch.load(directory / "trainer.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer.pop("scheduler"))
        return trainer
