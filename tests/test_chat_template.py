"""``--chat-template``: a Jinja file or inline text replacing the checkpoint's template, checked at start."""

from __future__ import annotations

import httpx
import pytest
from test_server import KEY, NAME, Server

from deltaserve.cli import main
from deltaserve.errors import ConfigError
from deltaserve.models.make_model import make_model
from deltaserve.tokenizer import Tokenizer, load_chat_template

TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}>>\n{% endfor %}"
            "{% if add_generation_prompt %}ANSWER:{% endif %}")


def test_a_file_or_inline_text_and_its_errors(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert load_chat_template(str(f)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE  # the text itself, as vLLM takes it
    with pytest.raises(ConfigError, match="no-such.jinja: no such file"):
        load_chat_template(str(tmp_path / "no-such.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ConfigError, match=r"bad.jinja, line 2: not a valid Jinja template"):
        load_chat_template(str(bad))
    with pytest.raises(ConfigError, match=r"the --chat-template text, line 1: not a valid Jinja template"):
        load_chat_template("{% if x %}unclosed")


def test_serve_refuses_a_broken_template_before_loading_anything(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "no-model-needed"), "--chat-template", "{{ broken"]) == 2
    err = capsys.readouterr().err
    assert "not a valid Jinja template" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), dtype="float32")


def test_the_server_renders_chats_with_the_given_template(model_dir, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    srv = Server(model_dir, tmp_path / "server.log", "--chat-template", str(f))
    try:
        srv.wait_ready()
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": NAME, "messages": messages, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        rendered = "<<system: be brief>>\n<<user: Hello there>>\nANSWER:"
        assert r.json()["usage"]["prompt_tokens"] == len(Tokenizer(model_dir).encode(rendered))
    finally:
        srv.stop()
