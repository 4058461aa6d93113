"""Writing an output whole or not at all, and a tokenizer beside a model: what exports and
imports share. No torch and no model code, so importing it costs nothing and pulls in nothing.

`staged_output` gives a writer a fresh staging directory beside the output and renames it into
place only when everything is written, so a failed or interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from largeforge.atomic_files import replace_path, temp_dir
from largeforge.errors import LargeForgeError


def check_output(output: Path, *, overwrite: bool, source: str | None = None) -> None:
    """Refuse an output that holds something (unless `overwrite`) or that is the model itself.

    Called before the (slow) model load, so a wrong output fails at once and writes nothing.
    """
    if source is not None and Path(source).exists():
        src = Path(source).resolve()
        out = output.resolve()
        if out == src or src.is_relative_to(out):
            raise LargeForgeError(
                f"output {output} would replace the model being exported ({source}); "
                "choose another output"
            )
    check_parents(output)
    if output.is_file() and not overwrite:
        raise LargeForgeError(
            f"output {output} is an existing file; choose another path or pass --overwrite"
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LargeForgeError(
            f"output {output} is not empty; choose another or pass --overwrite"
        )


def check_parents(output: Path) -> None:
    """Refuse an output below a file (which could never become its directory), before anything
    is read or written."""
    for parent in Path(output).parents:
        if parent.exists():
            if not parent.is_dir():
                raise LargeForgeError(
                    f"output {output}: {parent} is a file where a directory is expected; "
                    "choose another path"
                )
            return


@contextmanager
def staged_output(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside `output`; on success it replaces `output`
    (renames, so readers never see a half-written export); on any error it is removed, and
    the staging left by a killed earlier export of `output` is swept first
    (`largeforge.atomic_files`)."""
    check_output(output, overwrite=overwrite)
    with temp_dir(output) as staging:
        yield staging
        replace_path(staging, output)


def save_tokenizer(tokenizer: Any | None, directory: Path) -> list[str]:
    """Write the tokenizer (if any) into `directory`; returns the file names written.

    transformers 5 writes a chat template to chat_template.jinja; it is also put into
    tokenizer_config.json (its older home), which earlier transformers versions and converters
    such as llama.cpp's read.
    """
    if tokenizer is None:
        return []
    before = set(os.listdir(directory))
    tokenizer.save_pretrained(str(directory))
    template = getattr(tokenizer, "chat_template", None)
    config_file = directory / "tokenizer_config.json"
    if isinstance(template, str) and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["chat_template"] = template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    return sorted(set(os.listdir(directory)) - before)
