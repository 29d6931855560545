"""transforms.Normalize works; Resize and ToTensor raise when used (only SAMv2 uses them, never CCNet)."""

import torch

from torchvision.transforms import functional


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace: bool = False) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return (tensor - mean) / std


class _Unavailable:
    name = "transform"

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            f"torchvision.transforms.{self.name} is a stand-in (ccrepro parity peer venv without torchvision); "
            "sssegmentation's CCNet never uses it"
        )


class Resize(_Unavailable):
    name = "Resize"


class ToTensor(_Unavailable):
    name = "ToTensor"


__all__ = ["Normalize", "Resize", "ToTensor", "functional"]
