"""``POST /v1/chat/completions``: messages -> chat template -> n engine requests -> one response.

Streamed, each choice first gets a chunk with ``delta: {"role": "assistant", "content": ""}``, then
one chunk per engine output that carries text (or logprobs), and the last chunk of a choice carries
its real ``finish_reason``; with ``stream_options.include_usage`` a chunk with ``"choices": []`` and
the usage follows, then ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from deltaserve.engine.request import RequestOutput
from deltaserve.errors import InvalidRequestError
from deltaserve.server.app import ServerState, read_json
from deltaserve.server.errors import error_body, to_api_error
from deltaserve.server.logprobs import TokenTexts, chat_logprobs
from deltaserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    UsageInfo,
    per_choice,
)
from deltaserve.server.streaming import DONE, MergedStream, SSEResponse, collect_final, sse


def usage(finals: list[RequestOutput]) -> UsageInfo:
    """The prompt counts once (all choices share it); completions add up."""
    prompt = len(finals[0].prompt_token_ids) if finals else 0
    completion = sum(len(o.token_ids) for o in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def create_chat_completion(request: Request, state: ServerState) -> Response:
    engine = state.admit()
    req = ChatCompletionRequest.model_validate(await read_json(request, state.max_request_bytes))
    state.check_model(req.model)
    state.log_ignored(req.model_extra, "chat")
    params = req.to_sampling_params()
    messages = [m.to_template() for m in req.messages]
    prompt = engine.tokenizer.apply_chat_template(messages, req.add_generation_prompt is not False,
                                                  req.chat_template_kwargs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = state.new_stream([(prompt, per_choice(params, i)) for i in range(params.n)], rid)
    try:
        await stream.start()
    except InvalidRequestError as e:
        e.param = "messages" if e.param == "prompt" else e.param  # the engine names the completions field
        raise
    want_logprobs = params.logprobs is not None
    if req.stream:
        head = ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=[])
        return SSEResponse(_events(stream, head, params.n, req.include_usage, want_logprobs, state.texts))
    finals = await collect_final(request, stream)
    if finals is None:
        return Response(status_code=499)  # client gone: nobody reads this
    choices = [ChatChoice(index=i, message=ChatResponseMessage(content=o.text), finish_reason=o.finish_reason,
                          logprobs=chat_logprobs(o.logprobs or [], state.texts) if want_logprobs else None)
               for i, o in enumerate(finals)]
    body = ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                                  usage=usage(finals))
    return JSONResponse(body.model_dump())


async def _events(stream: MergedStream, head: ChatCompletionChunk, n: int, include_usage: bool,
                  want_logprobs: bool, texts: TokenTexts) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}  # OpenAI: usage is null on every chunk, or absent

    def chunk(choice: ChatChunkChoice) -> str:
        return sse(head.model_copy(update={"choices": [choice]}).model_dump_json(exclude=exclude))

    try:
        for i in range(n):
            yield chunk(ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
        async for i, out in stream:
            lps = chat_logprobs(out.delta_logprobs, texts) if want_logprobs and out.delta_logprobs else None
            if not (out.delta_text or out.finished or lps):
                continue  # held back (a possible stop string, half a character): nothing to say yet
            delta = {"content": out.delta_text} if out.delta_text or not out.finished else {}
            yield chunk(ChatChunkChoice(index=i, delta=delta, logprobs=lps, finish_reason=out.finish_reason))
        if include_usage:
            final = head.model_copy(update={"usage": usage([o for o in stream.final if o is not None])})
            yield sse(final.model_dump_json())
    except Exception as e:  # noqa: BLE001 - after the headers went out, errors go in-band
        err = to_api_error(e)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        await stream.close()
    yield DONE
