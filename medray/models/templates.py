"""Chat templates reproducing the seed systems' prompt formats, as HF Jinja templates.

Each template takes content-part messages (`{"type": "image"}`, `{"type": "text", ...}`)
and renders exactly the string the original code built, so a model fine-tuned by the
seed's scripts sees the same prompt here. `<image>` is emitted where LLaVA puts it: at the
start of the message that carries the image, followed by a newline (LLaVA moves it there
whatever the dataset says). BOS is written by the template, so tokenize the result with
add_special_tokens=False.

Formats (checked against the seeds' conversation.py):
- mistral_instruct (LLaVA-Med v1.5): ``[INST] <image>\\nQ [/INST] A </s>[INST] Q2 [/INST] A2 </s>``
- vicuna_v1 (LLaVA v1.5 on Llama): ``SYSTEM USER: <image>\\nQ ASSISTANT: A</s> USER: Q2 ASSISTANT: A2</s>``
- llava_med_v1 (LLaVA-Med v1, its ``simple`` conversation as model_vqa_med.py prompts it): the
  system text, an example exchange, then ``###Human: Q\\n<im_start><im_patch><im_end>###`` -
  the image after the question, each turn closed by ``###``, nothing added for the answer.
  ``llava_med_v1_patch`` is the same without ``<im_start>``/``<im_end>``
  (``mm_use_im_start_end: false``).
- llama_2 (BabyDoctor, LLaVA's llava_llama_2):
  ``[INST] <<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\n<image>\\nQ [/INST] A </s><s>[INST] Q2 [/INST] A2 </s>``
- alpaca (Med-Alpaca / Visual Med-Alpaca): the Stanford Alpaca instruction block
- mixtral_instruct (BiMediX): ``[INST] Q [/INST] A</s>[INST] Q2 [/INST] A2</s>``
- git_caption (GIT captioners): the prompt, if any, then the caption; the image goes in
  through pixel_values, not as a token.
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
LLAVA_MED_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# The example exchange LLaVA-Med v1's `simple` conversation opens with (two spaces are its own).
LLAVA_MED_V1_EXAMPLE = "Human: Hi!###Assistant: Hi there!  How can I help you today?\n###"
ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)

# Shared Jinja prelude: split off an optional system message and render a message's
# content parts, moving an image to the front as LLaVA does.
_PRELUDE = r"""
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content | trim }}
{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro has_image(content) -%}
{%- if content is not string -%}{%- for part in content if part['type'] == 'image' -%}1{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- macro user_text(content) -%}
{%- if has_image(content) -%}{%- if IMAGES_ALLOWED -%}{{ '<image>\n' }}{%- else -%}
{{ raise_exception('this model takes text only; remove the image part') }}{%- endif -%}{%- endif -%}
{{ text_of(content) }}
{%- endmacro -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system = text_of(messages[0]['content']) -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- set turns = messages -%}{%- endif -%}
"""


def _template(body: str, *, default_system: str = "", images: bool = True) -> str:
    head = (
        "{%- set DEFAULT_SYSTEM = " + repr(default_system) + " -%}"
        + "{%- set IMAGES_ALLOWED = " + ("true" if images else "false") + " -%}"
    )
    return head + _PRELUDE + body.strip()


# LLaVA's SeparatorStyle.LLAMA_2: the system block wraps the first user message; each
# answer is " A " + "</s>", and every later user turn is preceded by `sep`.
def _llama2_style(sep: str) -> str:
    return r"""
{{- bos_token -}}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}
{%- set t = user_text(m['content']) -%}
{%- if loop.first and system -%}{%- set t = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + t -%}{%- endif -%}
{%- if not loop.first -%}{{ SEP }}{%- endif -%}{{ '[INST] ' + t + ' [/INST]' }}
{%- elif m['role'] == 'assistant' -%}{{ ' ' + text_of(m['content']) + ' ' + eos_token }}
{%- endif -%}
{%- endfor -%}
""".replace("SEP", sep)


# LLaVA-Med v1's SeparatorStyle.SINGLE as model_vqa_med.py uses it: the image goes after the
# question, and the prompt ends with the human turn's "###" (the model writes the rest).
def _llava_med_v1(image: str) -> str:
    return r"""
{{- bos_token + system + '###' + EXAMPLE -}}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}
{{ 'Human: ' + text_of(m['content']) }}{%- if has_image(m['content']) -%}{{ IMAGE }}{%- endif -%}{{ '###' }}
{%- elif m['role'] == 'assistant' -%}{{ 'Assistant: ' + text_of(m['content']) + '###' }}
{%- endif -%}
{%- endfor -%}
""".replace("EXAMPLE", repr(LLAVA_MED_V1_EXAMPLE)).replace("IMAGE", repr(image))


TEMPLATES: dict[str, str] = {
    "mistral_instruct": _template(_llama2_style("''")),
    "llama_2": _template(_llama2_style("bos_token"), default_system=LLAVA_LLAMA2_SYSTEM),
    # LLaVA's SeparatorStyle.TWO: messages are stripped, answers end in "</s> " and the
    # whole prompt is stripped, so the final answer ends in "</s>".
    "vicuna_v1": _template(r"""
{%- set ns = namespace(out=bos_token + system) -%}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}{%- set ns.out = ns.out + ' USER: ' + user_text(m['content']) -%}
{%- elif m['role'] == 'assistant' -%}{%- set ns.out = ns.out + ' ASSISTANT: ' + text_of(m['content']) + eos_token -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{%- set ns.out = ns.out + ' ASSISTANT:' -%}{%- endif -%}
{{- ns.out -}}
""", default_system=VICUNA_SYSTEM),
    "llava_med_v1": _template(_llava_med_v1("\n<im_start><im_patch><im_end>"), default_system=LLAVA_MED_V1_SYSTEM),
    "llava_med_v1_patch": _template(_llava_med_v1("\n<im_patch>"), default_system=LLAVA_MED_V1_SYSTEM),
    "alpaca": _template(r"""
{{- bos_token + system -}}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}{{ '\n\n### Instruction:\n' + user_text(m['content']) + '\n\n### Response:\n' }}
{%- elif m['role'] == 'assistant' -%}{{ text_of(m['content']) + eos_token }}
{%- endif -%}
{%- endfor -%}
""", default_system=ALPACA_HEADER, images=False),
    # Mixtral has no system role: a system message is prepended to the first user turn.
    "mixtral_instruct": _template(r"""
{{- bos_token -}}
{%- for m in turns -%}
{%- if m['role'] == 'user' -%}
{%- set t = user_text(m['content']) -%}
{%- if loop.first and system -%}{%- set t = system + '\n\n' + t -%}{%- endif -%}
{{ '[INST] ' + t + ' [/INST]' }}
{%- elif m['role'] == 'assistant' -%}{{ ' ' + text_of(m['content']) + eos_token }}
{%- endif -%}
{%- endfor -%}
""", images=False),
    "git_caption": r"""
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content | trim }}
{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{ text_of(m['content']) }}
{%- elif m['role'] == 'assistant' -%}{%- if loop.index0 > 0 and text_of(messages[loop.index0 - 1]['content']) -%}{{ ' ' }}{%- endif -%}{{ text_of(m['content']) + eos_token }}
{%- endif -%}
{%- endfor -%}
""".strip(),
}


def get_template(name: str) -> str:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None
