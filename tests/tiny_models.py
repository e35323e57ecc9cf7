"""A tiny text model directory (random `tiny` decoder + a BPE trained on two sentences), for tests of
the front ends (CLI text paths, the LLM's text API, the server)."""
import torch

from recursa.data.tokenizer import train_tokenizer
from recursa.model import Decoder
from recursa.presets import preset


def save_tiny_text_model(path, seed: int = 3):
    tok = train_tokenizer(["the cat sat on the mat. " * 40, "once upon a time there was a sea"], vocab_size=300)
    torch.manual_seed(seed)
    model = Decoder(preset("tiny", vocab_size=tok.vocab_size)).eval()
    model.save(path)
    tok.save(path)
    return path


def agreeing_exit_model(n_layers=4, deep_scale=0.15, lm_scale=25.0, seed=0, **shape):
    """A tiny model whose upper layers change the residual stream little, so shallow exits agree
    with the full model on some tokens and not on others (a random model never agrees), with
    peaked logits so that max-prob confidences spread over (0, 1). For early-exit tests."""
    torch.manual_seed(seed)
    m = Decoder(preset("tiny", n_layers=n_layers, vocab_size=256, tie_embeddings=False, **shape)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(lm_scale)
        for i, block in enumerate(m.layers):
            scale = 10.0 if i == 0 else 10.0 * deep_scale
            block.attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
    return m
