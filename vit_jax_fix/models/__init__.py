"""Models: one composable ViT backbone (`vit.py`) with every fix as an option, the Shunted Transformer
(`shunted.py`), and the registry of official names (`registry.create_model`)."""
