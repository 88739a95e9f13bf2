"""Data: media decoding, manifests, streaming datasets and the SynthAV generator."""
