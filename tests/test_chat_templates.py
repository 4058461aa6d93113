"""Built-in chat templates, loss masks, BOS/EOS handling and saving the template with a model."""

from __future__ import annotations

from itertools import pairwise

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from largeforge.chat_templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    assistant_spans,
    get_template,
    render,
    render_batch_for_training,
    render_for_training,
    save_chat_template,
    tokenizer_adds_bos,
)
from largeforge.errors import LargeForgeError
from largeforge.inference import CHATML_TEMPLATE
from largeforge.inference.chat import resolve_chat_template

CONVERSATION = [
    {"role": "system", "content": "You are a terse fox."},
    {"role": "user", "content": "Where do you live?"},
    {"role": "assistant", "content": "In the forest."},
    {"role": "user", "content": "What do you eat?"},
    {"role": "assistant", "content": "Berries and mice."},
]
N_USER, N_ASSISTANT = 2, 2

# Per family: BOS, EOS, other special tokens, and how many BOS / EOS a rendered conversation
# holds (BOS per user turn for Llama 2, EOS per turn where the family ends every turn with it).
FAMILIES = {
    "chatml": ("<s>", "<|im_end|>", ["<|im_start|>"], 1, len(CONVERSATION)),
    "llama-2": ("<s>", "</s>", [], N_USER, N_ASSISTANT),
    "llama-3": (
        "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
        1, len(CONVERSATION),
    ),
    "alpaca": ("<s>", "</s>", [], 1, N_ASSISTANT),
    "mistral": ("<s>", "</s>", [], 1, N_ASSISTANT),
    "phi-3": (
        "<s>", "<|end|>", ["<|system|>", "<|user|>", "<|assistant|>"], 1, len(CONVERSATION),
    ),
    "zephyr": ("<s>", "</s>", [], 1, len(CONVERSATION)),
}

TEXTS = [m["content"] for m in CONVERSATION] + [
    "Below is an instruction that describes a task. ### Instruction: ### Response: [INST]",
]


