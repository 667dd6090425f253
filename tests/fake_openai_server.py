"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol (test helper).

It judges deterministically: the summary that contains ``marker`` wins; when both or neither contain it,
``tie_prefers`` ("A" by default) wins, which gives the server a controllable position bias. With
``always`` = "A" / "B" it always answers that letter (a pure position-biased judge).

Faults are injected per prompt from directives written in the summaries themselves, e.g. a candidate
"... [fault=429x2]" makes the first two requests of that prompt answer 429 with ``Retry-After``. Known
directives (N = how many times, default 1):
  429xN        429 Too Many Requests with a Retry-After header (seconds, ``retry_after``)
  500xN        500 Internal Server Error
  timeoutxN    sleep ``sleep_s`` seconds before answering (longer than the client timeout)
  malformedxN  200 with a verdict line that cannot be parsed; "malformed" alone = always malformed
  garbledxN    200 with neither `Comparison:` nor `Preferred:`; "garbled" alone = always garbled
  dropxN       close the connection without any answer (connection error)
Counts are kept per prompt (sha256 of the user message): every request, and every 200 answer ("paid").
``hook(server, n_paid)`` is called in the handler thread before a 200 is sent; it can ``freeze()`` the
server: frozen handlers send nothing (the request is not paid).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULT_RE = re.compile(r"\[fault=(429|500|timeout|malformed|garbled|drop)(?:x(\d+))?\]")


def extract_summaries(user_message: str) -> tuple[str, str]:
    a = user_message.split("### Summary A:", 1)[1].split("### Summary B:", 1)[0]
    b = user_message.split("### Summary B:", 1)[1].split("### Instructions:", 1)[0]
    return a.strip(), b.strip()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) drops connections under a concurrent client


class FakeJudgeServer:
    def __init__(self, marker: str = "GOODWORD", retry_after: float = 0.05, sleep_s: float = 1.5):
        self.marker = marker
        self.retry_after = retry_after
        self.sleep_s = sleep_s
        self.tie_prefers = "A"
        self.always: str | None = None
        self.hook = None
        self.lock = threading.Lock()
        self.frozen = threading.Event()
        self.reset_counts()
        self.httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def reset_counts(self):
        with self.lock:
            self.requests = Counter()  # prompt key -> requests received
            self.paid = Counter()  # prompt key -> 200 answers sent
            self.models = Counter()
            self.n_requests = 0
            self.n_paid = 0
            self.n_dropped_frozen = 0
            self.last_body: dict | None = None

    def freeze(self):
        self.frozen.set()

    def unfreeze(self):
        self.frozen.clear()

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- judging -----------------------------------------------------------------------------------
    def verdict(self, user_message: str) -> str:
        if self.always:
            return self.always
        a, b = extract_summaries(user_message)
        in_a, in_b = self.marker in a, self.marker in b
        if in_a and not in_b:
            return "A"
        if in_b and not in_a:
            return "B"
        return self.tie_prefers

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                req = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if server.frozen.is_set():
                    with server.lock:
                        server.n_dropped_frozen += 1
                    self.close_connection = True
                    return
                user = [m for m in req["messages"] if m["role"] == "user"][-1]["content"]
                key = hashlib.sha256(user.encode()).hexdigest()
                with server.lock:
                    server.requests[key] += 1
                    server.n_requests += 1
                    server.models[req.get("model")] += 1
                    server.last_body = req
                    nth = server.requests[key]  # 1-based index of this request for this prompt
                faults = FAULT_RE.findall(user)
                malformed = garbled = False
                for kind, times in faults:
                    limit = int(times) if times else (10**9 if kind in ("malformed", "garbled") else 1)
                    if nth > limit:
                        continue
                    if kind == "429":
                        return self._send(
                            429,
                            {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
                            {"Retry-After": str(server.retry_after)},
                        )
                    if kind == "500":
                        return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                    if kind == "drop":
                        self.close_connection = True
                        return
                    if kind == "timeout":
                        time.sleep(server.sleep_s)  # the client has given up by now
                        self.close_connection = True
                        return
                    if kind == "malformed":
                        malformed = True
                    if kind == "garbled":
                        garbled = True
                v = server.verdict(user)
                if garbled:
                    content = "I think both summaries have merits."
                elif malformed:
                    content = "Comparison: both are fine.\nPreferred: Summary " + v + " is better"
                else:
                    content = f"Comparison: Summary {v} covers the key point.\nPreferred: {v}"
                if server.hook is not None:
                    server.hook(server, server.n_paid)
                    if server.frozen.is_set():
                        with server.lock:
                            server.n_dropped_frozen += 1
                        self.close_connection = True
                        return
                body = {
                    "id": f"chatcmpl-{key[:12]}-{nth}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": req.get("model", "fake"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": len(user) // 4,
                        "completion_tokens": len(content) // 4,
                        "total_tokens": len(user) // 4 + len(content) // 4,
                    },
                }
                try:
                    self._send(200, body)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with server.lock:
                    server.paid[key] += 1
                    server.n_paid += 1

        return Handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # manual use: python tests/fake_openai_server.py
    srv = FakeJudgeServer().start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
