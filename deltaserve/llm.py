"""The offline Python API: ``LLM(model_dir, **config).generate(prompts, sampling_params)``."""

from __future__ import annotations

from collections.abc import Sequence

from deltaserve.config import EngineConfig
from deltaserve.engine.engine import LLMEngine
from deltaserve.engine.request import RequestOutput
from deltaserve.errors import InvalidRequestError
from deltaserve.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs the engine loop in the calling thread until every prompt has finished.

    ``LLM(None)`` (or no argument) uses the built-in demo model. Config keywords are EngineConfig
    fields (``dtype``, ``device``, ``max_num_seqs``, ``inproj``, ...).
    """

    def __init__(self, model: str | None = None, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = self._as_list(prompts)
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} sampling_params for {len(prompts)} prompts: pass one, or one "
                                      "per prompt", "sampling_params")
        reqs = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        for r in reqs:
            self.engine.add_request(r)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generate")
        while len(final) < len(reqs):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [final[r.request_id] for r in reqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, True, chat_template_kwargs) for c in convs]
        return self.generate([self.tokenizer.encode(p) for p in prompts], sampling_params)

    @staticmethod
    def _as_list(prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        return list(prompts)
