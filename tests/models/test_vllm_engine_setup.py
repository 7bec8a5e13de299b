"""What the vLLM rollout engine decides without vLLM: start-up errors, weight names, merged LoRA weights.

(The engine itself is tested in tests/vllm, in the environment ``make test-vllm`` creates.)
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from vlalign.errors import UserError
from vlalign.models.generate import GenerationSettings
from vlalign.models.load import LoraSpec
from vlalign.models.vllm_engine import (
    VLLMError,
    check_server,
    check_vllm,
    merged_weights,
    unsupported_reason,
    vllm_weight_name,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_fails_in_one_line(tiny_model_dir) -> None:
    with pytest.raises(VLLMError) as info:
        check_vllm(tiny_model_dir("qwen2_vl"))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "rollout.engine=hf" in message and "make test-vllm" in message


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("command", ["eval", "pairs"])
def test_commands_with_vllm_engine_fail_at_start_up_without_it(command, tiny_model_dir, tmp_path, capsys) -> None:
    """``vlalign eval --engine=vllm`` and ``vlalign pairs --method=rank --rank.engine=vllm`` stop with
    the one-line error (exit 2) before anything is loaded or written; hf would have run."""
    from vlalign.cli import main

    model = tiny_model_dir("qwen2_vl")
    out = tmp_path / "out"
    args = {
        "eval": ["eval", f"--model={model}", "--engine=vllm", f"--output_dir={out}", "--trackers=[]"],
        "pairs": ["pairs", "--method=rank", f"--rank.model={model}", "--rank.engine=vllm", f"--out={out}/p.jsonl"],
    }[command]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    option = {"eval": "engine", "pairs": "rank.engine"}[command]
    assert len(lines) == 1 and f" {option}=vllm needs vLLM" in lines[0] and f"set {option}=hf" in lines[0], lines
    assert not (out / "eval.json").exists() and not (out / "p.jsonl").exists()


def test_architectures_vllm_cannot_load_are_named(tiny_model_dir, tmp_path: Path) -> None:
    """Gemma3's tiny tokenizer lacks the newline tokens vLLM looks up; Qwen2-VL at merge 1 (small) is
    ignored by vLLM; a model_type outside the tested set is refused; the tested ones pass."""
    assert "single tokens" in unsupported_reason(tiny_model_dir("gemma3"))
    assert "spatial_merge_size 1" in unsupported_reason(tiny_model_dir("qwen2_vl", "small"))
    for arch in ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3"):
        assert unsupported_reason(tiny_model_dir(arch)) is None, arch
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    assert "not one vlalign runs in vLLM" in unsupported_reason(tmp_path)


def test_llava_vision_tower_names_gain_vision_model() -> None:
    assert vllm_weight_name("llava", "model.vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert vllm_weight_name("llava", "vision_tower.vision_model.x") == "vision_tower.vision_model.x"
    assert vllm_weight_name("llava", "model.language_model.layers.0.x") == "model.language_model.layers.0.x"
    assert vllm_weight_name("qwen2_vl", "model.visual.x") == "model.visual.x"


def test_merged_lora_weights_equal_peft_merge(tiny_model) -> None:
    """With non-zero B, the merged weights equal PEFT's own merge_and_unload of a copy (names and
    values), and the policy keeps its adapter."""
    model, _ = tiny_model("qwen2_vl", lora=LoraSpec(r=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    ours = dict(merged_weights(model))
    reference, _ = tiny_model("qwen2_vl", lora=LoraSpec(r=4, alpha=8))
    reference.load_state_dict(model.state_dict())
    merged = dict(reference.merge_and_unload().named_parameters())
    assert set(ours) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(ours[name], value.detach(), rtol=0, atol=1e-6, msg=name)
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_hf_stays_the_default_engine() -> None:
    assert GenerationSettings().engine == "hf"


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_fails_in_one_line_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(VLLMError) as info:
        check_server(url, tmp_path, timeout=2.0)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert f"rollout.vllm_server={url} is not reachable" in message and "api_server" in message


@pytest.fixture
def fake_server() -> Iterator[Callable[[object], str]]:
    """``fake_server(body)``: the URL of a local HTTP server answering ``GET /v1/models`` with ``body``
    (JSON), as vLLM's OpenAI-compatible server does; 404 elsewhere."""
    servers: list[http.server.HTTPServer] = []

    def start(body: object) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the library's name)
                found = self.path == "/v1/models"
                data = json.dumps(body).encode() if found else b"{}"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_server_must_serve_the_policy(fake_server, tmp_path: Path) -> None:
    """A served model matches by ``root`` (vLLM: the --model folder) or ``id``, also the folder's
    vLLM-ready copy (``vllm-export``, LLaVA); another model is a one-line error naming both."""
    policy, other = tmp_path / "policy", tmp_path / "other"
    policy.mkdir()
    other.mkdir()
    check_server(fake_server({"object": "list", "data": [{"id": "m", "root": str(policy)}]}) + "/v1", policy)
    check_server(fake_server({"data": [{"id": str(policy / "vllm-export")}]}), policy)
    url = fake_server({"object": "list", "data": [{"id": "m", "root": str(other)}]})
    with pytest.raises(VLLMError) as info:
        check_server(url, policy)
    message = str(info.value)
    assert "\n" not in message and f"rollout.vllm_server={url} serves {other}, not the policy {policy}" in message
    with pytest.raises(VLLMError, match="did not answer as a vLLM server"):
        check_server(fake_server({"models": []}), policy)
