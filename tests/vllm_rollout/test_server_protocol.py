"""Server mode without vLLM: the start-up checks, and the HTTP protocol against a stand-in engine.

These run in the main environment (no vLLM needed: the trainer's side is standard library only).
The rollout server's HTTP layer (:mod:`vlalign.models.rollout_server`) is served in a thread over a
stand-in engine that records what reaches it, so the weight parts, the version checks and the error
answers are checked here; the real engine behind the same server is tested in test_rollout_server.py.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.models.generate import GenerationSettings
from vlalign.models.rollout_server import RolloutServer, http_server
from vlalign.models.vllm_client import ServerEngine, layer_of, weight_parts
from vlalign.models.vllm_engine import VLLMError, merged_weights
from vlalign.models.vllm_requests import PromptOutput, RequestBatch
from vlalign.recipes.common import ModelConfig
from vlalign.recipes.rollouts import check_rollout_engine


class _Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids)


class StandInEngine:
    """Records the batches and weights it is given; answers token ids 7, 8, 9 with log-probs -1, -2, -3."""

    def __init__(self) -> None:
        self.batches: list[RequestBatch] = []
        self.loads: list[dict[str, torch.Tensor]] = []
        self.closed = False
        self.llm = self

    def get_tokenizer(self) -> _Tokenizer:
        return _Tokenizer()

    def run_batch(self, batch: RequestBatch) -> list[PromptOutput]:
        self.batches.append(batch)
        return [
            PromptOutput([1, 2], [[7, 8, 9]] * len(seeds), [[-1.0, -2.0, -3.0]] * len(seeds), [True] * len(seeds))
            for seeds in batch.seeds
        ]

    def load_tensors(self, weights: Any) -> None:
        self.loads.append(dict(weights))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def stand_in(tiny_model_dir: Any) -> Iterator[tuple[str, StandInEngine, Path]]:
    """A rollout server over a stand-in engine, serving the tiny Qwen2-VL folder, on a free port."""
    folder = tiny_model_dir("qwen2_vl")
    engine = StandInEngine()
    state = RolloutServer(engine, model_id=str(folder), root=folder, max_model_len=512)  # type: ignore[arg-type]
    httpd = http_server(state, host="127.0.0.1", port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", engine, folder
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(url: str) -> GenerationSettings:
    return GenerationSettings(engine="vllm", vllm_server=url)


def test_unreachable_server_is_one_line(tiny_model_dir: Any) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VLLMError) as err:
        check_rollout_engine(_settings(url), ModelConfig(name_or_path=str(tiny_model_dir("qwen2_vl"))))
    message = str(err.value)
    assert "\n" not in message and f"rollout.vllm_server={url} is not reachable" in message


def test_server_of_another_model_is_one_line(stand_in: Any, tiny_model_dir: Any) -> None:
    url, _, folder = stand_in
    other = tiny_model_dir("llava")
    with pytest.raises(VLLMError) as err:
        check_rollout_engine(_settings(url), ModelConfig(name_or_path=str(other)))
    message = str(err.value)
    assert "\n" not in message and f"serves {folder}, not the policy {other}" in message
    check_rollout_engine(_settings(url), ModelConfig(name_or_path=str(folder)))  # its own model passes


def test_server_needs_the_vllm_engine() -> None:
    with pytest.raises(VLLMError, match="rollout.vllm_server is set but rollout.engine=hf"):
        check_rollout_engine(GenerationSettings(vllm_server="http://x:1"), ModelConfig())


def test_weight_parts_keep_layers_whole() -> None:
    """Parts hold whole groups and at most ``chunk_bytes`` unless one group is bigger: 4-byte floats,
    groups layers.0 (3 + 5 floats = 32 bytes), layers.1 (32 bytes), norm (2 floats = 8 bytes); with
    40 bytes a part, the parts are [layers.0], [layers.1, norm]."""
    names = [
        ("m.layers.0.q.weight", 3),
        ("m.layers.0.k.weight", 5),
        ("m.layers.1.q.weight", 3),
        ("m.layers.1.k.weight", 5),
        ("m.norm.weight", 1),
        ("m.norm.bias", 1),
    ]
    weights = [(n, torch.full((k,), float(i))) for i, (n, k) in enumerate(names)]
    parts = list(weight_parts(weights, chunk_bytes=40))
    assert [list(p) for p in parts] == [[n for n, _ in names[:2]], [n for n, _ in names[2:]]]
    assert [layer_of(n) for n, _ in names] == ["m.layers.0"] * 2 + ["m.layers.1"] * 2 + ["m.norm"] * 2
    assert [list(p) for p in weight_parts(weights, chunk_bytes=8)] == [
        [n for n, _ in names[i : i + 2]] for i in (0, 2, 4)
    ]


def test_client_pushes_every_weight_once_and_versions_it(stand_in: Any, tiny_model: Any) -> None:
    """Every weight of the policy reaches the engine once, equal, in parts of whole layers; the server
    then holds version 1, and a /generate expecting another version is refused with the server's
    message, naming the URL and the endpoint."""
    url, engine, folder = stand_in
    model, processor = tiny_model("qwen2_vl")
    client = ServerEngine(url, folder, processor, chunk_bytes=64 << 10)
    client.load_weights(model)
    sent = dict(merged_weights(model))
    got = [(n, t) for part in engine.loads for n, t in part.items()]
    assert sorted(n for n, _ in got) == sorted(sent)  # each once (safetensors sorts a part's names)
    assert all(torch.equal(t, sent[n]) for n, t in got)
    assert len(engine.loads) > 2
    groups = [{layer_of(n) for n in part} for part in engine.loads]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    with urllib.request.urlopen(f"{url}/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "weights_version": 1, "updating": False}
    client.sync(model)  # unchanged policy: nothing pushed
    assert client.version == 1
    client.version = 5
    batch = RequestBatch(["hi"], [[]], [[None]], 0.0, 1.0, 0, 3, [9], [4])
    with pytest.raises(VLLMError) as err:
        client.run_batch(batch)
    assert str(err.value) == (
        f"rollout.vllm_server={url}: POST /generate failed: the server holds weights version 1, the client expects 5"
    )


def test_generate_round_trip(stand_in: Any, shape_images: list) -> None:
    """A batch crosses the wire unchanged (images pixel for pixel) and the answers come back with texts."""
    url, engine, folder = stand_in
    batch = RequestBatch(["a", "b"], [[shape_images[0]], []], [[1, 2], [3, 4]], 0.7, 0.9, 5, 3, [9], [4, 5])
    body = json.dumps({"weights_version": 0, "batch": batch.to_json()}).encode()
    request = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        answer = json.loads(r.read())
    (seen,) = engine.batches
    assert seen.prompts == batch.prompts and seen.seeds == batch.seeds and seen.banned_ids == [4, 5]
    assert (seen.temperature, seen.top_p, seen.top_k, seen.max_new_tokens) == (0.7, 0.9, 5, 3)
    sent, got = shape_images[0], seen.images[0][0]
    assert (got.mode, got.size, got.tobytes()) == (sent.mode, sent.size, sent.tobytes())
    out = PromptOutput.from_json(answer["outputs"][1])
    assert out.token_ids == [[7, 8, 9]] * 2 and out.logps == [[-1.0, -2.0, -3.0]] * 2 and out.stopped == [True] * 2
    assert out.texts == ["t7 t8"] * 2  # the stop token (last) is not decoded


def test_unknown_endpoint_and_bad_update_answer_json(stand_in: Any) -> None:
    url, _, _ = stand_in
    for path, data in (("/nothing", None), ("/update_weights?part=0", b"")):
        request = urllib.request.Request(f"{url}{path}", data=data)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert "message" in json.loads(err.value.read())["error"]
