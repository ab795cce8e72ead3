"""HF peft's LoRA layer as the reference of the LoRA-family tests (DyLoRA, SoRA, ALLoRA).

One place builds it: ``peft.tuners.lora.Linear`` on a copy of a layer's base, with the factors the
test gives, so every strategy whose special case is plain LoRA is checked against the same oracle.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class _OneLinear(nn.Module):
    """The smallest model peft can adapt: one linear layer named ``lin``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.lin = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class PeftLoRA(nn.Module):
    """``y = W0 x + b + (alpha / r) B A x`` computed by peft's LoRA layer, r = ``A.shape[0]``.

    ``base`` is copied (the test's layer keeps its own), ``A`` [r, d_in] and ``B`` [d_out, r] are
    copied into peft's factors, dropout is off. :attr:`A` and :attr:`B` are peft's parameters (for
    their gradients); :attr:`up` is peft's ``lora_B`` module, the branch's last (for hooks).
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float) -> None:
        super().__init__()
        copy = nn.Linear(base.in_features, base.out_features).to(base.weight.dtype)
        copy.load_state_dict(base.state_dict())
        cfg = LoraConfig(
            r=A.shape[0], lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, init_lora_weights=False
        )
        self.layer = get_peft_model(_OneLinear(copy), cfg).base_model.model.lin
        self.up: nn.Module = self.layer.lora_B["default"]
        self.A: nn.Parameter = self.layer.lora_A["default"].weight
        self.B: nn.Parameter = self.up.weight
        with torch.no_grad():
            self.A.copy_(A)
            self.B.copy_(B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
