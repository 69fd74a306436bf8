"""``POST /v1/completions``: one or more prompts (text or token ids), ``n`` choices each.

Choice ``index`` is ``prompt_index * n + j``, as in vLLM and OpenAI. Usage counts each prompt once and
every choice's completion. ``echo``, ``suffix`` and ``best_of != n`` answer 501.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deltaserve.engine.request import RequestOutput
from deltaserve.server.app import ServerState, read_json
from deltaserve.server.errors import error_body, to_api_error
from deltaserve.server.logprobs import TokenTexts, completion_logprobs
from deltaserve.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    per_choice,
)
from deltaserve.server.streaming import DONE, MergedStream, SSEResponse, collect_final, sse


def usage(finals: list[RequestOutput], n: int) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals[::n])
    completion = sum(len(o.token_ids) for o in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def create_completion(request: Request, state: ServerState) -> Response:
    state.admit()
    req = CompletionRequest.model_validate(await read_json(request, state.max_request_bytes))
    state.check_model(req.model)
    state.log_ignored(req.model_extra, "completions")
    params = req.to_sampling_params()
    prompts = req.prompts()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stream = state.new_stream([(p, per_choice(params, j)) for p in prompts for j in range(params.n)], rid)
    await stream.start()
    want_logprobs = params.logprobs is not None
    if req.stream:
        head = CompletionResponse(id=rid, created=created, model=state.model_name, choices=[])
        return SSEResponse(_events(stream, head, params.n, req.include_usage, want_logprobs, state.texts))
    finals = await collect_final(request, stream)
    if finals is None:
        return Response(status_code=499)  # client gone: nobody reads this
    choices = [CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason,
                                logprobs=completion_logprobs(o.logprobs or [], state.texts) if want_logprobs
                                else None)
               for i, o in enumerate(finals)]
    body = CompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                              usage=usage(finals, params.n))
    return JSONResponse(body.model_dump())


async def _events(stream: MergedStream, head: CompletionResponse, n: int, include_usage: bool,
                  want_logprobs: bool, texts: TokenTexts) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}
    offsets = [0] * len(stream.jobs)  # characters of each choice's token texts so far (text_offset)
    try:
        async for i, out in stream:
            lps = None
            if want_logprobs and out.delta_logprobs:
                lps = completion_logprobs(out.delta_logprobs, texts, offsets[i])
                offsets[i] += sum(len(t) for t in lps.tokens)
            if not (out.delta_text or out.finished or lps):
                continue
            choice = CompletionChoice(index=i, text=out.delta_text, logprobs=lps, finish_reason=out.finish_reason)
            yield sse(head.model_copy(update={"choices": [choice]}).model_dump_json(exclude=exclude))
        if include_usage:
            final = head.model_copy(update={"usage": usage([o for o in stream.final if o is not None], n)})
            yield sse(final.model_dump_json())
    except Exception as e:  # noqa: BLE001 - after the headers went out, errors go in-band
        err = to_api_error(e)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await stream.close()
    yield DONE
