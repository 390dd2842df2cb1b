"""Exercise 1b: two of LoRA's family yourself, rsLoRA's scale and DoRA's forward (Chapter 1 §11).

Fill in every body that raises NotImplementedError, then run

    .venv/bin/python -m pytest exercises/test_01_family.py            # against this file

until everything passes. The book's solution is minilora/family.py; try without it first.
Stuck? The short hint in each stub is a start; longer hints and the answers are in exercises/ANSWERS.md.

You write: rslora_scaling, and DoRALinear.weight_norm and DoRALinear.forward.
Given (not part of the exercise): the rest of DoRALinear comes from minilora.family.DoRALinear, which this
class extends: __init__ (LoRA's A and B, then lora_magnitude_vector = your weight_norm() at the start),
base_weight() (W0 in float32), delta_weight(), merge() and unmerge() (they call your weight_norm too).
"""

import math  # noqa: F401  (you will want math.sqrt)

import torch
from torch import nn  # noqa: F401

from minilora import family
from minilora.bypass import check_bypass_options  # noqa: F401  (the checks of r and lora_alpha, given)
from minilora.lora import LoRALinear  # noqa: F401  (LoRALinear.delta_weight(self) is LoRA's s B A)


def rslora_scaling(lora_alpha: float, r: int) -> float:
    """γ_r = the rank-stabilised scale of rsLoRA (peft's `use_rslora=True`)."""
    raise NotImplementedError(
        "hint: check r and lora_alpha first (a ValueError naming the value, e.g. check_bypass_options(r, "
        "lora_alpha, 0.0)), then return α over the square root of r. Why the square root? Chapter 1 §11.")


class DoRALinear(family.DoRALinear):
    """h = m ⊙ (W0 + s B A) x / ‖W0 + s B A‖ + b, the norm taken per output row (DoRA eq. 5).

    `lora_magnitude_vector` m has one entry per output row; `scaling` s, `lora_A` (r, in), `lora_B` (out, r),
    `lora_dropout`, `merged` and `base` (the frozen nn.Linear, maybe with a bias) are LoRALinear's.
    """

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output row, shape (out_features,), with no gradient (DoRA Sec. 4.3)."""
        raise NotImplementedError(
            "hint: V = base_weight() + LoRALinear.delta_weight(self) (LoRA's s B A; self.delta_weight() is "
            "DoRA's W' - W0 and calls this method), its L2 norm over the inputs (which dim?), and keep "
            "autograd out of it.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "hint: merged? then the base alone. Else start from base(x) = W0 x + b and add a correction: "
            "(m/‖V‖ − 1) ⊙ W0 x + (m/‖V‖) ⊙ s B A x, with V = W0 + s B A. The bias must not be rescaled. "
            "With dropout active in training, use W0 dropout(x) (the same dropped x as the bypass) in the "
            "correction; compute in lora_A's dtype and return the base output's dtype.")
