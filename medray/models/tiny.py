"""Tiny random-init models for every family, built offline from the real config classes.

They are ordinary HF directories (config, safetensors, tokenizer, processor with chat
template), so tests, the demo and CI exercise exactly the loading path a 7B model takes.
Widths that bitsandbytes may quantize are multiples of 64: its 4-bit kernels fail on
narrower layers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .families import get_family
from .saving import save_model
from .templates import get_template

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TINY_VERSION = 2  # bump when the recipe below changes, so cached tiny:// builds refresh

# A small medical vocabulary for the tokenizer. It holds the answer words whole so the
# BPE learns them as few tokens: a tokenizer that never saw "yes" spells it in 4 pieces.
CORPUS = """
yes no left right none normal abnormal both bilateral unilateral
The answer is yes. The answer is no. It is on the left. It is on the right. There is none.
Is there an opacity? Where is the opacity? Is this image normal? What modality is this?
What organ is shown? Is there a fracture? Is there a mass? Is the heart enlarged?
Describe the image. Describe the findings. What abnormality is seen? Which side?
chest x-ray radiograph CT scan MRI ultrasound pathology histology slide microscopy
lung lungs heart liver kidney brain bone spine abdomen pelvis breast thyroid
opacity consolidation effusion pneumothorax nodule mass lesion edema fracture
cardiomegaly atelectasis infiltrate pneumonia tumor carcinoma metastasis cyst
the a an of in on with without and or is are there this that shows shown seen
left lung right lung upper lower lobe middle hilum mediastinum diaphragm
A chest x-ray showing an opacity in the left lung. A chest x-ray showing an opacity in the right lung.
A normal chest x-ray with clear lungs. An axial CT of the abdomen. A brain MRI.
Figure 1 shows a histology slide with tumor cells. The patient presented with cough and fever.
Question: Answer: Context: Options: A B C D E The answer is
[INST] [/INST] <<SYS>> <</SYS>> USER: ASSISTANT: ### Instruction: ### Response:
Below is an instruction that describes a task. Write a response that appropriately completes the request.
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
You are a helpful language and vision assistant.
0 1 2 3 4 5 6 7 8 9 10 mm cm
"""


def build_tokenizer(*, chat_template: str):
    """A byte-level BPE trained on CORPUS, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    # padding_side must be given here: set afterwards it is lost on save/reload.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", chat_template=chat_template,
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
    )


def _vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64  # round up: keeps lm_head rows a multiple of 64


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)


def _image_processor():
    from .processing import image_processor_class

    return image_processor_class("CLIPImageProcessor")(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})


def _text_kwargs(tokenizer) -> dict:
    # 2 heads of 32: vLLM's CPU attention takes head sizes from 32 up (16 fails), and the
    # k/v projections stay 64 wide, which bitsandbytes needs.
    return dict(vocab_size=_vocab_size(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False)


def _build(family: str, chat_template: str):
    """(model, processor-or-tokenizer) for a family, random init under the current seed."""
    import transformers as tf

    tokenizer = build_tokenizer(chat_template=chat_template)
    if family in ("llava-llama", "llava-mistral"):
        text_cls = tf.MistralConfig if family == "llava-mistral" else tf.LlamaConfig
        text_kwargs = _text_kwargs(tokenizer)
        if family == "llava-mistral":
            text_kwargs["sliding_window"] = None
        config = tf.LlavaConfig(
            vision_config=_clip_vision_config(), text_config=text_cls(**text_kwargs),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        model = tf.LlavaForConditionalGeneration(config)
        processor = tf.LlavaProcessor(
            image_processor=_image_processor(), tokenizer=tokenizer, chat_template=chat_template,
            patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, image_token="<image>",
        )
        return model, processor
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_text_kwargs(tokenizer))), tokenizer
    if family == "mixtral":
        config = tf.MixtralConfig(**_text_kwargs(tokenizer), num_local_experts=4,
                                  num_experts_per_tok=2, sliding_window=None)
        return tf.MixtralForCausalLM(config), tokenizer
    if family == "git":
        config = tf.GitConfig(
            vision_config=_clip_vision_config().to_dict(), vocab_size=_vocab_size(tokenizer),
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        # GitProcessor takes no chat template; the tokenizer carries it (see render_chat).
        processor = tf.GitProcessor(image_processor=_image_processor(), tokenizer=tokenizer)
        return tf.GitForCausalLM(config), processor
    raise ValueError(f"no tiny recipe for family {family!r}")


def write_tiny_model(family: str, out: str | os.PathLike, *, seed: int = 0,
                     chat_template: str | None = None) -> Path:
    """Write a tiny random-init HF model directory for `family`; deterministic in `seed`."""
    fam = get_family(family)
    template = get_template(chat_template or fam.chat_template)
    out = Path(out)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model, processor = _build(family, template)
    model.generation_config.max_new_tokens = 16
    model.generation_config.pad_token_id = processor.pad_token_id if hasattr(processor, "pad_token_id") \
        else processor.tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    processor.save_pretrained(out)
    log.info("wrote tiny %s (seed %d) to %s", family, seed, out)
    return out


def tiny_model_dir(family: str, seed: int = 0, *, cache: Path) -> Path:
    """The cached directory for tiny://family?seed=N, built once per (family, seed, recipe)."""
    get_family(family)
    dest = cache / "tiny" / f"{family}-seed{seed}-v{TINY_VERSION}"
    if (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One builder per node at a time (Ray workers on one node share the cache).
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "model.safetensors").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # transformers' save_pretrained writes nothing on ranks other than 0 of an
                # initialised process group, so a Train worker builds in a clean process.
                subprocess.run([sys.executable, "-m", "medray.cli", "tiny-model", "--family", family,
                                "--out", str(tmp), "--seed", str(seed)], check=True,
                               stdout=subprocess.DEVNULL)
            else:
                write_tiny_model(family, tmp, seed=seed)
            if not (tmp / "model.safetensors").exists():
                raise RuntimeError(f"building tiny://{family} wrote no weights")
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
