"""Chat messages -> one prompt string, with the model's own chat template.

The template is the Jinja source HuggingFace tokenizers ship: `chat_template` in
tokenizer_config.json, or a `chat_template.jinja` file beside it (what transformers 5 writes,
and what `recursa models fetch smollm2-135m` leaves). It is rendered in Jinja's immutable
sandbox with the variables such templates expect (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `strftime_now`). A model directory without a template
falls back to ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, the format of SmolLM2 and
most small instruct models); `ChatTemplate.fallback` says when that happened.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from recursa.errors import RecursaError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _raise(message: str):
    raise jinja2.TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None, fallback: bool = False):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise RecursaError(f"the chat template does not parse: {e}") from None
        self.bos_token, self.eos_token, self.fallback = bos_token or "", eos_token or "", fallback

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "ChatTemplate":
        """The template of a model directory (tokenizer_config.json or chat_template.jinja), else ChatML."""
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):   # named templates: [{"name": "default", "template": ...}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source and (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text()
        tokens = [t.get("content") if isinstance(t, dict) else t for t in (config.get("bos_token"), config.get("eos_token"))]
        return cls(source or CHATML, *tokens, fallback=not source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages: [{"role", "content"}] -> prompt text; a template that rejects them is a RecursaError."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise RecursaError(f"the chat template rejected the messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise RecursaError(f"the chat template cannot render these messages: {e}") from None
