"""Prompt formats match the seeds' strings, and labels cover exactly the assistant turns."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from medray.data import IGNORE_INDEX, ChatCollator, Example, SampleTooLongError
from medray.models import load_processor, family_of, render_chat
from medray.models.loading import read_config

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_L2 = ("You are a helpful language and vision assistant. You are able to understand the visual "
            "content that the user provides, and assist the user with a variety of tasks using natural language.")
ALPACA = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.")


def conversation(with_image: bool) -> list[dict]:
    first = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": "What is shown?"}]
    return [
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "A chest x-ray"}]},
        {"role": "user", "content": [{"type": "text", "text": "Is there an opacity?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]


# family -> (the whole conversation as the seed's code renders it, the assistant segments
# that must carry labels, the generation prompt after the first user turn)
EXPECTED = {
    "llava-mistral": (
        "<s>[INST] <image>\nWhat is shown? [/INST] A chest x-ray </s>[INST] Is there an opacity? [/INST] yes </s>",
        [" A chest x-ray </s>", " yes </s>"],
        "<s>[INST] <image>\nWhat is shown? [/INST]",
    ),
    "llava-llama": (
        f"<s>{VICUNA} USER: <image>\nWhat is shown? ASSISTANT: A chest x-ray</s> USER: Is there an opacity? "
        "ASSISTANT: yes</s>",
        [" A chest x-ray</s>", " yes</s>"],
        f"<s>{VICUNA} USER: <image>\nWhat is shown? ASSISTANT:",
    ),
    "llama": (
        f"<s>{ALPACA}\n\n### Instruction:\nWhat is shown?\n\n### Response:\nA chest x-ray</s>"
        "\n\n### Instruction:\nIs there an opacity?\n\n### Response:\nyes</s>",
        ["A chest x-ray</s>", "yes</s>"],
        f"<s>{ALPACA}\n\n### Instruction:\nWhat is shown?\n\n### Response:\n",
    ),
    "mixtral": (
        "<s>[INST] What is shown? [/INST] A chest x-ray</s>[INST] Is there an opacity? [/INST] yes</s>",
        [" A chest x-ray</s>", " yes</s>"],
        "<s>[INST] What is shown? [/INST]",
    ),
    "git": (
        "<s>What is shown? A chest x-ray</s>Is there an opacity? yes</s>",
        [" A chest x-ray</s>", " yes</s>"],
        "<s>What is shown?",
    ),
}


def _processor(tiny_dirs, family):
    path = tiny_dirs[family]
    return load_processor(path, family_of(read_config(path)))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_template_renders_the_seed_format(tiny_dirs, family):
    proc = _processor(tiny_dirs, family)
    with_image = family.startswith("llava")
    full, _, gen_prompt = EXPECTED[family]
    msgs = conversation(with_image)
    assert render_chat(proc, msgs, add_generation_prompt=False) == full
    assert render_chat(proc, msgs[:1], add_generation_prompt=True) == gen_prompt


def test_llama2_template_for_babydoctor(tmp_path):
    from medray.models import write_tiny_model

    d = write_tiny_model("llava-llama", tmp_path / "bd", chat_template="llama_2")
    proc = load_processor(d, family_of(read_config(d)))
    assert render_chat(proc, conversation(True), add_generation_prompt=False) == (
        f"<s>[INST] <<SYS>>\n{LLAVA_L2}\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A chest x-ray </s>"
        "<s>[INST] Is there an opacity? [/INST] yes </s>")
    system = [{"role": "system", "content": "Be brief."}] + conversation(False)[:1]
    assert render_chat(proc, system, add_generation_prompt=True) == \
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is shown? [/INST]"


def test_text_only_template_refuses_images(tiny_dirs):
    proc = _processor(tiny_dirs, "mixtral")
    with pytest.raises(Exception, match="text only"):
        render_chat(proc, conversation(True), add_generation_prompt=False)


def _expected_labels(tokenizer, text: str, segments: list[str], image_id: int | None, n_image: int):
    """Labels derived from the literal expected string, independently of the collator."""
    spans, pos = [], 0
    for seg in segments:
        start = text.index(seg, pos)
        spans.append((start, start + len(seg)))
        pos = start + len(seg)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [], []
    for tok, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"]):
        reps = n_image if tok == image_id else 1
        ids += [tok] * reps
        labels += [tok if any(a <= s < b for a, b in spans) and tok != image_id else IGNORE_INDEX] * reps
    return ids, labels


@pytest.mark.parametrize("family", list(EXPECTED))
def test_labels_cover_exactly_the_assistant_turns(tiny_dirs, family):
    proc = _processor(tiny_dirs, family)
    tok = getattr(proc, "tokenizer", proc)
    vision = family in ("llava-mistral", "llava-llama", "git")
    msgs = conversation(family.startswith("llava")) if family != "git" else conversation(False)
    images = [Image.new("RGB", (48, 40), (30, 60, 90))] if vision else []
    batch = ChatCollator(proc, max_length=1024)([Example(msgs, images, "ex")])

    full, segments, _ = EXPECTED[family]
    image_id = tok.convert_tokens_to_ids("<image>") if family.startswith("llava") else None
    n_image = 16  # (32 px / 8 px patches)^2, CLS dropped by the "default" strategy
    ids, labels = _expected_labels(tok, full, segments, image_id, n_image)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels  # token by token
    got = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(got) == "".join(segments)
    if image_id is not None:
        assert ids.count(image_id) == n_image
        assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image_id)
    if vision:
        assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_padding_and_mixed_batches(tiny_dirs):
    proc = _processor(tiny_dirs, "llava-mistral")
    collate = ChatCollator(proc, max_length=1024)
    img = Image.new("RGB", (32, 32))
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "no"}]
    batch = collate([Example(conversation(True), [img], "a"), Example(short, [], "b")])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    n_b = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, n_b:] == IGNORE_INDEX).all()  # padding never trains
    assert (batch["input_ids"][1, n_b:] == proc.tokenizer.pad_token_id).all()


def test_truncation_never_cuts_image_tokens(tiny_dirs):
    proc = _processor(tiny_dirs, "llava-mistral")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    img = Image.new("RGB", (32, 32))
    ex = Example(conversation(True), [img], "long-one")
    full = ChatCollator(proc, max_length=1024)([ex])["input_ids"][0].tolist()
    last_image = max(i for i, t in enumerate(full) if t == image_id)

    with pytest.raises(SampleTooLongError, match="long-one"):
        ChatCollator(proc, max_length=last_image)([ex])  # would cut the image block
    cut = ChatCollator(proc, max_length=last_image + 3)([ex])
    ids = cut["input_ids"][0].tolist()
    assert len(ids) == last_image + 3
    assert ids.count(image_id) == 16 and ids == full[: last_image + 3]


def test_collated_batch_trains_the_model(tiny_dirs):
    """The labels are usable: a few steps on one batch drive its loss down."""
    from medray.models import load_model

    lm = load_model(str(tiny_dirs["llava-mistral"]))
    lm.model.train()
    batch = ChatCollator(lm.processor)([Example(conversation(True), [Image.new("RGB", (32, 32))])])
    opt = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = lm.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
