"""A fake LLM HTTP server for tests and benchmarks: OpenAI Chat Completions and Anthropic Messages.

It speaks just enough of both wire formats for the real ``openai`` and ``anthropic`` SDKs (sync and
async clients) and can inject faults: rate limits, server errors, slow answers, malformed bodies,
dropped connections, and killing a process when the n-th request arrives.

    with FakeLLM(latency=0.05, faults=[{"status": 429, "retry_after": 0.1}]) as fake:
        client = openai.OpenAI(api_key="sk-test", base_url=fake.url + "/v1", max_retries=0)
        ...
        fake.log        # one dict per request
        fake.answered() # bodies that got a complete 200 answer

Run as a process (for benchmarks): ``python tests/llm_server.py --latency 0.2`` prints
``READY <url>`` and serves until killed.

Stdlib only: a minimal HTTP/1.1 server (keep-alive, Content-Length or chunked request bodies) on
asyncio streams, served from one background thread with its own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["FakeLLM", "default_responder"]

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
MALFORMED_BODY = b'{"choices": ['

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}

# error "type" in the body, per API and status
_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class _BadRequest(Exception):
    """The request is invalid for its API: answered with a 400 in that API's error format."""


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def _last_user(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def default_responder(body: dict, api: str) -> str:
    """Deterministic text built from the last user message (and the choice index when n > 1)."""
    text = f"Answer to: {_last_user(body)[:200]} This is a deterministic reply from the fake {api} server."
    choice = body.get("_choice")
    if choice:
        text += f" Variant {choice}."
    return text


def _words(text: str) -> int:
    return len(text.split())


def _cut(text: str, limit: Any) -> tuple[str, bool]:
    """The text cut to `limit` words, and whether it was cut."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return text, False
    words = text.split()
    if len(words) <= limit:
        return text, False
    return " ".join(words[:limit]), True


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class FakeLLM:
    """A local OpenAI/Anthropic-compatible server with fault injection; see the module docstring.

    faults: fault dicts, each used by one API request (in order) before normal answers resume:
        {"status": 429, "retry_after": 1.5}   429 with Retry-After (seconds) and the API's error body
        {"status": 500} / 503 / 529 / any     that status with the API's error body
        {"delay": 5.0}                        a normal answer sent after 5 s instead of `latency`
        {"malformed": True}                   200 whose body is not valid JSON
        {"drop": True}                        the connection is closed without a response
      optional extra keys: "message" and "type" (error body), "headers" (extra response headers),
      "retry_after_ms" (a retry-after-ms header), "delay" (with any of the above: wait that long first).
    fault_for: callable(body) -> fault dict | None, asked for every API request first; when it gives
      a fault, the queue in `faults` is left as it is.
    Faults and `fault_for` apply to the two API paths only; kill_at counts every request.
    Every response (errors included) waits `latency` seconds (or the fault's "delay") before it is sent.
    kill_at: (pid, n): SIGKILL pid when the n-th request (1-based) arrives, then answer it as usual.
    The responder gets the request body (a copy with "_choice": i when OpenAI's n > 1) and the api
    name ("openai" or "anthropic") and returns the reply text; a responder that raises gives a 500.

    log: one dict per request, appended when it arrives and completed when it is answered:
      n, path, api ("openai", "anthropic" or None), key (Bearer token or x-api-key), body (parsed
      JSON or None), status (sent; None when nothing was), fault (the fault used or None), received
      and answered (time.time(); answered None when no response went out), headers (lower-cased
      request headers, e.g. x-stainless-retry-count), and client_gone (True when the client had
      closed the connection before the answer was due) or error (a responder's traceback).
    """

    def __init__(
        self,
        responder: Callable[[dict, str], str] | None = None,
        latency: float = 0.0,
        faults: list[dict] | None = None,
        fault_for: Callable[[dict], dict | None] | None = None,
        kill_at: tuple[int, int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.responder = responder or default_responder
        self.latency = latency
        self.faults: deque[dict] = deque(faults or [])
        self.fault_for = fault_for
        self.kill_at = kill_at
        self.host = host
        self.port = port
        self.url = ""
        self.log: list[dict] = []
        self._n = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._conns: set[asyncio.Task] = set()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeLLM:
        if self._thread is not None:
            raise RuntimeError("FakeLLM already started")
        _raise_fd_limit()
        self._ready.clear()
        self.url = ""
        self._start_error = None
        self._thread = threading.Thread(target=self._run, name="FakeLLM", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("FakeLLM could not start") from self._start_error
        if not self.url:
            raise RuntimeError("FakeLLM did not start within 10 s")
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and self._stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed in between
                pass
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answered(self) -> list[dict]:
        """Bodies of the requests that got a complete 200 JSON answer."""
        return [
            e["body"]
            for e in list(self.log)
            if e["status"] == 200 and e["answered"] is not None and not (e["fault"] or {}).get("malformed")
        ]

    @property
    def requests(self) -> int:
        """How many requests arrived so far."""
        return self._n

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # reported to start()
            if not self._ready.is_set():
                self._start_error = e
            else:
                traceback.print_exc()
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, self.host, self.port, backlog=4096, limit=1 << 20, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            conns = list(self._conns)
            for task in conns:
                task.cancel()
            if conns:
                await asyncio.wait(conns, timeout=5)

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection between requests
                except asyncio.LimitOverrunError:
                    await self._send_raw(writer, 431, _dumps({"error": "headers too large"}), close=True)
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    await self._send_raw(writer, 400, _dumps({"error": "bad request line"}), close=True)
                    return
                method, target, version = parts
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    raw = await _read_chunked(reader)
                else:
                    length = int(headers.get("content-length") or 0)
                    raw = await reader.readexactly(length) if length else b""
                conn = headers.get("connection", "").lower()
                keep_alive = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
                if not await self._request(reader, writer, method, target, headers, raw, keep_alive):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        except asyncio.CancelledError:
            return
        finally:
            if task is not None:
                self._conns.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    async def _send_raw(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        request_id: str = "req_fake_0",
        extra: dict | None = None,
    ) -> None:
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"x-request-id: {request_id}",
            f"request-id: {request_id}",
            "Connection: close" if close else "Connection: keep-alive",
        ]
        for name, value in (extra or {}).items():
            head.append(f"{name}: {value}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: dict[str, str],
        raw: bytes,
        keep_alive: bool,
    ) -> bool:
        """Answer one request; whether the connection stays open."""
        self._n += 1
        n = self._n
        received = time.time()
        path = target.split("?", 1)[0]
        api = "openai" if path == OPENAI_PATH else "anthropic" if path == ANTHROPIC_PATH else None
        auth = headers.get("authorization", "")
        key = auth[7:] if auth[:7].lower() == "bearer " else headers.get("x-api-key")
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        entry: dict[str, Any] = {
            "n": n,
            "path": path,
            "api": api,
            "key": key,
            "body": body,
            "status": None,
            "fault": None,
            "received": received,
            "answered": None,
            "headers": headers,
        }
        self.log.append(entry)
        request_id = f"req_fake_{n}"

        if self.kill_at is not None and self.kill_at[1] == n:
            try:
                os.kill(self.kill_at[0], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        extra: dict[str, str] = {}
        fault = None
        status = 200
        if api is None:
            status, payload = 404, _dumps(_error_body(None, 404, f"Unknown path {path}"))
        elif method != "POST":
            status, payload = 405, _dumps(_error_body(api, 405, f"Method {method} not allowed on {path}"))
        else:
            try:
                if self.fault_for is not None and isinstance(body, dict):
                    fault = self.fault_for(body)
                if not fault and self.faults:
                    fault = self.faults.popleft()
                entry["fault"] = fault
                status, payload, extra = self._answer(api, body, fault)
            except Exception as e:  # a failing responder or fault_for becomes a 500
                entry["error"] = traceback.format_exc()
                status, payload = 500, _dumps(_error_body(api, 500, f"fake server error: {e!r}"))

        wait = self.latency
        if fault and "delay" in fault:
            wait = float(fault["delay"])
        if wait > 0:
            await asyncio.sleep(wait)

        if fault and fault.get("drop"):
            return False  # _handle closes the connection: no response at all
        if reader.at_eof():
            entry["client_gone"] = True  # the client gave up (e.g. its timeout) while we waited
            return False
        # set before the bytes leave: a client (maybe in the test's own thread) that has its answer
        # must find it logged; taken back if the write fails
        entry["status"] = status
        entry["answered"] = time.time()
        try:
            await self._send_raw(
                writer, status, payload, close=not keep_alive, request_id=request_id, extra=extra
            )
        except BaseException:
            entry["answered"] = None
            raise
        return keep_alive

    def _answer(self, api: str, body: Any, fault: dict | None) -> tuple[int, bytes, dict]:
        """The status, body and extra headers for an API request (after its fault, if any)."""
        extra: dict[str, str] = {}
        if fault:
            extra.update({str(k): str(v) for k, v in (fault.get("headers") or {}).items()})
            if fault.get("drop"):
                return 0, b"", extra
            if fault.get("malformed"):
                return 200, MALFORMED_BODY, extra
            status = fault.get("status")
            if status is not None and int(status) != 200:
                status = int(status)
                if "retry_after" in fault:
                    extra["retry-after"] = str(fault["retry_after"])
                if "retry_after_ms" in fault:
                    extra["retry-after-ms"] = str(fault["retry_after_ms"])
                message = fault.get("message") or f"fake {status} {_REASONS.get(status, 'error')}"
                return status, _dumps(_error_body(api, status, message, fault.get("type"))), extra
        try:
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            answer = self._openai(body) if api == "openai" else self._anthropic(body)
        except _BadRequest as e:
            return 400, _dumps(_error_body(api, 400, str(e))), extra
        return 200, _dumps(answer), extra

    def _openai(self, body: dict) -> dict:
        model = body.get("model")
        messages = body.get("messages")
        if not model or not isinstance(model, str):
            raise _BadRequest("you must provide a model parameter")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _BadRequest("each message must be an object with a 'role'")
        if body.get("stream"):
            raise _BadRequest("the fake server does not stream")
        n = body.get("n")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise _BadRequest("'n' must be an integer between 1 and 128")
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in messages)
        choices = []
        completion_tokens = 0
        for i in range(n):
            text = self.responder(body if n == 1 else {**body, "_choice": i}, "openai")
            text, cut = _cut(str(text), limit)
            completion_tokens += _words(text)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if cut else "stop",
                }
            )
        return {
            "id": f"chatcmpl-fake{self._n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }

    def _anthropic(self, body: dict) -> dict:
        model = body.get("model")
        messages = body.get("messages")
        max_tokens = body.get("max_tokens")
        if not model or not isinstance(model, str):
            raise _BadRequest("model: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _BadRequest("max_tokens: Field required (a positive integer)")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages: at least one message is required")
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("user", "assistant"):
                raise _BadRequest(
                    f"messages.{i}.role: Input should be 'user' or 'assistant'"
                    + (
                        " (use the top-level 'system' parameter for a system prompt)"
                        if role == "system"
                        else ""
                    )
                )
        if body.get("stream"):
            raise _BadRequest("the fake server does not stream")
        text, cut = _cut(str(self.responder(body, "anthropic")), max_tokens)
        input_tokens = _words(_text_of(body.get("system"))) + sum(
            _words(_text_of(m.get("content"))) for m in messages
        )
        return {
            "id": f"msg_fake{self._n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens" if cut else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": _words(text)},
        }


def _error_body(api: str | None, status: int, message: str, kind: str | None = None) -> dict:
    if api == "anthropic":
        kind = (
            kind
            or _ANTHROPIC_ERROR_TYPES.get(status)
            or ("api_error" if status >= 500 else "invalid_request_error")
        )
        return {"type": "error", "error": {"type": kind, "message": message}}
    default_kind, code = _OPENAI_ERROR_TYPES.get(status) or (
        ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind or default_kind, "param": None, "code": code}}


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, up to the empty line
                pass
            return b"".join(chunks)
        data = await reader.readexactly(size + 2)
        chunks.append(data[:-2])


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: 1,000+ connections need 2,000+ descriptors."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI/Anthropic server: prints READY <url>")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every answer waits")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--faults", default="", help="JSON list of fault dicts for the first requests")
    args = parser.parse_args(argv)
    fake = FakeLLM(latency=args.latency, faults=json.loads(args.faults) if args.faults else None)
    fake.log = _NoLog()  # a long benchmark would otherwise keep every body in memory
    fake.start()
    print(f"READY {fake.url}", flush=True)
    try:
        while fake._thread is not None and fake._thread.is_alive():
            fake._thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


class _NoLog(list):
    """A log that keeps nothing (for the standalone server)."""

    def append(self, item: Any) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
