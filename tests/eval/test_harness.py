"""The `recursa` model inside lm-eval: simple_evaluate on local two-item tasks against direct computation.

References are plain full-sequence forwards of the same tiny model (log-softmax sums, greedy
argmax loops), independent of recursa's scorer and engine; the CLI test checks that the harness and
`recursa eval` agree on the same toy wheel."""
from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from recursa import Decoder, preset  # noqa: E402
from recursa.cli import main  # noqa: E402
from recursa.data.tokenizer import train_tokenizer  # noqa: E402
from recursa.eval.harness import RecursaLM  # noqa: E402
from recursa.model.exits import exit_logits  # noqa: E402

DOCS = [{"context": "the cat", "choices": [" sat", " ran on"], "label": 0},
        {"context": "a dog", "choices": [" ran", " sat on the"], "label": 1}]


def _yaml(name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    (d / "mc.yaml").write_text(_yaml("toy_mc", data, "output_type: multiple_choice\ndoc_to_text: context\n"
                                     "doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
                                     "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"))
    (d / "gen.yaml").write_text(_yaml("toy_gen", data, "output_type: generate_until\ndoc_to_text: context\n"
                                      "doc_to_target: \"{{choices[label]}}\"\ngeneration_kwargs:\n"
                                      "  until: [\"t\"]\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n"))
    (d / "roll.yaml").write_text(_yaml("toy_roll", data, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                                       "doc_to_target: context\nmetric_list:\n  - metric: word_perplexity\n"))
    return d


def _model_dir(tmp_path_factory, name, **cfg):
    d = tmp_path_factory.mktemp(name)
    tok = train_tokenizer(["the cat sat on the mat. the dog ran, and a cow stood."] * 10, vocab_size=280)
    torch.manual_seed(0)
    Decoder(preset(cfg.pop("preset", "tiny"), vocab_size=tok.vocab_size, max_seq_len=32, **cfg)).save(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "model")


def _run(lm, tasks_dir, tasks):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))


