"""Models: the audio-visual LLM, its audio front end and aligner, token layout, processor and builder."""
