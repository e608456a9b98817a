"""DreamRelation: relation LoRA triplets on Mochi-1, trained with hybrid mask training and a relational contrastive loss."""
__version__ = "0.1.0"
