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
