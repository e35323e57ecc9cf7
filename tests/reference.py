"""The independent reference every decoding path is checked against: the plain full-sequence forward.

`full_forward_generate` re-runs `model(ids)` over the whole sequence for every new token (no KV
cache, no stages, no engine), so a cached, batched or paged path that agrees with it is exact.
Sampling draws with a generator seeded like the engine's per-request one, through the same
`recursa.engine.sampling.sample`.
"""
import torch

from recursa.engine.sampling import sample


@torch.inference_mode()
def full_forward_generate(model, prompt_ids, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
                          seed=None, stop_ids=()):
    """New token ids of decoding `prompt_ids` by repeated full forwards (a stop id ends it, included)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]))[0, -1:].float()
        token = int(sample(logits, temperature, top_k, top_p, generator)[0])
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


@torch.inference_mode()
def copied_state_hidden(model, ids, exit_depths):
    """Hidden states after each depth (a list of L + 1 tensors [1, T, D]) of one uncached forward of
    `ids` under state copying (CALM): position p stops changing after exit_depths[p] layers, so every
    deeper layer sees that copied state and computes the position's keys/values from it."""
    h = model.embed(torch.tensor([ids]))
    cos, sin = model.rope(torch.arange(len(ids)))
    runs = torch.tensor(exit_depths)[None, :, None]
    out = [h]
    for d in range(model.depth):
        h = torch.where(runs > d, model.forward_stage(d, h, cos, sin)[0], h)
        out.append(h)
    return out


def run_arrivals(llm, prompts, params, arrival=(0, 2, 7, 15)):
    """The engine side of a comparison: add prompts[i] at engine step arrival[i] and step until all
    finish (requests arrive while others decode); finished outputs in prompt order."""
    done, step, added = {}, 0, 0
    while added < len(prompts) or llm.has_unfinished():
        while added < len(prompts) and arrival[added] <= step:
            llm.add_request(str(added), prompts[added], params)
            added += 1
        done.update({o.request_id: o for o in llm.step() if o.finished})
        step += 1
    return [done[str(i)] for i in range(len(prompts))]


@torch.inference_mode()
def replay_exit_rule(model, hidden, prompt_len, n, exits, measure, threshold=0.5):
    """(tokens, exit depths, logits) of the exit rule replayed on one forward's hidden states (a list
    of L + 1 tensors [1, T, D] over prompt + output[:-1]): the first new token comes from full depth,
    each later one from the first exit whose measure clears `threshold`, else from full depth."""
    from recursa.model.exits import exit_logits

    tokens, depths, rows = [], [], []
    for i in range(n):
        p = prompt_len + i - 1
        for d in (exits if i > 0 else ()):
            logits = exit_logits(model, hidden[d][0, p], d)
            if measure(logits, hidden[d][0, p], None, d) >= threshold:
                break
        else:
            d, logits = model.depth, model.head(hidden[-1][0, p])
        tokens.append(int(logits.argmax()))
        depths.append(d)
        rows.append(logits)
    return tokens, depths, rows
