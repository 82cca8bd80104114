"""Stage 2 of the data path: the Trainer's loop and checkpoints, recipe configs and presets, the data streams it draws
batches from (digits, prompts, images, text conditions), LoRA adapters.
"""
