"""Compare weights on held-out audio: `python -m evaluation --dataset held_out.zip --weights small model.tar`.

- `evaluation.compare`: validation loss (the trainer's, training/evaluate.py), Fréchet distance of generated samples
  to the held-out clips in EnCodec's latent space, and the copy check against training clips, per weights;
- `evaluation.frechet`: the Fréchet distance between two sets of embeddings;
- `evaluation.embed`: EnCodec latents (before quantization) and the copy check.
"""
