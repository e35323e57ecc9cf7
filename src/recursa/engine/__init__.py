"""Inference: sampling and decoding. The engine owns all inference state; models stay stateless."""
