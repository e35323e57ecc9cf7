"""The official `openai` client against a real server: completions and chat, streaming or not,
stop strings, seeds, usage, many clients at once; every answer equals LLM.generate's."""
import asyncio

import pytest

openai = pytest.importorskip("openai")

from recursa import SamplingParams  # noqa: E402
from recursa.serve.chat import ChatTemplate  # noqa: E402

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _expected(reference, prompt, max_tokens, **params):
    params.setdefault("temperature", 0)
    return reference.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))[0]


def test_completion_equals_generate_with_usage_and_depths(client, reference):
    r = client.completions.create(model="tiny", prompt="once upon a time", max_tokens=12, **GREEDY)
    want = _expected(reference, "once upon a time", 12)
    (choice,) = r.choices
    assert choice.text == want.text and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert choice.exit_depths == want.exit_depths == [reference.model.depth] * 12
    assert r.model == "tiny" and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_several_prompts_text_and_token_ids(client, reference):
    ids = reference.tokenizer.encode("the cat")
    r = client.completions.create(model="tiny", prompt=[ids, ids[:1]], max_tokens=5, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [_expected(reference, p, 5).text for p in (ids, ids[:1])]
    assert r.usage.prompt_tokens == len(ids) + 1 and r.usage.completion_tokens == 10
    r = client.completions.create(model="tiny", prompt=["the cat", "a sea"], max_tokens=4, **GREEDY)
    assert [c.text for c in r.choices] == [_expected(reference, p, 4).text for p in ("the cat", "a sea")]


def test_streaming_completion_adds_up_and_reports_usage(client, reference):
    want = _expected(reference, "the cat sat", 20)
    chunks = list(client.completions.create(model="tiny", prompt="the cat sat", max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert sum(len(c.choices[0].exit_depths) for c in text_chunks) == 20
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == len(want.prompt_token_ids)
    assert all(c.usage is None for c in text_chunks)


def test_chat_uses_the_models_template(client, reference, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    prompt = ChatTemplate.from_dir(model_dir).render(messages)
    assert prompt == "[system] be brief\n[user] the cat?\n[assistant] "
    want = _expected(reference, prompt, 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, stream=True,
                                            **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_and_stop_token(client, reference):
    full = _expected(reference, "the cat", 40).text
    cut = next(i for i in range(len(full) // 3, len(full) - 1)
               if all(c.isascii() and c.isprintable() for c in full[i:i + 2]))
    stop = full[cut:cut + 2]
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=40, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the cat", max_tokens=40, stop=stop, stream=True, **GREEDY))
    assert streamed == full[:full.find(stop)]
    tokens = _expected(reference, "the cat", 40).token_ids
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [tokens[5]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == tokens.index(tokens[5]) + 1


def test_seed_reproducible_and_equal_to_generate(client, reference):
    args = dict(model="tiny", prompt="once", max_tokens=16, temperature=1.0, top_p=0.9,
                extra_body={"ignore_eos": True, "top_k": 50})
    a = client.completions.create(seed=7, **args).choices[0].text
    b = client.completions.create(seed=7, **args).choices[0].text
    c = client.completions.create(seed=8, **args).choices[0].text
    assert a == b != c
    assert a == _expected(reference, "once", 16, temperature=1.0, top_p=0.9, top_k=50, seed=7).text


def test_many_concurrent_streams_none_lost_or_mixed(server, reference):
    """32 streaming clients at once: each gets exactly its own continuation."""
    prompts = [f"the cat {'sat ' * (i % 5)}on {i}" for i in range(32)]
    want = [o.text for o in reference.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]

    async def one(client, prompt):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == want
    assert server.idle() and server.engine.kv.num_free_blocks == server.engine.kv.num_blocks


def test_models_health_metrics(client, server):
    import httpx

    (card,) = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "recursa"
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("recursa:num_requests_running", "recursa:kv_cache_usage_perc", "recursa:generation_tokens_total",
                 "recursa:request_success_total", "recursa:time_to_first_token_seconds_bucket",
                 "recursa:inter_token_latency_seconds_bucket", "recursa:e2e_request_latency_seconds_count",
                 "recursa:mean_exit_depth", "recursa:tokens_per_stage_run", "recursa:exit_depth_bucket",
                 "recursa:kv_bytes_per_token_written", "recursa:kv_bytes_per_token_reserved"):
        assert name in text, name
    assert 'recursa:request_success_total{finished_reason="length"}' in text
    depth = server.engine.model.depth
    assert f'recursa:exit_depth_bucket{{le="{depth}.0"}}' in text or f'recursa:exit_depth_bucket{{le="{depth}"}}' in text
