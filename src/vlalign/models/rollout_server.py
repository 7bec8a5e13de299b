"""The rollout server (``vlalign rollout-server``): a vLLM engine on its own devices, for trainers elsewhere.

One :class:`~vlalign.models.vllm_engine.VLLMEngine` behind a small HTTP server (the standard library's
``ThreadingHTTPServer``; one lock around the engine, so requests run one at a time). The trainer's
side is :class:`vlalign.models.vllm_client.ServerEngine` (``rollout.vllm_server``). Endpoints, all
answering JSON (an error: ``{"error": {"message": ..., "type": ...}}`` with a 4xx/5xx status):

- ``GET /v1/models``: the served model, in the shape vLLM's OpenAI server gives (``id``: the model as
  given to the command, ``root``: its folder), so :func:`~vlalign.models.vllm_engine.check_server`
  reads either server alike;
- ``GET /health``: ``{"status": "ok", "weights_version": V, "updating": bool}``;
- ``POST /generate``: ``{"weights_version": V, "batch": RequestBatch}`` (prompts as rendered chat text,
  images as base64 PNG, sampling settings, one seed per completion, stop and banned token ids:
  :class:`~vlalign.models.vllm_requests.RequestBatch`) -> ``{"weights_version": V, "outputs": [...]}``,
  one :class:`~vlalign.models.vllm_requests.PromptOutput` per prompt (prompt ids, token ids,
  log-probs of the sampled tokens, stop flags, texts). Refused (409) while a weight update is
  incomplete or when the server holds another version than the client expects;
- ``POST /update_weights?version=V&part=I&last=0|1``: the body is one part of the weights, a safetensors
  file in memory (vLLM's weight names, whole layers per part), loaded at once (so the server holds at
  most one part); after the last part the caches are reset and ``V`` becomes the served version;
- ``POST /close``: answer, stop serving, shut the engine down.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from safetensors.torch import load

from vlalign.models.generate import decode_text
from vlalign.models.vllm_engine import VLLMEngine
from vlalign.models.vllm_requests import RequestBatch

MAX_BODY_BYTES = 4 << 30
"""Largest request body accepted (a weights part; the client sends parts of about 256 MiB)."""


class RequestError(Exception):
    """A request the server refuses: ``status`` and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RolloutServer:
    """What the endpoints do, behind one lock (the engine serves one request at a time)."""

    def __init__(self, engine: VLLMEngine, *, model_id: str, root: str | Path, max_model_len: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self.root = str(root)
        self.max_model_len = max_model_len
        self.lock = threading.Lock()
        self.version = 0
        """The weights version the engine holds (0: the folder's, as loaded)."""
        self.pending: tuple[int, int] | None = None
        """(version, next part) of a weight update in progress."""
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "vlalign",
            "root": self.root,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [entry]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "weights_version": self.version, "updating": self.pending is not None}

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        batch = RequestBatch.from_json(body["batch"])
        wanted = body.get("weights_version")
        with self.lock:
            if self.pending is not None:
                raise RequestError(409, f"a weight update (version {self.pending[0]}) is incomplete")
            if wanted is not None and wanted != self.version:
                raise RequestError(409, f"the server holds weights version {self.version}, the client expects {wanted}")
            outputs = self.engine.run_batch(batch)
            tok = self.engine.llm.get_tokenizer()
        for out in outputs:
            out.texts = [decode_text(tok, ids, s) for ids, s in zip(out.token_ids, out.stopped)]
        return {"weights_version": self.version, "outputs": [o.to_json() for o in outputs]}

    def update_weights(self, data: bytes, *, version: int, part: int, last: bool) -> dict[str, Any]:
        tensors = load(data)
        with self.lock:
            if part == 0:
                self.pending = (version, 0)
            if self.pending != (version, part):
                expected = f"part {self.pending[1]} of version {self.pending[0]}" if self.pending else "part 0"
                raise RequestError(409, f"weights part {part} of version {version} arrived, expected {expected}")
            self.engine.load_tensors(list(tensors.items()))  # a list: picklable for engine worker processes
            self.pending = None if last else (version, part + 1)
            if last:
                self.version = version
        return {"weights_version": self.version, "loaded": len(tensors), "complete": last}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        state = self.server.state
        routes = {"/v1/models": state.models, "/health": state.health}
        self._answer(lambda: routes[self._path()]() if self._path() in routes else self._unknown())

    def do_POST(self) -> None:
        self._answer(self._post)

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _unknown(self) -> dict[str, Any]:
        raise RequestError(404, f"no endpoint {self.command} {self._path()}")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _post(self) -> dict[str, Any]:
        state, path = self.server.state, self._path()
        if path == "/generate":
            return state.generate(json.loads(self._body()))
        if path == "/update_weights":
            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            try:
                version, part, last = int(query["version"]), int(query.get("part", 0)), query.get("last", "1") == "1"
            except (KeyError, ValueError):
                raise RequestError(400, "update_weights needs ?version=V&part=I&last=0|1") from None
            return state.update_weights(self._body(), version=version, part=part, last=last)
        if path == "/close":
            self._body()
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return {"status": "closing"}
        return self._unknown()

    def _answer(self, handler: Any) -> None:
        try:
            status, payload = 200, handler()
        except RequestError as exc:
            status, payload = exc.status, {"error": {"message": str(exc), "type": "request"}}
        except Exception as exc:  # the client gets the message; the server keeps serving
            status, payload = 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server"}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: RolloutServer, *, verbose: bool) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.verbose = verbose


def http_server(state: RolloutServer, *, host: str, port: int, verbose: bool = False) -> ThreadingHTTPServer:
    """The HTTP server of ``state`` bound to ``host:port`` (0: a free port), not serving yet."""
    return _HTTPServer((host, port), state, verbose=verbose)


def serve(state: RolloutServer, *, host: str, port: int, verbose: bool = False) -> None:
    """Serve ``state`` on ``host:port`` until ``POST /close`` (or Ctrl-C), then shut the engine down."""
    httpd = http_server(state, host=host, port=port, verbose=verbose)
    print(f"vlalign rollout-server: {state.model_id} on http://{host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        state.engine.close()


__all__ = ["MAX_BODY_BYTES", "RequestError", "RolloutServer", "http_server", "serve"]
