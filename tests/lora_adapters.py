"""Helpers for the multi-LoRA tests: random PEFT adapters and the transformers + PEFT greedy reference.

`make_peft_adapter` writes a LoRA adapter in PEFT's own format (adapter_config.json plus
adapter_model.safetensors) with seeded random nonzero A and B, sized relative to the base weights so that
greedy output departs from the base model's within a few tokens without turning into noise.
`peft_greedy` is what transformers (wrapped in `PeftModel` when given an adapter) generates greedily in
float32. The base may be a Hugging Face folder or the embedded SmolLM2 GGUF file, which transformers
dequantizes.
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from generation_checks import transformers_greedy

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=4)
def load_base(base: Path) -> Any:
    """The float32 transformers model for a Hugging Face folder or a GGUF file, loaded once per path.
    Callers that wrap it in PEFT must wrap a copy: PEFT replaces the model's modules in place."""
    from transformers import AutoModelForCausalLM

    base = Path(base)
    if base.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return model.eval()


def _randomize_lora(peft_model: Any, seed: int, scale: float) -> None:
    """A ~ N(0, 1/in_features); B sized so that scaling * B @ A has `scale` times the RMS of the base weight."""
    generator = torch.Generator().manual_seed(seed)
    layers = sorted(
        (name, module) for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and module.lora_A
    )
    with torch.no_grad():
        for _, module in layers:
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            rank, in_features = a.shape
            a_std = in_features**-0.5
            target_rms = scale * module.get_base_layer().weight.float().pow(2).mean().sqrt().item()
            b_std = target_rms / (module.scaling["default"] * rank**0.5 * a_std)
            a.copy_(torch.randn(a.shape, generator=generator) * a_std)
            b.copy_(torch.randn(b.shape, generator=generator) * b_std)


def make_peft_adapter(
    base: Path,
    out_dir: Path,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_LINEAR,
    seed: int = 0,
    use_rslora: bool = False,
    scale: float = 0.1,
) -> Path:
    """Save a random LoRA adapter for `base` to `out_dir` with PEFT's `save_pretrained`; return `out_dir`.

    `scale` is the RMS of each target's weight delta (scaling * B @ A) relative to the RMS of its base weight.
    The default 0.1 on all seven projections changes SmolLM2's greedy output within a few tokens and keeps it
    readable English; 0.2 and above start to loop or babble. The same arguments give the same tensors."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        init_lora_weights=False,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(load_base(Path(base))), config)
    _randomize_lora(peft_model, seed, scale)
    out_dir = Path(out_dir)
    with warnings.catch_warnings():  # a GGUF base has no config.json beside it for PEFT's vocabulary check
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def peft_greedy(base: Path, adapter: Optional[Path], prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The `max_new_tokens` token ids that transformers generates greedily in float32 after `prompt_ids`,
    through the LoRA adapter folder `adapter` when given, EOS ignored (like the engine's ignore_eos)."""
    model = load_base(Path(base))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    return transformers_greedy(model, prompt_ids, max_new_tokens)
