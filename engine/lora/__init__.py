"""LoRA adapters: PEFT folders read and checked (adapter), kept loaded (cache), and put in the model's slots
for steps that mix adapters (slots); the math lives in engine.layers.lora."""
from engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
