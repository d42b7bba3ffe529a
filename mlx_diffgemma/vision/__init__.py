"""Images: the vision tower, image preprocessing, and images in a prompt.

- tower.py: the Gemma 4 vision encoder (`make_vision`).
- processing.py: an image file to patches (transformers' processor, in numpy).
- prompt.py: a prompt's images, their placeholder tokens and soft tokens.
"""
