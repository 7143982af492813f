"""Offline batch generation: `LLM(model=...).generate(prompts, params)`."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, Prompt
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

PROGRESS_BAR_MIN_PROMPTS = 16


class LLM:
    def __init__(self, model: Optional[str] = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **engine_args}))
        self._request_counter = itertools.count()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also stop when this process exits)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
        use_tqdm: bool = True,
        lora_request: Union[None, LoRARequest, Sequence[Optional[LoRARequest]]] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order. `lora_request`: one
        adapter for every prompt, or one (or None: the base model) per prompt."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _per_prompt(sampling_params, SamplingParams, len(prompt_list), "sampling_params")
        lora_list = _per_prompt(lora_request, LoRARequest, len(prompt_list), "lora_request")
        requests = [
            self.engine.make_request(f"llm-{next(self._request_counter)}", prompt, params, lora_request=lora)
            for prompt, params, lora in zip(prompt_list, params_list, lora_list)
        ]
        for request in requests:
            self.engine.add_request(request)
        return self._run(requests, use_tqdm and len(requests) >= PROGRESS_BAR_MIN_PROMPTS)

    def _run(self, requests: list[Any], show_progress: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(requests), desc="generate", disable=not show_progress) as progress:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    if delta.request_id in results:
                        results[delta.request_id].add(delta)
                    else:
                        results[delta.request_id] = delta
                    progress.update(int(delta.finished))
        return [results[request.request_id] for request in requests]


def _as_prompt_list(prompts: Union[Prompt, Sequence[Prompt]]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    prompt_list = list(prompts)
    if not prompt_list:
        raise ValueError("prompts is empty")
    return prompt_list


def _per_prompt(value: Any, single: type, count: int, name: str) -> list[Any]:
    """`value` repeated for each prompt when it is None or one `single`, else its items, one per prompt."""
    if value is None or isinstance(value, single):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: got {len(values)} for {count} prompts")
    return values