def family_tokenizer(name: str, adds_bos: bool) -> PreTrainedTokenizerFast:
    """A small byte-level BPE whose BOS/EOS are the family's special tokens; with `adds_bos`
    it prepends BOS when encoding with special tokens, as Llama tokenizers do."""
    bos, eos, extra, _, _ = FAMILIES[name]
    specials = list(dict.fromkeys(["<pad>", "<unk>", bos, eos, *extra]))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(TEXTS * 5, trainer)
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, core.token_to_id(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def tokenizers() -> dict[tuple[str, bool], PreTrainedTokenizerFast]:
    return {(n, a): family_tokenizer(n, a) for n in FAMILIES for a in (True, False)}


def test_builtin_names_cover_the_families() -> None:
    assert set(FAMILIES) <= set(BUILTIN_TEMPLATES)
    for name in BUILTIN_TEMPLATES:
        assert get_template(name) == BUILTIN_TEMPLATES[name]
        assert resolve_chat_template(name) == BUILTIN_TEMPLATES[name]
    assert get_template("Llama3") == BUILTIN_TEMPLATES["llama-3"]
    assert get_template("PHI_3") == BUILTIN_TEMPLATES["phi-3"]
    assert CHATML_TEMPLATE == BUILTIN_TEMPLATES["chatml"]


def test_get_template_file_tokenizer_and_unknown(tmp_path, tokenizers) -> None:
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert get_template(file) == "{{ messages[0]['content'] }}"
    tok = tokenizers["zephyr", False]
    with pytest.raises(LargeForgeError, match="no chat template"):
        get_template(None, tok)
    tok.chat_template = "{{ 'own' }}"
    try:
        assert get_template(None, tok) == "{{ 'own' }}"
    finally:
        tok.chat_template = None
    with pytest.raises(LargeForgeError, match="unknown chat template.*chatml.*llama-3.*zephyr"):
        get_template("vicuna")
    (tmp_path / "empty.jinja").write_text(" ", encoding="utf-8")
    with pytest.raises(LargeForgeError, match="empty"):
        get_template(tmp_path / "empty.jinja")


@pytest.mark.parametrize("adds_bos", [True, False], ids=["tokenizer-adds-bos", "no-bos"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_bos_and_eos_are_never_duplicated(name, adds_bos, tokenizers) -> None:
    tok = tokenizers[name, adds_bos]
    assert tokenizer_adds_bos(tok) is adds_bos
    template = get_template(name)
    text = render(tok, CONVERSATION, template)
    ids, labels = render_for_training(tok, CONVERSATION, template)
    assert len(ids) == len(labels)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    _, _, _, n_bos, n_eos = FAMILIES[name]
    template_writes_bos = text.startswith(tok.bos_token)
    if adds_bos or template_writes_bos:
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == n_bos
    else:  # ChatML with a tokenizer that does not want BOS: none
        assert bos not in ids
    assert ids.count(eos) == n_eos
    assert ids[-1] != ids[-2] or ids[-1] not in (bos, eos)
    for a, b in pairwise(ids):
        assert not (a == b and a in (bos, eos)), "a doubled special token"
    # Nothing but the optional BOS is added to what the template wrote.
    start = 1 if adds_bos and not template_writes_bos else 0
    assert tok.decode(ids[start:]) == text
    assert ids[start:] == tok(text, add_special_tokens=False)["input_ids"]


class SlowTokenizer:
    """A tokenizer without offsets (is_fast False), delegating everything else."""

    is_fast = False

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __call__(self, text: str, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._inner(text, **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tokenizers_without_offsets_give_the_same_masks(name, tokenizers) -> None:
    tok = tokenizers[name, True]
    template = get_template(name)
    fast = render_for_training(tok, CONVERSATION, template)
    assert render_for_training(SlowTokenizer(tok), CONVERSATION, template) == fast


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_cover_assistant_turns_only(name, tokenizers) -> None:
    tok = tokenizers[name, True]
    template = get_template(name)
    ids, labels = render_for_training(tok, CONVERSATION, template)
    text, spans = assistant_spans(tok, CONVERSATION, template)
    assert len(spans) == N_ASSISTANT
    targets = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == targets
    assert tok.decode(targets) == "".join(text[s:e] for s, e in spans)
    target_text = tok.decode(targets)
    for message in CONVERSATION:
        inside = message["content"] in target_text
        assert inside == (message["role"] == "assistant"), message
    # Each turn's end marker (EOS or the family's end-of-turn token) is a target.
    end_marker = FAMILIES[name][1]
    assert target_text.count(end_marker) == N_ASSISTANT
    # The prompt before the first reply is tokenized as at inference, where it ends at the cue.
    prompt = render(tok, CONVERSATION[:2], template, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if ids[0] == tok.bos_token_id and not prompt.startswith(tok.bos_token):
        prompt_ids = [tok.bos_token_id, *prompt_ids]
    first_target = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert ids[:first_target] == prompt_ids


@pytest.mark.parametrize("name", list(FAMILIES))
def test_batched_rendering_equals_one_at_a_time(name, tokenizers) -> None:
    tok = tokenizers[name, True]
    template = get_template(name)
    conversations = [CONVERSATION, CONVERSATION[:2], CONVERSATION[:4]]
    batched = render_batch_for_training(tok, conversations, template, max_length=40)
    single = [render_for_training(tok, c, template, max_length=40) for c in conversations]
    assert batched == single
    assert render_batch_for_training(SlowTokenizer(tok), conversations, template) == [
        render_for_training(tok, c, template) for c in conversations]


def test_train_on_prompt_and_max_length(tokenizers) -> None:
    tok = tokenizers["llama-3", True]
    template = get_template("llama-3")
    ids, labels = render_for_training(tok, CONVERSATION, template, train_on_prompt=True)
    assert labels == ids
    short_ids, short_labels = render_for_training(tok, CONVERSATION, template, max_length=10)
    full_ids, full_labels = render_for_training(tok, CONVERSATION, template)
    assert short_ids == full_ids[:10] and short_labels == full_labels[:10]


def test_template_that_rejects_a_conversation(tokenizers) -> None:
    tok = tokenizers["llama-2", False]
    bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]
    with pytest.raises(LargeForgeError, match="chat template failed"):
        render_for_training(tok, bad, get_template("llama-2"))
    with pytest.raises(LargeForgeError, match="starts with an assistant turn"):
        render_for_training(tok, CONVERSATION[2:], get_template("llama-2"))


@pytest.mark.parametrize("name", ["llama-3", "mistral", "chatml"])
def test_saved_template_is_the_one_transformers_uses(name, tmp_path, tokenizers) -> None:
    tok = tokenizers[name, True]
    template = get_template(name)
    save_chat_template(tok, template, tmp_path / "model")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    assert loaded.chat_template == template
    expected = render(tok, CONVERSATION[:2], template, add_generation_prompt=True)
    got = loaded.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert got == expected
    assert render_for_training(loaded, CONVERSATION, template) == render_for_training(
        tok, CONVERSATION, template
    )
