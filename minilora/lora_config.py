"""Which layers get a LoRA bypass, with which rank, and what else trains: `LoraConfig`, peft's options.

minilora/core/lora.py's LoraConfig holds what the idea needs (r, α, dropout, target_modules, init); this one
adds peft's options and checks every field when it is made, before any model is touched (a layer made by hand
checks its own arguments; the core takes the numbers as given). Its fields and defaults are peft 0.21's
`LoraConfig`, under the same names, so that a config (or an adapter_config.json) means the same in both
libraries. The name rules behind target_modules, exclude_modules, layers_to_transform and rank_pattern are
minilora.targets; chapter 1 §13 has the table.

Read first: `LoraConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minilora.checks import check_bool, check_bypass_options, check_choice, check_int, check_number
from minilora.core import lora as core
from minilora.targets import check_names, check_target_modules, is_index, pattern_value

INITS = ("kaiming", "gaussian")
BIAS_OPTIONS = ("none", "all", "lora_only")


def check_hyperparameters(r, lora_alpha, lora_dropout, init) -> None:
    """Raise ValueError naming the argument and value for anything LoRA cannot use."""
    check_bypass_options(r, lora_alpha, lora_dropout)
    check_choice("init", init, INITS)


@dataclass
class LoraConfig(core.LoraConfig):
    """Which layers get a bypass, with which rank, and what else trains; defaults and meaning as peft's.

    target_modules, as in peft:
      - a list/tuple of names: a module matches if its full name equals an entry or ends with "." + entry
        ("q_proj" matches "model.layers.0.self_attn.q_proj");
      - a str: a regular expression that must match the *whole* module name (re.fullmatch);
      - "all-linear": every Linear layer except the output head.
    exclude_modules (same two forms) and modules_to_save take modules away; layers_to_transform keeps only
    the blocks with those indices (layers_pattern names the block list, e.g. "layers"; minilora.targets.
    layer_index). rank_pattern / alpha_pattern give some modules another r / lora_alpha ({"v_proj": 16}: a
    regex matched against the end of the name). use_rslora scales by α/√r; use_dora builds DoRA layers
    (minilora.family.add_dora). bias: which biases train too ("none", "all", or "lora_only": those of the
    adapted layers). modules_to_save: modules trained in full beside the adapter (a classification head).
    """

    # r, lora_alpha, lora_dropout, target_modules (here also a str) and init: minilora.core.lora.LoraConfig's
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None

    def __post_init__(self):
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init)
        check_target_modules(self.target_modules)
        check_choice("bias", self.bias, BIAS_OPTIONS)
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)
        check_names("modules_to_save", self.modules_to_save, regex=False)
        check_names("exclude_modules", self.exclude_modules, regex=True)
        check_names("layers_pattern", self.layers_pattern, regex=True)
        for label, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ValueError(f"{label} must be a dict {{module regex: value}}, got {label}={pattern!r}")
            for key, value in pattern.items():
                check_names(f"{label} key", key, regex=True)
                if label == "rank_pattern":
                    check_int(f"rank_pattern[{key!r}]", value, 1, why=" (the rank of the update)")
                else:
                    check_number(f"alpha_pattern[{key!r}]", value, 0, low_open=True, why=" (it scales the bypass)")
        layers = self.layers_to_transform
        if layers is not None and not (is_index(layers) or (isinstance(layers, (list, tuple))
                                                               and all(is_index(i) for i in layers))):
            raise ValueError(f"layers_to_transform must be a block index >= 0 or a list of them, got "
                             f"layers_to_transform={layers!r}")
        self.check_combinations()

    def check_combinations(self) -> None:
        """Options that only make sense together, as peft checks them (and one peft would save ambiguously)."""
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(f"layers_to_transform / layers_pattern need target_modules as a list of names, got "
                             f"target_modules={self.target_modules!r} (a regex says which layers by itself)")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (which blocks)")
        if self.bias == "all" and self.modules_to_save:
            raise ValueError(f"bias='all' with modules_to_save={self.modules_to_save!r}: peft saves such a "
                             f"module's bias under three names (original, copy and its own path); give the "
                             f"module in modules_to_save (its bias trains with it) and bias='lora_only'")

    def rules(self) -> dict:
        """The selection rules besides target_modules, as minilora.bypass.selected_modules takes them."""
        return dict(exclude_modules=self.exclude_modules, layers_to_transform=self.layers_to_transform,
                    layers_pattern=self.layers_pattern, modules_to_save=self.modules_to_save)

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """(r, lora_alpha) for module `name`: its rank_pattern / alpha_pattern entry, else r / lora_alpha."""
        return pattern_value(self.rank_pattern, name, self.r), pattern_value(self.alpha_pattern, name,
                                                                              self.lora_alpha)
