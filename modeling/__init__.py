"""SAM-Med3D components, one per module; ``model.py`` at the project root is the public entry point.

- ``image_encoder``: the 3-D ViT (windowed / global attention with SAM-Med3D's relative-position bias) and neck.
- ``prompt_encoder``: point, low-res-mask and "no prompt" embeddings, random-Fourier positional encoding.
- ``mask_decoder``: the two-way transformer, mask upscaling, hypernetwork masks and the IoU head.
- ``representation_head``: visual tokens and an ICH-presence logit for the BLIP-2 path.
- ``sam_med3d``: the assembled model with ``encode`` / ``decode`` / ``represent`` / ``forward``.
- ``checkpoint``: safe reading of checkpoint files and the strict key/shape report.
- ``validation``: input checks with messages that say what was expected and what arrived.
"""
