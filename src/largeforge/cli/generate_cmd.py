"""`largeforge generate` and `largeforge chat`: text from a model, streamed to stdout.

Only generated text goes to stdout (so it can be piped); loading messages and the chat prompt
go to stderr. Torch and transformers are imported inside the commands to keep `--help` fast.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from largeforge.inference.sampling import SamplingParams

ModelOpt = typer.Option(..., "--model", "-m", help="Model directory, run directory or hub id.")
MaxNewTokensOpt = typer.Option(128, "--max-new-tokens", help="Most tokens to generate.")
TemperatureOpt = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy.")
TopKOpt = typer.Option(0, "--top-k", help="Sample from the k most likely tokens only; 0 is off.")
TopPOpt = typer.Option(1.0, "--top-p", help="Nucleus sampling probability mass; 1.0 is off.")
RepetitionPenaltyOpt = typer.Option(
    1.0, "--repetition-penalty", help="> 1 discourages tokens already seen; 1.0 is off."
)
SeedOpt = typer.Option(None, "--seed", help="Random seed: the same seed gives the same text.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or mps (default: the best found).")


def _params(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
) -> SamplingParams:
    from largeforge.inference.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


def _load(model: str, device: str | None, err: Console) -> tuple[Any, Any]:
    from transformers.utils import logging as hf_logging

    from largeforge.inference.generate import load_for_inference
    from largeforge.runs import resolve_model_dir

    hf_logging.disable_progress_bar()  # our own one-line message says what is happening
    # Resolve first, so a bad reference is the only line printed.
    resolved = resolve_model_dir(model)
    start = time.perf_counter()
    err.print(f"loading {resolved} ...")
    loaded = load_for_inference(resolved, device, decode_layout=True)
    err.print(f"loaded in {time.perf_counter() - start:.1f} s")
    return loaded


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate_command(
    model: str = ModelOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue; - reads stdin."),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = RepetitionPenaltyOpt,
    seed: int | None = SeedOpt,
    device: str | None = DeviceOpt,
    no_stream: bool = typer.Option(
        False, "--no-stream", help="Print the text once it is complete, not as it comes."
    ),
) -> None:
    """Continue a prompt. Prints only the generated text (not the prompt) to stdout."""
    from largeforge.inference.generate import stream_text

    params = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    if prompt == "-":
        prompt = sys.stdin.read()
    err = Console(stderr=True, highlight=False)
    loaded_model, tokenizer = _load(model, device, err)
    pieces = stream_text(loaded_model, tokenizer, prompt, params)
    if no_stream:
        _write("".join(pieces))
    else:
        for piece in pieces:
            _write(piece)
    _write("\n")


def chat_command(
    model: str = ModelOpt,
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    chat_template: str | None = typer.Option(
        None,
        "--chat-template",
        help="A built-in template (chatml, llama-2, llama-3, alpaca, mistral, phi-3, zephyr) "
        "or a Jinja file; default: the tokenizer's own template.",
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens per reply."),
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    repetition_penalty: float = RepetitionPenaltyOpt,
    seed: int | None = SeedOpt,
    device: str | None = DeviceOpt,
) -> None:
    """Chat with a model, one line per message. /reset forgets the conversation; /exit or
    end of input (Ctrl-D) quits. Replies go to stdout, everything else to stderr."""
    from largeforge.errors import LargeForgeError
    from largeforge.inference.chat import ChatSession, resolve_chat_template

    params = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    # Check the template before the (slow) model load, so a typo fails at once.
    template = resolve_chat_template(chat_template) if chat_template else None
    err = Console(stderr=True, highlight=False)
    loaded_model, tokenizer = _load(model, device, err)
    session = ChatSession(
        loaded_model, tokenizer, system_prompt=system, params=params, chat_template=template
    )
    err.print("type a message; /reset clears the conversation, /exit quits")
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            sys.stderr.write("\n")
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            err.print("(conversation cleared)")
            continue
        try:
            for piece in session.send(text):
                _write(piece)
        except LargeForgeError as exc:
            # A full context ends this turn, not the session: the user can /reset.
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            continue
        _write("\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
    app.command("chat")(chat_command)
