"""Chat templates: the model directory's own (tokenizer_config.json or chat_template.jinja), ChatML
when it has none, and a template that rejects the messages is a user error (400), not a crash."""
import json

import pytest

pytest.importorskip("jinja2")
from recursa.errors import RecursaError  # noqa: E402
from recursa.serve.chat import ChatTemplate  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]


def test_fallback_is_chatml(tmp_path):
    t = ChatTemplate.from_dir(tmp_path)
    assert t.fallback
    assert t.render(MESSAGES) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(MESSAGES, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_tokenizer_config_template_with_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}",
        "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    t = ChatTemplate.from_dir(tmp_path)
    assert not t.fallback and t.render(MESSAGES) == "<s>user: hi</s>"


def test_rejections_are_recursa_errors(tmp_path):
    t = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(RecursaError, match="system first"):
        t.render(MESSAGES)
    with pytest.raises(RecursaError):
        ChatTemplate("{% for %}")
    with pytest.raises(RecursaError):   # the sandbox refuses attribute access to internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