def _logprob(model, ids, n_cont, depth=None):
    """Summed log-probability of the last n_cont ids, one plain forward (logits from exit `depth`)."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        if depth is None:
            logits = model(x)[0]
        else:
            logits = exit_logits(model, model.forward_hidden(x)[depth][0], depth)
    logp = torch.log_softmax(logits.float(), -1)[-n_cont:]
    return logp.gather(-1, torch.tensor(ids[-n_cont:])[:, None]).sum().item()


def _pair_ids(tok, context, continuation):
    ctx = tok.encode(context)
    return ctx + tok.encode(context + continuation)[len(ctx):], len(tok.encode(context + continuation)) - len(ctx)


def test_loglikelihood_and_generate_until_equal_direct_computation(model_dir, tasks_dir):
    lm = RecursaLM(pretrained=str(model_dir), batch_size=1)
    out = _run(lm, tasks_dir, ["toy_mc", "toy_gen", "toy_roll"])
    model, tok = lm.model, lm.tok
    correct = 0
    for sample in out["samples"]["toy_mc"]:
        doc = sample["doc"]
        want = [_logprob(model, *_pair_ids(tok, doc["context"], c)) for c in doc["choices"]]
        got = [r[0][0] for r in sample["resps"]]
        assert got == pytest.approx(want, abs=1e-4)
        correct += max(range(2), key=want.__getitem__) == doc["label"]
    assert out["results"]["toy_mc"]["acc,none"] == correct / 2
    for sample in out["samples"]["toy_gen"]:  # greedy, 6 new tokens at most, cut before the first "t"
        ids = tok.encode(sample["doc"]["context"])
        n = len(ids)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == tok.eos_id:
                    ids.pop()
                    break
        text = tok.decode(ids[n:])
        assert sample["resps"][0][0] == text.split("t")[0]
    for sample in out["samples"]["toy_roll"]:  # the whole text after the start token, in one window
        ids = [tok.eos_id] + tok.encode(sample["doc"]["context"])
        assert sample["resps"][0][0] == pytest.approx(_logprob(model, ids, len(ids) - 1), abs=1e-4)
    assert out["config"]["recursa_mean_depth_scored"] == model.depth


def test_rolling_windows_and_bad_args(model_dir):
    lm = RecursaLM(pretrained=str(model_dir), max_length=8)
    text = "the cat sat on the mat. the dog ran"
    ids = lm.tok.encode(text)
    assert len(ids) > 8

    class Req:
        args = (text,)

    got = lm.loglikelihood_rolling([Req()])[0]
    want, seq = 0.0, [lm.tok.eos_id] + ids  # disjoint windows of 8 predictions; the last one keeps 8 inputs
    for start in range(0, len(ids), 8):
        end = min(start + 8, len(ids))
        window = seq[max(0, end - 8):end + 1]
        want += _logprob(lm.model, window, end - start)
    assert got == pytest.approx(want, abs=1e-4)
    from recursa.errors import RecursaError

    with pytest.raises(RecursaError, match="unknown model_args"):
        RecursaLM(pretrained=str(model_dir), no_such_arg=1)
    with pytest.raises(RecursaError, match="no exits"):
        RecursaLM(pretrained=str(model_dir), exit_threshold=0.5)
    with pytest.raises(RecursaError, match="dtype"):
        RecursaLM(pretrained=str(model_dir), dtype="int3")
    bf16 = RecursaLM(pretrained=str(model_dir), dtype="bfloat16", max_length=8)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.loglikelihood_rolling([Req()])[0] == pytest.approx(got, rel=0.05)


def test_early_exit_threshold_and_depth(tmp_path_factory, tasks_dir):
    d = _model_dir(tmp_path_factory, "exits", exit_depths=[2])
    for threshold, depth in ((0.0, 2), (1.01, 4)):   # everyone exits at 2 / nobody exits
        lm = RecursaLM(pretrained=str(d), exit_threshold=threshold)
        out = _run(lm, tasks_dir, ["toy_mc", "toy_gen"])
        for sample in out["samples"]["toy_mc"]:
            doc = sample["doc"]
            want = [_logprob(lm.model, *_pair_ids(lm.tok, doc["context"], c), depth=depth) for c in doc["choices"]]
            assert [r[0][0] for r in sample["resps"]] == pytest.approx(want, abs=1e-4)
        assert out["config"]["recursa_mean_depth_scored"] == depth
        assert out["config"]["recursa_mean_depth_scored_by_task"] == {"toy_mc": depth}
        generated = out["config"]["recursa_mean_depth_generated"]   # the engine: first new token at full depth
        assert generated == 4 if depth == 4 else 2 <= generated < 4


def test_mor_scored_causally_with_depths(tmp_path_factory, tasks_dir):
    d = _model_dir(tmp_path_factory, "mor", preset="mor-tiny")
    lm = RecursaLM(pretrained=str(d))
    out = _run(lm, tasks_dir, ["toy_mc"])
    for sample in out["samples"]["toy_mc"]:
        doc = sample["doc"]
        want = [_logprob(lm.model, *_pair_ids(lm.tok, doc["context"], c)) for c in doc["choices"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(want, abs=1e-4)
    assert 0 < out["config"]["recursa_mean_depth_scored"] <= lm.model.depth


def test_cli_harness_agrees_with_recursa_eval(capsys, tmp_path, toy_cache, model_dir):
    ours, theirs = tmp_path / "ours.json", tmp_path / "harness.json"
    assert main(["eval", str(model_dir), "--tasks", "toy,toy:bpb_0shot", "--cache", str(toy_cache),
                 "--json", str(ours)]) == 0
    assert main(["eval", str(model_dir), "--harness", "toy,toy:bpb_0shot", "--cache", str(toy_cache),
                 "--json", str(theirs), "--batch-size", "2"]) == 0
    assert "recursa_toy_rc_0shot" in capsys.readouterr().out
    a, b = json.loads(ours.read_text())["tasks"], json.loads(theirs.read_text())["results"]
    assert b["recursa_toy_rc_0shot"]["acc,none"] == a["toy:rc_0shot"]["acc"]
    assert b["recursa_toy_rc_0shot"]["acc_norm,none"] == a["toy:rc_0shot"]["acc_per_char"]
    assert b["recursa_toy_bpb_0shot"]["acc,none"] == a["toy:bpb_0shot"]["acc"]
    assert (toy_cache / "harness" / "recursa_toy_rc_0shot.yaml").is_file()
    assert main(["eval", str(model_dir), "--harness", "nope", "--cache", str(toy_cache)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
