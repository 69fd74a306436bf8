"""One log line per finished request (AsyncEngine already logs the periodic throughput line)."""

from __future__ import annotations

import logging

from deltaserve.engine.request import RequestOutput

logger = logging.getLogger("deltaserve.requests")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def log_finished(out: RequestOutput) -> None:
    """AsyncEngine ``on_finish`` hook: id, token counts, TTFT, e2e and finish reason."""
    if not logger.isEnabledFor(logging.INFO):
        return
    m = out.metrics or {}
    logger.info("request %s finished (%s): prompt %d tokens, completion %d tokens, TTFT %s, e2e %s%s",
                out.request_id, out.finish_reason, m.get("prompt_tokens", len(out.prompt_token_ids)),
                m.get("completion_tokens", len(out.token_ids)), _ms(m.get("ttft")), _ms(m.get("e2e")),
                f", {m['preemptions']} preemptions" if m.get("preemptions") else "")
