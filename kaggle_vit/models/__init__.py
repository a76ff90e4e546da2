"""The models: our ViT (`vit`, registered with timm), fold checkpoints (`checkpoint`, read without
torch), local pretrained weights (`pretrained`) and the builder (`factory.create_model`)."""
