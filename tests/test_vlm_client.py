"""The shared OpenAI-compatible client against a real loopback server: concurrency, retries, bad replies, keys."""

from __future__ import annotations

import logging
import socket
import time

from chat_standin import serve
from PIL import Image

from fastsd.ocr.engine import OpenAIEngine, PageJob
from fastsd.vlm.client import ChatClient, user_message


def _img(rgb, size=(40, 30)):
    return Image.new("RGB", size, rgb)


def test_requests_run_concurrently_but_bounded():
    with serve(delay=0.2) as (url, st), ChatClient(url, model="m", concurrency=3) as client:
        replies = client.complete_many([(user_message(_img((i, 0, 0)), f"q{i}"), {}) for i in range(7)])
    assert [r.error for r in replies] == [None] * 7
    assert [r.text.split("]")[0] for r in replies] == [f"reply to [q{i}" for i in range(7)]  # request order
    assert st.max_in_flight == 3


def test_busy_answers_are_retried_with_backoff(caplog):
    with serve(busy=3) as (url, st), ChatClient(url, model="m", retries=4, backoff=0.01) as client:
        reply = client.complete(user_message(None, "hello"))
    assert reply.error is None and reply.text.startswith("reply to [hello]")
    assert st.statuses == [429, 503, 429, 200]


def test_retries_run_out_into_an_error_not_an_exception():
    with serve(busy=10) as (url, st), ChatClient(url, model="m", retries=2, backoff=0.01) as client:
        reply = client.complete(user_message(None, "hello"))
    assert reply.finish == "error" and "429" in reply.error and len(st.requests) == 3


def test_unreachable_server_is_an_error_naming_it():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with ChatClient(f"http://127.0.0.1:{port}", model="m", retries=2, backoff=0.3, concurrency=1) as client:
        reply = client.complete(user_message(None, "x"))
        assert reply.finish == "error" and f"127.0.0.1:{port}" in reply.error and "unreachable" in reply.error
        t0 = time.perf_counter()  # the other images of a caption run do not each wait out the retries
        rest = client.complete_many([(user_message(None, str(i)), {}) for i in range(5)])
        assert time.perf_counter() - t0 < 0.3 and all(r.error == reply.error for r in rest)


def test_key_is_sent_and_never_logged(caplog):
    from fastsd.redact import install_logging

    key = "sk-test-abcdefghijklmnop"
    install_logging()
    caplog.set_level(logging.DEBUG)
    with serve(busy=1) as (url, st), ChatClient(url, model="m", api_key=key, backoff=0.01) as client:
        client.complete(user_message(None, "x"))
        logging.getLogger("test").info("the key is %s", key)
    assert st.auth == [f"Bearer {key}"] * 2
    assert key not in caplog.text and "****" in caplog.text


def test_ocr_openai_engine_retries_and_reports_a_malformed_page():
    with serve(busy=2, malformed_rgb=(9, 9, 9)) as (url, st):
        engine = OpenAIEngine(url, concurrency=2)
        engine.client.backoff = 0.01
        gens = engine.run(
            [
                PageJob("good", _img((200, 200, 200)), "Text Recognition:"),
                PageJob("bad", _img((9, 9, 9)), "Text Recognition:"),
            ]
        )
        engine.close()
    good, bad = gens
    assert good.finish == "eos" and good.text.startswith("reply to [Text Recognition:]")
    assert bad.finish == "error" and "malformed reply" in bad.warnings[0] and bad.text == ""
