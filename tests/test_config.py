"""Recipes: layering, provenance, strategies and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from largeforge.config import load_recipe, recipe_differences
from largeforge.errors import LargeForgeError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_layers_resolve_in_order_and_remember_their_source(tmp_path):
    recipe_file = write(
        tmp_path / "r.yaml",
        "train:\n  lr: 0.01\n  batch_size: 4\n  max_steps: 50\ndata:\n  seq_len: 64\n",
    )
    resolved = load_recipe(
        recipe_file,
        environ={"LARGEFORGE_TRAIN__BATCH_SIZE": "6", "LARGEFORGE_TRAIN__MAX_STEPS": "70"},
        flags={"train.max_steps": 90},
        overrides=["train.max_steps=120", "data.train=[a.txt, b.txt]"],
    )
    r = resolved.recipe
    assert r.train.lr == 0.01  # file over default
    assert r.train.batch_size == 6  # env over file
    assert r.train.max_steps == 120  # --set over flag over env
    assert r.data.seq_len == 64
    assert r.data.train == ["a.txt", "b.txt"]
    assert r.train.warmup_steps == 100  # default
    sources = {key: src for key, _, src in resolved.rows()}
    assert sources["train.lr"] == str(recipe_file)
    assert sources["train.batch_size"] == "env LARGEFORGE_TRAIN__BATCH_SIZE"
    assert sources["train.max_steps"] == "--set train.max_steps=120"
    assert sources["train.warmup_steps"] == "default"
    assert r.output.name == "r"  # named after the file


def test_strategy_file_with_defaults(tmp_path):
    f = write(
        tmp_path / "s.yaml",
        "defaults:\n  train: {lr: 0.002}\nstrategies:\n"
        "  fast: {train: {max_steps: 10}}\n  slow: {train: {max_steps: 1000, lr: 0.0005}}\n",
    )
    fast = load_recipe(strategy="fast", strategy_file=f, environ={}).recipe
    slow = load_recipe(strategy="slow", strategy_file=f, environ={}).recipe
    assert (fast.train.max_steps, fast.train.lr, fast.output.name) == (10, 0.002, "fast")
    assert (slow.train.max_steps, slow.train.lr) == (1000, 0.0005)
    with pytest.raises(LargeForgeError, match="strategy 'medium' not found.*fast, slow"):
        load_recipe(strategy="medium", strategy_file=f, environ={})


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "train:\n  learning_rate: 0.1\n")
    with pytest.raises(LargeForgeError) as err:
        load_recipe(f, environ={})
    assert "train.learning_rate" in str(err.value) and str(f) in str(err.value)
    f2 = write(tmp_path / "bad2.yaml", "trainer:\n  lr: 0.1\n")
    with pytest.raises(LargeForgeError, match="'trainer' in .*bad2.yaml.*did you mean 'train'"):
        load_recipe(f2, environ={})
    with pytest.raises(LargeForgeError, match="env LARGEFORGE_TRAIN__LRR"):
        load_recipe(environ={"LARGEFORGE_TRAIN__LRR": "1"})


def test_wrong_type_names_key_source_and_value(tmp_path):
    f = write(tmp_path / "t.yaml", "train:\n  batch_size: lots\n")
    with pytest.raises(LargeForgeError) as err:
        load_recipe(f, environ={})
    text = str(err.value)
    assert "train.batch_size" in text and str(f) in text and "'lots'" in text


def test_invalid_yaml_reports_the_line(tmp_path):
    f = write(tmp_path / "y.yaml", "train:\n  lr: 0.1\n bad: [\n")
    with pytest.raises(LargeForgeError, match=r"y.yaml:\d+: invalid YAML"):
        load_recipe(f, environ={})


def test_recipe_differences_ignore_logging_only():
    a = load_recipe(overrides=["train.lr=0.1"], environ={}).recipe
    b = load_recipe(overrides=["train.lr=0.2", "train.log_every=1"], environ={}).recipe
    assert recipe_differences(a, b) == ["train.lr: 0.1 in the checkpoint, 0.2 now"]


def test_every_shipped_recipe_is_valid():
    strategies = REPO / "recipes" / "strategies.yaml"
    recipes = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p != strategies)
    assert recipes, "recipes/ ships example recipes"
    presets = {load_recipe(p, environ={}).recipe.model.preset for p in recipes}
    assert {"tiny", "small", "medium", "base"} <= presets
    for name in ("shakespeare-char", "stories-small"):
        load_recipe(strategy=name, strategy_file=strategies, environ={})


def test_no_shipped_recipe_points_outside_the_repository():
    """A user's clone has no ../shared: example data lives under data/, and the recipe says
    where to get it."""
    for path in (REPO / "recipes").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "../" not in text, path
        if '"data/' in text:
            assert "# Data:" in text, f"{path} does not say where its data comes from"


def test_quickstart_recipe_file_matches_the_command():
    from largeforge.quickstart import quickstart_recipe

    from_file = load_recipe(REPO / "recipes" / "quickstart.yaml", environ={}).recipe
    assert from_file == quickstart_recipe().recipe


def test_config_show_cli(tmp_path):
    f = write(tmp_path / "r.yaml", "train:\n  lr: 0.01\n")
    proc = run_cli(
        "config", "show", "--config", str(f), "--set", "train.max_steps=7", "--batch-size", "3",
        "--format", "json", env={"LARGEFORGE_DATA__SEQ_LEN": "32"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)}
    assert rows["train.lr"]["source"] == str(f)
    assert rows["train.max_steps"] == {
        "key": "train.max_steps", "value": 7, "source": "--set train.max_steps=7"
    }
    assert rows["train.batch_size"]["source"] == "flag --batch-size"
    assert rows["data.seq_len"]["value"] == 32
    table = run_cli("config", "show", "--config", str(f))
    assert table.returncode == 0 and "train.lr" in table.stdout


def test_config_show_unknown_key_exits_2_without_traceback(tmp_path):
    f = write(tmp_path / "r.yaml", "model:\n  layers: 3\n")
    proc = run_cli("config", "show", "--config", str(f))
    assert proc.returncode == 2
    assert "model.layers" in proc.stderr and str(f) in proc.stderr
    assert "Traceback" not in proc.stderr
