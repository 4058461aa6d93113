"""A real `largeforge serve inference` subprocess on 127.0.0.1 for the serving tests, and the
tiny model directories they serve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

import tiny_models
from largeforge.inference import CHATML_TEMPLATE

TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "<|im_start|>user\nHello fox<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
]
LISTENING = re.compile(r"serving (\S+) on (http://(\S+):(\d+))/v1")


def save_tiny_model(path: Path, *, chat: bool, max_seq_len: int = 1024) -> Path:
    """A random 2-layer Llama and a byte-level BPE (with ChatML when `chat`), saved as an HF
    model directory. `<|im_end|>` is several tokens here, so chat replies stop at it as text."""
    tokenizer = tiny_models.make_tokenizer(TEXT)
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    model = tiny_models.make_model(len(tokenizer), max_seq_len)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class Server:
    proc: subprocess.Popen
    host: str
    port: int
    name: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(model_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> Server:
    """Start `largeforge serve inference --model DIR --port 0 ARGS` and wait until /health
    answers; the port is read from the line the server prints."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    with log.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "largeforge.cli.main", "serve", "inference", "--model",
             str(model_dir), "--port", "0", *args],
            env=full_env, stdout=subprocess.DEVNULL, stderr=err,
        )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        match = LISTENING.search(log.read_text(encoding="utf-8", errors="replace"))
        if match:
            server = Server(proc, match.group(3), int(match.group(4)), match.group(1), log)
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start in {timeout} s:\n{log.read_text()}")


def markov_model(tokenizer: Any, successor: dict[int, int], default: int,
                 strength: float = 0.25) -> torch.nn.Module:
    """A 1-layer Llama whose next token depends only on the current one: greedy decoding
    follows `successor` (every other token goes to `default`). Its layers add nothing (their
    output projections are zero) and the embeddings are one-hot, so the final hidden state of
    token t is a multiple of e_t and the head row of `successor[t]` alone sees it. Outputs are
    then known in advance, which the random models cannot give."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    dim = -(-vocab // 16) * 16
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for token in range(vocab):
            model.lm_head.weight[successor.get(token, default), token] = strength
    return model.eval()
